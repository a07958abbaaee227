//! The Qwen2 / Qwen2.5 and Qwen3 architectures on their tiny checkpoints (`scripts/make_tiny_models.py`):
//! parity with transformers (logits, blocks, attention probabilities, greedy continuations), and, per family, the
//! interventions every architecture supports: a write and a read of an MLP output, the `probs` point against a
//! plain hooked forward, a generation with an intervention at every step against solo traces, a gradient, a scan
//! against a trace, an edit against the same write in a trace. Qwen2's tiny model slides its attention over 4
//! keys in every layer; Qwen3's normalizes each query and key head (`q_norm`, `k_norm`).

use crate::common::{self, max_abs_diff, Recorder};
use nnsight::nn::Hook;
use nnsight::prelude::*;

const P1: &str = "The quick brown fox jumps over the lazy dog";
const P2: &str = "Hello world";

#[test]
fn tiny_qwen2_with_biases_untied_head_rope_theta_and_sliding_window_matches_transformers() {
    crate::tiny_models::check_against_reference::<Qwen2>("tiny-qwen2", "model.layers", "self_attn", 2);
}

#[test]
fn tiny_qwen3_with_qk_norms_attention_bias_head_dim_and_tied_head_matches_transformers() {
    crate::tiny_models::check_against_reference::<Qwen3>("tiny-qwen3", "model.layers", "self_attn", 2);
}

/// Multiplies `module`'s output by `factor` at every call: a write "by hand", without the intervention runtime.
pub(crate) struct Scale {
    pub(crate) module: &'static str,
    pub(crate) factor: f64,
}

impl Hook for Scale {
    fn input(&mut self, _: &str, x: Tensor) -> nnsight::Result<Tensor> {
        Ok(x)
    }
    fn output(&mut self, module: &str, y: Tensor) -> nnsight::Result<Tensor> {
        Ok(if module == self.module { y * self.factor } else { y })
    }
}

/// Whether every element of `t` is finite.
pub(crate) fn finite(t: &Tensor) -> bool {
    t.isfinite().all().int64_value(&[]) == 1
}

/// The attention sizes a family's config gives: `(heads, kv_heads, head_dim)`.
pub(crate) trait AttentionSizes {
    fn attention_sizes(&self) -> (i64, i64, i64);
}

impl AttentionSizes for Qwen2 {
    fn attention_sizes(&self) -> (i64, i64, i64) {
        let c = &self.config().llama;
        (
            c.num_attention_heads,
            c.num_key_value_heads.unwrap(),
            c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads),
        )
    }
}

impl AttentionSizes for Qwen3 {
    fn attention_sizes(&self) -> (i64, i64, i64) {
        let c = &self.config().llama;
        (
            c.num_attention_heads,
            c.num_key_value_heads.unwrap(),
            c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads),
        )
    }
}

