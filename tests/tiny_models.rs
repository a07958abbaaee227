//! Tiny random GPT-2 and Llama checkpoints made with Hugging Face transformers by `scripts/make_tiny_models.py`
//! (fixed seeds; tests/data/tiny-*), against the logits, hidden states, attention probabilities and greedy
//! continuations transformers computed for them ([`check_against_reference`], the parity every family shows).
//! tiny-llama exercises the family's options: grouped-query attention, llama3 rope scaling, attention and MLP
//! biases, an untied head and a sharded checkpoint.

use crate::common::{self, excess, max_abs_diff, read_reference, Recorder};
use nnsight::prelude::*;

const P1: &str = "The quick brown fox jumps over the lazy dog";
const P2: &str = "Hello world";

/// The parity a family's tiny checkpoint must show against what transformers computed for it
/// (`scripts/make_tiny_models.py`): for each prompt, the token ids; the logits within 1e-4; each block's output
/// (`{layers}.{i}`) within 1e-4 + 1e-5 relative; each layer's attention probabilities (the `probs` point of
/// `{layers}.{i}.{attn}`, the ones the explicit path uses) within 1e-5 of the eager ones; the greedy continuation
/// of 24 tokens equal to transformers', solo and with both prompts in one left-padded batch; and each row of a
/// batched forward within 1e-4 of its solo run.
pub(crate) fn check_against_reference<M: nnsight::models::CausalLm>(
    dir: &str,
    layers: &str,
    attn: &str,
    n_layers: usize,
) {
    common::init();
    let model = LanguageModel::<M>::load_with(common::data(dir), common::opts()).unwrap();
    let reference = read_reference(&common::data(&format!("{dir}/reference.safetensors")));
    let greedy = GenerateOptions::new().max_new_tokens(24).stop_ids(vec![]);
    for (key, prompt) in [("p1", P1), ("p2", P2)] {
        let ids: Vec<i64> = Vec::<i64>::try_from(&reference[&format!("{key}_input_ids")]).unwrap();
        assert_eq!(model.encode(prompt).unwrap(), ids, "{dir}: token ids of {prompt:?}");
        let batch = model.batch(prompt).unwrap();
        let mut rec = Recorder::default();
        let logits = model.forward_with_hook(&batch, &mut rec).unwrap().squeeze_dim(0);
        let want = &reference[&format!("{key}_logits")];
        let d = max_abs_diff(&logits, want);
        eprintln!("{dir} {key}: max |logits - HF| = {d:.3e}");
        assert!(d < 1e-4, "{dir} {key}: logits differ from transformers' by {d}");
        let outputs = &reference[&format!("{key}_layer_outputs")];
        for i in 0..n_layers {
            let ours = rec.outputs[&format!("{layers}.{i}")].squeeze_dim(0);
            let e = excess(&ours, &outputs.get(i as i64), 1e-4, 1e-5);
            assert!(e <= 0.0, "{dir} {key}: layer {i} output beyond tolerance by {e}");
        }
        let mut rec = Recorder { points: true, ..Recorder::default() };
        let explicit = model.forward_with_hook(&batch, &mut rec).unwrap().squeeze_dim(0);
        let d = max_abs_diff(&explicit, want);
        assert!(d < 1e-4, "{dir} {key}: logits of the explicit attention path differ from transformers' by {d}");
        let probs = &reference[&format!("{key}_attn_probs")];
        for i in 0..n_layers {
            let path = format!("{layers}.{i}.{attn}.probs");
            let ours = rec.outputs.get(&path).unwrap_or_else(|| panic!("{dir}: no `{path}` point was seen"));
            let d = max_abs_diff(&ours.squeeze_dim(0), &probs.get(i as i64));
            assert!(d < 1e-5, "{dir} {key}: layer {i} attention probabilities differ from transformers' by {d}");
        }
        let want: Vec<i64> = Vec::<i64>::try_from(&reference[&format!("{key}_greedy")]).unwrap();
        let solo = model.generate(prompt, &greedy).unwrap();
        assert_eq!(solo.rows[0].new_ids, want, "{dir} {key}: greedy continuation (solo)");
    }
    let both = model.generate([P1, P2], &greedy).unwrap();
    for (row, key) in ["p1", "p2"].iter().enumerate() {
        let want: Vec<i64> = Vec::<i64>::try_from(&reference[&format!("{key}_greedy")]).unwrap();
        assert_eq!(both.rows[row].new_ids, want, "{dir} {key}: greedy continuation (batched with the other prompt)");
    }
    assert_batched_rows_equal_solo(&model, dir, 1e-4);
}

