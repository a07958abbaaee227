//! The GGML tensor types and the tensor table's entries ([`GgufTensorInfo`]): type ids, llama.cpp names and
//! block layouts.

/// GGML type ids of the supported tensor types.
pub(super) mod ty {
    pub const F32: u32 = 0;
    pub const F16: u32 = 1;
    pub const Q4_0: u32 = 2;
    pub const Q4_1: u32 = 3;
    pub const Q5_0: u32 = 6;
    pub const Q5_1: u32 = 7;
    pub const Q8_0: u32 = 8;
    pub const Q2_K: u32 = 10;
    pub const Q3_K: u32 = 11;
    pub const Q4_K: u32 = 12;
    pub const Q5_K: u32 = 13;
    pub const Q6_K: u32 = 14;
    pub const BF16: u32 = 30;
}

/// The tensor types [`GgufFile::load_tensor`](super::GgufFile::load_tensor) reads, as messages list them.
pub(super) const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

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

    /// Number of values in the tensor (saturating at `u64::MAX`, for dims that [`GgufFile::open`] would refuse).
    ///
    /// [`GgufFile::open`]: super::GgufFile::open
    pub fn numel(&self) -> u64 {
        self.dims.iter().fold(1u64, |n, &d| n.saturating_mul(d))
    }

    /// The llama.cpp name of the tensor's type (`"Q4_1"`).
    pub fn type_name(&self) -> &'static str {
        ggml_type_name(self.ggml_type)
    }
}

/// The llama.cpp name of a GGML tensor type id (`3` → `"Q4_1"`, `34` → `"TQ1_0"`), or `"unknown"`.
///
/// Ids 31-33 and 36-38 name the interleaved repackings llama.cpp once wrote to files and has since removed.
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
        31 => "Q4_0_4_4",
        32 => "Q4_0_4_8",
        33 => "Q4_0_8_8",
        34 => "TQ1_0",
        35 => "TQ2_0",
        36 => "IQ4_NL_4_4",
        37 => "IQ4_NL_4_8",
        38 => "IQ4_NL_8_8",
        39 => "MXFP4",
        40 => "NVFP4",
        41 => "Q1_0",
        _ => "unknown",
    }
}

/// `(values per block, bytes per block)` of a GGML type, where known (as the `gguf` package's `GGML_QUANT_SIZES`).
pub(super) fn block_layout(t: u32) -> Option<(u64, u64)> {
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
        40 => (64, 36),
        41 => (128, 18),
        _ => return None,
    })
}

/// The f16 stored little-endian at bytes `i..i + 2` of a block, as f32 (exact).
#[inline(always)]
pub(super) fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}
