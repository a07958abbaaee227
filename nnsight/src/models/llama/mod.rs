//! The Llama family (Llama 2 and 3, Mistral, SmolLM2): RMSNorm, rotary position embeddings (with Llama 3
//! frequency scaling), grouped-query attention, a SwiGLU MLP, tied or separate `lm_head`, optional biases.
//!
//! Paper: Touvron et al., *LLaMA: Open and Efficient Foundation Language Models* (2023),
//! <https://arxiv.org/abs/2302.13971>. Reference implementation: Hugging Face transformers'
//! `models/llama/modeling_llama.py`, whose module names and nesting this file mirrors, so that
//! `model.layers.5.mlp.down_proj` here is the same module as there.
//!
//! Its MLP, attention and decoder stack ([`decoder_stack!`](self), in `stack.rs`) also build the families that
//! share Llama's layout: Qwen2 ([`super::qwen2`]) and Qwen3 ([`super::qwen3`]).

mod gguf;
mod stack;

use super::rope::apply_rotary;
pub use super::rope::RopeScaling;
use super::{append_kv, explicit_attention, GgufSupport, RawConfig, Scoring, ATTENTION_POINTS};
use crate::error::TchResultExt;
use crate::load::Weights;
use crate::nn::{join_path, Activation, ActivationFn, Ctx, Forward, Linear};
use crate::{Error, Result, Traceable};
pub(crate) use gguf::{gguf_config_for, gguf_keep_tensor, gguf_tensor_name};
use serde::{Deserialize, Serialize};
pub(crate) use stack::{
    decoder_stack, load_head, prepare, prepare_cached, prepare_cached_with, prepare_with, StackConfig,
};
use tch::Tensor;

/// A Llama-family `config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Width of the residual stream.
    pub hidden_size: i64,
    /// Width of the MLP.
    pub intermediate_size: i64,
    /// Number of decoder layers.
    pub num_hidden_layers: i64,
    /// Number of query heads.
    pub num_attention_heads: i64,
    /// Number of key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    /// Width of one head; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<i64>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Base of the rotary frequencies (older config.json files).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Rotary scaling (older config.json files).
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Rotary settings (transformers 5).
    #[serde(default)]
    pub rope_parameters: Option<RopeScaling>,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v and o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Activation of the MLP (only `silu` is supported).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Longest context the model was trained for.
    #[serde(default)]
    pub max_position_embeddings: Option<i64>,
    /// Beginning-of-sequence token id.
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    /// End-of-sequence token id(s).
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    /// Padding token id.
    #[serde(default)]
    pub pad_token_id: Option<serde_json::Value>,
    /// Mistral: each query attends to at most this many keys (itself included).
    #[serde(default)]
    pub sliding_window: Option<i64>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}

impl LlamaConfig {
    pub(crate) fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    /// `head_dim`, else `hidden_size / num_attention_heads` (0 when there are no heads: [`LlamaConfig::validate`]
    /// then names `num_attention_heads`).
    pub(crate) fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or_else(|| self.hidden_size.checked_div(self.num_attention_heads).unwrap_or(0))
    }
    pub(crate) fn scaling(&self) -> Option<&RopeScaling> {
        self.rope_scaling.as_ref().or(self.rope_parameters.as_ref())
    }
    pub(crate) fn theta(&self) -> f64 {
        self.rope_theta.or_else(|| self.rope_parameters.as_ref().and_then(|r| r.rope_theta)).unwrap_or(10000.0)
    }

    pub(crate) fn validate(&self, source: &std::path::Path) -> Result<()> {
        let bad = |m: String| Err(Error::config(source, m));
        if self.hidden_act != "silu" {
            return bad(format!("hidden_act `{}` is not supported (supported: silu)", self.hidden_act));
        }
        super::check_sizes(
            source,
            [
                self.vocab_size,
                self.hidden_size,
                self.intermediate_size,
                self.num_hidden_layers,
                self.num_attention_heads,
                self.kv_heads(),
                self.head_dim(),
            ],
        )?;
        if let Some(s) = self.scaling() {
            s.validate(source)?;
        }
        Ok(())
    }
}

impl StackConfig for LlamaConfig {
    fn from_raw(raw: &RawConfig) -> Result<Self> {
        let c: LlamaConfig = raw.parse()?;
        c.validate(&raw.source)?;
        Ok(c)
    }
    fn llama(&self) -> &LlamaConfig {
        self
    }
    fn window(&self) -> Option<i64> {
        self.sliding_window
    }
}

