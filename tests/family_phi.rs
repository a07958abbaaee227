//! Phi-3 on its tiny checkpoint (`scripts/make_tiny_models.py`: fused `qkv_proj` and `gate_up_proj`, grouped
//! heads, half of each head rotated, LongRoPE with original_max_position_embeddings 2 so that both prompts use the
//! long factors, a 6-key sliding window): parity with transformers, the interventions every family supports
//! (as in family_qwen.rs), the short/long switch (the same weights with original_max_position_embeddings 16,
//! against `switch.safetensors`), its GGUF files (ours and transformers' own reading of one), and Llama 3.1's
//! GGUF `rope_freqs` (tiny-llama's llama3 scaling as llama.cpp's converter stores it).

use crate::common::{self, max_abs_diff, read_reference, Recorder};
use crate::family_qwen::{family_interventions, finite, AttentionSizes, Scale};
use nnsight::prelude::*;
use std::path::{Path, PathBuf};

const P1: &str = "The quick brown fox jumps over the lazy dog";
const P2: &str = "Hello world";

fn load() -> LanguageModel<Phi3> {
    LanguageModel::<Phi3>::load_with(common::data("tiny-phi3"), common::opts()).expect("tiny-phi3")
}

#[test]
fn tiny_phi3_with_fused_projections_partial_rotary_longrope_and_window_matches_transformers() {
    crate::tiny_models::check_against_reference::<Phi3>("tiny-phi3", "model.layers", "self_attn", 2);
}

impl AttentionSizes for Phi3 {
    fn attention_sizes(&self) -> (i64, i64, i64) {
        let c = self.config();
        (c.num_attention_heads, c.kv_heads(), c.head_dim())
    }
}

// A Phi-3 layer has 10 modules: the fused qkv_proj and gate_up_proj stand for five of Llama's.
family_interventions!(phi3, Phi3, "tiny-phi3", 10);

#[test]
fn the_fused_projections_keep_their_names_and_feed_the_heads() -> nnsight::Result<()> {
    let model = load();
    let tree = model.tree().to_string();
    for part in ["Phi3ForCausalLM(", "Phi3DecoderLayer(", "Phi3Attention(", "Phi3MLP(", "(qkv_proj)", "(gate_up_proj)"]
    {
        assert!(tree.contains(part), "{part} in {tree}");
    }
    assert!(!tree.contains("q_proj") && !tree.contains("(up_proj)"), "no module HF's Phi-3 lacks: {tree}");
    let s = model.batch(P1)?.input_ids.size()[1];
    intervene!(model.trace(P1) {
        let attn = &model.model.layers[0].self_attn;
        let qkv = attn.qkv_proj.output.save();
        let query = attn.query.output.save();
        let key = attn.key.output.save();
        let probs = attn.probs.output.save();
        let gate_up = model.model.layers[0].mlp.gate_up_proj.output.save();
        let act_in = model.model.layers[0].mlp.activation_fn.input.save();
    });
    // 4 query heads, then 2 key heads, then 2 value heads, of 16 values.
    assert_eq!((qkv.size(), gate_up.size()), (vec![1, s, 128], vec![1, s, 256]));
    assert!(act_in.equal(&gate_up.narrow(2, 0, 128)), "the gate is the first half");
    // Half of each head is rotated: the other half is the projection as it came out.
    let heads = |start: i64, n: i64| qkv.narrow(2, start * 16, n * 16).view([1, s, n, 16]).transpose(1, 2);
    assert!(query.narrow(3, 8, 8).equal(&heads(0, 4).narrow(3, 8, 8)), "unrotated half of the queries");
    assert!(key.narrow(3, 8, 8).equal(&heads(4, 2).narrow(3, 8, 8)), "unrotated half of the keys");
    assert!(max_abs_diff(&query.narrow(3, 0, 8), &heads(0, 4).narrow(3, 0, 8)) > 1e-3, "the rotated half");
    // The window: query i sees keys i-5..=i only.
    let rows = Tensor::arange(s, (Kind::Int64, Device::Cpu)).view([s, 1]);
    let cols = Tensor::arange(s, (Kind::Int64, Device::Cpu)).view([1, s]);
    let outside = cols.gt_tensor(&rows).logical_or(&(&rows - &cols).ge(6));
    assert_eq!(probs.masked_select(&outside).abs().max().double_value(&[]), 0.0);
    assert!(probs.select(2, -1).narrow(2, s - 6, 6).gt(0.0).all().int64_value(&[]) == 1);
    Ok(())
}

