//! Interventions during generation: `intervene!(model.generate(..) { .. })`, steps addressed with `iter(..)` and
//! `all()`, per-step saves, `model.generated()`, steps never reached, `stop()`, and invokes.

use crate::common::{self, max_abs_diff};
use nnsight::nn::Hook;
use nnsight::prelude::*;
use nnsight::GenerateOptions;

const EIFFEL: &str = "The Eiffel Tower is in the city of";
const MADRID: &str = "Madrid is the capital of";

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions::new().max_new_tokens(n).stop_ids([])
}

/// A plain hook that scales `module`'s output by `factor` at every call: the intervention "by hand".
struct ScaleEveryCall {
    module: &'static str,
    factor: f64,
    calls: usize,
}

impl Hook for ScaleEveryCall {
    fn input(&mut self, _: &str, x: Tensor) -> nnsight::Result<Tensor> {
        Ok(x)
    }
    fn output(&mut self, module: &str, y: Tensor) -> nnsight::Result<Tensor> {
        if module == self.module {
            self.calls += 1;
            return Ok(y * self.factor);
        }
        Ok(y)
    }
}

#[test]
fn a_traced_generation_without_edits_equals_plain_generate() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    let plain = model.generate(EIFFEL, &greedy(10))?;
    intervene!(model.generate(EIFFEL, greedy(10)) {
        let ids = model.generated().save();
    });
    assert_eq!(ids.rows, vec![plain.rows[0].ids()]);
    assert_eq!(model.decode(&ids.row()?[9..])?, " Paris.\n\nThe Eiffel Tower is a");
    assert_eq!(ids.texts(model)?, [format!("{EIFFEL} Paris.\n\nThe Eiffel Tower is a")]);
    Ok(())
}

#[test]
fn zeroing_an_mlp_at_every_step_equals_the_same_edit_by_hand() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    let opts = greedy(8);
    intervene!(model.generate(EIFFEL, &opts) {
        for _ in all() {
            model.model.layers[10].mlp.output = model.model.layers[10].mlp.output * 0.0;
        }
        let ids = model.generated().save();
    });
    let mut hook = ScaleEveryCall { module: "model.layers.10.mlp", factor: 0.0, calls: 0 };
    let by_hand = model.generate_hooked(&model.batch(EIFFEL)?, &opts, &mut hook, &mut |_| Ok(()))?;
    assert_eq!(hook.calls, 8, "one forward per new token");
    assert_eq!(ids.rows[0], by_hand.rows[0].ids());
    let plain = model.generate(EIFFEL, &opts)?;
    assert_ne!(ids.rows[0], plain.rows[0].ids(), "the ablation changes the continuation");
    Ok(())
}

#[test]
fn a_steering_vector_at_one_layer_changes_the_continuation() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    // The direction from the Eiffel prompt's layer-8 state to the Madrid prompt's, at the last position.
    intervene!(model.trace() {
        invoke(EIFFEL) {
            let a = model.model.layers[8].output[(.., -1, ..)].save();
        }
        invoke(MADRID) {
            let b = model.model.layers[8].output[(.., -1, ..)].save();
        }
    });
    let steer = (&b - &a) * 4.0;
    let opts = greedy(6);
    intervene!(model.generate(EIFFEL, &opts) {
        for _ in all() {
            model.model.layers[8].output[(.., -1, ..)] += &steer;
        }
        let steered = model.generated().save();
    });
    let plain = model.generate(EIFFEL, &opts)?;
    assert_ne!(steered.rows[0], plain.rows[0].ids());
    Ok(())
}

