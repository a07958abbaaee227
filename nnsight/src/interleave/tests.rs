//! The interleaver on its own: graphs built node by node (no `intervene!`, no builder checks) run against a toy
//! two-layer module defined here, driven the way `envoy::trace::run_trace` drives a trace (`start`, the hooked
//! forward, `finish_all`). Every expected value is computed by hand with the same layers.

use super::{with_value_cap, Finished, Interleaver};
use crate::graph::{display, Constant, Graph, IndexItem, NodeId, Op, Point, TensorData, TensorOp, Value};
use crate::nn::{Ctx, Forward, Hook, Linear, Module};
use crate::{Error, Result};
use tch::{Device, Kind, Tensor};

/// libtorch on one thread in tests (the machine is shared).
fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| tch::set_num_threads(1));
}

/// `layer1: Linear(3, 4)`, `layer2: Linear(4, 2)`, the root at path `""` (as `NNsight::new` sets it).
struct Toy {
    layer1: Linear,
    layer2: Linear,
}

impl Module for Toy {
    fn path(&self) -> &str {
        ""
    }
    fn kind(&self) -> &'static str {
        "Toy"
    }
    fn children<'a>(&'a self, f: &mut dyn FnMut(&str, &'a dyn Module)) {
        f("layer1", &self.layer1);
        f("layer2", &self.layer2);
    }
    fn as_forward(&self) -> Option<&dyn Forward> {
        Some(self)
    }
}

impl Forward for Toy {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        let h = cx.call(&self.layer1, x)?;
        cx.call(&self.layer2, &h)
    }
}

/// Deterministic, non-trivial values of `shape` (no random generator: tests run in parallel).
fn filled(shape: &[i64], phase: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.7 + phase).sin().reshape(shape)
}

fn toy() -> Toy {
    init();
    let lin = |path: &str, i: i64, o: i64, phase: f64| {
        Linear::from_tensors(path, filled(&[o, i], phase), Some(filled(&[o], phase + 1.0)))
    };
    Toy { layer1: lin("layer1", 3, 4, 0.1), layer2: lin("layer2", 4, 2, 0.5) }
}

/// The batch: 2 rows of 3 features.
fn input() -> Tensor {
    filled(&[2, 3], 2.0)
}