/// A copy of tests/data/tiny-phi3 (config, weights, tokenizer) whose config.json has `from` replaced by `to`.
fn variant(from: &str, to: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(common::data("tiny-phi3").join(f), tmp.path().join(f)).unwrap();
    }
    let config = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
    assert!(config.contains(from), "{from} in {config}");
    std::fs::write(tmp.path().join("config.json"), config.replace(from, to)).unwrap();
    tmp
}

#[test]
fn longrope_switches_from_short_to_long_factors_as_transformers_does() -> nnsight::Result<()> {
    // The same weights with original_max_position_embeddings 16: P2 (3 tokens) starts on the short factors and
    // outgrows them while generating, P1 (20 tokens) is long from the start.
    let tmp = variant("\"original_max_position_embeddings\": 2,", "\"original_max_position_embeddings\": 16,");
    let model = LanguageModel::<Phi3>::load_with(tmp.path(), common::opts())?;
    let reference = read_reference(&common::data("tiny-phi3/switch.safetensors"));
    let greedy = GenerateOptions::new().max_new_tokens(24).stop_ids(vec![]);
    for (key, prompt, long) in [("p1", P1, true), ("p2", P2, false)] {
        assert_eq!(model.model().uses_long_factors(&model.batch(prompt)?.position_ids)?, long, "{key}");
        let d = max_abs_diff(&model.forward(prompt)?.squeeze_dim(0), &reference[&format!("{key}_logits")]);
        eprintln!("tiny-phi3 (original context 16) {key}: max |logits - HF| = {d:.3e}");
        assert!(d < 1e-4, "{key}: {d}");
        let want = Vec::<i64>::try_from(&reference[&format!("{key}_greedy")]).unwrap();
        assert_eq!(model.generate(prompt, &greedy)?.rows[0].new_ids, want, "{key}: greedy continuation");
    }
    // The short factors matter: the original model (long from the start) gives other logits for P2.
    let d = max_abs_diff(&load().forward(P2)?.squeeze_dim(0), &reference["p2_logits"]);
    assert!(d > 1e-3, "short vs long factors differ by only {d}");
    // Generation of P2: the step over a cache of exactly 16 positions runs the whole sequence again (17 tokens),
    // as transformers' generate() does; the steps around it are one-token steps.
    let opts = GenerateOptions::new().max_new_tokens(16).stop_ids(vec![]);
    intervene!(model.generate(P2, &opts) {
        let mut seen = Vec::new();
        for _ in iter(12..16) {
            seen.push(model.model.layers[0].output.save());
        }
    });
    let lengths: Vec<i64> = seen.iter().map(|t| t.size()[1]).collect();
    assert_eq!(lengths, [1, 1, 17, 1], "forward lengths of steps 12..16");
    Ok(())
}

