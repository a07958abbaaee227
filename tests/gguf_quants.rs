//! GGUF dequantization held bit for bit against llama.cpp's `gguf` Python package: every supported block type
//! (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and F16/BF16, on the fixtures that
//! `scripts/make_gguf_quant_fixtures.py` writes (`tests/data/gguf-quants/`).

use std::collections::BTreeSet;
use std::path::PathBuf;

use nnsight::load::gguf::GgufFile;
use nnsight::Error;
use safetensors::{Dtype, SafeTensors};
use tch::Kind;

use crate::common;

pub fn fixture(name: &str) -> PathBuf {
    common::data("gguf-quants").join(name)
}

#[test]
fn every_supported_type_dequantizes_like_python_gguf_bit_for_bit() {
    common::init();
    let f = GgufFile::open(fixture("quants.gguf")).unwrap();
    let reference = std::fs::read(fixture("dequantized.safetensors")).unwrap();
    let reference = SafeTensors::deserialize(&reference).unwrap();
    let mut checked = BTreeSet::new();
    for (name, expected) in reference.tensors() {
        let info = f.tensor(&name).unwrap_or_else(|| panic!("quants.gguf has no tensor `{name}`"));
        // Each tensor is named by its type: `q4_k` is stored as Q4_K.
        assert_eq!(info.type_name().to_lowercase(), name, "type of `{name}`");
        assert_eq!(expected.dtype(), Dtype::F32, "{name}");
        let shape: Vec<i64> = expected.shape().iter().map(|&d| d as i64).collect();
        assert_eq!(info.shape(), shape, "{name}");

        let t = f.load_tensor(info, Kind::Float).unwrap();
        assert_eq!((t.kind(), t.size()), (Kind::Float, shape.clone()), "{name}");
        let ours = Vec::<f32>::try_from(&t.flatten(0, -1)).unwrap();
        let theirs: Vec<f32> =
            expected.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        assert_eq!(ours.len(), theirs.len(), "{name}");
        let differ: Vec<String> = ours
            .iter()
            .zip(&theirs)
            .enumerate()
            .filter(|(_, (a, b))| a.to_bits() != b.to_bits())
            .take(5)
            .map(|(i, (a, b))| format!("[{i}] ours {a:e} ({:#010x}) python {b:e} ({:#010x})", a.to_bits(), b.to_bits()))
            .collect();
        assert!(differ.is_empty(), "{name}: values differ from gguf.quants.dequantize: {differ:#?}");
        // The values are those of real blocks, not all zeros.
        assert!(ours.iter().filter(|x| **x != 0.0).count() > ours.len() / 2, "{name}: mostly zeros");
        checked.insert(info.type_name());
    }
    let all = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"];
    assert_eq!(checked, BTreeSet::from(all), "types checked against the reference");
}

#[test]
fn a_type_without_a_kernel_is_refused_by_name() {
    common::init();
    let f = GgufFile::open(fixture("quants.gguf")).unwrap();
    let info = f.tensor("tq1_0").unwrap();
    let e = f.load_tensor(info, Kind::Float).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::UnsupportedTensorType { ggml_type: 34, .. }), "{msg}");
    assert!(msg.contains("quants.gguf") && msg.contains("tensor `tq1_0` has GGUF type 34 (TQ1_0)"), "{msg}");
    assert!(msg.contains("supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K"));
}

#[test]
fn the_fixture_metadata_reads_back() {
    let f = GgufFile::open(fixture("quants.gguf")).unwrap();
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get_u64("fixture.seed").unwrap(), 1414);
    assert_eq!(f.get_f64("fixture.scale").unwrap(), 0.5);
    assert_eq!(f.get("fixture.flag").and_then(|v| v.as_bool()), Some(true));
    let names = f.get("fixture.names").and_then(|v| v.as_array()).unwrap();
    assert_eq!(names.len(), 12);
    assert_eq!(f.tensors.len(), 13);
}
