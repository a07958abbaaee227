//! `intervene!(model.scan(..) { .. })`: the same block on shapes alone, through the model's meta twin. Scanned
//! shapes equal traced shapes for every module; shape errors surface without running the real model.

use crate::common;
use nnsight::envoy::{CallOrder, Prepared, ScanTarget, TraceTarget};
use nnsight::meta::is_meta;
use nnsight::nn::Hook;
use nnsight::prelude::*;
use nnsight::{Batch, Error};
use std::sync::Arc;

const PROMPTS: [&str; 2] = ["The Eiffel Tower is in the city of", "Madrid is"];

/// Every module's input and output, traced and scanned on a padded two-prompt batch: the same keys in the same
/// order, the same shapes and dtypes; every scanned value is meta (holds no data).
pub(crate) fn assert_scan_matches_trace<M: nnsight::models::CausalLm>(
    model: &LanguageModel<M>,
) -> nnsight::Result<usize> {
    intervene!(model.trace(PROMPTS) {
        let traced = model.cache_with(CacheOptions::default().inputs(true));
    });
    intervene!(model.scan(PROMPTS) {
        let scanned = model.cache_with(CacheOptions::default().inputs(true));
    });
    let traced: Vec<(&str, &Tensor)> = traced.iter().collect();
    let scanned: Vec<(&str, &Tensor)> = scanned.iter().collect();
    assert_eq!(
        traced.iter().map(|e| e.0).collect::<Vec<_>>(),
        scanned.iter().map(|e| e.0).collect::<Vec<_>>(),
        "the scan sees the same hook events as the trace"
    );
    for ((key, t), (_, s)) in traced.iter().zip(&scanned) {
        assert_eq!((t.size(), t.kind()), (s.size(), s.kind()), "{key}");
        assert!(is_meta(s) && !is_meta(t), "{key}: a scanned value is meta, a traced one is not");
    }
    let (key, logits) = scanned.last().expect("entries");
    assert_eq!((*key, logits.size()[0]), ("model.output", 2), "the logits of both prompts come last");
    Ok(traced.len())
}

#[test]
fn scanned_shapes_equal_traced_shapes_for_every_module_of_smollm2() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    let n = assert_scan_matches_trace(model)?;
    // embed, 30 x (layer, 2 norms, attention + 4 projections, mlp + 3 projections + act), norm, model, lm_head,
    // root: inputs and outputs.
    assert!(n >= 2 * (30 * 13 + 5), "{n} entries");
    // The twin is the real model's tree with meta parameters; the real model keeps its data.
    let twin = model.meta_model()?;
    let real = nnsight::nn::named_parameters(model.model());
    let meta = nnsight::nn::named_parameters(twin);
    assert_eq!(real.len(), meta.len());
    for ((rn, rt), (mn, mt)) in real.iter().zip(&meta) {
        assert_eq!((rn, rt.size(), rt.kind()), (mn, mt.size(), mt.kind()));
        assert!(is_meta(mt) && !is_meta(rt), "{rn}");
    }
    assert!(std::ptr::eq(twin, model.meta_model()?), "the twin is built once");
    Ok(())
}

#[test]
fn scanned_shapes_equal_traced_shapes_for_every_module_of_gpt2() -> nnsight::Result<()> {
    let n = assert_scan_matches_trace(&common::tiny_gpt2())?;
    assert!(n > 20, "{n} entries");
    Ok(())
}

#[test]
fn scan_gives_meta_values_of_the_traced_shapes() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let v = Tensor::ones([64], (Kind::Float, Device::Cpu));
    intervene!(model.scan("Hello world") {
        model.transformer.h[0].mlp.output[(.., -1)] += &v;
        let h = model.transformer.h[1].output.save();
        let moved = model.transformer.ln_f.output.to_device(Device::Cpu).to_kind(Kind::Double).save();
        let top = model.lm_head.output.i((.., -1)).softmax(-1).topk(5, -1).1.save();
    });
    assert!(is_meta(&h) && is_meta(&top) && is_meta(&moved));
    assert_eq!(h.size(), [1, 3, 64]);
    assert_eq!((top.size(), top.kind()), (vec![1, 5], Kind::Int64));
    assert_eq!((moved.size(), moved.kind()), (vec![1, 3, 64], Kind::Double));
    Ok(())
}