/// The SwiGLU MLP: `down_proj(silu(gate_proj(x)) * up_proj(x))` (`LlamaMLP`, and the same module of the families
/// that share Llama's stack, under their class name: `Qwen2MLP`, `Qwen3MLP`).
#[derive(Debug, Traceable)]
#[traceable(kind_fn = "kind_name")]
pub struct LlamaMlp {
    #[traceable(path)]
    path: String,
    /// Gate projection `[intermediate, hidden]`.
    pub gate_proj: Linear,
    /// Up projection `[intermediate, hidden]`.
    pub up_proj: Linear,
    /// Down projection `[hidden, intermediate]`.
    pub down_proj: Linear,
    /// The activation (SiLU) applied to the gate.
    pub act_fn: Activation,
    #[traceable(skip)]
    kind: &'static str,
}

impl LlamaMlp {
    fn kind_name(&self) -> &'static str {
        self.kind
    }

    /// Loads the MLP at `path`, printed as `kind` in the module tree.
    pub(crate) fn load(w: &mut Weights, path: &str, c: &LlamaConfig, kind: &'static str) -> Result<Self> {
        Self::load_gated(w, path, (c.hidden_size, c.intermediate_size, c.mlp_bias), ActivationFn::Silu, kind)
    }

    /// Loads a gated MLP at `path` of `(hidden, intermediate, bias)` sizes whose gate goes through `act` (SiLU for
    /// SwiGLU, the tanh GELU for Gemma's GeGLU), printed as `kind` in the module tree.
    pub(crate) fn load_gated(
        w: &mut Weights,
        path: &str,
        (h, i, b): (i64, i64, bool),
        act: ActivationFn,
        kind: &'static str,
    ) -> Result<Self> {
        Ok(LlamaMlp {
            path: path.to_string(),
            gate_proj: Linear::load(w, &join_path(path, "gate_proj"), h, i, b)?,
            up_proj: Linear::load(w, &join_path(path, "up_proj"), h, i, b)?,
            down_proj: Linear::load(w, &join_path(path, "down_proj"), i, h, b)?,
            act_fn: Activation::new(&join_path(path, "act_fn"), act),
            kind,
        })
    }
}

impl Forward for LlamaMlp {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        let gate = cx.call(&self.gate_proj, x)?;
        let gate = cx.call(&self.act_fn, &gate)?;
        let up = cx.call(&self.up_proj, x)?;
        cx.call(&self.down_proj, &gate.f_mul(&up).at(&self.path)?)
    }
}

/// The sizes of a rotary attention layer and its KV-cache slot, and how it scores and which mask and rotary
/// tables it takes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionShape {
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    /// Index of the decoder layer (its KV-cache slot).
    layer: usize,
    /// Factor of q·kᵀ; `None`: `head_dim^-0.5`.
    scale: Option<f64>,
    /// Soft cap of the scores (Gemma 2); forces the explicit attention.
    softcap: Option<f64>,
    /// The layer slides: it takes the sliding-window mask and rotary tables of the forward state.
    sliding: bool,
    /// The q/k norms run on `[batch, heads, seq, head_dim]` (Gemma 3's order) instead of
    /// `[batch, seq, heads, head_dim]` (Qwen3's).
    norm_after_transpose: bool,
}

impl AttentionShape {
    /// `heads` query heads and `kv_heads` key/value heads of `head_dim` values, in KV-cache slot `layer` (scale
    /// `head_dim^-0.5`, no cap, full attention).
    pub(crate) fn new(heads: i64, kv_heads: i64, head_dim: i64, layer: usize) -> Self {
        AttentionShape {
            heads,
            kv_heads,
            head_dim,
            layer,
            scale: None,
            softcap: None,
            sliding: false,
            norm_after_transpose: false,
        }
    }

    /// Layer `layer`'s shape under `c` (sliding when `c` has a window), with its four projections loaded from
    /// `path` (`q_proj`, `k_proj` and `v_proj` with biases when `qkv_bias`, `o_proj` when `o_bias`).
    pub(crate) fn load(
        w: &mut Weights,
        path: &str,
        c: &LlamaConfig,
        layer: usize,
        biases: (bool, bool),
    ) -> Result<(Self, [Linear; 4])> {
        let sizes = [c.hidden_size, c.num_attention_heads, c.kv_heads(), c.head_dim()];
        let (shape, projections) = Self::load_sized(w, path, sizes, layer, biases)?;
        Ok((shape.with_sliding(c.sliding_window.is_some()), projections))
    }

    /// Layer `layer`'s shape of `[hidden, heads, kv_heads, head_dim]` sizes (scale `head_dim^-0.5`, no cap, full
    /// attention), with its four projections loaded from `path` as in [`AttentionShape::load`].
    pub(crate) fn load_sized(
        w: &mut Weights,
        path: &str,
        [h, nq, nkv, hd]: [i64; 4],
        layer: usize,
        (qkv_bias, o_bias): (bool, bool),
    ) -> Result<(Self, [Linear; 4])> {
        let projections = [
            Linear::load(w, &join_path(path, "q_proj"), h, nq * hd, qkv_bias)?,
            Linear::load(w, &join_path(path, "k_proj"), h, nkv * hd, qkv_bias)?,
            Linear::load(w, &join_path(path, "v_proj"), h, nkv * hd, qkv_bias)?,
            Linear::load(w, &join_path(path, "o_proj"), nq * hd, h, o_bias)?,
        ];
        Ok((AttentionShape::new(nq, nkv, hd, layer), projections))
    }