/// Each row of a left-padded batch of P1 and P2 gives, at its real positions, the logits of its solo run within
/// `tol`.
fn assert_batched_rows_equal_solo<M: nnsight::models::CausalLm>(model: &LanguageModel<M>, dir: &str, tol: f64) {
    let batch = model.batch([P1, P2]).unwrap();
    let logits = model.forward_batch(&batch).unwrap();
    let seq = logits.size()[1];
    for (row, prompt) in [P1, P2].iter().enumerate() {
        let solo = model.forward(*prompt).unwrap().get(0);
        let n = batch.lengths[row] as i64;
        let d = max_abs_diff(&logits.get(row as i64).narrow(0, seq - n, n), &solo);
        assert!(d < tol, "{dir} row {row}: batched differs from solo by {d}");
    }
}

#[test]
fn tiny_gpt2_logits_match_transformers() {
    check_against_reference::<Gpt2>("tiny-gpt2", "transformer.h", "attn", 2);
}

#[test]
fn tiny_llama_with_gqa_llama3_rope_biases_untied_sharded_matches_transformers() {
    check_against_reference::<Llama>("tiny-llama", "model.layers", "self_attn", 2);
}

#[test]
fn tiny_mistral_with_sliding_window_matches_transformers() {
    check_against_reference::<Llama>("tiny-mistral", "model.layers", "self_attn", 2);
    // The window matters at P1's 20 tokens: without it the logits are far from transformers'.
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(common::data("tiny-mistral").join(f), tmp.path().join(f)).unwrap();
    }
    let config = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
    std::fs::write(tmp.path().join("config.json"), config.replace("\"sliding_window\": 4", "\"sliding_window\": null"))
        .unwrap();
    let model = LanguageModel::<Llama>::load_with(tmp.path(), common::opts()).unwrap();
    let reference = read_reference(&common::data("tiny-mistral/reference.safetensors"));
    let d = max_abs_diff(&model.forward(P1).unwrap().squeeze_dim(0), &reference["p1_logits"]);
    assert!(d > 1e-2, "without the window the logits should differ, but differ by only {d}");
}

#[test]
fn auto_model_picks_the_architecture_from_the_config() {
    common::init();
    let opts = common::opts();
    let gpt2 = LanguageModel::<AutoModel>::load_with(common::data("tiny-gpt2"), opts.clone()).unwrap();
    assert_eq!(gpt2.model().architecture(), "gpt2");
    let llama = LanguageModel::<AutoModel>::load_with(common::data("tiny-llama"), opts).unwrap();
    assert_eq!(llama.model().architecture(), "llama");
    let typed = LanguageModel::<Gpt2>::load_with(common::data("tiny-gpt2"), common::opts()).unwrap();
    let a = gpt2.forward(P1).unwrap();
    let b = typed.forward(P1).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn tiny_models_batched_rows_equal_solo_runs() {
    common::init();
    let opts = common::opts();
    for dir in ["tiny-gpt2", "tiny-llama"] {
        let model = LanguageModel::<AutoModel>::load_with(common::data(dir), opts.clone()).unwrap();
        assert_batched_rows_equal_solo(&model, dir, 1e-5);
    }
}

#[test]
fn module_tree_lists_paths_and_parameter_shapes() {
    common::init();
    let model = LanguageModel::<Gpt2>::load_with(common::data("tiny-gpt2"), common::opts()).unwrap();
    let text = model.tree().to_string();
    assert!(text.starts_with("GPT2LMHeadModel("), "{text}");
    assert!(
        text.contains("(c_attn): Conv1D(nf=192, nx=64)  <transformer.h.0.attn.c_attn>  [weight [64, 192], bias [192]]"),
        "{text}"
    );
    assert!(text.contains("(0-1): 2 x"), "identical blocks are folded: {text}");
    let params = nnsight::nn::named_parameters(model.model());
    let names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    // 28 tensors in the checkpoint; the tied head is the embedding, listed once.
    assert_eq!(names.len(), 28, "{names:?}");
    assert!(names.contains(&"transformer.h.1.mlp.c_proj.bias"));
    assert!(!names.contains(&"lm_head.weight"));
}

#[test]
fn model_moves_between_dtypes_and_keeps_its_outputs() {
    common::init();
    let opts = common::opts();
    let f32_model = LanguageModel::<Llama>::load_with(common::data("tiny-llama"), opts.clone()).unwrap();
    let f64_model = LanguageModel::<Llama>::load_with(common::data("tiny-llama"), opts.kind(Kind::Double)).unwrap();
    let a = f32_model.forward(P1).unwrap();
    let b = f64_model.forward(P1).unwrap();
    assert_eq!(b.kind(), Kind::Double);
    assert!(max_abs_diff(&a, &b) < 1e-4);
    let moved = f32_model.to(Device::Cpu).unwrap();
    assert!(max_abs_diff(&moved.forward(P1).unwrap(), &a) < 1e-4);
}
