//! What a block runs on: [`TraceTarget`] (a model with a typed module tree and a way to run a batch of invokes'
//! inputs), [`ScanTarget`] (one that can also run on shapes alone), [`GenerateTarget`] (one with a decoding loop),
//! and the recorder of a forward's call order.

use super::backend::{Backend, GenerateBackend, Here};
use super::batching::Batching;
use crate::graph::{Graph, Point};
use crate::handle::builder::CallOrder;
use crate::handle::Traceable;
use crate::nn::{Forward, Hook};
use crate::Result;
use std::sync::{Arc, OnceLock};
use tch::Tensor;

/// What can be traced: a model with a typed module tree and a way to run a batch of invokes' inputs.
pub trait TraceTarget {
    /// The root module.
    type Root: Traceable + Forward;
    /// What one invoke takes (a text, texts or ids for a language model; a tensor for a plain module).
    type Input;
    /// A batch ready to run.
    type Prepared;

    /// What `model` is inside a block: the root's envoy ([`Traceable::Envoy`]), or a view that reaches it through
    /// `Deref` and adds names of its own (a language model's [`StandardEnvoy`](crate::models::StandardEnvoy)).
    type View;

    /// The root module.
    fn root(&self) -> &Self::Root;
    /// What `model` is inside a block (built once).
    fn view(&self) -> &Self::View;
    /// The order of hook events in one forward pass (recorded once; `sample` is an input it may use).
    fn call_order(&self, sample: Option<&Self::Input>) -> Result<Option<Arc<CallOrder>>>;
    /// Batches the invokes' inputs; returns the batch, each invoke's rows `(start, len)` and the batch size.
    /// An invoke without input sees every row.
    fn prepare(&self, inputs: &[Option<Self::Input>]) -> Result<Prepared<Self::Prepared>>;
    /// Runs the forward pass with `hook` seeing every module call. The target's edits ([`TraceTarget::edits`]) are
    /// not applied here: the executor puts them in front of `hook`.
    fn forward_hooked(&self, batch: &Self::Prepared, hook: &mut dyn Hook) -> Result<()>;

    /// The persistent edits every run of this target applies, oldest first (a model's in-place edits, then those
    /// of each edited layer over it; see [`crate::envoy::Edited`]). None by default.
    fn edits(&self) -> Vec<Arc<Graph>> {
        Vec::new()
    }

    /// Where this target's blocks run: here by default; on a server for a handle connected to one
    /// ([`crate::LanguageModel::connect`]). A block's own `.remote(..)` overrides it.
    fn backend(&self) -> &dyn Backend<Self::Input> {
        &Here
    }

    /// How a trace's invokes become forward passes ([`Batching`]). By default one pass, nothing shared: a module
    /// of one's own may mix its batch rows (a batch norm), so only a target that knows its rows are independent
    /// (a [`crate::LanguageModel`]) splits them.
    fn batching(&self) -> Batching {
        Batching::default().one_pass().share_prefix(false)
    }

    /// The paths of the model's decoder layers in forward order, each taking the previous one's output and nothing
    /// else a later layer needs, so that skipping the first `k` with the `k`-th's output is exact (what a shared
    /// prefix needs; see [`super::batching`]). None by default: nothing is shared.
    fn layer_paths(&self) -> Option<Vec<String>> {
        None
    }

    /// The batch's distinct rows, and for each row of `batch` the index of its distinct row; `None` when every row
    /// differs (nothing to share) or the target cannot tell.
    fn distinct_rows(&self, batch: &Self::Prepared) -> Result<Option<(Self::Prepared, Vec<i64>)>> {
        let _ = batch;
        Ok(None)
    }

    /// The modules whose values change shape when the head runs on the last position only (a language model's
    /// unembedding and the root, whose output is the logits); `None` (the default) when the target cannot.
    fn head_paths(&self) -> Option<Vec<String>> {
        None
    }

    /// Makes `batch` run the head on the last position only (see [`TraceTarget::head_paths`]).
    fn last_position_only(&self, batch: &mut Self::Prepared) {
        let _ = batch;
    }
}

/// A batch ready to run, each invoke's rows `(start, len)`, and the batch size.
pub type Prepared<B> = (B, Vec<(i64, i64)>, i64);

/// A trace target that can also be scanned (`intervene!(model.scan(input) { .. })`): the same block runs on shapes
/// alone, through a meta twin of the model (the same module tree and paths, every parameter a meta tensor; see
/// [`crate::meta`]), on meta inputs. Nothing real runs and nothing is allocated for data.
///
/// [`crate::LanguageModel`] implements it for every registered architecture: it builds the twin the way it loaded
/// the model. A model of your own wrapped in [`NNsight`](crate::NNsight) has no such build path, so it cannot be scanned.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be scanned: a scan needs a model of a registered architecture",
    label = "`scan` runs a meta twin of the model, which only `LanguageModel<M>` knows how to build",
    note = "trace it instead (`intervene!(model.trace(input) {{ ... }})`), or load the model as a `LanguageModel`"
)]
pub trait ScanTarget: TraceTarget {
    /// The root of the meta twin (built once), where a scan's ad-hoc module calls look modules up.
    fn scan_root(&self) -> Result<&Self::Root>;
    /// The order of hook events, recorded on the meta twin when it is not known yet.
    fn scan_call_order(&self) -> Result<Option<Arc<CallOrder>>>;
    /// Runs the meta twin on `batch`, made meta, with `hook` seeing every module call (edits, as in
    /// [`TraceTarget::forward_hooked`], are the executor's).
    fn forward_scan(&self, batch: &Self::Prepared, hook: &mut dyn Hook) -> Result<()>;
}

