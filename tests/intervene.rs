//! `intervene!` end to end, porting Python nnsight's own checks to a toy two-layer net, the tiny GPT-2 and
//! SmolLM2.

use crate::common::{self, max_abs_diff, Recorder};
use nnsight::nn::{Ctx, Forward, Linear};
use nnsight::prelude::*;
use nnsight::Error;

/// Python nnsight's README net: `Sequential(layer1: Linear(5, 10), layer2: Linear(10, 2))`.
#[derive(Traceable)]
pub struct TwoLayer {
    #[traceable(path)]
    path: String,
    pub layer1: Linear,
    pub layer2: Linear,
}

impl Forward for TwoLayer {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> nnsight::Result<Tensor> {
        let h = cx.call(&self.layer1, x)?;
        cx.call(&self.layer2, &h)
    }
}

pub fn two_layer() -> NNsight<TwoLayer> {
    common::init();
    tch::manual_seed(0);
    let lin = |i: i64, o: i64| {
        Linear::from_tensors(
            "",
            Tensor::randn([o, i], (Kind::Float, Device::Cpu)),
            Some(Tensor::randn([o], (Kind::Float, Device::Cpu))),
        )
    };
    NNsight::new(TwoLayer { path: String::new(), layer1: lin(5, 10), layer2: lin(10, 2) })
}

#[test]
fn toy_net_read_and_write() -> nnsight::Result<()> {
    let net = two_layer();
    let x = Tensor::randn([3, 5], (Kind::Float, Device::Cpu));
    let plain = net.forward(&x)?;
    intervene!(net.trace(x.shallow_clone()) {
        let hidden = net.layer1.output.save();
        net.layer1.output = net.layer1.output * 0.0;
        let out = net.output.save();
    });
    assert_eq!(hidden.size(), vec![3, 10]);
    let bias = &net.module().layer2.bias;
    // layer2 sees zeros, so its output is its bias in every row.
    assert!(max_abs_diff(&out, &bias.as_ref().unwrap().expand([3, 2], false)) < 1e-6);
    assert!(max_abs_diff(&out, &plain) > 1e-3);
    Ok(())
}

#[test]
fn numbers_write_like_tensors_filled_with_them() -> nnsight::Result<()> {
    // Python nnsight's `model.layer1.output[:] = 0` and `output[0][:, -1] = 0`.
    let net = two_layer();
    let x = Tensor::randn([3, 5], (Kind::Float, Device::Cpu));
    intervene!(net.trace(x.shallow_clone()) {
        net.layer1.output = 0.0;
        let out = net.output.save();
    });
    let bias = net.module().layer2.bias.as_ref().unwrap().expand([3, 2], false);
    assert!(max_abs_diff(&out, &bias) < 1e-6);
    let model = common::tiny_gpt2();
    intervene!(model.trace("Hello world") {
        model.transformer.h[0].output[(.., -1, ..)] = 0;
        let h0 = model.transformer.h[0].output.save();
        model.transformer.h[1].output[(.., 0, 3)] = 2.5;
        let h1 = model.transformer.h[1].output.save();
    });
    assert_eq!(h0.select(1, -1).abs().max().double_value(&[]), 0.0);
    assert!(h0.select(1, 0).abs().max().double_value(&[]) > 0.0);
    assert_eq!(h1.double_value(&[0, 0, 3]), 2.5);
    Ok(())
}

#[test]
fn reading_a_layer_equals_running_it() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    intervene!(model.trace("Hello world") {
        let h0 = model.transformer.h[0].output.save();
        let attn_in = model.transformer.h[1].attn.input.save();
        let logits = model.output.save();
    });
    let mut rec = Recorder::default();
    let plain = model.forward_with_hook(&model.batch("Hello world")?, &mut rec)?;
    assert_eq!(max_abs_diff(&h0, &rec.outputs["transformer.h.0"]), 0.0);
    assert_eq!(max_abs_diff(&attn_in, &rec.outputs["transformer.h.1.ln_1"]), 0.0);
    assert_eq!(max_abs_diff(&logits, &plain), 0.0);
    Ok(())
}

