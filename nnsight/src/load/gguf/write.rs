//! Writing GGUF files: metadata and float32 tensors, the layout [`GgufFile`](super::GgufFile) reads (version 3,
//! little-endian, alignment 32).
//!
//! Enough for small files such as llama.cpp control vectors (`crate::steering`): every value type of
//! [`MetaValue`], tensors of type F32 only. Layout as llama.cpp's `docs/gguf.md` and the `gguf` Python package's
//! `GGUFWriter` write it: magic `GGUF`, `u32` version 3, `u64` tensor count, `u64` metadata count, the metadata in
//! insertion order, the tensor infos (name, dims innermost first, type 0 = F32, offset from the data start), zero
//! padding to the alignment, then each tensor's bytes, each padded to the alignment.
//!
//! ```no_run
//! use nnsight::load::gguf::{GgufWriter, MetaValue};
//!
//! # fn main() -> nnsight::Result<()> {
//! let mut writer = GgufWriter::new();
//! writer.metadata("general.architecture", MetaValue::String("controlvector".into()));
//! writer.tensor_f32("direction.1", &[4], vec![0.5, -1.0, 0.0, 2.0])?;
//! writer.write("vector.gguf")?;
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeSet;
use std::path::Path;

use super::MetaValue;
use crate::error::{Error, Result};

/// The alignment of the data section and of every tensor in it (GGUF's default: no `general.alignment` key).
const ALIGNMENT: usize = 32;
/// Longest tensor name llama.cpp accepts (`GGML_MAX_NAME` is 64, with the terminating zero).
const MAX_NAME_BYTES: usize = 63;

/// A GGUF file being put together: metadata and float32 tensors, written by [`GgufWriter::write`].
#[derive(Debug, Default, Clone)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<u64>, Vec<f32>)>,
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a metadata value (a key set twice keeps the last value, in the place of the first).
    pub fn metadata(&mut self, key: impl Into<String>, value: MetaValue) -> &mut Self {
        let key = key.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key, value)),
        }
        self
    }

    /// Adds a float32 tensor of `shape` (PyTorch order, outermost first) holding `values` (row-major).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the name is empty, longer than 63 bytes or already used, or when `values` does
    /// not hold the shape's number of elements.
    pub fn tensor_f32(&mut self, name: impl Into<String>, shape: &[usize], values: Vec<f32>) -> Result<&mut Self> {
        let name = name.into();
        let invalid = |message: String| Error::InvalidInput { message: format!("GGUF writer: {message}") };
        if name.is_empty() || name.len() > MAX_NAME_BYTES {
            return Err(invalid(format!(
                "tensor name {name:?} is {} bytes long; GGUF names take 1 to {MAX_NAME_BYTES}",
                name.len()
            )));
        }
        if self.tensors.iter().any(|(n, _, _)| *n == name) {
            return Err(invalid(format!("tensor `{name}` is added twice")));
        }
        let numel: usize = shape.iter().product();
        if numel != values.len() {
            return Err(invalid(format!(
                "tensor `{name}` of shape {shape:?} needs {numel} values, given {}",
                values.len()
            )));
        }
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push((name, dims, values));
        Ok(self)
    }

    /// The file's bytes.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a metadata array whose elements are not all of one type.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_string(&mut out, key);
            out.extend_from_slice(&type_id(value).to_le_bytes());
            put_value(&mut out, value, key)?;
        }
        let mut offset = 0usize;
        for (name, dims, values) in &self.tensors {
            put_string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&0u32.to_le_bytes()); // F32
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += padded(values.len() * 4);
        }
        out.resize(padded(out.len()), 0);
        for (_, _, values) in &self.tensors {
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.resize(padded(out.len()), 0);
        }
        Ok(out)
    }

    /// Writes the file to `path` (replacing it), creating its folder if missing.
    ///
    /// # Errors
    /// [`Error::Io`] naming the path when it cannot be written; see [`GgufWriter::to_bytes`].
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
    }

    /// The names of the tensors added so far, in order.
    pub fn tensor_names(&self) -> Vec<&str> {
        self.tensors.iter().map(|(n, _, _)| n.as_str()).collect()
    }
}

