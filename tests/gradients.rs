//! Gradients inside a trace: `loss.backward()` on a single value, then `.grad` of module inputs and outputs read
//! before the loss, checked against a plain tch autograd run and against finite differences.

use crate::common::{self, max_abs_diff};
use nnsight::models::CausalLm;
use nnsight::nn::Hook;
use nnsight::prelude::*;

/// Makes layer 0's output a leaf that requires grad, and keeps it and layer 1's output: autograd by hand.
#[derive(Default)]
struct ByHand {
    h0: Option<Tensor>,
    h1: Option<Tensor>,
    scale_h0: Option<Tensor>,
}

impl Hook for ByHand {
    fn input(&mut self, _: &str, x: Tensor) -> nnsight::Result<Tensor> {
        Ok(x)
    }
    fn output(&mut self, module: &str, y: Tensor) -> nnsight::Result<Tensor> {
        match module {
            "transformer.h.0" => {
                let mut y = y.detach().set_requires_grad(true);
                self.h0 = Some(y.shallow_clone());
                if let Some(d) = &self.scale_h0 {
                    y = &y + d;
                }
                Ok(y)
            }
            "transformer.h.1" => {
                self.h1 = Some(y.shallow_clone());
                Ok(y)
            }
            _ => Ok(y),
        }
    }
}

/// The loss of the tests: the last position's largest logit, minus the mean logit there.
fn loss_of(logits: &Tensor) -> Tensor {
    let last = logits.select(1, -1);
    last.max() - last.mean(Kind::Float)
}

#[test]
fn gradients_equal_a_plain_autograd_run() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let text = "The quick brown fox";
    intervene!(model.trace(text) {
        let h0 = model.transformer.h[0].output;
        let h1 = model.transformer.h[1].output;
        let last = model.output[(.., -1, ..)];
        let loss = (last.max() - last.mean()).save();
        loss.backward();
        // Backward order: the later layer's gradient first.
        let g1 = h1.grad.save();
        let g0 = h0.grad.save();
    });
    let mut hook = ByHand::default();
    let logits = {
        let _grad = tch::with_grad(|| 0);
        let batch = model.batch(text)?;
        model.model().run(&mut nnsight::nn::Ctx::with_hook(&mut hook), &batch)?
    };
    let by_hand_loss = loss_of(&logits);
    let (h0, h1) = (hook.h0.unwrap(), hook.h1.unwrap());
    let want = Tensor::run_backward(&[&by_hand_loss], &[&h0, &h1], false, false);
    assert!((loss.double_value(&[]) - by_hand_loss.double_value(&[])).abs() < 1e-5);
    assert_eq!(g0.size(), h0.size());
    assert!(max_abs_diff(&g0, &want[0]) < 1e-6, "{}", max_abs_diff(&g0, &want[0]));
    assert!(max_abs_diff(&g1, &want[1]) < 1e-6, "{}", max_abs_diff(&g1, &want[1]));
    assert!(g0.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    Ok(())
}

#[test]
fn gradients_agree_with_finite_differences() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let text = "Hello world";
    intervene!(model.trace(text) {
        let h0 = model.transformer.h[0].output;
        let last = model.output[(.., -1, ..)];
        let loss = (last.max() - last.mean()).save();
        loss.backward();
        let g0 = h0.grad.save();
    });
    // Central differences along the gradient's direction: (L(h + eps d) - L(h - eps d)) / 2 eps = <g, d>.
    let g = g0.to_kind(Kind::Double);
    let d = &g / g.norm();
    let eps = 1e-2;
    let loss_at = |delta: Tensor| -> nnsight::Result<f64> {
        let mut hook = ByHand { scale_h0: Some(delta.to_kind(Kind::Float)), ..Default::default() };
        let logits = model.forward_with_hook(&model.batch(text)?, &mut hook)?;
        Ok(loss_of(&logits).double_value(&[]))
    };
    let numeric = (loss_at(&d * eps)? - loss_at(&d * -eps)?) / (2.0 * eps);
    let analytic = (&g * &d).sum(Kind::Double).double_value(&[]);
    assert!((numeric - analytic).abs() < 1e-2 * analytic.abs().max(1.0), "numeric {numeric} analytic {analytic}");
    let _ = loss;
    Ok(())
}

