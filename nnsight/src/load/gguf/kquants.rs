//! Dequantization kernels of llama.cpp's K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): super-blocks of 256 values in
//! sub-blocks of 16 or 32 that share one f16 scale (and minimum) scaled by small per-sub-block integers.
//!
//! The layouts follow ggml's `block_q*_K` structs (as the `gguf` Python package's `quants.py` reads them); each
//! value is computed with the same f32 operations in the same order, so results match it bit for bit.

use super::types::f16_at;

/// Values per super-block.
pub(super) const QK_K: usize = 256;
pub(super) const Q2_K_BYTES: usize = 84;
pub(super) const Q3_K_BYTES: usize = 110;
pub(super) const Q4_K_BYTES: usize = 144;
pub(super) const Q5_K_BYTES: usize = 176;
pub(super) const Q6_K_BYTES: usize = 210;

/// Q2_K: 16 bytes of sub-block scales (low nibble: scale, high nibble: minimum, for 16 sub-blocks of 16 values),
/// 64 bytes of 2-bit values, f16 `d`, f16 `dmin`; `x = d * scale * q - dmin * min`.
///
/// The 2-bit values: value `128 h + 32 s + l` is bits `2s..2s + 2` of byte `32 h + l`.
pub(super) fn dequantize_q2_k(src: &[u8], dst: &mut [f32]) {
    for (block, out) in src.chunks_exact(Q2_K_BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let (scales, qs) = (&block[0..16], &block[16..80]);
        let d = f16_at(block, 80);
        let dmin = f16_at(block, 82);
        for (sub, out) in out.chunks_exact_mut(16).enumerate() {
            let dl = d * (scales[sub] & 0x0f) as f32;
            let ml = dmin * (scales[sub] >> 4) as f32;
            let (bytes, shift) = low_bits_2(qs, sub);
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = dl * ((b >> shift) & 3) as f32 - ml;
            }
        }
    }
}

/// The 16 bytes holding the 2-bit values of sub-block `sub` (16 values) of a Q2_K/Q3_K super-block, and their
/// shift: value `128 h + 32 s + l` is bits `2s..2s + 2` of byte `32 h + l`.
#[inline(always)]
fn low_bits_2(qs: &[u8], sub: usize) -> (&[u8], usize) {
    let start = 32 * (sub / 8) + 16 * (sub % 2);
    (&qs[start..start + 16], 2 * ((sub % 8) / 2))
}

/// Q3_K: 32 bytes of high bits, 64 bytes of 2-bit low parts, 12 bytes of 6-bit signed scales (16 sub-blocks of
/// 16 values), f16 `d`; `x = d * (scale - 32) * q` with `q = low - (high bit clear ? 4 : 0)`.
///
/// Value `i`: the low part as in Q2_K, the high bit is bit `i / 32` of byte `i % 32`. Scale `k`: its low nibble
/// is the low (`k < 8`) or high nibble of byte `k % 8`, its two high bits are bits `2 (k / 4)` of byte `8 + k % 4`.
pub(super) fn dequantize_q3_k(src: &[u8], dst: &mut [f32]) {
    for (block, out) in src.chunks_exact(Q3_K_BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let (hmask, qs, scales) = (&block[0..32], &block[32..96], &block[96..108]);
        let d = f16_at(block, 108);
        for (sub, out) in out.chunks_exact_mut(16).enumerate() {
            let low = if sub < 8 { scales[sub] & 0x0f } else { scales[sub - 8] >> 4 };
            let high = (scales[8 + sub % 4] >> (2 * (sub / 4))) & 3;
            let dl = d * ((low | (high << 4)) as i32 - 32) as f32;
            let (bytes, shift) = low_bits_2(qs, sub);
            let (high, hshift) = (&hmask[16 * (sub % 2)..16 * (sub % 2) + 16], sub / 2);
            for ((o, &b), &h) in out.iter_mut().zip(bytes).zip(high) {
                let q = ((b >> shift) & 3) as i32 - if (h >> hshift) & 1 == 0 { 4 } else { 0 };
                *o = dl * q as f32;
            }
        }
    }
}

