//! Architectures: one file each, registered by name through `inventory`, so adding one touches one file.
//!
//! A checkpoint's `model_type` (config.json) or `general.architecture` (GGUF) selects the [`Architecture`] entry;
//! a typed load (`LanguageModel::<Llama>::load`) checks that the entry is the one asked for, and [`AutoModel`]
//! takes whichever it is.

mod attention;
mod auto;
pub mod batch;
pub mod gemma2;
pub mod gemma3;
pub mod gpt2;
pub mod gpt_neox;
pub mod llama;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;
mod registry;
pub mod rope;
pub mod standard;

pub(crate) use attention::{append_kv, explicit_attention, head_positions, Scoring, ATTENTION_POINTS};
pub use attention::{cached_attention_mask, causal_padding_mask, CachedInput};
pub use auto::{AutoEnvoy, AutoModel, DynCausalLm};
pub use registry::{
    architectures, build_boxed, by_gguf_architecture, by_model_type, read_config, Architecture, GgufSupport,
};
pub use standard::{StandardEnvoy, StandardNames};

use crate::load::Weights;
use crate::nn::{Ctx, Forward, ForwardState, KvCache};
use crate::{Error, Result};
use batch::Batch;
use std::path::PathBuf;
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

    /// Where the standard names (`model.layers[i].attn`, `model.unembed`; see [`standard`]) point in this model.
    fn standard_names(&self) -> StandardNames;

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
        cx.state.last_logits_only = batch.last_logits_only;
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

    /// The cache length at which the keys and values cached so far stop being valid for what follows (Phi-3's
    /// LongRoPE switches its rotary frequencies there): the decode step over exactly that many cached positions
    /// instead runs the whole sequence so far without a cache, as transformers' generation does. `None` (the
    /// default): a cache stays valid.
    fn recompute_cache_at(&self) -> Option<i64> {
        None
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

/// Refuses the sizes of a decoder config, `[vocab_size, hidden_size, intermediate_size, num_hidden_layers,
/// num_attention_heads, num_key_value_heads, head_dim]`, when one is not positive or the query heads are not a
/// multiple of the key/value heads, naming the setting and `source`.
pub(crate) fn check_sizes(source: &std::path::Path, sizes: [i64; 7]) -> Result<()> {
    const NAMES: [&str; 7] = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
    ];
    if let Some((name, v)) = NAMES.iter().zip(sizes).find(|(_, v)| *v <= 0) {
        return Err(Error::config(source, format!("`{name}` must be positive, found {v}")));
    }
    let (heads, kv_heads) = (sizes[4], sizes[5]);
    if heads % kv_heads != 0 {
        let m = format!("num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})");
        return Err(Error::config(source, m));
    }
    Ok(())
}

/// Moves every parameter of `m` to `device`/`kind` in place (shared tensors stay shared).
pub(crate) fn move_params(m: &dyn crate::nn::Module, device: tch::Device, kind: Kind) -> Result<()> {
    let _g = tch::no_grad_guard();
    for (name, t) in crate::nn::named_parameters(m) {
        let moved = t.f_to_device(device).and_then(|x| x.f_to_kind(kind)).map_err(|e| Error::torch(&name, e))?;
        let mut t = t;
        t.f_set_data(&moved).map_err(|e| Error::torch(&name, e))?;
    }
    Ok(())
}
