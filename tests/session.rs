//! Sessions: several traces (and generations) in one `intervene!`, with values crossing traces without `.save()`
//! and Rust loops around traces.

use crate::common::{self, max_abs_diff, Recorder};
use nnsight::prelude::*;

#[test]
fn a_value_of_one_trace_is_usable_in_the_next_without_save() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let mut rec = Recorder::default();
    let _ = model.forward_with_hook(&model.batch("Hello world")?, &mut rec)?;
    let plain_h0 = &rec.outputs["transformer.h.0"];
    intervene!(model.session() {
        trace("Hello world") {
            let h = model.transformer.h[0].output;
        }
        // `h` is the value now (kept automatically), used as a constant in the next trace.
        trace("Hello world") {
            model.transformer.h[0].output = &h * 2.0;
            let seen = model.transformer.h[1].input;
        }
    });
    assert!(max_abs_diff(&h, plain_h0) < 1e-6);
    assert!(max_abs_diff(&seen, &(plain_h0 * 2.0)) < 1e-5);
    Ok(())
}

#[test]
fn rust_loops_around_traces_and_generations_in_a_session() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let mut norms = Vec::new();
    let options = GenerateOptions::new().max_new_tokens(3).stop_ids([]);
    intervene!(model.session() {
        trace("Hello world") {
            let base = model.transformer.h[0].output.norm();
        }
        for k in 1..=3 {
            trace("Hello world") {
                model.transformer.h[0].output *= k as f64;
                let n = model.transformer.h[0].output.norm();
            }
            norms.push(n.double_value(&[]) / base.double_value(&[]));
        }
        generate("Hello world", &options) {
            let ids = model.generated();
        }
    });
    for (k, r) in norms.iter().enumerate() {
        assert!((r - (k + 1) as f64).abs() < 1e-4, "{norms:?}");
    }
    assert_eq!(ids.rows[0].len(), model.encode("Hello world")?.len() + 3);
    Ok(())
}