#[test]
fn each_invoke_gets_its_own_gradients() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let (a, b) = ("Hello world", "Goodbye moon");
    let solo = |text: &str| -> nnsight::Result<Tensor> {
        intervene!(model.trace(text) {
            let h = model.transformer.h[0].output;
            let loss = model.output[(.., -1, ..)].max();
            loss.backward();
            let g = h.grad.save();
        });
        Ok(g)
    };
    intervene!(model.trace() {
        invoke(a) {
            let ha = model.transformer.h[0].output;
            let la = model.output[(.., -1, ..)].max();
            la.backward();
            let ga = ha.grad.save();
        }
        invoke(b) {
            let hb = model.transformer.h[0].output;
            let lb = model.output[(.., -1, ..)].max();
            lb.backward();
            let gb = hb.grad.save();
        }
    });
    // Rows are left-padded to the longer prompt: compare each solo gradient with the row's real positions; the
    // padding gets none.
    for (batched, text) in [(&ga, a), (&gb, b)] {
        let alone = solo(text)?;
        let (n, len) = (alone.size()[1], batched.size()[1]);
        assert!(max_abs_diff(&batched.narrow(1, len - n, n), &alone) < 1e-5, "{text}");
        assert_eq!(batched.narrow(1, 0, len - n).abs().sum(Kind::Float).double_value(&[]), 0.0);
    }
    Ok(())
}

#[test]
fn gradient_misuse_is_an_error_naming_it() {
    let model = common::tiny_gpt2();
    // `.grad` without a loss.
    let run = || -> nnsight::Result<()> {
        intervene!(model.trace("Hello") {
            let h = model.transformer.h[0].output;
            let _g = h.grad.save();
        });
        Ok(())
    };
    let err = run().unwrap_err().to_string();
    assert!(err.contains("backward"), "{err}");
    // `.grad` of a computed value.
    let run = || -> nnsight::Result<()> {
        intervene!(model.trace("Hello") {
            let h = model.transformer.h[0].output * 2.0;
            model.output.sum().backward();
            let _g = h.grad.save();
        });
        Ok(())
    };
    let err = run().unwrap_err().to_string();
    assert!(err.contains("input or output"), "{err}");
    // A loss that is not one value.
    let run = || -> nnsight::Result<()> {
        intervene!(model.trace("Hello") {
            let h = model.transformer.h[0].output;
            model.output.backward();
            let _g = h.grad.save();
        });
        Ok(())
    };
    let err = run().unwrap_err().to_string();
    assert!(err.contains("single value"), "{err}");
    // A trace without gradients runs without autograd: its values do not require grad.
    let out = (|| -> nnsight::Result<Tensor> {
        intervene!(model.trace("Hello") {
            let h = model.transformer.h[0].output.save();
        });
        Ok(h)
    })()
    .unwrap();
    assert!(!out.requires_grad());
}

#[test]
fn gradients_of_parameters_and_of_points_named_directly() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let text = "The quick brown fox";
    intervene!(model.trace(text) {
        let _h = model.transformer.h[0].output;
        let last = model.output[(.., -1, ..)];
        (last.max() - last.mean()).backward();
        let g_weight = model.transformer.h[1].mlp.c_fc.weight.grad.save();
        let g_bias = model.transformer.h[1].mlp.c_fc.bias.grad.save();
        // The point itself, read before the loss (`_h` above).
        let g_h0 = model.transformer.h[0].output.grad.save();
    });
    let weight = &model.model().transformer.h[1].mlp.c_fc.weight;
    assert!(!weight.requires_grad(), "the parameter is put back after the run");
    // By hand: the same parameters made trainable, the same loss.
    let bias = &model.model().transformer.h[1].mlp.c_fc.bias;
    let (w, b) = (weight.set_requires_grad(true), bias.set_requires_grad(true));
    let logits = {
        let batch = model.batch(text)?;
        model.model().run(&mut nnsight::nn::Ctx::new(), &batch)?
    };
    let want = Tensor::run_backward(&[&loss_of(&logits)], &[&w, &b], false, false);
    let _ = (w.set_requires_grad(false), b.set_requires_grad(false));
    assert_eq!(g_weight.size(), weight.size());
    assert!(max_abs_diff(&g_weight, &want[0]) < 1e-6);
    assert!(max_abs_diff(&g_bias, &want[1]) < 1e-6);
    assert!(g_h0.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    // A point not read before the loss: an error that says to read it first.
    let run = || -> nnsight::Result<()> {
        intervene!(model.trace(text) {
            model.output.sum().backward();
            let _g = model.transformer.h[0].output.grad.save();
        });
        Ok(())
    };
    let err = run().unwrap_err().to_string();
    assert!(err.contains("read it before the loss"), "{err}");
    Ok(())
}

