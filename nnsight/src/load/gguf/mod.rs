//! Reading GGUF files (llama.cpp's checkpoint format, versions 2 and 3, little-endian).
//!
//! The file is memory-mapped: [`GgufFile::open`] parses the header, the metadata and the tensor table, and checks
//! that every tensor's bytes lie inside the file; [`GgufFile::load_tensor`] dequantizes one tensor into a CPU
//! `tch::Tensor` in PyTorch dimension order. Supported tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1
//! and the K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (what Q4_K_M, Q5_K_M and Q6_K files hold); any other type is an
//! error naming it.
//!
//! Layout (see llama.cpp's `docs/gguf.md`): magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata count,
//! the metadata key/value pairs, the tensor infos (name, dims innermost first, type, offset), padding to the
//! alignment (`general.alignment`, default 32), then the tensor data; each offset is relative to that data start.
//!
//! The parts: [`MetaValue`] (`metadata.rs`); the tensor table's entries and the GGML types (`types.rs`); the
//! parser of the header, metadata and tensor table (`parse.rs`); loading a tensor (`tensors.rs`) with the
//! dequantization kernels (`dequant.rs` for the 32-value blocks and the split over threads, `kquants.rs` for the
//! 256-value K-quant super-blocks). Writing: [`GgufWriter`] (`write.rs`), metadata and float32 tensors.

mod dequant;
mod kquants;
mod metadata;
mod parse;
mod tensors;
#[cfg(test)]
mod tests;
mod types;
mod write;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

use metadata::short;
pub use metadata::MetaValue;
pub use types::{ggml_type_name, GgufTensorInfo};
pub use write::GgufWriter;

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
}