impl<T: ScanTarget> ScanTarget for &T {
    fn scan_root(&self) -> Result<&Self::Root> {
        (**self).scan_root()
    }
    fn scan_call_order(&self) -> Result<Option<Arc<CallOrder>>> {
        (**self).scan_call_order()
    }
    fn forward_scan(&self, batch: &Self::Prepared, hook: &mut dyn Hook) -> Result<()> {
        (**self).forward_scan(batch, hook)
    }
}

impl<T: TraceTarget> TraceTarget for &T {
    type Root = T::Root;
    type Input = T::Input;
    type Prepared = T::Prepared;
    type View = T::View;
    fn root(&self) -> &Self::Root {
        (**self).root()
    }
    fn view(&self) -> &Self::View {
        (**self).view()
    }
    fn call_order(&self, sample: Option<&Self::Input>) -> Result<Option<Arc<CallOrder>>> {
        (**self).call_order(sample)
    }
    fn prepare(&self, inputs: &[Option<Self::Input>]) -> Result<Prepared<Self::Prepared>> {
        (**self).prepare(inputs)
    }
    fn forward_hooked(&self, batch: &Self::Prepared, hook: &mut dyn Hook) -> Result<()> {
        (**self).forward_hooked(batch, hook)
    }
    fn edits(&self) -> Vec<Arc<Graph>> {
        (**self).edits()
    }
    fn backend(&self) -> &dyn Backend<Self::Input> {
        (**self).backend()
    }
    fn batching(&self) -> Batching {
        (**self).batching()
    }
    fn layer_paths(&self) -> Option<Vec<String>> {
        (**self).layer_paths()
    }
    fn distinct_rows(&self, batch: &Self::Prepared) -> Result<Option<(Self::Prepared, Vec<i64>)>> {
        (**self).distinct_rows(batch)
    }
    fn head_paths(&self) -> Option<Vec<String>> {
        (**self).head_paths()
    }
    fn last_position_only(&self, batch: &mut Self::Prepared) {
        (**self).last_position_only(batch)
    }
}

/// What can generate inside a block: a [`TraceTarget`] with a decoding loop.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot generate",
    label = "`generate` runs a decoding loop, which `LanguageModel<M>` has",
    note = "trace it instead (`intervene!(model.trace(input) {{ ... }})`), or load the model as a `LanguageModel`"
)]
pub trait GenerateTarget: TraceTarget {
    /// Decoding options (`GenerateOptions` for a language model).
    type Options: Default + Clone;
    /// The most forward passes a generation with `options` makes (what `all()` visits).
    fn max_steps(options: &Self::Options) -> usize;
    /// Decodes `batch` with `hook` seeing every module call of every forward pass; returns each row's ids
    /// (prompt and new tokens, without padding). Edits are the executor's, as in [`TraceTarget::forward_hooked`].
    fn generate_hooked(
        &self,
        batch: &Self::Prepared,
        options: &Self::Options,
        hook: &mut dyn Hook,
    ) -> Result<Vec<Vec<i64>>>;

    /// Where this target's generations run (see [`TraceTarget::backend`]).
    fn generate_backend(&self) -> &dyn GenerateBackend<Self::Input, Self::Options> {
        &Here
    }
}

impl<T: GenerateTarget> GenerateTarget for &T {
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
        (**self).generate_hooked(batch, options, hook)
    }
    fn generate_backend(&self) -> &dyn GenerateBackend<Self::Input, Self::Options> {
        (**self).generate_backend()
    }
}

/// Records the order of hook events of a forward pass.
#[derive(Default)]
pub(crate) struct OrderRecorder {
    pub(crate) events: Vec<(String, Point)>,
}

impl OrderRecorder {
    /// The call order of the forward pass `run` makes with the given hook (without gradients), stored once in
    /// `cell`. A pass that fails gives no order (the trace then checks the order while it runs, and reports the
    /// failure itself if it recurs).
    pub(crate) fn record_once(
        cell: &OnceLock<Arc<CallOrder>>,
        run: impl FnOnce(&mut dyn Hook) -> Result<()>,
    ) -> Option<Arc<CallOrder>> {
        if let Some(o) = cell.get() {
            return Some(o.clone());
        }
        let mut rec = OrderRecorder::default();
        let ok = {
            let _g = tch::no_grad_guard();
            run(&mut rec).is_ok()
        };
        ok.then(|| cell.get_or_init(|| Arc::new(CallOrder::from_events(&rec.events))).clone())
    }
}

impl Hook for OrderRecorder {
    fn input(&mut self, module: &str, x: Tensor) -> Result<Tensor> {
        self.events.push((module.to_string(), Point::Input));
        Ok(x)
    }
    fn output(&mut self, module: &str, y: Tensor) -> Result<Tensor> {
        self.events.push((module.to_string(), Point::Output));
        Ok(y)
    }
    /// Inner points are part of the order (an output event each, where the forward reaches them).
    fn wants_points(&mut self, _module: &str, _names: &[&str]) -> bool {
        true
    }
}
