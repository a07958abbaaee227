//! Phi-3 (Phi-3, Phi-3.5, Phi-4-mini): Llama's pre-norm layout with a fused q/k/v projection (`qkv_proj`, split
//! into grouped query, key and value heads), a fused gate/up projection (`gate_up_proj`, its output chunked into
//! the SiLU gate and the up half), partial rotary embeddings (`partial_rotary_factor`), LongRoPE scaling
//! (`longrope`, older files' `su`), an optional sliding window, no biases, a separate `lm_head` or a tied one.
//!
//! Paper: Abdin et al., *Phi-3 Technical Report: A Highly Capable Language Model Locally on Your Phone* (2024),
//! <https://arxiv.org/abs/2404.14219>; LongRoPE: Ding et al. (2024), <https://arxiv.org/abs/2402.13753>.
//! Reference implementation: Hugging Face transformers' `models/phi3/modeling_phi3.py` and
//! `configuration_phi3.py`, whose module names and nesting this file mirrors (`model.layers.5.self_attn.qkv_proj`,
//! `model.layers.5.mlp.gate_up_proj`; there is no `q_proj` module), and `modeling_rope_utils.py` for the rotary
//! frequencies.
//!
//! LongRoPE during generation: each forward picks its frequencies from its own positions (see
//! [`Phi3`]), and, as transformers' `Phi3ForCausalLM.prepare_inputs_for_generation` does, the decode step at which
//! the sequence first outgrows `original_max_position_embeddings` drops the cache and runs the whole sequence
//! again with the long factors, so that a generated continuation is the one of uncached forwards.

mod config;
mod gguf;

use super::llama::{rotary_heads_attention, AttentionShape};
use super::{
    cached_attention_mask, causal_padding_mask, head_positions, CachedInput, CausalLm, GgufSupport, RawConfig,
};
use crate::error::TchResultExt;
use crate::load::Weights;
use crate::models::batch::Batch;
use crate::nn::{join_path, Activation, Ctx, Embedding, Forward, ForwardState, KvCache, Linear, ModuleList, RmsNorm};
use crate::{Error, Result, Traceable};
pub use config::Phi3Config;
use config::Phi3Rope;
use tch::{Device, Kind, Tensor};

/// The MLP (`Phi3MLP`): `down_proj(up * activation_fn(gate))`, where `gate` and `up` are the two halves of
/// `gate_up_proj`'s output (`[batch, seq, 2 * intermediate]`, gate first).
#[derive(Debug, Traceable)]
#[traceable(kind = "Phi3MLP")]
pub struct Phi3Mlp {
    #[traceable(path)]
    path: String,
    /// Fused gate and up projection `[2 * intermediate, hidden]`.
    pub gate_up_proj: Linear,
    /// Down projection `[hidden, intermediate]`.
    pub down_proj: Linear,
    /// The activation (`hidden_act`, SiLU) applied to the gate half.
    pub activation_fn: Activation,
}

impl Phi3Mlp {
    fn load(w: &mut Weights, path: &str, c: &Phi3Config) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let act = c.activation().ok_or_else(|| Error::config(w.source(), "unsupported hidden_act"))?;
        Ok(Phi3Mlp {
            path: path.to_string(),
            gate_up_proj: Linear::load(w, &join_path(path, "gate_up_proj"), h, 2 * i, false)?,
            down_proj: Linear::load(w, &join_path(path, "down_proj"), i, h, false)?,
            activation_fn: Activation::new(&join_path(path, "activation_fn"), act),
        })
    }
}

impl Forward for Phi3Mlp {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        let p = self.path.as_str();
        let fused = cx.call(&self.gate_up_proj, x)?;
        let halves = fused.f_chunk(2, -1).at(p)?;
        let [gate, up] = <[Tensor; 2]>::try_from(halves).map_err(|parts| Error::InvalidInput {
            message: format!("{p}: gate_up_proj's output splits into {} parts, not 2", parts.len()),
        })?;
        let gate = cx.call(&self.activation_fn, &gate)?;
        cx.call(&self.down_proj, &up.f_mul(&gate).at(p)?)
    }
}

