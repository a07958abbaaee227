//! The interleaver: runs a graph alongside a forward pass. It is the [`Hook`] the model's module calls go
//! through; when a module's input or output arrives, each invoke's code runs up to the next value it waits for.
//! Reads see and writes change only the invoke's own batch rows. Values nothing needs any more are dropped at
//! once; saved values are kept for after the run.

mod eval;
mod gradients;
mod limits;
mod passes;
mod sinks;
mod tensor_ops;
#[cfg(test)]
mod tests;
mod writes;

pub use eval::eval;
use eval::{at_node, eval_meta, truth};
pub use limits::with_value_cap;
use limits::{check_growth, check_size};
pub use sinks::{capture_logs, capture_logs_with, capture_sent, emitting_invoke};
pub(crate) use sinks::{emit_log, emit_sent};

use crate::graph::{display, Graph, NodeId, Op, Point, Value};
use crate::handle::builder::LiveTensors;
use crate::nn::{Hook, Module};
use crate::{Error, Result};
use ahash::AHashSet as HashSet;
use tch::Tensor;

impl Drop for Interleaver<'_> {
    /// Parameters made to require grad for this run stop requiring it.
    fn drop(&mut self) {
        for t in self.params_to_reset.drain(..) {
            let _ = t.set_requires_grad(false);
        }
    }
}

/// What a finished run leaves: the saved values, and the nodes never reached because their invoke stopped or
/// their generation step never came (a saved one among them has no value).
#[derive(Debug)]
pub struct Finished {
    /// Saved values by node.
    pub values: std::collections::HashMap<NodeId, Value>,
    /// Nodes skipped at the end (after `stop()`, or waiting for a step that never came).
    pub unreached: HashSet<NodeId>,
}

/// Runs one graph during one forward pass (or the forward passes of a generation: call `n` of a module is its
/// `n`-th call).
pub struct Interleaver<'a> {
    graph: &'a Graph,
    root: &'a dyn Module,
    /// Node ids of each invoke, in order.
    per_invoke: Vec<Vec<NodeId>>,
    /// Next position in `per_invoke[i]`.
    cursor: Vec<usize>,
    /// Batch rows `(start, len)` of each invoke.
    rows: Vec<(i64, i64)>,
    batch: i64,
    values: Vec<Option<Value>>,
    last_use: Vec<NodeId>,
    saved: HashSet<NodeId>,
    /// Modules some node waits on (a module not in here costs one lookup).
    watched: HashSet<String>,
    /// The parents of watched paths: the modules whose inner points may be watched (`wants_points` asks further
    /// only for these).
    point_parents: HashSet<String>,
    /// Hook events seen so far (for error messages).
    /// How many times each watched hook event fired so far: the next event of `(module, point)` is its call
    /// number `fired[..]` (in a generation, call `n` is step `n`).
    fired: ahash::AHashMap<(String, Point), u32>,
    /// Invokes that reached a `stop()`.
    stopped: Vec<bool>,
    /// Active caches: (cache node, invoke, options, records so far).
    caches: Vec<ActiveCache>,
    /// Skip values given for the module about to run, by invoke.
    skips: Vec<(usize, Tensor, NodeId)>,
    /// Nodes in branches whose condition was false.
    skipped: HashSet<NodeId>,
    /// Nodes that need a generation's final ids (`model.generated()`) and what depends on them, in order: they
    /// run at the end, without holding up the rest of their invoke.
    deferred: Vec<NodeId>,
    deferred_set: HashSet<NodeId>,
    /// Values deferred nodes still need (not freed before the end).
    pinned: HashSet<NodeId>,
    /// Reads whose gradient some `Grad` node wants, and the whole-batch tensor each read saw (what the gradient is
    /// taken with respect to).
    grad_reads: HashSet<NodeId>,
    grad_sources: ahash::AHashMap<NodeId, Tensor>,
    /// Gradients computed by a backward, waiting for their `Grad` node.
    grads: ahash::AHashMap<NodeId, Tensor>,
    /// Parameters whose gradient a `ParamGrad` node wants, made to require grad for this run (and put back when
    /// the interleaver is dropped).
    params: ahash::AHashMap<(String, String), Tensor>,
    params_to_reset: Vec<Tensor>,
    /// A scan: the forward runs on meta tensors, so constants become meta and nothing moves between devices.
    meta: bool,
    /// The most bytes one value may have (see [`with_value_cap`]).
    value_cap: Option<u64>,
    /// The tensors of this process some constants stand for (see [`Interleaver::with_live`]).
    live: Option<&'a LiveTensors>,
    /// The invokes whose rows are in the forward pass now: all of them, or a chunk when a trace runs in several
    /// passes (see [`Interleaver::begin_pass`]).
    active: std::ops::Range<usize>,
    /// Nodes set aside so far because their invoke stopped or their step never came (see [`Finished::unreached`]).
    unreached: HashSet<NodeId>,
    /// A persistent edit's graph (one invoke over every row, see [`Interleaver::whole`]): its `log!` lines name
    /// no invoke ([`emitting_invoke`]).
    whole: bool,
}

