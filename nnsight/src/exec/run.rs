//! Local execution: a graph interleaved with a target's forward pass ([`run_trace`]), its decoding loop
//! ([`run_generate`]) or its meta twin ([`run_scan`]), the target's edits in front of the graph's own hook.

use super::batching::{self, PassInfo, SkipPrefix};
use super::edits::chained;
use super::target::{GenerateTarget, TraceTarget};
use crate::graph::Graph;
use crate::handle::builder::LiveTensors;
use crate::interleave::{Finished, Interleaver};
use crate::nn::Hook;
use crate::{Error, Result};
use std::sync::Arc;
use tch::Tensor;

/// A block's graph as a run takes it: the IR, and the tensors of this process some of its constants stand for
/// (see [`LiveTensors`]; none for a graph that came over the wire).
#[derive(Debug, Clone, Copy)]
pub struct Program<'a> {
    /// The graph.
    pub graph: &'a Graph,
    /// Its live tensors, if it has any.
    pub live: Option<&'a LiveTensors>,
}

impl<'a> From<&'a Graph> for Program<'a> {
    /// A graph without live tensors.
    fn from(graph: &'a Graph) -> Self {
        Program { graph, live: None }
    }
}

/// A check called at every hook event of a run; an `Err` from it ends the run with that error (a server's time
/// limit, a cancelled job).
pub type Watch<'a> = &'a dyn Fn() -> Result<()>;

/// Runs `program` on `target` over the invokes' `inputs`: the model with `edits` (oldest first) and then the graph
/// interleaved. `watch`, if given, is called at every hook event. The invokes run as one forward pass, or as
/// several of at most [`TraceTarget::batching`]'s rows, with shared prefixes (see [`super::batching`]).
pub fn run_trace<T: TraceTarget>(
    target: &T,
    program: Program<'_>,
    inputs: &[Option<T::Input>],
    edits: &[Arc<Graph>],
    watch: Option<Watch<'_>>,
) -> Result<Finished> {
    let settings = batching::settings(target);
    let (batch, rows, size) = target.prepare(inputs)?;
    let splittable = batching::splittable(program.graph);
    let passes = match settings.max_rows {
        Some(max) if splittable && size > max as i64 && inputs.iter().all(Option::is_some) => {
            batching::chunks(program.graph, &rows.iter().map(|r| r.1).collect::<Vec<_>>(), max)
        }
        _ => std::iter::once(0..inputs.len()).collect(),
    };
    batching::record_start();
    let mut inter = interleaver(target, program, rows, size)?;
    let share = settings.share_prefix && splittable;
    // The head on the last position only, when nothing reads the others' logits.
    let last_only = splittable
        && target.head_paths().is_some_and(|heads| batching::reads_last_position_only(program.graph, edits, &heads));
    let pass = Pass { target, graph: program.graph, edits, watch, share, last_only };
    if let [_] = passes.as_slice() {
        let mut batch = batch;
        if last_only {
            target.last_position_only(&mut batch);
        }
        pass.run(&mut inter, &batch)?;
    } else {
        drop(batch);
        for range in passes {
            let (mut batch, rows, size) = target.prepare(&inputs[range.clone()])?;
            if last_only {
                target.last_position_only(&mut batch);
            }
            inter.begin_pass(range, &rows, size);
            pass.run(&mut inter, &batch)?;
            inter.end_pass()?;
        }
    }
    inter.finish_all()
}

/// One forward pass of a trace over a batch (all its invokes', or a chunk's).
struct Pass<'a, T: TraceTarget> {
    target: &'a T,
    graph: &'a Graph,
    edits: &'a [Arc<Graph>],
    watch: Option<Watch<'a>>,
    /// Whether leading layers may be shared by repeated rows.
    share: bool,
    /// Whether the head runs on the last position only.
    last_only: bool,
}

