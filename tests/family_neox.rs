//! GPT-NeoX / Pythia: the tiny checkpoints against transformers (Pythia's layout with the parallel residual, and a
//! sequential variant), older and newer config keys, the GGUF llama.cpp would write, and the interventions of the
//! other families on it: writes and reads, attention probabilities, generation, gradients, scans, edits.

use crate::common::{self, max_abs_diff, read_reference, Recorder};
use crate::tiny_models::check_against_reference;
use nnsight::nn::Hook;
use nnsight::prelude::*;

const PYTHIA: &str = "tiny-gpt-neox";
const SEQUENTIAL: &str = "tiny-gpt-neox-sequential";
const P1: &str = "The quick brown fox jumps over the lazy dog";

fn load(dir: &str) -> LanguageModel<GptNeoX> {
    LanguageModel::<GptNeoX>::load_with(common::data(dir), common::opts()).expect("load a tiny GPT-NeoX")
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions::new().max_new_tokens(n).stop_ids([])
}

/// A plain hook that replaces `module`'s output (or inner point) by `f` of it at every call.
struct MapOutput<F: FnMut(Tensor) -> Tensor> {
    module: &'static str,
    f: F,
    calls: usize,
}

impl<F: FnMut(Tensor) -> Tensor> Hook for MapOutput<F> {
    fn input(&mut self, _: &str, x: Tensor) -> nnsight::Result<Tensor> {
        Ok(x)
    }
    fn output(&mut self, module: &str, y: Tensor) -> nnsight::Result<Tensor> {
        if module == self.module {
            self.calls += 1;
            return Ok((self.f)(y));
        }
        Ok(y)
    }
    fn wants_points(&mut self, module: &str, _: &[&str]) -> bool {
        self.module.strip_prefix(module).is_some_and(|point| point.starts_with('.'))
    }
}

