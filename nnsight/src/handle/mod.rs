//! Typed handles: envoys mirroring a model's module tree (`model.model.layers[5].mlp`), with the hook points
//! `.output`, `.input` and `.inputs` of each; proxies, the typed values an intervention computes with; and the
//! graph a block builds ([`GraphCell`]). Pure graph construction over `graph` and `nn`: the architectures in
//! `models` derive their envoys from it, and the blocks that run a graph (`envoy`) build on it.
//!
//! `#[derive(Traceable)]` writes the envoy type of a module; `intervene!` turns paths over envoys into graph
//! nodes. Because the envoy tree is ordinary Rust structs, a typo in a path is a compile error under the typo.

pub(crate) mod builder;
pub(crate) mod index;
pub(crate) mod proxy;

pub use builder::{CallOrder, GraphCell, LiveTensors};
pub use index::{IntoDims, IntoIndex, IntoIndexItem, NewAxis};
pub use proxy::{cat, stack, IntoTensorProxy, Proxy, Saved, TensorValue};

use crate::graph::Point;
use crate::nn::Module;
use crate::{Error, Result};
use std::marker::PhantomData;
use std::sync::Arc;
use tch::Tensor;

/// A module whose tree can be traced: it has a typed envoy. `#[derive(Traceable)]` implements it for structs
/// of submodules; module lists (`ModuleList<T>`, `Vec<T>`) and optional modules (`Option<T>`) implement it too.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a traceable module",
    label = "submodule fields must be `#[derive(Traceable)]` modules (or lists or options of them); mark other fields `#[traceable(skip)]` or `#[traceable(param)]`"
)]
pub trait Traceable {
    /// The envoy type: a field per submodule, plus the hook points.
    type Envoy;
    /// Builds the envoy tree for this module and its submodules (paths from [`Module::path`]).
    fn envoy(&self) -> Self::Envoy;
    /// Gives this module and its submodules their dotted paths, `path` for this one (`""` for a root).
    fn set_path(&mut self, path: &str);
    /// Presents this field to a parent's [`Module::children`] under `name` (an absent optional module: not at
    /// all).
    fn visit_child<'a>(&'a self, name: &str, f: &mut dyn FnMut(&str, &'a dyn Module));
}

impl<T: Traceable + Module> Traceable for crate::nn::ModuleList<T> {
    type Envoy = ModuleListEnvoy<T::Envoy>;
    fn envoy(&self) -> Self::Envoy {
        ModuleListEnvoy::new(self.path(), self.iter().map(Traceable::envoy).collect())
    }
    fn set_path(&mut self, path: &str) {
        self.set_list_path(path);
        for (i, m) in self.iter_mut().enumerate() {
            m.set_path(&crate::nn::join_path(path, &i.to_string()));
        }
    }
    fn visit_child<'a>(&'a self, name: &str, f: &mut dyn FnMut(&str, &'a dyn Module)) {
        f(name, self)
    }
}

impl<T: Traceable + Module> Traceable for Vec<T> {
    type Envoy = ModuleListEnvoy<T::Envoy>;
    fn envoy(&self) -> Self::Envoy {
        let path = self.first().map(|m| m.path().rsplit_once('.').map_or("", |(p, _)| p)).unwrap_or("");
        ModuleListEnvoy::new(path, self.iter().map(Traceable::envoy).collect())
    }
    fn set_path(&mut self, path: &str) {
        for (i, m) in self.iter_mut().enumerate() {
            m.set_path(&crate::nn::join_path(path, &i.to_string()));
        }
    }
    fn visit_child<'a>(&'a self, name: &str, f: &mut dyn FnMut(&str, &'a dyn Module)) {
        f(name, self)
    }
}

impl<T: Traceable> Traceable for Option<T> {
    type Envoy = Option<T::Envoy>;
    fn envoy(&self) -> Self::Envoy {
        self.as_ref().map(Traceable::envoy)
    }
    fn set_path(&mut self, path: &str) {
        if let Some(m) = self {
            m.set_path(path);
        }
    }
    fn visit_child<'a>(&'a self, name: &str, f: &mut dyn FnMut(&str, &'a dyn Module)) {
        if let Some(m) = self {
            m.visit_child(name, f);
        }
    }
}

/// A typed handle on one module.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a module, so it cannot be called or skipped",
    label = "only modules can be called (`module(x)`) or skipped (`module.skip(value)`)",
    note = "an inner point (such as an attention's `probs`) is read and assigned through its `.output`"
)]
pub trait Envoy {
    /// The module's dotted path.
    fn module_path(&self) -> &str;
}

/// A hook point of a module: its `.output` or `.input`, whose values are `T`.
pub struct HookPoint<T> {
    module: Arc<str>,
    point: Point,
    _t: PhantomData<fn() -> T>,
}

impl<T> HookPoint<T> {
    /// The output (or input) of the module at `module`.
    pub fn new(module: Arc<str>, point: Point) -> Self {
        HookPoint { module, point, _t: PhantomData }
    }
    /// The module's path.
    pub fn module(&self) -> &str {
        &self.module
    }
    /// Input or output.
    pub fn point(&self) -> Point {
        self.point
    }
}

impl<T> std::fmt::Debug for HookPoint<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?}", crate::graph::display(&self.module), self.point)
    }
}

