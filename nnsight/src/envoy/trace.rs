//! A trace: one `intervene!` block's graph, its invokes, and the model it runs on.

use super::Traceable;
use crate::graph::{NodeId, Point, Value};
use crate::handle::builder::{CallOrder, GraphCell};
use crate::handle::proxy::{Proxy, Saved};
use crate::interleave::Interleaver;
use crate::nn::{Ctx, Forward, Hook};
use crate::{Error, Result};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
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

    /// The root module.
    fn root(&self) -> &Self::Root;
    /// The root's envoy (built once).
    fn envoy(&self) -> &<Self::Root as Traceable>::Envoy;
    /// The order of hook events in one forward pass (recorded once; `sample` is an input it may use).
    fn call_order(&self, sample: Option<&Self::Input>) -> Result<Option<Arc<CallOrder>>>;
    /// Batches the invokes' inputs; returns the batch, each invoke's rows `(start, len)` and the batch size.
    /// An invoke without input sees every row.
    fn prepare(&self, inputs: &[Option<Self::Input>]) -> Result<Prepared<Self::Prepared>>;
    /// Runs the forward pass with `hook` seeing every module call.
    fn forward_hooked(&self, batch: &Self::Prepared, hook: &mut dyn Hook) -> Result<()>;

    /// The server this model is connected to ([`crate::LanguageModel::connect`]): its blocks run there.
    fn remote(&self) -> Option<&crate::remote::Remote> {
        None
    }

    /// The persistent edits a remote run carries (the model's in-place ones), oldest first.
    fn wire_edits(&self) -> Vec<crate::graph::Graph> {
        Vec::new()
    }

    /// The invokes' inputs as a request carries them (for a remote run); by default this model cannot run
    /// remotely.
    fn wire_inputs(&self, inputs: &[Option<Self::Input>]) -> Result<Vec<Option<crate::models::batch::Input>>> {
        let _ = inputs;
        Err(Error::InvalidInput {
            message: "this model cannot run on a server: only a `LanguageModel`'s inputs (texts, ids) travel".into(),
        })
    }
}

/// A batch ready to run, each invoke's rows `(start, len)`, and the batch size.
pub type Prepared<B> = (B, Vec<(i64, i64)>, i64);

