//! Conditionals decided by graph values (`if cond!(..)`), user functions (`#[nnsight::function]`, `call!`), and
//! the graph's JSON form: every node kind round-trips, and the committed example graph stays what a block builds.

use crate::common::{self, max_abs_diff, Recorder};
use nnsight::graph::{capture_graphs, Graph, Op, TensorOp};
use nnsight::prelude::*;
use nnsight::Error;

/// Layer outputs of a plain run.
fn plain(model: &LanguageModel<Gpt2>, text: &str) -> Recorder {
    let mut rec = Recorder::default();
    let _ = model.forward_with_hook(&model.batch(text).unwrap(), &mut rec).unwrap();
    rec
}

/// Zeroes layer 0's output when its norm exceeds `threshold`: one block, decided when the graph runs.
fn zero_if_norm_above(model: &LanguageModel<Gpt2>, threshold: f64) -> nnsight::Result<(Tensor, Tensor)> {
    intervene!(model.trace("Hello world") {
        let norm = model.transformer.h[0].output.norm().save();
        if cond!(norm > threshold) {
            model.transformer.h[0].output = model.transformer.h[0].output * 0.0;
        }
        let after = model.transformer.h[1].input.save();
    });
    Ok((norm, after))
}

#[test]
fn a_condition_on_a_graph_value_edits_only_when_it_holds() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let rec = plain(&model, "Hello world");
    let ln_1_input = &rec.outputs["transformer.h.0"];
    let norm = ln_1_input.norm().double_value(&[]);
    // Below the norm: the branch runs and layer 1 sees zeros.
    let (seen, after) = zero_if_norm_above(&model, norm - 1.0)?;
    assert!((seen.double_value(&[]) - norm).abs() < 1e-4);
    assert_eq!(after.abs().sum(Kind::Float).double_value(&[]), 0.0);
    // Above it: the same code leaves the pass untouched.
    let (_, after) = zero_if_norm_above(&model, norm + 1.0)?;
    assert_eq!(max_abs_diff(&after, ln_1_input), 0.0);
    // The decision is a graph node, not Rust control flow: the graph holds a guard whichever way it goes.
    let (_, graphs) = capture_graphs(|| zero_if_norm_above(&model, norm + 1.0));
    let guards = graphs[0].nodes.iter().filter(|n| matches!(n.op, Op::Guard { .. })).count();
    assert_eq!(guards, 1, "{}", graphs[0].to_json());
    Ok(())
}

#[test]
fn an_if_with_else_has_the_value_of_the_branch_that_ran() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let rec = plain(&model, "Hello world");
    let h0 = &rec.outputs["transformer.h.0"];
    let norm = h0.norm().double_value(&[]);
    for (threshold, want) in [(norm - 1.0, 0.5), (norm + 1.0, 2.0)] {
        intervene!(model.trace("Hello world") {
            let n = model.transformer.h[0].output.norm();
            let scale = if cond!(n > threshold) { 0.5 } else { 2.0 };
            model.transformer.h[0].output = model.transformer.h[0].output * scale;
            let after = model.transformer.h[1].input.save();
        });
        assert!(max_abs_diff(&after, &(h0 * want)) < 1e-5, "threshold {threshold}");
    }
    Ok(())
}

#[test]
fn else_if_chains_logic_and_proxy_branches() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let rec = plain(&model, "Hello world");
    let h0 = &rec.outputs["transformer.h.0"];
    let norm = h0.norm().double_value(&[]);
    // `||`, `!`, `>=`, `<=`, `!=` and an else-if chain whose middle branch holds; branches give proxies.
    intervene!(model.trace("Hello world") {
        let h = model.transformer.h[0].output;
        let n = h.norm();
        let picked = if cond!(n < 0.0 || n >= norm + 1.0) {
            h * 3.0
        } else if cond!(!(n <= 0.0) && n != norm + 5.0) {
            h * 5.0
        } else {
            h * 7.0
        };
        let picked = picked.save();
    });
    assert!(max_abs_diff(&picked, &(h0 * 5.0)) < 1e-4);
    Ok(())
}