/// A copy of a tiny checkpoint's folder whose config.json is `edit`ed.
pub(crate) fn with_config(dir: &str, edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(common::data(dir).join(f), tmp.path().join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::data(dir).join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
    tmp
}

#[test]
fn tiny_pythia_with_parallel_residual_and_quarter_rotary_matches_transformers() {
    check_against_reference::<GptNeoX>(PYTHIA, "gpt_neox.layers", "attention", 2);
    let model = load(PYTHIA);
    let tree = model.tree().to_string();
    assert!(tree.starts_with("GPTNeoXForCausalLM("), "{tree}");
    for path in ["<gpt_neox.layers.0.attention.query_key_value>", "<gpt_neox.layers.0.mlp.act>", "<embed_out>"] {
        assert!(tree.contains(path), "{path} missing from {tree}");
    }
    assert_eq!(
        LanguageModel::<AutoModel>::load_with(common::data(PYTHIA), common::opts()).unwrap().model().architecture(),
        "gpt_neox"
    );
}

#[test]
fn tiny_gpt_neox_sequential_gelu_fast_half_rotary_tied_matches_transformers() {
    check_against_reference::<GptNeoX>(SEQUENTIAL, "gpt_neox.layers", "attention", 2);
}

#[test]
fn older_config_keys_load_the_same_model_and_each_setting_matters() {
    common::init();
    let reference = read_reference(&common::data(&format!("{PYTHIA}/reference.safetensors")));
    let want = &reference["p1_logits"];
    let logits = |tmp: &tempfile::TempDir| {
        let model = LanguageModel::<GptNeoX>::load_with(tmp.path(), common::opts()).unwrap();
        model.forward(P1).unwrap().squeeze_dim(0)
    };
    // Pythia's config.json as the Hub has it: `rotary_pct` and `rotary_emb_base`, no `rope_parameters`.
    let old = with_config(PYTHIA, |c| {
        c.as_object_mut().unwrap().remove("rope_parameters");
        c["rotary_pct"] = 0.25.into();
        c["rotary_emb_base"] = 10000.0.into();
    });
    let d = max_abs_diff(&logits(&old), want);
    assert!(d < 1e-4, "older config keys: logits differ from transformers' by {d}");
    // transformers' default rotary fraction is 0.25 too.
    let bare = with_config(PYTHIA, |c| {
        c.as_object_mut().unwrap().remove("rope_parameters");
    });
    assert!(max_abs_diff(&logits(&bare), want) < 1e-4);
    // Each setting changes the output: the rotary fraction, the base, the residual layout.
    for (what, key, value) in [
        ("rotary fraction", "partial_rotary_factor", serde_json::json!(1.0)),
        ("rotary base", "rope_theta", serde_json::json!(10.0)),
    ] {
        let tmp = with_config(PYTHIA, |c| c["rope_parameters"][key] = value.clone());
        let d = max_abs_diff(&logits(&tmp), want);
        assert!(d > 1e-3, "the {what} should matter, but the logits moved by only {d}");
    }
    let tmp = with_config(PYTHIA, |c| c["use_parallel_residual"] = false.into());
    assert!(max_abs_diff(&logits(&tmp), want) > 1e-2, "the residual layout should matter");
    // Pythia's checkpoints carry each layer's causal-mask buffers and the head under either name.
    let hub = with_config(PYTHIA, |_| {});
    let file = hub.path().join("model.safetensors");
    let mut tensors = Tensor::read_safetensors(&file).unwrap();
    for (name, _) in tensors.iter_mut().filter(|(n, _)| n == "embed_out.weight") {
        *name = "lm_head.weight".into();
    }
    tensors.push(("gpt_neox.layers.0.attention.bias".into(), Tensor::ones([1, 1, 8, 8], (Kind::Bool, Device::Cpu))));
    tensors.push(("gpt_neox.layers.1.attention.masked_bias".into(), Tensor::from(-1e9f32)));
    tensors.push((
        "gpt_neox.layers.1.attention.rotary_emb.inv_freq".into(),
        Tensor::ones([2], (Kind::Float, Device::Cpu)),
    ));
    Tensor::write_safetensors(&tensors, &file).unwrap();
    assert!(max_abs_diff(&logits(&hub), want) < 1e-4);
    let tmp = with_config(PYTHIA, |c| c["hidden_act"] = "swiglu".into());
    let err = LanguageModel::<GptNeoX>::load_with(tmp.path(), common::opts()).err().unwrap().to_string();
    assert!(err.contains("hidden_act `swiglu` is not supported"), "{err}");
}

#[test]
fn the_gguf_llama_cpp_would_write_loads_equal_to_the_checkpoint() -> nnsight::Result<()> {
    let hf = load(PYTHIA);
    let gguf =
        LanguageModel::<GptNeoX>::load_with(common::data(&format!("{PYTHIA}/{PYTHIA}.f32.gguf")), common::opts())?;
    assert_eq!(gguf.encode(P1)?, hf.encode(P1)?, "the tokenizer rebuilt from the GGUF metadata");
    let (a, b) = (nnsight::nn::named_parameters(hf.model()), nnsight::nn::named_parameters(gguf.model()));
    assert_eq!(a.iter().map(|p| &p.0).collect::<Vec<_>>(), b.iter().map(|p| &p.0).collect::<Vec<_>>());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x.equal(y), "{name} differs between the GGUF and the checkpoint");
    }
    let c = gguf.model().config();
    assert_eq!((c.use_parallel_residual, c.layer_norm_eps, c.tie_word_embeddings), (true, 1e-5, false));
    assert_eq!(max_abs_diff(&gguf.forward(P1)?, &hf.forward(P1)?), 0.0);
    let auto =
        LanguageModel::<AutoModel>::load_with(common::data(&format!("{PYTHIA}/{PYTHIA}.f32.gguf")), common::opts())?;
    assert_eq!(auto.model().architecture(), "gpt_neox");
    Ok(())
}