/// A `cache()` that is recording.
struct ActiveCache {
    node: NodeId,
    invoke: usize,
    modules: Option<HashSet<String>>,
    inputs: bool,
    device: Option<tch::Device>,
    records: Vec<(String, Value)>,
    calls: ahash::AHashMap<(String, Point), u32>,
}

impl<'a> Interleaver<'a> {
    /// Prepares `graph` for a pass over a batch of `batch` rows, invoke `i` owning `rows[i]`; ad-hoc module calls
    /// look modules up under `root`.
    pub fn new(graph: &'a Graph, rows: Vec<(i64, i64)>, batch: i64, root: &'a dyn Module) -> Result<Self> {
        crate::function::validate(graph)?;
        let n = graph.nodes.len();
        let n_invokes = rows.len();
        let mut per_invoke = vec![Vec::new(); n_invokes];
        let mut last_use: Vec<NodeId> = (0..n as NodeId).collect();
        let mut saved = HashSet::default();
        let mut watched = HashSet::default();
        for (i, node) in graph.nodes.iter().enumerate() {
            let inv = node.invoke as usize;
            if inv >= n_invokes {
                return Err(Error::InvalidGraph {
                    message: format!("node {i} belongs to invoke {inv}, but there are {n_invokes}"),
                });
            }
            per_invoke[inv].push(i as NodeId);
            for j in node.op.inputs() {
                last_use[j as usize] = i as NodeId;
            }
            if let Op::Save { value } = node.op {
                saved.insert(value);
            }
            if let Some((m, _, _)) = node.op.hook_point() {
                watched.insert(m.to_string());
            }
        }
        let point_parents = watched.iter().map(|m| split_point(m).0.to_string()).collect();
        Ok(Interleaver {
            graph,
            root,
            cursor: vec![0; n_invokes],
            per_invoke,
            rows,
            batch,
            values: (0..n).map(|_| None).collect(),
            last_use,
            saved,
            watched,
            point_parents,
            fired: Default::default(),
            stopped: vec![false; n_invokes],
            caches: Vec::new(),
            skips: Vec::new(),
            skipped: HashSet::default(),
            deferred: Vec::new(),
            deferred_set: HashSet::default(),
            pinned: HashSet::default(),
            grad_reads: graph
                .nodes
                .iter()
                .filter_map(|n| match n.op {
                    Op::Grad { a, .. } | Op::GradWrite { a, .. } => Some(a),
                    _ => None,
                })
                .collect(),
            grad_sources: Default::default(),
            grads: Default::default(),
            params: Default::default(),
            params_to_reset: Vec::new(),
            meta: false,
            value_cap: limits::current_cap(),
            live: None,
            active: 0..n_invokes,
            unreached: HashSet::default(),
            whole: false,
        })
    }

