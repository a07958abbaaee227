//! Errors a new user meets, read as a user reads them: each names the place, what was expected and what was
//! given, quotes a path once, and carries no C++ backtrace.

use crate::common::tiny_gpt2;
use nnsight::prelude::*;
use nnsight::Error;

/// What every message must be free of.
fn assert_readable(e: &Error) {
    let text = e.to_string();
    for bad in ["``", "frame #", "Exception raised from", "Internal torch error"] {
        assert!(!text.contains(bad), "message contains {bad:?}: {text}");
    }
}

#[test]
fn an_index_past_an_inner_points_dimension_names_the_point_the_dimension_and_its_size() {
    let model = tiny_gpt2(); // 4 heads: head_output is [batch, seq, 4, 16]
    let read = (|| -> nnsight::Result<()> {
        intervene!(model.trace("Hello world") {
            let z = model.transformer.h[0].attn.head_output.output.i((.., .., 4)).save();
        });
        let _ = z;
        Ok(())
    })()
    .unwrap_err();
    assert!(matches!(read, Error::IndexOutOfRange { index: 4, len: 4, dim: Some(2), .. }), "{read:?}");
    let text = read.to_string();
    assert!(text.contains("`model.transformer.h.0.attn.head_output` output"), "{text}");
    assert!(text.contains("dimension 2") && text.contains("size is 4"), "{text}");
    assert_readable(&read);

    // Negative indices count from the end; one past the start is out of range too.
    let negative = (|| -> nnsight::Result<()> {
        intervene!(model.trace("Hello world") {
            let z = model.transformer.h[0].attn.head_output.output.i((.., .., -5)).save();
        });
        let _ = z;
        Ok(())
    })()
    .unwrap_err();
    assert!(matches!(negative, Error::IndexOutOfRange { index: -5, len: 4, dim: Some(2), .. }), "{negative:?}");

    // A write through an index says the same, and the model's output is untouched.
    let write = (|| -> nnsight::Result<()> {
        intervene!(model.trace("Hello world") {
            model.transformer.h[0].attn.head_output.output[(.., .., 7)] = 0.0;
        });
        Ok(())
    })()
    .unwrap_err();
    assert!(matches!(write, Error::IndexOutOfRange { index: 7, len: 4, dim: Some(2), .. }), "{write:?}");
    assert!(write.to_string().contains("`model.transformer.h.0.attn.head_output` output"), "{write}");
    assert_readable(&write);

    // A scan finds it from the shapes alone, before anything runs.
    let scanned = (|| -> nnsight::Result<()> {
        intervene!(model.scan("Hello world") {
            let z = model.transformer.h[1].attn.head_output.output.i((.., .., 4)).save();
        });
        let _ = z;
        Ok(())
    })()
    .unwrap_err();
    assert!(matches!(scanned, Error::IndexOutOfRange { dim: Some(2), .. }), "{scanned:?}");

    // A computed value is named by the node that computed it.
    let computed = (|| -> nnsight::Result<()> {
        intervene!(model.trace("Hello world") {
            let z = (model.transformer.h[0].output * 2.0).i((.., 3)).save(); // 3 tokens: 0..=2
        });
        let _ = z;
        Ok(())
    })()
    .unwrap_err();
    assert!(matches!(computed, Error::IndexOutOfRange { index: 3, len: 3, dim: Some(1), .. }), "{computed:?}");
    assert!(computed.to_string().contains("node"), "{computed}");
}

#[test]
fn a_skip_value_with_other_rows_says_the_rows_it_needs() {
    let model = tiny_gpt2();
    let bad = (|| -> nnsight::Result<()> {
        intervene!(model.trace("Hello world") {
            model.transformer.h[1].skip(Tensor::zeros([2, 3, 64], (Kind::Float, Device::Cpu)));
        });
        Ok(())
    })()
    .unwrap_err();
    assert!(matches!(bad, Error::BatchRows { rows: 1, .. }), "{bad:?}");
    let text = bad.to_string();
    assert!(text.contains("skip of `model.transformer.h.1`"), "{text}");
    assert!(text.contains("first dimension must be 1 (the invoke's rows)") && text.contains("[2, 3, 64]"), "{text}");
    assert_readable(&bad);
}

#[test]
fn a_libtorch_failure_inside_an_intervention_names_the_node_without_a_backtrace() {
    let model = tiny_gpt2();
    let err = (|| -> nnsight::Result<()> {
        intervene!(model.trace("Hello world") {
            let h = model.transformer.h[0].output; // [1, 3, 64]
            let bad = h.matmul(h).save(); // [1, 3, 64] @ [1, 3, 64]: inner sizes differ
        });
        let _ = bad;
        Ok(())
    })()
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Intervention { .. }), "{err:?}");
    assert!(text.contains("node") && text.to_lowercase().contains("matmul"), "{text}");
    assert_readable(&err);
}

#[test]
fn an_index_past_a_module_list_names_the_list_and_its_length() {
    let model = tiny_gpt2();
    let err = (|| -> nnsight::Result<()> {
        intervene!(model.trace("Hello world") {
            let h = model.transformer.h[5].output.save();
        });
        let _ = h;
        Ok(())
    })()
    .unwrap_err();
    assert!(matches!(err, Error::IndexOutOfRange { index: 5, len: 2, dim: None, .. }), "{err:?}");
    assert_eq!(err.to_string(), "index 5 is out of range for `model.transformer.h`, which has 2 modules");
}
