//! SmolLM2-135M (the default GGUF) against Hugging Face transformers: token ids, every decoder layer's output,
//! top-5 next tokens, greedy decoding, batched forward. Reference values in tests/data/smollm2 were measured with
//! transformers 5.24.0 on torch 2.13.0 (float32, CPU).

use crate::common::{self, excess, max_abs_diff, read_reference, Recorder};
use nnsight::prelude::*;

const EIFFEL: &str = "The Eiffel Tower is in the city of";

fn reference_json() -> serde_json::Value {
    let text = std::fs::read_to_string(common::data("smollm2/reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

#[test]
fn token_ids_equal_reference() {
    let model = common::smollm2();
    let reference = reference_json();
    assert_eq!(model.encode(EIFFEL).unwrap(), ids_of(&reference["prompt"]["ids"]));
    assert_eq!(
        model.encode("The Colosseum is in the city of").unwrap(),
        ids_of(&reference["second_prompt_same_length"]["ids"])
    );
}

#[test]
fn every_layer_output_matches_reference() {
    let model = common::smollm2();
    let reference = read_reference(&common::data("smollm2/eiffel_activations.safetensors"));
    let batch = model.batch(EIFFEL).unwrap();
    let mut rec = Recorder::default();
    let _ = model.forward_with_hook(&batch, &mut rec).unwrap();

    // Elementwise |ours - ref| <= 1e-3 + 1e-4 |ref| (hidden units reach 22 000, where float32 holds ~2e-3).
    let (atol, rtol) = (1e-3, 1e-4);
    let embed = rec.outputs["model.embed_tokens"].squeeze_dim(0);
    let e = excess(&embed, &reference["embed_tokens_output"], atol, rtol);
    assert!(e <= 0.0, "embed_tokens output off by {e} beyond tolerance");
    let layers = &reference["layer_outputs"];
    let mut worst = Vec::new();
    for i in 0..30 {
        let ours = rec.outputs[&format!("model.layers.{i}")].squeeze_dim(0);
        let theirs = layers.get(i);
        let diff = max_abs_diff(&ours, &theirs);
        worst.push(diff);
        eprintln!("layer {i:2}: worst |diff| {diff:.3e} (max |ref| {:.1})", theirs.abs().max().double_value(&[]));
        let e = excess(&ours, &theirs, atol, rtol);
        assert!(e <= 0.0, "layer {i} output exceeds tolerance by {e} (worst |diff| {diff:.3e})");
    }
    let norm = rec.outputs["model.norm"].squeeze_dim(0);
    let e = excess(&norm, &reference["final_norm_output"], atol, rtol);
    assert!(e <= 0.0, "final norm output exceeds tolerance by {e}");
    let logits = rec.outputs["lm_head"].get(0).get(-1);
    let d = max_abs_diff(&logits, &reference["logits_last_pos"]);
    eprintln!("last-position logits: worst |diff| {d:.3e}");
    assert!(d < 1e-3, "last-position logits differ by {d}");
}

#[test]
fn top5_next_tokens_match_reference() {
    let model = common::smollm2();
    let reference = reference_json();
    let logits = model.forward(EIFFEL).unwrap();
    assert_eq!(logits.size(), vec![1, 9, 49152]);
    let probs = logits.get(0).get(-1).softmax(-1, Kind::Double);
    let (p, ids) = probs.topk(5, -1, true, true);
    for (k, want) in reference["next_token_top5"].as_array().unwrap().iter().enumerate() {
        let id = ids.int64_value(&[k as i64]);
        assert_eq!(id, want["id"].as_i64().unwrap(), "top-{k} id");
        let diff = (p.double_value(&[k as i64]) - want["prob"].as_f64().unwrap()).abs();
        assert!(diff < 1e-4, "top-{k} probability differs by {diff}");
    }
    assert_eq!(model.decode(&[ids.int64_value(&[0])]).unwrap(), " Paris");
}

#[test]
fn greedy_decoding_of_ten_tokens_matches_reference() {
    let model = common::smollm2();
    let reference = reference_json();
    let mut ids = model.encode(EIFFEL).unwrap();
    let prompt_len = ids.len();
    for _ in 0..10 {
        let logits = model.forward(ids.clone()).unwrap();
        ids.push(logits.get(0).get(-1).argmax(-1, false).int64_value(&[]));
    }
    let new = &ids[prompt_len..];
    assert_eq!(new, ids_of(&reference["greedy_generation_10"]["new_ids"]).as_slice());
    assert_eq!(model.decode(new).unwrap(), reference["greedy_generation_10"]["new_text"].as_str().unwrap());
}

#[test]
fn batched_prompts_of_unequal_length_equal_their_solo_runs() {
    let model = common::smollm2();
    let prompts = [EIFFEL, "Madrid is the capital of"];
    let batch = model.batch(prompts).unwrap();
    assert!(batch.padded, "the prompts should have different lengths");
    let logits = model.forward_batch(&batch).unwrap();
    for (row, prompt) in prompts.iter().enumerate() {
        let solo = model.forward(*prompt).unwrap();
        let d = max_abs_diff(&logits.get(row as i64).get(-1), &solo.get(0).get(-1));
        eprintln!("row {row} ({prompt:?}): last-token logits max |batched - solo| = {d:.3e}");
        assert!(d < 1e-3, "row {row} differs from its solo run by {d}");
        // Every real position, not only the last.
        let n = batch.lengths[row] as i64;
        let seq = logits.size()[1];
        let d_all = max_abs_diff(&logits.get(row as i64).narrow(0, seq - n, n), &solo.get(0));
        assert!(d_all < 1e-3, "row {row}, all positions: {d_all}");
    }
}

#[test]
fn every_submodule_call_goes_through_the_hook() {
    let model = common::smollm2();
    let batch = model.batch(EIFFEL).unwrap();
    let mut rec = Recorder::default();
    let _ = model.forward_with_hook(&batch, &mut rec).unwrap();
    // Per layer: layer, input_layernorm, self_attn, q/k/v/o, post_attention_layernorm, mlp, gate, act_fn, up,
    // down = 13; plus embed_tokens, model, norm, lm_head and the root.
    assert_eq!(rec.order.len(), 30 * 13 + 5);
    // Forward order: a module's output is recorded after all its submodules'.
    let pos = |p: &str| rec.order.iter().position(|x| x == p).unwrap();
    assert!(pos("model.layers.3.self_attn.q_proj") < pos("model.layers.3.self_attn"));
    assert!(pos("model.layers.3") < pos("model.layers.4.input_layernorm"));
    assert_eq!(rec.order.last().unwrap(), "");
    // Every module with parameters in the tree was called.
    for (name, _) in nnsight::nn::named_parameters(model.model()) {
        let module = name.rsplit_once('.').unwrap().0;
        assert!(rec.outputs.contains_key(module), "{module} was not called through the hook");
    }
}

/// Gradients against torch autograd through transformers' SmolLM2 (`scripts/peer/hf_grad.py` wrote the reference):
/// d logit(" Paris") / d (layers 5, 15, 25 outputs) and / d `model.layers.5.mlp.down_proj.weight`, and layer 5's
/// gradient again with layer 15's doubled on its way back.
#[test]
fn gradients_match_torch_autograd_through_transformers() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    let reference = read_reference(&common::data("smollm2/eiffel_gradients.safetensors"));
    let paris = model.encode(" Paris")?[0];
    intervene!(model.trace(EIFFEL) {
        let h5 = model.model.layers[5].output;
        let h15 = model.model.layers[15].output;
        let h25 = model.model.layers[25].output;
        let loss = model.lm_head.output[(.., -1, ..)].select(-1, paris).sum();
        let value = loss.save();
        loss.backward();
        let g25 = h25.grad.save();
        let g15 = h15.grad.save();
        let gw = model.model.layers[5].mlp.down_proj.weight.grad.save();
        let g5 = h5.grad.save();
    });
    assert!((value.double_value(&[]) - reference["loss"].double_value(&[0])).abs() < 1e-3);
    let theirs = &reference["layer_output_grads"];
    // Relative to each gradient's scale: |ours - theirs| <= 1e-4 * max|theirs| + 1e-4 * |theirs| (measured: within
    // 1.2e-6 to 5.6e-6 of the scale).
    for (k, ours) in [g5, g15, g25].iter().enumerate() {
        let t = theirs.get(k as i64);
        let scale = t.abs().max().double_value(&[]);
        let e = excess(&ours.squeeze_dim(0), &t, 1e-4 * scale, 1e-4);
        assert!(e <= 0.0, "layer {}: gradient off by {e} beyond tolerance (scale {scale})", [5, 15, 25][k]);
    }
    let rows = &reference["down_proj_5_grad_rows"];
    let scale = rows.abs().max().double_value(&[]);
    assert!(excess(&gw.narrow(0, 0, 4), rows, 1e-4 * scale, 1e-4) <= 0.0);
    let norm = gw.norm().double_value(&[]);
    assert!((norm / reference["down_proj_5_grad_norm"].double_value(&[0]) - 1.0).abs() < 1e-3, "norm {norm}");

    // With layer 15's gradient doubled on its way back (Python nnsight's `h.grad = h.grad * 2`).
    intervene!(model.trace(EIFFEL) {
        let h5 = model.model.layers[5].output;
        let h15 = model.model.layers[15].output;
        model.lm_head.output[(.., -1, ..)].select(-1, paris).sum().backward();
        h15.grad *= 2.0;
        let d5 = h5.grad.save();
    });
    let t = &reference["doubled_layer_5_grad"];
    let scale = t.abs().max().double_value(&[]);
    assert!(excess(&d5.squeeze_dim(0), t, 1e-4 * scale, 1e-4) <= 0.0);
    Ok(())
}

/// bfloat16 on the CPU against transformers' bfloat16 forward of the same GGUF (`scripts/peer/hf_bf16_reference.py`):
/// the same top token at every position, the same 10-token greedy continuation (KV cache), and the last
/// position's logits within 0.125, two bfloat16 steps at their scale (8 bits of mantissa: logits near 14 are 0.0625
/// apart). Measured: 0, as both run the same libtorch bfloat16 kernels in the same order; float32 against either
/// is off by 0.5, so the tolerance would catch a step computed in another precision.
#[test]
fn bfloat16_on_the_cpu_matches_transformers_in_bfloat16() -> nnsight::Result<()> {
    common::init();
    let opts = LoadOptions::default().progress(false).device(common::device()).kind(Kind::BFloat16);
    let model = LanguageModel::<Llama>::load_with(common::smollm2_path(), opts)?;
    let reference = read_reference(&common::data("smollm2/bf16_reference.safetensors"));
    let greedy = GenerateOptions::new().max_new_tokens(10).stop_ids(vec![]);
    for key in ["eiffel", "colosseum"] {
        let ids = Vec::<i64>::try_from(&reference[&format!("{key}_input_ids")]).unwrap();
        let logits = model.forward(ids.clone())?.squeeze_dim(0);
        assert_eq!(logits.kind(), Kind::BFloat16, "the model computes in bfloat16");
        let logits = logits.to_kind(Kind::Float).to_device(Device::Cpu);
        let argmax = Vec::<i64>::try_from(&logits.argmax(-1, false)).unwrap();
        assert_eq!(argmax, Vec::<i64>::try_from(&reference[&format!("{key}_argmax")]).unwrap(), "{key}: top tokens");
        let d = max_abs_diff(&logits.get(-1), &reference[&format!("{key}_last_logits")]);
        eprintln!("bfloat16 {key}: max |last logits - transformers bf16| = {d:e}");
        assert!(d < 0.125, "{key}: bfloat16 last logits differ from transformers' bfloat16 by {d}");
        let want = Vec::<i64>::try_from(&reference[&format!("{key}_greedy")]).unwrap();
        assert_eq!(model.generate(ids, &greedy)?.rows[0].new_ids, want, "{key}: greedy continuation in bfloat16");
    }
    Ok(())
}
