//! Inner hook points of the attention modules (`query`, `key`, `probs`, `head_output`): reading them keeps the
//! model's output, they have the documented shapes, the probabilities are what the model uses (a hand
//! computation from them reproduces the module's output, and a write changes it as the hand computation says),
//! and they follow the forward order, invokes and caches like module outputs.

use crate::common::{self, excess, max_abs_diff};
use nnsight::prelude::*;
use nnsight::Error;

const PROMPT: &str = "The Eiffel Tower is in the city of";

/// On the CPU in float64, for hand computations.
fn f64_cpu(t: &Tensor) -> Tensor {
    t.to_device(Device::Cpu).to_kind(Kind::Double)
}

/// `[batch, seq, n * head_dim]` as `[batch, n, seq, head_dim]`.
fn split_heads(t: &Tensor, n: i64) -> Tensor {
    let (b, s, e) = t.size3().unwrap();
    t.view([b, s, n, e / n]).transpose(1, 2)
}

#[test]
fn reading_every_point_leaves_the_output_unchanged() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    let n = model.model().model.layers.len();
    let plain = model.forward(PROMPT)?;
    intervene!(model.trace(PROMPT) {
        let mut probs = Vec::new();
        for i in 0..n {
            probs.push(model.model.layers[i].self_attn.probs.output.save());
        }
        let logits = model.output.save();
    });
    assert_eq!(probs.len(), n);
    // Every layer ran the explicit attention; the logits match the fused path's up to float rounding.
    let (d, rel) = (max_abs_diff(&logits, &plain), excess(&logits, &plain, 1e-4, 1e-4));
    eprintln!("SmolLM2 logits, explicit vs fused attention in all 30 layers: max |diff| {d:.2e}");
    assert!(rel <= 0.0, "explicit attention differs from the fused one by {d}");

    let model = common::tiny_gpt2();
    let plain = model.forward(PROMPT)?;
    intervene!(model.trace(PROMPT) {
        let q = model.transformer.h[0].attn.query.output.save();
        let z = model.transformer.h[1].attn.head_output.output.save();
        let logits = model.output.save();
    });
    let _ = (q, z);
    let d = max_abs_diff(&logits, &plain);
    eprintln!("tiny GPT-2 logits, explicit vs fused attention: max |diff| {d:.2e}");
    assert!(excess(&logits, &plain, 1e-5, 1e-4) <= 0.0, "{d}");
    Ok(())
}

#[test]
fn the_points_have_the_documented_shapes() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    let s = model.batch(PROMPT)?.input_ids.size()[1];
    intervene!(model.trace(PROMPT) {
        let attn = &model.model.layers[3].self_attn;
        let q = attn.query.output.save();
        let k = attn.key.output.save();
        let p = attn.probs.output.save();
        let z = attn.head_output.output.save();
    });
    // SmolLM2-135M: 9 query heads, 3 key/value heads, head_dim 64.
    assert_eq!(q.size(), [1, 9, s, 64]);
    assert_eq!(k.size(), [1, 3, s, 64]);
    assert_eq!(p.size(), [1, 9, s, s]);
    assert_eq!(z.size(), [1, s, 9, 64]);

    let model = common::tiny_gpt2();
    let s = model.batch(PROMPT)?.input_ids.size()[1];
    intervene!(model.trace(PROMPT) {
        let attn = &model.transformer.h[1].attn;
        let q = attn.query.output.save();
        let k = attn.key.output.save();
        let p = attn.probs.output.save();
        let z = attn.head_output.output.save();
    });
    // Tiny GPT-2: 4 heads of 16.
    assert_eq!(q.size(), [1, 4, s, 16]);
    assert_eq!(k.size(), [1, 4, s, 16]);
    assert_eq!(p.size(), [1, 4, s, s]);
    assert_eq!(z.size(), [1, s, 4, 16]);
    Ok(())
}

#[test]
fn probabilities_are_causal_rows_summing_to_one() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    intervene!(model.trace(PROMPT) {
        let p = model.transformer.h[0].attn.probs.output.save();
    });
    let p = f64_cpu(&p);
    let s = p.size()[3];
    let sums = p.sum_dim_intlist(-1, false, Kind::Double);
    assert!(max_abs_diff(&sums, &sums.ones_like()) < 1e-6);
    let above = Tensor::ones([s, s], (Kind::Bool, Device::Cpu)).triu(1);
    assert_eq!(p.masked_select(&above).abs().max().double_value(&[]), 0.0);
    // The first query sees only itself.
    assert!(max_abs_diff(&p.select(2, 0).select(2, 0), &Tensor::ones([1, 4], (Kind::Double, Device::Cpu))) < 1e-6);
    Ok(())
}