/// A trace target that can also be scanned (`intervene!(model.scan(input) { .. })`): the same block runs on shapes
/// alone, through a meta twin of the model (the same module tree and paths, every parameter a meta tensor; see
/// [`crate::meta`]), on meta inputs. Nothing real runs and nothing is allocated for data.
///
/// [`crate::LanguageModel`] implements it for every registered architecture: it builds the twin the way it loaded
/// the model. A model of your own wrapped in [`NNsight`] has no such build path, so it cannot be scanned.
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
    /// Runs the meta twin on `batch`, made meta, with `hook` seeing every module call.
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
    fn root(&self) -> &Self::Root {
        (**self).root()
    }
    fn envoy(&self) -> &<Self::Root as Traceable>::Envoy {
        (**self).envoy()
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
    fn remote(&self) -> Option<&crate::remote::Remote> {
        (**self).remote()
    }
    fn wire_inputs(&self, inputs: &[Option<Self::Input>]) -> Result<Vec<Option<crate::models::batch::Input>>> {
        (**self).wire_inputs(inputs)
    }
    fn wire_edits(&self) -> Vec<crate::graph::Graph> {
        (**self).wire_edits()
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

/// The saved values of a run, taken one by one by the bindings after the block.
#[derive(Debug)]
pub struct TraceResults {
    values: HashMap<NodeId, Value>,
    /// Nodes not reached (after `stop()`, or waiting for a generation step that never came).
    unreached: ahash::AHashSet<NodeId>,
}

impl From<crate::interleave::Finished> for TraceResults {
    fn from(f: crate::interleave::Finished) -> Self {
        TraceResults { values: f.values, unreached: f.unreached }
    }
}

impl TraceResults {
    /// Whether `node` was skipped at the end of the run (after `stop()`, or in a generation step that never
    /// came).
    pub fn unreached(&self, node: NodeId) -> bool {
        self.unreached.contains(&node)
    }

    /// The saved value of `node`, as a `T`.
    pub fn take<T: FromValue>(&mut self, node: NodeId) -> Result<T> {
        let unreached = self.unreached.contains(&node);
        let v = self.values.remove(&node).ok_or_else(|| Error::NeverReached {
            node: format!("saved node {node}"),
            reason: if unreached {
                "the code that saves it comes after a `stop()` or in a generation step that never came".into()
            } else {
                "its value was not computed".into()
            },
        })?;
        T::from_value(v)
    }
}

/// Plain values that a saved proxy becomes after the block.
pub trait FromValue: Sized {
    /// Converts, or says what was found instead.
    fn from_value(v: Value) -> Result<Self>;
}

impl FromValue for Tensor {
    fn from_value(v: Value) -> Result<Self> {
        match v {
            Value::Tensor(t) => Ok(t),
            Value::Scalar(s) => Ok(Tensor::from(s)),
            other => Err(Error::Intervention { message: format!("expected a tensor, found a {}", other.kind_name()) }),
        }
    }
}

impl FromValue for Vec<Tensor> {
    fn from_value(v: Value) -> Result<Self> {
        match v {
            Value::Tuple(items) => items.into_iter().map(Tensor::from_value).collect(),
            other => Ok(vec![Tensor::from_value(other)?]),
        }
    }
}

/// Module values recorded by `model.cache()`: `"model.model.layers.5.output"` (a later call of the same module adds
/// `#1`, `#2`, ...) to tensor, in the order they were computed.
#[derive(Debug, Default)]
pub struct Cache {
    entries: Vec<(String, Tensor)>,
}

impl Cache {
    /// The recorded value under `key` (e.g. `"model.transformer.h.0.output"`).
    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, t)| t)
    }
    /// Every key, in forward order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Entries in forward order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(k, t)| (k.as_str(), t))
    }
}

impl std::ops::Index<&str> for Cache {
    type Output = Tensor;
    fn index(&self, key: &str) -> &Tensor {
        self.get(key).unwrap_or_else(|| panic!("no cache entry `{key}`"))
    }
}

impl FromValue for Cache {
    fn from_value(v: Value) -> Result<Self> {
        match v {
            Value::Map(items) => Ok(Cache {
                entries: items.into_iter().map(|(k, v)| Ok((k, Tensor::from_value(v)?))).collect::<Result<_>>()?,
            }),
            other => Err(Error::Intervention { message: format!("expected a cache, found a {}", other.kind_name()) }),
        }
    }
}

/// What `model.cache_with(options)` records.
#[derive(Debug, Clone, Default)]
pub struct CacheOptions {
    /// Only these modules (dotted paths, with or without the leading `model.`); all when `None`.
    pub modules: Option<Vec<String>>,
    /// Also record module inputs.
    pub inputs: bool,
    /// Move every entry to this device.
    pub device: Option<tch::Device>,
}

impl CacheOptions {
    /// Only the listed modules.
    pub fn modules<S: AsRef<str>>(mut self, modules: impl IntoIterator<Item = S>) -> Self {
        let strip = |s: &str| {
            s.strip_prefix("model.").map(String::from).unwrap_or_else(|| {
                if s == "model" {
                    String::new()
                } else {
                    s.to_string()
                }
            })
        };
        self.modules = Some(modules.into_iter().map(|m| strip(m.as_ref())).collect());
        self
    }
    /// Inputs too.
    pub fn inputs(mut self, yes: bool) -> Self {
        self.inputs = yes;
        self
    }
    /// Entries moved to `device`.
    pub fn device(mut self, device: tch::Device) -> Self {
        self.device = Some(device);
        self
    }
}

impl FromValue for () {
    fn from_value(_: Value) -> Result<Self> {
        Ok(())
    }
}

// ---- after the block: saved proxies become values, plain values stay ---------------------------------------------

/// Wraps a binding of the block for [`FinishSaved`] / [`FinishUnsaved`] / [`FinishPlain`], which `intervene!`
/// calls by autoref-based dispatch: the most specific applies.
pub struct Finish<T>(Cell<Option<T>>);