#[test]
fn an_edit_of_a_layer_input_holds() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    intervene!(model.trace("Hello world") {
        let before = model.transformer.h[1].input.save();
        model.transformer.h[1].input *= 2.0;
        let after = model.transformer.h[1].input.save();
    });
    assert!(max_abs_diff(&(before * 2.0), &after) < 1e-6);
    Ok(())
}

#[test]
fn slices_negative_indices_and_loops() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let n = model.model().transformer.h.len();
    intervene!(model.trace("The quick brown fox") {
        model.transformer.h[0].output[(.., -1, ..)] = model.transformer.h[0].output[(.., -1, ..)] * 0.0;
        let zeroed = model.transformer.h[0].output.save();
        let mut norms = Vec::new();
        for i in 0..n {
            norms.push(model.transformer.h[i].output.norm().save());
        }
        let last_tok = model.transformer.h[-1].output[(.., -1, ..)].save();
    });
    assert_eq!(last_tok.size(), vec![1, 64]);
    assert_eq!(zeroed.get(0).get(-1).abs().sum(Kind::Float).double_value(&[]), 0.0);
    assert!(zeroed.get(0).get(0).abs().sum(Kind::Float).double_value(&[]) > 0.0);
    assert_eq!(norms.len(), n);
    let norms: Vec<f64> = norms.iter().map(|t| t.double_value(&[])).collect();
    assert!(norms.iter().all(|&v| v > 0.0), "{norms:?}");
    Ok(())
}

#[test]
fn batching_each_invoke_equals_its_solo_run() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    let (a, b) = ("The Eiffel Tower is in the city of", "Madrid is the capital of");
    intervene!(model.trace() {
        invoke(a) {
            let la = model.output.save();
        }
        invoke(b) {
            let lb = model.output.save();
        }
    });
    let sa = model.forward(a)?;
    let sb = model.forward(b)?;
    let da = max_abs_diff(&la.get(0).get(-1), &sa.get(0).get(-1));
    let db = max_abs_diff(&lb.get(0).get(-1), &sb.get(0).get(-1));
    eprintln!("invoke vs solo last-token logits: {da:.2e}, {db:.2e}");
    assert!(da < 1e-3 && db < 1e-3);
    Ok(())
}

#[test]
fn zeroing_an_output_changes_the_argmax_and_reads_back_zeros() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    intervene!(model.trace("The Eiffel Tower is in the city of") {
        model.model.norm.output = model.model.norm.output.zeros_like();
        let normed = model.model.norm.output.save();
        let top = model.output.i((0, -1)).argmax(-1, false).save();
    });
    assert_eq!(normed.abs().max().double_value(&[]), 0.0);
    assert_ne!(top.int64_value(&[]), 7042, "the argmax must change from \" Paris\"");
    Ok(())
}

#[test]
fn patching_embeddings_from_one_invoke_into_another() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    intervene!(model.trace() {
        invoke("The Colosseum is in the city of") {
            let emb = model.model.embed_tokens.output;
            let rome = model.output.save();
        }
        invoke("The Eiffel Tower is in the city of") {
            model.model.embed_tokens.output = emb;
            let patched = model.output.save();
        }
    });
    let d = max_abs_diff(&rome, &patched);
    assert!(d < 1e-4, "the patched invoke computes on the Colosseum's embeddings: {d}");
    let rome_id = model.encode(" Rome")?[0];
    assert_eq!(patched.get(0).get(-1).argmax(-1, false).int64_value(&[]), rome_id);
    Ok(())
}

#[test]
fn an_ad_hoc_logit_lens_equals_the_final_logits_at_the_last_layer() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    intervene!(model.trace("The Eiffel Tower is in the city of") {
        let lens5 = model.lm_head(model.model.norm(model.model.layers[5].output)).save();
        let lens = model.lm_head(model.model.norm(model.model.layers[-1].output)).save();
        let logits = model.output.save();
    });
    assert!(max_abs_diff(&lens, &logits) < 1e-4);
    assert!(max_abs_diff(&lens5, &logits) > 1.0);
    Ok(())
}