#[test]
fn per_step_saves_collect_into_a_vec() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    intervene!(model.generate(EIFFEL, greedy(4)) {
        let mut hidden = Vec::new();
        let mut logits = Vec::new();
        for step in iter(0..3) {
            hidden.push(model.model.layers[5].output[(.., -1, ..)].save());
            if step > 0 {
                logits.push(model.lm_head.output.save());
            }
        }
        let ids = model.generated().save();
    });
    assert_eq!(hidden.len(), 3);
    assert!(hidden.iter().all(|h| h.size() == vec![1, 576]));
    assert_eq!(logits.len(), 2);
    // Steps 1 and 2 are one-token forwards over the cache; their argmax is the token generated at that step.
    let row = ids.row()?;
    for (i, l) in logits.iter().enumerate() {
        assert_eq!(l.size(), vec![1, 1, 49152]);
        assert_eq!(l.argmax(-1, false).int64_value(&[0, 0]), row[9 + 1 + i]);
    }
    // Step 0's hidden state equals a plain trace's.
    intervene!(model.trace(EIFFEL) {
        let h = model.model.layers[5].output[(.., -1, ..)].save();
    });
    assert!(max_abs_diff(&hidden[0], &h) < 1e-4);
    Ok(())
}

#[test]
fn steps_after_the_generation_ended_keep_what_was_saved() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    // " Paris" then "." : stopping at "." (id 30) ends the generation after two steps.
    let opts = GenerateOptions::new().max_new_tokens(10).stop_ids([30]);
    intervene!(model.generate(EIFFEL, &opts) {
        // `generated()` holds nothing up: its value comes at the end, wherever it is asked for.
        let ids = model.generated().save();
        let mut seen = Vec::new();
        for _ in iter(0..6) {
            seen.push(model.lm_head.output.save());
        }
        // Code after the loop waits for a step that never came: skipped (a warning names the step).
        let n = seen.len();
    });
    assert_eq!(seen.len(), 2, "steps 0 and 1 ran");
    assert_eq!(n, 6, "the loop body was built for every step");
    assert_eq!(model.decode(&ids.row()?[9..])?, " Paris.");
    Ok(())
}

#[test]
fn stop_inside_a_generation_ends_it() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    intervene!(model.generate(EIFFEL, greedy(10)) {
        let mut seen = Vec::new();
        for _ in iter(0..2) {
            seen.push(model.model.layers[0].output.save());
        }
        model.stop();
    });
    assert_eq!(seen.len(), 2);
    Ok(())
}

#[test]
fn edits_in_one_invoke_leave_the_other_invokes_tokens_as_in_its_solo_run() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    let opts = greedy(6);
    intervene!(model.generate(&opts) {
        invoke(EIFFEL) {
            for _ in all() {
                model.model.layers[10].mlp.output = model.model.layers[10].mlp.output * 0.0;
            }
            let a = model.generated().save();
        }
        invoke(MADRID) {
            let b = model.generated().save();
        }
    });
    let solo_b = model.generate(MADRID, &opts)?;
    assert_eq!(b.rows[0], solo_b.rows[0].ids());
    let mut hook = ScaleEveryCall { module: "model.layers.10.mlp", factor: 0.0, calls: 0 };
    let solo_a = model.generate_hooked(&model.batch(EIFFEL)?, &opts, &mut hook, &mut |_| Ok(()))?;
    assert_eq!(a.rows[0], solo_a.rows[0].ids());
    Ok(())
}

#[test]
fn a_traced_generation_streams_its_tokens_through_on_token() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    let opts = greedy(6).on_token(move |step| {
        sink.lock().unwrap().push(step.tokens[0].expect("one row that does not stop"));
        Ok(())
    });
    intervene!(model.generate(EIFFEL, &opts) {
        for _ in all() {
            model.model.layers[10].mlp.output *= 0.0;
        }
        let ids = model.generated().save();
    });
    assert_eq!(*seen.lock().unwrap(), ids.row()?[9..].to_vec());
    // The same callback streams a plain generation, and an error from it ends the generation.
    let stop_early = greedy(6).on_token(|step| {
        if step.step == 2 {
            return Err(nnsight::Error::InvalidInput { message: "enough".into() });
        }
        Ok(())
    });
    let err = model.generate(EIFFEL, &stop_early).unwrap_err();
    assert!(err.to_string().contains("enough"), "{err}");
    Ok(())
}