#[test]
fn branches_each_start_from_the_same_point_in_the_forward_pass() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let rec = plain(&model, "Hello world");
    // The then branch edits layer 1, the else branch layer 0 (earlier): only one of them runs, so this is in
    // order. The condition is known before either layer runs. After the `if`, code comes after both branches.
    for big in [true, false] {
        intervene!(model.trace("Hello world") {
            let e = model.transformer.wte.output.norm();
            if cond!(e > if big { -1.0 } else { 1e9 }) {
                model.transformer.h[1].output = model.transformer.h[1].output * 0.0;
            } else {
                model.transformer.h[0].output = model.transformer.h[0].output * 0.0;
            }
            let h1 = model.transformer.h[1].output.save();
        });
        let zero = h1.abs().sum(Kind::Float).double_value(&[]) == 0.0;
        assert_eq!(zero, big);
        // Layer 0 zeroed instead: layer 1 ran on zeros, so its output differs from the plain run's.
        if !big {
            assert!(max_abs_diff(&h1, &rec.outputs["transformer.h.1"]) > 1e-3);
        }
    }
    Ok(())
}

#[test]
fn a_value_from_a_branch_that_did_not_run_is_an_error_naming_it() {
    let model = common::tiny_gpt2();
    let run = || -> nnsight::Result<()> {
        intervene!(model.trace("Hello world") {
            let h = model.transformer.h[0].output;
            let mut x = h * 1.0;
            if cond!(h.norm() < 0.0) {
                x = x * 2.0;
            }
            model.transformer.h[1].output = x;
        });
        Ok(())
    };
    let err = run().unwrap_err();
    assert!(matches!(err, Error::Intervention { .. }), "{err}");
    assert!(err.to_string().contains("branch"), "{err}");
    // A condition must be one value.
    let run = || -> nnsight::Result<()> {
        intervene!(model.trace("Hello world") {
            let h = model.transformer.h[0].output;
            if cond!(h > 0.0) {
                model.transformer.h[1].output = h * 2.0;
            }
        });
        Ok(())
    };
    let err = run().unwrap_err().to_string();
    assert!(err.contains("single value"), "{err}");
    assert!(model.forward("Hello").is_ok());
}

#[test]
fn conditions_per_invoke_decide_for_their_own_rows() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let (a, b) = ("Hello world", "Goodbye moon");
    intervene!(model.trace() {
        invoke(a) {
            if cond!(model.transformer.h[0].output.norm() > 0.0) {
                model.transformer.h[0].output = model.transformer.h[0].output * 0.0;
            }
            let ha = model.transformer.h[1].input.save();
        }
        invoke(b) {
            if cond!(model.transformer.h[0].output.norm() < 0.0) {
                model.transformer.h[0].output = model.transformer.h[0].output * 0.0;
            }
            let hb = model.transformer.h[1].input.save();
        }
    });
    assert_eq!(ha.abs().sum(Kind::Float).double_value(&[]), 0.0);
    assert_eq!(max_abs_diff(&hb, &plain(&model, b).outputs["transformer.h.0"]), 0.0);
    Ok(())
}

/// Scales each position's vector to at most `max` in L2 norm.
#[nnsight::function]
fn clamp_norm(x: &Tensor, max: f64) -> Tensor {
    let norm = x.norm_scalaropt_dim(2.0, [-1], true);
    x / (norm / max).clamp_min(1.0)
}

/// Adds `k` times `direction` (any shape that broadcasts); refuses a negative `k`.
#[nnsight::function]
fn steer(x: Tensor, direction: &Tensor, k: f64, enabled: bool) -> Result<Tensor, String> {
    if k < 0.0 {
        return Err(format!("k must not be negative, got {k}"));
    }
    Ok(if enabled { x + direction * k } else { x })
}

