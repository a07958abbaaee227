//! Persistent edits: `intervene!(model.edit() { .. })` returns an edited model, and
//! `intervene!(model.edit_in_place() { .. })` edits the model itself, so that every later forward pass of it (a
//! trace, a generation step, a scan, a plain `forward`) applies the block's writes and skips first.
//!
//! An edit is a graph like a trace's, with one invoke that sees every row of whatever batch comes. It runs as a
//! [`Hook`] in front of the run's own hook (`EditHook`): its interleaver sees each module event first, and once
//! all its nodes have run it starts over, so a generation applies it at every step. The edited model
//! ([`Edited`]) borrows the model and shares its weights; edits stack (the model's own in-place edits run first,
//! then each edited layer's, oldest first), and [`Editable::clear_edits`] / dropping the edited model leaves the
//! model exactly as it was, since an edit never touches weights.

use super::target::{Prepared, TraceTarget};
use super::trace::Trace;
use super::{GenerateTarget, GraphCell, ScanTarget, Traceable};
use crate::graph::{Graph, Op};
use crate::interleave::Interleaver;
use crate::nn::{Hook, Module};
use crate::{Error, Result};
use std::sync::{Arc, RwLock};
use tch::Tensor;

/// The edits a model applies before every run, oldest first.
#[derive(Debug, Default)]
pub struct EditList(RwLock<Vec<Arc<Graph>>>);

impl EditList {
    /// No edits.
    pub fn new() -> Self {
        Self::default()
    }

    /// The edits now (a run keeps this copy, so an edit added meanwhile applies from the next run on).
    pub fn snapshot(&self) -> Vec<Arc<Graph>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Adds an edit after the others.
    pub fn push(&self, edit: Arc<Graph>) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).push(edit);
    }

    /// Removes every edit.
    pub fn clear(&self) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// How many edits there are.
    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A model that can carry edits of its own (in place): [`crate::LanguageModel`] and [`crate::NNsight`].
pub trait Editable: TraceTarget {
    /// The model's in-place edits.
    fn edit_list(&self) -> &EditList;

    /// Removes the model's in-place edits: its outputs are again exactly those of the unedited model.
    fn clear_edits(&self) {
        self.edit_list().clear();
    }
}

/// A model with edits on top of another (`intervene!(model.edit() { .. })`): it shares the model's weights and
/// module tree, and every trace, generation or scan of it applies the model's own edits, then these. Trace it as
/// the model itself; edit it again to stack more edits; drop it (or [`Edited::clear_edits`]) to be rid of them.
pub struct Edited<'m, T: TraceTarget> {
    pub(crate) base: &'m T,
    pub(crate) edits: EditList,
}

impl<'m, T: TraceTarget> Edited<'m, T> {
    /// `base` with `edits` on top, oldest first (a server applies a request's edits this way).
    pub(crate) fn with_edits(base: &'m T, edits: Vec<Arc<Graph>>) -> Self {
        let list = EditList::new();
        for e in edits {
            list.push(e);
        }
        Edited { base, edits: list }
    }

    /// The model underneath (without this layer's edits; with its own in-place ones).
    pub fn base(&self) -> &'m T {
        self.base
    }

    /// How many edits this layer applies (after the model's own).
    pub fn edit_count(&self) -> usize {
        self.edits.len()
    }

    /// Removes this layer's edits (the model's own in-place edits stay).
    pub fn clear_edits(&self) {
        self.edits.clear();
    }
}

