//! [`AutoModel`]: whichever registered architecture a checkpoint holds, behind the object-safe [`DynCausalLm`].

use super::batch::Batch;
use super::{by_model_type, Architecture, CachedInput, CausalLm, RawConfig};
use crate::load::Weights;
use crate::nn::{Ctx, Forward, ForwardState, KvCache, Module};
use crate::Result;
use tch::{Kind, Tensor};

/// Object-safe view of a [`CausalLm`], for models whose architecture is known only at run time.
pub trait DynCausalLm: Module + Send {
    /// Registry name of the architecture.
    fn architecture(&self) -> &'static str;
    /// See [`CausalLm::prepare`].
    fn dyn_prepare(&self, batch: &Batch) -> Result<ForwardState>;
    /// See [`Forward::forward`].
    fn dyn_forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor>;
    /// See [`CausalLm::vocab_size`].
    fn dyn_vocab_size(&self) -> i64;
    /// See [`CausalLm::dtype`].
    fn dyn_kind(&self) -> Kind;
    /// See [`CausalLm::to_device`].
    fn dyn_to_device(&mut self, device: tch::Device, kind: Kind) -> Result<()>;
    /// See [`CausalLm::cache_layers`].
    fn dyn_cache_layers(&self) -> usize;
    /// See [`CausalLm::standard_names`].
    fn dyn_standard_names(&self) -> super::StandardNames;
    /// See [`CausalLm::prepare_cached`].
    fn dyn_prepare_cached(&self, input: &CachedInput, kv: KvCache) -> Result<ForwardState>;
    /// See [`CausalLm::recompute_cache_at`].
    fn dyn_recompute_cache_at(&self) -> Option<i64>;
}

impl<M: CausalLm> DynCausalLm for M {
    fn architecture(&self) -> &'static str {
        M::ARCHITECTURE
    }
    fn dyn_prepare(&self, batch: &Batch) -> Result<ForwardState> {
        self.prepare(batch)
    }
    fn dyn_forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        self.forward(cx, x)
    }
    fn dyn_vocab_size(&self) -> i64 {
        self.vocab_size()
    }
    fn dyn_kind(&self) -> Kind {
        self.dtype()
    }
    fn dyn_to_device(&mut self, device: tch::Device, kind: Kind) -> Result<()> {
        self.to_device(device, kind)
    }
    fn dyn_cache_layers(&self) -> usize {
        self.cache_layers()
    }
    fn dyn_standard_names(&self) -> super::StandardNames {
        self.standard_names()
    }
    fn dyn_prepare_cached(&self, input: &CachedInput, kv: KvCache) -> Result<ForwardState> {
        self.prepare_cached(input, kv)
    }
    fn dyn_recompute_cache_at(&self) -> Option<i64> {
        self.recompute_cache_at()
    }
}

/// A model of whichever registered architecture the checkpoint holds.
pub struct AutoModel(Box<dyn DynCausalLm>);

impl AutoModel {
    /// Registry name of the architecture loaded.
    pub fn architecture(&self) -> &'static str {
        self.0.architecture()
    }
}

impl Module for AutoModel {
    fn path(&self) -> &str {
        self.0.path()
    }
    fn kind(&self) -> &'static str {
        self.0.kind()
    }
    fn children<'a>(&'a self, f: &mut dyn FnMut(&str, &'a dyn Module)) {
        self.0.children(f)
    }
    fn parameters(&self, f: &mut dyn FnMut(&str, &Tensor)) {
        self.0.parameters(f)
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn as_forward(&self) -> Option<&dyn Forward> {
        Some(self)
    }
}

/// The envoy of an [`AutoModel`]: only the root's hook points (the tree is not known at compile time; load a
/// typed model, e.g. `LanguageModel::<Llama>`, to reach submodules in `intervene!`).
#[derive(Debug)]
pub struct AutoEnvoy {
    /// The logits.
    pub output: crate::handle::HookPoint<Tensor>,
    /// The input ids.
    pub input: crate::handle::HookPoint<Tensor>,
    /// All inputs.
    pub inputs: crate::handle::InputsPoint,
}

impl crate::handle::Envoy for AutoEnvoy {
    fn module_path(&self) -> &str {
        ""
    }
}

impl crate::handle::Traceable for AutoModel {
    type Envoy = AutoEnvoy;
    fn envoy(&self) -> AutoEnvoy {
        let p = crate::handle::Points::new("");
        AutoEnvoy { output: p.output(), input: p.input(), inputs: p.inputs() }
    }
    fn set_path(&mut self, _: &str) {}
    fn visit_child<'a>(&'a self, name: &str, f: &mut dyn FnMut(&str, &'a dyn Module)) {
        f(name, self)
    }
}

impl Forward for AutoModel {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        self.0.dyn_forward(cx, x)
    }
}

impl CausalLm for AutoModel {
    const ARCHITECTURE: &'static str = "auto";
    fn from_config(config: &RawConfig, weights: &mut Weights) -> Result<Self> {
        let arch = by_model_type(config.model_type()?)?;
        Ok(AutoModel((arch.build)(config, weights)?))
    }
    fn accepts(_: &Architecture) -> bool {
        true
    }
    fn prepare(&self, batch: &Batch) -> Result<ForwardState> {
        self.0.dyn_prepare(batch)
    }
    fn vocab_size(&self) -> i64 {
        self.0.dyn_vocab_size()
    }
    fn dtype(&self) -> Kind {
        self.0.dyn_kind()
    }
    fn to_device(&mut self, device: tch::Device, kind: Kind) -> Result<()> {
        self.0.dyn_to_device(device, kind)
    }
    fn cache_layers(&self) -> usize {
        self.0.dyn_cache_layers()
    }
    fn standard_names(&self) -> super::StandardNames {
        self.0.dyn_standard_names()
    }
    fn prepare_cached(&self, input: &CachedInput, kv: KvCache) -> Result<ForwardState> {
        self.0.dyn_prepare_cached(input, kv)
    }
    fn recompute_cache_at(&self) -> Option<i64> {
        self.0.dyn_recompute_cache_at()
    }
}