#[test]
fn a_wrong_shape_write_is_found_by_scan() {
    let model = common::tiny_gpt2();
    let wrong = Tensor::zeros([1, 3, 7], (Kind::Float, Device::Cpu));
    let run = || -> nnsight::Result<()> {
        intervene!(model.scan("Hello world") {
            model.transformer.h[1].output = &wrong;
        });
        Ok(())
    };
    let err = run().unwrap_err();
    let Error::WriteShape { target, expected, given } = &err else { panic!("{err}") };
    assert!(target.contains("model.transformer.h.1"), "{err}");
    assert_eq!((expected.as_slice(), given.as_slice()), ([1, 3, 64].as_slice(), [1, 3, 7].as_slice()));

    // An indexed write that does not broadcast.
    let run = || -> nnsight::Result<()> {
        intervene!(model.scan("Hello world") {
            model.transformer.h[0].mlp.output[(.., -1)] = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        });
        Ok(())
    };
    assert!(matches!(run().unwrap_err(), Error::WriteShape { .. }));
}

#[test]
fn a_shape_mismatch_in_graph_arithmetic_is_an_error_naming_the_node() {
    let guard = common::smollm2();
    let model = &*guard;
    let run = || -> nnsight::Result<()> {
        intervene!(model.scan("The Eiffel Tower") {
            let h = model.model.layers[2].output;
            // [1, s, 576] @ [1, s, 576]: the inner dimensions differ.
            let bad = h.matmul(h).save();
        });
        drop(bad);
        Ok(())
    };
    let err = run().unwrap_err().to_string();
    assert!(err.contains("node") && err.contains("matmul"), "{err}");
}

#[test]
fn two_invokes_in_a_scan() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    intervene!(model.scan() {
        invoke(PROMPTS[0]) {
            let a = model.model.layers[5].output.save();
            model.model.layers[6].mlp.output = model.model.layers[6].mlp.output * 0.0;
        }
        invoke(vec![PROMPTS[1], "Rome"]) {
            let b = model.model.layers[5].output.save();
            let logits = model.output.i((.., -1)).save();
        }
    });
    // Each invoke sees its own rows of the left-padded batch (9 tokens).
    assert!(is_meta(&a) && is_meta(&b) && is_meta(&logits));
    assert_eq!(a.size(), [1, 9, 576]);
    assert_eq!(b.size(), [2, 9, 576]);
    assert_eq!(logits.size(), [2, 49152]);
    Ok(())
}

#[test]
fn scan_logs_shapes() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let (result, lines) = nnsight::interleave::capture_logs(|| -> nnsight::Result<()> {
        intervene!(model.scan("Hello world") {
            log!(model.transformer.h[0].output.norm());
            log!(model.transformer.h[0].output);
        });
        Ok(())
    });
    result?;
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].contains("Tensor[[], Float]") && lines[1].contains("[1, 3, 64]"), "{lines:?}");
    Ok(())
}

/// A language model whose real forward must not run: every real pass panics.
struct NoRealRuns(LanguageModel<Gpt2>);

impl TraceTarget for NoRealRuns {
    type Root = Gpt2;
    type Input = Input;
    type Prepared = Batch;
    fn root(&self) -> &Gpt2 {
        self.0.root()
    }
    type View = <LanguageModel<Gpt2> as TraceTarget>::View;
    fn view(&self) -> &Self::View {
        self.0.view()
    }
    fn call_order(&self, _: Option<&Input>) -> nnsight::Result<Option<Arc<CallOrder>>> {
        panic!("the real model ran (call order)")
    }
    fn prepare(&self, inputs: &[Option<Input>]) -> nnsight::Result<Prepared<Batch>> {
        self.0.prepare(inputs)
    }
    fn forward_hooked(&self, _: &Batch, _: &mut dyn Hook) -> nnsight::Result<()> {
        panic!("the real model ran (forward)")
    }
}

impl ScanTarget for NoRealRuns {
    fn scan_root(&self) -> nnsight::Result<&Gpt2> {
        self.0.scan_root()
    }
    fn scan_call_order(&self) -> nnsight::Result<Option<Arc<CallOrder>>> {
        self.0.scan_call_order()
    }
    fn forward_scan(&self, batch: &Batch, hook: &mut dyn Hook) -> nnsight::Result<()> {
        self.0.forward_scan(batch, hook)
    }
}