impl<T: TraceTarget> TraceTarget for Edited<'_, T> {
    type Root = T::Root;
    type Input = T::Input;
    type Prepared = T::Prepared;

    fn root(&self) -> &Self::Root {
        self.base.root()
    }
    fn envoy(&self) -> &<Self::Root as Traceable>::Envoy {
        self.base.envoy()
    }
    fn call_order(&self, sample: Option<&Self::Input>) -> Result<Option<Arc<super::CallOrder>>> {
        self.base.call_order(sample)
    }
    fn prepare(&self, inputs: &[Option<Self::Input>]) -> Result<Prepared<Self::Prepared>> {
        self.base.prepare(inputs)
    }
    fn forward_hooked(&self, batch: &Self::Prepared, hook: &mut dyn Hook) -> Result<()> {
        let own = self.edits.snapshot();
        let mut hook = EditHook::new(&own, self.base.root(), false, hook)?;
        self.base.forward_hooked(batch, &mut hook)
    }
    fn remote(&self) -> Option<&crate::remote::Remote> {
        self.base.remote()
    }
    fn wire_inputs(&self, inputs: &[Option<Self::Input>]) -> Result<Vec<Option<crate::models::batch::Input>>> {
        self.base.wire_inputs(inputs)
    }
    /// The model's edits, then these.
    fn wire_edits(&self) -> Vec<Graph> {
        let mut all = self.base.wire_edits();
        all.extend(self.edits.snapshot().iter().map(|g| Graph::clone(g)));
        all
    }
}

impl<T: GenerateTarget> GenerateTarget for Edited<'_, T> {
    type Options = T::Options;
    fn max_steps(options: &Self::Options) -> usize {
        T::max_steps(options)
    }
    fn generate_hooked(
        &self,
        batch: &Self::Prepared,
        options: &Self::Options,
        hook: &mut dyn Hook,
    ) -> Result<Vec<Vec<i64>>> {
        let own = self.edits.snapshot();
        let mut hook = EditHook::new(&own, self.base.root(), false, hook)?;
        self.base.generate_hooked(batch, options, &mut hook)
    }
    fn wire_generate(
        &self,
        graph: Graph,
        inputs: &[Option<Self::Input>],
        options: &Self::Options,
    ) -> Result<crate::remote::Job> {
        let mut job = self.base.wire_generate(graph, inputs, options)?;
        if let crate::remote::Job::Generate { edits, .. } = &mut job {
            edits.extend(self.edits.snapshot().iter().map(|g| Graph::clone(g)));
        }
        Ok(job)
    }
}

impl<T: ScanTarget> ScanTarget for Edited<'_, T> {
    fn scan_root(&self) -> Result<&Self::Root> {
        self.base.scan_root()
    }
    fn scan_call_order(&self) -> Result<Option<Arc<super::CallOrder>>> {
        self.base.scan_call_order()
    }
    fn forward_scan(&self, batch: &Self::Prepared, hook: &mut dyn Hook) -> Result<()> {
        let own = self.edits.snapshot();
        let mut hook = EditHook::new(&own, self.base.scan_root()?, true, hook)?;
        self.base.forward_scan(batch, &mut hook)
    }
}

/// What an edit block can edit: a model (an in-place edit is its own) or an edited model (a new edit stacks on
/// its edits, over the same model). `intervene!(x.edit() { .. })` calls `x.__nn_edit()`, so `x` may also be a
/// reference.
pub trait IntoEditBlock<'a, 'm, T: TraceTarget> {
    /// Starts an edit block over this.
    fn __nn_edit(&'a self) -> Result<EditBlock<'a, 'm, T>>;
}

impl<'a, T: Editable> IntoEditBlock<'a, 'a, T> for T {
    fn __nn_edit(&'a self) -> Result<EditBlock<'a, 'a, T>> {
        EditBlock::new(self, Vec::new(), self.edit_list())
    }
}

impl<'a, 'm, T: TraceTarget> IntoEditBlock<'a, 'm, T> for Edited<'m, T> {
    fn __nn_edit(&'a self) -> Result<EditBlock<'a, 'm, T>> {
        EditBlock::new(self.base, self.edits.snapshot(), &self.edits)
    }
}