    /// The same layer, sliding (the sliding-window mask and rotary tables) or not.
    pub(crate) fn with_sliding(self, sliding: bool) -> Self {
        AttentionShape { sliding, ..self }
    }

    /// The same layer, scoring with `scale` and soft-capping at `softcap`, its q/k norms (if any) after the
    /// transpose to `[batch, heads, seq, head_dim]` when `norm_after_transpose` (Gemma's choices).
    pub(crate) fn with_scoring(self, scale: f64, softcap: Option<f64>, norm_after_transpose: bool) -> Self {
        AttentionShape { scale: Some(scale), softcap, norm_after_transpose, ..self }
    }
}

/// Grouped-query attention with rotary position embeddings over `x` `[batch, seq, hidden]`, for the attention
/// module at `p` with projections `[q, k, v, o]`: queries, keys and values are split into heads
/// `[batch, seq, n, head_dim]` (with `qk_norm`, Qwen3's and Gemma 3's, normalizing each query and key head right
/// after its projection, in transformers' call order, before or after the transpose as `shape` says), rotated with
/// the forward state's tables for the layer's kind, then attended over with the fused
/// `scaled_dot_product_attention`, or, when something reads or writes the inner points or the scores are
/// soft-capped, with [`explicit_attention`](crate::models::explicit_attention) on the values the points hold. Both
/// paths take the mask of the layer's kind (sliding or full) and append to the forward state's KV cache, if any.
pub(crate) fn rotary_attention(
    cx: &mut Ctx<'_>,
    p: &str,
    x: &Tensor,
    shape: AttentionShape,
    [q_proj, k_proj, v_proj, o_proj]: [&Linear; 4],
    qk_norm: Option<[&dyn Forward; 2]>,
) -> Result<Tensor> {
    let AttentionShape { heads, kv_heads, head_dim, norm_after_transpose, .. } = shape;
    let (b, s, _) = x.size3().at(p)?; // [batch, seq, hidden], else an error naming the module
    let split = |t: Tensor, n: i64| t.f_view([b, s, n, head_dim]).at(p);
    let (norm_before, norm_after) = if norm_after_transpose { (None, qk_norm) } else { (qk_norm, None) };
    let mut q = split(cx.call(q_proj, x)?, heads)?;
    if let Some([q_norm, _]) = norm_before {
        q = cx.call(q_norm, &q)?;
    }
    let mut k = split(cx.call(k_proj, x)?, kv_heads)?;
    if let Some([_, k_norm]) = norm_before {
        k = cx.call(k_norm, &k)?;
    }
    let v = split(cx.call(v_proj, x)?, kv_heads)?;
    rotary_heads_attention(cx, p, shape, [q, k, v], o_proj, norm_after)
}

/// [`rotary_attention`] from the point where queries, keys and values are split into heads, `[batch, seq, heads,
/// head_dim]` (`kv_heads` for keys and values): what an attention with a fused projection (Phi-3's `qkv_proj`)
/// runs after splitting its output. Transposes to `[batch, heads, seq, head_dim]`, applies `norm_after` (q/k
/// norms in Gemma 3's order) there, rotates, attends (fused, or explicit with the inner points or a soft cap),
/// appends to the KV cache and calls `o_proj`.
pub(crate) fn rotary_heads_attention(
    cx: &mut Ctx<'_>,
    p: &str,
    shape: AttentionShape,
    [q, k, v]: [Tensor; 3],
    o_proj: &Linear,
    norm_after: Option<[&dyn Forward; 2]>,
) -> Result<Tensor> {
    let AttentionShape { heads, kv_heads, head_dim, layer, scale, softcap, sliding, .. } = shape;
    let (b, s, _, _) = q.size4().at(p)?;
    let (mut q, mut k, v) = (q.f_transpose(1, 2).at(p)?, k.f_transpose(1, 2).at(p)?, v.f_transpose(1, 2).at(p)?);
    if let Some([q_norm, k_norm]) = norm_after {
        q = cx.call(q_norm, &q)?;
        k = cx.call(k_norm, &k)?;
    }
    let (cos, sin) = cx
        .state
        .rotary_tables(sliding)
        .ok_or_else(|| Error::InvalidInput { message: format!("{p}: no rotary tables in the forward state") })?;
    let cos = cos.f_unsqueeze(1).at(p)?;
    let sin = sin.f_unsqueeze(1).at(p)?;
    let q = apply_rotary(&q, &cos, &sin).at(p)?;
    let k = apply_rotary(&k, &cos, &sin).at(p)?;
    if softcap.is_some() || cx.wants_points(p, &ATTENTION_POINTS) {
        let scoring = Scoring { scale: scale.unwrap_or(1.0 / (head_dim as f64).sqrt()), softcap, sliding };
        let out = explicit_attention(cx, p, layer, q, k, &v, scoring)?;
        return cx.call(o_proj, &out);
    }
    let (k, v) = append_kv(cx, p, layer, k, v)?;
    let mask = cx.state.mask(sliding);
    let gqa = heads != kv_heads;
    let out =
        Tensor::f_scaled_dot_product_attention(&q, &k, &v, mask, 0.0, mask.is_none() && s > 1, scale, gqa).at(p)?;
    let out = out.f_transpose(1, 2).at(p)?.f_reshape([b, s, heads * head_dim]).at(p)?;
    cx.call(o_proj, &out)
}