/// All inputs of a module (`.inputs`): a tuple of tensors.
#[derive(Debug)]
pub struct InputsPoint {
    module: Arc<str>,
}

impl InputsPoint {
    /// The inputs of the module at `module`.
    pub fn new(module: Arc<str>) -> Self {
        InputsPoint { module }
    }
    /// The module's path.
    pub fn module(&self) -> &str {
        &self.module
    }
}

/// A named point inside a module's forward (an attention's `probs`, say), declared by the module's author with
/// `#[traceable(points(...))]`: its `.output` reads, saves and assigns like a module's output, under the path
/// `<module path>.<name>`. It is not a module: it cannot be called or skipped.
#[derive(Debug)]
pub struct InnerPoint {
    /// The value at this point, as the forward computes it (a write changes what the forward goes on with).
    pub output: HookPoint<Tensor>,
}

impl InnerPoint {
    /// The point `name` of the module at `module`.
    pub fn new(module: &str, name: &str) -> Self {
        InnerPoint { output: HookPoint::new(Arc::from(crate::nn::join_path(module, name)), Point::Output) }
    }
    /// Its dotted path (`model.layers.0.self_attn.probs`, without the leading `model.`).
    pub fn path(&self) -> &str {
        self.output.module()
    }
}

/// A parameter of a module (`model.lm_head.weight`): inside `intervene!`, its `.grad` after a `.backward()` is the
/// gradient of the loss with respect to it (the parameter takes part in autograd for that run only).
#[derive(Debug, Clone)]
pub struct ParamPoint {
    module: Arc<str>,
    name: &'static str,
}

impl ParamPoint {
    /// The parameter `name` of the module at `module`.
    pub fn new(module: &str, name: &'static str) -> Self {
        ParamPoint { module: Arc::from(module), name }
    }
    /// The module's path.
    pub fn module(&self) -> &str {
        &self.module
    }
    /// The parameter's name in its module (`weight`).
    pub fn name(&self) -> &str {
        self.name
    }
}

/// The hook points every envoy of a computing module has; generated envoys embed one as their `output`,
/// `input` and `inputs` fields.
#[derive(Debug)]
pub struct Points {
    /// The module's path.
    pub path: Arc<str>,
}

impl Points {
    /// Hook points of the module at `path`.
    pub fn new(path: &str) -> Self {
        Points { path: Arc::from(path) }
    }
    /// Its output.
    pub fn output(&self) -> HookPoint<Tensor> {
        HookPoint::new(self.path.clone(), Point::Output)
    }
    /// Its first input.
    pub fn input(&self) -> HookPoint<Tensor> {
        HookPoint::new(self.path.clone(), Point::Input)
    }
    /// All its inputs.
    pub fn inputs(&self) -> InputsPoint {
        InputsPoint::new(self.path.clone())
    }
}

/// The envoy of a module list: index it (`layers[5]`, `layers[-1]`) to reach the envoy of one module.
#[derive(Debug)]
pub struct ModuleListEnvoy<E> {
    path: Arc<str>,
    items: Vec<E>,
}

impl<E> ModuleListEnvoy<E> {
    /// A list envoy at `path` over `items`.
    pub fn new(path: &str, items: Vec<E>) -> Self {
        ModuleListEnvoy { path: Arc::from(path), items }
    }
    /// Number of modules.
    pub fn len(&self) -> usize {
        self.items.len()
    }
    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    /// The envoys in order (for `for layer in model.model.layers.iter()`).
    pub fn iter(&self) -> std::slice::Iter<'_, E> {
        self.items.iter()
    }
    /// The envoy at `index`; negative indices count from the end. Out of range is an error naming the list and
    /// its length.
    pub fn at(&self, index: impl ListIndex) -> Result<&E> {
        let i = index.to_i64();
        let len = self.items.len();
        let pos = if i < 0 { i + len as i64 } else { i };
        if pos < 0 || pos >= len as i64 {
            return Err(Error::IndexOutOfRange { module: crate::graph::display(&self.path), index: i, len, dim: None });
        }
        Ok(&self.items[pos as usize])
    }
}

impl<E> Envoy for ModuleListEnvoy<E> {
    fn module_path(&self) -> &str {
        &self.path
    }
}

impl<'a, E> IntoIterator for &'a ModuleListEnvoy<E> {
    type Item = &'a E;
    type IntoIter = std::slice::Iter<'a, E>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.iter()
    }
}

/// An index into a module list: any integer; negative counts from the end.
pub trait ListIndex {
    /// As a signed index.
    fn to_i64(self) -> i64;
}
macro_rules! list_index {
    ($($t:ty),*) => {$(impl ListIndex for $t { fn to_i64(self) -> i64 { self as i64 } })*};
}
list_index!(i64, i32, isize, usize, u32, u64, i16, u16, i8, u8);

/// Envoys that can be indexed: module lists. Indexing anything else is a compile error.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a module list and cannot be indexed",
    label = "only module lists (such as `layers` or `h`) can be indexed"
)]
pub trait IndexableEnvoy {
    /// The envoy of one item.
    type Item;
    /// The item at `index` (negative from the end), or an out-of-range error.
    fn envoy_at(&self, index: i64) -> Result<&Self::Item>;
}

impl<E> IndexableEnvoy for ModuleListEnvoy<E> {
    type Item = E;
    fn envoy_at(&self, index: i64) -> Result<&E> {
        self.at(index)
    }
}