/// An edit block being built (`intervene!(model.edit() { .. })` expands to one): a trace without input whose one
/// invoke sees every row.
pub struct EditBlock<'a, 'm, T: TraceTarget> {
    /// The edits a new edited model inherits (besides the model's own in-place ones).
    inherited: Vec<Arc<Graph>>,
    /// Where an in-place edit goes.
    list: &'a EditList,
    trace: Trace<'m, T>,
}

impl<'a, 'm, T: TraceTarget> EditBlock<'a, 'm, T> {
    /// An edit over `base` (the block's paths and order checks are its own).
    fn new(base: &'m T, inherited: Vec<Arc<Graph>>, list: &'a EditList) -> Result<Self> {
        let trace = Trace::bare(base, base.call_order(None)?);
        trace.invoke(None)?;
        Ok(EditBlock { inherited, list, trace })
    }

    /// The root envoy: `model` inside the block.
    pub fn root(&self) -> &'m <T::Root as Traceable>::Envoy {
        self.trace.root()
    }

    /// The graph under construction.
    pub fn graph(&self) -> &GraphCell {
        self.trace.graph()
    }

    /// The edited model: the source's edits, then this block's.
    pub fn finish(&self) -> Result<Edited<'m, T>> {
        let edit = self.take()?;
        let edits = EditList::new();
        for e in &self.inherited {
            edits.push(e.clone());
        }
        edits.push(edit);
        Ok(Edited { base: self.trace.target(), edits })
    }

    /// Adds this block's edit to the source itself (the model's in-place edits, or the edited model's).
    pub fn in_place(&self) -> Result<()> {
        let edit = self.take()?;
        self.list.push(edit);
        Ok(())
    }

    /// The block's graph, checked: the first build error, or a node an edit cannot hold.
    fn take(&self) -> Result<Arc<Graph>> {
        let mut b = self.trace.graph().inner.borrow_mut();
        if let Some(e) = b.error.take() {
            return Err(e);
        }
        let graph = std::mem::take(&mut b.graph);
        check(&graph)?;
        crate::function::validate(&graph)?;
        Ok(Arc::new(graph))
    }
}

/// Refuses what an edit cannot do: it runs again in every later forward pass and keeps nothing.
fn check(graph: &Graph) -> Result<()> {
    for (i, n) in graph.nodes.iter().enumerate() {
        let refuse =
            |what: &str, hint: &str| Err(Error::NotAnEdit { what: what.into(), node: i as u32, hint: hint.into() });
        match &n.op {
            Op::Save { .. } => {
                return refuse("save a value", "an edit keeps nothing; save it in a trace of the edited model")
            }
            Op::Stop => return refuse("stop the model", "`stop()` belongs in a trace"),
            Op::Cache { .. } => return refuse("cache activations", "`cache()` belongs in a trace"),
            Op::Backward { .. } | Op::Grad { .. } | Op::ParamGrad { .. } | Op::GradWrite { .. } => {
                return refuse("take gradients", "`.backward()` and `.grad` belong in a trace")
            }
            Op::Generated => return refuse("read the generated ids", "`generated()` belongs in a generation block"),
            _ => {}
        }
    }
    Ok(())
}

/// A hook that changes nothing (the end of a chain of edits when there is no other hook).
pub(crate) struct PassThrough;

impl Hook for PassThrough {
    fn input(&mut self, _module: &str, x: Tensor) -> Result<Tensor> {
        Ok(x)
    }
    fn output(&mut self, _module: &str, y: Tensor) -> Result<Tensor> {
        Ok(y)
    }
}

/// One edit's graph running during a run: its interleaver starts over each time all its nodes have run.
struct Runner<'a> {
    index: usize,
    graph: &'a Graph,
    root: &'a dyn Module,
    meta: bool,
    inter: Interleaver<'a>,
}

impl<'a> Runner<'a> {
    fn new(index: usize, graph: &'a Graph, root: &'a dyn Module, meta: bool) -> Result<Self> {
        let inter = Self::fresh(index, graph, root, meta)?;
        Ok(Runner { index, graph, root, meta, inter })
    }

