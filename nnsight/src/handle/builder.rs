//! The graph under construction while an `intervene!` block runs: nodes, the current invoke, and the checks
//! that can be made before the model runs (list bounds, forward order).

use super::proxy::Proxy;
use crate::graph::{display, Graph, NodeId, Op, Point};
use crate::{Error, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use tch::Tensor;

/// The order in which a model's hook points fire in one forward pass: for each module, the positions of its input
/// events and of its output events (one per call, for a module called several times in a pass). Recorded once per
/// model by a forward pass on one token. Call `n` of a module called `k` times per pass is call `n % k` of pass
/// `n / k` (in a generation, pass `n` is step `n`).
#[derive(Debug, Clone, Default)]
pub struct CallOrder {
    events: HashMap<String, (Vec<u32>, Vec<u32>)>,
    total: u32,
}

impl CallOrder {
    /// Builds the order from the sequence of events of one forward pass.
    pub fn from_events(events: &[(String, Point)]) -> Self {
        let mut map: HashMap<String, (Vec<u32>, Vec<u32>)> = HashMap::new();
        for (i, (module, point)) in events.iter().enumerate() {
            let e = map.entry(module.clone()).or_default();
            match point {
                Point::Input => e.0.push(i as u32),
                Point::Output => e.1.push(i as u32),
            }
        }
        CallOrder { events: map, total: events.len() as u32 }
    }

    /// Position of `module`'s `point` event at its `call`-th call, counting across passes, if the module runs
    /// in a forward pass.
    pub fn position(&self, module: &str, point: Point, call: u32) -> Option<u64> {
        let (inputs, outputs) = self.events.get(module)?;
        let list = if point == Point::Input { inputs } else { outputs };
        let per_pass = list.len() as u32;
        if per_pass == 0 {
            // Inner points and modules seen only at one kind of event: order by the other kind.
            let other = if point == Point::Input { outputs } else { inputs };
            let k = other.len().max(1) as u32;
            let at = other.get((call % k) as usize).copied().unwrap_or(0);
            return Some(u64::from(call / k) * u64::from(self.total) + u64::from(at));
        }
        let at = list[(call % per_pass) as usize];
        Some(u64::from(call / per_pass) * u64::from(self.total) + u64::from(at))
    }

    /// Number of modules that run.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether no module runs.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// The tensors of this process that some constants of a block's graph stand for: tensors that require grad
/// (trainable parameters of a session). A run uses them themselves instead of the graph's copies, so that
/// gradients reach them (their `.grad` accumulates) and an optimizer step between runs is seen by the next one.
/// They belong to the block, not to the graph: the graph is data (what a server gets holds the copies), and an edit
/// keeps the copies too (a tensor is fixed when the edit is made).
#[derive(Debug, Default)]
pub struct LiveTensors(Vec<(NodeId, Tensor)>);

impl LiveTensors {
    /// Adds the live tensor of constant node `id`.
    pub fn insert(&mut self, id: NodeId, t: &Tensor) {
        self.0.push((id, t.shallow_clone()));
    }

    /// A handle on the live tensor of node `id`, if it has one.
    pub fn get(&self, id: NodeId) -> Option<Tensor> {
        self.0.iter().find(|(i, _)| *i == id).map(|(_, t)| t.shallow_clone())
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Debug)]
pub(crate) struct Builder {
    pub(crate) graph: Graph,
    /// The tensors some constants stand for in this process (see [`LiveTensors`]).
    pub(crate) live: LiveTensors,
    pub(crate) invoke: u32,
    pub(crate) n_invokes: u32,
    /// Per invoke, the latest hook event used so far: its position across passes (see [`CallOrder::position`]).
    last_event: Vec<Option<(u64, String)>>,
    pub(crate) error: Option<Error>,
    pub(crate) order: Option<Arc<CallOrder>>,
    /// The call (generation step) that reads and writes address now (set by `iter`/`all` loops).
    pub(crate) call: u32,
    /// Number of forward passes the run will make at most (a generation's `max_new_tokens`), for `all()`.
    pub(crate) max_calls: Option<u32>,
    /// Per invoke, its latest `.backward()` node (what a later `.grad` reads from).
    pub(crate) last_backward: HashMap<u32, NodeId>,
    /// Per invoke, the gradient read last after its latest backward: (backward, forward position, description).
    last_grad: HashMap<u32, (NodeId, u64, String)>,
}

/// The graph being built, shared by every proxy of one block.
#[derive(Debug)]
pub struct GraphCell {
    pub(crate) inner: RefCell<Builder>,
}

impl GraphCell {
    pub(crate) fn new(order: Option<Arc<CallOrder>>) -> Self {
        GraphCell {
            inner: RefCell::new(Builder {
                graph: Graph::default(),
                live: LiveTensors::default(),
                invoke: 0,
                n_invokes: 0,
                last_event: Vec::new(),
                error: None,
                order,
                call: 0,
                max_calls: None,
                last_backward: HashMap::new(),
                last_grad: HashMap::new(),
            }),
        }
    }

    /// Appends a node to the current invoke.
    pub(crate) fn push(&self, op: Op) -> NodeId {
        let mut b = self.inner.borrow_mut();
        let invoke = b.invoke;
        b.graph.push(op, invoke)
    }

    /// Keeps the first error found while building (reported when the graph runs).
    pub(crate) fn record_error(&self, e: Error) {
        let mut b = self.inner.borrow_mut();
        if b.error.is_none() {
            b.error = Some(e);
        }
    }

    /// Starts a new invoke; returns its index.
    pub(crate) fn begin_invoke(&self) -> u32 {
        let mut b = self.inner.borrow_mut();
        let i = b.n_invokes;
        b.n_invokes += 1;
        b.invoke = i;
        b.last_event.push(None);
        i
    }

    /// Checks that `module`'s `point` runs after everything the current invoke used so far.
    fn check_order(&self, module: &str, point: Point, what: &str) -> Result<()> {
        let mut b = self.inner.borrow_mut();
        let Some(order) = b.order.clone() else { return Ok(()) };
        let call = b.call;
        let Some(pos) = order.position(module, point, call) else {
            return Err(Error::NeverReached {
                node: format!("{what} of `{}`", display(module)),
                reason: "this module does not run in the model's forward pass".into(),
            });
        };
        let step = if call > 0 { format!(" (step {call})") } else { String::new() };
        let desc = format!("`{}` {}{step}", display(module), if point == Point::Input { "input" } else { "output" });
        let inv = b.invoke as usize;
        if b.last_event.len() <= inv {
            b.last_event.resize(inv + 1, None);
        }
        if let Some((last, last_desc)) = &b.last_event[inv] {
            if pos < *last {
                return Err(Error::OutOfOrder { later: last_desc.clone(), earlier: desc });
            }
        }
        b.last_event[inv] = Some((pos, desc));
        Ok(())
    }

    /// A read of `module`'s input or output (this invoke's rows).
    pub fn read<T>(&self, module: &str, point: Point) -> Result<Proxy<'_, T>> {
        self.check_order(module, point, "read")?;
        let call = self.inner.borrow().call;
        Ok(Proxy::new(self.push(Op::Read { module: module.into(), point, call }), self))
    }

    /// A read of all of `module`'s inputs.
    pub fn read_inputs<T>(&self, module: &str) -> Result<Proxy<'_, T>> {
        self.check_order(module, Point::Input, "read")?;
        let call = self.inner.borrow().call;
        Ok(Proxy::new(self.push(Op::ReadInputs { module: module.into(), call }), self))
    }

    /// A write of `value` to `module`'s input or output (this invoke's rows), or to a slice of it.
    pub fn write(
        &self,
        module: &str,
        point: Point,
        value: NodeId,
        index: Option<Vec<crate::graph::IndexItem>>,
    ) -> Result<()> {
        self.check_order(module, point, "write")?;
        let call = self.inner.borrow().call;
        self.push(Op::Write { module: module.into(), point, call, value, index });
        Ok(())
    }

    /// A skip of `module` with `value` as this invoke's rows of its output.
    pub fn skip(&self, module: &str, value: NodeId) -> Result<()> {
        self.check_order(module, Point::Input, "skip")?;
        let call = self.inner.borrow().call;
        self.push(Op::Skip { module: module.into(), call, value });
        Ok(())
    }

    /// An ad-hoc call of `module` on `input`, outside the forward pass.
    pub fn apply(&self, module: &str, input: NodeId) -> Proxy<'_, tch::Tensor> {
        Proxy::new(self.push(Op::Apply { module: module.into(), input }), self)
    }

    /// The current invoke's latest hook event so far (for branches, which each start from the same point).
    pub(crate) fn order_mark(&self) -> Option<(u64, String)> {
        let b = self.inner.borrow();
        b.last_event.get(b.invoke as usize).cloned().flatten()
    }

    /// Sets the current invoke's latest hook event (`None`: nothing yet).
    pub(crate) fn set_order_mark(&self, mark: Option<(u64, String)>) {
        let mut b = self.inner.borrow_mut();
        let inv = b.invoke as usize;
        if b.last_event.len() <= inv {
            b.last_event.resize(inv + 1, None);
        }
        b.last_event[inv] = mark;
    }

    /// Records an error (reported when the block runs) for each of `modules` that does not run in the model's
    /// forward pass, when the order of the pass is known.
    pub(crate) fn check_modules_exist(&self, modules: &[String], what: &str) {
        let order = self.inner.borrow().order.clone();
        let Some(order) = order else { return };
        for m in modules {
            if order.position(m, Point::Output, 0).is_none() {
                self.record_error(Error::InvalidInput {
                    message: format!(
                        "{what}: no module `{}` runs in this model (name modules as the block does, from `model`: e.g. `model.model.layers.0` for Llama, `model.transformer.h.0` for GPT-2)",
                        display(m)
                    ),
                });
            }
        }
    }

    /// Gradients arrive in backward order, the reverse of the forward: after a `.backward()`, an invoke reads the
    /// gradient of a later module before that of an earlier one (as in Python nnsight; out of order is an error
    /// naming both).
    pub(crate) fn check_grad_order(&self, read: NodeId, backward: NodeId) -> Result<()> {
        let mut b = self.inner.borrow_mut();
        let Some(order) = b.order.clone() else { return Ok(()) };
        let Some(Op::Read { module, point, call }) = b.graph.nodes.get(read as usize).map(|n| n.op.clone()) else {
            return Ok(());
        };
        let Some(pos) = order.position(&module, point, call) else { return Ok(()) };
        let desc = format!(
            "the gradient of `{}` {}",
            display(&module),
            if point == Point::Input { "input" } else { "output" }
        );
        let inv = b.invoke;
        if let Some((bw, last, last_desc)) = b.last_grad.get(&inv) {
            if *bw == backward && pos > *last {
                return Err(Error::GradientOrder { earlier: last_desc.clone(), later: desc });
            }
        }
        b.last_grad.insert(inv, (backward, pos, desc));
        Ok(())
    }

    /// The latest read node of `module`'s `point` at the current call in the current invoke.
    pub(crate) fn find_read(&self, module: &str, point: Point) -> Option<NodeId> {
        let b = self.inner.borrow();
        let (inv, call) = (b.invoke, b.call);
        b.graph.nodes.iter().enumerate().rev().find_map(|(i, n)| match &n.op {
            Op::Read { module: m, point: p, call: c }
                if n.invoke == inv && m == module && *p == point && *c == call =>
            {
                Some(i as NodeId)
            }
            _ => None,
        })
    }

    /// The gradient of the latest loss of this invoke with respect to the parameter `param` of `module`.
    pub(crate) fn param_grad(&self, module: &str, param: &str) -> Proxy<'_, tch::Tensor> {
        match self.current_backward() {
            Some(backward) => {
                Proxy::new(self.push(Op::ParamGrad { module: module.into(), param: param.into(), backward }), self)
            }
            None => self.constant_tensor(&tch::Tensor::from(f64::NAN)),
        }
    }

    /// The current invoke's latest `.backward()`, which a `.grad` read now refers to; without one, records the
    /// error (reported when the block runs) and gives `None`.
    pub(crate) fn current_backward(&self) -> Option<NodeId> {
        let backward = {
            let b = self.inner.borrow();
            b.last_backward.get(&b.invoke).copied()
        };
        if backward.is_none() {
            self.record_error(Error::Intervention {
                message: "`.grad` needs a loss first: call `.backward()` on a single value before reading gradients"
                    .into(),
            });
        }
        backward
    }

    /// Makes reads and writes address call (generation step) `call`; returns the previous one.
    pub fn set_call(&self, call: u32) -> u32 {
        std::mem::replace(&mut self.inner.borrow_mut().call, call)
    }

    /// The call (generation step) reads and writes address now.
    pub fn call(&self) -> u32 {
        self.inner.borrow().call
    }

    /// The most forward passes the run makes (a generation's `max_new_tokens`), if the target said.
    pub fn max_calls(&self) -> Option<u32> {
        self.inner.borrow().max_calls
    }

    /// Sets [`Self::max_calls`].
    pub(crate) fn set_max_calls(&self, n: u32) {
        self.inner.borrow_mut().max_calls = Some(n);
    }

    /// Closes the branch of the guard node `guard`: it covers every node added since the guard.
    pub(crate) fn end_guard(&self, guard: NodeId) {
        let mut b = self.inner.borrow_mut();
        let end = b.graph.nodes.len() as NodeId;
        if let Some(Op::Guard { end: e, .. }) = b.graph.nodes.get_mut(guard as usize).map(|n| &mut n.op) {
            *e = end;
        }
    }

    /// The graph built so far.
    pub fn graph(&self) -> Graph {
        self.inner.borrow().graph.clone()
    }

    /// Number of nodes so far.
    pub fn len(&self) -> usize {
        self.inner.borrow().graph.nodes.len()
    }

    /// Whether no node was added.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
