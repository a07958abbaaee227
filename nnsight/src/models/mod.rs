//! Architectures: one file each, registered by name through `inventory`, so adding one touches one file.
//!
//! A checkpoint's `model_type` (config.json) or `general.architecture` (GGUF) selects the [`Architecture`] entry;
//! a typed load (`LanguageModel::<Llama>::load`) checks that the entry is the one asked for, and [`AutoModel`]
//! takes whichever it is.

pub mod batch;
pub mod gpt2;
pub mod llama;

use crate::load::gguf::GgufFile;
use crate::load::Weights;
use crate::nn::{Ctx, Forward, ForwardState, KvCache, Module};
use crate::{Error, Result};
use batch::Batch;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// A model configuration as read: `config.json`, or the equivalent built from GGUF metadata.
#[derive(Debug, Clone)]
pub struct RawConfig {
    /// Where it came from (for error messages).
    pub source: PathBuf,
    /// The JSON object, with Hugging Face field names.
    pub json: serde_json::Value,
}

impl RawConfig {
    /// The `model_type` field.
    pub fn model_type(&self) -> Result<&str> {
        self.json
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::config(&self.source, "no `model_type` string"))
    }

    /// Deserializes into an architecture's typed config.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.json.clone()).map_err(|e| Error::config(&self.source, e.to_string()))
    }
}

/// A causal language model: token ids in, logits `[batch, seq, vocab]` out, through hooked submodule calls.
///
/// The root module's input is the `input_ids` tensor and its output the logits, so a hook sees them as
/// `model.input` and `model.output`.
pub trait CausalLm: Forward + crate::handle::Traceable + Send + 'static {
    /// The registry name of the architecture (`"llama"`, `"gpt2"`).
    const ARCHITECTURE: &'static str;

    /// Builds the model from its configuration, taking its parameters from `weights`.
    fn from_config(config: &RawConfig, weights: &mut Weights) -> Result<Self>
    where
        Self: Sized;

    /// Whether this type can be built from the registry entry `arch` (a typed model: only its own).
    fn accepts(arch: &Architecture) -> bool
    where
        Self: Sized,
    {
        arch.name == Self::ARCHITECTURE
    }

    /// The side inputs of one pass over `batch` (masks, positions, rotary tables).
    fn prepare(&self, batch: &Batch) -> Result<ForwardState>;

    /// Size of the vocabulary (last dimension of the logits).
    fn vocab_size(&self) -> i64;

    /// The dtype of the model's parameters.
    fn dtype(&self) -> Kind;

    /// Moves every parameter to `device` and `kind`.
    fn to_device(&mut self, device: tch::Device, kind: Kind) -> Result<()>;

    /// Runs a forward pass with `cx` (whose hook, if any, sees every module call) and returns the logits.
    fn run(&self, cx: &mut Ctx<'_>, batch: &Batch) -> Result<Tensor> {
        cx.state = self.prepare(batch)?;
        cx.call(self, &batch.input_ids)
    }

    /// Number of attention layers that keep keys and values in a [`KvCache`]; 0 (the default) for a model that
    /// cannot run cached forwards, whose [`CausalLm::prepare_cached`] then fails.
    fn cache_layers(&self) -> usize {
        0
    }

    /// The side inputs of a cached forward of `input` continuing `kv`: the mask of [`cached_attention_mask`],
    /// position ids and rotary tables of the new tokens, the cache itself in [`ForwardState::kv`].
    fn prepare_cached(&self, input: &CachedInput, kv: KvCache) -> Result<ForwardState> {
        let _ = (input, kv);
        Err(Error::InvalidInput {
            message: format!("the `{}` architecture does not support cached decoding", Self::ARCHITECTURE),
        })
    }

    /// A forward of the new tokens `input.input_ids` `[batch, q]` over the cache `kv` (empty for the prefill,
    /// which is the whole left-padded prompt): every attention layer appends its new keys and values to the cache
    /// and attends over all of them. `cx`'s hook, if any, sees every module call, as in [`CausalLm::run`]; the
    /// root's input is `input.input_ids`. Returns the logits (`[batch, 1, vocab]` when `input.last_logits_only`,
    /// else `[batch, q, vocab]`) and the cache grown by `q` positions.
    fn run_cached(&self, cx: &mut Ctx<'_>, input: &CachedInput, kv: KvCache) -> Result<(Tensor, KvCache)> {
        let q = input.input_ids.size()[1];
        cx.state = self.prepare_cached(input, kv)?;
        cx.state.last_logits_only = input.last_logits_only;
        let logits = cx.call(self, &input.input_ids)?;
        let mut kv = cx.state.kv.take().ok_or_else(|| Error::InvalidInput {
            message: "the KV cache was taken out of the forward state during a cached forward".into(),
        })?;
        kv.advance(q);
        Ok((logits, kv))
    }
}

