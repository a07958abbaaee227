//! Gemma 2: RMSNorms that scale by `1 + weight` in float32, embeddings scaled by `sqrt(hidden_size)`, a GeGLU MLP
//! (tanh-approximate GELU on the gate), a pre-norm and a post-norm around both attention and MLP, attention scores
//! scaled by `query_pre_attn_scalar^-0.5` and soft-capped (`tanh(s / cap) * cap`, before the mask), local
//! sliding-window and global layers alternating (`layer_types`), a final soft cap on the logits, and a head tied to
//! the embeddings. Its pieces also build Gemma 3 ([`super::gemma3`]).
//!
//! Paper: Gemma Team, *Gemma 2: Improving Open Language Models at a Practical Size* (2024),
//! <https://arxiv.org/abs/2408.00118>. Reference implementation: Hugging Face transformers'
//! `models/gemma2/modeling_gemma2.py` and `configuration_gemma2.py`, whose module names and nesting this file
//! mirrors (`model.layers.5.pre_feedforward_layernorm`, `model.embed_tokens` scaled inside the module).

mod config;
mod gguf;
mod layers;
mod stack;

pub use config::{GemmaConfig, GemmaFamily};
pub(crate) use gguf::gemma_gguf;
pub use layers::{GemmaRmsNorm, GemmaScaledEmbedding};
pub(crate) use stack::gemma_stack;

use super::llama::{rotary_attention, AttentionShape};
use super::rope::inv_freq;
use crate::error::TchResultExt;
use crate::load::Weights;
use crate::nn::{Ctx, Forward, Linear};
use crate::{Result, Traceable};
use tch::Tensor;

/// `tanh(x / cap) * cap` in transformers' order, or `x` itself without a cap.
pub(crate) fn soft_cap(x: &Tensor, cap: Option<f64>, path: &str) -> Result<Tensor> {
    match cap {
        Some(cap) => x.f_div_scalar(cap).at(path)?.f_tanh().at(path)?.f_mul_scalar(cap).at(path),
        None => Ok(x.shallow_clone()),
    }
}

/// The inverse rotary frequencies of the global layers and, for Gemma 3, of the sliding ones, placed as the
/// weights are.
pub(crate) fn inv_freqs(c: &GemmaConfig, w: &mut Weights) -> Result<(Tensor, Option<Tensor>)> {
    let freqs = |r: &crate::models::rope::RopeScaling| inv_freq(c.head_dim(), r.rope_theta.unwrap_or(10000.0), Some(r));
    let global = w.place("model.rotary_emb", freqs(&c.rope_global)?)?;
    let local = match c.family {
        GemmaFamily::Gemma2 => None,
        GemmaFamily::Gemma3 => Some(w.place("model.rotary_emb", freqs(&c.rope_local)?)?),
    };
    Ok((global, local))
}

/// The attention shape of Gemma layer `layer` with its projections: scores scaled by
/// `query_pre_attn_scalar^-0.5` and soft-capped as the family does, sliding where `layer_types` says so, q/k norms
/// (Gemma 3's) after the transpose to `[batch, heads, seq, head_dim]`.
pub(crate) fn gemma_attention_shape(
    w: &mut Weights,
    path: &str,
    c: &GemmaConfig,
    layer: usize,
) -> Result<(AttentionShape, [Linear; 4])> {
    let sizes = [c.hidden_size, c.num_attention_heads, c.kv_heads(), c.head_dim()];
    let bias = (c.attention_bias, c.attention_bias);
    let (shape, projections) = AttentionShape::load_sized(w, path, sizes, layer, bias)?;
    let shape = shape
        .with_scoring(c.query_pre_attn_scalar.powf(-0.5), c.attention_softcap(), true)
        .with_sliding(c.is_sliding(layer));
    Ok((shape, projections))
}

/// Gemma 2's attention (`Gemma2Attention`): grouped-query attention with rotary position embeddings, scores
/// scaled by `query_pre_attn_scalar^-0.5` and soft-capped at `attn_logit_softcapping`, within the sliding window
/// on the local layers.
///
/// Inner points (`query`, `key`, `probs`, `head_output`): those of [`LlamaAttention`](super::llama::LlamaAttention),
/// with the same shapes and guarantees (the probabilities read are the ones used, a write changes what follows,
/// the keys a point holds go into the KV cache). The soft cap rules out the fused attention: this module always
/// computes its attention step by step (soft-capped scores plus the mask, softmax in float32), as transformers'
/// eager attention does.
#[derive(Debug, Traceable)]
#[traceable(kind = "Gemma2Attention", points(query, key, probs, head_output))]
pub struct Gemma2Attention {
    #[traceable(path)]
    path: String,
    /// Query projection `[heads * head_dim, hidden]`.
    pub q_proj: Linear,
    /// Key projection `[kv_heads * head_dim, hidden]`.
    pub k_proj: Linear,
    /// Value projection `[kv_heads * head_dim, hidden]`.
    pub v_proj: Linear,
    /// Output projection `[hidden, heads * head_dim]`.
    pub o_proj: Linear,
    #[traceable(skip)]
    shape: AttentionShape,
}

impl Gemma2Attention {
    fn load(w: &mut Weights, path: &str, c: &GemmaConfig, layer: usize) -> Result<Self> {
        let (shape, [q_proj, k_proj, v_proj, o_proj]) = gemma_attention_shape(w, path, c, layer)?;
        Ok(Gemma2Attention { path: path.to_string(), q_proj, k_proj, v_proj, o_proj, shape })
    }
}

impl Forward for Gemma2Attention {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        let projections = [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj];
        rotary_attention(cx, &self.path, x, self.shape, projections, None)
    }
}

gemma_stack! {
    /// `Gemma2ForCausalLM`: the decoder stack, the tied language-model head and the final soft cap.
    root: Gemma2 = "Gemma2ForCausalLM", architecture "gemma2", family Gemma2,
    model: Gemma2Model = "Gemma2Model",
    layer: Gemma2DecoderLayer = "Gemma2DecoderLayer",
    attention: Gemma2Attention = Gemma2Attention::load,
    mlp: "Gemma2MLP", norm: "Gemma2RMSNorm", embedding: "Gemma2TextScaledWordEmbedding",
}

inventory::submit! {
    super::Architecture {
        name: "gemma2",
        model_types: &["gemma2"],
        hf_class: "Gemma2ForCausalLM",
        build: super::build_boxed::<Gemma2>,
        gguf: Some(gemma_gguf(&["gemma2"])),
    }
}