#[test]
fn an_mlp_write_changes_the_logits_and_reads_see_it() -> nnsight::Result<()> {
    let model = load(PYTHIA);
    let plain = model.forward(P1)?;
    intervene!(model.trace(P1) {
        let input = model.gpt_neox.layers[0].input.save();
        let attn = model.gpt_neox.layers[0].attention.output.save();
        model.gpt_neox.layers[0].mlp.output = model.gpt_neox.layers[0].mlp.output * 0.0;
        let mlp = model.gpt_neox.layers[0].mlp.output.save();
        let out = model.gpt_neox.layers[0].output.save();
        let logits = model.output.save();
    });
    assert_eq!(mlp.abs().max().double_value(&[]), 0.0, "the read after the write sees the write");
    // Parallel residual: without the MLP, the layer adds only the attention output to its input.
    let d = max_abs_diff(&out, &(&input + &attn));
    assert!(d < 1e-5, "layer 0 output differs from input + attention by {d}");
    let d = max_abs_diff(&logits, &plain);
    assert!(d > 1e-2, "zeroing an MLP should change the logits, changed by {d}");
    Ok(())
}

#[test]
fn saved_attention_probs_equal_those_a_plain_hook_sees() -> nnsight::Result<()> {
    for dir in [PYTHIA, SEQUENTIAL] {
        let model = load(dir);
        let prompts = [P1, "Hello world"];
        intervene!(model.trace(prompts) {
            let p0 = model.gpt_neox.layers[0].attention.probs.output.save();
            let p1 = model.gpt_neox.layers[1].attention.probs.output.save();
        });
        let mut rec = Recorder { points: true, ..Recorder::default() };
        let _ = model.forward_with_hook(&model.batch(prompts)?, &mut rec)?;
        assert_eq!(max_abs_diff(&p0, &rec.outputs["gpt_neox.layers.0.attention.probs"]), 0.0, "{dir}");
        assert_eq!(max_abs_diff(&p1, &rec.outputs["gpt_neox.layers.1.attention.probs"]), 0.0, "{dir}");
        let (b, s) = (2, model.batch(prompts)?.input_ids.size()[1]);
        assert_eq!(p1.size(), [b, 4, s, s]);
        let sums = p1.sum_dim_intlist(-1, false, Kind::Double);
        assert!(max_abs_diff(&sums, &sums.ones_like()) < 1e-5, "{dir}: each row of probabilities sums to 1");
        // The second row is left-padded: its tokens put no probability on its padding.
        let pad = s - model.encode("Hello world")?.len() as i64;
        let on_padding = p1.get(1).narrow(1, pad, s - pad).narrow(2, 0, pad);
        assert!(pad > 0 && on_padding.abs().max().double_value(&[]) == 0.0, "{dir}");
    }
    Ok(())
}

#[test]
fn an_intervention_at_every_generation_step_equals_the_same_hook() -> nnsight::Result<()> {
    let model = load(PYTHIA);
    let opts = greedy(8);
    intervene!(model.generate(P1, &opts) {
        for _ in all() {
            model.gpt_neox.layers[1].mlp.output = model.gpt_neox.layers[1].mlp.output * 0.0;
        }
        let ids = model.generated().save();
    });
    let mut hook = MapOutput { module: "gpt_neox.layers.1.mlp", f: |y: Tensor| y * 0.0, calls: 0 };
    let by_hand = model.generate_hooked(&model.batch(P1)?, &opts, &mut hook, &mut |_| Ok(()))?;
    assert_eq!(hook.calls, 8, "one forward per new token");
    assert_eq!(ids.rows[0], by_hand.rows[0].ids());
    let plain = model.generate(P1, &opts)?;
    assert_ne!(ids.rows[0], plain.rows[0].ids(), "the ablation changes the continuation");

    // A write to the keys goes into the KV cache: the same at every step, by intervention and by hook.
    intervene!(model.generate(P1, &opts) {
        for _ in all() {
            model.gpt_neox.layers[0].attention.key.output = model.gpt_neox.layers[0].attention.key.output * 3.0;
        }
        let ids = model.generated().save();
    });
    let mut hook = MapOutput { module: "gpt_neox.layers.0.attention.key", f: |k: Tensor| k * 3.0, calls: 0 };
    let by_hand = model.generate_hooked(&model.batch(P1)?, &opts, &mut hook, &mut |_| Ok(()))?;
    assert_eq!(hook.calls, 8);
    assert_eq!(ids.rows[0], by_hand.rows[0].ids());
    assert_ne!(ids.rows[0], plain.rows[0].ids(), "scaled keys change the continuation");
    Ok(())
}

