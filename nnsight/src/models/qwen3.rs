//! Qwen3 (the dense models): Qwen2's layout with an RMSNorm on each query and key head (`q_norm`, `k_norm`, over
//! `head_dim`, before the rotary embedding), biases on the attention projections only when `attention_bias`, and
//! `head_dim` from the config (not `hidden_size / heads`).
//!
//! Paper: Qwen Team, *Qwen3 Technical Report* (2025), <https://arxiv.org/abs/2505.09388>. Reference
//! implementation: Hugging Face transformers' `models/qwen3/modeling_qwen3.py`, whose module names and nesting this
//! file mirrors (`model.layers.5.self_attn.q_norm`), built from the decoder stack Llama's file writes; the
//! configuration is Qwen2's ([`QwenConfig`]).

use super::llama::{
    decoder_stack, gguf_config_for, gguf_keep_tensor, gguf_tensor_name, rotary_attention, AttentionShape,
};
pub use super::qwen2::QwenConfig;
use super::GgufSupport;
use crate::load::gguf::GgufFile;
use crate::load::Weights;
use crate::nn::{join_path, Ctx, Forward, Linear, RmsNorm};
use crate::{Result, Traceable};
use tch::Tensor;

/// Qwen3's attention: grouped-query attention with rotary position embeddings, each query and key head
/// RMS-normalized (`q_norm`, `k_norm`, weights `[head_dim]`) right after its projection. Their input and output are
/// `[batch, seq, heads, head_dim]` (`kv_heads` for `k_norm`), as in transformers.
///
/// Inner points (`query`, `key`, `probs`, `head_output`): those of [`LlamaAttention`](super::llama::LlamaAttention),
/// with the same shapes and guarantees (`query` and `key` after the norms and the rotation; the fused attention when
/// nothing reads or writes them, the explicit one on the values they hold when something does; the keys a point
/// holds go into the KV cache).
#[derive(Debug, Traceable)]
#[traceable(kind = "Qwen3Attention", points(query, key, probs, head_output))]
pub struct Qwen3Attention {
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
    pub q_norm: RmsNorm,
    /// RMSNorm of each key head.
    pub k_norm: RmsNorm,
    #[traceable(skip)]
    shape: AttentionShape,
}

impl Qwen3Attention {
    fn load(w: &mut Weights, path: &str, c: &QwenConfig, layer: usize) -> Result<Self> {
        let l = &c.llama;
        let bias = (l.attention_bias, l.attention_bias);
        let (shape, [q_proj, k_proj, v_proj, o_proj]) = AttentionShape::load(w, path, l, layer, bias)?;
        let shape = shape.with_sliding(c.is_sliding(layer));
        let norm = |w: &mut Weights, name: &str| RmsNorm::load(w, &join_path(path, name), l.head_dim(), l.rms_norm_eps);
        Ok(Qwen3Attention {
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

impl Forward for Qwen3Attention {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        let projections = [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj];
        rotary_attention(cx, &self.path, x, self.shape, projections, Some([&self.q_norm, &self.k_norm]))
    }
}

decoder_stack! {
    /// `Qwen3ForCausalLM`: the decoder stack and the language-model head.
    root: Qwen3 = "Qwen3ForCausalLM", architecture "qwen3",
    model: Qwen3Model = "Qwen3Model",
    layer: Qwen3DecoderLayer = "Qwen3DecoderLayer",
    attention: Qwen3Attention = Qwen3Attention::load,
    mlp: "Qwen3MLP",
    config: QwenConfig,
}

fn gguf_config(f: &GgufFile) -> Result<serde_json::Value> {
    gguf_config_for(f, "qwen3", "Qwen3ForCausalLM")
}

inventory::submit! {
    super::Architecture {
        name: "qwen3",
        model_types: &["qwen3"],
        hf_class: "Qwen3ForCausalLM",
        build: super::build_boxed::<Qwen3>,
        gguf: Some(GgufSupport {
            architectures: &["qwen3"],
            config: gguf_config,
            tensor_name: gguf_tensor_name,
            fix_tensor: gguf_keep_tensor,
        }),
    }
}