    /// Prepares `graph`, one invoke that sees every row of whatever batch comes (a persistent edit's graph: its
    /// reads are whole tensors and its writes replace them whole, whatever the batch size).
    pub fn whole(graph: &'a Graph, root: &'a dyn Module) -> Result<Self> {
        let mut inter = Self::new(graph, vec![(0, i64::MAX)], i64::MAX, root)?;
        inter.whole = true;
        Ok(inter)
    }

    /// Whether every node has run (or been skipped): nothing waits for a hook event any more.
    pub fn is_done(&self) -> bool {
        self.deferred.is_empty() && (0..self.per_invoke.len()).all(|i| self.cursor[i] >= self.per_invoke[i].len())
    }

    /// Makes this a scan's interleaver (see [`crate::meta`]): tensor constants become meta tensors of their shape
    /// and dtype, device moves (`to_device`, a cache's device) keep values meta, and `log!` prints shapes. Values
    /// the forward pass hands over are meta already.
    pub fn scan(mut self) -> Self {
        self.meta = true;
        self
    }

    /// Uses `live` for the constants it names (trainable tensors of this process; see [`LiveTensors`]) instead of
    /// the graph's copies.
    pub fn with_live(mut self, live: &'a LiveTensors) -> Self {
        self.live = (!live.is_empty()).then_some(live);
        self
    }

    /// Runs what can run before the forward pass (constants, code before the first read).
    pub fn start(&mut self) -> Result<()> {
        for inv in 0..self.per_invoke.len() {
            self.advance(inv, None)?;
        }
        Ok(())
    }

    /// Runs what is left after the forward pass, then checks that every node ran; returns the saved values.
    pub fn finish(self) -> Result<std::collections::HashMap<NodeId, Value>> {
        self.finish_all().map(|f| f.values)
    }

    /// [`Self::finish`], also naming the nodes that were not reached because their invoke stopped or because the
    /// call (generation step) they wait for never came.
    pub fn finish_all(mut self) -> Result<Finished> {
        for inv in 0..self.per_invoke.len() {
            self.advance(inv, None)?;
        }
        for inv in 0..self.per_invoke.len() {
            self.settle(inv)?;
        }
        // Deferred nodes still waiting: the generation's ids never came (it stopped or failed).
        let mut unreached = std::mem::take(&mut self.unreached);
        unreached.extend(self.deferred.iter().copied());
        for c in std::mem::take(&mut self.caches) {
            self.values[c.node as usize] = Some(Value::Map(c.records));
        }
        let mut out = std::collections::HashMap::new();
        for id in self.saved.iter().copied() {
            if let Some(v) = self.values[id as usize].take() {
                out.insert(id, v);
            }
        }
        Ok(Finished { values: out, unreached })
    }

    /// Whether an event of `module` (a module or an inner point's path) can matter to this run: some node waits
    /// on it, or a cache records. A hook that splits a batch between runs asks this first (every other event is
    /// passed through unchanged anyway).
    pub fn listens(&self, module: &str) -> bool {
        !self.caches.is_empty() || self.watched.contains(module)
    }

    /// Whether every invoke of the pass has stopped (at least one by `stop()`, the others by `stop()` or by
    /// running out of nodes): nothing more is needed from the forward pass.
    pub fn all_stopped(&self) -> bool {
        self.active.clone().any(|i| self.stopped[i])
            && self.active.clone().all(|i| self.stopped[i] || self.cursor[i] >= self.per_invoke[i].len())
    }