#[test]
fn a_phi3_config_without_rope_scaling_or_window_loads_and_a_bad_one_is_a_clear_error() -> nnsight::Result<()> {
    let tmp = variant("\"sliding_window\": 6,", "\"sliding_window\": null,");
    let model = LanguageModel::<Phi3>::load_with(tmp.path(), common::opts())?;
    let d = max_abs_diff(&model.forward(P1)?, &load().forward(P1)?);
    assert!(d > 1e-3, "the window matters at P1's 20 tokens ({d})");
    for (from, to, says) in [
        ("\"rope_type\": \"longrope\"", "\"rope_type\": \"dynamic\"", "rope type `dynamic`"),
        ("      27.0\n", "      27.0,\n      81.0\n", "`long_factor` has 5 values"),
        ("\"partial_rotary_factor\": 0.5", "\"partial_rotary_factor\": 0.5625", "rotate an even number"),
        ("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3", "not a multiple"),
    ] {
        let tmp = variant(from, to);
        let e = LanguageModel::<Phi3>::load_with(tmp.path(), common::opts()).err().expect("an error").to_string();
        assert!(e.contains(says) && e.contains("config.json"), "{e}");
    }
    Ok(())
}

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
fn tiny_phi3_from_gguf_is_the_model_of_its_folder() -> nnsight::Result<()> {
    // Written by make_tiny_models.py as llama.cpp's converter writes a phi3 (float32).
    let path = common::data("tiny-phi3/tiny-phi3.f32.gguf");
    let model = LanguageModel::<Phi3>::load_with(&path, common::opts())?;
    let c = model.model().config();
    let rope = c.rope();
    assert_eq!((c.rotary_dims(), c.sliding_window, c.original_max_position_embeddings), (8, Some(6), 2));
    assert_eq!(rope.long_factor.as_deref(), Some(&[1.0, 3.0, 9.0, 27.0][..]));
    assert!((rope.attention_factor.unwrap() - 3f64.sqrt()).abs() < 1e-6);
    let reference = read_reference(&common::data("tiny-phi3/reference.safetensors"));
    for key in ["p1", "p2"] {
        let ids = Vec::<i64>::try_from(&reference[&format!("{key}_input_ids")]).unwrap();
        let d = max_abs_diff(&model.forward(ids)?.squeeze_dim(0), &reference[&format!("{key}_logits")]);
        eprintln!("tiny-phi3 from GGUF {key}: max |logits - HF| = {d:.3e}");
        assert!(d < 1e-4, "{key}: {d}");
    }
    assert_eq!(model.encode(P1)?, Vec::<i64>::try_from(&reference["p1_input_ids"]).unwrap());
    let auto = LanguageModel::<AutoModel>::load_with(&path, common::opts())?;
    assert_eq!(auto.model().architecture(), "phi3");
    // transformers reads a phi3 file without its rope scaling, partial rotary and window: on a file that has none
    // of them, its logits are ours.
    let plain = LanguageModel::<Phi3>::load_with(common::data("tiny-phi3/tiny-phi3-plain.f32.gguf"), common::opts())?;
    let theirs = read_reference(&common::data("tiny-phi3/plain-reference.safetensors"));
    for (key, prompt) in [("p1", P1), ("p2", P2)] {
        let d = max_abs_diff(&plain.forward(prompt)?.squeeze_dim(0), &theirs[&format!("{key}_logits")]);
        eprintln!("tiny-phi3-plain GGUF {key}: max |logits - transformers' GGUF loading| = {d:.3e}");
        assert!(d < 1e-4, "{key}: {d}");
    }
    let (_tmp, bad) = with_tensor_length(&path, "rope_factors_long.weight", 3);
    let e = LanguageModel::<Phi3>::load_with(&bad, common::opts()).err().expect("an error").to_string();
    assert!(e.contains("rope_factors_long.weight") && e.contains("should hold 4 values") && e.contains("[3]"), "{e}");
    Ok(())
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

#[test]
fn the_registry_picks_phi3_from_config_json_and_a_typed_load_refuses_another() -> nnsight::Result<()> {
    let auto = LanguageModel::<AutoModel>::load_with(common::data("tiny-phi3"), common::opts())?;
    assert_eq!(auto.model().architecture(), "phi3");
    assert!(max_abs_diff(&auto.forward(P1)?, &load().forward(P1)?) == 0.0);
    let loaded = LanguageModel::<Llama>::load_with(common::data("tiny-phi3"), common::opts());
    assert!(matches!(loaded, Err(nnsight::Error::WrongArchitecture { .. })), "a Phi-3 checkpoint is not a Llama");
    Ok(())
}
