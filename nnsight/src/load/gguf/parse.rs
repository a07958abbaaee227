//! Parsing a GGUF file's header, metadata and tensor table from its mapped bytes, with a bounds-checked
//! little-endian reader.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use super::{GgufFile, GgufTensorInfo, MetaValue};
use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Deepest nesting of metadata arrays accepted (real files use one level).
const MAX_ARRAY_DEPTH: usize = 8;

/// Longest tensor name the GGUF specification allows (llama.cpp refuses 64 and more).
const MAX_NAME_BYTES: usize = 64;
/// Longest metadata key the GGUF specification allows.
const MAX_KEY_BYTES: usize = 65535;

/// A key or name for messages: control characters escaped, cut after 64 characters.
fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_debug).collect();
    if s.chars().nth(64).is_some() {
        out.push_str("...");
    }
    out
}

/// Most elements of a metadata array allocated before they are read.
const PREALLOCATED_ELEMENTS: u64 = 4096;

/// The fewest bytes a metadata value of type `vtype` takes (1 for an unknown type, which fails when read).
fn min_size(vtype: u32) -> u64 {
    match vtype {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        // A string is its u64 length; an array its u32 element type and u64 length.
        8 => 8,
        9 => 12,
        10..=12 => 8,
        _ => 1,
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
                // Every element takes at least `min_size(etype)` bytes: a count beyond the bytes left is garbage,
                // and is refused before anything is allocated for it. The vector grows with the elements read,
                // so that memory stays in proportion to the bytes the file really holds.
                let left = (self.buf.len() - self.pos) as u64;
                let need = count.saturating_mul(min_size(etype));
                if need > left {
                    return Err(self.truncated(&format_args!("{count} elements of {what}"), need));
                }
                let mut items = Vec::with_capacity(count.min(PREALLOCATED_ELEMENTS) as usize);
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
    #[allow(clippy::type_complexity)]
    pub(super) fn parse(
        buf: &[u8],
        path: &Path,
    ) -> Result<(u32, BTreeMap<String, MetaValue>, Vec<GgufTensorInfo>, u64, u64)> {
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
            let at = r.pos;
            let key = r.string(&format_args!("key of metadata entry {i}"))?;
            if key.len() > MAX_KEY_BYTES {
                return Err(Error::format(
                    path,
                    format!(
                        "key of metadata entry {i} at byte {at} is {} bytes long (GGUF allows {MAX_KEY_BYTES}): {}",
                        key.len(),
                        shown(&key)
                    ),
                ));
            }
            let shown_key = shown(&key);
            let vtype = r.u32(&format_args!("value type of metadata `{shown_key}`"))?;
            let value = r.value(vtype, &format_args!("value of metadata `{shown_key}`"), 0)?;
            metadata.insert(key, value);
        }

        // A tensor info takes at least 8 + 4 + 4 + 8 bytes; refuse counts the file cannot hold before allocating.
        let left = (buf.len() - r.pos) as u64;
        if n_tensors > left / 24 {
            return Err(r.truncated(&format_args!("{n_tensors} tensor infos"), n_tensors.saturating_mul(24)));
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let at = r.pos;
            let name = r.string(&format_args!("name of tensor {i}"))?;
            if name.len() > MAX_NAME_BYTES {
                return Err(Error::format(
                    path,
                    format!(
                        "name of tensor {i} at byte {at} is {} bytes long (GGUF allows {MAX_NAME_BYTES}): {}",
                        name.len(),
                        shown(&name)
                    ),
                ));
            }
            let at = r.pos;
            let shown_name = shown(&name);
            let n_dims = r.u32(&format_args!("dimension count of tensor `{shown_name}`"))?;
            if n_dims > 8 {
                return Err(Error::format(
                    path,
                    format!("tensor `{shown_name}` at byte {at}: {n_dims} dimensions (at most 8 are allowed)"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(r.u64(&format_args!("dimension {d} of tensor `{shown_name}`"))?);
            }
            let ggml_type = r.u32(&format_args!("type of tensor `{shown_name}`"))?;
            let offset = r.u64(&format_args!("offset of tensor `{shown_name}`"))?;
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
}
