//! A trace: one `intervene!` block's graph, its invokes, the model it runs on and where ([`Trace`], [`Scan`]).
//! Running is the execution layer's ([`crate::exec`]): the block hands its graph to a backend.

use super::results::TraceResults;
use crate::exec::{run_scan, Backend, Program, ScanTarget, TraceTarget};
use crate::handle::builder::{CallOrder, GraphCell};
use crate::nn::Hook;
use crate::{Error, Result};
use std::cell::RefCell;
use std::sync::Arc;

/// One traced block: the graph its code builds, its invokes, and the target it runs on.
pub struct Trace<'m, T: TraceTarget> {
    target: &'m T,
    graph: GraphCell,
    inputs: RefCell<Vec<Option<T::Input>>>,
    /// Where the block runs when it names a place itself (`.remote(..)`); else where the target runs.
    backend: RefCell<Option<Box<dyn Backend<T::Input>>>>,
}

impl<'m, T: TraceTarget> Trace<'m, T> {
    /// A trace of `target`; with an `input`, its first invoke takes it.
    pub fn new(target: &'m T, input: Option<T::Input>) -> Result<Self> {
        let order = target.call_order(input.as_ref())?;
        let tr = Trace {
            target,
            graph: GraphCell::new(order),
            inputs: RefCell::new(Vec::new()),
            backend: RefCell::new(None),
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
    pub fn root(&self) -> &'m T::View {
        self.target.view()
    }

    /// The graph under construction.
    pub fn graph(&self) -> &GraphCell {
        &self.graph
    }

    /// Runs the model with the graph interleaved, through the block's backend (the block's server, else the
    /// target's: here, or the server a connected model names); returns the saved values.
    pub fn run(&self) -> Result<TraceResults> {
        let inputs = self.take_inputs("trace")?;
        let builder = self.graph.inner.borrow();
        crate::graph::note_run(&builder.graph);
        let own = self.backend.borrow();
        let backend = own.as_deref().unwrap_or_else(|| self.target.backend());
        let program = Program { graph: &builder.graph, live: Some(&builder.live) };
        backend.trace(self.target, program, &inputs).map(TraceResults::from)
    }

    /// Runs this block on a server (`intervene!(model.trace(input).remote(&server) { .. })`) instead of here.
    pub fn remote(&self, server: &crate::remote::Remote)
    where
        crate::remote::Remote: Backend<T::Input>,
    {
        *self.backend.borrow_mut() = Some(Box::new(server.clone()));
    }

    /// A trace of `target` without invokes yet, with a known call order (or none).
    pub(crate) fn bare(target: &'m T, order: Option<Arc<CallOrder>>) -> Self {
        Trace { target, graph: GraphCell::new(order), inputs: RefCell::new(Vec::new()), backend: RefCell::new(None) }
    }

    /// The target.
    pub(crate) fn target(&self) -> &'m T {
        self.target
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
            backend: RefCell::new(None),
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
        let inputs = tr.take_inputs("scan")?;
        let builder = tr.graph.inner.borrow();
        crate::graph::note_run(&builder.graph);
        let root = (self.scan_root)(tr.target)?;
        let edits = tr.target.edits();
        let program = Program { graph: &builder.graph, live: None };
        run_scan(tr.target, root, self.forward_scan, program, &inputs, &edits).map(TraceResults::from)
    }
}

impl<'m, T: TraceTarget> std::ops::Deref for Scan<'m, T> {
    type Target = Trace<'m, T>;
    fn deref(&self) -> &Trace<'m, T> {
        &self.trace
    }
}