/// SmolLM2's layer `i` attention from its saved `probs` and `v_proj` output, by hand: probabilities times values
/// (key/value heads shared by groups of 3 query heads), heads side by side, through `o_proj`.
fn attention_by_hand(model: &LanguageModel<Llama>, layer: usize, probs: &Tensor, v: &Tensor) -> Tensor {
    let v = split_heads(&f64_cpu(v), 3).repeat_interleave_self_int(3, 1, None::<i64>);
    let heads = f64_cpu(probs).matmul(&v); // [b, 9, s, 64]
    let (b, s) = (heads.size()[0], heads.size()[2]);
    let flat = heads.transpose(1, 2).reshape([b, s, 9 * 64]);
    let w = f64_cpu(&model.model().model.layers[layer].self_attn.o_proj.weight);
    flat.matmul(&w.tr())
}

#[test]
fn probabilities_times_values_through_o_proj_give_the_attention_output() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    intervene!(model.trace(PROMPT) {
        let attn = &model.model.layers[4].self_attn;
        let v = attn.v_proj.output.save();
        let p = attn.probs.output.save();
        let z = attn.head_output.output.save();
        let out = attn.output.save();
    });
    let by_hand = attention_by_hand(model, 4, &p, &v);
    let d = max_abs_diff(&by_hand, &out);
    eprintln!("SmolLM2 layer 4: probs·v through o_proj vs self_attn.output: max |diff| {d:.2e}");
    assert!(excess(&by_hand, &out, 1e-5, 1e-4) <= 0.0, "{d}");
    // `head_output` is probs·v, heads on the third axis.
    let v = split_heads(&f64_cpu(&v), 3).repeat_interleave_self_int(3, 1, None::<i64>);
    let heads = f64_cpu(&p).matmul(&v).transpose(1, 2);
    assert!(excess(&heads, &z, 1e-5, 1e-4) <= 0.0, "{}", max_abs_diff(&heads, &z));
    Ok(())
}

#[test]
fn zeroing_one_heads_probabilities_removes_that_heads_contribution() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    let (layer, head) = (2usize, 4i64);
    intervene!(model.trace(PROMPT) {
        let attn = &model.model.layers[layer].self_attn;
        let v = attn.v_proj.output.save();
        let p = attn.probs.output.save();
        let before = attn.output.save();
    });
    intervene!(model.trace(PROMPT) {
        let attn = &model.model.layers[layer].self_attn;
        attn.probs.output[(.., head)] = attn.probs.output[(.., head)] * 0.0;
        let zeroed = attn.probs.output.save();
        let after = attn.output.save();
    });
    assert_eq!(zeroed.select(1, head).abs().max().double_value(&[]), 0.0);
    // The head's output was probs[head]·v[head / 3]; through its 64 columns of o_proj it added this much.
    let v_head = split_heads(&f64_cpu(&v), 3).select(1, head / 3);
    let head_out = f64_cpu(&p).select(1, head).matmul(&v_head); // [b, s, 64]
    let w = f64_cpu(&model.model().model.layers[layer].self_attn.o_proj.weight).narrow(1, head * 64, 64);
    let expected = f64_cpu(&before) - head_out.matmul(&w.tr());
    let d = max_abs_diff(&expected, &after);
    eprintln!("SmolLM2 layer {layer}, head {head} zeroed: after vs before − head's contribution: max |diff| {d:.2e}");
    assert!(excess(&expected, &after, 1e-5, 1e-4) <= 0.0, "{d}");
    assert!(max_abs_diff(&before, &after) > 1e-3, "the head contributed something");
    // Same as the hand computation from the zeroed probabilities.
    assert!(excess(&attention_by_hand(model, layer, &zeroed, &v), &after, 1e-5, 1e-4) <= 0.0);
    Ok(())
}

#[test]
fn a_write_to_the_queries_changes_the_probabilities_it_should() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    intervene!(model.trace(PROMPT) {
        let q = model.transformer.h[0].attn.query.output.save();
        let k = model.transformer.h[0].attn.key.output.save();
        let before = model.transformer.h[0].attn.output.save();
    });
    intervene!(model.trace(PROMPT) {
        model.transformer.h[0].attn.query.output *= 3.0;
        let p = model.transformer.h[0].attn.probs.output.save();
        let after = model.transformer.h[0].attn.output.save();
    });
    // softmax(3q·kᵀ/√16 + causal mask), by hand.
    let (q, k) = (f64_cpu(&q), f64_cpu(&k));
    let s = q.size()[2];
    let above = Tensor::ones([s, s], (Kind::Bool, Device::Cpu)).triu(1);
    let scores = (q * 3.0).matmul(&k.transpose(-2, -1)) / 4.0;
    let expected = scores.masked_fill(&above, f64::NEG_INFINITY).softmax(-1, Kind::Double);
    assert!(excess(&expected, &p, 1e-6, 1e-4) <= 0.0, "{}", max_abs_diff(&expected, &p));
    assert!(max_abs_diff(&before, &after) > 1e-4);
    Ok(())
}

