//! What a block hands back: the saved values of a run ([`TraceResults`]), the plain values they become
//! ([`FromValue`], [`Cache`]), and how each binding of the block is finished after it (a saved proxy becomes its
//! value; an unsaved one becomes [`NotSaved`], whose every use is a compile error saying to `.save()` it).

use crate::graph::{NodeId, Value};
use crate::handle::builder::GraphCell;
use crate::handle::proxy::{Proxy, Saved};
use crate::{Error, Result};
use std::cell::Cell;
use std::collections::HashMap;
use tch::Tensor;

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

/// Where the bindings after a block (or after a session sent as one request) take their saved values from:
/// [`TraceResults`], or a session's results, which find the block by the graph the proxy belongs to.
pub trait SavedValues {
    /// The saved value of `node` of the graph `g`, as a `T`.
    fn take_saved<T: FromValue>(&mut self, g: &GraphCell, node: NodeId) -> Result<T>;
    /// Whether `node` of `g` was skipped at the end of its run.
    fn skipped(&self, g: &GraphCell, node: NodeId) -> bool;
}

impl SavedValues for TraceResults {
    fn take_saved<T: FromValue>(&mut self, _: &GraphCell, node: NodeId) -> Result<T> {
        self.take(node)
    }
    fn skipped(&self, _: &GraphCell, node: NodeId) -> bool {
        self.unreached(node)
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

/// A saved proxy becomes its value (whose results `R` are: a block's, or a session's).
pub trait FinishSaved {
    /// The value type.
    type Out;
    /// Takes the value from the results.
    fn __nn_finish<R: SavedValues>(self, r: &mut R) -> Result<Self::Out>;
}

impl<'g, T: FromValue> FinishSaved for &&&Finish<Saved<'g, T>> {
    type Out = T;
    fn __nn_finish<R: SavedValues>(self, r: &mut R) -> Result<T> {
        let saved = self.take().0;
        r.take_saved(saved.g, saved.id)
    }
}

impl<'g, T: FromValue> FinishSaved for &&&Finish<Vec<Saved<'g, T>>> {
    type Out = Vec<T>;
    /// Values saved in generation steps that never came (or after a `stop()`) are left out: the vector holds
    /// those that were computed, in order.
    fn __nn_finish<R: SavedValues>(self, r: &mut R) -> Result<Vec<T>> {
        let kept: Vec<Proxy<'g, T>> = self.take().into_iter().map(|s| s.0).filter(|p| !r.skipped(p.g, p.id)).collect();
        kept.into_iter().map(|p| r.take_saved(p.g, p.id)).collect()
    }
}

/// A proxy that was not saved has no value after the block.
pub trait FinishUnsaved {
    /// [`NotSaved`].
    type Out;
    /// Marks it unusable.
    fn __nn_finish<R: SavedValues>(self, r: &mut R) -> Result<Self::Out>;
}

impl<'g, T> FinishUnsaved for &&Finish<Proxy<'g, T>> {
    type Out = NotSaved<T>;
    fn __nn_finish<R: SavedValues>(self, _: &mut R) -> Result<NotSaved<T>> {
        let _ = self.take();
        Ok(NotSaved(std::marker::PhantomData))
    }
}

/// Any other binding is unchanged.
pub trait FinishPlain {
    /// The same type.
    type Out;
    /// Returns it.
    fn __nn_finish<R: SavedValues>(self, r: &mut R) -> Result<Self::Out>;
}

impl<T> FinishPlain for &Finish<T> {
    type Out = T;
    fn __nn_finish<R: SavedValues>(self, _: &mut R) -> Result<T> {
        Ok(self.take())
    }
}

/// What a proxy that was not `.save()`d becomes after the block: nothing can be done with it. To use the value
/// after the block, call `.save()` on it inside the block.
pub struct NotSaved<T>(pub(crate) std::marker::PhantomData<T>);

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