#[test]
fn errors_before_the_run_name_the_module() {
    let model = common::tiny_gpt2();
    let out_of_range = || -> nnsight::Result<()> {
        intervene!(model.trace("Hello") {
            let h = model.transformer.h[5].output.save();
        });
        let _ = h;
        Ok(())
    };
    let err = out_of_range().err().unwrap();
    assert!(matches!(err, Error::IndexOutOfRange { len: 2, .. }), "{err}");
    let out_of_order = || -> nnsight::Result<()> {
        intervene!(model.trace("Hello") {
            let late = model.transformer.h[1].output.save();
            let early = model.transformer.h[0].output.save();
        });
        let _ = (late, early);
        Ok(())
    };
    let err = out_of_order().err().unwrap();
    assert!(matches!(err, Error::OutOfOrder { .. }), "{err}");
    // The model is still usable.
    assert!(model.forward("Hello").is_ok());
}

#[test]
fn an_error_inside_an_intervention_comes_back_and_the_model_stays_usable() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let err = (|| -> nnsight::Result<()> {
        intervene!(model.trace("Hello world") {
            let h = model.transformer.h[0].output;
            let bad = h.matmul(h).save(); // [1, 3, 64] x [1, 3, 64]: shapes do not fit
        });
        let _ = bad;
        Ok(())
    })()
    .err()
    .unwrap();
    assert!(matches!(err, Error::Intervention { .. }), "{err}");
    assert!(err.to_string().contains("matmul"), "{err}");
    intervene!(model.trace("Hello world") {
        let ok = model.output.save();
    });
    assert_eq!(ok.size(), vec![1, 3, 512]);
    Ok(())
}

#[test]
fn a_node_never_reached_is_named() {
    // No input before the first invoke's code, so the forward order is not known while it is built: the
    // out-of-order read is found when the forward pass ends without reaching it.
    let net = two_layer();
    let x = Tensor::randn([2, 5], (Kind::Float, Device::Cpu));
    let err = (|| -> nnsight::Result<()> {
        intervene!(net.trace() {
            invoke() {
                let late = net.layer2.output.save();
                let early = net.layer1.output.save();
            }
            invoke(x) {}
        });
        let _ = (late, early);
        Ok(())
    })()
    .err()
    .unwrap();
    let Error::NeverReached { node, reason } = &err else { panic!("{err}") };
    assert!(node.contains("model.layer1"), "{err}");
    assert!(reason.contains("already run"), "{err}");
    assert!(net.forward(&Tensor::randn([1, 5], (Kind::Float, Device::Cpu))).is_ok());
}

#[test]
fn graphs_round_trip_through_json() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let tr = nnsight::__private::Trace::new(&model, Some("Hello world".into()))?;
    let (root, g) = (tr.root(), tr.graph());
    let h = nnsight::__private::read::<Tensor>(g, &nnsight::__private::at(&root.transformer.h, 0)?.output)?;
    let steer = Tensor::ones([64], (Kind::Float, Device::Cpu));
    let x = (h + &steer) * 2.0 - 1.0;
    let (v, i) = x.softmax(-1).topk(3, -1);
    let _ = (v.save(), i.save(), x.i((.., -1, ..)).norm().save());
    nnsight::__private::write(g, &nnsight::__private::at(&root.transformer.h, 0)?.output, x)?;
    let graph = g.graph();
    let json = graph.to_json();
    let back = nnsight::graph::Graph::from_json(&json)?;
    assert_eq!(back, graph);
    assert!(json.contains("\"op\": \"topk\""), "{json}");
    // A graph whose node refers forward is rejected.
    let bad = json.replacen("\"a\": 0", "\"a\": 99", 1);
    assert!(matches!(nnsight::graph::Graph::from_json(&bad), Err(Error::InvalidGraph { .. })));
    Ok(())
}

/// A module that refuses to run: proves that the part of a model after `stop()` does not run.
#[derive(Traceable)]
pub struct Refuses {
    #[traceable(path)]
    path: String,
}

impl Forward for Refuses {
    fn forward(&self, _: &mut Ctx<'_>, _: &Tensor) -> nnsight::Result<Tensor> {
        Err(Error::InvalidInput { message: "this module must not run".into() })
    }
}

#[derive(Traceable)]
pub struct StopsEarly {
    #[traceable(path)]
    path: String,
    first: Linear,
    second: Refuses,
}

