//! Dequantization of the block-quantized GGML types: the kernels of the legacy 32-value blocks (Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0), the table of every supported block type (the K-quants' kernels are in `kquants.rs`), and the
//! checked split of a tensor's blocks over threads.

use super::kquants;
use super::types::{f16_at, ty};

/// Dequantizes whole blocks: `src` holds `n` blocks, `dst` their `n * values` values.
pub(super) type Kernel = fn(&[u8], &mut [f32]);

/// How a block-quantized type is stored, and its kernel.
#[derive(Clone, Copy)]
pub(super) struct BlockType {
    /// Values per block.
    pub values: usize,
    /// Bytes per block.
    pub bytes: usize,
    /// The kernel.
    pub kernel: Kernel,
}

/// Values per block of the legacy types.
pub(super) const QK: usize = 32;
pub(super) const Q4_0_BYTES: usize = 18;
pub(super) const Q4_1_BYTES: usize = 20;
pub(super) const Q5_0_BYTES: usize = 22;
pub(super) const Q5_1_BYTES: usize = 24;
pub(super) const Q8_0_BYTES: usize = 34;

/// The block layout and kernel of a block-quantized type this crate dequantizes; `None` for the others (F32, F16
/// and BF16 are not block types).
pub(super) fn block_type(ggml_type: u32) -> Option<BlockType> {
    let (values, bytes, kernel): (usize, usize, Kernel) = match ggml_type {
        ty::Q4_0 => (QK, Q4_0_BYTES, dequantize_q4_0),
        ty::Q4_1 => (QK, Q4_1_BYTES, dequantize_q4_1),
        ty::Q5_0 => (QK, Q5_0_BYTES, dequantize_q5_0),
        ty::Q5_1 => (QK, Q5_1_BYTES, dequantize_q5_1),
        ty::Q8_0 => (QK, Q8_0_BYTES, dequantize_q8_0),
        ty::Q2_K => (kquants::QK_K, kquants::Q2_K_BYTES, kquants::dequantize_q2_k),
        ty::Q3_K => (kquants::QK_K, kquants::Q3_K_BYTES, kquants::dequantize_q3_k),
        ty::Q4_K => (kquants::QK_K, kquants::Q4_K_BYTES, kquants::dequantize_q4_k),
        ty::Q5_K => (kquants::QK_K, kquants::Q5_K_BYTES, kquants::dequantize_q5_k),
        ty::Q6_K => (kquants::QK_K, kquants::Q6_K_BYTES, kquants::dequantize_q6_k),
        _ => return None,
    };
    Some(BlockType { values, bytes, kernel })
}

/// Dequantizes `src` into `dst` with the type's kernel, on several threads for large tensors (split on block
/// boundaries).
///
/// `dst.len()` must be a whole number of blocks and `src` exactly their bytes; otherwise nothing is written and
/// the error says what was given.
pub(super) fn dequantize_parallel(src: &[u8], dst: &mut [f32], t: BlockType) -> Result<(), String> {
    // At least 512 Ki values per thread: below that, starting a thread costs more than it saves.
    const MIN_VALUES_PER_THREAD: usize = 512 * 1024;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(16);
    dequantize_split(src, dst, t, threads.min(dst.len() / MIN_VALUES_PER_THREAD))
}

/// [`dequantize_parallel`] on `threads` threads (at least one; at most one per block).
pub(super) fn dequantize_split(src: &[u8], dst: &mut [f32], t: BlockType, threads: usize) -> Result<(), String> {
    if dst.len() % t.values != 0 {
        return Err(format!("{} values are not a whole number of blocks of {} values", dst.len(), t.values));
    }
    let blocks = dst.len() / t.values;
    if Some(src.len()) != blocks.checked_mul(t.bytes) {
        return Err(format!(
            "{blocks} blocks of {} values take {} bytes, but {} bytes were given",
            t.values,
            blocks as u128 * t.bytes as u128,
            src.len()
        ));
    }
    let threads = threads.clamp(1, blocks.max(1));
    if threads == 1 {
        (t.kernel)(src, dst);
        return Ok(());
    }
    let per = blocks.div_ceil(threads);
    std::thread::scope(|s| {
        for (src, dst) in src.chunks(per * t.bytes).zip(dst.chunks_mut(per * t.values)) {
            s.spawn(move || (t.kernel)(src, dst));
        }
    });
    Ok(())
}

/// Q4_0: per 32 values, f16 scale `d` and 16 bytes of nibbles (value `j` in the low nibble of byte `j`, value
/// `j + 16` in its high nibble); `x = (nibble - 8) * d`.
pub(super) fn dequantize_q4_0(src: &[u8], dst: &mut [f32]) {
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
pub(super) fn dequantize_q4_1(src: &[u8], dst: &mut [f32]) {
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

/// One Q5_0/Q5_1 block's 32 values through `f`: value `j` (`j < 16`) has the low nibble of byte `j` of `qs`,
/// value `j + 16` its high nibble; the fifth bit of value `j` is bit `j` of the little-endian `u32` `qh`.
#[inline(always)]
fn q5_block(qh: &[u8], qs: &[u8], out: &mut [f32], f: impl Fn(u32) -> f32) {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let (lo, hi) = out.split_at_mut(16);
    for (j, ((lo, hi), &b)) in lo.iter_mut().zip(hi).zip(&qs[..16]).enumerate() {
        *lo = f((b & 0x0f) as u32 | (((qh >> j) & 1) << 4));
        *hi = f((b >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4));
    }
}

/// Q5_0: per 32 values, f16 scale `d`, 4 bytes of fifth bits and 16 bytes of nibbles; `x = (q - 16) * d`.
pub(super) fn dequantize_q5_0(src: &[u8], dst: &mut [f32]) {
    for (block, out) in src.chunks_exact(Q5_0_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(block, 0);
        q5_block(&block[2..6], &block[6..22], out, |q| (q as i32 - 16) as f32 * d);
    }
}

/// Q5_1: per 32 values, f16 scale `d`, f16 minimum `m`, 4 bytes of fifth bits and 16 bytes of nibbles;
/// `x = q * d + m`.
pub(super) fn dequantize_q5_1(src: &[u8], dst: &mut [f32]) {
    for (block, out) in src.chunks_exact(Q5_1_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(block, 0);
        let m = f16_at(block, 2);
        q5_block(&block[4..8], &block[8..24], out, |q| q as f32 * d + m);
    }
}

/// Q8_0: per 32 values, f16 scale `d` and 32 signed bytes; `x = q * d`.
pub(super) fn dequantize_q8_0(src: &[u8], dst: &mut [f32]) {
    for (block, out) in src.chunks_exact(Q8_0_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(block, 0);
        for (o, &q) in out.iter_mut().zip(&block[2..34]) {
            *o = q as i8 as f32 * d;
        }
    }
}
