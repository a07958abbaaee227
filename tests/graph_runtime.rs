//! The graph runtime without the macro: the calls `intervene!` generates, written by hand.

use crate::common::{self, max_abs_diff, Recorder};
use nnsight::__private as nn;
use nnsight::prelude::*;
use nnsight::Error;

#[test]
fn a_saved_read_equals_the_module_output() {
    let model = common::tiny_gpt2();
    let tr = nn::Trace::new(&model, Some("Hello world".into())).unwrap();
    let (root, g) = (tr.root(), tr.graph());
    let h = nn::read(g, &nn::at(&root.transformer.h, 0).unwrap().output).unwrap().save();
    let logits = nn::read(g, &root.output).unwrap().save();
    let mut results = tr.run().unwrap();
    let h: Tensor = results.take(h.node()).unwrap();
    let logits: Tensor = results.take(logits.node()).unwrap();

    let mut rec = Recorder::default();
    let plain = model.forward_with_hook(&model.batch("Hello world").unwrap(), &mut rec).unwrap();
    assert_eq!(max_abs_diff(&h, &rec.outputs["transformer.h.0"]), 0.0);
    assert_eq!(max_abs_diff(&logits, &plain), 0.0);
}

#[test]
fn a_write_changes_what_follows_and_reads_back() {
    let model = common::tiny_gpt2();
    let tr = nn::Trace::new(&model, Some("Hello world".into())).unwrap();
    let (root, g) = (tr.root(), tr.graph());
    let mlp = &nn::at(&root.transformer.h, -1).unwrap().mlp;
    let zero = nn::read(g, &mlp.output).unwrap() * 0.0;
    nn::write(g, &mlp.output, zero).unwrap();
    let after = nn::read(g, &mlp.output).unwrap().save();
    let logits = nn::read(g, &root.output).unwrap().save();
    let mut r = tr.run().unwrap();
    let after: Tensor = r.take(after.node()).unwrap();
    let logits: Tensor = r.take(logits.node()).unwrap();
    assert_eq!(after.abs().max().double_value(&[]), 0.0);
    let plain = model.forward("Hello world").unwrap();
    assert!(max_abs_diff(&logits, &plain) > 1e-3);
}

#[test]
fn build_time_errors_name_the_module() {
    let model = common::tiny_gpt2();
    let tr = nn::Trace::new(&model, Some("Hello world".into())).unwrap();
    let (root, g) = (tr.root(), tr.graph());
    let err = nn::at(&root.transformer.h, 7).err().unwrap();
    assert_eq!(err.to_string(), "index 7 is out of range for `model.transformer.h`, which has 2 modules");
    nn::read::<Tensor>(g, &nn::at(&root.transformer.h, 1).unwrap().output).unwrap();
    let err = nn::read::<Tensor>(g, &nn::at(&root.transformer.h, 0).unwrap().output).err().unwrap();
    assert!(matches!(err, Error::OutOfOrder { .. }), "{err}");
    assert!(
        err.to_string().contains("model.transformer.h.0") && err.to_string().contains("model.transformer.h.1"),
        "{err}"
    );
}

#[test]
fn a_write_of_the_wrong_shape_is_an_error_and_the_model_stays_usable() {
    let model = common::tiny_gpt2();
    let tr = nn::Trace::new(&model, Some("Hello world".into())).unwrap();
    let (root, g) = (tr.root(), tr.graph());
    let bad = Tensor::zeros([1, 3, 7], (Kind::Float, Device::Cpu));
    nn::write(g, &root.transformer.ln_f.output, &bad).unwrap();
    let err = tr.run().err().unwrap();
    let Error::WriteShape { expected, given, .. } = &err else { panic!("{err}") };
    assert_eq!((expected.as_slice(), given.as_slice()), (&[1i64, 3, 64][..], &[1i64, 3, 7][..]));
    assert!(err.to_string().contains("model.transformer.ln_f"), "{err}");
    assert!(model.forward("Hello world").is_ok());
}

#[test]
fn invokes_see_their_own_rows_and_leave_others_bit_identical() {
    let model = common::tiny_gpt2();
    let run = |edit: bool| {
        let tr = nn::Trace::new(&model, None).unwrap();
        let (root, g) = (tr.root(), tr.graph());
        tr.invoke(Some("Hello world".into())).unwrap();
        let a = nn::read(g, &root.output).unwrap().save();
        tr.invoke(Some("The quick brown fox".into())).unwrap();
        if edit {
            let h = &nn::at(&root.transformer.h, 0).unwrap().output;
            nn::write(g, h, nn::read(g, h).unwrap() * 3.0).unwrap();
        }
        let b = nn::read(g, &root.output).unwrap().save();
        let mut r = tr.run().unwrap();
        (r.take::<Tensor>(a.node()).unwrap(), r.take::<Tensor>(b.node()).unwrap())
    };
    let (a0, b0) = run(false);
    let (a1, b1) = run(true);
    assert_eq!(a0.size(), vec![1, 9, 512]);
    assert_eq!(max_abs_diff(&a0, &a1), 0.0, "invoke 0 must be bit-identical");
    assert!(max_abs_diff(&b0, &b1) > 1e-3, "invoke 1 was edited");
}
