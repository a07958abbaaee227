//! The standard names (`model.layers[i].attn`, `model.final_norm`, `model.unembed`; `nnsight::models::standard`):
//! a logit lens and an attention-pattern function written once, generic over the architecture, run unchanged on
//! every family's tiny checkpoint (typed and as `AutoModel`), where the lens's last layer gives the logits and the
//! patterns are transformers' eager attention probabilities; on SmolLM2 both equal the Hugging Face-named blocks
//! value for value; standard and Hugging Face names mix in one block; and every standard path is a module the
//! forward calls.

use crate::common::{self, max_abs_diff, read_reference, Recorder};
use nnsight::prelude::*;

const P1: &str = "The quick brown fox jumps over the lazy dog";
const P2: &str = "Hello world";

/// A logit lens written once for every architecture: each layer's residual stream after it, through the final
/// norm and the unembedding, at the last position (`[vocab]` per layer), and the unembedding's own last output
/// (the logits before any final soft cap).
fn logit_lens<M: CausalLm>(model: &LanguageModel<M>, prompt: &str) -> nnsight::Result<(Vec<Tensor>, Tensor)> {
    let n = model.standard_names().n_layers;
    intervene!(model.trace(prompt) {
        let mut lens = Vec::new();
        for i in 0..n {
            let h = model.layers[i].output;
            lens.push(model.unembed(model.final_norm(h)).i((0, -1)).save());
        }
        let logits = model.unembed.output.i((0, -1)).save();
    });
    Ok((lens, logits))
}

/// Every layer's attention probabilities `[heads, q, k]`, written once for every architecture.
fn attention_patterns<M: CausalLm>(model: &LanguageModel<M>, prompt: &str) -> nnsight::Result<Vec<Tensor>> {
    intervene!(model.trace(prompt) {
        let mut patterns = Vec::new();
        for layer in model.layers.iter() {
            patterns.push(layer.attn.probs.output.i(0).save());
        }
    });
    Ok(patterns)
}

/// The lens's last layer is the unembedding's output, and the logits after the final soft cap where the family has
/// one; the patterns are transformers' eager probabilities (within 1e-5).
fn check_family<M: CausalLm>(dir: &str) {
    let model = LanguageModel::<M>::load_with(common::data(dir), common::opts()).unwrap();
    let reference = read_reference(&common::data(&format!("{dir}/reference.safetensors")));
    let n = model.standard_names().n_layers;
    for (key, prompt) in [("p1", P1), ("p2", P2)] {
        let (lens, logits) = logit_lens(&model, prompt).unwrap();
        assert_eq!(lens.len(), n, "{dir}: one lens row per layer");
        let d = max_abs_diff(&lens[n - 1], &logits);
        assert!(d < 1e-5, "{dir} {key}: the lens of the last layer differs from the logits by {d}");
        let cap = model.config_json()["final_logit_softcapping"].as_f64();
        let capped = match cap {
            Some(cap) => (&lens[n - 1] / cap).tanh() * cap,
            None => lens[n - 1].shallow_clone(),
        };
        let want = model.forward(prompt).unwrap().i((0, -1));
        let d = max_abs_diff(&capped, &want);
        assert!(d < 1e-5, "{dir} {key}: the lens of the last layer (capped: {cap:?}) differs from the logits by {d}");
        let early = max_abs_diff(&lens[0], &logits);
        assert!(early > 1e-3, "{dir} {key}: the first layer's lens equals the logits ({early}): not a lens");
        let patterns = attention_patterns(&model, prompt).unwrap();
        let want = &reference[&format!("{key}_attn_probs")];
        assert_eq!(patterns.len(), n);
        for (i, p) in patterns.iter().enumerate() {
            let d = max_abs_diff(p, &want.get(i as i64));
            assert!(d < 1e-5, "{dir} {key}: layer {i}'s pattern differs from transformers' eager one by {d}");
        }
    }
}

/// The same, on the model loaded as whatever it is.
fn check_auto(dir: &str, architecture: &str) {
    let model = LanguageModel::<AutoModel>::load_with(common::data(dir), common::opts()).unwrap();
    assert_eq!(model.model().architecture(), architecture);
    let (lens, logits) = logit_lens(&model, P1).unwrap();
    let d = max_abs_diff(lens.last().unwrap(), &logits);
    assert!(d < 1e-5, "{dir} (AutoModel): the lens of the last layer differs from the logits by {d}");
}

#[test]
fn generic_functions_run_on_gpt2() {
    check_family::<Gpt2>("tiny-gpt2");
    check_auto("tiny-gpt2", "gpt2");
}

#[test]
fn generic_functions_run_on_llama_and_mistral() {
    check_family::<Llama>("tiny-llama");
    check_family::<Llama>("tiny-mistral");
    check_auto("tiny-mistral", "llama");
}

