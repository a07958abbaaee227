//! Reading GGUF files (llama.cpp's checkpoint format, versions 2 and 3, little-endian).
//!
//! The file is memory-mapped: [`GgufFile::open`] parses the header, the metadata and the tensor table, and checks
//! that every tensor's bytes lie inside the file; [`GgufFile::load_tensor`] dequantizes one tensor into a CPU
//! `tch::Tensor` in PyTorch dimension order. Supported tensor types: F32, F16, BF16, Q8_0, Q4_0 and Q4_1.
//!
//! Layout (see llama.cpp's `docs/gguf.md`): magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata count,
//! the metadata key/value pairs, the tensor infos (name, dims innermost first, type, offset), padding to the
//! alignment (`general.alignment`, default 32), then the tensor data; each offset is relative to that data start.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Deepest nesting of metadata arrays accepted (real files use one level).
const MAX_ARRAY_DEPTH: usize = 8;
/// The tensor types [`GgufFile::load_tensor`] can dequantize, as the error message lists them.
const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1";

/// GGML type ids of the supported tensor types.
mod ty {
    pub const F32: u32 = 0;
    pub const F16: u32 = 1;
    pub const Q4_0: u32 = 2;
    pub const Q4_1: u32 = 3;
    pub const Q8_0: u32 = 8;
    pub const BF16: u32 = 30;
}

/// Values per block and bytes per block of the quantized types.
const QK: usize = 32;
const Q4_0_BYTES: usize = 18;
const Q4_1_BYTES: usize = 20;
const Q8_0_BYTES: usize = 34;

/// One metadata value of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// GGUF type 0.
    U8(u8),
    /// GGUF type 1.
    I8(i8),
    /// GGUF type 2.
    U16(u16),
    /// GGUF type 3.
    I16(i16),
    /// GGUF type 4.
    U32(u32),
    /// GGUF type 5.
    I32(i32),
    /// GGUF type 6.
    F32(f32),
    /// GGUF type 7.
    Bool(bool),
    /// GGUF type 8 (UTF-8; invalid sequences are replaced).
    String(String),
    /// GGUF type 9: values of one type.
    Array(Vec<MetaValue>),
    /// GGUF type 10.
    U64(u64),
    /// GGUF type 11.
    I64(i64),
    /// GGUF type 12.
    F64(f64),
}

impl MetaValue {
    /// The value as an unsigned integer, from any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, from any integer type whose value fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, from a float or any integer type.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            MetaValue::U64(v) => Some(v as f64),
            MetaValue::I64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The value as a boolean, if it is a bool (or an integer 0 or 1).
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => match self.as_u64() {
                Some(0) => Some(false),
                Some(1) => Some(true),
                _ => None,
            },
        }
    }

    /// The GGUF name of the value's type (`"u32"`, `"string"`, `"array"`, ...), for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::F32(_) => "f32",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::Array(_) => "array",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F64(_) => "f64",
        }
    }
}

/// Where one tensor lies in a GGUF file, and how it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// The tensor's llama.cpp name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions as stored: innermost (contiguous) first, the reverse of PyTorch's order.
    pub dims: Vec<u64>,
    /// The GGML type id (see [`ggml_type_name`]).
    pub ggml_type: u32,
    /// Offset of the tensor's bytes from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// The shape in PyTorch order (outermost first): the stored dims reversed.
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }

    /// Number of values in the tensor.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The llama.cpp name of the tensor's type (`"Q4_1"`).
    pub fn type_name(&self) -> &'static str {
        ggml_type_name(self.ggml_type)
    }
}

/// The llama.cpp name of a GGML tensor type id (`3` → `"Q4_1"`), or `"unknown"`.
pub fn ggml_type_name(t: u32) -> &'static str {
    match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

/// `(values per block, bytes per block)` of a GGML type, where known.
fn block_layout(t: u32) -> Option<(u64, u64)> {
    Some(match t {
        0 => (1, 4),
        1 => (1, 2),
        2 => (32, 18),
        3 => (32, 20),
        6 => (32, 22),
        7 => (32, 24),
        8 => (32, 34),
        9 => (32, 40),
        10 => (256, 84),
        11 => (256, 110),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        15 => (256, 292),
        16 => (256, 66),
        17 => (256, 74),
        18 => (256, 98),
        19 => (256, 50),
        20 => (32, 18),
        21 => (256, 110),
        22 => (256, 82),
        23 => (256, 136),
        24 => (1, 1),
        25 => (1, 2),
        26 => (1, 4),
        27 => (1, 8),
        28 => (1, 8),
        29 => (256, 56),
        30 => (1, 2),
        34 => (256, 54),
        35 => (256, 66),
        39 => (32, 17),
        _ => return None,
    })
}

