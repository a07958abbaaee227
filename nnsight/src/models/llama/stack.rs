//! The decoder stack the Llama-shaped families share (Llama, Mistral, Qwen2, Qwen3): [`decoder_stack!`] writes a
//! family's decoder layer (pre-norm attention and pre-norm SwiGLU MLP around the residual stream), its decoder
//! model (embeddings, layers, final norm) and its causal LM (the model and `lm_head`, with the rotary tables, masks
//! and KV cache of [`CausalLm`](crate::models::CausalLm)), given the family's attention module and configuration.
//! The families differ in their attention (biases, q/k norms) and configuration; what they share is written here
//! once.

use super::LlamaConfig;
use crate::load::Weights;
use crate::models::batch::Batch;
use crate::models::rope::rotary_tables;
use crate::models::{cached_attention_mask, causal_padding_mask, CachedInput, RawConfig};
use crate::nn::{Embedding, ForwardState, KvCache, Linear};
use crate::Result;
use tch::{Kind, Tensor};

/// What the shared decoder stack reads from a family's configuration.
pub(crate) trait StackConfig: Sized {
    /// Parses `config.json` and refuses what the family does not implement (errors name `raw.source`).
    fn from_raw(raw: &RawConfig) -> Result<Self>;
    /// The Llama fields: sizes, norms, rotary settings, head tying.
    fn llama(&self) -> &LlamaConfig;
    /// The sliding attention window (each query sees at most this many keys) of the layers that slide, if any.
    fn window(&self) -> Option<i64>;
}

/// The head: the embedding matrix when the config ties them, unless the checkpoint carries `lm_head.weight` anyway
/// (some exports do); a separate `[vocab, hidden]` matrix otherwise.
pub(crate) fn load_head(w: &mut Weights, c: &LlamaConfig, embed_tokens: &Embedding) -> Result<Linear> {
    if c.tie_word_embeddings && !w.contains("lm_head.weight") {
        Ok(Linear::from_tensors("lm_head", embed_tokens.weight.shallow_clone(), None))
    } else {
        Linear::load(w, "lm_head", c.hidden_size, c.vocab_size, false)
    }
}

/// The side inputs of a pass over `batch`: the padding mask, the sliding-window mask of the layers that slide
/// over `window` keys (if any), positions and rotary tables.
pub(crate) fn prepare(inv_freq: &Tensor, window: Option<i64>, kind: Kind, batch: &Batch) -> Result<ForwardState> {
    prepare_with([inv_freq, inv_freq], window, kind, batch)
}

/// [`prepare`] with the rotary tables of the full-attention and the sliding layers from
/// `[inv_freq, sliding_inv_freq]` (Gemma 3's global and local bases; the same tensor twice for one base).
pub(crate) fn prepare_with(
    [inv_freq, sliding_inv_freq]: [&Tensor; 2],
    window: Option<i64>,
    kind: Kind,
    batch: &Batch,
) -> Result<ForwardState> {
    let seq = batch.input_ids.size()[1];
    let sliding = window.filter(|&w| w > 0 && w < seq);
    Ok(ForwardState {
        attention_mask: causal_padding_mask(batch, kind, None)?,
        sliding_attention_mask: sliding.map(|w| causal_padding_mask(batch, kind, Some(w))).transpose()?.flatten(),
        position_ids: Some(batch.position_ids.shallow_clone()),
        rotary: Some(rotary_tables(inv_freq, &batch.position_ids, kind)?),
        sliding_rotary: sliding_tables(inv_freq, sliding_inv_freq, &batch.position_ids, kind)?,
        ..ForwardState::default()
    })
}

/// The tables of `sliding_inv_freq` when it is not `inv_freq` itself.
fn sliding_tables(
    inv_freq: &Tensor,
    sliding_inv_freq: &Tensor,
    position_ids: &Tensor,
    kind: Kind,
) -> Result<Option<(Tensor, Tensor)>> {
    match std::ptr::eq(inv_freq, sliding_inv_freq) {
        true => Ok(None),
        false => Ok(Some(rotary_tables(sliding_inv_freq, position_ids, kind)?)),
    }
}

/// The side inputs of a cached forward of `input` over `kv`.
pub(crate) fn prepare_cached(
    inv_freq: &Tensor,
    window: Option<i64>,
    kind: Kind,
    input: &CachedInput,
    kv: KvCache,
) -> Result<ForwardState> {
    prepare_cached_with([inv_freq, inv_freq], window, kind, input, kv)
}

