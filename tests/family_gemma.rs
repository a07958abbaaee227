//! Gemma 2 and Gemma 3 (text) on their tiny checkpoints (`scripts/make_tiny_models.py`): parity with transformers
//! (logits, blocks, attention probabilities, greedy continuations), the interventions every family supports, the
//! soft caps (Gemma 2's attention and final caps bite in its tiny model), the local layers' window against the
//! global layers' full view, Gemma 3's q/k norms and rotary bases, the scaled embedding, the GGUF files llama.cpp
//! would write (also against transformers' own reading of Gemma 2's), and the registry.

use crate::common::{self, max_abs_diff, read_reference, Recorder};
use crate::family_neox::with_config;
use crate::family_qwen::{
    family_interventions, finite, uniform_causal_probs, zero_outside_window, AttentionSizes, Scale,
};
use crate::tiny_models::check_against_reference;
use nnsight::prelude::*;

const P1: &str = "The quick brown fox jumps over the lazy dog";
const P2: &str = "Hello world";

/// An edit of a config.json.
type Edit = fn(&mut serde_json::Value);

impl AttentionSizes for Gemma2 {
    fn attention_sizes(&self) -> (i64, i64, i64) {
        let c = self.config();
        (c.num_attention_heads, c.kv_heads(), c.head_dim())
    }
}

impl AttentionSizes for Gemma3 {
    fn attention_sizes(&self) -> (i64, i64, i64) {
        let c = self.config();
        (c.num_attention_heads, c.kv_heads(), c.head_dim())
    }
}

#[test]
fn tiny_gemma2_with_soft_caps_alternating_windows_gqa_and_query_scalar_matches_transformers() {
    check_against_reference::<Gemma2>("tiny-gemma2", "model.layers", "self_attn", 2);
}

#[test]
fn tiny_gemma3_with_qk_norms_local_and_global_rope_and_final_cap_matches_transformers() {
    check_against_reference::<Gemma3>("tiny-gemma3", "model.layers", "self_attn", 3);
}

family_interventions!(gemma2, Gemma2, "tiny-gemma2");
family_interventions!(gemma3, Gemma3, "tiny-gemma3");

fn load2() -> LanguageModel<Gemma2> {
    LanguageModel::<Gemma2>::load_with(common::data("tiny-gemma2"), common::opts()).expect("tiny-gemma2")
}

fn load3() -> LanguageModel<Gemma3> {
    LanguageModel::<Gemma3>::load_with(common::data("tiny-gemma3"), common::opts()).expect("tiny-gemma3")
}

#[test]
fn gemma2_final_soft_cap_bounds_the_logits_and_both_caps_bite() -> nnsight::Result<()> {
    let model = load2();
    intervene!(model.trace(P1) {
        let head = model.lm_head.output.save();
        let logits = model.output.save();
    });
    let cap = 30.0;
    assert!(logits.abs().max().double_value(&[]) < cap, "the logits stay within the final cap");
    assert!(head.abs().max().double_value(&[]) > cap, "lm_head's output, before the cap, goes beyond it");
    assert!(max_abs_diff(&logits, &((&head / cap).tanh() * cap)) < 1e-5, "the cap is tanh(l / 30) * 30");
    let reference = read_reference(&common::data("tiny-gemma2/reference.safetensors"));
    // Without either cap the model is another one.
    for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
        let dir = with_config("tiny-gemma2", |c| c[key] = serde_json::Value::Null);
        let uncapped = LanguageModel::<Gemma2>::load_with(dir.path(), common::opts())?;
        let d = max_abs_diff(&uncapped.forward(P1)?.squeeze_dim(0), &reference["p1_logits"]);
        assert!(d > 1e-2, "without {key} the logits should differ from transformers', but by {d} only");
    }
    Ok(())
}

#[test]
fn a_local_layer_attends_within_its_window_and_a_global_one_beyond_in_a_trace_and_in_generation() -> nnsight::Result<()>
{
    let model = load2();
    assert_eq!((model.model().config().window(), model.model().config().is_sliding(1)), (Some(4), false));
    intervene!(model.trace(P1) {
        let local = model.model.layers[0].self_attn.probs.output.save();
        let global = model.model.layers[1].self_attn.probs.output.save();
    });
    assert!(local.size()[3] > 4, "the prompt is longer than the window");
    assert!(zero_outside_window(&local, 4));
    assert!(!zero_outside_window(&global, 4), "the global layer sees keys beyond the window");
    // At decode steps: the local layer's oldest keys get nothing, the global layer's do.
    let opts = GenerateOptions::new().max_new_tokens(3).stop_ids(vec![]);
    intervene!(model.generate(P1, &opts) {
        let mut locals = Vec::new();
        let mut globals = Vec::new();
        for _ in iter(1..3) {
            locals.push(model.model.layers[0].self_attn.probs.output.save());
            globals.push(model.model.layers[1].self_attn.probs.output.save());
        }
    });
    for (local, global) in locals.iter().zip(&globals) {
        let k = local.size()[3];
        assert_eq!(local.narrow(3, 0, k - 4).abs().max().double_value(&[]), 0.0, "keys older than the window");
        assert!(global.narrow(3, 0, k - 4).abs().max().double_value(&[]) > 0.0, "the global layer's old keys");
    }
    // Gemma 3's pattern: two local layers, then a global one.
    let c = load3().model().config().clone();
    assert_eq!((0..3).map(|i| c.is_sliding(i)).collect::<Vec<_>>(), [true, true, false]);
    Ok(())
}