    /// Runs invoke `inv`'s nodes until one waits for a hook event other than `event` (whose value is `y`).
    fn advance(&mut self, inv: usize, mut event: Option<(&str, Point, u32, &mut Tensor)>) -> Result<()> {
        loop {
            if self.stopped[inv] {
                return Ok(());
            }
            let Some(&id) = self.per_invoke[inv].get(self.cursor[inv]) else { return Ok(()) };
            let op = &self.graph.nodes[id as usize].op;
            if matches!(op, Op::Generated) {
                self.defer(id);
                continue;
            }
            if !self.deferred_set.is_empty() && op.inputs().iter().any(|j| self.deferred_set.contains(j)) {
                if op.hook_point().is_some() {
                    return Err(Error::Intervention {
                        message: format!(
                            "node {id} ({}) uses `model.generated()`, which exists only when the generation has ended",
                            op.describe()
                        ),
                    });
                }
                self.defer(id);
                continue;
            }
            if matches!(op, Op::Stop) {
                self.stopped[inv] = true;
                self.cursor[inv] += 1;
                return Ok(());
            }
            if let Op::Cache { modules, inputs, device } = op {
                let device = match device {
                    Some(d) => Some(crate::graph::value::device_from_name(d)?),
                    None => None,
                };
                self.caches.push(ActiveCache {
                    node: id,
                    invoke: inv,
                    modules: modules.as_ref().map(|m| m.iter().cloned().collect()),
                    inputs: *inputs,
                    device,
                    records: Vec::new(),
                    calls: Default::default(),
                });
            }
            if let Op::Choose { cond, a, b } = *op {
                // The value of the branch that ran (the other one was skipped).
                let Some(c) = self.values[cond as usize].as_ref() else { return Ok(()) };
                let pick = if truth(c).map_err(|e| at_node(e, id, self.graph))? { a } else { b };
                let Some(v) = self.values[pick as usize].as_ref().map(Value::shallow_clone) else { return Ok(()) };
                self.values[id as usize] = Some(v);
                self.release(id);
                self.cursor[inv] += 1;
                continue;
            }
            if let Some(&j) = op.inputs().iter().find(|&&j| self.skipped.contains(&j)) {
                return Err(Error::Intervention {
                    message: format!(
                        "node {id} ({}) uses node {j}, which belongs to a branch of an `if cond!(..)` that did not run; to use a value computed in a branch, give the `if` an `else` and use its value (`let y = if cond!(c) {{ a }} else {{ b }};`)",
                        op.describe()
                    ),
                });
            }
            if op.inputs().iter().any(|&j| self.values[j as usize].is_none()) {
                return Ok(()); // waits for a value of another invoke
            }
            if let Op::Guard { cond, end } = *op {
                let taken = truth(self.values[cond as usize].as_ref().expect("checked"))
                    .map_err(|e| at_node(e, id, self.graph))?;
                self.release(id);
                self.cursor[inv] += 1;
                if !taken {
                    // Skip the branch: every node of this invoke before `end`.
                    let nodes = &self.per_invoke[inv];
                    let stop = self.cursor[inv] + nodes[self.cursor[inv]..].partition_point(|&n| n < end);
                    let branch: Vec<NodeId> = nodes[self.cursor[inv]..stop].to_vec();
                    for n in branch {
                        self.skipped.insert(n);
                        self.release(n);
                    }
                    self.cursor[inv] = stop;
                }
                continue;
            }
            let value = match op.hook_point() {
                Some((m, p, call)) => {
                    let Some((em, ep, ec, y)) = event.as_mut() else { return Ok(()) };
                    if m != *em || p != *ep || call != *ec {
                        return Ok(());
                    }
                    self.hook_node(id, inv, y)?
                }
                None => match op {
                    Op::Backward { a } => {
                        self.backward(id, *a, inv)?;
                        Some(Value::Tuple(vec![]))
                    }
                    // Done during the backward, by a hook (see `backward`).
                    Op::GradWrite { .. } => None,
                    // Computed by the backward this node names.
                    Op::Grad { .. } | Op::ParamGrad { .. } => {
                        Some(Value::Tensor(self.grads.remove(&id).ok_or_else(|| Error::Intervention {
                            message: format!("node {id} ({}): no gradient was computed", op.describe()),
                        })?))
                    }
                    _ => {
                        let inputs: Vec<&Value> =
                            op.inputs().iter().map(|&j| self.values[j as usize].as_ref().expect("checked")).collect();
                        if let Some(cap) = self.value_cap {
                            check_growth(id, op, &inputs, cap)?;
                        }
                        // A `log!` or `send!` names its invoke to whoever receives it.
                        let _emitting = matches!(op, Op::Log { .. } | Op::Send { .. })
                            .then(|| sinks::Emitting::set((!self.whole).then_some(inv as u32)));
                        let v = match op {
                            Op::Apply { module, .. } => Some(self.apply(module, inputs[0])?),
                            // A trainable tensor: itself, so that gradients reach it.
                            Op::Const { .. } if !self.meta && self.live.is_some() => {
                                match self.live.and_then(|l| l.get(id)) {
                                    Some(t) => Some(Value::Tensor(t)),
                                    None => Some(eval(op, &inputs).map_err(|e| at_node(e, id, self.graph))?),
                                }
                            }
                            _ if self.meta => Some(eval_meta(op, &inputs).map_err(|e| at_node(e, id, self.graph))?),
                            _ => Some(eval(op, &inputs).map_err(|e| at_node(e, id, self.graph))?),
                        };
                        if let (Some(cap), Some(v)) = (self.value_cap, &v) {
                            check_size(id, op, v, cap)?;
                        }
                        v
                    }
                },
            };
            self.values[id as usize] = value;
            self.release(id);
            self.cursor[inv] += 1;
        }
    }