/// `m(x)` without hooks (what the run computes by itself).
fn plain<M: Forward>(m: &M, x: &Tensor) -> Tensor {
    let _g = tch::no_grad_guard();
    Ctx::new().call(m, x).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn assert_close(a: &Tensor, b: &Tensor) {
    let d = max_diff(a, b);
    assert!(d < 1e-6, "differ by {d}:\n{a}\n{b}");
}

fn constant(t: &Tensor) -> Op {
    Op::Const { value: Constant::Tensor(TensorData::from_tensor(t).unwrap()) }
}

fn read(module: &str, point: Point) -> Op {
    Op::Read { module: module.to_string(), point, call: 0 }
}

fn write(module: &str, value: NodeId, index: Option<Vec<IndexItem>>) -> Op {
    Op::Write { module: module.to_string(), point: Point::Output, call: 0, value, index }
}

/// Reads `module`'s output in `invoke` and saves it; the read's node (where the saved value is found).
fn save_output(g: &mut Graph, module: &str, invoke: u32) -> NodeId {
    let r = g.push(read(module, Point::Output), invoke);
    g.push(Op::Save { value: r }, invoke);
    r
}

/// Passes every hook event on to the interleaver, noting it (`model.layer1 output`).
struct Noted<'h, 'a> {
    inner: &'h mut Interleaver<'a>,
    events: Vec<String>,
}

impl Hook for Noted<'_, '_> {
    fn input(&mut self, module: &str, x: Tensor) -> Result<Tensor> {
        self.events.push(format!("{} input", display(module)));
        self.inner.input(module, x)
    }
    fn skip(&mut self, module: &str, x: &Tensor) -> Result<Option<Tensor>> {
        self.inner.skip(module, x)
    }
    fn output(&mut self, module: &str, y: Tensor) -> Result<Tensor> {
        self.events.push(format!("{} output", display(module)));
        self.inner.output(module, y)
    }
}

/// What a run left.
struct Outcome {
    /// The model's output (`None` when every invoke stopped).
    output: Option<Tensor>,
    /// The hook events the forward pass reached, in order.
    events: Vec<String>,
    finished: Finished,
}

impl Outcome {
    fn saved(&self, id: NodeId) -> &Tensor {
        match self.finished.values.get(&id) {
            Some(Value::Tensor(t)) => t,
            other => panic!("node {id}: no saved tensor ({other:?})"),
        }
    }
}

/// Runs `net` on `x` with `graph` interleaved, as `run_trace` does: invoke `i` owns `rows[i]` (`None`: one invoke
/// of the whole batch, `Interleaver::whole`).
fn run(net: &Toy, graph: &Graph, rows: Option<Vec<(i64, i64)>>, x: &Tensor) -> Result<Outcome> {
    let _g = tch::no_grad_guard();
    let mut inter = match rows {
        Some(rows) => Interleaver::new(graph, rows, x.size()[0], net)?,
        None => Interleaver::whole(graph, net)?,
    };
    inter.start()?;
    let mut noted = Noted { inner: &mut inter, events: Vec::new() };
    let output = if noted.inner.all_stopped() {
        None
    } else {
        match Ctx::with_hook(&mut noted).call(net, x) {
            Ok(y) => Some(y),
            Err(Error::Stopped) => None,
            Err(e) => return Err(e),
        }
    };
    let events = noted.events;
    Ok(Outcome { output, events, finished: inter.finish_all()? })
}

/// One invoke over the whole batch of 2.
fn one_invoke() -> Option<Vec<(i64, i64)>> {
    Some(vec![(0, 2)])
}

#[test]
fn saved_reads_are_the_layers_inputs_and_outputs() {
    let (net, x) = (toy(), input());
    let mut g = Graph::default();
    let x_in = g.push(read("layer1", Point::Input), 0);
    g.push(Op::Save { value: x_in }, 0);
    let h = save_output(&mut g, "layer1", 0);
    let h_in = g.push(read("layer2", Point::Input), 0);
    g.push(Op::Save { value: h_in }, 0);
    let y = save_output(&mut g, "layer2", 0);
    let out = save_output(&mut g, "", 0);
    let r = run(&net, &g, one_invoke(), &x).unwrap();

    let h_hand = plain(&net.layer1, &x);
    let y_hand = plain(&net.layer2, &h_hand);
    assert_eq!(max_diff(r.saved(x_in), &x), 0.0);
    assert_close(r.saved(h), &h_hand);
    assert_close(r.saved(h_in), &h_hand);
    assert_close(r.saved(y), &y_hand);
    assert_close(r.saved(out), &y_hand);
    // Reads change nothing.
    assert_close(r.output.as_ref().unwrap(), &plain(&net, &x));
    // Saved values are found under the node saved (the read), not the `Save` node; nothing else is kept.
    let mut keys: Vec<NodeId> = r.finished.values.keys().copied().collect();
    keys.sort();
    assert_eq!(keys, vec![x_in, h, h_in, y, out]);
    assert!(r.finished.unreached.is_empty());
    assert_eq!(
        r.events,
        [
            "model input",
            "model.layer1 input",
            "model.layer1 output",
            "model.layer2 input",
            "model.layer2 output",
            "model output"
        ]
        .map(String::from)
    );
}

#[test]
fn a_whole_interleaver_sees_every_row() {
    let (net, x) = (toy(), input());
    let mut g = Graph::default();
    let h = save_output(&mut g, "layer1", 0);
    let r = run(&net, &g, None, &x).unwrap();
    assert_close(r.saved(h), &plain(&net.layer1, &x));
}

#[test]
fn a_write_of_a_tensor_changes_the_output_as_by_hand() {
    let (net, x) = (toy(), input());
    let new_h = filled(&[2, 4], 3.0);
    let mut g = Graph::default();
    let c = g.push(constant(&new_h), 0);
    g.push(write("layer1", c, None), 0);
    let out = save_output(&mut g, "", 0);
    let r = run(&net, &g, one_invoke(), &x).unwrap();
    let by_hand = plain(&net.layer2, &new_h);
    assert_close(r.saved(out), &by_hand);
    assert_close(r.output.as_ref().unwrap(), &by_hand);
    assert!(max_diff(&by_hand, &plain(&net, &x)) > 1e-3, "the write must make a difference");
}

#[test]
fn a_write_of_one_number_fills_the_whole_value() {
    // A number as `intervene!` writes it (`net.layer1.output = 0.5`): a tensor constant of no dimensions.
    let (net, x) = (toy(), input());
    let mut g = Graph::default();
    let c = g.push(constant(&Tensor::from(0.5f32)), 0);
    g.push(write("layer1", c, None), 0);
    let h = save_output(&mut g, "layer1", 0);
    let out = save_output(&mut g, "", 0);
    let r = run(&net, &g, one_invoke(), &x).unwrap();
    let filled_h = Tensor::full([2, 4], 0.5, (Kind::Float, Device::Cpu));
    // A read after the write at the same hook point sees the written value.
    assert_eq!(max_diff(r.saved(h), &filled_h), 0.0);
    assert_close(r.saved(out), &plain(&net.layer2, &filled_h));
}

#[test]
fn a_write_of_a_scalar_constant_fills_like_a_number() {
    // `Constant::Scalar` (a hand-built or JSON graph; `intervene!` writes numbers as tensors of no dimensions)
    // fills the value it is written to.
    let (net, x) = (toy(), input());
    let mut g = Graph::default();
    let c = g.push(Op::Const { value: Constant::Scalar(0.5) }, 0);
    g.push(write("layer1", c, None), 0);
    let h = save_output(&mut g, "layer1", 0);
    let r = run(&net, &g, one_invoke(), &x).unwrap();
    assert_eq!(max_diff(r.saved(h), &Tensor::full([2, 4], 0.5, (Kind::Float, Device::Cpu))), 0.0);
    // A skip needs the invoke's rows: a number is refused, naming the node and the module.
    let mut g = Graph::default();
    let c = g.push(Op::Const { value: Constant::Scalar(0.5) }, 0);
    g.push(Op::Skip { module: "layer1".into(), call: 0, value: c }, 0);
    let err = run(&net, &g, one_invoke(), &x).err().expect("refused");
    let text = err.to_string();
    assert!(text.contains("node 1 (skip of `model.layer1`)") && text.contains("found a scalar"), "{text}");
}

#[test]
fn a_write_through_an_index_changes_only_that_slice() {
    let (net, x) = (toy(), input());
    let h_hand = plain(&net.layer1, &x);

    // `layer1.output[(.., 2)] = 3.0`: one column.
    let mut g = Graph::default();
    let c = g.push(constant(&Tensor::from(3.0f32)), 0);
    g.push(write("layer1", c, Some(vec![IndexItem::Slice { start: None, end: None }, IndexItem::Select(2)])), 0);
    let h = save_output(&mut g, "layer1", 0);
    let out = save_output(&mut g, "", 0);
    let r = run(&net, &g, one_invoke(), &x).unwrap();
    let expected = h_hand.copy();
    let _ = expected.select(1, 2).fill_(3.0);
    assert_eq!(max_diff(r.saved(h), &expected), 0.0);
    assert_close(r.saved(out), &plain(&net.layer2, &expected));

    // `layer1.output[-1] = v`: the last row, by a tensor of that row's shape.
    let row = filled(&[4], 5.0);
    let mut g = Graph::default();
    let c = g.push(constant(&row), 0);
    g.push(write("layer1", c, Some(vec![IndexItem::Select(-1)])), 0);
    let out = save_output(&mut g, "", 0);
    let r = run(&net, &g, one_invoke(), &x).unwrap();
    let expected = h_hand.copy();
    expected.select(0, 1).copy_(&row);
    let by_hand = plain(&net.layer2, &expected);
    assert_close(r.saved(out), &by_hand);
    // Row 0 of the output is untouched, row 1 changed.
    let before = plain(&net, &x);
    assert_close(&r.saved(out).select(0, 0), &before.select(0, 0));
    assert!(max_diff(&r.saved(out).select(0, 1), &before.select(0, 1)) > 1e-3);
}

#[test]
fn a_write_of_the_wrong_shape_is_refused_naming_the_target() {
    let (net, x) = (toy(), input());
    let mut g = Graph::default();
    let c = g.push(constant(&filled(&[2, 3], 0.0)), 0);
    g.push(write("layer1", c, None), 0);
    match run(&net, &g, one_invoke(), &x) {
        Err(Error::WriteShape { target, expected, given }) => {
            assert_eq!((target.as_str(), expected, given), ("`model.layer1` output", vec![2, 4], vec![2, 3]));
        }
        other => panic!("expected WriteShape, got {:?}", other.err()),
    }
}

#[test]
fn two_invokes_read_and_write_only_their_own_rows() {
    let (net, x) = (toy(), input());
    let new_row = filled(&[1, 4], 4.0);
    let mut g = Graph::default();
    // Invoke 0 (row 0) replaces its row of layer1's output and saves the model's output.
    let c = g.push(constant(&new_row), 0);
    g.push(write("layer1", c, None), 0);
    let out0 = save_output(&mut g, "", 0);
    // Invoke 1 (row 1) only reads.
    let h1 = save_output(&mut g, "layer1", 1);
    let out1 = save_output(&mut g, "", 1);
    let r = run(&net, &g, Some(vec![(0, 1), (1, 1)]), &x).unwrap();

    let h_hand = plain(&net.layer1, &x);
    let changed = Tensor::cat(&[new_row.shallow_clone(), h_hand.narrow(0, 1, 1)], 0);
    let by_hand = plain(&net.layer2, &changed);
    let before = plain(&net, &x);
    let output = r.output.as_ref().unwrap();
    assert_close(output, &by_hand);
    assert_close(r.saved(out0), &by_hand.narrow(0, 0, 1));
    assert!(max_diff(&output.narrow(0, 0, 1), &before.narrow(0, 0, 1)) > 1e-3, "row 0 changed");
    assert_eq!(r.saved(h1).size(), vec![1, 4]);
    assert_close(r.saved(h1), &h_hand.narrow(0, 1, 1));
    assert_close(r.saved(out1), &before.narrow(0, 1, 1));
    assert_close(&output.narrow(0, 1, 1), &before.narrow(0, 1, 1));

    // A value of the whole batch is not one invoke's rows.
    let mut g = Graph::default();
    let c = g.push(constant(&filled(&[2, 4], 4.0)), 0);
    g.push(write("layer1", c, None), 0);
    g.push(Op::Const { value: Constant::Scalar(0.0) }, 1);
    let err = run(&net, &g, Some(vec![(0, 1), (1, 1)]), &x).err().expect("refused");
    assert!(
        matches!(&err, Error::WriteShape { expected, given, .. } if *expected == [1, 4] && *given == [2, 4]),
        "{err}"
    );
}

#[test]
fn reading_an_earlier_module_after_a_later_one_is_never_reached() {
    // The builder refuses this order (`OutOfOrder`); a hand-built graph gets to the interleaver, which waits for
    // layer1's output after layer2's and reports the read never reached once the pass is over.
    let (net, x) = (toy(), input());
    let mut g = Graph::default();
    let y = save_output(&mut g, "layer2", 0);
    save_output(&mut g, "layer1", 0);
    let _g = tch::no_grad_guard();
    let mut inter = Interleaver::new(&g, vec![(0, 2)], 2, &net).unwrap();
    inter.start().unwrap();
    let out = Ctx::with_hook(&mut inter).call(&net, &x).unwrap();
    assert_close(&out, &plain(&net, &x));
    assert!(!inter.is_done());
    match inter.finish_all() {
        Err(Error::NeverReached { node, reason }) => {
            assert_eq!(node, "node 2, read of `model.layer1` output (call 0) (invoke 0)");
            assert!(reason.starts_with("`model.layer1` had already run when invoke 0 reached it"), "{reason}");
        }
        other => panic!("expected NeverReached, got {other:?}"),
    }
    // The first read did run: the same graph with only it saves layer2's output.
    let g1 = Graph { nodes: g.nodes[..2].to_vec() };
    assert_close(run(&net, &g1, one_invoke(), &x).unwrap().saved(y), &out);
}

#[test]
fn a_read_of_a_module_that_never_runs_is_never_reached() {
    let (net, x) = (toy(), input());
    let mut g = Graph::default();
    save_output(&mut g, "layer3", 0);
    match run(&net, &g, one_invoke(), &x) {
        Err(Error::NeverReached { node, reason }) => {
            assert_eq!(node, "node 0, read of `model.layer3` output (call 0) (invoke 0)");
            assert_eq!(reason, "`model.layer3` did not run");
        }
        other => panic!("expected NeverReached, got {:?}", other.err()),
    }
}

#[test]
fn a_read_of_a_call_that_never_comes_is_unreached_and_earlier_saves_are_kept() {
    // Layer1 runs once; its second call (a generation's next step) never comes: a warning, not an error.
    let (net, x) = (toy(), input());
    let mut g = Graph::default();
    let h = save_output(&mut g, "layer1", 0);
    let later = g.push(Op::Read { module: "layer1".into(), point: Point::Output, call: 1 }, 0);
    g.push(Op::Save { value: later }, 0);
    let r = run(&net, &g, one_invoke(), &x).unwrap();
    assert_close(r.saved(h), &plain(&net.layer1, &x));
    assert!(!r.finished.values.contains_key(&later));
    let mut unreached: Vec<NodeId> = r.finished.unreached.iter().copied().collect();
    unreached.sort();
    assert_eq!(unreached, vec![later, later + 1]);
}

#[test]
fn an_index_out_of_range_on_a_read_value_names_the_read_and_dimension() {
    let (net, x) = (toy(), input());
    let check = |op: TensorOp, rows: Vec<(i64, i64)>, want: (i64, usize, usize)| {
        let mut g = Graph::default();
        let h = g.push(read("layer1", Point::Output), 0);
        let mut op = op;
        match &mut op {
            TensorOp::Select { a, .. } | TensorOp::Index { a, .. } => *a = h,
            _ => unreachable!(),
        }
        g.push(op.into(), 0);
        for inv in 1..rows.len() as u32 {
            g.push(Op::Const { value: Constant::Scalar(0.0) }, inv);
        }
        match run(&net, &g, Some(rows), &x) {
            Err(Error::IndexOutOfRange { module, index, len, dim }) => {
                assert_eq!(module, "`model.layer1` output");
                assert_eq!((index, len, dim), (want.0, want.1, Some(want.2)));
            }
            other => panic!("expected IndexOutOfRange, got {:?}", other.err()),
        }
    };
    // layer1's output is [2, 4].
    check(TensorOp::Select { a: 0, dim: 1, index: 4 }, vec![(0, 2)], (4, 4, 1));
    check(TensorOp::Select { a: 0, dim: -1, index: -5 }, vec![(0, 2)], (-5, 4, 1));
    // An invoke of one row sees a value of one row.
    check(TensorOp::Select { a: 0, dim: 0, index: 1 }, vec![(0, 1), (1, 1)], (1, 1, 0));
    // The dimension is the read value's, not the result's (a new axis has none).
    let index = vec![IndexItem::NewAxis, IndexItem::Slice { start: None, end: None }, IndexItem::Select(7)];
    check(TensorOp::Index { a: 0, index }, vec![(0, 2)], (7, 4, 1));
    check(TensorOp::Index { a: 0, index: vec![IndexItem::Select(2)] }, vec![(0, 2)], (2, 2, 0));

    // A write through an out-of-range index names the written value.
    let mut g = Graph::default();
    let c = g.push(constant(&Tensor::from(1.0f32)), 0);
    g.push(write("layer1", c, Some(vec![IndexItem::Slice { start: None, end: None }, IndexItem::Select(9)])), 0);
    match run(&net, &g, one_invoke(), &x) {
        Err(Error::IndexOutOfRange { module, index, len, dim }) => {
            assert_eq!((module.as_str(), index, len, dim), ("`model.layer1` output", 9, 4, Some(1)));
        }
        other => panic!("expected IndexOutOfRange, got {:?}", other.err()),
    }
}

#[test]
fn stop_ends_the_pass_early_and_keeps_what_was_saved() {
    let (net, x) = (toy(), input());
    let mut g = Graph::default();
    let h = save_output(&mut g, "layer1", 0);
    let stop = g.push(Op::Stop, 0);
    save_output(&mut g, "layer2", 0);
    let r = run(&net, &g, one_invoke(), &x).unwrap();
    assert!(r.output.is_none(), "the pass ends with `Error::Stopped`");
    assert_eq!(r.events, ["model input", "model.layer1 input", "model.layer1 output"].map(String::from));
    assert_close(r.saved(h), &plain(&net.layer1, &x));
    assert_eq!(r.finished.values.len(), 1);
    let mut unreached: Vec<NodeId> = r.finished.unreached.iter().copied().collect();
    unreached.sort();
    assert_eq!(unreached, vec![stop + 1, stop + 2]);

    // A stop before any read: the model does not run at all.
    let mut g = Graph::default();
    g.push(Op::Stop, 0);
    save_output(&mut g, "layer1", 0);
    let r = run(&net, &g, one_invoke(), &x).unwrap();
    assert!(r.output.is_none() && r.events.is_empty());
    assert!(r.finished.values.is_empty());

    // One invoke of two stops: the pass goes on for the other one, up to its last node; then every invoke has
    // stopped or finished, and the rest of the model (the root's output) does not run.
    let mut g = Graph::default();
    save_output(&mut g, "layer1", 0);
    g.push(Op::Stop, 0);
    let y1 = save_output(&mut g, "layer2", 1);
    let r = run(&net, &g, Some(vec![(0, 1), (1, 1)]), &x).unwrap();
    assert_eq!(r.events.last().map(String::as_str), Some("model.layer2 output"));
    assert!(r.output.is_none());
    assert_close(r.saved(y1), &plain(&net, &x).narrow(0, 1, 1));
}

#[test]
fn the_value_cap_refuses_a_matmul_before_it_allocates() {
    let (net, x) = (toy(), input());
    // [2^20, 1] @ [1, 2^20]: 4 TiB of floats, from inputs of 4 MiB. Computed, it could not be allocated.
    let n = 1i64 << 20;
    let mut g = Graph::default();
    let v = g.push(constant(&Tensor::zeros([n], (Kind::Float, Device::Cpu))), 0);
    let col = g.push(TensorOp::Reshape { a: v, shape: vec![-1, 1] }.into(), 0);
    let row = g.push(TensorOp::Reshape { a: v, shape: vec![1, -1] }.into(), 0);
    let m = g.push(TensorOp::Binary { kind: crate::graph::BinaryOp::Matmul, a: col, b: row }.into(), 0);
    g.push(Op::Save { value: m }, 0);
    let cap = 8u64 << 20;
    match with_value_cap(cap, || run(&net, &g, one_invoke(), &x)) {
        Err(Error::Limit { what, limit, given }) => {
            assert_eq!(what, "bytes of node 3's result (matmul)");
            assert_eq!((limit, given), (cap, 4u64 << 40));
        }
        other => panic!("expected Limit, got {:?}", other.err()),
    }
}

#[test]
fn the_value_cap_refuses_a_cat_over_it_and_allows_one_at_it() {
    let (net, x) = (toy(), input());
    // Three copies of layer1's output ([2, 4] floats, 32 bytes each): 96 bytes.
    let mut g = Graph::default();
    let h = g.push(read("layer1", Point::Output), 0);
    let c = g.push(TensorOp::Cat { xs: vec![h, h, h], dim: 0 }.into(), 0);
    g.push(Op::Save { value: c }, 0);
    match with_value_cap(95, || run(&net, &g, one_invoke(), &x)) {
        Err(Error::Limit { what, limit, given }) => {
            assert_eq!((what.as_str(), limit, given), ("bytes of node 1's result (cat)", 95, 96));
        }
        other => panic!("expected Limit, got {:?}", other.err()),
    }
    let r = with_value_cap(96, || run(&net, &g, one_invoke(), &x)).unwrap();
    let h_hand = plain(&net.layer1, &x);
    assert_close(r.saved(c), &Tensor::cat(&[&h_hand, &h_hand, &h_hand], 0));
    // The cap is this thread's, for the duration of the closure.
    assert!(run(&net, &g, one_invoke(), &x).is_ok());
}

#[test]
fn the_value_cap_refuses_a_widening_dtype_change_before_it_allocates() {
    let (net, x) = (toy(), input());
    // layer1's output is [2, 4] float32 (32 bytes); as float64 it would be 64 bytes.
    let mut g = Graph::default();
    let h = g.push(read("layer1", Point::Output), 0);
    let d = g.push(TensorOp::ToKind { a: h, kind: "Double".into() }.into(), 0);
    g.push(Op::Save { value: d }, 0);
    match with_value_cap(48, || run(&net, &g, one_invoke(), &x)) {
        Err(Error::Limit { what, limit, given }) => {
            assert_eq!((what.as_str(), limit, given), ("bytes of node 1's result (to_kind)", 48, 64));
        }
        other => panic!("expected Limit, got {:?}", other.err()),
    }
    assert!(with_value_cap(64, || run(&net, &g, one_invoke(), &x)).is_ok());
}