#[test]
fn scan_runs_nothing_real() -> nnsight::Result<()> {
    let model = NoRealRuns(common::tiny_gpt2());
    let wrong = Tensor::zeros([5], (Kind::Float, Device::Cpu));
    let run = |write: bool| -> nnsight::Result<Tensor> {
        intervene!(model.scan("Hello world") {
            let h = model.transformer.h[0].output.save();
            if write {
                model.transformer.h[1].output = &wrong;
            }
        });
        Ok(h)
    };
    assert_eq!(run(false)?.size(), [1, 3, 64]);
    assert!(matches!(run(true), Err(Error::WriteShape { .. })));
    // Out-of-order reads are found by the call order recorded on the twin.
    let run = || -> nnsight::Result<()> {
        intervene!(model.scan("Hello world") {
            let late = model.transformer.h[1].output.save();
            let early = model.transformer.h[0].output.save();
        });
        Ok(())
    };
    assert!(matches!(run(), Err(Error::OutOfOrder { .. })), "{:?}", run());
    Ok(())
}

#[test]
fn scan_checks_inner_points_and_both_branches_of_a_condition() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    intervene!(model.trace("Hello world") {
        let traced = model.transformer.h[0].attn.probs.output.save();
    });
    intervene!(model.scan("Hello world") {
        let probs = model.transformer.h[0].attn.probs.output.save();
        let h = model.transformer.h[0].output;
        let y = if cond!(h.norm() > 1e9 && h.max() < 1e6) { h * 0.5 } else { h.softmax(-1) };
        model.transformer.h[1].output = y;
    });
    assert!(is_meta(&probs));
    assert_eq!(probs.size(), traced.size());
    // A wrong shape in either branch is found, whichever the values would pick.
    let wrong = Tensor::zeros([1, 3, 7], (Kind::Float, Device::Cpu));
    for then_wrong in [true, false] {
        let run = || -> nnsight::Result<()> {
            intervene!(model.scan("Hello world") {
                let h = model.transformer.h[0].output;
                if cond!(h.norm() > 1e9) {
                    if then_wrong {
                        model.transformer.h[1].output = &wrong;
                    }
                } else if !then_wrong {
                    model.transformer.h[1].output = &wrong;
                }
            });
            Ok(())
        };
        assert!(matches!(run(), Err(Error::WriteShape { .. })), "then branch wrong: {then_wrong}: {:?}", run());
    }
    Ok(())
}

#[test]
fn skip_and_stop_in_a_scan() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    intervene!(model.scan("Hello world") {
        model.transformer.h[0].skip(model.transformer.h[0].input * 2.0);
        let h1 = model.transformer.h[1].output.save();
        model.stop();
    });
    assert!(is_meta(&h1));
    assert_eq!(h1.size(), [1, 3, 64]);
    let run = || -> nnsight::Result<()> {
        intervene!(model.scan("Hello world") {
            model.transformer.h[0].skip(model.transformer.h[0].input.i((.., 0)));
        });
        Ok(())
    };
    // A skip value is checked for its rows only: the first module that cannot take it says so (an error, not a
    // panic).
    let err = run().unwrap_err();
    assert!(err.to_string().contains("transformer.h.1.attn"), "{err}");
    Ok(())
}

/// Llama with grouped-query attention, rope scaling, biases, and Mistral's sliding-window mask, loaded as whichever
/// architecture the checkpoint holds.
#[test]
fn a_model_of_any_registered_architecture_scans() -> nnsight::Result<()> {
    for dir in ["tiny-llama", "tiny-mistral"] {
        let model = LanguageModel::<AutoModel>::load_with(common::data(dir), common::opts())?;
        let n = assert_scan_matches_trace(&model)?;
        assert!(n >= 4, "{dir}: {n} entries");
        let long = "one two three four five six seven eight nine ten eleven twelve";
        intervene!(model.trace(long) {
            let traced = model.output.save();
        });
        intervene!(model.scan(long) {
            let logits = model.output.save();
        });
        assert!(is_meta(&logits) && !is_meta(&traced));
        assert_eq!((logits.size(), logits.kind()), (traced.size(), traced.kind()), "{dir}");
    }
    Ok(())
}