    fn fresh(index: usize, graph: &'a Graph, root: &'a dyn Module, meta: bool) -> Result<Interleaver<'a>> {
        let wrap = |e| Error::Edit { index, source: Box::new(e) };
        let mut inter = Interleaver::whole(graph, root).map_err(wrap)?;
        if meta {
            inter = inter.scan();
        }
        inter.start().map_err(wrap)?;
        Ok(inter)
    }

    /// Runs `f` on the interleaver, then starts over if the edit is complete.
    fn event<R>(&mut self, f: impl FnOnce(&mut Interleaver<'a>) -> Result<R>) -> Result<R> {
        let out = f(&mut self.inter).map_err(|e| Error::Edit { index: self.index, source: Box::new(e) })?;
        if self.inter.is_done() {
            self.inter = Self::fresh(self.index, self.graph, self.root, self.meta)?;
        }
        Ok(out)
    }
}

/// Edits in front of a run's own hook: each event goes through every edit, oldest first, then to `next`.
pub(crate) struct EditHook<'a, 'h> {
    runners: Vec<Runner<'a>>,
    next: &'h mut dyn Hook,
}

impl<'a, 'h> EditHook<'a, 'h> {
    /// The chain of `edits` (whose ad-hoc module calls find modules under `root`; `meta` for a scan) before
    /// `next`.
    pub(crate) fn new(
        edits: &'a [Arc<Graph>],
        root: &'a dyn Module,
        meta: bool,
        next: &'h mut dyn Hook,
    ) -> Result<Self> {
        let runners = edits.iter().enumerate().map(|(i, g)| Runner::new(i, g, root, meta)).collect::<Result<_>>()?;
        Ok(EditHook { runners, next })
    }
}

impl Hook for EditHook<'_, '_> {
    fn input(&mut self, module: &str, mut x: Tensor) -> Result<Tensor> {
        for r in &mut self.runners {
            x = r.event(|i| i.input(module, x))?;
        }
        self.next.input(module, x)
    }

    fn output(&mut self, module: &str, mut y: Tensor) -> Result<Tensor> {
        for r in &mut self.runners {
            y = r.event(|i| i.output(module, y))?;
        }
        self.next.output(module, y)
    }

    /// The last hook that gives a value wins (the run's own skip over an edit's).
    fn skip(&mut self, module: &str, x: &Tensor) -> Result<Option<Tensor>> {
        let mut out = None;
        for r in &mut self.runners {
            if let Some(v) = r.event(|i| i.skip(module, x))? {
                out = Some(v);
            }
        }
        Ok(self.next.skip(module, x)?.or(out))
    }

    fn wants_points(&mut self, module: &str, names: &[&str]) -> bool {
        let mut any = false;
        for r in &mut self.runners {
            any |= r.inter.wants_points(module, names);
        }
        self.next.wants_points(module, names) || any
    }

    fn point(&mut self, path: &str, mut t: Tensor) -> Result<Tensor> {
        for r in &mut self.runners {
            t = r.event(|i| i.point(path, t))?;
        }
        self.next.point(path, t)
    }
}

/// Runs `f` with `hook` behind `edits` (`hook` alone when there are none; [`PassThrough`] when there is no hook).
pub(crate) fn with_edits<R>(
    edits: &EditList,
    root: &dyn Module,
    meta: bool,
    hook: Option<&mut dyn Hook>,
    f: impl FnOnce(Option<&mut dyn Hook>) -> Result<R>,
) -> Result<R> {
    let graphs = edits.snapshot();
    if graphs.is_empty() {
        return f(hook);
    }
    let mut pass = PassThrough;
    let next: &mut dyn Hook = match hook {
        Some(h) => h,
        None => &mut pass,
    };
    let mut chain = EditHook::new(&graphs, root, meta, next)?;
    f(Some(&mut chain))
}