#[test]
fn the_embedding_is_scaled_inside_embed_tokens() -> nnsight::Result<()> {
    let model = load2();
    let ids = model.encode(P2)?;
    intervene!(model.trace(P2) {
        let embedded = model.model.embed_tokens.output.save();
    });
    let table = &model.model().model.embed_tokens.weight;
    let rows = table.index_select(0, &Tensor::from_slice(&ids).to_device(table.device()));
    // sqrt(64) = 8, as transformers' Gemma2TextScaledWordEmbedding.
    assert!(max_abs_diff(&embedded.squeeze_dim(0), &(rows * 8.0)) < 1e-6);
    Ok(())
}

#[test]
fn gemma3_q_norm_runs_per_head_after_the_transpose_and_feeds_the_queries() -> nnsight::Result<()> {
    let model = load3();
    let s = model.batch(P1)?.input_ids.size()[1];
    intervene!(model.trace(P1) {
        let attn = &model.model.layers[2].self_attn;
        let q_norm_in = attn.q_norm.input.save();
        attn.q_norm.output = attn.q_norm.output * 0.0;
        let k_norm_out = attn.k_norm.output.save();
        let probs = attn.probs.output.save();
    });
    // [batch, heads, seq, head_dim] as in transformers' Gemma3Attention (head_dim 24, not 64 / 4).
    assert_eq!(q_norm_in.size(), [1, 4, s, 24]);
    assert_eq!(k_norm_out.size(), [1, 2, s, 24]);
    // Zero queries score every key alike (layer 2 is global).
    assert!(max_abs_diff(&probs, &uniform_causal_probs(4, s)) < 1e-6);
    let c = model.model().config();
    assert_eq!(
        (c.rope_global.rope_theta, c.rope_global.factor, c.rope_local.rope_theta),
        (Some(100.0), Some(4.0), Some(10000.0))
    );
    assert_eq!(
        (c.attention_softcap(), c.attn_logit_softcapping, c.final_logit_softcapping),
        (None, Some(5.0), Some(8.0))
    );
    Ok(())
}

#[test]
fn gemma3_rope_settings_of_both_kinds_of_layer_matter() -> nnsight::Result<()> {
    let reference = read_reference(&common::data("tiny-gemma3/reference.safetensors"));
    let edits: [(&str, Edit); 3] = [
        ("the global layer's scaling", |c| c["rope_parameters"]["full_attention"]["rope_type"] = "default".into()),
        ("the global base", |c| c["rope_parameters"]["full_attention"]["rope_theta"] = 10000.0.into()),
        ("the local base", |c| c["rope_parameters"]["sliding_attention"]["rope_theta"] = 100.0.into()),
    ];
    for (what, edit) in edits {
        let dir = with_config("tiny-gemma3", edit);
        let model = LanguageModel::<Gemma3>::load_with(dir.path(), common::opts())?;
        let d = max_abs_diff(&model.forward(P1)?.squeeze_dim(0), &reference["p1_logits"]);
        assert!(d > 1e-3, "changing {what} should change the logits, but they differ by {d} only");
    }
    Ok(())
}