/// The interventions of one family's tiny model `$dir` (a `LanguageModel<$model>`, whose `$model` implements
/// [`AttentionSizes`]), as a test module `$name`; a layer has `$modules` modules (13, Llama's layout, by default),
/// which the scan must all see.
macro_rules! family_interventions {
    ($name:ident, $model:ty, $dir:literal) => {
        family_interventions!($name, $model, $dir, 13);
    };
    ($name:ident, $model:ty, $dir:literal, $modules:literal) => {
        mod $name {
            use super::*;

            fn load() -> LanguageModel<$model> {
                LanguageModel::<$model>::load_with(common::data($dir), common::opts()).expect($dir)
            }

            #[test]
            fn an_mlp_write_changes_the_logits_as_the_same_write_by_hand() -> nnsight::Result<()> {
                let model = load();
                let plain = model.forward(P1)?;
                // A negative factor, so that a norm after the MLP (Gemma's post_feedforward_layernorm) cannot
                // undo it.
                intervene!(model.trace(P1) {
                    model.model.layers[0].mlp.output = model.model.layers[0].mlp.output * -0.25;
                    let mlp = model.model.layers[0].mlp.output.save();
                    let logits = model.output.save();
                });
                intervene!(model.trace(P1) {
                    let original = model.model.layers[0].mlp.output.save();
                });
                // The read after the write sees the written value.
                assert!(max_abs_diff(&mlp, &(&original * -0.25)) < 1e-6);
                assert!(original.abs().max().double_value(&[]) > 1e-2, "the MLP output is not trivially zero");
                let mut hook = Scale { module: "model.layers.0.mlp", factor: -0.25 };
                let by_hand = model.forward_with_hook(&model.batch(P1)?, &mut hook)?;
                assert_eq!(max_abs_diff(&logits, &by_hand), 0.0, "the write is the hook's");
                assert!(max_abs_diff(&logits, &plain) > 1e-3, "the write changes the logits");
                Ok(())
            }

            #[test]
            fn probs_saved_in_a_trace_equal_a_hooked_forwards() -> nnsight::Result<()> {
                let model = load();
                let plain = model.forward(P1)?;
                intervene!(model.trace(P1) {
                    // Layer 0's explicit attention too, as the hooked forward takes it in every layer.
                    let first = model.model.layers[0].self_attn.probs.output.save();
                    let query = model.model.layers[1].self_attn.query.output.save();
                    let key = model.model.layers[1].self_attn.key.output.save();
                    let probs = model.model.layers[1].self_attn.probs.output.save();
                    let logits = model.output.save();
                });
                let mut rec = Recorder { points: true, ..Recorder::default() };
                let _ = model.forward_with_hook(&model.batch(P1)?, &mut rec)?;
                let points = [("0.self_attn.probs", &first), ("1.self_attn.query", &query), ("1.self_attn.key", &key)];
                for (name, saved) in points.into_iter().chain([("1.self_attn.probs", &probs)]) {
                    let hooked = &rec.outputs[&format!("model.layers.{name}")];
                    assert_eq!(max_abs_diff(saved, hooked), 0.0, "{name}");
                }
                // Reading the points (explicit attention) keeps the fused path's logits.
                assert!(max_abs_diff(&logits, &plain) < 1e-4);
                let s = model.batch(P1)?.input_ids.size()[1];
                let (heads, kv_heads, hd) = crate::family_qwen::AttentionSizes::attention_sizes(model.model());
                assert_eq!(probs.size(), [1, heads, s, s]);
                assert_eq!(query.size(), [1, heads, s, hd]);
                assert_eq!(key.size(), [1, kv_heads, s, hd]);
                let sums = probs.sum_dim_intlist(-1, false, Kind::Float);
                assert!(max_abs_diff(&sums, &sums.ones_like()) < 1e-5, "rows sum to 1");
                Ok(())
            }

            #[test]
            fn a_generation_with_a_write_at_every_step_equals_solo_traces() -> nnsight::Result<()> {
                let model = load();
                let n = 6;
                let opts = GenerateOptions::new().max_new_tokens(n).stop_ids(vec![]);
                intervene!(model.generate(P2, &opts) {
                    let mut steps = Vec::new();
                    for _step in all() {
                        model.model.layers[1].mlp.output = model.model.layers[1].mlp.output * 0.5;
                        steps.push(model.lm_head.output[(.., -1, ..)].save());
                    }
                    let ids = model.generated().save();
                });
                let row = ids.row()?;
                let prompt = model.encode(P2)?.len();
                assert_eq!((steps.len(), row.len()), (n, prompt + n));
                for (k, step) in steps.iter().enumerate() {
                    // The same write over the whole sequence so far, in one forward without a cache.
                    let prefix = row[..prompt + k].to_vec();
                    intervene!(model.trace(prefix) {
                        model.model.layers[1].mlp.output = model.model.layers[1].mlp.output * 0.5;
                        let solo = model.lm_head.output[(.., -1, ..)].save();
                    });
                    let d = max_abs_diff(step, &solo);
                    assert!(d < 1e-4, "step {k}: cached step vs solo trace differ by {d}");
                    assert_eq!(step.argmax(-1, false).int64_value(&[0]), row[prompt + k], "step {k}'s token");
                }
                let unwritten = model.forward(P2)?.select(1, -1);
                assert!(max_abs_diff(&steps[0], &unwritten) > 1e-3, "the write changes the first step's logits");
                Ok(())
            }

            #[test]
            fn a_gradient_of_a_layer_output_is_finite_and_nonzero() -> nnsight::Result<()> {
                let model = load();
                intervene!(model.trace(P1) {
                    let h0 = model.model.layers[0].output;
                    let last = model.output[(.., -1, ..)];
                    let loss = (last.max() - last.mean()).save();
                    loss.backward();
                    let g0 = h0.grad.save();
                    let h = h0.save();
                });
                assert_eq!(g0.size(), h.size());
                assert!(finite(&g0), "the gradient is finite");
                assert!(g0.abs().max().double_value(&[]) > 1e-6, "the gradient is not zero");
                assert!(loss.double_value(&[]) > 0.0);
                Ok(())
            }

            #[test]
            fn a_scan_saves_the_shapes_a_trace_does() -> nnsight::Result<()> {
                let model = load();
                let entries = crate::scan::assert_scan_matches_trace(&model)?;
                assert!(entries > 2 * 2 * $modules, "{entries} entries");
                intervene!(model.trace([P1, P2]) {
                    let q = model.model.layers[0].self_attn.query.output.save();
                    let p = model.model.layers[1].self_attn.probs.output.save();
                    let z = model.model.layers[1].self_attn.head_output.output.save();
                });
                intervene!(model.scan([P1, P2]) {
                    let q_meta = model.model.layers[0].self_attn.query.output.save();
                    let p_meta = model.model.layers[1].self_attn.probs.output.save();
                    let z_meta = model.model.layers[1].self_attn.head_output.output.save();
                });
                for (t, s) in [(&q, &q_meta), (&p, &p_meta), (&z, &z_meta)] {
                    assert_eq!((t.size(), t.kind()), (s.size(), s.kind()));
                    assert!(nnsight::meta::is_meta(s) && !nnsight::meta::is_meta(t));
                }
                Ok(())
            }

            #[test]
            fn an_edit_gives_the_logits_of_the_same_write_in_a_trace() -> nnsight::Result<()> {
                let model = load();
                let plain = model.forward(P1)?;
                let edited = intervene!(model.edit() {
                    model.model.layers[1].self_attn.output = model.model.layers[1].self_attn.output * 0.0;
                });
                intervene!(model.trace(P1) {
                    model.model.layers[1].self_attn.output = model.model.layers[1].self_attn.output * 0.0;
                    let inline = model.output.save();
                });
                let by_edit = edited.forward(P1)?;
                assert!(by_edit.equal(&inline), "the edited forward is the trace's, bit for bit");
                assert!(max_abs_diff(&by_edit, &plain) > 1e-3, "the edit changes the logits");
                assert!(model.forward(P1)?.equal(&plain), "the model itself is untouched");
                Ok(())
            }
        }
    };
}

