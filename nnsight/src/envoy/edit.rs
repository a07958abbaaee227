//! Persistent edits: `intervene!(model.edit() { .. })` returns an edited model, and
//! `intervene!(model.edit_in_place() { .. })` edits the model itself, so that every later forward pass of it (a
//! trace, a generation step, a scan, a plain `forward`) applies the block's writes and skips first.
//!
//! An edit is a graph like a trace's, with one invoke that sees every row of whatever batch comes. This file holds
//! the blocks that make edits and the edited model; running them is the execution layer's
//! ([`crate::exec::edits`]: each run puts its target's edits, [`TraceTarget::edits`], in front of its own hook).
//! The edited model ([`Edited`]) borrows the model and shares its weights; edits stack (the model's own in-place
//! edits run first, then each edited layer's, oldest first), and [`Editable::clear_edits`] / dropping the edited
//! model leaves the model exactly as it was, since an edit never touches weights.

use super::trace::Trace;
use super::GraphCell;
use crate::exec::{Backend, EditList, GenerateBackend, GenerateTarget, Prepared, ScanTarget, TraceTarget};
use crate::graph::{Graph, Op};
use crate::nn::Hook;
use crate::{Error, Result};
use std::sync::Arc;

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
    type View = T::View;

    fn root(&self) -> &Self::Root {
        self.base.root()
    }
    fn view(&self) -> &Self::View {
        self.base.view()
    }
    fn call_order(&self, sample: Option<&Self::Input>) -> Result<Option<Arc<super::CallOrder>>> {
        self.base.call_order(sample)
    }
    fn prepare(&self, inputs: &[Option<Self::Input>]) -> Result<Prepared<Self::Prepared>> {
        self.base.prepare(inputs)
    }
    fn forward_hooked(&self, batch: &Self::Prepared, hook: &mut dyn Hook) -> Result<()> {
        self.base.forward_hooked(batch, hook)
    }
    /// The model's edits, then these.
    fn edits(&self) -> Vec<Arc<Graph>> {
        let mut all = self.base.edits();
        all.extend(self.edits.snapshot());
        all
    }
    fn backend(&self) -> &dyn Backend<Self::Input> {
        self.base.backend()
    }
    fn batching(&self) -> crate::exec::Batching {
        self.base.batching()
    }
    fn layer_paths(&self) -> Option<Vec<String>> {
        self.base.layer_paths()
    }
    fn distinct_rows(&self, batch: &Self::Prepared) -> Result<Option<(Self::Prepared, Vec<i64>)>> {
        self.base.distinct_rows(batch)
    }
    fn head_paths(&self) -> Option<Vec<String>> {
        self.base.head_paths()
    }
    fn last_position_only(&self, batch: &mut Self::Prepared) {
        self.base.last_position_only(batch)
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
        self.base.generate_hooked(batch, options, hook)
    }
    fn generate_backend(&self) -> &dyn GenerateBackend<Self::Input, Self::Options> {
        self.base.generate_backend()
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
        self.base.forward_scan(batch, hook)
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
    pub fn root(&self) -> &'m T::View {
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
