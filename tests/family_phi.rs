//! Llama 3.1's GGUF `rope_freqs`: tiny-llama's llama3 rope scaling as llama.cpp's converter stores it, read and
//! used (`scripts/make_tiny_models.py` writes tests/data/tiny-llama/tiny-llama.f32.gguf).

use crate::common::{self, max_abs_diff, read_reference};
use nnsight::prelude::*;
use std::path::{Path, PathBuf};

const P1: &str = "The quick brown fox jumps over the lazy dog";

/// The bytes of `path` with the first (only) dimension of tensor `name` in the GGUF tensor table set to `len`.
fn with_tensor_length(path: &Path, name: &str, len: u64) -> (tempfile::TempDir, PathBuf) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes.windows(name.len()).position(|w| w == name.as_bytes()).expect("tensor name in the file");
    let dims = at + name.len();
    assert_eq!(u32::from_le_bytes(bytes[dims..dims + 4].try_into().unwrap()), 1, "a vector");
    bytes[dims + 4..dims + 12].copy_from_slice(&len.to_le_bytes());
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bad.gguf");
    std::fs::write(&out, bytes).unwrap();
    (tmp, out)
}

#[test]
fn llama_3_1_gguf_rope_freqs_give_the_llama3_scaling_of_the_hf_checkpoint() -> nnsight::Result<()> {
    // tiny-llama: llama3 rope scaling (factor 8, original context 16) in its config.json; its GGUF carries the
    // same scaling as llama.cpp's `rope_freqs` tensor only.
    let path = common::data("tiny-llama/tiny-llama.f32.gguf");
    let gguf = LanguageModel::<Llama>::load_with(&path, common::opts())?;
    let dir = LanguageModel::<Llama>::load_with(common::data("tiny-llama"), common::opts())?;
    let scaling = gguf.model().config().rope_scaling.clone().expect("rope scaling from rope_freqs");
    assert_eq!(scaling.rope_type.as_deref(), Some("llama3"));
    assert_eq!(scaling.freq_factors.as_ref().map(Vec::len), Some(8));
    let reference = read_reference(&common::data("tiny-llama/reference.safetensors"));
    for key in ["p1", "p2"] {
        let ids = Vec::<i64>::try_from(&reference[&format!("{key}_input_ids")]).unwrap();
        let want = &reference[&format!("{key}_logits")];
        let from_gguf = gguf.forward(ids.clone())?.squeeze_dim(0);
        let from_dir = dir.forward(ids)?.squeeze_dim(0);
        let (d, e) = (max_abs_diff(&from_gguf, want), max_abs_diff(&from_dir, want));
        eprintln!("tiny-llama {key}: max |logits - HF|: GGUF with rope_freqs {d:.3e}, HF folder (llama3) {e:.3e}");
        assert!(d < 1e-4 && e < 1e-4, "{key}: {d} {e}");
    }
    let greedy = GenerateOptions::new().max_new_tokens(24).stop_ids(vec![]);
    let want = Vec::<i64>::try_from(&reference["p1_greedy"]).unwrap();
    assert_eq!(gguf.generate(P1, &greedy)?.rows[0].new_ids, want, "greedy continuation from the GGUF");
    // Without the factors the file is another model.
    let (_tmp, bad) = with_tensor_length(&path, "rope_freqs.weight", 7);
    let e = LanguageModel::<Llama>::load_with(&bad, common::opts()).err().expect("an error").to_string();
    assert!(e.contains("rope_freqs.weight") && e.contains("should hold 8 values") && e.contains("[7]"), "{e}");
    Ok(())
}