#[test]
fn user_functions_run_in_the_graph() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let rec = plain(&model, "Hello world");
    let h0 = &rec.outputs["transformer.h.0"];
    let direction = Tensor::ones([64], (Kind::Float, Device::Cpu));
    intervene!(model.trace("Hello world") {
        let h = model.transformer.h[0].output;
        model.transformer.h[0].output = call!(clamp_norm(h, 1.5));
        let clamped = model.transformer.h[1].input.save();
        let steered = call!(steer(clamped, &direction, 2.0, true)).save();
    });
    assert!(max_abs_diff(&clamped, &clamp_norm(h0, 1.5)) < 1e-6);
    let norms = clamped.norm_scalaropt_dim(2.0, [-1], false);
    assert!(norms.max().double_value(&[]) <= 1.5 + 1e-4);
    assert!(max_abs_diff(&steered, &(&clamped + 2.0)) < 1e-6);
    assert_eq!(clamp_norm::NAME, concat!(module_path!(), "::clamp_norm"));
    assert!(nnsight::function::names().contains(&clamp_norm::NAME.to_string()));
    Ok(())
}

#[test]
fn a_failing_user_function_is_an_error_naming_it() {
    let model = common::tiny_gpt2();
    let direction = Tensor::ones([64], (Kind::Float, Device::Cpu));
    let run = |k: f64, dir: &Tensor| -> nnsight::Result<()> {
        intervene!(model.trace("Hello world") {
            let h = model.transformer.h[0].output;
            model.transformer.h[0].output = call!(steer(h, dir, k, true));
        });
        Ok(())
    };
    // An `Err` from the function.
    let err = run(-1.0, &direction).unwrap_err().to_string();
    assert!(err.contains("steer") && err.contains("k must not be negative"), "{err}");
    // A panic inside it (tch's `+` on shapes that do not broadcast).
    let err = run(1.0, &Tensor::ones([7], (Kind::Float, Device::Cpu))).unwrap_err().to_string();
    assert!(err.contains("steer") && err.contains("failed"), "{err}");
    assert!(model.forward("Hello").is_ok());
}

#[test]
fn a_graph_calling_an_unregistered_function_is_refused_naming_it() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let (_, graphs) = capture_graphs(|| -> nnsight::Result<()> {
        intervene!(model.trace("Hello world") {
            let h = model.transformer.h[0].output;
            let c = call!(clamp_norm(h, 1.0)).save();
        });
        Ok(())
    });
    let json = graphs[0].to_json();
    assert!(json.contains("\"op\": \"call\""), "{json}");
    assert_eq!(Graph::from_json(&json)?, graphs[0]);
    let renamed = json.replace(clamp_norm::NAME, "elsewhere::not_here");
    match Graph::from_json(&renamed) {
        Err(Error::UnknownFunction { name, known }) => {
            assert_eq!(name, "elsewhere::not_here");
            assert!(known.contains(&clamp_norm::NAME.to_string()));
        }
        other => panic!("expected UnknownFunction, got {other:?}"),
    }
    Ok(())
}

/// Which op `op` is (a [`TensorOp`] counting as its own kind). No wildcard arm: a new node kind fails to compile
/// here until the round-trip test below covers it.
fn kind_index(op: &Op) -> usize {
    match op {
        Op::Read { .. } => 0,
        Op::ReadInputs { .. } => 1,
        Op::Write { .. } => 2,
        Op::Skip { .. } => 3,
        Op::Apply { .. } => 4,
        Op::Const { .. } => 5,
        Op::Save { .. } => 6,
        Op::Tensor(t) => match t {
            TensorOp::Binary { .. } => 7,
            TensorOp::BinaryScalar { .. } => 8,
            TensorOp::Unary { .. } => 9,
            TensorOp::Reduce { .. } => 10,
            TensorOp::MaxMinDim { .. } => 11,
            TensorOp::Norm { .. } => 12,
            TensorOp::Softmax { .. } => 13,
            TensorOp::Argmax { .. } => 14,
            TensorOp::Topk { .. } => 15,
            TensorOp::Reshape { .. } => 16,
            TensorOp::Transpose { .. } => 17,
            TensorOp::Permute { .. } => 18,
            TensorOp::Narrow { .. } => 19,
            TensorOp::Select { .. } => 20,
            TensorOp::Index { .. } => 21,
            TensorOp::Cat { .. } => 22,
            TensorOp::Stack { .. } => 23,
            TensorOp::ToKind { .. } => 24,
            TensorOp::ToDevice { .. } => 25,
            TensorOp::Where { .. } => 26,
            TensorOp::Gather { .. } => 27,
            TensorOp::TupleGet { .. } => 28,
            TensorOp::Unsqueeze { .. } => 29,
            TensorOp::Squeeze { .. } => 30,
        },
        Op::Cache { .. } => 31,
        Op::Log { .. } => 32,
        Op::Stop => 33,
        Op::Guard { .. } => 34,
        Op::Choose { .. } => 35,
        Op::Call { .. } => 36,
        Op::Backward { .. } => 37,
        Op::Grad { .. } => 38,
        Op::ParamGrad { .. } => 39,
        Op::GradWrite { .. } => 40,
        Op::Send { .. } => 41,
        Op::Generated => 42,
    }
}
const KINDS: usize = 43;