/// [`prepare_cached`] with the rotary tables of the full-attention and the sliding layers from
/// `[inv_freq, sliding_inv_freq]`, as [`prepare_with`].
pub(crate) fn prepare_cached_with(
    [inv_freq, sliding_inv_freq]: [&Tensor; 2],
    window: Option<i64>,
    kind: Kind,
    input: &CachedInput,
    kv: KvCache,
) -> Result<ForwardState> {
    let keys = input.attention_mask.size()[1];
    let sliding = window.filter(|&w| w > 0 && w < keys);
    Ok(ForwardState {
        attention_mask: cached_attention_mask(input, kind, None)?,
        sliding_attention_mask: sliding.map(|w| cached_attention_mask(input, kind, Some(w))).transpose()?.flatten(),
        position_ids: Some(input.position_ids.shallow_clone()),
        rotary: Some(rotary_tables(inv_freq, &input.position_ids, kind)?),
        sliding_rotary: sliding_tables(inv_freq, sliding_inv_freq, &input.position_ids, kind)?,
        kv: Some(kv),
        last_logits_only: input.last_logits_only,
    })
}

/// Writes a family's decoder layer, decoder model and causal LM (see the module documentation):
///
/// ```ignore
/// decoder_stack! {
///     /// Documentation of the causal LM.
///     root: Qwen2 = "Qwen2ForCausalLM", architecture "qwen2",
///     model: Qwen2Model = "Qwen2Model",
///     layer: Qwen2DecoderLayer = "Qwen2DecoderLayer",
///     attention: LlamaAttention = load_attention, // fn(&mut Weights, &str, &Config, usize) -> Result<LlamaAttention>
///     mlp: "Qwen2MLP",
///     config: Qwen2Config, // a StackConfig
/// }
/// ```
///
/// The types are named by the caller, their `kind`s (what the module tree prints) are the Hugging Face class
/// names given, and their fields are the state dict's names (`model.layers.N.self_attn`, `model.norm`, `lm_head`).
macro_rules! decoder_stack {
    (
        $(#[$root_doc:meta])*
        root: $root:ident = $root_kind:literal, architecture $arch:literal,
        model: $model:ident = $model_kind:literal,
        layer: $layer:ident = $layer_kind:literal,
        attention: $attn:ty = $load_attn:expr,
        mlp: $mlp_kind:literal,
        config: $config:ty $(,)?
    ) => {
        #[doc = concat!("One decoder layer (`", $layer_kind, "`): pre-norm attention and pre-norm MLP, each added to ")]
        /// the residual stream.
        #[derive(Debug, $crate::Traceable)]
        #[traceable(kind = $layer_kind)]
        pub struct $layer {
            #[traceable(path)]
            path: String,
            /// Attention.
            pub self_attn: $attn,
            /// MLP.
            pub mlp: $crate::models::llama::LlamaMlp,
            /// Norm before attention.
            pub input_layernorm: $crate::nn::RmsNorm,
            /// Norm before the MLP.
            pub post_attention_layernorm: $crate::nn::RmsNorm,
        }

        impl $layer {
            fn load(w: &mut $crate::load::Weights, path: &str, c: &$config, layer: usize) -> $crate::Result<Self> {
                use $crate::models::llama::StackConfig as _;
                use $crate::nn::{join_path, RmsNorm};
                let l = c.llama();
                let norm = |w: &mut $crate::load::Weights, name: &str| {
                    RmsNorm::load(w, &join_path(path, name), l.hidden_size, l.rms_norm_eps)
                };
                Ok($layer {
                    path: path.to_string(),
                    self_attn: ($load_attn)(w, &join_path(path, "self_attn"), c, layer)?,
                    mlp: $crate::models::llama::LlamaMlp::load(w, &join_path(path, "mlp"), l, $mlp_kind)?,
                    input_layernorm: norm(w, "input_layernorm")?,
                    post_attention_layernorm: norm(w, "post_attention_layernorm")?,
                })
            }
        }

        impl $crate::nn::Forward for $layer {
            fn forward(&self, cx: &mut $crate::nn::Ctx<'_>, x: &tch::Tensor) -> $crate::Result<tch::Tensor> {
                use $crate::error::TchResultExt as _;
                let p = self.path.as_str();
                let h = cx.call(&self.input_layernorm, x)?;
                let h = cx.call(&self.self_attn, &h)?;
                let x = x.f_add(&h).at(p)?;
                let h = cx.call(&self.post_attention_layernorm, &x)?;
                let h = cx.call(&self.mlp, &h)?;
                x.f_add(&h).at(p)
            }
        }

        #[doc = concat!("The decoder stack (`", $model_kind, "`): token ids in, final-norm hidden states out.")]
        #[derive(Debug, $crate::Traceable)]
        #[traceable(kind = $model_kind)]
        pub struct $model {
            #[traceable(path)]
            path: String,
            /// Token embeddings `[vocab, hidden]`.
            pub embed_tokens: $crate::nn::Embedding,
            /// Decoder layers.
            pub layers: $crate::nn::ModuleList<$layer>,
            /// Final norm.
            pub norm: $crate::nn::RmsNorm,
        }

        impl $crate::nn::Forward for $model {
            fn forward(&self, cx: &mut $crate::nn::Ctx<'_>, ids: &tch::Tensor) -> $crate::Result<tch::Tensor> {
                let mut h = cx.call(&self.embed_tokens, ids)?;
                for layer in &self.layers {
                    h = cx.call(layer, &h)?;
                }
                cx.call(&self.norm, &h)
            }
        }

        $(#[$root_doc])*
        #[derive(Debug, $crate::Traceable)]
        #[traceable(kind = $root_kind)]
        pub struct $root {
            #[traceable(path)]
            path: String,
            /// The decoder stack (`model.*` in the state dict).
            pub model: $model,
            /// The head `[vocab, hidden]` (the embedding matrix when tied).
            pub lm_head: $crate::nn::Linear,
            #[traceable(skip)]
            config: $config,
            #[traceable(skip)]
            inv_freq: tch::Tensor,
        }

        impl $root {
            /// The configuration.
            pub fn config(&self) -> &$config {
                &self.config
            }
        }

        impl $crate::nn::Forward for $root {
            fn forward(&self, cx: &mut $crate::nn::Ctx<'_>, ids: &tch::Tensor) -> $crate::Result<tch::Tensor> {
                let h = cx.call(&self.model, ids)?;
                let h = $crate::models::head_positions(cx, &self.path, h)?;
                cx.call(&self.lm_head, &h)
            }
        }

        impl $crate::models::CausalLm for $root {
            const ARCHITECTURE: &'static str = $arch;

            fn from_config(
                raw: &$crate::models::RawConfig,
                w: &mut $crate::load::Weights,
            ) -> $crate::Result<Self> {
                use $crate::models::llama::StackConfig as _;
                use $crate::nn::{Embedding, ModuleList, RmsNorm};
                let c = <$config>::from_raw(raw)?;
                let l = c.llama();
                let embed_tokens = Embedding::load(w, "model.embed_tokens", l.vocab_size, l.hidden_size)?;
                let layers = (0..l.num_hidden_layers)
                    .map(|i| $layer::load(w, &format!("model.layers.{i}"), &c, i as usize))
                    .collect::<$crate::Result<Vec<_>>>()?;
                let norm = RmsNorm::load(w, "model.norm", l.hidden_size, l.rms_norm_eps)?;
                let lm_head = $crate::models::llama::load_head(w, l, &embed_tokens)?;
                let inv_freq = $crate::models::rope::inv_freq(l.head_dim(), l.theta(), l.scaling())?;
                let inv_freq = w.place("model.rotary_emb", inv_freq)?;
                let model = $model {
                    path: "model".into(),
                    embed_tokens,
                    layers: ModuleList::new("model.layers", layers),
                    norm,
                };
                Ok($root { path: String::new(), model, lm_head, config: c, inv_freq })
            }

            fn prepare(&self, batch: &$crate::models::batch::Batch) -> $crate::Result<$crate::nn::ForwardState> {
                use $crate::models::llama::StackConfig as _;
                $crate::models::llama::prepare(&self.inv_freq, self.config.window(), self.dtype(), batch)
            }

            fn cache_layers(&self) -> usize {
                self.model.layers.len()
            }

            fn standard_names(&self) -> $crate::models::StandardNames {
                $crate::models::StandardNames::llama_layout(self.model.layers.len())
            }

            fn prepare_cached(
                &self,
                input: &$crate::models::CachedInput,
                kv: $crate::nn::KvCache,
            ) -> $crate::Result<$crate::nn::ForwardState> {
                use $crate::models::llama::StackConfig as _;
                $crate::models::llama::prepare_cached(&self.inv_freq, self.config.window(), self.dtype(), input, kv)
            }

            fn vocab_size(&self) -> i64 {
                use $crate::models::llama::StackConfig as _;
                self.config.llama().vocab_size
            }

            fn dtype(&self) -> tch::Kind {
                self.lm_head.weight.kind()
            }

            fn to_device(&mut self, device: tch::Device, kind: tch::Kind) -> $crate::Result<()> {
                use $crate::error::TchResultExt as _;
                $crate::models::move_params(self, device, kind)?;
                self.inv_freq = self.inv_freq.f_to_device(device).at("model.rotary_emb")?;
                Ok(())
            }
        }
    };
}
pub(crate) use decoder_stack;