#[test]
fn gradients_are_read_in_backward_order() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    // Later layer first, then the earlier one: the order gradients arrive in.
    intervene!(model.trace("Hello world") {
        let h0 = model.transformer.h[0].output;
        let h1 = model.transformer.h[1].output;
        model.output.sum().backward();
        let g1 = h1.grad.save();
        let g0 = h0.grad.save();
    });
    assert_eq!(g0.size(), g1.size());
    // The other way round is an error naming both.
    let run = || -> nnsight::Result<()> {
        intervene!(model.trace("Hello world") {
            let h0 = model.transformer.h[0].output;
            let h1 = model.transformer.h[1].output;
            model.output.sum().backward();
            let _g0 = h0.grad.save();
            let _g1 = h1.grad.save();
        });
        Ok(())
    };
    let err = run().unwrap_err();
    assert!(matches!(err, nnsight::Error::GradientOrder { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("transformer.h.0") && text.contains("transformer.h.1"), "{text}");
    Ok(())
}

#[test]
fn doubling_an_activations_gradient_doubles_the_gradients_upstream() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let text = "The quick brown fox";
    let run = |factor: f64| -> nnsight::Result<(Tensor, Tensor, Tensor)> {
        intervene!(model.trace(text) {
            let h0 = model.transformer.h[0].output;
            let h1 = model.transformer.h[1].output;
            let last = model.output[(.., -1, ..)];
            (last.max() - last.mean()).backward();
            h1.grad = h1.grad * factor;
            let g1 = h1.grad.save();
            let gw = model.transformer.h[0].mlp.c_fc.weight.grad.save();
            let g0 = h0.grad.save();
        });
        Ok((g1, gw, g0))
    };
    let (g1, gw, g0) = run(1.0)?;
    let (g1x, gwx, g0x) = run(2.0)?;
    assert!(gw.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    assert!(max_abs_diff(&gwx, &(&gw * 2.0)) < 1e-6, "weight gradient upstream doubles");
    assert!(max_abs_diff(&g0x, &(&g0 * 2.0)) < 1e-6, "activation gradient upstream doubles");
    assert!(max_abs_diff(&g1x, &(&g1 * 2.0)) < 1e-6, "the written gradient reads back");
    Ok(())
}

#[test]
fn a_gradient_write_in_one_invoke_leaves_the_other_alone() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let (a, b) = ("Hello world", "Goodbye moon");
    let run = |factor: f64| -> nnsight::Result<(Tensor, Tensor)> {
        intervene!(model.trace() {
            invoke(a) {
                let ha0 = model.transformer.h[0].output;
                let ha1 = model.transformer.h[1].output;
                model.output[(.., -1, ..)].max().backward();
                ha1.grad *= factor; // compound: ha1.grad = ha1.grad * factor
                let ga = ha0.grad.save();
            }
            invoke(b) {
                let hb0 = model.transformer.h[0].output;
                model.output[(.., -1, ..)].max().backward();
                let gb = hb0.grad.save();
            }
        });
        Ok((ga, gb))
    };
    let (ga, gb) = run(1.0)?;
    let (gax, gbx) = run(3.0)?;
    assert!(max_abs_diff(&gax, &(&ga * 3.0)) < 1e-6);
    assert_eq!(max_abs_diff(&gbx, &gb), 0.0);
    Ok(())
}

#[test]
fn a_gradient_write_of_the_wrong_shape_is_an_error_after_the_backward() {
    let model = common::tiny_gpt2();
    let run = || -> nnsight::Result<Tensor> {
        intervene!(model.trace("The quick brown fox") {
            let h0 = model.transformer.h[0].output;
            let h1 = model.transformer.h[1].output;
            model.output[(.., -1, ..)].max().backward();
            h1.grad = h1.grad.sum();
            let g0 = h0.grad.save();
        });
        Ok(g0)
    };
    let err = run().unwrap_err();
    let text = err.to_string();
    assert!(text.contains("gradient write") && text.contains("shape"), "{text}");
}