/// An open, memory-mapped GGUF file: its metadata and tensor table, with tensors loaded on demand.
pub struct GgufFile {
    /// The file.
    pub path: PathBuf,
    /// The GGUF format version (2 or 3).
    pub version: u32,
    /// The metadata, by key (`general.architecture`, `llama.block_count`, `tokenizer.ggml.tokens`, ...).
    pub metadata: BTreeMap<String, MetaValue>,
    /// The tensors, in file order.
    pub tensors: Vec<GgufTensorInfo>,
    mmap: memmap2::Mmap,
    data_offset: u64,
    alignment: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("data_offset", &self.data_offset)
            .field("alignment", &self.alignment)
            .finish()
    }
}

/// A bounds-checked little-endian reader over the mapped bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn truncated(&self, what: &dyn fmt::Display, need: u64) -> Error {
        Error::format(
            self.path,
            format!(
                "truncated GGUF file: reading {what} at byte {} needs {need} bytes, but the file has {} bytes",
                self.pos,
                self.buf.len()
            ),
        )
    }

    fn bytes(&mut self, n: u64, what: &dyn fmt::Display) -> Result<&'a [u8]> {
        let left = (self.buf.len() - self.pos) as u64;
        if n > left {
            return Err(self.truncated(what, n));
        }
        let n = n as usize;
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &dyn fmt::Display) -> Result<[u8; N]> {
        let b = self.bytes(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: &dyn fmt::Display) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn fmt::Display) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &dyn fmt::Display) -> Result<String> {
        let len = self.u64(&format_args!("length of {what}"))?;
        let b = self.bytes(len, what)?;
        Ok(match std::str::from_utf8(b) {
            Ok(s) => s.to_owned(),
            Err(_) => String::from_utf8_lossy(b).into_owned(),
        })
    }

    fn value(&mut self, vtype: u32, what: &dyn fmt::Display, depth: usize) -> Result<MetaValue> {
        Ok(match vtype {
            0 => MetaValue::U8(u8::from_le_bytes(self.array(what)?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.array(what)?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.array(what)?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => {
                let at = self.pos;
                match self.array::<1>(what)?[0] {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    b => {
                        return Err(Error::format(
                            self.path,
                            format!("{what} at byte {at}: bool value {b} is neither 0 nor 1"),
                        ))
                    }
                }
            }
            8 => MetaValue::String(self.string(what)?),
            9 => {
                let at = self.pos;
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(Error::format(
                        self.path,
                        format!("{what} at byte {at}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels"),
                    ));
                }
                let etype = self.u32(&format_args!("element type of {what}"))?;
                let count = self.u64(&format_args!("length of {what}"))?;
                // Every element takes at least one byte: a count beyond the bytes left is garbage, and is
                // refused before anything is allocated for it.
                let left = (self.buf.len() - self.pos) as u64;
                if count > left {
                    return Err(self.truncated(&format_args!("{count} elements of {what}"), count));
                }
                let mut items = Vec::with_capacity(count as usize);
                for i in 0..count {
                    items.push(self.value(etype, &format_args!("element {i} of {what}"), depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(u64::from_le_bytes(self.array(what)?)),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(Error::format(
                    self.path,
                    format!("{what} at byte {}: unknown metadata value type {other}", self.pos.saturating_sub(4)),
                ))
            }
        })
    }
}

impl GgufFile {
    /// Opens and memory-maps a GGUF file, and parses its header, metadata and tensor table.
    ///
    /// A missing file gives [`Error::FileNotFound`]; a file that is not GGUF, is truncated, or whose tensors lie
    /// outside it gives [`Error::Format`] saying what and at which byte offset.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::FileNotFound { path: path.clone(), what: "GGUF model file".to_owned() }
            }
            _ => Error::io(&path, e),
        })?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len < 4 {
            return Err(Error::format(&path, format!("not a GGUF file: only {len} bytes long")));
        }
        // SAFETY: the map is read-only and private to this value; like every memory-mapped reader we rely on the
        // file not being truncated by another process while it is open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let (version, metadata, tensors, data_offset, alignment) = Self::parse(&mmap, &path)?;
        let gguf = GgufFile { path, version, metadata, tensors, mmap, data_offset, alignment };
        gguf.check_tensor_ranges()?;
        Ok(gguf)
    }

    #[allow(clippy::type_complexity)]
    fn parse(buf: &[u8], path: &Path) -> Result<(u32, BTreeMap<String, MetaValue>, Vec<GgufTensorInfo>, u64, u64)> {
        if &buf[..4] != MAGIC {
            return Err(Error::format(
                path,
                format!("not a GGUF file: the first bytes are {:02x?}, not the magic \"GGUF\"", &buf[..4]),
            ));
        }
        let mut r = Reader { buf, pos: 4, path };
        let version = r.u32(&"version")?;
        if version != 2 && version != 3 {
            let msg = if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
                "GGUF file is big-endian; only little-endian files are supported".to_owned()
            } else if version == 1 {
                "GGUF version 1 is not supported (versions 2 and 3 are)".to_owned()
            } else {
                format!("unknown GGUF version {version} at byte 4 (versions 2 and 3 are supported)")
            };
            return Err(Error::format(path, msg));
        }
        let n_tensors = r.u64(&"tensor count")?;
        let n_kv = r.u64(&"metadata count")?;

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&format_args!("key of metadata entry {i}"))?;
            let vtype = r.u32(&format_args!("value type of metadata `{key}`"))?;
            let value = r.value(vtype, &format_args!("value of metadata `{key}`"), 0)?;
            metadata.insert(key, value);
        }

        // A tensor info takes at least 8 + 4 + 4 + 8 bytes; refuse counts the file cannot hold before allocating.
        let left = (buf.len() - r.pos) as u64;
        if n_tensors > left / 24 {
            return Err(r.truncated(&format_args!("{n_tensors} tensor infos"), n_tensors.saturating_mul(24)));
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = r.string(&format_args!("name of tensor {i}"))?;
            let at = r.pos;
            let n_dims = r.u32(&format_args!("dimension count of tensor `{name}`"))?;
            if n_dims > 8 {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}` at byte {at}: {n_dims} dimensions (at most 8 are allowed)"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(r.u64(&format_args!("dimension {d} of tensor `{name}`"))?);
            }
            let ggml_type = r.u32(&format_args!("type of tensor `{name}`"))?;
            let offset = r.u64(&format_args!("offset of tensor `{name}`"))?;
            tensors.push(GgufTensorInfo { name, dims, ggml_type, offset });
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => return Err(Error::format(path, format!("general.alignment must be a power of two, found {v:?}"))),
            },
        };
        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        Ok((version, metadata, tensors, data_offset, alignment))
    }

    /// Checks that every tensor of a known type has a sane size and lies inside the file.
    fn check_tensor_ranges(&self) -> Result<()> {
        let file_len = self.mmap.len() as u64;
        for t in &self.tensors {
            if t.offset % self.alignment != 0 {
                return Err(Error::format(
                    &self.path,
                    format!(
                        "tensor `{}`: offset {} is not a multiple of the alignment {}",
                        t.name, t.offset, self.alignment
                    ),
                ));
            }
            let Some(size) = self.checked_size(t)? else {
                continue;
            };
            let start = self.data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(size));
            match (start, end) {
                (Some(_), Some(end)) if end <= file_len => {}
                _ => {
                    return Err(Error::format(
                        &self.path,
                        format!(
                            "truncated GGUF file: tensor `{}` ({} bytes) lies at bytes {}..{}, but the file has {file_len} bytes",
                            t.name,
                            size,
                            self.data_offset as u128 + t.offset as u128,
                            self.data_offset as u128 + t.offset as u128 + size as u128,
                        ),
                    ))
                }
            }
        }
        Ok(())
    }

    /// The stored byte size of a tensor, `None` for types of unknown layout; errors on absurd dims.
    fn checked_size(&self, t: &GgufTensorInfo) -> Result<Option<u64>> {
        let Some((block, bytes)) = block_layout(t.ggml_type) else {
            return Ok(None);
        };
        let bad = |msg: String| Error::format(&self.path, format!("tensor `{}` {:?}: {msg}", t.name, t.dims));
        let numel = t
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| bad("the number of values overflows".to_owned()))?;
        let inner = t.dims.first().copied().unwrap_or(1);
        if inner % block != 0 {
            return Err(bad(format!(
                "the innermost dimension {inner} is not a multiple of the {} block size {block}",
                ggml_type_name(t.ggml_type)
            )));
        }
        (numel / block).checked_mul(bytes).map(Some).ok_or_else(|| bad("the byte size overflows".to_owned()))
    }

    /// The model architecture (`general.architecture`, e.g. `"llama"`).
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    /// The metadata value under `key`, if any.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn wrong_type(&self, key: &str, expected: &str) -> Error {
        match self.metadata.get(key) {
            None => Error::config(&self.path, format!("GGUF metadata key `{key}` is missing")),
            Some(v) => Error::config(
                &self.path,
                format!("GGUF metadata key `{key}` should be {expected}, found {} {}", v.type_name(), short(v)),
            ),
        }
    }

    /// The metadata value under `key` as a non-negative integer; [`Error::Config`] naming the key if it is
    /// missing or of another type.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get(key).and_then(MetaValue::as_u64).ok_or_else(|| self.wrong_type(key, "a non-negative integer"))
    }

    /// The metadata value under `key` as a float (integers are converted); [`Error::Config`] naming the key if
    /// it is missing or of another type.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.get(key).and_then(MetaValue::as_f64).ok_or_else(|| self.wrong_type(key, "a number"))
    }

    /// The metadata value under `key` as a string; [`Error::Config`] naming the key if it is missing or of
    /// another type.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key).and_then(MetaValue::as_str).ok_or_else(|| self.wrong_type(key, "a string"))
    }

    /// The tensor called `name`, if the file has one.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The number of bytes the tensor takes in the file (0 for a type of unknown layout).
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> usize {
        match block_layout(info.ggml_type) {
            Some((block, bytes)) => (info.numel() / block * bytes) as usize,
            None => 0,
        }
    }

    /// The tensor's stored bytes, checked against the file size.
    fn tensor_data(&self, info: &GgufTensorInfo) -> Result<&[u8]> {
        let size = self.checked_size(info)?.unwrap_or(0);
        let start = self.data_offset.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(size));
        match (start, end) {
            (Some(start), Some(end)) if end <= self.mmap.len() as u64 => Ok(&self.mmap[start as usize..end as usize]),
            _ => Err(Error::format(
                &self.path,
                format!(
                    "tensor `{}` ({size} bytes at data offset {}) lies beyond the end of the file ({} bytes)",
                    info.name,
                    info.offset,
                    self.mmap.len()
                ),
            )),
        }
    }

    /// Loads one tensor: dequantized, in PyTorch shape order, converted to `kind` (`Float`, `Half`, `BFloat16` or
    /// `Double`), on the CPU.
    ///
    /// Quantized types are dequantized in `f32`; F16 and BF16 tensors are converted exactly. A type other than
    /// F32, F16, BF16, Q8_0, Q4_0 or Q4_1 gives [`Error::UnsupportedTensorType`].
    pub fn load_tensor(&self, info: &GgufTensorInfo, kind: Kind) -> Result<Tensor> {
        if !matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double) {
            return Err(Error::InvalidInput {
                message: format!(
                    "GGUF tensor `{}` can only be loaded as Float, Half, BFloat16 or Double, not {kind:?}",
                    info.name
                ),
            });
        }
        if !matches!(info.ggml_type, ty::F32 | ty::F16 | ty::BF16 | ty::Q8_0 | ty::Q4_0 | ty::Q4_1) {
            return Err(Error::UnsupportedTensorType {
                path: self.path.clone(),
                tensor: info.name.clone(),
                ggml_type: info.ggml_type,
                type_name: ggml_type_name(info.ggml_type).to_owned(),
                supported: SUPPORTED_TYPES.to_owned(),
            });
        }
        let data = self.tensor_data(info)?;
        let shape = info.shape();
        let numel = info.numel() as usize;
        let torch_err = |e: tch::TchError| {
            Error::format(
                &self.path,
                format!("tensor `{}`: {}", info.name, crate::error::clean_torch_message(&e.to_string())),
            )
        };

        let tensor = match info.ggml_type {
            // Stored little-endian, like every host libtorch runs on: the bytes are the tensor (copied).
            ty::F32 => Tensor::f_from_data_size(data, &shape, Kind::Float),
            ty::F16 => Tensor::f_from_data_size(data, &shape, Kind::Half),
            ty::BF16 => Tensor::f_from_data_size(data, &shape, Kind::BFloat16),
            quantized => {
                let out = Tensor::f_empty([numel as i64], (Kind::Float, Device::Cpu)).map_err(torch_err)?;
                if numel > 0 {
                    // SAFETY: `out` is a fresh, contiguous CPU float tensor of `numel` elements that nothing else
                    // references while this slice lives.
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, numel) };
                    let dequant: fn(&[u8], &mut [f32]) = match quantized {
                        ty::Q4_0 => dequantize_q4_0,
                        ty::Q4_1 => dequantize_q4_1,
                        _ => dequantize_q8_0,
                    };
                    let block_bytes = match quantized {
                        ty::Q4_0 => Q4_0_BYTES,
                        ty::Q4_1 => Q4_1_BYTES,
                        _ => Q8_0_BYTES,
                    };
                    dequantize_parallel(data, dst, block_bytes, dequant);
                }
                out.f_reshape(&shape)
            }
        }
        .map_err(torch_err)?;
        if tensor.kind() == kind {
            Ok(tensor)
        } else {
            tensor.f_to_kind(kind).map_err(torch_err)
        }
    }
}

/// A short rendering of a metadata value for messages (arrays by length only).
fn short(v: &MetaValue) -> String {
    match v {
        MetaValue::Array(a) => format!("of {} elements", a.len()),
        MetaValue::String(s) if s.chars().count() > 60 => {
            format!("{:?}...", s.chars().take(60).collect::<String>())
        }
        other => format!("{other:?}"),
    }
}

/// Dequantizes `src` into `dst` on several threads for large tensors (split on block boundaries).
fn dequantize_parallel(src: &[u8], dst: &mut [f32], block_bytes: usize, f: fn(&[u8], &mut [f32])) {
    let blocks = dst.len() / QK;
    const MIN_BLOCKS_PER_THREAD: usize = 16 * 1024;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(16);
    let threads = threads.min(blocks / MIN_BLOCKS_PER_THREAD).max(1);
    if threads == 1 {
        f(src, dst);
        return;
    }
    let per = blocks.div_ceil(threads);
    std::thread::scope(|s| {
        for (src, dst) in src.chunks(per * block_bytes).zip(dst.chunks_mut(per * QK)) {
            s.spawn(move || f(src, dst));
        }
    });
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Q4_0: per 32 values, f16 scale `d` and 16 bytes of nibbles; `x = (nibble - 8) * d`.
fn dequantize_q4_0(src: &[u8], dst: &mut [f32]) {
    for (block, out) in src.chunks_exact(Q4_0_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(block, 0);
        let qs = &block[2..18];
        let (lo, hi) = out.split_at_mut(16);
        for j in 0..16 {
            lo[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
            hi[j] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Q4_1: per 32 values, f16 scale `d`, f16 minimum `m` and 16 bytes of nibbles; `x = nibble * d + m`.
fn dequantize_q4_1(src: &[u8], dst: &mut [f32]) {
    for (block, out) in src.chunks_exact(Q4_1_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(block, 0);
        let m = f16_at(block, 2);
        let qs = &block[4..20];
        let (lo, hi) = out.split_at_mut(16);
        for j in 0..16 {
            lo[j] = (qs[j] & 0x0f) as f32 * d + m;
            hi[j] = (qs[j] >> 4) as f32 * d + m;
        }
    }
}

/// Q8_0: per 32 values, f16 scale `d` and 32 signed bytes; `x = q * d`.
fn dequantize_q8_0(src: &[u8], dst: &mut [f32]) {
    for (block, out) in src.chunks_exact(Q8_0_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(block, 0);
        for (o, &q) in out.iter_mut().zip(&block[2..34]) {
            *o = q as i8 as f32 * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};
    use std::io::Write;

    /// Writes GGUF files for tests.
    struct Builder {
        kv: Vec<u8>,
        n_kv: u64,
        infos: Vec<u8>,
        n_tensors: u64,
        data: Vec<u8>,
        version: u32,
    }

    impl Builder {
        fn new() -> Self {
            Builder { kv: vec![], n_kv: 0, infos: vec![], n_tensors: 0, data: vec![], version: 3 }
        }

        fn string(buf: &mut Vec<u8>, s: &str) {
            buf.extend((s.len() as u64).to_le_bytes());
            buf.extend(s.as_bytes());
        }

        fn kv(&mut self, key: &str, vtype: u32, value: &[u8]) -> &mut Self {
            Self::string(&mut self.kv, key);
            self.kv.extend(vtype.to_le_bytes());
            self.kv.extend(value);
            self.n_kv += 1;
            self
        }

        fn kv_str(&mut self, key: &str, value: &str) -> &mut Self {
            let mut v = vec![];
            Self::string(&mut v, value);
            self.kv(key, 8, &v)
        }

        fn tensor(&mut self, name: &str, dims: &[u64], ggml_type: u32, bytes: &[u8]) -> &mut Self {
            while self.data.len() % 32 != 0 {
                self.data.push(0);
            }
            Self::string(&mut self.infos, name);
            self.infos.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                self.infos.extend(d.to_le_bytes());
            }
            self.infos.extend(ggml_type.to_le_bytes());
            self.infos.extend((self.data.len() as u64).to_le_bytes());
            self.data.extend(bytes);
            self.n_tensors += 1;
            self
        }

        fn bytes(&self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend(self.version.to_le_bytes());
            out.extend(self.n_tensors.to_le_bytes());
            out.extend(self.n_kv.to_le_bytes());
            out.extend(&self.kv);
            out.extend(&self.infos);
            while out.len() % 32 != 0 {
                out.push(0);
            }
            out.extend(&self.data);
            out
        }
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nnsight-gguf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    fn values(t: &Tensor) -> Vec<f32> {
        let t = t.to_kind(Kind::Float).flatten(0, -1);
        Vec::<f32>::try_from(&t).unwrap()
    }

    fn f16_bytes(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    /// A Q4_0 block with d = 0.5 and nibbles j for value j (j < 16) and 15 - j for value j + 16.
    fn q4_0_block() -> (Vec<u8>, Vec<f32>) {
        let mut b = f16_bytes(0.5).to_vec();
        for j in 0..16u8 {
            b.push(j | ((15 - j) << 4));
        }
        let mut expect: Vec<f32> = (0..16).map(|j| (j as f32 - 8.0) * 0.5).collect();
        expect.extend((0..16).map(|j| ((15 - j) as f32 - 8.0) * 0.5));
        (b, expect)
    }

    fn q4_1_block() -> (Vec<u8>, Vec<f32>) {
        let mut b = f16_bytes(0.25).to_vec();
        b.extend(f16_bytes(-1.5));
        for j in 0..16u8 {
            b.push((j % 4) | ((15 - j) << 4));
        }
        let mut expect: Vec<f32> = (0..16).map(|j| (j % 4) as f32 * 0.25 - 1.5).collect();
        expect.extend((0..16).map(|j| (15 - j) as f32 * 0.25 - 1.5));
        (b, expect)
    }

    fn q8_0_block() -> (Vec<u8>, Vec<f32>) {
        let mut b = f16_bytes(0.125).to_vec();
        let qs: Vec<i8> = (0..32).map(|j: i32| ((j * 9) % 256 - 128) as i8).collect();
        b.extend(qs.iter().map(|&q| q as u8));
        let expect = qs.iter().map(|&q| q as f32 * 0.125).collect();
        (b, expect)
    }

    #[test]
    fn dequantize_blocks() {
        for (f, (block, expect)) in [
            (dequantize_q4_0 as fn(&[u8], &mut [f32]), q4_0_block()),
            (dequantize_q4_1, q4_1_block()),
            (dequantize_q8_0, q8_0_block()),
        ] {
            let mut out = [0f32; 32];
            f(&block, &mut out);
            assert_eq!(out.to_vec(), expect);
        }
    }

    #[test]
    fn parallel_dequantization_matches_serial() {
        let (block, _) = q4_1_block();
        let n_blocks = 40_000;
        let mut src = Vec::with_capacity(n_blocks * Q4_1_BYTES);
        for i in 0..n_blocks {
            let mut b = block.clone();
            b[0..2].copy_from_slice(&f16_bytes(i as f32 / 1000.0));
            src.extend(b);
        }
        let mut serial = vec![0f32; n_blocks * QK];
        let mut parallel = vec![0f32; n_blocks * QK];
        dequantize_q4_1(&src, &mut serial);
        dequantize_parallel(&src, &mut parallel, Q4_1_BYTES, dequantize_q4_1);
        assert_eq!(serial, parallel);
    }

    #[test]
    fn names_of_types() {
        assert_eq!(ggml_type_name(3), "Q4_1");
        assert_eq!(ggml_type_name(30), "BF16");
        assert_eq!(ggml_type_name(6), "Q5_0");
        assert_eq!(ggml_type_name(4), "unknown");
    }

    #[test]
    fn meta_value_coercions() {
        assert_eq!(MetaValue::U32(30).as_u64(), Some(30));
        assert_eq!(MetaValue::I32(-1).as_u64(), None);
        assert_eq!(MetaValue::I8(7).as_u64(), Some(7));
        assert_eq!(MetaValue::F32(0.5).as_f64(), Some(0.5));
        assert_eq!(MetaValue::U16(3).as_f64(), Some(3.0));
        assert_eq!(MetaValue::Bool(true).as_bool(), Some(true));
        assert_eq!(MetaValue::String("x".into()).as_str(), Some("x"));
        assert_eq!(MetaValue::String("x".into()).as_u64(), None);
        assert_eq!(MetaValue::Array(vec![MetaValue::U8(1)]).as_array().map(|a| a.len()), Some(1));
    }

    /// Name, PyTorch shape and values of a tensor written by [`sample`].
    type Expected = (&'static str, Vec<i64>, Vec<f32>);

    /// A file with metadata of several types and one tensor of each supported type.
    fn sample() -> (Builder, Vec<Expected>) {
        let mut b = Builder::new();
        b.kv_str("general.architecture", "llama");
        b.kv("llama.block_count", 4, &2u32.to_le_bytes());
        b.kv("llama.rope.freq_base", 6, &10000f32.to_le_bytes());
        b.kv("tokenizer.ggml.add_bos_token", 7, &[1]);
        let mut arr = vec![];
        arr.extend(8u32.to_le_bytes());
        arr.extend(2u64.to_le_bytes());
        Builder::string(&mut arr, "a");
        Builder::string(&mut arr, "b c");
        b.kv("tokenizer.ggml.tokens", 9, &arr);

        let mut expected = vec![];
        // F32 [2, 3] stored as dims [3, 2].
        let f32s: Vec<f32> = (0..6).map(|i| i as f32 * 1.5 - 2.0).collect();
        let bytes: Vec<u8> = f32s.iter().flat_map(|x| x.to_le_bytes()).collect();
        b.tensor("f32", &[3, 2], ty::F32, &bytes);
        expected.push(("f32", vec![2, 3], f32s));
        let f16s: Vec<f32> = vec![1.0, -0.5, 65504.0, 0.000061035156];
        let bytes: Vec<u8> = f16s.iter().flat_map(|&x| f16_bytes(x)).collect();
        b.tensor("f16", &[4], ty::F16, &bytes);
        expected.push(("f16", vec![4], f16s));
        let bf16s: Vec<f32> = vec![1.0, -3.0e38, 0.15625, 7.0];
        let bytes: Vec<u8> = bf16s.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect();
        b.tensor("bf16", &[2, 2], ty::BF16, &bytes);
        expected.push(("bf16", vec![2, 2], bf16s.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()));
        // Two blocks per quantized tensor: [2, 32] stored as dims [32, 2].
        for (name, t, (block, expect)) in
            [("q4_0", ty::Q4_0, q4_0_block()), ("q4_1", ty::Q4_1, q4_1_block()), ("q8_0", ty::Q8_0, q8_0_block())]
        {
            let mut bytes = block.clone();
            bytes.extend(&block);
            b.tensor(name, &[32, 2], t, &bytes);
            let mut e = expect.clone();
            e.extend(expect);
            expected.push((name, vec![2, 32], e));
        }
        (b, expected)
    }

    #[test]
    fn roundtrip_small_file() {
        let (b, expected) = sample();
        let path = temp_file("small.gguf", &b.bytes());
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.architecture().unwrap(), "llama");
        assert_eq!(f.get_u64("llama.block_count").unwrap(), 2);
        assert_eq!(f.get_f64("llama.rope.freq_base").unwrap(), 10000.0);
        assert_eq!(f.get("tokenizer.ggml.add_bos_token").and_then(MetaValue::as_bool), Some(true));
        let toks = f.get("tokenizer.ggml.tokens").and_then(MetaValue::as_array).unwrap();
        assert_eq!(toks.iter().map(|t| t.as_str().unwrap()).collect::<Vec<_>>(), ["a", "b c"]);
        assert_eq!(f.tensors.len(), expected.len());
        for (name, shape, values_expected) in expected {
            let info = f.tensor(name).unwrap();
            assert_eq!(info.shape(), shape, "{name}");
            for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
                let t = f.load_tensor(info, kind).unwrap();
                assert_eq!(t.size(), shape, "{name}");
                assert_eq!(t.kind(), kind, "{name}");
                assert_eq!(t.device(), Device::Cpu);
                if kind == Kind::Float {
                    assert_eq!(values(&t), values_expected, "{name}");
                }
            }
        }
        assert_eq!(f.tensor_bytes(f.tensor("q4_1").unwrap()), 40);
        assert_eq!(f.tensor_bytes(f.tensor("f32").unwrap()), 24);
    }

    #[test]
    fn metadata_errors_name_the_key() {
        let (b, _) = sample();
        let path = temp_file("keys.gguf", &b.bytes());
        let f = GgufFile::open(&path).unwrap();
        let e = f.get_u64("llama.missing").unwrap_err();
        assert!(matches!(e, Error::Config { .. }) && e.to_string().contains("llama.missing"), "{e}");
        let e = f.get_str("llama.block_count").unwrap_err();
        assert!(matches!(e, Error::Config { .. }) && e.to_string().contains("llama.block_count"), "{e}");
        let e = f.load_tensor(&f.tensors[0], Kind::Int64).unwrap_err();
        assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
    }

    #[test]
    fn missing_file() {
        let e = GgufFile::open("/nonexistent/dir/model.gguf").unwrap_err();
        assert!(matches!(e, Error::FileNotFound { .. }), "{e}");
    }

    #[test]
    fn bad_magic() {
        let mut bytes = sample().0.bytes();
        bytes[..4].copy_from_slice(b"PK\x03\x04");
        let path = temp_file("magic.gguf", &bytes);
        let e = GgufFile::open(&path).unwrap_err();
        assert!(matches!(e, Error::Format { .. }) && e.to_string().contains("not a GGUF file"), "{e}");
        let path = temp_file("tiny.gguf", b"GG");
        let e = GgufFile::open(&path).unwrap_err();
        assert!(matches!(e, Error::Format { .. }) && e.to_string().contains("not a GGUF file"), "{e}");
    }

    #[test]
    fn bad_version() {
        let mut b = sample().0;
        b.version = 1;
        let e = GgufFile::open(temp_file("v1.gguf", &b.bytes())).unwrap_err();
        assert!(matches!(e, Error::Format { .. }) && e.to_string().contains("version 1"), "{e}");
    }

    #[test]
    fn truncated_files() {
        let bytes = sample().0.bytes();
        // Cut in the header, the metadata, the tensor table and the data: always a Format error, never a panic.
        for cut in [6, 20, 40, 100, 200, bytes.len() - 300, bytes.len() - 1] {
            let path = temp_file(&format!("cut{cut}.gguf"), &bytes[..cut]);
            let e = GgufFile::open(&path).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, Error::Format { .. }), "{msg}");
            assert!(msg.contains("truncated") && msg.contains("byte"), "cut at {cut}: {msg}");
        }
    }

    #[test]
    fn garbage_counts_are_refused() {
        let mut b = Builder::new();
        let mut arr = vec![];
        arr.extend(4u32.to_le_bytes());
        arr.extend(u64::MAX.to_le_bytes());
        b.kv("huge", 9, &arr);
        let e = GgufFile::open(temp_file("huge.gguf", &b.bytes())).unwrap_err();
        assert!(matches!(e, Error::Format { .. }), "{e}");
        let mut bytes = Builder::new().bytes();
        bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = GgufFile::open(temp_file("tensors.gguf", &bytes)).unwrap_err();
        assert!(matches!(e, Error::Format { .. }), "{e}");
    }

    #[test]
    fn unsupported_type_names_the_tensor() {
        let mut b = Builder::new();
        b.tensor("blk.0.ffn_up.weight", &[32, 1], 6, &[0u8; 22]);
        let f = GgufFile::open(temp_file("q5.gguf", &b.bytes())).unwrap();
        let e = f.load_tensor(&f.tensors[0], Kind::Float).unwrap_err();
        match &e {
            Error::UnsupportedTensorType { tensor, ggml_type, type_name, supported, .. } => {
                assert_eq!(tensor, "blk.0.ffn_up.weight");
                assert_eq!(*ggml_type, 6);
                assert_eq!(type_name, "Q5_0");
                assert_eq!(supported, "F32, F16, BF16, Q8_0, Q4_0, Q4_1");
            }
            other => panic!("expected UnsupportedTensorType, got {other}"),
        }
        assert!(e.to_string().contains("blk.0.ffn_up.weight"));
    }

    #[test]
    fn bad_block_multiple_is_a_format_error() {
        let mut b = Builder::new();
        b.tensor("w", &[30, 1], ty::Q4_1, &[0u8; 20]);
        let e = GgufFile::open(temp_file("block.gguf", &b.bytes())).unwrap_err();
        assert!(matches!(e, Error::Format { .. }) && e.to_string().contains("block size"), "{e}");
    }
}