#[test]
fn every_node_kind_round_trips_through_json() -> nnsight::Result<()> {
    use nnsight::graph::{BinaryOp, CallArg, Constant, IndexItem, Point, ReduceOp, TensorData, UnaryOp};
    let t = TensorData::from_tensor(&Tensor::from_slice(&[1.5f32, -2.0, 0.25]).reshape([1, 3]))?;
    let m = || "model.layers.0.mlp".to_string();
    let ops: Vec<Op> = vec![
        Op::Const { value: Constant::Tensor(t) },
        Op::Const { value: Constant::Scalar(0.5) },
        Op::Read { module: m(), point: Point::Output, call: 0 },
        Op::ReadInputs { module: m(), call: 1 },
        Op::Write { module: m(), point: Point::Input, call: 0, value: 0, index: Some(vec![IndexItem::Select(-1)]) },
        Op::Skip { module: m(), call: 0, value: 0 },
        Op::Apply { module: "lm_head".into(), input: 0 },
        Op::Save { value: 0 },
        TensorOp::Binary { kind: BinaryOp::Matmul, a: 0, b: 0 }.into(),
        TensorOp::BinaryScalar { kind: BinaryOp::Ge, a: 0, scalar: 2.0, scalar_first: true }.into(),
        TensorOp::Unary { kind: UnaryOp::Not, a: 0 }.into(),
        TensorOp::Reduce { kind: ReduceOp::Mean, a: 0, dims: vec![-1], keepdim: true }.into(),
        TensorOp::MaxMinDim { a: 0, dim: 1, keepdim: false, max: true }.into(),
        TensorOp::Norm { a: 0, p: 2.0, dims: vec![], keepdim: false }.into(),
        TensorOp::Softmax { a: 0, dim: -1, log: true }.into(),
        TensorOp::Argmax { a: 0, dim: None, keepdim: false }.into(),
        TensorOp::Topk { a: 0, k: 2, dim: -1, largest: false }.into(),
        TensorOp::Reshape { a: 0, shape: vec![3, -1] }.into(),
        TensorOp::Transpose { a: 0, dim0: 0, dim1: 1 }.into(),
        TensorOp::Permute { a: 0, dims: vec![1, 0] }.into(),
        TensorOp::Narrow { a: 0, dim: 1, start: 1, len: 2 }.into(),
        TensorOp::Select { a: 0, dim: 0, index: 0 }.into(),
        TensorOp::Index {
            a: 0,
            index: vec![IndexItem::Slice { start: Some(1), end: None }, IndexItem::NewAxis, IndexItem::Select(2)],
        }
        .into(),
        TensorOp::Cat { xs: vec![0, 0], dim: 0 }.into(),
        TensorOp::Stack { xs: vec![0, 0], dim: 1 }.into(),
        TensorOp::ToKind { a: 0, kind: "Half".into() }.into(),
        TensorOp::ToDevice { a: 0, device: "cpu".into() }.into(),
        TensorOp::Where { cond: 10, a: 0, b: 1 }.into(),
        TensorOp::Gather { a: 0, dim: 1, index: 15 }.into(),
        TensorOp::TupleGet { a: 16, index: 1 }.into(),
        TensorOp::Unsqueeze { a: 0, dim: 0 }.into(),
        TensorOp::Squeeze { a: 0, dim: Some(0) }.into(),
        Op::Cache { modules: Some(vec![m()]), inputs: true, device: Some("cpu".into()) },
        Op::Log { a: 0, label: "h.norm()".into() },
        Op::Stop,
        Op::Guard { cond: 10, end: 37 },
        Op::Choose { cond: 10, a: 0, b: 1 },
        Op::Call {
            function: clamp_norm::NAME.into(),
            args: vec![CallArg::Node(0), CallArg::Float(1.0), CallArg::Int(3), CallArg::Bool(true)],
        },
        Op::Backward { a: 12 },
        Op::Grad { a: 2, backward: 38 },
        Op::ParamGrad { module: "lm_head".into(), param: "weight".into(), backward: 38 },
        Op::GradWrite { a: 2, value: 39, backward: 38 },
        Op::Send { a: 0, label: "h".into() },
        Op::Generated,
    ];
    let mut seen = [false; KINDS];
    for op in &ops {
        seen[kind_index(op)] = true;
    }
    assert!(seen.iter().all(|&s| s), "kinds missing from the test graph: {seen:?}");
    let graph = Graph {
        nodes: ops.into_iter().enumerate().map(|(i, op)| nnsight::graph::Node { op, invoke: (i % 2) as u32 }).collect(),
    };
    let json = graph.to_json();
    assert_eq!(Graph::from_json(&json)?, graph);
    // A branch that ends before it starts, or after the graph, is refused.
    let bad = json.replace("\"end\": 37", "\"end\": 99");
    assert!(matches!(Graph::from_json(&bad), Err(Error::InvalidGraph { .. })));
    Ok(())
}