/// The inputs of one cached forward (see [`CausalLm::run_cached`]): `q` new tokens per row after `past` cached
/// positions.
#[derive(Debug)]
pub struct CachedInput {
    /// The new tokens `[batch, q]` (i64): the left-padded prompt for the prefill, then one token per row.
    pub input_ids: Tensor,
    /// `[batch, past + q]` (i64): 1 for the real tokens among the cached and the new positions, 0 for padding
    /// (left padding of the prompt, pad tokens fed to rows that stopped).
    pub attention_mask: Tensor,
    /// `[batch, q]` (i64): the position of each new token, counted over its row's real tokens only.
    pub position_ids: Tensor,
    /// Whether `attention_mask` has any 0.
    pub padded: bool,
    /// Compute the logits of the last position only (see [`ForwardState::last_logits_only`]).
    pub last_logits_only: bool,
}

impl CachedInput {
    /// The prefill of `batch`: all its tokens, nothing cached yet.
    pub fn prefill(batch: &Batch, last_logits_only: bool) -> Self {
        CachedInput {
            input_ids: batch.input_ids.shallow_clone(),
            attention_mask: batch.attention_mask.shallow_clone(),
            position_ids: batch.position_ids.shallow_clone(),
            padded: batch.padded,
            last_logits_only,
        }
    }
}

/// The dtype's lowest finite value, the additive mask of a disallowed key.
fn lowest(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.3895313892515355e38,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// The additive attention mask `[batch, 1, q, past + q]` of a cached forward: new query `i` (at cache position
/// `past + i`) may attend key `j` when `j <= past + i`, the key is real (`attention_mask`), and, with a sliding
/// `window` (Mistral), `past + i - j < window`. `None` when plain attention is exact: no padding, no window that
/// cuts, and either a single query (a decode step sees every key) or nothing cached (`is_causal` applies).
pub fn cached_attention_mask(input: &CachedInput, kind: Kind, window: Option<i64>) -> Result<Option<Tensor>> {
    let mask = &input.attention_mask;
    let (b, k) = (mask.size()[0], mask.size()[1]);
    let q = input.input_ids.size()[1];
    let past = k - q;
    let f = |e| Error::torch("attention_mask", e);
    if past < 0 {
        return Err(Error::InvalidInput {
            message: format!("the attention mask covers {k} positions, fewer than the {q} new tokens"),
        });
    }
    let window = window.filter(|&w| w > 0 && w < k);
    if !input.padded && window.is_none() && (q == 1 || past == 0) {
        return Ok(None);
    }
    let device = mask.device();
    let rows = Tensor::f_arange_start(past, k, (Kind::Int64, device)).map_err(f)?.f_view([q, 1]).map_err(f)?;
    let cols = Tensor::f_arange(k, (Kind::Int64, device)).map_err(f)?.f_view([1, k]).map_err(f)?;
    let mut allowed = cols.f_le_tensor(&rows).map_err(f)?;
    if let Some(w) = window {
        let first = rows.f_sub_scalar(w).map_err(f)?;
        allowed = allowed.f_logical_and(&cols.f_gt_tensor(&first).map_err(f)?).map_err(f)?;
    }
    let keys = mask.f_ne(0).map_err(f)?.f_view([b, 1, 1, k]).map_err(f)?;
    let allowed = keys.f_logical_and(&allowed.f_view([1, 1, q, k]).map_err(f)?).map_err(f)?;
    let zeros = Tensor::f_zeros([1], (kind, device)).map_err(f)?;
    let full = Tensor::f_full([1], lowest(kind), (kind, device)).map_err(f)?;
    Ok(Some(zeros.f_where_self(&allowed, &full).map_err(f)?))
}

/// Appends an attention layer's new keys and values to the forward state's cache, if there is one, and returns
/// the keys and values to attend over (all of them so far; the new ones when nothing is cached).
pub(crate) fn append_kv(cx: &mut Ctx<'_>, path: &str, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
    use crate::error::TchResultExt;
    match cx.state.kv.as_mut() {
        Some(kv) => kv.append(layer, &k, &v).at(path),
        None => Ok((k, v)),
    }
}

/// The hidden states the head runs on: the last position only when the forward state asks for it.
pub(crate) fn head_positions(cx: &Ctx<'_>, path: &str, h: Tensor) -> Result<Tensor> {
    use crate::error::TchResultExt;
    if cx.state.last_logits_only && h.size()[1] > 1 {
        h.f_narrow(1, -1, 1).at(path)
    } else {
        Ok(h)
    }
}

/// How an architecture reads GGUF files.
pub struct GgufSupport {
    /// `general.architecture` values it reads (`"llama"`).
    pub architectures: &'static [&'static str],
    /// Builds a Hugging Face `config.json` equivalent from the metadata.
    pub config: fn(&GgufFile) -> Result<serde_json::Value>,
    /// Maps a llama.cpp tensor name to its Hugging Face name (`None`: not a known tensor).
    pub tensor_name: fn(&str) -> Option<String>,
    /// Undoes converter-side changes to a tensor (e.g. Llama's q/k row permutation), given its Hugging Face
    /// name and the config.
    pub fix_tensor: fn(&str, Tensor, &serde_json::Value) -> Result<Tensor>,
}