impl<T> Finish<T> {
    /// Wraps a value.
    pub fn new(v: T) -> Self {
        Finish(Cell::new(Some(v)))
    }
    fn take(&self) -> T {
        self.0.take().expect("finished once")
    }
}

/// A saved proxy becomes its value.
pub trait FinishSaved {
    /// The value type.
    type Out;
    /// Takes the value from the results.
    fn __nn_finish(self, r: &mut TraceResults) -> Result<Self::Out>;
}

impl<'g, T: FromValue> FinishSaved for &&&Finish<Saved<'g, T>> {
    type Out = T;
    fn __nn_finish(self, r: &mut TraceResults) -> Result<T> {
        r.take(self.take().0.id)
    }
}

impl<'g, T: FromValue> FinishSaved for &&&Finish<Vec<Saved<'g, T>>> {
    type Out = Vec<T>;
    /// Values saved in generation steps that never came (or after a `stop()`) are left out: the vector holds
    /// those that were computed, in order.
    fn __nn_finish(self, r: &mut TraceResults) -> Result<Vec<T>> {
        let ids: Vec<NodeId> = self.take().into_iter().map(|s| s.0.id).filter(|&id| !r.unreached(id)).collect();
        ids.into_iter().map(|id| r.take(id)).collect()
    }
}

/// A proxy that was not saved has no value after the block.
pub trait FinishUnsaved {
    /// [`NotSaved`].
    type Out;
    /// Marks it unusable.
    fn __nn_finish(self, r: &mut TraceResults) -> Result<Self::Out>;
}

impl<'g, T> FinishUnsaved for &&Finish<Proxy<'g, T>> {
    type Out = NotSaved<T>;
    fn __nn_finish(self, _: &mut TraceResults) -> Result<NotSaved<T>> {
        let _ = self.take();
        Ok(NotSaved(std::marker::PhantomData))
    }
}

/// Any other binding is unchanged.
pub trait FinishPlain {
    /// The same type.
    type Out;
    /// Returns it.
    fn __nn_finish(self, r: &mut TraceResults) -> Result<Self::Out>;
}

impl<T> FinishPlain for &Finish<T> {
    type Out = T;
    fn __nn_finish(self, _: &mut TraceResults) -> Result<T> {
        Ok(self.take())
    }
}

/// What a proxy that was not `.save()`d becomes after the block: nothing can be done with it. To use the value
/// after the block, call `.save()` on it inside the block.
pub struct NotSaved<T>(std::marker::PhantomData<T>);

/// Never implemented: the bound that makes every use of a [`NotSaved`] value a compile error saying what to do.
#[diagnostic::on_unimplemented(
    message = "this value was not saved: call `.save()` on it inside the `intervene!` block to use it after the block",
    label = "not saved inside the block"
)]
pub trait SavedInsideTheBlock {}

impl<T> std::fmt::Debug for NotSaved<T>
where
    NotSaved<T>: SavedInsideTheBlock,
{
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Ok(())
    }
}

impl<T> std::fmt::Display for NotSaved<T>
where
    NotSaved<T>: SavedInsideTheBlock,
{
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Ok(())
    }
}

macro_rules! unsaved_methods {
    ($($name:ident ($($arg:ident),*))*) => {
        /// The methods of a tensor, on a [`NotSaved`] value, each a compile error that says to call `.save()`.
        /// In scope through the prelude.
        pub trait UnsavedUse {
            $(
                /// Not available: the value was not saved.
                #[allow(non_camel_case_types)]
                fn $name<$($arg),*>(&self, $(_: $arg),*)
                where
                    Self: SavedInsideTheBlock,
                {
                }
            )*
        }
    };
}
unsaved_methods!(
    size() kind() device() dim() numel() print() shallow_clone() copy() detach() abs() contiguous() exp() log()
    sqrt() squeeze() norm() max() min() iter() to_string() get(a) i(a) double_value(a) int64_value(a) sum(a)
    mean(a) to_device(a) to_kind(a) view(a) reshape(a) equal(a) squeeze_dim(a) unsqueeze(a) matmul(a) permute(a)
    softmax(a, b) log_softmax(a, b) argmax(a, b) select(a, b) transpose(a, b) narrow(a, b, c) topk(a, b, c, d)
    allclose(a, b, c, d)
);

