//! Training inside traces and sessions: a tensor that requires grad, used in a block, is used live (gradients
//! reach it: `.grad` accumulates as with `loss.backward()` in PyTorch), and an optimizer step between traces
//! is seen by the next one. Model parameters made trainable train the same way.

use crate::common::{self, max_abs_diff};
use nnsight::prelude::*;

#[test]
fn a_trainable_tensor_gets_the_gradient_of_the_loss() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let v = Tensor::zeros([64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    intervene!(model.trace("Hello world") {
        model.transformer.h[0].output = model.transformer.h[0].output + &v;
        let h = model.transformer.h[0].output;
        let loss = model.lm_head.output[(.., -1, 7)].sum();
        loss.backward();
        let g = h.grad.save();
    });
    // v is added at every row and position, so its gradient is the sum of the output's gradient over them.
    let grad = v.grad().copy();
    assert!(v.grad().defined(), "the backward accumulated into v.grad");
    assert!(max_abs_diff(&grad, &g.sum_dim_intlist([0, 1].as_slice(), false, Kind::Float)) < 1e-5);
    assert!(grad.abs().max().double_value(&[]) > 0.0);

    // A second backward accumulates, as in PyTorch.
    intervene!(model.trace("Hello world") {
        model.transformer.h[0].output = model.transformer.h[0].output + &v;
        model.lm_head.output[(.., -1, 7)].sum().backward();
    });
    assert!(max_abs_diff(&v.grad(), &(&grad * 2.0)) < 1e-5);
    Ok(())
}

#[test]
fn an_optimizer_step_between_traces_trains_a_steering_vector() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let v = Tensor::zeros([64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let mut opt =
        tch::COptimizer::adam(0.5, 0.9, 0.999, 0.0, 1e-8, false).map_err(|e| nnsight::Error::torch("adam", e))?;
    opt.add_parameters(&v, 0).map_err(|e| nnsight::Error::torch("adam", e))?;
    let mut losses = Vec::new();
    intervene!(model.session() {
        for _ in 0..25 {
            trace("Hello world") {
                model.transformer.h[1].output[(.., -1, ..)] = model.transformer.h[1].output[(.., -1, ..)] + &v;
                let loss = -model.lm_head.output[(.., -1, ..)].log_softmax(-1).i((.., 7)).sum();
                loss.backward();
            }
            losses.push(loss.double_value(&[]));
            opt.step().map_err(|e| nnsight::Error::torch("adam", e))?;
            opt.zero_grad().map_err(|e| nnsight::Error::torch("adam", e))?;
        }
    });
    assert!(losses[24] < 0.5 * losses[0], "the loss falls: {losses:?}");
    // The trained vector as a persistent edit makes token 7 the top prediction.
    let edited = intervene!(model.edit() {
        model.transformer.h[1].output[(.., -1, ..)] = model.transformer.h[1].output[(.., -1, ..)] + &v.detach();
    });
    let logits = edited.forward("Hello world")?;
    assert_eq!(logits.select(1, -1).argmax(-1, false).int64_value(&[0]), 7);
    Ok(())
}

#[test]
fn a_model_parameter_made_trainable_trains_and_a_grad_read_leaves_none() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let bias = model.parameter("transformer.h.1.mlp.c_proj.bias")?;
    // A `.grad` read makes the parameter require grad for that run only, and leaves no `.grad` behind.
    intervene!(model.trace("Hello world") {
        model.lm_head.output[(.., -1, 7)].sum().backward();
        let read = model.transformer.h[1].mlp.c_proj.bias.grad.save();
    });
    assert!(!bias.requires_grad() && !bias.grad().defined());

    let _ = bias.set_requires_grad(true);
    intervene!(model.trace("Hello world") {
        model.lm_head.output[(.., -1, 7)].sum().backward();
        let again = model.transformer.h[1].mlp.c_proj.bias.grad.save();
    });
    assert!(max_abs_diff(&bias.grad(), &read) < 1e-6, "the accumulated gradient equals the read one");
    assert!(max_abs_diff(&again, &read) < 1e-6);
    let before = model.forward("Hello world")?;
    tch::no_grad(|| {
        let _ = bias.shallow_clone().f_sub_(&(bias.grad() * 10.0));
    });
    let after = model.forward("Hello world")?;
    assert!(max_abs_diff(&before, &after) > 1e-4, "a step on the parameter changes the model");
    let _ = bias.set_requires_grad(false);
    Ok(())
}

#[test]
fn a_gradient_write_changes_what_a_trainable_tensor_receives() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let v = Tensor::zeros([64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let grad_with = |factor: f64| -> nnsight::Result<Tensor> {
        let mut v = v.shallow_clone();
        v.zero_grad();
        intervene!(model.trace("Hello world") {
            model.transformer.h[0].output = model.transformer.h[0].output + &v;
            let h = model.transformer.h[1].output;
            model.lm_head.output[(.., -1, 7)].sum().backward();
            h.grad = h.grad * factor;
        });
        Ok(v.grad().copy())
    };
    let once = grad_with(1.0)?;
    let doubled = grad_with(2.0)?;
    assert!(max_abs_diff(&doubled, &(&once * 2.0)) < 1e-5);
    Ok(())
}

#[test]
fn a_rank_4_lora_on_one_smollm2_mlp_learns_a_new_answer() -> nnsight::Result<()> {
    // `examples/lora.rs` in brief: " Rome" instead of " Paris" after the Eiffel prompt.
    let guard = common::smollm2();
    let model = &*guard;
    let prompt = "The Eiffel Tower is in the city of";
    let rome = model.encode(" Rome")?[0];
    tch::manual_seed(0);
    let a = (Tensor::randn([576, 4], (Kind::Float, Device::Cpu)) * 0.02).set_requires_grad(true);
    let b = Tensor::zeros([4, 576], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let torch = |e| nnsight::Error::torch("adam", e);
    let mut adam = tch::COptimizer::adam(1e-2, 0.9, 0.999, 0.0, 1e-8, false).map_err(torch)?;
    adam.add_parameters(&a, 0).map_err(torch)?;
    adam.add_parameters(&b, 0).map_err(torch)?;
    let weight = model.parameter("model.layers.12.mlp.down_proj.weight")?.copy();
    let mut losses = Vec::new();
    intervene!(model.session() {
        for _ in 0..12 {
            trace(prompt) {
                let x = model.model.layers[12].mlp.input;
                model.model.layers[12].mlp.output = model.model.layers[12].mlp.output + x.matmul(&a).matmul(&b) * 2.0;
                let loss = -model.lm_head.output[(.., -1, ..)].log_softmax(-1).i((.., rome)).sum();
                loss.backward();
            }
            losses.push(loss.double_value(&[]));
            adam.step().map_err(torch)?;
            adam.zero_grad().map_err(torch)?;
        }
    });
    assert!(losses[11] < losses[0] / 10.0, "the loss falls: {losses:?}");
    assert!(
        model.parameter("model.layers.12.mlp.down_proj.weight")?.equal(&weight),
        "the model's weights are untouched"
    );
    let (a, b) = (a.detach(), b.detach());
    let tuned = intervene!(model.edit() {
        let x = model.model.layers[12].mlp.input;
        model.model.layers[12].mlp.output = model.model.layers[12].mlp.output + x.matmul(&a).matmul(&b) * 2.0;
    });
    let logits = tuned.forward(prompt)?;
    assert_eq!(logits.select(1, -1).argmax(-1, false).int64_value(&[0]), rome);
    let plain = model.forward(prompt)?;
    assert_ne!(plain.select(1, -1).argmax(-1, false).int64_value(&[0]), rome);
    Ok(())
}