/// A registered architecture.
pub struct Architecture {
    /// Registry name (`"llama"`).
    pub name: &'static str,
    /// `model_type` values of config.json that select it (`["llama", "mistral"]`).
    pub model_types: &'static [&'static str],
    /// The Hugging Face class it mirrors (`"LlamaForCausalLM"`).
    pub hf_class: &'static str,
    /// Builds the model behind a trait object.
    pub build: fn(&RawConfig, &mut Weights) -> Result<Box<dyn DynCausalLm>>,
    /// GGUF support, if any.
    pub gguf: Option<GgufSupport>,
}

inventory::collect!(Architecture);

/// All registered architectures.
pub fn architectures() -> impl Iterator<Item = &'static Architecture> {
    inventory::iter::<Architecture>.into_iter()
}

fn supported_list() -> String {
    let mut names: Vec<String> =
        architectures().map(|a| format!("{} (model_type {})", a.name, a.model_types.join("/"))).collect();
    names.sort();
    names.join(", ")
}

/// The entry whose `model_types` contain `model_type`.
pub fn by_model_type(model_type: &str) -> Result<&'static Architecture> {
    architectures()
        .find(|a| a.model_types.contains(&model_type))
        .ok_or_else(|| Error::UnsupportedArchitecture { found: model_type.to_string(), supported: supported_list() })
}

/// The entry that reads GGUF files of `general.architecture = arch`.
pub fn by_gguf_architecture(arch: &str) -> Result<&'static Architecture> {
    architectures().find(|a| a.gguf.as_ref().is_some_and(|g| g.architectures.contains(&arch))).ok_or_else(|| {
        let mut gguf: Vec<&str> =
            architectures().filter_map(|a| a.gguf.as_ref()).flat_map(|g| g.architectures.iter().copied()).collect();
        gguf.sort();
        Error::UnsupportedArchitecture {
            found: arch.to_string(),
            supported: format!("{} (GGUF: {})", supported_list(), gguf.join(", ")),
        }
    })
}

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
    /// See [`CausalLm::prepare_cached`].
    fn dyn_prepare_cached(&self, input: &CachedInput, kv: KvCache) -> Result<ForwardState>;
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
    fn dyn_prepare_cached(&self, input: &CachedInput, kv: KvCache) -> Result<ForwardState> {
        self.prepare_cached(input, kv)
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
    fn prepare_cached(&self, input: &CachedInput, kv: KvCache) -> Result<ForwardState> {
        self.0.dyn_prepare_cached(input, kv)
    }
}

/// Builds a boxed model of type `M` (the `build` function of a registry entry).
pub fn build_boxed<M: CausalLm>(config: &RawConfig, weights: &mut Weights) -> Result<Box<dyn DynCausalLm>> {
    Ok(Box::new(M::from_config(config, weights)?))
}