impl<T: TraceTarget> Pass<'_, T> {
    /// Runs the model on `batch` with `inter` (its pass begun) and the edits interleaved.
    fn run(&self, inter: &mut Interleaver<'_>, batch: &T::Prepared) -> Result<()> {
        if inter.all_stopped() {
            return Ok(());
        }
        // Autograd only when the graph reads gradients; otherwise the pass records nothing for it.
        inter.prepare_gradients()?;
        let _no_grad = (!inter.wants_gradients()).then(tch::no_grad_guard);
        let prefix = match self.share && !inter.wants_gradients() {
            true => self.shared_prefix(inter, batch)?,
            false => None,
        };
        batching::record(PassInfo {
            invokes: inter.active(),
            rows: inter.batch_rows(),
            shared_layers: prefix.as_ref().map_or(0, |p| p.0.len()),
            distinct_rows: prefix.as_ref().map_or(0, |p| p.2),
            last_position_only: self.last_only,
        });
        let run = watched(inter, self.watch, |hook| {
            chained(self.edits, self.target.root(), false, hook, |h| match &prefix {
                Some((layers, value, _)) => {
                    let skipped = layers.iter().map(String::as_str).collect();
                    self.target.forward_hooked(batch, &mut SkipPrefix { inner: h, skipped, value })
                }
                None => self.target.forward_hooked(batch, h),
            })
        });
        match run {
            Ok(()) | Err(Error::Stopped) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The leading layers this pass skips and the output they give, when its rows repeat and nothing touches them.
    /// (The layers, the value, how many distinct rows computed it.)
    fn shared_prefix(
        &self,
        inter: &Interleaver<'_>,
        batch: &T::Prepared,
    ) -> Result<Option<(Vec<String>, Tensor, usize)>> {
        let (Some(layers), Some(order)) = (self.target.layer_paths(), self.target.call_order(None)?) else {
            return Ok(None);
        };
        let k = batching::untouched_layers(&order, &layers, self.graph, inter.active(), self.edits);
        if k == 0 {
            return Ok(None);
        }
        let value = batching::shared_prefix(self.target, batch, &layers[k - 1], self.watch)?;
        Ok(value.map(|(v, n)| (layers[..k].to_vec(), v, n)))
    }
}

/// Runs `program` over a decoding loop of `target` on the invokes' `inputs`, `edits` applied at every step; `watch`
/// as in [`run_trace`]. `model.generated()` ([`crate::graph::Op::Generated`]) is given the ids at the end.
pub fn run_generate<T: GenerateTarget>(
    target: &T,
    program: Program<'_>,
    inputs: &[Option<T::Input>],
    options: &T::Options,
    edits: &[Arc<Graph>],
    watch: Option<Watch<'_>>,
) -> Result<Finished> {
    let (batch, mut inter) = started(target, program, inputs)?;
    if !inter.all_stopped() {
        let _no_grad = tch::no_grad_guard();
        let run = watched(&mut inter, watch, |hook| {
            chained(edits, target.root(), false, hook, |h| target.generate_hooked(&batch, options, h))
        });
        match run {
            Ok(ids) => inter.provide_generated(&generated_ids(&ids))?,
            Err(Error::Stopped) => {}
            Err(e) => return Err(e),
        }
    }
    inter.finish_all()
}

/// `model.generated()`: each row's ids (prompt and new tokens) as one tensor `[rows, longest]`, right-padded with
/// -1 (no token has that id).
pub(crate) fn generated_ids(ids: &[Vec<i64>]) -> Tensor {
    let width = ids.iter().map(Vec::len).max().unwrap_or(0);
    let flat: Vec<i64> =
        ids.iter().flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(-1, width - r.len()))).collect();
    Tensor::from_slice(&flat).reshape([ids.len() as i64, width as i64])
}

/// Runs `program` over `target`'s meta twin (`scan_root`, run by `forward_scan`) on the invokes' `inputs` made meta,
/// `edits` in front: shapes and dtypes only, nothing real allocated.
pub fn run_scan<T: TraceTarget>(
    target: &T,
    scan_root: &T::Root,
    forward_scan: fn(&T, &T::Prepared, &mut dyn Hook) -> Result<()>,
    program: Program<'_>,
    inputs: &[Option<T::Input>],
    edits: &[Arc<Graph>],
) -> Result<Finished> {
    let (batch, rows, size) = target.prepare(inputs)?;
    let mut inter = Interleaver::new(program.graph, rows, size, scan_root)?.scan();
    inter.start()?;
    if !inter.all_stopped() {
        let _no_grad = tch::no_grad_guard();
        match chained(edits, scan_root, true, &mut inter, |h| forward_scan(target, &batch, h)) {
            Ok(()) | Err(Error::Stopped) => {}
            Err(e) => return Err(e),
        }
    }
    inter.finish_all()
}

/// The invokes' inputs batched, and an interleaver of `program` over them that has run what comes before the
/// forward pass.
pub(crate) fn started<'g, T: TraceTarget>(
    target: &'g T,
    program: Program<'g>,
    inputs: &[Option<T::Input>],
) -> Result<(T::Prepared, Interleaver<'g>)> {
    let (batch, rows, size) = target.prepare(inputs)?;
    Ok((batch, interleaver(target, program, rows, size)?))
}

/// An interleaver of `program` over invokes with `rows` of a batch of `size`, that has run what comes before the
/// forward pass.
fn interleaver<'g, T: TraceTarget>(
    target: &'g T,
    program: Program<'g>,
    rows: Vec<(i64, i64)>,
    size: i64,
) -> Result<Interleaver<'g>> {
    let mut inter = Interleaver::new(program.graph, rows, size, target.root())?;
    if let Some(live) = program.live {
        inter = inter.with_live(live);
    }
    inter.start()?;
    Ok(inter)
}

/// Runs `f` with `inner` as the hook, behind `watch` when there is one.
pub(crate) fn watched<R>(
    inner: &mut dyn Hook,
    watch: Option<Watch<'_>>,
    f: impl FnOnce(&mut dyn Hook) -> Result<R>,
) -> Result<R> {
    match watch {
        Some(watch) => f(&mut Watched { inner, watch }),
        None => f(inner),
    }
}

/// A hook that calls `watch` at every event before handing it on (see [`run_trace`]).
struct Watched<'a, 'h> {
    inner: &'h mut (dyn Hook + 'a),
    watch: Watch<'h>,
}

impl Hook for Watched<'_, '_> {
    fn input(&mut self, module: &str, x: Tensor) -> Result<Tensor> {
        (self.watch)()?;
        self.inner.input(module, x)
    }
    fn output(&mut self, module: &str, y: Tensor) -> Result<Tensor> {
        (self.watch)()?;
        self.inner.output(module, y)
    }
    fn skip(&mut self, module: &str, x: &Tensor) -> Result<Option<Tensor>> {
        self.inner.skip(module, x)
    }
    fn wants_points(&mut self, module: &str, names: &[&str]) -> bool {
        self.inner.wants_points(module, names)
    }
    fn point(&mut self, path: &str, t: Tensor) -> Result<Tensor> {
        (self.watch)()?;
        self.inner.point(path, t)
    }
}