#[test]
fn gradients_of_a_layer_output_are_finite_nonzero_and_agree_with_finite_differences() -> nnsight::Result<()> {
    let model = load(PYTHIA);
    intervene!(model.trace(P1) {
        let h0 = model.gpt_neox.layers[0].output;
        let last = model.output[(.., -1, ..)];
        let loss = (last.max() - last.mean()).save();
        loss.backward();
        let g0 = h0.grad.save();
    });
    let s = model.encode(P1)?.len() as i64;
    assert_eq!(g0.size(), [1, s, 64]);
    assert_eq!(g0.isfinite().all().int64_value(&[]), 1, "the gradient is finite");
    let g = g0.to_kind(Kind::Double);
    assert!(g.abs().sum(Kind::Double).double_value(&[]) > 0.0, "the gradient is nonzero");
    // Central differences along the gradient: (L(h + eps d) - L(h - eps d)) / 2 eps = <g, d>.
    let d = &g / g.norm();
    let eps = 1e-2;
    let loss_at = |delta: Tensor| -> nnsight::Result<f64> {
        let delta = delta.to_kind(Kind::Float);
        let mut hook = MapOutput { module: "gpt_neox.layers.0", f: |y: Tensor| y + &delta, calls: 0 };
        let logits = model.forward_with_hook(&model.batch(P1)?, &mut hook)?;
        let last = logits.select(1, -1);
        Ok((last.max() - last.mean(Kind::Float)).double_value(&[]))
    };
    let numeric = (loss_at(&d * eps)? - loss_at(&d * -eps)?) / (2.0 * eps);
    let analytic = (&g * &d).sum(Kind::Double).double_value(&[]);
    assert!((numeric - analytic).abs() < 1e-2 * analytic.abs().max(1.0), "numeric {numeric} analytic {analytic}");
    assert!((loss_at(g.zeros_like())? - loss.double_value(&[])).abs() < 1e-5);
    Ok(())
}

#[test]
fn scanned_shapes_equal_traced_shapes_for_every_module() -> nnsight::Result<()> {
    for dir in [PYTHIA, SEQUENTIAL] {
        let n = crate::scan::assert_scan_matches_trace(&load(dir))?;
        // embed, 2 x (layer, 2 norms, attention + 2 projections, mlp + 2 projections + act), final norm, stack,
        // head, root: inputs and outputs.
        assert!(n >= 2 * (2 * 10 + 5), "{dir}: {n} entries");
    }
    let model = load(PYTHIA);
    intervene!(model.scan(P1) {
        let q = model.gpt_neox.layers[0].attention.query.output.save();
        let p = model.gpt_neox.layers[1].attention.probs.output.save();
    });
    intervene!(model.trace(P1) {
        let tq = model.gpt_neox.layers[0].attention.query.output.save();
        let tp = model.gpt_neox.layers[1].attention.probs.output.save();
    });
    assert_eq!((q.size(), p.size()), (tq.size(), tp.size()));
    Ok(())
}

#[test]
fn an_edit_gives_the_logits_of_the_same_write_in_a_trace() -> nnsight::Result<()> {
    let model = load(SEQUENTIAL);
    let plain = model.forward(P1)?;
    let edited = intervene!(model.edit() {
        model.gpt_neox.layers[0].attention.output = model.gpt_neox.layers[0].attention.output * 0.5;
    });
    intervene!(model.trace(P1) {
        model.gpt_neox.layers[0].attention.output = model.gpt_neox.layers[0].attention.output * 0.5;
        let inline = model.embed_out.output.save();
    });
    let by_edit = edited.forward(P1)?;
    assert!(by_edit.equal(&inline), "edited forward = the write in a trace");
    assert!(max_abs_diff(&by_edit, &plain) > 1e-3, "the edit changes the output");
    assert!(model.forward(P1)?.equal(&plain), "the model itself is untouched");
    Ok(())
}
