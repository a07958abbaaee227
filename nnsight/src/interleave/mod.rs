//! The interleaver: runs a graph alongside a forward pass. It is the [`Hook`] the model's module calls go
//! through; when a module's input or output arrives, each invoke's code runs up to the next value it waits for.
//! Reads see and writes change only the invoke's own batch rows. Values nothing needs any more are dropped at
//! once; saved values are kept for after the run.

mod eval;

pub use eval::eval;
use eval::truth;

use crate::graph::{display, Graph, IndexItem, NodeId, Op, Point, Value};
use crate::nn::{Hook, Module};
use crate::{Error, Result};
use ahash::AHashSet as HashSet;
use tch::Tensor;

/// A receiver of `log!` lines.
type LogSink = Box<dyn FnMut(String)>;
/// A receiver of `send!` values.
type SentSink = Box<dyn FnMut(String, Tensor)>;

thread_local! {
    /// Where `log!` lines go on this thread (`None`: standard error).
    static LOG_SINK: std::cell::RefCell<Option<LogSink>> = const { std::cell::RefCell::new(None) };
}

/// Where a `log!` line goes: the receiver of [`capture_logs`] / [`capture_logs_with`] if one is active on this
/// thread, else standard error.
pub(crate) fn emit_log(line: String) {
    let line = LOG_SINK.with(|c| match c.borrow_mut().as_mut() {
        Some(f) => {
            f(line);
            None
        }
        None => Some(line),
    });
    if let Some(line) = line {
        eprintln!("{line}");
    }
}

/// Runs `f` with `receive` getting every line that `log!` nodes print meanwhile on this thread, as it is printed,
/// instead of standard error (a server streams them to its client this way).
pub fn capture_logs_with<T>(receive: impl FnMut(String) + 'static, f: impl FnOnce() -> T) -> T {
    with_thread_value(&LOG_SINK, Some(Box::new(receive)), f)
}

/// Runs `f` with this thread's `key` set to `value`, then puts the outer value back (also when `f` panics).
fn with_thread_value<V: 'static, T>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<V>>,
    value: V,
    f: impl FnOnce() -> T,
) -> T {
    struct Restore<V: 'static>(&'static std::thread::LocalKey<std::cell::RefCell<V>>, Option<V>);
    impl<V: 'static> Drop for Restore<V> {
        fn drop(&mut self) {
            if let Some(outer) = self.1.take() {
                self.0.with(|c| *c.borrow_mut() = outer);
            }
        }
    }
    let _restore = Restore(key, Some(key.with(|c| std::mem::replace(&mut *c.borrow_mut(), value))));
    f()
}

/// Runs `f`, collecting the lines that `log!` nodes print meanwhile on this thread instead of writing them to
/// standard error.
pub fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    let lines = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let sink = lines.clone();
    let out = capture_logs_with(move |l| sink.borrow_mut().push(l), f);
    let lines = std::mem::take(&mut *lines.borrow_mut());
    (out, lines)
}

thread_local! {
    /// Where values of `send!` go on this thread (`None`: printed like `log!`).
    static SENT: std::cell::RefCell<Option<SentSink>> = const { std::cell::RefCell::new(None) };
}

/// Hands a value a `send!` node computed to this thread's receiver ([`capture_sent`]), or prints it like `log!`.
pub(crate) fn emit_sent(label: String, t: Tensor) {
    let left = SENT.with(|c| match c.borrow_mut().as_mut() {
        Some(f) => {
            f(label, t);
            None
        }
        None => Some((label, t)),
    });
    if let Some((label, t)) = left {
        let line = if t.numel() == 1 { format!("{label}: {}", t.double_value(&[])) } else { format!("{label}: {t}") };
        emit_log(line);
    }
}

/// Runs `f` with `receive` getting every value a `send!` node computes meanwhile on this thread, as it is computed
/// (a server streams them to its client this way; a remote run's sent values arrive here too).
pub fn capture_sent<T>(receive: impl FnMut(String, Tensor) + 'static, f: impl FnOnce() -> T) -> T {
    with_thread_value(&SENT, Some(Box::new(receive)), f)
}