/// The additive attention mask `[batch, 1, seq, seq]` (0 where a query may attend, the dtype's lowest value where
/// not) for a left-padded batch, or for a sliding window of `window` keys (Mistral); `None` when neither applies and
/// a plain causal pass is exact.
pub fn causal_padding_mask(batch: &Batch, kind: Kind, window: Option<i64>) -> Result<Option<Tensor>> {
    let mask = &batch.attention_mask;
    let (b, s) = (mask.size()[0], mask.size()[1]);
    let window = window.filter(|&w| w > 0 && w < s);
    if !batch.padded && window.is_none() {
        return Ok(None);
    }
    let f = |e| Error::torch("attention_mask", e);
    // Made on the mask's device; a scan's meta mask: made on the CPU, then meta.
    let device = crate::meta::creation_device(mask);
    let ones = Tensor::f_ones([s, s], (Kind::Bool, device)).map_err(f)?;
    let mut allowed_2d = ones.f_tril(0).map_err(f)?;
    if let Some(w) = window {
        // A query at q sees keys k with q - k < w.
        allowed_2d = allowed_2d.f_logical_and(&ones.f_triu(-(w - 1)).map_err(f)?).map_err(f)?;
    }
    let allowed_2d = crate::meta::to_device_like(&allowed_2d, mask).map_err(f)?;
    let keys = mask.f_ne(0).map_err(f)?.f_view([b, 1, 1, s]).map_err(f)?;
    let allowed = keys.f_logical_and(&allowed_2d.f_view([1, 1, s, s]).map_err(f)?).map_err(f)?;
    let lowest = match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.3895313892515355e38,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    };
    let zeros = crate::meta::to_device_like(&Tensor::f_zeros([1], (kind, device)).map_err(f)?, mask).map_err(f)?;
    let full =
        crate::meta::to_device_like(&Tensor::f_full([1], lowest, (kind, device)).map_err(f)?, mask).map_err(f)?;
    Ok(Some(zeros.f_where_self(&allowed, &full).map_err(f)?))
}

/// The inner points of the attention modules (Llama's `self_attn`, GPT-2's `attn`), in forward order.
pub(crate) const ATTENTION_POINTS: [&str; 4] = ["query", "key", "probs", "head_output"];

/// Attention computed step by step, for when something reads or writes the inner points of the attention module
/// at `path`: `query` `[batch, heads, q, head_dim]` and `key` `[batch, kv_heads, q, head_dim]` (this forward's
/// positions only) go through [`Ctx::point`] first; in a cached forward the key as returned and `v` are then
/// appended to the KV cache (slot `layer`), so that a write persists into later steps, and the attention runs over
/// every cached key (k = past + q); the scores q·kᵀ·`scale` plus the mask (the forward state's, else the causal mask when
/// q > 1, aligned so that the last query sees every key) are softmaxed in float32 and brought back to the dtype, giving `probs` `[batch, heads, q, k]`; key and
/// value heads are repeated for grouped-query attention; `probs`·v transposed gives `head_output`
/// `[batch, q, heads, head_dim]`. Each value goes on as the hook returns it. Returns `[batch, q, heads * head_dim]`,
/// what `scaled_dot_product_attention` gives up to float rounding.
pub(crate) fn explicit_attention(
    cx: &mut Ctx<'_>,
    path: &str,
    layer: usize,
    q: Tensor,
    k: Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    use crate::error::TchResultExt;
    let p = path;
    let mask = cx.state.attention_mask.as_ref().map(Tensor::shallow_clone);
    let q = cx.point(p, "query", q)?;
    let k = cx.point(p, "key", k)?;
    let (k, v) = append_kv(cx, p, layer, k, v.shallow_clone())?;
    let (b, heads, s, hd) = q.size4().at(p)?;
    let kv_heads = k.size()[1];
    let repeat = |t: Tensor| match heads / kv_heads.max(1) {
        n if n > 1 => t.f_repeat_interleave_self_int(n, 1, None::<i64>).at(p),
        _ => Ok(t),
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    let scores = q.f_matmul(&k.f_transpose(-2, -1).at(p)?).at(p)?.f_mul_scalar(scale).at(p)?;
    let scores = match mask {
        Some(m) => scores.f_add(&m).at(p)?,
        None if s > 1 => {
            let keys = k.size()[2];
            let above = Tensor::f_ones([s, keys], (Kind::Bool, crate::meta::creation_device(&q))).at(p)?;
            let above = crate::meta::to_device_like(&above.f_triu(keys - s + 1).at(p)?, &q).at(p)?;
            scores.f_masked_fill(&above, f64::NEG_INFINITY).at(p)?
        }
        None => scores,
    };
    let probs = scores.f_softmax(-1, Kind::Float).at(p)?.f_to_kind(q.kind()).at(p)?;
    let probs = cx.point(p, "probs", probs)?;
    let out = probs.f_matmul(&v).at(p)?.f_transpose(1, 2).at(p)?;
    let out = cx.point(p, "head_output", out)?;
    out.f_reshape([b, s, heads * hd]).at(p)
}

/// Reads `config.json` in `dir`.
pub fn read_config(dir: &Path) -> Result<RawConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let json = serde_json::from_str(&text).map_err(|e| Error::format(&path, format!("invalid JSON: {e}")))?;
    Ok(RawConfig { source: path, json })
}