impl Forward for StopsEarly {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> nnsight::Result<Tensor> {
        let h = cx.call(&self.first, x)?;
        cx.call(&self.second, &h)
    }
}

#[test]
fn stop_ends_the_forward_pass_and_keeps_what_was_saved() -> nnsight::Result<()> {
    common::init();
    let w = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
    let net = NNsight::new(StopsEarly {
        path: String::new(),
        first: Linear::from_tensors("", w.shallow_clone(), None),
        second: Refuses { path: String::new() },
    });
    let x = Tensor::randn([2, 3], (Kind::Float, Device::Cpu));
    assert!(net.forward(&x).is_err(), "without stop the second module runs and fails");
    intervene!(net.trace(x.shallow_clone()) {
        let first = net.first.output.save();
        net.stop();
    });
    assert!(max_abs_diff(&first, &x.matmul(&w.tr())) < 1e-5);

    // On a real model: what was saved before the stop is intact; a save after it is reported, by name.
    let model = common::tiny_gpt2();
    intervene!(model.trace("Hello world") {
        let h0 = model.transformer.h[0].output.save();
        model.stop();
    });
    let mut rec = Recorder::default();
    let _ = model.forward_with_hook(&model.batch("Hello world")?, &mut rec)?;
    assert_eq!(max_abs_diff(&h0, &rec.outputs["transformer.h.0"]), 0.0);
    let err = (|| -> nnsight::Result<()> {
        intervene!(model.trace("Hello world") {
            let h0 = model.transformer.h[0].output.save();
            model.stop();
            let logits = model.output.save();
        });
        let _ = (h0, logits);
        Ok(())
    })()
    .err()
    .unwrap();
    assert!(matches!(err, Error::NeverReached { .. }), "{err}");
    Ok(())
}

#[test]
fn log_prints_a_value_when_it_is_computed() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let (result, lines) = nnsight::interleave::capture_logs(|| -> nnsight::Result<Tensor> {
        intervene!(model.trace("Hello world") {
            let h = model.transformer.h[0].output;
            log!(h.norm());
            let n = h.norm().save();
        });
        Ok(n)
    });
    let n = result?;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("h.norm(): "), "{lines:?}");
    let printed: f64 = lines[0].rsplit(':').next().unwrap().trim().parse().unwrap_or(f64::NAN);
    assert!((printed - n.double_value(&[])).abs() < 1e-2 * n.double_value(&[]).abs().max(1.0), "{lines:?} vs {n}");
    Ok(())
}

#[test]
fn cache_records_every_module_after_interventions() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    intervene!(model.trace("Hello world") {
        let cache = model.cache();
        model.transformer.h[0].mlp.output = model.transformer.h[0].mlp.output * 0.0;
        let h1 = model.transformer.h[1].output.save();
    });
    // Every module that ran is there, in forward order, and equals what a save gives.
    let mut rec = Recorder::default();
    let _ = model.forward_with_hook(&model.batch("Hello world")?, &mut rec)?;
    assert_eq!(cache.len(), rec.order.len(), "{:?}", cache.keys().collect::<Vec<_>>());
    assert_eq!(cache.keys().next(), Some("model.transformer.wte.output"));
    assert_eq!(cache.keys().last(), Some("model.output"));
    assert_eq!(max_abs_diff(&cache["model.transformer.h.1.output"], &h1), 0.0);
    // After the intervention: the zeroed MLP reads back zeros.
    assert_eq!(cache["model.transformer.h.0.mlp.output"].abs().max().double_value(&[]), 0.0);
    assert!(rec.outputs["transformer.h.0.mlp"].abs().max().double_value(&[]) > 0.0);

    // Listed modules, with inputs, on a chosen device, per invoke.
    intervene!(model.trace() {
        invoke("Hello world") {
            let some = model.cache_with(CacheOptions::default().modules(["model.transformer.h.1"]).inputs(true).device(Device::Cpu));
        }
        invoke("The quick brown fox") {
            let other = model.cache_with(CacheOptions::default().modules(["transformer.ln_f"]));
        }
    });
    assert_eq!(some.keys().collect::<Vec<_>>(), ["model.transformer.h.1.input", "model.transformer.h.1.output"]);
    assert_eq!(some["model.transformer.h.1.output"].size()[0], 1, "each invoke records its own rows");
    assert_eq!(other.keys().collect::<Vec<_>>(), ["model.transformer.ln_f.output"]);
    Ok(())
}

