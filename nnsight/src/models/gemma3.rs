//! Gemma 3 (the text model, `gemma3_text`): Gemma 2's layout ([`super::gemma2`]) with an RMSNorm on each query
//! and key head (`q_norm`, `k_norm`, Gemma's `1 + weight` norm), rotary bases of its own for the local
//! (sliding-window) and the global layers (`rope_parameters.sliding_attention` / `.full_attention`, or the older
//! `rope_local_base_freq` and `rope_theta` with `rope_scaling` on the global layers), five local layers to a
//! global one by default (`layer_types`, or the older `sliding_window_pattern`), and no attention soft cap: like
//! transformers' Gemma 3, it reads `attn_logit_softcapping` but never applies it. The final soft cap applies when
//! configured.
//!
//! Paper: Gemma Team, *Gemma 3 Technical Report* (2025), <https://arxiv.org/abs/2503.19786>. Reference
//! implementation: Hugging Face transformers' `models/gemma3/modeling_gemma3.py` (`Gemma3ForCausalLM`,
//! `Gemma3TextModel`) and `configuration_gemma3.py` (`Gemma3TextConfig`), whose module names and nesting this file
//! mirrors (`model.layers.5.self_attn.q_norm`).

use super::gemma2::{gemma_attention_shape, gemma_gguf, gemma_stack, GemmaConfig, GemmaRmsNorm};
use super::llama::{rotary_attention, AttentionShape};
use crate::load::Weights;
use crate::nn::{join_path, Ctx, Forward, Linear};
use crate::{Result, Traceable};
use tch::Tensor;

/// Gemma 3's attention (`Gemma3Attention`): Gemma 2's without the soft cap, each query and key head
/// RMS-normalized (`q_norm`, `k_norm`, weights `[head_dim]`) after its projection, on `[batch, heads, seq,
/// head_dim]` (`kv_heads` for `k_norm`) as in transformers, then rotated with the local or the global tables.
///
/// Inner points (`query`, `key`, `probs`, `head_output`): those of [`LlamaAttention`](super::llama::LlamaAttention),
/// with the same shapes and guarantees (`query` and `key` after the norms and the rotation; the fused attention when
/// nothing reads or writes them, the explicit one on the values they hold when something does; the keys a point
/// holds go into the KV cache).
#[derive(Debug, Traceable)]
#[traceable(kind = "Gemma3Attention", points(query, key, probs, head_output))]
pub struct Gemma3Attention {
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
    /// RMSNorm of each query head.
    pub q_norm: GemmaRmsNorm,
    /// RMSNorm of each key head.
    pub k_norm: GemmaRmsNorm,
    #[traceable(skip)]
    shape: AttentionShape,
}

impl Gemma3Attention {
    fn load(w: &mut Weights, path: &str, c: &GemmaConfig, layer: usize) -> Result<Self> {
        let (shape, [q_proj, k_proj, v_proj, o_proj]) = gemma_attention_shape(w, path, c, layer)?;
        let norm = |w: &mut Weights, name: &str| {
            GemmaRmsNorm::load(w, &join_path(path, name), c.head_dim(), c.rms_norm_eps, "Gemma3RMSNorm")
        };
        Ok(Gemma3Attention {
            path: path.to_string(),
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            q_norm: norm(w, "q_norm")?,
            k_norm: norm(w, "k_norm")?,
            shape,
        })
    }
}

impl Forward for Gemma3Attention {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        let projections = [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj];
        rotary_attention(cx, &self.path, x, self.shape, projections, Some([&self.q_norm, &self.k_norm]))
    }
}

gemma_stack! {
    /// `Gemma3ForCausalLM` (text): the decoder stack, the tied language-model head and the final soft cap, if
    /// configured.
    root: Gemma3 = "Gemma3ForCausalLM", architecture "gemma3", family Gemma3,
    model: Gemma3Model = "Gemma3TextModel",
    layer: Gemma3DecoderLayer = "Gemma3DecoderLayer",
    attention: Gemma3Attention = Gemma3Attention::load,
    mlp: "Gemma3MLP", norm: "Gemma3RMSNorm", embedding: "Gemma3TextScaledWordEmbedding",
}

inventory::submit! {
    super::Architecture {
        name: "gemma3",
        model_types: &["gemma3_text"],
        hf_class: "Gemma3ForCausalLM",
        build: super::build_boxed::<Gemma3>,
        gguf: Some(gemma_gguf(&["gemma3"])),
    }
}