pub(crate) use family_interventions;

family_interventions!(qwen2, Qwen2, "tiny-qwen2");
family_interventions!(qwen3, Qwen3, "tiny-qwen3");

/// `[1, heads, s, s]` probabilities: zero wherever key `j` is not among the `window` keys up to query `i`.
pub(crate) fn zero_outside_window(p: &Tensor, window: i64) -> bool {
    let s = p.size()[3];
    let rows = Tensor::arange(s, (Kind::Int64, Device::Cpu)).view([s, 1]);
    let cols = Tensor::arange(s, (Kind::Int64, Device::Cpu)).view([1, s]);
    let outside = cols.gt_tensor(&rows).logical_or(&(&rows - &cols).ge(window));
    p.to_device(Device::Cpu).masked_select(&outside).abs().max().double_value(&[]) == 0.0
}

#[test]
fn qwen2_attends_within_its_sliding_window_in_a_trace_and_in_generation() -> nnsight::Result<()> {
    let model = LanguageModel::<Qwen2>::load_with(common::data("tiny-qwen2"), common::opts())?;
    let window = model.model().config().llama.sliding_window.expect("the tiny model has a window");
    assert_eq!((window, model.model().config().layer_windows()), (4, vec![Some(4), Some(4)]));
    intervene!(model.trace(P1) {
        let probs = model.model.layers[0].self_attn.probs.output.save();
    });
    assert!(probs.size()[3] > window, "the prompt is longer than the window");
    assert!(zero_outside_window(&probs, window));
    // The last query's row sees exactly the 4 latest keys (each gets some probability).
    let last = probs.select(2, -1).narrow(2, probs.size()[3] - window, window);
    assert!(last.gt(0.0).all().int64_value(&[]) == 1);
    // At a decode step (one query over the cache), keys beyond the window get nothing either.
    let opts = GenerateOptions::new().max_new_tokens(3).stop_ids(vec![]);
    intervene!(model.generate(P1, &opts) {
        let mut steps = Vec::new();
        for _ in iter(1..3) {
            steps.push(model.model.layers[1].self_attn.probs.output.save());
        }
    });
    for p in &steps {
        let k = p.size()[3];
        let (_, heads, q, _) = p.size4().unwrap();
        assert_eq!(q, 1);
        let old = p.narrow(3, 0, k - window);
        assert_eq!(old.abs().max().double_value(&[]), 0.0, "keys older than the window");
        let sums = p.sum_dim_intlist(-1, false, Kind::Float);
        assert!(max_abs_diff(&sums, &Tensor::ones([1, heads, 1], (Kind::Float, Device::Cpu))) < 1e-5);
    }
    Ok(())
}