/// Our reading of `dir/file` (a GGUF file written by make_tiny_models.py) against the checkpoint's logits and,
/// where there is one, transformers' own reading of the same file.
fn gguf_equals_the_checkpoint<M: nnsight::models::CausalLm>(dir: &str, file: &str, arch: &str) -> nnsight::Result<()> {
    let path = common::data(&format!("{dir}/{file}"));
    let model = LanguageModel::<M>::load_with(&path, common::opts())?;
    let reference = read_reference(&common::data(&format!("{dir}/reference.safetensors")));
    let theirs = common::data(&format!("{dir}/gguf_reference.safetensors"));
    let theirs = theirs.exists().then(|| read_reference(&theirs));
    for key in ["p1", "p2"] {
        let ids: Vec<i64> = Vec::<i64>::try_from(&reference[&format!("{key}_input_ids")]).unwrap();
        let logits = model.forward(ids)?.squeeze_dim(0);
        let d = max_abs_diff(&logits, &reference[&format!("{key}_logits")]);
        eprintln!("{dir} from GGUF {key}: max |logits - HF| = {d:.3e}");
        assert!(d < 1e-4, "{dir} {key}: {d}");
        if let Some(theirs) = &theirs {
            let d = max_abs_diff(&logits, &theirs[&format!("{key}_logits")]);
            eprintln!("{dir} from GGUF {key}: max |logits - transformers' GGUF reading| = {d:.3e}");
            assert!(d < 1e-4, "{dir} {key} vs transformers' GGUF reading: {d}");
        }
    }
    assert_eq!(model.encode(P1)?, Vec::<i64>::try_from(&reference["p1_input_ids"]).unwrap());
    let auto = LanguageModel::<AutoModel>::load_with(&path, common::opts())?;
    assert_eq!(auto.model().architecture(), arch);
    Ok(())
}

#[test]
fn tiny_gemma2_from_gguf_is_the_model_of_its_folder_and_of_transformers_reading() -> nnsight::Result<()> {
    gguf_equals_the_checkpoint::<Gemma2>("tiny-gemma2", "tiny-gemma2.f32.gguf", "gemma2")?;
    let model = LanguageModel::<Gemma2>::load_with(common::data("tiny-gemma2/tiny-gemma2.f32.gguf"), common::opts())?;
    let c = model.model().config();
    assert_eq!((c.head_dim, c.query_pre_attn_scalar, c.sliding_window), (Some(24), 256.0, Some(4)));
    assert_eq!((c.attn_logit_softcapping, c.final_logit_softcapping), (Some(50.0), Some(30.0)));
    Ok(())
}

#[test]
fn tiny_gemma3_from_gguf_is_the_model_of_its_folder() -> nnsight::Result<()> {
    gguf_equals_the_checkpoint::<Gemma3>("tiny-gemma3", "tiny-gemma3.f32.gguf", "gemma3")
}

#[test]
fn the_registry_finds_each_gemma_and_a_typed_load_refuses_the_other() -> nnsight::Result<()> {
    for (dir, arch) in [("tiny-gemma2", "gemma2"), ("tiny-gemma3", "gemma3")] {
        let auto = LanguageModel::<AutoModel>::load_with(common::data(dir), common::opts())?;
        assert_eq!(auto.model().architecture(), arch);
        let typed = LanguageModel::<Gemma2>::load_with(common::data(dir), common::opts()).map(|_| ());
        assert_eq!(typed.is_ok(), arch == "gemma2", "{dir}: {typed:?}");
    }
    let tree = load2().tree().to_string();
    for kind in [
        "Gemma2ForCausalLM(",
        "Gemma2Model(",
        "Gemma2DecoderLayer(",
        "Gemma2Attention(",
        "Gemma2MLP(",
        "GELUTanh",
        "Gemma2TextScaledWordEmbedding(512, 64)",
    ] {
        assert!(tree.contains(kind), "{kind} in {tree}");
    }
    assert!(tree.contains("(pre_feedforward_layernorm): Gemma2RMSNorm((64,), eps=0.000001)"), "{tree}");
    let tree = load3().tree().to_string();
    for kind in ["Gemma3ForCausalLM(", "Gemma3TextModel(", "Gemma3DecoderLayer(", "Gemma3Attention(", "Gemma3MLP("] {
        assert!(tree.contains(kind), "{kind} in {tree}");
    }
    assert!(tree.contains("(q_norm): Gemma3RMSNorm((24,), eps=0.000001)  <model.layers.0.self_attn.q_norm>"), "{tree}");
    Ok(())
}

#[test]
fn bad_gemma_configs_are_errors_naming_the_setting() {
    common::init();
    let cases: [(&str, Edit, &str); 5] = [
        ("tiny-gemma2", |c| c["hidden_activation"] = "swiglu".into(), "hidden_activation `swiglu`"),
        ("tiny-gemma2", |c| c["layer_types"] = serde_json::json!(["full_attention"]), "lists 1 layers"),
        ("tiny-gemma2", |c| c["final_logit_softcapping"] = 0.0.into(), "final_logit_softcapping"),
        ("tiny-gemma3", |c| c["use_bidirectional_attention"] = true.into(), "use_bidirectional_attention"),
        ("tiny-gemma3", |c| c["rope_parameters"]["full_attention"]["rope_type"] = "yarn".into(), "rope type `yarn`"),
    ];
    for (dir, edit, want) in cases {
        let tmp = with_config(dir, edit);
        let e = LanguageModel::<AutoModel>::load_with(tmp.path(), common::opts()).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("config.json"), "{dir}: {e}");
    }
}
