//! A trace: one `intervene!` block's graph, its invokes, and the model it runs on ([`Trace`], [`Scan`]), and the
//! local executor that runs a graph on a target ([`run_trace`]).

use super::results::TraceResults;
use super::target::{Prepared, ScanTarget, TraceTarget};
use super::Traceable;
use crate::handle::builder::{CallOrder, GraphCell};
use crate::interleave::Interleaver;
use crate::nn::Hook;
use crate::{Error, Result};
use std::cell::RefCell;
use std::sync::Arc;
use tch::Tensor;

/// One traced block: the graph its code builds, its invokes, and the target it runs on.
pub struct Trace<'m, T: TraceTarget> {
    target: &'m T,
    graph: GraphCell,
    inputs: RefCell<Vec<Option<T::Input>>>,
    /// The server the block runs on (`.remote(..)`), if any.
    remote: RefCell<Option<crate::remote::Remote>>,
}

impl<'m, T: TraceTarget> Trace<'m, T> {
    /// A trace of `target`; with an `input`, its first invoke takes it.
    pub fn new(target: &'m T, input: Option<T::Input>) -> Result<Self> {
        let order = target.call_order(input.as_ref())?;
        let tr = Trace {
            target,
            graph: GraphCell::new(order),
            inputs: RefCell::new(Vec::new()),
            remote: RefCell::new(None),
        };
        if let Some(i) = input {
            tr.invoke(Some(i))?;
        }
        Ok(tr)
    }

    /// Starts an invoke on `input` (none: the whole batch).
    pub fn invoke(&self, input: Option<T::Input>) -> Result<()> {
        if self.graph.inner.borrow().order.is_none() {
            if let Some(order) = self.target.call_order(input.as_ref())? {
                self.graph.inner.borrow_mut().order = Some(order);
            }
        }
        self.inputs.borrow_mut().push(input);
        self.graph.begin_invoke();
        Ok(())
    }

    /// The root envoy: `model` inside the block.
    pub fn root(&self) -> &'m <T::Root as Traceable>::Envoy {
        self.target.envoy()
    }

    /// The graph under construction.
    pub fn graph(&self) -> &GraphCell {
        &self.graph
    }

    /// Runs the model with the graph interleaved (on the server, when the block or the model names one); returns
    /// the saved values.
    pub fn run(&self) -> Result<TraceResults> {
        let inputs = self.take_inputs("trace")?;
        let builder = self.graph.inner.borrow();
        crate::graph::note_run(&builder.graph);
        if let Some(remote) = self.remote_target() {
            let inputs = self.target.wire_inputs(&inputs)?;
            let job =
                crate::remote::Job::Trace { graph: builder.graph.clone(), inputs, edits: self.target.wire_edits() };
            return remote.run(job).map(TraceResults::from);
        }
        run_trace(self.target, &builder.graph, &inputs, None).map(TraceResults::from)
    }

    /// Runs this block on a server (`intervene!(model.trace(input).remote(&server) { .. })`) instead of here.
    pub fn remote(&self, server: &crate::remote::Remote) {
        *self.remote.borrow_mut() = Some(server.clone());
    }

    /// Where the block runs remotely, if it does: the block's own server, else the model's (a model connected
    /// to a server).
    pub(crate) fn remote_target(&self) -> Option<crate::remote::Remote> {
        self.remote.borrow().clone().or_else(|| self.target.remote().cloned())
    }

    /// A trace of `target` without invokes yet, with a known call order (or none).
    pub(crate) fn bare(target: &'m T, order: Option<Arc<CallOrder>>) -> Self {
        Trace { target, graph: GraphCell::new(order), inputs: RefCell::new(Vec::new()), remote: RefCell::new(None) }
    }

    /// The target.
    pub(crate) fn target(&self) -> &'m T {
        self.target
    }

    /// The graph's first build error, else the invokes' inputs batched.
    pub(crate) fn prepare(&self, form: &str) -> Result<Prepared<T::Prepared>> {
        let inputs = self.take_inputs(form)?;
        self.target.prepare(&inputs)
    }

    /// The graph's first build error, else the invokes' inputs (at least one).
    pub(crate) fn take_inputs(&self, form: &str) -> Result<Vec<Option<T::Input>>> {
        if let Some(e) = self.graph.inner.borrow_mut().error.take() {
            return Err(e);
        }
        let inputs = std::mem::take(&mut *self.inputs.borrow_mut());
        if inputs.is_empty() {
            return Err(Error::InvalidInput {
                message: format!("a {form} needs an input: `model.{form}(input)` or an `invoke(input)`"),
            });
        }
        Ok(inputs)
    }
}