/// `[1, heads, s, s]`: query `i` spreads 1 / (i + 1) over its causal keys, as queries that score every key alike.
pub(crate) fn uniform_causal_probs(heads: i64, s: i64) -> Tensor {
    let i = Tensor::arange(s, (Kind::Float, Device::Cpu)).view([1, 1, s, 1]);
    let uniform = Tensor::ones([s, s], (Kind::Float, Device::Cpu)).tril(0).view([1, 1, s, s]) / (i + 1.0);
    uniform.expand([1, heads, s, s], false)
}

#[test]
fn qwen3_q_norm_feeds_the_queries() -> nnsight::Result<()> {
    let model = LanguageModel::<Qwen3>::load_with(common::data("tiny-qwen3"), common::opts())?;
    let s = model.batch(P1)?.input_ids.size()[1];
    intervene!(model.trace(P1) {
        let attn = &model.model.layers[0].self_attn;
        let q_norm_in = attn.q_norm.input.save();
        attn.q_norm.output = attn.q_norm.output * 0.0;
        let k_norm_out = attn.k_norm.output.save();
        let probs = attn.probs.output.save();
    });
    // Per head, before the rotation: [batch, seq, heads, head_dim] (head_dim 32 in this config, not 64 / 4).
    assert_eq!(q_norm_in.size(), [1, s, 4, 32]);
    assert_eq!(k_norm_out.size(), [1, s, 2, 32]);
    // Zero queries (rotated, still zero) score every key alike.
    let d = max_abs_diff(&probs, &uniform_causal_probs(4, s));
    assert!(d < 1e-6, "zeroed queries: probabilities are not uniform over the causal keys ({d})");
    Ok(())
}

#[test]
fn tiny_qwen3_from_gguf_is_the_model_of_its_folder() -> nnsight::Result<()> {
    // Written by make_tiny_models.py with the gguf package's writer and llama.cpp's tensor names (float32).
    let path = common::data("tiny-qwen3/tiny-qwen3.f32.gguf");
    let model = LanguageModel::<Qwen3>::load_with(&path, common::opts())?;
    let c = &model.model().config().llama;
    assert_eq!((c.head_dim, c.attention_bias, c.tie_word_embeddings), (Some(32), true, true));
    let reference = common::read_reference(&common::data("tiny-qwen3/reference.safetensors"));
    for key in ["p1", "p2"] {
        let ids: Vec<i64> = Vec::<i64>::try_from(&reference[&format!("{key}_input_ids")]).unwrap();
        let logits = model.forward(ids)?.squeeze_dim(0);
        let d = max_abs_diff(&logits, &reference[&format!("{key}_logits")]);
        eprintln!("tiny-qwen3 from GGUF {key}: max |logits - HF| = {d:.3e}");
        assert!(d < 1e-4, "{key}: {d}");
    }
    // The tokenizer rebuilt from the GGUF metadata encodes as tokenizer.json does.
    assert_eq!(model.encode(P1)?, Vec::<i64>::try_from(&reference["p1_input_ids"]).unwrap());
    let auto = LanguageModel::<AutoModel>::load_with(&path, common::opts())?;
    assert_eq!(auto.model().architecture(), "qwen3");
    Ok(())
}