#[test]
fn two_invokes_each_read_their_own_rows() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let (a, b) = ("Hello world", "The quick brown fox jumps");
    let single = |prompt: &str| -> nnsight::Result<Tensor> {
        intervene!(model.trace(prompt) {
            let p = model.transformer.h[1].attn.probs.output.save();
        });
        Ok(p)
    };
    let (pa, pb) = (single(a)?, single(b)?);
    intervene!(model.trace() {
        invoke(a) {
            let ba = model.transformer.h[1].attn.probs.output.save();
        }
        invoke(b) {
            let bb = model.transformer.h[1].attn.probs.output.save();
        }
    });
    assert_eq!(ba.size()[0], 1);
    assert_eq!(bb.size()[0], 1);
    // The shorter prompt is left-padded: its real positions are the last ones, and nothing attends to padding.
    let (na, s) = (pa.size()[2], ba.size()[2]);
    let real = ba.narrow(2, s - na, na).narrow(3, s - na, na);
    assert!(excess(&real, &pa, 1e-5, 1e-4) <= 0.0, "{}", max_abs_diff(&real, &pa));
    assert_eq!(ba.narrow(2, s - na, na).narrow(3, 0, s - na).abs().max().double_value(&[]), 0.0);
    assert!(excess(&bb, &pb, 1e-5, 1e-4) <= 0.0, "{}", max_abs_diff(&bb, &pb));
    Ok(())
}

#[test]
fn points_follow_the_forward_order() {
    let model = common::tiny_gpt2();
    // Queries, probabilities, then the output projection of the same layer: in order.
    let in_order = || -> nnsight::Result<()> {
        intervene!(model.trace(PROMPT) {
            let q = model.transformer.h[0].attn.query.output.save();
            let p = model.transformer.h[0].attn.probs.output.save();
            let z = model.transformer.h[0].attn.head_output.output.save();
            let o = model.transformer.h[0].attn.c_proj.output.save();
        });
        let _ = (q, p, z, o);
        Ok(())
    };
    in_order().unwrap();
    let out_of_order = || -> nnsight::Result<()> {
        intervene!(model.trace(PROMPT) {
            let o = model.transformer.h[0].attn.c_proj.output.save();
            let p = model.transformer.h[0].attn.probs.output.save();
        });
        let _ = (o, p);
        Ok(())
    };
    let err = out_of_order().err().unwrap();
    assert!(matches!(err, Error::OutOfOrder { .. }), "{err}");
    assert!(err.to_string().contains("model.transformer.h.0.attn.probs"), "{err}");
    let across_layers = || -> nnsight::Result<()> {
        intervene!(model.trace(PROMPT) {
            let p = model.transformer.h[1].attn.probs.output.save();
            let q = model.transformer.h[0].attn.query.output.save();
        });
        let _ = (p, q);
        Ok(())
    };
    let err = across_layers().err().unwrap();
    assert!(matches!(err, Error::OutOfOrder { .. }), "{err}");
}

#[test]
fn a_cache_records_points_it_lists_and_only_those() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    intervene!(model.trace(PROMPT) {
        let listed = model.cache_with(
            CacheOptions::default().modules(["model.transformer.h.0.attn.probs", "transformer.h.0.attn"]),
        );
        let p = model.transformer.h[0].attn.probs.output.save();
    });
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        ["model.transformer.h.0.attn.probs.output", "model.transformer.h.0.attn.output"]
    );
    assert_eq!(max_abs_diff(&listed["model.transformer.h.0.attn.probs.output"], &p), 0.0);
    // Listed, nothing else reading it: the cache alone turns the point on.
    intervene!(model.trace(PROMPT) {
        let alone = model.cache_with(CacheOptions::default().modules(["transformer.h.1.attn.head_output"]));
    });
    assert_eq!(alone.keys().collect::<Vec<_>>(), ["model.transformer.h.1.attn.head_output.output"]);
    // A cache of every module has no inner points, even when a read turns one on.
    intervene!(model.trace(PROMPT) {
        let all = model.cache();
        let p = model.transformer.h[0].attn.probs.output.save();
    });
    let _ = p;
    assert!(!all.keys().any(|k| k.contains("probs") || k.contains("query")), "{:?}", all.keys().collect::<Vec<_>>());
    Ok(())
}

#[test]
fn a_scan_gives_the_points_shapes_without_running_the_model() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    let points = ["query", "key", "probs", "head_output"].map(|p| format!("model.model.layers.7.self_attn.{p}"));
    intervene!(model.trace(PROMPT) {
        let traced = model.cache_with(CacheOptions::default().modules(points.clone()));
    });
    intervene!(model.scan(PROMPT) {
        let scanned = model.cache_with(CacheOptions::default().modules(points.clone()));
        model.model.layers[7].self_attn.probs.output *= 2.0;
        let z = model.model.layers[7].self_attn.head_output.output.save();
    });
    assert_eq!(traced.len(), 4);
    let traced: Vec<(&str, Vec<i64>)> = traced.iter().map(|(k, t)| (k, t.size())).collect();
    let scanned: Vec<(&str, Vec<i64>)> = scanned.iter().map(|(k, t)| (k, t.size())).collect();
    assert_eq!(traced, scanned);
    assert!(nnsight::meta::is_meta(&z));
    assert_eq!(z.size(), traced[3].1);
    Ok(())
}