/// Multi-head attention with grouped key/value heads and rotary position embeddings (`LlamaAttention`; Qwen2's
/// `Qwen2Attention` is the same module with biases on q, k and v only).
///
/// Inner points, read and written like module outputs (`model.model.layers[0].self_attn.probs.output`):
/// - `query`: the queries after rotary embedding, `[batch, heads, seq, head_dim]`;
/// - `key`: the keys after rotary embedding, `[batch, kv_heads, seq, head_dim]` (before groups of query heads
///   share them). In a cached forward (generation) it holds this forward's new keys only (`seq` = 1 at a decode
///   step), and what it holds goes into the KV cache, so a write persists into later steps;
/// - `probs`: the attention probabilities `[batch, heads, q, k]` (softmax in float32, then the model's dtype;
///   each row sums to 1, zero above the diagonal and on padding); in a cached forward `k` counts every cached
///   key (past + q);
/// - `head_output`: each head's output before `o_proj`, `[batch, seq, heads, head_dim]`.
///
/// When nothing reads or writes them, the fused `scaled_dot_product_attention` runs; when something does, the
/// attention is computed step by step and uses the values the points hold (a write changes the output). Both
/// paths append to the forward state's KV cache, if any, in slot `layer`.
#[derive(Debug, Traceable)]
#[traceable(kind_fn = "kind_name", points(query, key, probs, head_output))]
pub struct LlamaAttention {
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
    #[traceable(skip)]
    kind: &'static str,
}

impl LlamaAttention {
    fn kind_name(&self) -> &'static str {
        self.kind
    }

    /// Loads layer `layer`'s attention at `path`, printed as `kind` in the module tree, with biases on q, k and v
    /// when `biases.0`, on o when `biases.1`; sliding when `c` has a window (see [`LlamaAttention::with_sliding`]).
    pub(crate) fn load(
        w: &mut Weights,
        path: &str,
        c: &LlamaConfig,
        layer: usize,
        kind: &'static str,
        biases: (bool, bool),
    ) -> Result<Self> {
        let (shape, [q_proj, k_proj, v_proj, o_proj]) = AttentionShape::load(w, path, c, layer, biases)?;
        Ok(LlamaAttention { path: path.to_string(), q_proj, k_proj, v_proj, o_proj, shape, kind })
    }

    /// The same attention, sliding (the forward state's sliding-window mask) or attending to every earlier key.
    pub(crate) fn with_sliding(self, sliding: bool) -> Self {
        LlamaAttention { shape: self.shape.with_sliding(sliding), ..self }
    }
}

impl Forward for LlamaAttention {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        let projections = [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj];
        rotary_attention(cx, &self.path, x, self.shape, projections, None)
    }
}

/// Llama's attention: biases on all four projections when `attention_bias`.
fn llama_attention(w: &mut Weights, path: &str, c: &LlamaConfig, layer: usize) -> Result<LlamaAttention> {
    LlamaAttention::load(w, path, c, layer, "LlamaAttention", (c.attention_bias, c.attention_bias))
}

decoder_stack! {
    /// `LlamaForCausalLM`: the decoder stack and the language-model head.
    root: Llama = "LlamaForCausalLM", architecture "llama",
    model: LlamaModel = "LlamaModel",
    layer: LlamaDecoderLayer = "LlamaDecoderLayer",
    attention: LlamaAttention = llama_attention,
    mlp: "LlamaMLP",
    config: LlamaConfig,
}

inventory::submit! {
    super::Architecture {
        name: "llama",
        model_types: &["llama", "mistral"],
        hf_class: "LlamaForCausalLM",
        build: super::build_boxed::<Llama>,
        gguf: Some(GgufSupport {
            architectures: &["llama"],
            config: gguf::gguf_config,
            tensor_name: gguf::gguf_tensor_name,
            fix_tensor: gguf::gguf_fix_tensor,
        }),
    }
}