impl<T> UnsavedUse for NotSaved<T> {}

// ---- a plain module as a trace target ---------------------------------------------------------------------------

/// Any `Traceable` module (a model of your own, built from `nnsight::nn` layers), traced on tensor inputs whose
/// first dimension is the batch.
pub struct NNsight<M: Traceable + Forward> {
    module: M,
    envoy: OnceLock<M::Envoy>,
    order: OnceLock<Arc<CallOrder>>,
    /// In-place edits, applied before every run.
    edits: super::EditList,
}

impl<M: Traceable + Forward> NNsight<M> {
    /// Wraps `module` as the root (path `""`): every submodule gets its dotted path.
    pub fn new(mut module: M) -> Self {
        crate::ffi::keep_torch_cuda();
        module.set_path("");
        NNsight { module, envoy: OnceLock::new(), order: OnceLock::new(), edits: super::EditList::new() }
    }

    /// The module.
    pub fn module(&self) -> &M {
        &self.module
    }

    /// A plain forward pass.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _g = tch::no_grad_guard();
        super::edit::with_edits(&self.edits, &self.module, false, None, |hook| match hook {
            Some(h) => Ctx::with_hook(h).call(&self.module, x),
            None => Ctx::new().call(&self.module, x),
        })
    }

    /// Removes the in-place edits: outputs are again exactly those of the unedited module.
    pub fn clear_edits(&self) {
        self.edits.clear();
    }

    /// The module tree, printable like `print(model)` in PyTorch.
    pub fn tree(&self) -> crate::nn::ModuleTree<'_> {
        crate::nn::ModuleTree(&self.module)
    }
}

impl<M: Traceable + Forward> TraceTarget for NNsight<M> {
    type Root = M;
    type Input = Tensor;
    type Prepared = Tensor;

    fn root(&self) -> &M {
        &self.module
    }
    fn envoy(&self) -> &M::Envoy {
        self.envoy.get_or_init(|| self.module.envoy())
    }
    fn call_order(&self, sample: Option<&Tensor>) -> Result<Option<Arc<CallOrder>>> {
        match (self.order.get(), sample) {
            (Some(o), _) => Ok(Some(o.clone())),
            (None, None) => Ok(None),
            (None, Some(x)) => Ok(OrderRecorder::record_once(&self.order, |hook| {
                Ctx::with_hook(hook).call(&self.module, x).map(|_| ())
            })),
        }
    }
    fn prepare(&self, inputs: &[Option<Tensor>]) -> Result<Prepared<Tensor>> {
        let given: Vec<&Tensor> = inputs.iter().flatten().collect();
        if given.is_empty() {
            return Err(Error::InvalidInput { message: "no invoke has an input".into() });
        }
        let batch = Tensor::f_cat(&given, 0).map_err(|e| Error::InvalidInput {
            message: format!(
                "the invokes' inputs cannot be batched along the first dimension: {}",
                crate::error::clean_torch_message(&e.to_string())
            ),
        })?;
        let total = batch.size()[0];
        let mut start = 0;
        let rows = inputs
            .iter()
            .map(|i| match i {
                Some(t) => {
                    let n = t.size()[0];
                    start += n;
                    (start - n, n)
                }
                None => (0, total),
            })
            .collect();
        Ok((batch, rows, total))
    }
    fn forward_hooked(&self, batch: &Tensor, hook: &mut dyn Hook) -> Result<()> {
        super::edit::with_edits(&self.edits, &self.module, false, Some(hook), |h| {
            Ctx::with_hook(h.expect("a hook was given")).call(&self.module, batch).map(|_| ())
        })
    }
}

impl<M: Traceable + Forward> super::Editable for NNsight<M> {
    fn edit_list(&self) -> &super::EditList {
        &self.edits
    }
}