fn padded(n: usize) -> usize {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The GGUF type id of a metadata value.
fn type_id(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue, key: &str) -> Result<()> {
    match v {
        MetaValue::U8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::String(s) => put_string(out, s),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Array(items) => {
            let types: BTreeSet<u32> = items.iter().map(type_id).collect();
            if types.len() > 1 {
                return Err(Error::InvalidInput {
                    message: format!(
                        "GGUF writer: metadata array `{key}` mixes element types ({}); GGUF arrays hold one type",
                        items
                            .iter()
                            .map(MetaValue::type_name)
                            .collect::<BTreeSet<_>>()
                            .into_iter()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
            // An empty array's element type is not recorded anywhere else: u8, as llama.cpp does for none.
            let element = types.into_iter().next().unwrap_or(0);
            out.extend_from_slice(&element.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item, key)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::gguf::GgufFile;
    use tch::Kind;

    #[test]
    fn a_written_file_reads_back_with_every_value_type_and_its_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/w.gguf");
        let mut w = GgufWriter::new();
        let values = [
            ("a.u8", MetaValue::U8(7)),
            ("a.i8", MetaValue::I8(-7)),
            ("a.u16", MetaValue::U16(700)),
            ("a.i16", MetaValue::I16(-700)),
            ("a.u32", MetaValue::U32(70_000)),
            ("a.i32", MetaValue::I32(-70_000)),
            ("a.f32", MetaValue::F32(1.5)),
            ("a.bool", MetaValue::Bool(true)),
            ("a.str", MetaValue::String("héllo".into())),
            ("a.arr", MetaValue::Array(vec![MetaValue::String("x".into()), MetaValue::String("yz".into())])),
            ("a.u64", MetaValue::U64(1 << 40)),
            ("a.i64", MetaValue::I64(-(1 << 40))),
            ("a.f64", MetaValue::F64(-2.25)),
        ];
        for (k, v) in &values {
            w.metadata(*k, v.clone());
        }
        w.metadata("a.u8", MetaValue::U8(8)); // replaced in place
        w.tensor_f32("t.one", &[3], vec![1.0, -2.0, 3.5]).unwrap();
        w.tensor_f32("t.two", &[2, 3], (0..6).map(|i| i as f32 / 3.0).collect()).unwrap();
        w.write(&path).unwrap();

        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.metadata.len(), values.len());
        for (k, v) in &values[1..] {
            assert_eq!(f.get(k), Some(v), "{k}");
        }
        assert_eq!(f.get("a.u8"), Some(&MetaValue::U8(8)));
        assert_eq!(f.tensors.len(), 2);
        assert_eq!(f.tensors[1].shape(), vec![2, 3]);
        assert_eq!(f.tensors[1].offset % 32, 0);
        let two = f.load_tensor(&f.tensors[1], Kind::Float).unwrap();
        let expected: Vec<f32> = (0..6).map(|i| i as f32 / 3.0).collect();
        assert_eq!(Vec::<f32>::try_from(two.flatten(0, -1)).unwrap(), expected);
        let one = f.load_tensor(&f.tensors[0], Kind::Float).unwrap();
        assert_eq!(Vec::<f32>::try_from(one).unwrap(), vec![1.0, -2.0, 3.5]);
        assert_eq!(w.tensor_names(), vec!["t.one", "t.two"]);
    }

    #[test]
    fn bad_tensors_and_mixed_arrays_are_errors_that_say_why() {
        let mut w = GgufWriter::new();
        let e = w.tensor_f32("t", &[2, 2], vec![0.0; 3]).unwrap_err().to_string();
        assert!(e.contains("needs 4 values, given 3"), "{e}");
        w.tensor_f32("t", &[1], vec![0.0]).unwrap();
        let e = w.tensor_f32("t", &[1], vec![0.0]).unwrap_err().to_string();
        assert!(e.contains("added twice"), "{e}");
        let e = w.tensor_f32("x".repeat(64), &[1], vec![0.0]).unwrap_err().to_string();
        assert!(e.contains("64 bytes long"), "{e}");
        w.metadata("m", MetaValue::Array(vec![MetaValue::U8(1), MetaValue::String("a".into())]));
        let e = w.to_bytes().unwrap_err().to_string();
        assert!(e.contains("`m` mixes element types (string, u8)"), "{e}");
    }
}