thread_local! {
    /// The most bytes one value of a graph may have on this thread (`None`: no cap); see [`with_value_cap`].
    static VALUE_CAP: std::cell::RefCell<Option<u64>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with every graph run on this thread (a block's and its edits') refusing to compute a value of more
/// than `bytes` bytes: an op whose result would be larger (a broadcast, `cat`, `stack`, `matmul`) is an
/// [`Error::Limit`] before it allocates, and any other result over the cap is one right after. A server caps each
/// job this way, so a graph cannot exhaust its memory.
pub fn with_value_cap<T>(bytes: u64, f: impl FnOnce() -> T) -> T {
    with_thread_value(&VALUE_CAP, Some(bytes), f)
}

/// An error if `op`'s result on `inputs` would be larger than `cap` bytes (known before computing it for the ops
/// whose result can outgrow their inputs).
fn check_growth(id: NodeId, op: &Op, inputs: &[&Value], cap: u64) -> Result<()> {
    let shape = |v: &Value| v.tensor().ok().map(|t| (t.size(), t.kind().elt_size_in_bytes() as u64));
    let broadcast = |shapes: &[Vec<i64>]| -> Vec<i64> {
        let n = shapes.iter().map(Vec::len).max().unwrap_or(0);
        (0..n)
            .map(|i| shapes.iter().map(|s| if i + s.len() >= n { s[i + s.len() - n] } else { 1 }).max().unwrap_or(1))
            .collect()
    };
    let (dims, elt): (Vec<i64>, u64) = match op {
        Op::Binary { kind: crate::graph::BinaryOp::Matmul, .. } => {
            let (Some((a, ea)), Some((b, eb))) = (shape(inputs[0]), shape(inputs[1])) else { return Ok(()) };
            if a.len() < 2 || b.len() < 2 {
                return Ok(());
            }
            let mut out = broadcast(&[a[..a.len() - 2].to_vec(), b[..b.len() - 2].to_vec()]);
            out.extend([a[a.len() - 2], b[b.len() - 1]]);
            (out, ea.max(eb))
        }
        Op::Binary { .. } | Op::Where { .. } => {
            let shapes: Vec<(Vec<i64>, u64)> = inputs.iter().filter_map(|v| shape(v)).collect();
            let dims: Vec<Vec<i64>> = shapes.iter().map(|s| s.0.clone()).collect();
            (broadcast(&dims), shapes.iter().map(|s| s.1).max().unwrap_or(4))
        }
        Op::Cat { .. } | Op::Stack { .. } => {
            let shapes: Vec<(Vec<i64>, u64)> = inputs.iter().filter_map(|v| shape(v)).collect();
            let total: i64 = shapes.iter().map(|s| s.0.iter().product::<i64>()).sum();
            (vec![total], shapes.iter().map(|s| s.1).max().unwrap_or(4))
        }
        _ => return Ok(()),
    };
    within_cap(id, op, dims.iter().fold(elt, |acc, &d| acc.saturating_mul(d.max(0) as u64)), cap)
}

/// An error if `v` is larger than `cap` bytes.
fn check_size(id: NodeId, op: &Op, v: &Value, cap: u64) -> Result<()> {
    match v {
        Value::Tensor(t) => {
            within_cap(id, op, (t.numel() as u64).saturating_mul(t.kind().elt_size_in_bytes() as u64), cap)
        }
        _ => Ok(()),
    }
}

/// The limit error of node `id`'s result of `bytes` bytes, if that is over `cap`.
fn within_cap(id: NodeId, op: &Op, bytes: u64, cap: u64) -> Result<()> {
    if bytes > cap {
        return Err(Error::Limit {
            what: format!("bytes of node {id}'s result ({})", op.describe()),
            limit: cap,
            given: bytes,
        });
    }
    Ok(())
}

/// A gradient write installed for one backward: its hook, the read it writes, its node, and the gradient it wrote.
struct GradientWrite {
    hook: crate::autograd::HookHandle,
    read: NodeId,
    node: NodeId,
    written: std::sync::Arc<std::sync::Mutex<Option<Tensor>>>,
}

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
            value_cap: VALUE_CAP.with(|c| *c.borrow()),
        })
    }

    /// Prepares `graph`, one invoke that sees every row of whatever batch comes (a persistent edit's graph: its
    /// reads are whole tensors and its writes replace them whole, whatever the batch size).
    pub fn whole(graph: &'a Graph, root: &'a dyn Module) -> Result<Self> {
        Self::new(graph, vec![(0, i64::MAX)], i64::MAX, root)
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
        // Deferred nodes still waiting: the generation's ids never came (it stopped or failed).
        let mut unreached: HashSet<NodeId> = self.deferred.iter().copied().collect();
        for inv in 0..self.per_invoke.len() {
            if let Some(&id) = self.per_invoke[inv].get(self.cursor[inv]) {
                let op = &self.graph.nodes[id as usize].op;
                let rest = &self.per_invoke[inv][self.cursor[inv]..];
                if self.stopped[inv] {
                    // Code after `stop()` never runs, as in Python nnsight: say so, keep what was saved.
                    eprintln!(
                        "nnsight: warning: node {id}, {} (invoke {inv}), comes after `stop()` and was never reached",
                        op.describe()
                    );
                    unreached.extend(rest.iter().copied());
                    continue;
                }
                let ran = op.hook_point().and_then(|(m, p, _)| self.fired.get(&(m.to_string(), p)).copied());
                if let (Some((m, _, call)), Some(n)) = (op.hook_point(), ran) {
                    if call >= n {
                        // A later step that never came (the generation ended first): as in Python nnsight, warn,
                        // keep what was saved, skip the code after it.
                        eprintln!(
                            "nnsight: warning: step {call} was never reached (`{}` ran {n} time(s)); invoke {inv} skips node {id}, {}, and the code after it",
                            display(m),
                            op.describe()
                        );
                        unreached.extend(rest.iter().copied());
                        continue;
                    }
                }
                let reason = match op.hook_point() {
                    Some((m, _, _)) if ran.is_some() => format!(
                        "`{}` had already run when invoke {inv} reached it: it comes earlier in the forward pass than what the invoke used before",
                        display(m)
                    ),
                    Some((m, _, _)) => format!("`{}` did not run", display(m)),
                    None => "a value it needs was never computed".into(),
                };
                return Err(Error::NeverReached {
                    node: format!("node {id}, {} (invoke {inv})", op.describe()),
                    reason,
                });
            }
        }
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

    /// Whether every invoke has stopped (at least one by `stop()`, the others by `stop()` or by running out of
    /// nodes): nothing more is needed from the forward pass.
    pub fn all_stopped(&self) -> bool {
        self.stopped.iter().any(|&s| s)
            && (0..self.per_invoke.len()).all(|i| self.stopped[i] || self.cursor[i] >= self.per_invoke[i].len())
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
                        let v = match op {
                            Op::Apply { module, .. } => Some(self.apply(module, inputs[0])?),
                            // A trainable tensor: itself, so that gradients reach it.
                            Op::Const { .. } if !self.meta && !self.graph.live.is_empty() => {
                                match self.graph.live.get(id) {
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

    /// `loss.backward()` (node `id`, loss node `loss`, invoke `inv`): the gradients of the loss with respect to
    /// every read a `Grad` node of this backward names, each cut to the invoke's rows.
    fn backward(&mut self, id: NodeId, loss: NodeId, inv: usize) -> Result<()> {
        let l = self.values[loss as usize].as_ref().expect("checked").tensor()?.shallow_clone();
        if l.numel() != 1 {
            return Err(Error::Intervention {
                message: format!(
                    "node {id}: `.backward()` needs a single value (e.g. `.sum()`), found shape {:?}",
                    l.size()
                ),
            });
        }
        // (Grad node, whole-batch source, whether to cut it to the invoke's rows).
        let mut wanted: Vec<(NodeId, Tensor, bool)> = Vec::new();
        for (g, n) in self.graph.nodes.iter().enumerate() {
            match &n.op {
                Op::Grad { a, backward } if *backward == id => {
                    let src = self.grad_sources.get(a).ok_or_else(|| Error::Intervention {
                        message: format!(
                            "node {g}: the gradient of node {a} ({}) is wanted, but that value was not read before the loss was computed",
                            self.graph.nodes[*a as usize].op.describe()
                        ),
                    })?;
                    wanted.push((g as NodeId, src.shallow_clone(), true));
                }
                Op::ParamGrad { module, param, backward } if *backward == id => {
                    let t = self.params.get(&(module.clone(), param.clone())).expect("made to require grad at start");
                    wanted.push((g as NodeId, t.shallow_clone(), false));
                }
                _ => {}
            }
        }
        let sources: Vec<Tensor> = wanted.iter().map(|w| w.1.shallow_clone()).collect();
        let trains = self.trains();
        if sources.is_empty() && !trains {
            return Ok(());
        }
        if !l.requires_grad() {
            return Err(Error::Intervention {
                message: format!(
                    "node {id}: the loss does not depend on any value whose gradient is read, nor on any tensor that requires grad"
                ),
            });
        }
        let hooks = self.gradient_writes(id, inv)?;
        let grads = if sources.is_empty() {
            Ok(Vec::new())
        } else {
            Tensor::f_run_backward(&[&l], &sources, true, false).map_err(|e| Error::Intervention {
                message: format!(
                    "node {id} (backward): {} (is every value whose gradient is read upstream of the loss in the forward pass?)",
                    crate::error::clean_torch_message(&e.to_string())
                ),
            })
        };
        // Training: `.grad` of every trainable leaf accumulates, as `loss.backward()` does in PyTorch (with the
        // gradient writes' hooks still on). The parameters made to require grad for a `.grad` read only get none.
        let accumulated = if trains && grads.is_ok() {
            let r = crate::ffi::backward(&l, true).map_err(|e| Error::Intervention {
                message: format!(
                    "node {id} (backward into trainable tensors): {}",
                    crate::error::clean_torch_message(&e.to_string())
                ),
            });
            for t in &self.params_to_reset {
                crate::ffi::reset_grad(t);
            }
            r
        } else {
            Ok(())
        };
        let mut hook_errors = Vec::new();
        let mut written: Vec<(NodeId, NodeId, Option<Tensor>)> = Vec::new();
        for h in hooks {
            hook_errors.extend(h.hook.take_errors());
            h.hook.remove();
            let t = h.written.lock().unwrap_or_else(|p| p.into_inner()).take();
            written.push((h.read, h.node, t));
        }
        if let Some(e) = hook_errors.into_iter().next() {
            return Err(e);
        }
        let grads = grads?;
        accumulated?;
        for ((g, _, rows), grad) in wanted.into_iter().zip(grads) {
            // A gradient read after a write of it is the written one (autograd hands back the one before hooks).
            let after_write = match self.graph.nodes[g as usize].op {
                Op::Grad { a, .. } => written
                    .iter()
                    .rev()
                    .filter(|w| w.0 == a && w.1 < g)
                    .find_map(|w| w.2.as_ref())
                    .map(Tensor::shallow_clone),
                _ => None,
            };
            let grad = after_write.unwrap_or(grad);
            let mine = if rows { self.my_rows(inv, &grad)? } else { grad };
            self.grads.insert(g, mine);
        }
        Ok(())
    }

    /// The gradient writes of backward `id` (invoke `inv`) as tensor hooks on the values they name: each hook
    /// computes the write's value from the incoming gradient (the nodes after the backward that it depends on, run
    /// inside the hook) and hands it on upstream in the invoke's rows.
    fn gradient_writes(&self, id: NodeId, inv: usize) -> Result<Vec<GradientWrite>> {
        let mut hooks = Vec::new();
        for (w, n) in self.graph.nodes.iter().enumerate() {
            let Op::GradWrite { a, value, backward } = n.op else { continue };
            if backward != id {
                continue;
            }
            // The nodes after the backward that `value` depends on, in order, and the earlier values they use.
            let mut chain = std::collections::BTreeSet::new();
            let mut stack = vec![value];
            let mut outside: Vec<(NodeId, Value)> = Vec::new();
            while let Some(j) = stack.pop() {
                if j <= id {
                    let v = self.values[j as usize].as_ref().ok_or_else(|| Error::Intervention {
                        message: format!("the gradient write to node {a} needs node {j}, which has no value"),
                    })?;
                    outside.push((j, v.shallow_clone()));
                    continue;
                }
                if !chain.insert(j) {
                    continue;
                }
                match &self.graph.nodes[j as usize].op {
                    Op::Grad { a: ga, backward: gb } if *ga == a && *gb == id => {}
                    op if op.hook_point().is_some() || matches!(op, Op::Grad { .. } | Op::ParamGrad { .. }) => {
                        return Err(Error::Intervention {
                            message: format!(
                                "the gradient write to node {a} depends on node {j} ({}), which is not known while the gradient flows back",
                                op.describe()
                            ),
                        });
                    }
                    op => stack.extend(op.inputs()),
                }
            }
            let ops: Vec<(NodeId, Op)> = chain.iter().map(|&j| (j, self.graph.nodes[j as usize].op.clone())).collect();
            let src = self.grad_sources.get(&a).expect("a read whose gradient is written").shallow_clone();
            let (start, len) = self.rows[inv];
            let whole = start == 0 && len == self.batch;
            let written = std::sync::Arc::new(std::sync::Mutex::new(None::<Tensor>));
            let keep = written.clone();
            let hook = crate::autograd::register_hook(&src, move |g: &Tensor| {
                let mut vals: ahash::AHashMap<NodeId, Value> =
                    outside.iter().map(|(j, v)| (*j, v.shallow_clone())).collect();
                let mine = if whole { g.shallow_clone() } else { g.narrow(0, start, len) };
                for (j, op) in &ops {
                    let v = match op {
                        Op::Grad { .. } => Value::Tensor(mine.shallow_clone()),
                        op => {
                            let inputs: Vec<&Value> = op.inputs().iter().map(|k| &vals[k]).collect();
                            eval(op, &inputs).unwrap_or_else(|e| panic!("gradient write: node {j}: {e}"))
                        }
                    };
                    vals.insert(*j, v);
                }
                let new = vals[&value].tensor().unwrap_or_else(|e| panic!("gradient write: {e}")).shallow_clone();
                assert_eq!(new.size(), mine.size(), "gradient write: the new gradient must have the shape of the old");
                let new = new.to_kind(g.kind());
                let full = if whole { new } else { g.slice_scatter(&new, 0, start, start + len, 1) };
                *keep.lock().unwrap_or_else(|p| p.into_inner()) = Some(full.shallow_clone());
                Some(full)
            })?;
            hooks.push(GradientWrite { hook, read: a, node: w as NodeId, written });
        }
        Ok(hooks)
    }

    /// Whether the graph takes gradients (the forward then runs with autograd on): it reads gradients, or it
    /// backpropagates into trainable tensors.
    pub fn wants_gradients(&self) -> bool {
        !self.grad_reads.is_empty()
            || self.graph.nodes.iter().any(|n| matches!(n.op, Op::ParamGrad { .. }))
            || (self.graph.nodes.iter().any(|n| matches!(n.op, Op::Backward { .. })) && self.trains())
    }

    /// Whether a backward trains something: the graph uses a tensor that requires grad, or some parameter of the
    /// model requires grad (other than those made to for a `.grad` read of this run).
    fn trains(&self) -> bool {
        !self.graph.live.is_empty()
            || crate::nn::named_parameters(self.root)
                .iter()
                .any(|(_, t)| t.requires_grad() && !self.params_to_reset.iter().any(|r| crate::ffi::same_tensor(r, t)))
    }

    /// Makes the parameters whose gradients the graph reads require grad for this run (they are put back when
    /// the interleaver is dropped). A parameter that does not exist is an error naming it.
    pub fn prepare_gradients(&mut self) -> Result<()> {
        for n in &self.graph.nodes {
            let Op::ParamGrad { module, param, .. } = &n.op else { continue };
            let key = (module.clone(), param.clone());
            if self.params.contains_key(&key) {
                continue;
            }
            let m = find(self.root, module)
                .ok_or_else(|| Error::Intervention { message: format!("no module `{}`", display(module)) })?;
            let mut found = None;
            m.parameters(&mut |name, t| {
                if name == param {
                    found = Some(t.shallow_clone());
                }
            });
            let t = found.ok_or_else(|| Error::Intervention {
                message: format!("`{}` has no parameter `{param}`", display(module)),
            })?;
            if t.requires_grad() {
                // Already trainable: leave it as it is (and as it will be).
                self.params.insert(key, t);
            } else {
                let _ = t.set_requires_grad(true);
                self.params_to_reset.push(t.shallow_clone());
                self.params.insert(key, t);
            }
        }
        Ok(())
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

    fn hook_node(&mut self, id: NodeId, inv: usize, y: &mut Tensor) -> Result<Option<Value>> {
        let op = &self.graph.nodes[id as usize].op;
        match op {
            Op::Read { .. } if self.grad_reads.contains(&id) => {
                // A gradient will be taken with respect to this value: it must be in the autograd graph. The first
                // such value of a pass becomes a leaf that requires grad; what the model computes from it follows.
                if !y.requires_grad() {
                    *y = y.detach().set_requires_grad(true);
                }
                self.grad_sources.insert(id, y.shallow_clone());
                Ok(Some(Value::Tensor(self.my_rows(inv, y)?)))
            }
            Op::Read { .. } => Ok(Some(Value::Tensor(self.my_rows(inv, y)?))),
            Op::ReadInputs { .. } => Ok(Some(Value::Tuple(vec![Value::Tensor(self.my_rows(inv, y)?)]))),
            Op::Skip { value, .. } => {
                let v = self.values[*value as usize].as_ref().expect("checked").tensor()?.shallow_clone();
                self.skips.push((inv, v, id));
                Ok(None)
            }
            Op::Write { module, point, value, index, .. } => {
                let v = self.values[*value as usize].as_ref().expect("checked").tensor()?.shallow_clone();
                let target =
                    format!("`{}` {}", display(module), if *point == Point::Input { "input" } else { "output" });
                *y = self.write(inv, y, &v, index.as_deref(), &target)?;
                Ok(None)
            }
            _ => unreachable!("hook_node on a node without hook point"),
        }
    }

    fn write(&self, inv: usize, y: &Tensor, v: &Tensor, index: Option<&[IndexItem]>, target: &str) -> Result<Tensor> {
        let f = |e| Error::torch(target.to_string(), e);
        let mine = self.my_rows(inv, y)?;
        let v = crate::meta::to_device_like(v, y).map_err(f)?.f_to_kind(y.kind()).map_err(f)?;
        let new_rows = match index {
            // A single number fills the whole value; a tensor must have its shape.
            None if v.dim() == 0 => v.f_expand(mine.size(), false).and_then(|e| e.f_contiguous()).map_err(f)?,
            None => {
                if v.size() != mine.size() {
                    return Err(Error::WriteShape { target: target.into(), expected: mine.size(), given: v.size() });
                }
                v
            }
            Some(items) => {
                let copy = eval::copy(&mine).map_err(f)?;
                let mut slot = eval::index(&copy, items).map_err(|e| match e {
                    Error::IndexOutOfRange { module, index, len, dim } if module.is_empty() => {
                        Error::IndexOutOfRange { module: target.to_string(), index, len, dim }
                    }
                    other => other,
                })?;
                let (want, given) = (slot.size(), v.size());
                if v.f_broadcast_to(want.as_slice()).is_err() {
                    return Err(Error::WriteShape {
                        target: format!("{target}[{}]", eval::index_text(items)),
                        expected: want,
                        given,
                    });
                }
                slot.f_copy_(&v).map_err(f)?;
                copy
            }
        };
        let (start, len) = self.rows[inv];
        if start == 0 && len == self.batch {
            Ok(new_rows)
        } else {
            y.f_slice_scatter(&new_rows, 0, start, start + len, 1).map_err(f)
        }
    }

    fn apply(&self, module: &str, x: &Value) -> Result<Value> {
        let m = find(self.root, module)
            .ok_or_else(|| Error::Intervention { message: format!("no module `{}` to call", display(module)) })?;
        let fwd = m.as_forward().ok_or_else(|| Error::Intervention {
            message: format!("`{}` ({}) cannot be called", display(module), m.kind()),
        })?;
        let mut cx = crate::nn::Ctx::new();
        Ok(Value::Tensor(fwd.forward(&mut cx, x.tensor()?)?))
    }
}

/// [`eval`] in a scan: tensor constants are meta tensors of their shape and dtype, a move to a device keeps the
/// value meta, `log!` prints the shape; every other op runs as it is, on meta tensors.
fn eval_meta(op: &Op, inputs: &[&Value]) -> Result<Value> {
    let t = |e| Error::torch("intervention", e);
    match op {
        Op::Const { value: crate::graph::Constant::Tensor(d) } => {
            let kind = crate::graph::value::kind_from_name(&d.kind)?;
            Ok(Value::Tensor(crate::meta::empty(&d.shape, kind).map_err(t)?))
        }
        Op::ToDevice { .. } => Ok(Value::Tensor(crate::meta::to_meta(inputs[0].tensor()?).map_err(t)?)),
        Op::Log { label, .. } => {
            let line = match inputs[0] {
                Value::Tensor(x) => format!("{label}: Tensor[{:?}, {:?}] (scan: shape only)", x.size(), x.kind()),
                other => format!("{label}: {other:?}"),
            };
            emit_log(line);
            Ok(Value::Tuple(vec![]))
        }
        _ => eval(op, inputs),
    }
}

/// An error of node `id`, said where it happened: libtorch's as an intervention failure naming the node, an
/// index out of range naming the value indexed.
fn at_node(e: Error, id: NodeId, graph: &Graph) -> Error {
    let op = &graph.nodes[id as usize].op;
    match e {
        Error::Torch { source, .. } => Error::Intervention {
            message: format!(
                "node {id} ({}): {}",
                op.describe(),
                crate::error::clean_torch_message(&source.to_string())
            ),
        },
        Error::IndexOutOfRange { module, index, len, dim } if module.is_empty() => {
            let place = match op.inputs().first() {
                Some(&a) => value_place(graph, a),
                None => format!("node {id}"),
            };
            Error::IndexOutOfRange { module: place, index, len, dim }
        }
        other => other,
    }
}

/// A value as users wrote it: `` `model.model.layers.0.self_attn.head_output` output ``, or the node computing it.
fn value_place(graph: &Graph, id: NodeId) -> String {
    match &graph.nodes[id as usize].op {
        Op::Read { module, point, call } => {
            let call = if *call > 0 { format!(" (call {call})") } else { String::new() };
            let point = if *point == Point::Input { "input" } else { "output" };
            format!("`{}` {point}{call}", display(module))
        }
        Op::ReadInputs { module, .. } => format!("`{}` inputs", display(module)),
        other => format!("the value of node {id} ({})", other.describe()),
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
            for inv in 0..self.per_invoke.len() {
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

impl Interleaver<'_> {
    /// The output replacing `module`'s forward when every invoke skips it: each invoke's value in its rows.
    fn take_skip(&mut self, module: &str, x: &Tensor) -> Result<Option<Tensor>> {
        if self.skips.is_empty() {
            return Ok(None);
        }
        let skips = std::mem::take(&mut self.skips);
        let n = self.per_invoke.len();
        let missing: Vec<usize> = (0..n).filter(|i| !skips.iter().any(|s| s.0 == *i)).collect();
        if !missing.is_empty() {
            return Err(Error::Intervention {
                message: format!(
                    "partial skip of `{}`: invoke(s) {:?} skip it but invoke(s) {:?} do not; every invoke must give a value, or none",
                    display(module),
                    skips.iter().map(|s| s.0).collect::<Vec<_>>(),
                    missing
                ),
            });
        }
        let f = |e| Error::torch(module.to_string(), e);
        if let [(inv, v, _)] = skips.as_slice() {
            let (start, len) = self.rows[*inv];
            if start == 0 && len == self.batch {
                self.check_skip(module, v, x)?;
                return Ok(Some(crate::meta::to_device_like(v, x).map_err(f)?));
            }
        }
        // Several invokes: each value fills its rows, in row order (rows do not overlap).
        let mut parts: Vec<(i64, Tensor)> = Vec::new();
        for (inv, v, _) in &skips {
            let (start, len) = self.rows[*inv];
            if len == self.batch && n > 1 {
                return Err(Error::Intervention {
                    message: format!(
                        "skip of `{}`: invoke {inv} sees the whole batch, so its value cannot be combined with the other invokes' values",
                        display(module)
                    ),
                });
            }
            if v.size().first() != Some(&len) {
                return Err(Error::BatchRows {
                    target: format!("skip of `{}` (invoke {inv})", display(module)),
                    rows: len,
                    given: v.size(),
                });
            }
            parts.push((start, crate::meta::to_device_like(v, x).map_err(f)?));
        }
        parts.sort_by_key(|p| p.0);
        let tensors: Vec<Tensor> = parts.into_iter().map(|p| p.1).collect();
        Tensor::f_cat(&tensors, 0).map(Some).map_err(|e| Error::Intervention {
            message: format!(
                "skip of `{}`: the invokes' values do not fit together: {}",
                display(module),
                crate::error::clean_torch_message(&e.to_string())
            ),
        })
    }

    /// A single skip value must have the batch's rows.
    fn check_skip(&self, module: &str, v: &Tensor, x: &Tensor) -> Result<()> {
        if v.size().first() != x.size().first() {
            return Err(Error::BatchRows {
                target: format!("skip of `{}`", display(module)),
                rows: x.size().first().copied().unwrap_or(0),
                given: v.size(),
            });
        }
        Ok(())
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