/// Grouped-query attention with a fused q/k/v projection (`Phi3Attention`): `qkv_proj`'s output
/// `[batch, seq, (heads + 2 * kv_heads) * head_dim]` holds all the queries, then all the keys, then all the
/// values; each is split into heads and the attention runs as Llama's ([`LlamaAttention`](super::llama::LlamaAttention)),
/// with partial rotary embeddings when `partial_rotary_factor` < 1 (the first part of each query and key head is
/// rotated, the rest passes through) and the forward state's sliding-window mask.
///
/// Inner points, read and written like module outputs (`model.model.layers[0].self_attn.probs.output`), with
/// Llama's shapes and guarantees:
/// - `query`: the queries after rotary embedding, `[batch, heads, seq, head_dim]`;
/// - `key`: the keys after rotary embedding, `[batch, kv_heads, seq, head_dim]`; in a cached forward this
///   forward's new keys only, and what it holds goes into the KV cache;
/// - `probs`: the attention probabilities `[batch, heads, q, k]` (softmax in float32, then the model's dtype;
///   zero above the diagonal, on padding and outside the window);
/// - `head_output`: each head's output before `o_proj`, `[batch, seq, heads, head_dim]`.
///
/// When nothing reads or writes them, the fused `scaled_dot_product_attention` runs; when something does, the
/// attention is computed step by step on the values the points hold.
#[derive(Debug, Traceable)]
#[traceable(kind = "Phi3Attention", points(query, key, probs, head_output))]
pub struct Phi3Attention {
    #[traceable(path)]
    path: String,
    /// Fused q/k/v projection `[(heads + 2 * kv_heads) * head_dim, hidden]`.
    pub qkv_proj: Linear,
    /// Output projection `[hidden, heads * head_dim]`.
    pub o_proj: Linear,
    #[traceable(skip)]
    shape: AttentionShape,
    /// Query heads, key/value heads, head width.
    #[traceable(skip)]
    sizes: [i64; 3],
}

impl Phi3Attention {
    fn load(w: &mut Weights, path: &str, c: &Phi3Config, layer: usize) -> Result<Self> {
        let (h, hd, nq, nkv) = (c.hidden_size, c.head_dim(), c.num_attention_heads, c.kv_heads());
        Ok(Phi3Attention {
            path: path.to_string(),
            qkv_proj: Linear::load(w, &join_path(path, "qkv_proj"), h, (nq + 2 * nkv) * hd, false)?,
            o_proj: Linear::load(w, &join_path(path, "o_proj"), nq * hd, h, false)?,
            shape: AttentionShape::new(nq, nkv, hd, layer),
            sizes: [nq, nkv, hd],
        })
    }
}

impl Forward for Phi3Attention {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        let p = self.path.as_str();
        let [nq, nkv, hd] = self.sizes;
        let (b, s, _) = x.size3().at(p)?; // [batch, seq, hidden], else an error naming the module
        let qkv = cx.call(&self.qkv_proj, x)?;
        let heads =
            |start: i64, n: i64| qkv.f_narrow(-1, start * hd, n * hd).and_then(|t| t.f_view([b, s, n, hd])).at(p);
        let (q, k, v) = (heads(0, nq)?, heads(nq, nkv)?, heads(nq + nkv, nkv)?);
        rotary_heads_attention(cx, p, self.shape, [q, k, v], &self.o_proj, None)
    }
}

/// One decoder layer (`Phi3DecoderLayer`): pre-norm attention and pre-norm MLP, each added to the residual stream
/// (transformers' `resid_attn_dropout` and `resid_mlp_dropout` are identities at inference and not modules here).
#[derive(Debug, Traceable)]
#[traceable(kind = "Phi3DecoderLayer")]
pub struct Phi3DecoderLayer {
    #[traceable(path)]
    path: String,
    /// Attention.
    pub self_attn: Phi3Attention,
    /// MLP.
    pub mlp: Phi3Mlp,
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
}

impl Phi3DecoderLayer {
    fn load(w: &mut Weights, path: &str, c: &Phi3Config, layer: usize) -> Result<Self> {
        let norm =
            |w: &mut Weights, name: &str| RmsNorm::load(w, &join_path(path, name), c.hidden_size, c.rms_norm_eps);
        Ok(Phi3DecoderLayer {
            path: path.to_string(),
            self_attn: Phi3Attention::load(w, &join_path(path, "self_attn"), c, layer)?,
            mlp: Phi3Mlp::load(w, &join_path(path, "mlp"), c)?,
            input_layernorm: norm(w, "input_layernorm")?,
            post_attention_layernorm: norm(w, "post_attention_layernorm")?,
        })
    }
}

impl Forward for Phi3DecoderLayer {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        let p = self.path.as_str();
        let h = cx.call(&self.input_layernorm, x)?;
        let h = cx.call(&self.self_attn, &h)?;
        let x = x.f_add(&h).at(p)?;
        let h = cx.call(&self.post_attention_layernorm, &x)?;
        let h = cx.call(&self.mlp, &h)?;
        x.f_add(&h).at(p)
    }
}

/// The decoder stack (`Phi3Model`): token ids in, final-norm hidden states out.
#[derive(Debug, Traceable)]
#[traceable(kind = "Phi3Model")]
pub struct Phi3Model {
    #[traceable(path)]
    path: String,
    /// Token embeddings `[vocab, hidden]`.
    pub embed_tokens: Embedding,
    /// Decoder layers.
    pub layers: ModuleList<Phi3DecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
}

impl Forward for Phi3Model {
    fn forward(&self, cx: &mut Ctx<'_>, ids: &Tensor) -> Result<Tensor> {
        let mut h = cx.call(&self.embed_tokens, ids)?;
        for layer in &self.layers {
            h = cx.call(layer, &h)?;
        }
        cx.call(&self.norm, &h)
    }
}

