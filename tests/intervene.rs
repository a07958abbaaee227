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
    layer1: Linear,
    layer2: Linear,
}

impl Forward for TwoLayer {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> nnsight::Result<Tensor> {
        let h = cx.call(&self.layer1, x)?;
        cx.call(&self.layer2, &h)
    }
}

fn two_layer() -> NNsight<TwoLayer> {
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

fn gpt2() -> LanguageModel<Gpt2> {
    LanguageModel::<Gpt2>::load_with(common::data("tiny-gpt2"), common::opts()).unwrap()
}

#[test]
fn reading_a_layer_equals_running_it() -> nnsight::Result<()> {
    let model = gpt2();
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
    let model = gpt2();
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
    let model = gpt2();
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
    let model = gpt2();
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
