//! Dequantization kernels of the block-quantized GGML types (Q4_0, Q4_1, Q8_0), and their split over threads
//! for large tensors.

/// Values per block and bytes per block of the quantized types.
pub(super) const QK: usize = 32;
pub(super) const Q4_0_BYTES: usize = 18;
pub(super) const Q4_1_BYTES: usize = 20;
pub(super) const Q8_0_BYTES: usize = 34;

/// Dequantizes `src` into `dst` on several threads for large tensors (split on block boundaries).
pub(super) fn dequantize_parallel(src: &[u8], dst: &mut [f32], block_bytes: usize, f: fn(&[u8], &mut [f32])) {
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

/// Q8_0: per 32 values, f16 scale `d` and 32 signed bytes; `x = q * d`.
pub(super) fn dequantize_q8_0(src: &[u8], dst: &mut [f32]) {
    for (block, out) in src.chunks_exact(Q8_0_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(block, 0);
        for (o, &q) in out.iter_mut().zip(&block[2..34]) {
            *o = q as i8 as f32 * d;
        }
    }
}
