//! Unit tests of the GGUF reader: small files written in memory, then parsed, loaded, dequantized and corrupted.

use super::dequant::{
    block_type, dequantize_parallel, dequantize_q4_0, dequantize_q4_1, dequantize_q8_0, dequantize_split, Q4_1_BYTES,
    QK,
};
use super::types::{block_layout, ty};
use super::*;
use half::{bf16, f16};
use std::io::Write;
use tch::{Device, Kind, Tensor};

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
    dequantize_parallel(&src, &mut parallel, block_type(ty::Q4_1).unwrap()).unwrap();
    assert_eq!(serial, parallel);
}

/// Bytes that vary from block to block, with the f16 at each of `f16_at` (offsets in a block) a finite value.
fn pseudo_random_blocks(n_blocks: usize, block_bytes: usize, f16_at: &[usize]) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut out: Vec<u8> = (0..n_blocks * block_bytes)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    for (i, block) in out.chunks_exact_mut(block_bytes).enumerate() {
        for &at in f16_at {
            block[at..at + 2].copy_from_slice(&f16_bytes((i % 97) as f32 / 512.0 - 0.09));
        }
    }
    out
}

#[test]
fn every_block_type_splits_over_threads_like_one_thread() {
    // (type, offsets of its f16 scales in a block)
    let types: [(u32, &[usize]); 10] = [
        (ty::Q4_0, &[0]),
        (ty::Q4_1, &[0, 2]),
        (ty::Q5_0, &[0]),
        (ty::Q5_1, &[0, 2]),
        (ty::Q8_0, &[0]),
        (ty::Q2_K, &[80, 82]),
        (ty::Q3_K, &[108]),
        (ty::Q4_K, &[0, 2]),
        (ty::Q5_K, &[0, 2]),
        (ty::Q6_K, &[208]),
    ];
    for (t, scales) in types {
        let bt = block_type(t).unwrap();
        assert_eq!(block_layout(t), Some((bt.values as u64, bt.bytes as u64)), "{}", ggml_type_name(t));
        let n_blocks = 37;
        let src = pseudo_random_blocks(n_blocks, bt.bytes, scales);
        let mut serial = vec![0f32; n_blocks * bt.values];
        (bt.kernel)(&src, &mut serial);
        assert!(serial.iter().all(|x| x.is_finite()), "{}", ggml_type_name(t));
        for threads in [0, 2, 5, 37, 100] {
            let mut split = vec![f32::NAN; n_blocks * bt.values];
            dequantize_split(&src, &mut split, bt, threads).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&serial), bits(&split), "{} on {threads} threads", ggml_type_name(t));
        }
        // Lengths that are not whole blocks, or do not match, are errors, not panics or partial writes.
        let mut dst = vec![0f32; bt.values + 1];
        let e = dequantize_split(&src[..bt.bytes], &mut dst, bt, 1).unwrap_err();
        assert!(e.contains("whole number of blocks"), "{e}");
        let mut dst = vec![0f32; 2 * bt.values];
        let e = dequantize_split(&src[..bt.bytes], &mut dst, bt, 3).unwrap_err();
        assert!(e.contains(&format!("{} bytes were given", bt.bytes)), "{e}");
        dequantize_split(&[], &mut [], bt, 4).unwrap();
    }
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
    b.tensor("blk.0.ffn_up.weight", &[256, 1], 16, &[0u8; 66]);
    b.tensor("blk.0.ffn_down.weight", &[256, 1], 34, &[0u8; 54]);
    b.tensor("blk.0.attn_q.weight", &[32, 1], 4, &[0u8; 18]);
    let f = GgufFile::open(temp_file("iq.gguf", &b.bytes())).unwrap();
    for (info, id, name) in
        [(&f.tensors[0], 16, "IQ2_XXS"), (&f.tensors[1], 34, "TQ1_0"), (&f.tensors[2], 4, "unknown")]
    {
        let e = f.load_tensor(info, Kind::Float).unwrap_err();
        match &e {
            Error::UnsupportedTensorType { tensor, ggml_type, type_name, supported, .. } => {
                assert_eq!(tensor, &info.name);
                assert_eq!(*ggml_type, id);
                assert_eq!(type_name, name);
                assert_eq!(supported, "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K");
            }
            other => panic!("expected UnsupportedTensorType, got {other}"),
        }
        let msg = e.to_string();
        assert!(msg.contains(&info.name) && msg.contains(&format!("GGUF type {id} ({name})")), "{msg}");
    }
}

#[test]
fn bad_block_multiple_is_a_format_error() {
    let mut b = Builder::new();
    b.tensor("w", &[30, 1], ty::Q4_1, &[0u8; 20]);
    let e = GgufFile::open(temp_file("block.gguf", &b.bytes())).unwrap_err();
    assert!(matches!(e, Error::Format { .. }) && e.to_string().contains("block size"), "{e}");
}

#[test]
fn k_quant_rows_must_be_whole_super_blocks() {
    // 256 values, but rows of 32: a K-quant row must hold whole super-blocks of 256.
    let mut b = Builder::new();
    b.tensor("w", &[32, 8], ty::Q4_K, &[0u8; 144]);
    let e = GgufFile::open(temp_file("kblock.gguf", &b.bytes())).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Format { .. }) && msg.contains("Q4_K block size 256") && msg.contains("`w`"), "{msg}");
    let mut b = Builder::new();
    b.tensor("v", &[100], ty::Q6_K, &[0u8; 210]);
    let e = GgufFile::open(temp_file("kblock2.gguf", &b.bytes())).unwrap_err();
    assert!(matches!(e, Error::Format { .. }) && e.to_string().contains("block size 256"), "{e}");
}

#[test]
fn sizes_of_corrupt_infos_do_not_overflow() {
    let info = GgufTensorInfo { name: "x".into(), dims: vec![u64::MAX, 3], ggml_type: ty::Q4_K, offset: 0 };
    assert_eq!(info.numel(), u64::MAX);
    let mut b = Builder::new();
    b.tensor("w", &[256], ty::Q4_K, &[0u8; 144]);
    let f = GgufFile::open(temp_file("sizes.gguf", &b.bytes())).unwrap();
    assert_eq!(f.tensor_bytes(&f.tensors[0]), 144);
    assert_eq!(f.tensor_bytes(&info) as u64, u64::MAX / 256 * 144);
    let e = f.load_tensor(&info, Kind::Float).unwrap_err();
    assert!(matches!(e, Error::Format { .. }) && e.to_string().contains("overflows"), "{e}");
}

#[test]
fn overlong_tensor_names_are_refused() {
    let mut b = Builder::new();
    let name = format!("blk.0.{}\n.weight", "x".repeat(80));
    b.tensor(&name, &[4], ty::F32, &[0u8; 16]);
    let e = GgufFile::open(temp_file("name.gguf", &b.bytes())).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Format { .. }), "{msg}");
    assert!(msg.contains("name of tensor 0") && msg.contains("94 bytes long (GGUF allows 64)"), "{msg}");
    // Shown cut after 64 characters, with control characters escaped.
    assert!(msg.ends_with(&format!("blk.0.{}...", "x".repeat(58))), "{msg}");
    let mut b = Builder::new();
    b.tensor(&format!("a\tb{}", "c".repeat(61)), &[4], ty::F32, &[0u8; 16]);
    assert!(GgufFile::open(temp_file("name64.gguf", &b.bytes())).is_ok());
}
