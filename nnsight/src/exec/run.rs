//! Local execution: a graph interleaved with a target's forward pass ([`run_trace`]), its decoding loop
//! ([`run_generate`]) or its meta twin ([`run_scan`]), the target's edits in front of the graph's own hook.

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
/// interleaved. `watch`, if given, is called at every hook event.
pub fn run_trace<T: TraceTarget>(
    target: &T,
    program: Program<'_>,
    inputs: &[Option<T::Input>],
    edits: &[Arc<Graph>],
    watch: Option<Watch<'_>>,
) -> Result<Finished> {
    let (batch, mut inter) = started(target, program, inputs)?;
    if !inter.all_stopped() {
        // Autograd only when the graph reads gradients; otherwise the pass records nothing for it.
        inter.prepare_gradients()?;
        let _no_grad = (!inter.wants_gradients()).then(tch::no_grad_guard);
        let run = watched(&mut inter, watch, |hook| {
            chained(edits, target.root(), false, hook, |h| target.forward_hooked(&batch, h))
        });
        match run {
            Ok(()) | Err(Error::Stopped) => {}
            Err(e) => return Err(e),
        }
    }
    inter.finish_all()
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
            Ok(ids) => {
                // `model.generated()`: the ids as one event, right-padded with -1 (no token has that id).
                let width = ids.iter().map(Vec::len).max().unwrap_or(0);
                let flat: Vec<i64> = ids
                    .iter()
                    .flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(-1, width - r.len())))
                    .collect();
                let t = Tensor::from_slice(&flat).reshape([ids.len() as i64, width as i64]);
                inter.provide_generated(&t)?;
            }
            Err(Error::Stopped) => {}
            Err(e) => return Err(e),
        }
    }
    inter.finish_all()
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
fn started<'g, T: TraceTarget>(
    target: &'g T,
    program: Program<'g>,
    inputs: &[Option<T::Input>],
) -> Result<(T::Prepared, Interleaver<'g>)> {
    let (batch, rows, size) = target.prepare(inputs)?;
    let mut inter = Interleaver::new(program.graph, rows, size, target.root())?;
    if let Some(live) = program.live {
        inter = inter.with_live(live);
    }
    inter.start()?;
    Ok((batch, inter))
}

/// Runs `f` with `inner` as the hook, behind `watch` when there is one.
fn watched<R>(inner: &mut dyn Hook, watch: Option<Watch<'_>>, f: impl FnOnce(&mut dyn Hook) -> Result<R>) -> Result<R> {
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
