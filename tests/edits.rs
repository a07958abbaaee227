//! Persistent edits: `intervene!(model.edit() { .. })` gives an edited model sharing the weights,
//! `edit_in_place` edits the model itself; edits apply to every later trace, forward, generation step and scan,
//! stack, and clearing them restores the original outputs exactly.

use crate::common::{self, max_abs_diff};
use nnsight::prelude::*;
use nnsight::Error;

/// Bitwise equality (same shape, every element identical).
fn same(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.equal(b)
}

#[test]
fn an_edited_model_applies_its_edit_and_leaves_the_model_as_it_was() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let plain = model.forward("Hello world")?;
    let edited = intervene!(model.edit() {
        model.transformer.h[0].mlp.output = model.transformer.h[0].mlp.output * 0.0;
    });
    // The same write made inside a trace.
    intervene!(model.trace("Hello world") {
        model.transformer.h[0].mlp.output = model.transformer.h[0].mlp.output * 0.0;
        let inline = model.lm_head.output.save();
    });
    let by_edit = edited.forward("Hello world")?;
    assert!(same(&by_edit, &inline), "edited forward = the write in a trace");
    assert!(max_abs_diff(&by_edit, &plain) > 1e-3, "the edit changes the output");

    // Traces of the edited model apply the edit first, then their own code, which sees the edited values.
    intervene!(edited.trace("Hello world") {
        let mlp = edited.transformer.h[0].mlp.output.save();
        let traced = edited.lm_head.output.save();
    });
    assert_eq!(mlp.abs().max().double_value(&[]), 0.0);
    assert!(same(&traced, &inline));

    // The model itself is untouched: same weights, no edit.
    assert!(same(&model.forward("Hello world")?, &plain));
    drop(edited);
    assert!(same(&model.forward("Hello world")?, &plain));
    Ok(())
}

#[test]
fn an_edit_applies_to_any_batch() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let edited = intervene!(model.edit() {
        model.transformer.h[1].output[(.., -1, ..)] = model.transformer.h[1].output[(.., -1, ..)] * 3.0;
    });
    let prompts = ["Hello world", "The cat sat on the mat", "A"];
    intervene!(model.trace(prompts) {
        model.transformer.h[1].output[(.., -1, ..)] = model.transformer.h[1].output[(.., -1, ..)] * 3.0;
        let inline = model.lm_head.output.save();
    });
    assert!(same(&edited.forward(prompts)?, &inline));
    // Invokes of different sizes: the edit sees the whole batch, each invoke its own rows after it.
    intervene!(edited.trace() {
        invoke(["Hello world", "The cat sat on the mat"]) {
            let two = edited.lm_head.output.save();
        }
        invoke("A") {
            let one = edited.lm_head.output.save();
        }
    });
    assert!(same(&two, &inline.narrow(0, 0, 2)));
    assert!(same(&one, &inline.narrow(0, 2, 1)));
    Ok(())
}

#[test]
fn in_place_edits_stack_and_clearing_restores_the_outputs_exactly() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let plain = model.forward("Hello world")?;
    intervene!(model.edit_in_place() {
        model.transformer.h[0].output = model.transformer.h[0].output * 2.0;
    });
    assert_eq!(model.edit_count(), 1);
    intervene!(model.edit_in_place() {
        model.transformer.h[0].output = model.transformer.h[0].output * 3.0;
    });
    assert_eq!(model.edit_count(), 2);
    intervene!(model.trace("Hello world") {
        model.transformer.h[0].output = model.transformer.h[0].output * 6.0;
        let by_hand = model.lm_head.output.save();
    });
    model.clear_edits();
    let inline = {
        intervene!(model.trace("Hello world") {
            model.transformer.h[0].output = model.transformer.h[0].output * 6.0;
            let out = model.lm_head.output.save();
        });
        out
    };
    // While the edits were on, the trace's own ×6 came on top of their ×2×3.
    intervene!(model.trace("Hello world") {
        let h0 = model.transformer.h[0].output.save();
    });
    assert!(max_abs_diff(&by_hand, &inline) > 1e-3, "the edits applied under the trace's own write");
    assert!(same(&model.forward("Hello world")?, &plain), "cleared: the original outputs, bit for bit");

    intervene!(model.edit_in_place() {
        model.transformer.h[0].output = model.transformer.h[0].output * 2.0;
    });
    intervene!(model.edit_in_place() {
        model.transformer.h[0].output = model.transformer.h[0].output * 3.0;
    });
    intervene!(model.trace("Hello world") {
        let edited_h0 = model.transformer.h[0].output.save();
    });
    assert!(max_abs_diff(&edited_h0, &(&h0 * 6.0)) < 1e-5, "two edits stack: ×2 then ×3");
    model.clear_edits();
    assert!(same(&model.forward("Hello world")?, &plain));
    Ok(())
}