    /// Sets `id` aside until the generation's ids exist (the invoke goes on).
    fn defer(&mut self, id: NodeId) {
        self.deferred.push(id);
        self.deferred_set.insert(id);
        for j in self.graph.nodes[id as usize].op.inputs() {
            if !self.deferred_set.contains(&j) {
                self.pinned.insert(j);
            }
        }
        let inv = self.graph.nodes[id as usize].invoke as usize;
        self.cursor[inv] += 1;
    }

    /// The generation's ids (`[rows, len]`, right-padded with -1) have arrived: runs the deferred nodes.
    pub fn provide_generated(&mut self, ids: &Tensor) -> Result<()> {
        for id in std::mem::take(&mut self.deferred) {
            let node = &self.graph.nodes[id as usize];
            let op = &node.op;
            let value = if matches!(op, Op::Generated) {
                Value::Tensor(self.my_rows(node.invoke as usize, ids)?)
            } else {
                let inputs: Result<Vec<&Value>> = op
                    .inputs()
                    .iter()
                    .map(|&j| {
                        self.values[j as usize].as_ref().ok_or_else(|| Error::Intervention {
                            message: format!("node {id} ({}) needs node {j}, which has no value", op.describe()),
                        })
                    })
                    .collect();
                let _emitting = sinks::Emitting::set((!self.whole).then_some(node.invoke));
                eval(op, &inputs?).map_err(|e| at_node(e, id, self.graph))?
            };
            self.values[id as usize] = Some(value);
        }
        self.deferred_set.clear();
        Ok(())
    }

    /// Drops inputs of `id` that nothing later needs.
    fn release(&mut self, id: NodeId) {
        for j in self.graph.nodes[id as usize].op.inputs() {
            if self.last_use[j as usize] == id && !self.saved.contains(&j) && !self.pinned.contains(&j) {
                self.values[j as usize] = None;
            }
        }
        if self.last_use[id as usize] == id && !self.saved.contains(&id) {
            self.values[id as usize] = None;
        }
    }

    fn my_rows(&self, inv: usize, y: &Tensor) -> Result<Tensor> {
        let (start, len) = self.rows[inv];
        if start == 0 && len == self.batch {
            return Ok(y.shallow_clone());
        }
        y.f_narrow(0, start, len).map_err(|e| Error::torch("interleaver", e))
    }
}

