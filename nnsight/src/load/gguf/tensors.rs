//! Reading tensors out of an open GGUF file: the tensor table's range checks and byte sizes, look-up by name,
//! and [`GgufFile::load_tensor`] (F32, F16 and BF16 bytes as they are, quantized blocks dequantized).

use tch::{Device, Kind, Tensor};

use super::dequant::{block_type, dequantize_parallel};
use super::types::{block_layout, ggml_type_name, ty, SUPPORTED_TYPES};
use super::{GgufFile, GgufTensorInfo};
use crate::error::{Error, Result};

impl GgufFile {
    /// Checks that every tensor of a known type has a sane size and lies inside the file.
    pub(super) fn check_tensor_ranges(&self) -> Result<()> {
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
        // With a zero among them, the others are not bounded by the product: each must still be an i64.
        if let Some(d) = t.dims.iter().find(|&&d| d > i64::MAX as u64) {
            return Err(bad(format!("dimension {d} is beyond the largest tensor dimension {}", i64::MAX)));
        }
        let inner = t.dims.first().copied().unwrap_or(1);
        if inner % block != 0 {
            return Err(bad(format!(
                "the innermost dimension {inner} is not a multiple of the {} block size {block}",
                ggml_type_name(t.ggml_type)
            )));
        }
        (numel / block).checked_mul(bytes).map(Some).ok_or_else(|| bad("the byte size overflows".to_owned()))
    }

    /// The tensor called `name`, if the file has one.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The number of bytes the tensor takes in the file (0 for a type of unknown layout).
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> usize {
        match block_layout(info.ggml_type) {
            Some((block, bytes)) => (info.numel() / block).saturating_mul(bytes).try_into().unwrap_or(usize::MAX),
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
    /// Quantized types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) are dequantized
    /// in `f32`, bit for bit as the `gguf` Python package does; F16 and BF16 tensors are converted exactly. Any
    /// other type gives [`Error::UnsupportedTensorType`] naming it.
    pub fn load_tensor(&self, info: &GgufTensorInfo, kind: Kind) -> Result<Tensor> {
        if !matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double) {
            return Err(Error::InvalidInput {
                message: format!(
                    "GGUF tensor `{}` can only be loaded as Float, Half, BFloat16 or Double, not {kind:?}",
                    info.name
                ),
            });
        }
        let unsupported = || Error::UnsupportedTensorType {
            path: self.path.clone(),
            tensor: info.name.clone(),
            ggml_type: info.ggml_type,
            type_name: ggml_type_name(info.ggml_type).to_owned(),
            supported: SUPPORTED_TYPES.to_owned(),
        };
        let plain = match info.ggml_type {
            ty::F32 => Some(Kind::Float),
            ty::F16 => Some(Kind::Half),
            ty::BF16 => Some(Kind::BFloat16),
            _ => None,
        };
        let blocks = block_type(info.ggml_type);
        if plain.is_none() && blocks.is_none() {
            return Err(unsupported());
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

        let tensor = match (plain, blocks) {
            // Stored little-endian, like every host libtorch runs on: the bytes are the tensor (copied).
            (Some(stored), _) => Tensor::f_from_data_size(data, &shape, stored),
            (None, Some(blocks)) => {
                let out = Tensor::f_empty([numel as i64], (Kind::Float, Device::Cpu)).map_err(torch_err)?;
                if numel > 0 {
                    // SAFETY: `out` is a fresh, contiguous CPU float tensor of `numel` elements that nothing else
                    // references while this slice lives.
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, numel) };
                    dequantize_parallel(data, dst, blocks).map_err(|msg| {
                        Error::format(&self.path, format!("tensor `{}` ({}): {msg}", info.name, info.type_name()))
                    })?;
                }
                out.f_reshape(&shape)
            }
            (None, None) => return Err(unsupported()),
        }
        .map_err(torch_err)?;
        if tensor.kind() == kind {
            Ok(tensor)
        } else {
            tensor.f_to_kind(kind).map_err(torch_err)
        }
    }
}