/// Runs `graph` on `target` over the invokes' `inputs`: the model with the graph interleaved. `watch`, if given, is
/// called at every hook event; an `Err` from it ends the run with that error (a server's time limit).
pub fn run_trace<T: TraceTarget>(
    target: &T,
    graph: &crate::graph::Graph,
    inputs: &[Option<T::Input>],
    watch: Option<&dyn Fn() -> Result<()>>,
) -> Result<crate::interleave::Finished> {
    let (batch, mut inter) = started(target, graph, inputs)?;
    if !inter.all_stopped() {
        // Autograd only when the graph reads gradients; otherwise the pass records nothing for it.
        inter.prepare_gradients()?;
        let _no_grad = (!inter.wants_gradients()).then(tch::no_grad_guard);
        let mut watched;
        let hook: &mut dyn Hook = match watch {
            Some(w) => {
                watched = Watched { inner: &mut inter, watch: w };
                &mut watched
            }
            None => &mut inter,
        };
        match target.forward_hooked(&batch, hook) {
            Ok(()) | Err(Error::Stopped) => {}
            Err(e) => return Err(e),
        }
    }
    inter.finish_all()
}

/// The invokes' inputs batched, and an interleaver of `graph` over them that has run what comes before the
/// forward pass.
pub(crate) fn started<'g, T: TraceTarget>(
    target: &'g T,
    graph: &'g crate::graph::Graph,
    inputs: &[Option<T::Input>],
) -> Result<(T::Prepared, Interleaver<'g>)> {
    let (batch, rows, size) = target.prepare(inputs)?;
    let mut inter = Interleaver::new(graph, rows, size, target.root())?;
    inter.start()?;
    Ok((batch, inter))
}

/// A hook that calls `watch` at every event before handing it on (see [`run_trace`]).
pub(crate) struct Watched<'a, 'h> {
    pub(crate) inner: &'h mut (dyn Hook + 'a),
    pub(crate) watch: &'h dyn Fn() -> Result<()>,
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

/// One scanned block (`intervene!(model.scan(input) { .. })`): a [`Trace`] whose run goes through the target's
/// meta twin on meta inputs. The graph is the same; saved values come back as meta tensors (their `.size()` and
/// `.kind()` are those a trace gives), and shape errors (a write of the wrong shape, an op on mismatched shapes)
/// are reported as a trace would report them, without any arithmetic.
///
/// Only [`Scan::new`] asks for a [`ScanTarget`] (so that scanning something else is one compile error, there).
pub struct Scan<'m, T: TraceTarget> {
    trace: Trace<'m, T>,
    scan_root: fn(&T) -> Result<&T::Root>,
    forward_scan: fn(&T, &T::Prepared, &mut dyn Hook) -> Result<()>,
}

impl<'m, T: TraceTarget> Scan<'m, T> {
    /// A scan of `target`; with an `input`, its first invoke takes it. The call order (for the build-time order
    /// checks) is recorded on the meta twin if the model has not recorded it yet.
    pub fn new(target: &'m T, input: Option<T::Input>) -> Result<Self>
    where
        T: ScanTarget,
    {
        let order = target.scan_call_order()?;
        let trace = Trace {
            target,
            graph: GraphCell::new(order),
            inputs: RefCell::new(Vec::new()),
            remote: RefCell::new(None),
        };
        let scan = Scan { trace, scan_root: T::scan_root, forward_scan: T::forward_scan };
        if let Some(i) = input {
            scan.invoke(Some(i))?;
        }
        Ok(scan)
    }

    /// Starts an invoke on `input` (none: the whole batch).
    pub fn invoke(&self, input: Option<T::Input>) -> Result<()> {
        self.trace.inputs.borrow_mut().push(input);
        self.trace.graph.begin_invoke();
        Ok(())
    }

    /// Runs the meta twin with the graph interleaved; returns the saved values (meta tensors).
    pub fn run(&self) -> Result<TraceResults> {
        let tr = &self.trace;
        let (batch, rows, size) = tr.prepare("scan")?;
        let builder = tr.graph.inner.borrow();
        crate::graph::note_run(&builder.graph);
        let mut inter = Interleaver::new(&builder.graph, rows, size, (self.scan_root)(tr.target)?)?.scan();
        inter.start()?;
        if !inter.all_stopped() {
            let _no_grad = tch::no_grad_guard();
            match (self.forward_scan)(tr.target, &batch, &mut inter) {
                Ok(()) | Err(Error::Stopped) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(TraceResults::from(inter.finish_all()?))
    }
}

impl<'m, T: TraceTarget> std::ops::Deref for Scan<'m, T> {
    type Target = Trace<'m, T>;
    fn deref(&self) -> &Trace<'m, T> {
        &self.trace
    }
}