/// A watched path as (parent module, last name): `layers.0.self_attn.probs` -> (`layers.0.self_attn`, `probs`).
fn split_point(path: &str) -> (&str, &str) {
    path.rsplit_once('.').unwrap_or(("", path))
}

/// The module at a dotted `path` under `root`.
pub fn find<'m>(root: &'m dyn Module, path: &str) -> Option<&'m dyn Module> {
    if path.is_empty() {
        return Some(root);
    }
    let mut here = root;
    for seg in path.split('.') {
        let mut next = None;
        here.children(&mut |name, child| {
            if name == seg && next.is_none() {
                next = Some(child);
            }
        });
        here = next?;
    }
    Some(here)
}

impl Interleaver<'_> {
    /// Adds this event's value (after interventions) to every active cache that wants it (an inner point only to
    /// caches that list it).
    fn record_caches(&mut self, module: &str, point: Point, t: &Tensor, inner: bool) -> Result<()> {
        for k in 0..self.caches.len() {
            let c = &self.caches[k];
            if (point == Point::Input && !c.inputs) || c.modules.as_ref().map_or(inner, |m| !m.contains(module)) {
                continue;
            }
            let mut v = self.my_rows(c.invoke, t)?;
            if let Some(d) = c.device.filter(|_| !self.meta) {
                v = v.f_to_device(d).map_err(|e| Error::torch(module.to_string(), e))?;
            }
            let c = &mut self.caches[k];
            let n = c.calls.entry((module.to_string(), point)).or_insert(0);
            let name = format!(
                "{}{}{}",
                display(module),
                if point == Point::Input { ".input" } else { ".output" },
                if *n > 0 { format!("#{n}") } else { String::new() }
            );
            *n += 1;
            c.records.push((name, Value::Tensor(v)));
        }
        Ok(())
    }

    /// A hook event: every invoke runs up to its next wait, seeing (and maybe replacing) `t`. `inner`: the event
    /// of an inner point (`module` is its path).
    fn event(&mut self, module: &str, point: Point, mut t: Tensor, inner: bool) -> Result<Tensor> {
        if self.caches.is_empty() && (self.watched.is_empty() || !self.watched.contains(module)) {
            return Ok(t);
        }
        if self.watched.contains(module) {
            let count = self.fired.entry((module.to_string(), point)).or_insert(0);
            let call = *count;
            *count += 1;
            for inv in self.active.clone() {
                self.advance(inv, Some((module, point, call, &mut t)))?;
            }
        }
        if !self.caches.is_empty() {
            self.record_caches(module, point, &t, inner)?;
        }
        if self.all_stopped() {
            return Err(Error::Stopped);
        }
        Ok(t)
    }
}

impl Hook for Interleaver<'_> {
    fn input(&mut self, module: &str, x: Tensor) -> Result<Tensor> {
        self.event(module, Point::Input, x, false)
    }

    fn skip(&mut self, module: &str, x: &Tensor) -> Result<Option<Tensor>> {
        self.take_skip(module, x)
    }

    fn output(&mut self, module: &str, y: Tensor) -> Result<Tensor> {
        self.event(module, Point::Output, y, false)
    }

    fn wants_points(&mut self, module: &str, names: &[&str]) -> bool {
        if self.point_parents.is_empty() && self.caches.is_empty() {
            return false;
        }
        let listed = |path: &str| {
            self.watched.contains(path)
                || self.caches.iter().any(|c| c.modules.as_ref().is_some_and(|m| m.contains(path)))
        };
        (self.point_parents.contains(module) || self.caches.iter().any(|c| c.modules.is_some()))
            && names.iter().any(|n| listed(&crate::nn::join_path(module, n)))
    }

    fn point(&mut self, path: &str, t: Tensor) -> Result<Tensor> {
        self.event(path, Point::Output, t, true)
    }
}