/// `Phi3ForCausalLM`: the decoder stack and the language-model head.
///
/// With LongRoPE, a forward rotates with the short factors while its longest position (over the batch) is
/// within `original_max_position_embeddings`, with the long ones beyond (transformers' rule: a left-padded batch
/// follows its longest row, so a short row batched with a long one may rotate otherwise than alone). In
/// generation, the decode step whose sequence (the padded batch, as transformers counts it) first outgrows
/// `original_max_position_embeddings` is not a one-token step over the cache: the whole sequence so far runs
/// again without a cache, as transformers' `prepare_inputs_for_generation` does, so that every cached key uses
/// the long factors from then on; an intervention on that step sees the whole sequence.
#[derive(Debug, Traceable)]
#[traceable(kind = "Phi3ForCausalLM")]
pub struct Phi3 {
    #[traceable(path)]
    path: String,
    /// The decoder stack (`model.*` in the state dict).
    pub model: Phi3Model,
    /// The head `[vocab, hidden]` (the embedding matrix when tied).
    pub lm_head: Linear,
    #[traceable(skip)]
    config: Phi3Config,
    #[traceable(skip)]
    rope: Phi3Rope,
}

impl Phi3 {
    /// The configuration.
    pub fn config(&self) -> &Phi3Config {
        &self.config
    }

    /// Whether a forward over `position_ids` `[batch, seq]` rotates with LongRoPE's long factors.
    pub fn uses_long_factors(&self, position_ids: &Tensor) -> Result<bool> {
        self.rope.uses_long(position_ids)
    }

    fn state(&self, mask: Option<Tensor>, position_ids: &Tensor) -> Result<ForwardState> {
        Ok(ForwardState {
            attention_mask: mask,
            position_ids: Some(position_ids.shallow_clone()),
            rotary: Some(self.rope.tables(position_ids, self.dtype())?),
            ..ForwardState::default()
        })
    }
}

impl Forward for Phi3 {
    fn forward(&self, cx: &mut Ctx<'_>, ids: &Tensor) -> Result<Tensor> {
        let h = cx.call(&self.model, ids)?;
        let h = head_positions(cx, &self.path, h)?;
        cx.call(&self.lm_head, &h)
    }
}

impl CausalLm for Phi3 {
    const ARCHITECTURE: &'static str = "phi3";

    fn from_config(raw: &RawConfig, w: &mut Weights) -> Result<Self> {
        let c: Phi3Config = raw.parse()?;
        c.validate(&raw.source)?;
        let embed_tokens = Embedding::load(w, "model.embed_tokens", c.vocab_size, c.hidden_size)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| Phi3DecoderLayer::load(w, &format!("model.layers.{i}"), &c, i as usize))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(w, "model.norm", c.hidden_size, c.rms_norm_eps)?;
        let lm_head = if c.tie_word_embeddings && !w.contains("lm_head.weight") {
            Linear::from_tensors("lm_head", embed_tokens.weight.shallow_clone(), None)
        } else {
            Linear::load(w, "lm_head", c.hidden_size, c.vocab_size, false)?
        };
        let rope = Phi3Rope::new(&c, w)?;
        let model =
            Phi3Model { path: "model".into(), embed_tokens, layers: ModuleList::new("model.layers", layers), norm };
        Ok(Phi3 { path: String::new(), model, lm_head, config: c, rope })
    }

    fn prepare(&self, batch: &Batch) -> Result<ForwardState> {
        let mask = causal_padding_mask(batch, self.dtype(), self.config.sliding_window)?;
        self.state(mask, &batch.position_ids)
    }

    fn cache_layers(&self) -> usize {
        self.model.layers.len()
    }

    fn standard_names(&self) -> super::StandardNames {
        super::StandardNames::llama_layout(self.model.layers.len())
    }

    fn prepare_cached(&self, input: &CachedInput, kv: KvCache) -> Result<ForwardState> {
        let mask = cached_attention_mask(input, self.dtype(), self.config.sliding_window)?;
        let mut state = self.state(mask, &input.position_ids)?;
        state.kv = Some(kv);
        state.last_logits_only = input.last_logits_only;
        Ok(state)
    }

    fn recompute_cache_at(&self) -> Option<i64> {
        self.rope.switch_length()
    }

    fn vocab_size(&self) -> i64 {
        self.config.vocab_size
    }

    fn dtype(&self) -> Kind {
        self.lm_head.weight.kind()
    }

    fn to_device(&mut self, device: Device, kind: Kind) -> Result<()> {
        super::move_params(self, device, kind)?;
        self.rope.move_to(device)
    }
}

inventory::submit! {
    super::Architecture {
        name: "phi3",
        model_types: &["phi3"],
        hf_class: "Phi3ForCausalLM",
        build: super::build_boxed::<Phi3>,
        gguf: Some(GgufSupport {
            architectures: &["phi3"],
            config: gguf::gguf_config,
            tensor_name: gguf::gguf_tensor_name,
            // llama.cpp rotates Phi-3 the NeoX way: its converter permutes no rows.
            fix_tensor: super::llama::gguf_keep_tensor,
        }),
    }
}