#[test]
fn tiny_qwen2_from_gguf_equals_transformers_own_reading_of_that_file() -> nnsight::Result<()> {
    // llama.cpp's qwen2 keeps no sliding window, so the file attends to every key, as transformers' own GGUF
    // loading of it does (gguf_reference.safetensors); P2 (3 tokens) is shorter than the folder's window of 4.
    let model = LanguageModel::<Qwen2>::load_with(common::data("tiny-qwen2/tiny-qwen2.f32.gguf"), common::opts())?;
    let reference = common::read_reference(&common::data("tiny-qwen2/reference.safetensors"));
    let hf_gguf = common::read_reference(&common::data("tiny-qwen2/gguf_reference.safetensors"));
    for key in ["p1", "p2"] {
        let ids: Vec<i64> = Vec::<i64>::try_from(&reference[&format!("{key}_input_ids")]).unwrap();
        let logits = model.forward(ids)?.squeeze_dim(0);
        let d = max_abs_diff(&logits, &hf_gguf[&format!("{key}_logits")]);
        eprintln!("tiny-qwen2 from GGUF {key}: max |logits - transformers' GGUF reading| = {d:.3e}");
        assert!(d < 1e-4, "{key}: {d}");
    }
    let d = max_abs_diff(&model.forward(P2)?.squeeze_dim(0), &reference["p2_logits"]);
    assert!(d < 1e-4, "P2 from GGUF against the folder's reference: {d}");
    let d = max_abs_diff(&model.forward(P1)?.squeeze_dim(0), &reference["p1_logits"]);
    assert!(d > 1e-2, "P1 is longer than the folder's window, so the file (no window) must differ: {d}");
    Ok(())
}

#[test]
fn the_registry_finds_each_family_and_a_typed_load_refuses_the_other() -> nnsight::Result<()> {
    for (dir, arch) in [("tiny-qwen2", "qwen2"), ("tiny-qwen3", "qwen3")] {
        let auto = LanguageModel::<AutoModel>::load_with(common::data(dir), common::opts())?;
        assert_eq!(auto.model().architecture(), arch);
    }
    let loaded = LanguageModel::<Qwen2>::load_with(common::data("tiny-qwen3"), common::opts());
    assert!(matches!(loaded, Err(nnsight::Error::WrongArchitecture { .. })), "a Qwen3 checkpoint is not a Qwen2");
    let qwen2 = LanguageModel::<Qwen2>::load_with(common::data("tiny-qwen2"), common::opts())?.tree().to_string();
    for kind in ["Qwen2ForCausalLM(", "Qwen2Model(", "Qwen2DecoderLayer(", "Qwen2Attention(", "Qwen2MLP("] {
        assert!(qwen2.contains(kind), "{kind} in {qwen2}");
    }
    let model = LanguageModel::<Qwen3>::load_with(common::data("tiny-qwen3"), common::opts())?;
    let tree = model.tree().to_string();
    for kind in ["Qwen3ForCausalLM(", "Qwen3Model(", "Qwen3DecoderLayer(", "Qwen3Attention(", "Qwen3MLP("] {
        assert!(tree.contains(kind), "{kind} in {tree}");
    }
    assert!(tree.contains("(q_norm): RMSNorm((32,), eps=0.00001)  <model.layers.0.self_attn.q_norm>"), "{tree}");
    Ok(())
}

#[test]
fn qwen2_with_a_window_on_some_layers_slides_only_those_in_a_trace_and_in_generation() -> nnsight::Result<()> {
    // tiny-qwen2's weights with layer 0 attending to every earlier key and layer 1 within its window of 4.
    let dir = crate::family_neox::with_config("tiny-qwen2", |c| {
        c["layer_types"] = serde_json::json!(["full_attention", "sliding_attention"]);
    });
    let model = LanguageModel::<Qwen2>::load_with(dir.path(), common::opts())?;
    assert_eq!(model.model().config().layer_windows(), [None, Some(4)]);
    intervene!(model.trace(P1) {
        let full = model.model.layers[0].self_attn.probs.output.save();
        let sliding = model.model.layers[1].self_attn.probs.output.save();
    });
    assert!(zero_outside_window(&sliding, 4));
    assert!(!zero_outside_window(&full, 4), "the full layer attends beyond the window");
    let every_layer_slides = LanguageModel::<Qwen2>::load_with(common::data("tiny-qwen2"), common::opts())?;
    assert!(max_abs_diff(&model.forward(P1)?, &every_layer_slides.forward(P1)?) > 1e-3);
    // Cached generation, each layer with its mask at every step, batched with left padding: the greedy
    // continuation of full re-forwards.
    let n = 8;
    let cached = model.generate([P1, P2], &GenerateOptions::new().max_new_tokens(n).stop_ids(vec![]))?;
    for (row, prompt) in [P1, P2].iter().enumerate() {
        let mut ids = model.encode(prompt)?;
        for _ in 0..n {
            ids.push(model.forward(ids.clone())?.select(1, -1).argmax(-1, false).int64_value(&[0]));
        }
        assert_eq!(cached.rows[row].new_ids, ids[ids.len() - n..], "row {row}");
    }
    Ok(())
}