#[test]
fn skip_replaces_a_module_without_running_it() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    // Skipping block 1 with its own input makes it the identity: the final norm sees block 0's output.
    intervene!(model.trace("Hello world") {
        let h0 = model.transformer.h[0].output.save();
        model.transformer.h[1].skip(model.transformer.h[1].input);
        let ln_f_in = model.transformer.ln_f.input.save();
    });
    assert_eq!(max_abs_diff(&h0, &ln_f_in), 0.0);

    // The skipped module's submodules do not run: reading one is never reached.
    let err = (|| -> nnsight::Result<()> {
        intervene!(model.trace("Hello world") {
            model.transformer.h[1].skip(model.transformer.h[1].input);
            let attn = model.transformer.h[1].attn.output.save();
        });
        let _ = attn;
        Ok(())
    })()
    .err()
    .unwrap();
    assert!(matches!(err, Error::NeverReached { .. }), "{err}");

    // With several invokes, each gives its own rows, or it is an error that says so.
    intervene!(model.trace() {
        invoke("Hello world") {
            let a0 = model.transformer.h[0].output.save();
            model.transformer.h[1].skip(model.transformer.h[1].input);
            let a = model.transformer.ln_f.input.save();
        }
        invoke("Hello world") {
            model.transformer.h[1].skip(model.transformer.h[1].input * 0.0);
            let b = model.transformer.ln_f.input.save();
        }
    });
    assert_eq!(max_abs_diff(&a, &a0), 0.0);
    assert_eq!(b.abs().max().double_value(&[]), 0.0);
    let partial = (|| -> nnsight::Result<()> {
        intervene!(model.trace() {
            invoke("Hello world") {
                model.transformer.h[1].skip(model.transformer.h[1].input);
            }
            invoke("Hello world") {
                let b = model.output.save();
            }
        });
        let _ = b;
        Ok(())
    })()
    .err()
    .unwrap();
    assert!(partial.to_string().contains("partial skip of `model.transformer.h.1`"), "{partial}");
    // A value without the invoke's rows is refused, naming the module.
    let bad = (|| -> nnsight::Result<()> {
        intervene!(model.trace("Hello world") {
            model.transformer.h[1].skip(Tensor::zeros([2, 3, 64], (Kind::Float, Device::Cpu)));
        });
        Ok(())
    })()
    .err()
    .unwrap();
    assert!(matches!(bad, Error::BatchRows { .. }) && bad.to_string().contains("model.transformer.h.1"), "{bad}");
    Ok(())
}

#[test]
fn invokes_inside_a_loop_run_as_one_batch_and_equal_separate_traces() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    // A sweep as users write it: one invoke per layer, each ablating that layer's MLP.
    let n = model.model().transformer.h.len();
    intervene!(model.trace() {
        let mut swept = Vec::new();
        for layer in 0..n {
            invoke("Hello world, again") {
                model.transformer.h[layer].mlp.output[..] = 0.0;
                swept.push(model.output.save());
            }
        }
    });
    assert_eq!(swept.len(), n);
    for (layer, batched) in swept.iter().enumerate() {
        intervene!(model.trace("Hello world, again") {
            model.transformer.h[layer].mlp.output[..] = 0.0;
            let alone = model.output.save();
        });
        let d = max_abs_diff(batched, &alone);
        assert!(d < 1e-5, "layer {layer}: the batched invoke differs from its own trace by {d}");
    }
    // Prompts of different lengths from a loop: each invoke's rows equal its solo run at its real positions.
    let prompts = ["Hello world", "The quick brown fox jumps", "a"];
    intervene!(model.trace() {
        let mut outs = Vec::new();
        for p in prompts {
            invoke(p) {
                outs.push(model.output.save());
            }
        }
    });
    for (p, out) in prompts.iter().zip(&outs) {
        let solo = model.forward(*p)?;
        let d = max_abs_diff(&out.i((0, -1)), &solo.i((0, -1)));
        assert!(d < 1e-4, "{p:?}: last position differs from its solo run by {d}");
    }
    Ok(())
}