#[test]
fn edited_models_stack_over_the_same_weights() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    intervene!(model.trace("Hello world") {
        let h0 = model.transformer.h[0].output.save();
    });
    let doubled = intervene!(model.edit() {
        model.transformer.h[0].output = model.transformer.h[0].output * 2.0;
    });
    let sextupled = intervene!(doubled.edit() {
        doubled.transformer.h[0].output = doubled.transformer.h[0].output * 3.0;
    });
    assert_eq!((doubled.edit_count(), sextupled.edit_count()), (1, 2));
    let seen = |m: &Edited<'_, LanguageModel<Gpt2>>| -> nnsight::Result<Tensor> {
        intervene!(m.trace("Hello world") {
            let h = m.transformer.h[0].output.save();
        });
        Ok(h)
    };
    assert!(max_abs_diff(&seen(&doubled)?, &(&h0 * 2.0)) < 1e-5, "the first edited model keeps one edit");
    assert!(max_abs_diff(&seen(&sextupled)?, &(&h0 * 6.0)) < 1e-5);
    // An in-place edit of the model runs before the edited models' own edits.
    intervene!(model.edit_in_place() {
        model.transformer.h[0].output = model.transformer.h[0].output + 1.0;
    });
    assert!(max_abs_diff(&seen(&doubled)?, &((&h0 + 1.0) * 2.0)) < 1e-5);
    model.clear_edits();
    sextupled.clear_edits();
    assert!(same(&seen(&sextupled)?, &h0), "cleared: the model's own values");
    Ok(())
}

#[test]
fn an_edit_applies_at_every_generation_step() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    let opts = GenerateOptions::new().max_new_tokens(6).stop_ids([]);
    let prompt = "The Eiffel Tower is in the city of";
    intervene!(model.generate(prompt, &opts) {
        for _ in all() {
            model.model.layers[10].mlp.output = model.model.layers[10].mlp.output * 0.0;
        }
        let by_steps = model.generated().save();
    });
    let edited = intervene!(model.edit() {
        model.model.layers[10].mlp.output = model.model.layers[10].mlp.output * 0.0;
    });
    let generation = edited.generate(prompt, &opts)?;
    assert_eq!(generation.rows[0].ids(), by_steps.rows[0]);
    intervene!(edited.generate(prompt, &opts) {
        let traced = edited.generated().save();
    });
    assert_eq!(traced.rows[0], by_steps.rows[0]);
    assert_ne!(model.generate(prompt, &opts)?.rows[0].ids(), by_steps.rows[0], "the model itself is not edited");
    // The block sees the edited value at every step.
    intervene!(edited.generate(prompt, &opts) {
        let mut seen = Vec::new();
        for _ in all() {
            seen.push(edited.model.layers[10].mlp.output.abs().max().save());
        }
    });
    assert_eq!(seen.len(), 6);
    assert!(seen.iter().all(|m| m.double_value(&[]) == 0.0));
    Ok(())
}

#[test]
fn a_scan_of_an_edited_model_runs_the_edit_on_shapes() {
    let model = common::tiny_gpt2();
    let wrong = Tensor::zeros([1, 3, 7], (Kind::Float, Device::Cpu));
    let run = || -> nnsight::Result<()> {
        let edited = intervene!(model.edit() {
            model.transformer.h[1].output = &wrong;
        });
        intervene!(edited.scan("Hello world") {
            let out = edited.lm_head.output.save();
        });
        let _ = out;
        Ok(())
    };
    let err = run().unwrap_err();
    let Error::Edit { index: 0, source } = &err else { panic!("{err}") };
    assert!(matches!(**source, Error::WriteShape { .. }), "{err}");
    assert!(err.to_string().contains("persistent edit 0"), "{err}");
}

#[test]
fn an_edit_refuses_what_it_cannot_keep() {
    let model = common::tiny_gpt2();
    let run = || -> nnsight::Result<()> {
        let _edited = intervene!(model.edit() {
            let _h = model.transformer.h[0].output.save();
        });
        Ok(())
    };
    let err = run().unwrap_err();
    assert!(matches!(err, Error::NotAnEdit { .. }), "{err}");
    assert!(err.to_string().contains("save"), "{err}");
    let run = || -> nnsight::Result<()> {
        intervene!(model.edit_in_place() {
            model.stop();
        });
        Ok(())
    };
    assert!(matches!(run().unwrap_err(), Error::NotAnEdit { .. }));
    assert_eq!(model.edit_count(), 0, "a refused edit is not added");
}

#[test]
fn a_model_of_your_own_takes_edits_too() -> nnsight::Result<()> {
    let net = crate::intervene::two_layer();
    let x = Tensor::randn([3, 5], (Kind::Float, Device::Cpu));
    let plain = net.forward(&x)?;
    let edited = intervene!(net.edit() {
        net.layer1.output = 0.0;
    });
    intervene!(edited.trace(x.shallow_clone()) {
        let out = edited.output.save();
    });
    let bias = net.module().layer2.bias.as_ref().unwrap().expand([3, 2], false);
    assert!(max_abs_diff(&out, &bias) < 1e-6, "layer2 sees zeros");
    intervene!(net.edit_in_place() {
        net.layer2.output = net.layer2.output * 2.0;
    });
    assert!(max_abs_diff(&net.forward(&x)?, &(&plain * 2.0)) < 1e-5);
    net.clear_edits();
    assert!(same(&net.forward(&x)?, &plain));
    Ok(())
}