/// The block whose graph `docs/graph-example.json` holds (the README's JSON section shows it).
fn example_block(model: &LanguageModel<Llama>) -> nnsight::Result<Tensor> {
    intervene!(model.trace("The Eiffel Tower is in the city of") {
        let h = model.model.layers[5].output;
        if cond!(h.norm() > 100.0) {
            model.model.layers[5].output = h * 0.5;
        }
        log!(h.norm());
        let last = model.model.layers[6].mlp.output[(.., -1, ..)];
        model.model.layers[6].mlp.output[(.., -1, ..)] = call!(clamp_norm(last, 10.0));
        let logits = model.lm_head.output[(.., -1, ..)].save();
    });
    Ok(logits)
}

#[test]
fn the_committed_example_graph_is_what_its_block_builds() -> nnsight::Result<()> {
    let model = common::smollm2();
    let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/graph-example.json"));
    let (logits, graphs) = capture_graphs(|| example_block(&model));
    assert_eq!(logits?.size(), vec![1, 49152]);
    let built = &graphs[0];
    if std::env::var("NNSIGHT_BLESS").is_ok() {
        std::fs::write(path, built.to_json() + "\n").unwrap();
    }
    let text = std::fs::read_to_string(path).expect("docs/graph-example.json (NNSIGHT_BLESS=1 writes it)");
    let committed = Graph::from_json(&text)?;
    assert_eq!(&committed, built, "the example graph changed: rerun with NNSIGHT_BLESS=1 and review the diff");
    Ok(())
}

#[test]
fn a_cache_of_a_module_that_does_not_exist_is_an_error_naming_it() {
    let model = common::tiny_gpt2();
    let run = || -> nnsight::Result<()> {
        intervene!(model.trace("Hello world") {
            let c = model.cache_with(CacheOptions::default().modules(["model.transformer.h.0", "model.h.7"]));
        });
        Ok(())
    };
    let err = run().unwrap_err().to_string();
    assert!(err.contains("no module `model.h.7`"), "{err}");
}