#[test]
fn generic_functions_run_on_qwen2_and_qwen3() {
    check_family::<Qwen2>("tiny-qwen2");
    check_family::<Qwen3>("tiny-qwen3");
    check_auto("tiny-qwen3", "qwen3");
}

#[test]
fn generic_functions_run_on_gpt_neox_parallel_and_sequential() {
    check_family::<GptNeoX>("tiny-gpt-neox");
    check_family::<GptNeoX>("tiny-gpt-neox-sequential");
    check_auto("tiny-gpt-neox", "gpt_neox");
}

#[test]
fn generic_functions_run_on_phi3() {
    check_family::<Phi3>("tiny-phi3");
    check_auto("tiny-phi3", "phi3");
}

#[test]
fn generic_functions_run_on_gemma2_and_gemma3() {
    check_family::<Gemma2>("tiny-gemma2");
    check_family::<Gemma3>("tiny-gemma3");
    check_auto("tiny-gemma2", "gemma2");
}

#[test]
fn on_smollm2_the_generic_functions_equal_the_hugging_face_named_blocks() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    let prompt = "The Eiffel Tower is in the city of";
    let (lens, logits) = logit_lens(model, prompt)?;
    let n = model.model().model.layers.len();
    assert_eq!(model.standard_names().n_layers, n);
    intervene!(model.trace(prompt) {
        let mut named = Vec::new();
        for i in 0..n {
            let h = model.model.layers[i].output;
            named.push(model.lm_head(model.model.norm(h)).i((0, -1)).save());
        }
        let named_logits = model.lm_head.output.i((0, -1)).save();
    });
    assert_eq!(max_abs_diff(&logits, &named_logits), 0.0);
    for (i, (a, b)) in lens.iter().zip(&named).enumerate() {
        assert_eq!(max_abs_diff(a, b), 0.0, "layer {i}: the standard lens differs from the named one");
    }
    let patterns = attention_patterns(model, prompt)?;
    intervene!(model.trace(prompt) {
        let mut named_patterns = Vec::new();
        for i in 0..n {
            named_patterns.push(model.model.layers[i].self_attn.probs.output.i(0).save());
        }
    });
    for (i, (a, b)) in patterns.iter().zip(&named_patterns).enumerate() {
        assert_eq!(max_abs_diff(a, b), 0.0, "layer {i}: the standard pattern differs from the named one");
    }
    // The lens ends at Paris, as the logits do.
    let paris = model.encode(" Paris")?[0];
    assert_eq!(lens[n - 1].argmax(-1, false).int64_value(&[]), paris);
    Ok(())
}

#[test]
fn standard_and_hugging_face_names_mix_in_one_block() -> nnsight::Result<()> {
    let model = LanguageModel::<Llama>::load_with(common::data("tiny-llama"), common::opts())?;
    intervene!(model.trace(P1) {
        model.layers[0].mlp.output = model.model.layers[0].mlp.output * 0.0;
        let seen = model.model.layers[0].mlp.output.save();
        let named_resid = model.model.layers[0].output.save();
        let resid = model.layers[1].input.save();
        let attn = model.layers[1].attn.output.save();
        let named_attn = model.model.layers[1].self_attn.output.save();
    });
    assert_eq!(seen.abs().max().double_value(&[]), 0.0, "the standard write is what the named read sees");
    assert_eq!(max_abs_diff(&attn, &named_attn), 0.0);
    assert_eq!(max_abs_diff(&resid, &named_resid), 0.0, "layer 1's input is layer 0's output");
    Ok(())
}

#[test]
fn every_standard_path_is_a_module_the_forward_calls() {
    common::init();
    let dirs = [
        "tiny-gpt2",
        "tiny-llama",
        "tiny-mistral",
        "tiny-qwen2",
        "tiny-qwen3",
        "tiny-gpt-neox",
        "tiny-phi3",
        "tiny-gemma2",
        "tiny-gemma3",
    ];
    for dir in dirs {
        let model = LanguageModel::<AutoModel>::load_with(common::data(dir), common::opts()).unwrap();
        let names = model.standard_names();
        let mut rec = Recorder::default();
        let _ = model.forward_with_hook(&model.batch(P2).unwrap(), &mut rec).unwrap();
        let mut paths = vec![names.embed.to_string(), names.final_norm.to_string(), names.unembed.to_string()];
        for i in 0..names.n_layers {
            let layer = names.layer(i);
            paths.push(format!("{layer}.{}", names.attention));
            paths.push(format!("{layer}.{}", names.mlp));
            paths.push(layer);
        }
        for p in paths {
            assert!(rec.outputs.contains_key(&p), "{dir}: the standard path `{p}` is not a module of the forward");
        }
        assert!(!rec.outputs.contains_key(&names.layer(names.n_layers)), "{dir}: more layers than n_layers");
    }
}