/// The 6-bit scale and minimum of sub-block `j` (0..8) of a Q4_K/Q5_K super-block, packed in 12 bytes: for
/// `j < 4` the low 6 bits of bytes `j` and `j + 4`; for `j >= 4` the nibbles of byte `j + 4` with the top two bits
/// of bytes `j - 4` and `j` as their high bits.
#[inline(always)]
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 0x3f, s[j + 4] & 0x3f)
    } else {
        ((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// Q4_K: f16 `d`, f16 `dmin`, 12 bytes of 6-bit scales and minimums (8 sub-blocks of 32 values), 128 bytes of
/// nibbles; `x = d * scale * q - dmin * min`.
///
/// The nibbles: value `64 c + l` is the low nibble of byte `32 c + l`, value `64 c + 32 + l` its high nibble.
pub(super) fn dequantize_q4_k(src: &[u8], dst: &mut [f32]) {
    for (block, out) in src.chunks_exact(Q4_K_BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let d = f16_at(block, 0);
        let dmin = f16_at(block, 2);
        let (scales, qs) = (&block[4..16], &block[16..144]);
        for (sub, out) in out.chunks_exact_mut(32).enumerate() {
            let (sc, m) = scale_min_k4(sub, scales);
            let (dl, ml) = (d * sc as f32, dmin * m as f32);
            let (bytes, shift) = (&qs[32 * (sub / 2)..32 * (sub / 2) + 32], 4 * (sub % 2));
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = dl * ((b >> shift) & 0x0f) as f32 - ml;
            }
        }
    }
}

/// Q5_K: Q4_K with a fifth bit per value: f16 `d`, f16 `dmin`, 12 bytes of scales and minimums, 32 bytes of high
/// bits (value `i`: bit `i / 32` of byte `i % 32`), 128 bytes of nibbles; `x = d * scale * q - dmin * min`.
pub(super) fn dequantize_q5_k(src: &[u8], dst: &mut [f32]) {
    for (block, out) in src.chunks_exact(Q5_K_BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let d = f16_at(block, 0);
        let dmin = f16_at(block, 2);
        let (scales, qh, qs) = (&block[4..16], &block[16..48], &block[48..176]);
        for (sub, out) in out.chunks_exact_mut(32).enumerate() {
            let (sc, m) = scale_min_k4(sub, scales);
            let (dl, ml) = (d * sc as f32, dmin * m as f32);
            let (bytes, shift) = (&qs[32 * (sub / 2)..32 * (sub / 2) + 32], 4 * (sub % 2));
            for ((o, &b), &h) in out.iter_mut().zip(bytes).zip(qh) {
                let q = ((b >> shift) & 0x0f) | (((h >> sub) & 1) << 4);
                *o = dl * q as f32 - ml;
            }
        }
    }
}

/// Q6_K: 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 signed 8-bit scales (16 sub-blocks of 16
/// values), f16 `d`; `x = d * scale * (q - 32)`.
///
/// Value `128 h + r`: its low nibble is nibble `r / 64` of byte `64 h + r % 64`, its high bits are bits
/// `2 (r / 32)..` of byte `128 + 32 h + r % 32`.
pub(super) fn dequantize_q6_k(src: &[u8], dst: &mut [f32]) {
    for (block, out) in src.chunks_exact(Q6_K_BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let (ql, qh, scales) = (&block[0..128], &block[128..192], &block[192..208]);
        let d = f16_at(block, 208);
        for (sub, out) in out.chunks_exact_mut(16).enumerate() {
            let dl = d * scales[sub] as i8 as f32;
            // Values 128 h + r0 .. + 16: never across a 32-value boundary.
            let (h, r0) = (sub / 8, 16 * (sub % 8));
            let (low, lshift) = (&ql[64 * h + r0 % 64..][..16], 4 * (r0 / 64));
            let (high, hshift) = (&qh[32 * h + r0 % 32..][..16], 2 * (r0 / 32));
            for ((o, &l), &h) in out.iter_mut().zip(low).zip(high) {
                let q = ((l >> lshift) & 0x0f) | (((h >> hshift) & 3) << 4);
                *o = dl * (q as i32 - 32) as f32;
            }
        }
    }
}
