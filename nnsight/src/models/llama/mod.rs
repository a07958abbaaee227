//! The Llama family (Llama 2 and 3, Mistral, SmolLM2): RMSNorm, rotary position embeddings (with Llama 3
//! frequency scaling), grouped-query attention, a SwiGLU MLP, tied or separate `lm_head`, optional biases.
//!
//! Paper: Touvron et al., *LLaMA: Open and Efficient Foundation Language Models* (2023),
//! <https://arxiv.org/abs/2302.13971>. Reference implementation: Hugging Face transformers'
//! `models/llama/modeling_llama.py`, whose module names and nesting this file mirrors, so that
//! `model.layers.5.mlp.down_proj` here is the same module as there.

mod gguf;

pub use super::rope::RopeScaling;
use super::rope::{apply_rotary, inv_freq, rotary_tables};
use super::{
    append_kv, cached_attention_mask, causal_padding_mask, explicit_attention, head_positions, CachedInput, CausalLm,
    GgufSupport, RawConfig, ATTENTION_POINTS,
};
use crate::error::TchResultExt;
use crate::load::Weights;
use crate::models::batch::Batch;
use crate::nn::{
    join_path, Activation, ActivationFn, Ctx, Embedding, Forward, ForwardState, KvCache, Linear, ModuleList, RmsNorm,
};
use crate::{Error, Result, Traceable};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

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
    fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    fn scaling(&self) -> Option<&RopeScaling> {
        self.rope_scaling.as_ref().or(self.rope_parameters.as_ref())
    }
    fn theta(&self) -> f64 {
        self.rope_theta.or_else(|| self.rope_parameters.as_ref().and_then(|r| r.rope_theta)).unwrap_or(10000.0)
    }

    fn validate(&self, source: &std::path::Path) -> Result<()> {
        let bad = |m: String| Err(Error::config(source, m));
        if self.hidden_act != "silu" {
            return bad(format!("hidden_act `{}` is not supported (supported: silu)", self.hidden_act));
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("head_dim", self.head_dim()),
        ] {
            if v <= 0 {
                return bad(format!("`{name}` must be positive, found {v}"));
            }
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if let Some(s) = self.scaling() {
            s.validate(source)?;
        }
        Ok(())
    }
}

/// The SwiGLU MLP: `down_proj(silu(gate_proj(x)) * up_proj(x))`.
#[derive(Debug, Traceable)]
#[traceable(kind = "LlamaMLP")]
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
}

impl LlamaMlp {
    fn load(w: &mut Weights, path: &str, c: &LlamaConfig) -> Result<Self> {
        let (h, i, b) = (c.hidden_size, c.intermediate_size, c.mlp_bias);
        Ok(LlamaMlp {
            path: path.to_string(),
            gate_proj: Linear::load(w, &join_path(path, "gate_proj"), h, i, b)?,
            up_proj: Linear::load(w, &join_path(path, "up_proj"), h, i, b)?,
            down_proj: Linear::load(w, &join_path(path, "down_proj"), i, h, b)?,
            act_fn: Activation::new(&join_path(path, "act_fn"), ActivationFn::Silu),
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

/// Multi-head attention with grouped key/value heads and rotary position embeddings.
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
#[traceable(kind = "LlamaAttention", points(query, key, probs, head_output))]
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
    heads: i64,
    #[traceable(skip)]
    kv_heads: i64,
    #[traceable(skip)]
    head_dim: i64,
    /// Index of the decoder layer (its KV-cache slot).
    #[traceable(skip)]
    layer: usize,
}

impl LlamaAttention {
    fn load(w: &mut Weights, path: &str, c: &LlamaConfig, layer: usize) -> Result<Self> {
        let (h, hd, b) = (c.hidden_size, c.head_dim(), c.attention_bias);
        let (nq, nkv) = (c.num_attention_heads, c.kv_heads());
        Ok(LlamaAttention {
            path: path.to_string(),
            q_proj: Linear::load(w, &join_path(path, "q_proj"), h, nq * hd, b)?,
            k_proj: Linear::load(w, &join_path(path, "k_proj"), h, nkv * hd, b)?,
            v_proj: Linear::load(w, &join_path(path, "v_proj"), h, nkv * hd, b)?,
            o_proj: Linear::load(w, &join_path(path, "o_proj"), nq * hd, h, b)?,
            heads: nq,
            kv_heads: nkv,
            head_dim: hd,
            layer,
        })
    }
}

impl Forward for LlamaAttention {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        let p = self.path.as_str();
        let (b, s, _) = x.size3().at(p)?; // [batch, seq, hidden], else an error naming the module
        let q = cx.call(&self.q_proj, x)?;
        let k = cx.call(&self.k_proj, x)?;
        let v = cx.call(&self.v_proj, x)?;
        let heads = |t: Tensor, n: i64| t.f_view([b, s, n, self.head_dim]).and_then(|t| t.f_transpose(1, 2)).at(p);
        let (q, k, v) = (heads(q, self.heads)?, heads(k, self.kv_heads)?, heads(v, self.kv_heads)?);
        let (cos, sin) =
            cx.state.rotary.as_ref().ok_or_else(|| Error::InvalidInput {
                message: format!("{p}: no rotary tables in the forward state"),
            })?;
        let cos = cos.f_unsqueeze(1).at(p)?;
        let sin = sin.f_unsqueeze(1).at(p)?;
        let q = apply_rotary(&q, &cos, &sin).at(p)?;
        let k = apply_rotary(&k, &cos, &sin).at(p)?;
        if cx.wants_points(p, &ATTENTION_POINTS) {
            let out = explicit_attention(cx, p, self.layer, q, k, &v, 1.0 / (self.head_dim as f64).sqrt())?;
            return cx.call(&self.o_proj, &out);
        }
        let (k, v) = append_kv(cx, p, self.layer, k, v)?;
        let mask = cx.state.attention_mask.as_ref();
        let gqa = self.heads != self.kv_heads;
        let out =
            Tensor::f_scaled_dot_product_attention(&q, &k, &v, mask, 0.0, mask.is_none() && s > 1, None, gqa).at(p)?;
        let out = out.f_transpose(1, 2).at(p)?.f_reshape([b, s, self.heads * self.head_dim]).at(p)?;
        cx.call(&self.o_proj, &out)
    }
}

/// One decoder layer: pre-norm attention and pre-norm MLP, each added to the residual stream.
#[derive(Debug, Traceable)]
#[traceable(kind = "LlamaDecoderLayer")]
pub struct LlamaDecoderLayer {
    #[traceable(path)]
    path: String,
    /// Attention.
    pub self_attn: LlamaAttention,
    /// MLP.
    pub mlp: LlamaMlp,
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
}

impl LlamaDecoderLayer {
    fn load(w: &mut Weights, path: &str, c: &LlamaConfig, layer: usize) -> Result<Self> {
        Ok(LlamaDecoderLayer {
            path: path.to_string(),
            self_attn: LlamaAttention::load(w, &join_path(path, "self_attn"), c, layer)?,
            mlp: LlamaMlp::load(w, &join_path(path, "mlp"), c)?,
            input_layernorm: RmsNorm::load(w, &join_path(path, "input_layernorm"), c.hidden_size, c.rms_norm_eps)?,
            post_attention_layernorm: RmsNorm::load(
                w,
                &join_path(path, "post_attention_layernorm"),
                c.hidden_size,
                c.rms_norm_eps,
            )?,
        })
    }
}

impl Forward for LlamaDecoderLayer {
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

/// The decoder stack (`LlamaModel`): token ids in, final-norm hidden states out.
#[derive(Debug, Traceable)]
#[traceable(kind = "LlamaModel")]
pub struct LlamaModel {
    #[traceable(path)]
    path: String,
    /// Token embeddings `[vocab, hidden]`.
    pub embed_tokens: Embedding,
    /// Decoder layers.
    pub layers: ModuleList<LlamaDecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
}

impl Forward for LlamaModel {
    fn forward(&self, cx: &mut Ctx<'_>, ids: &Tensor) -> Result<Tensor> {
        let mut h = cx.call(&self.embed_tokens, ids)?;
        for layer in &self.layers {
            h = cx.call(layer, &h)?;
        }
        cx.call(&self.norm, &h)
    }
}

/// `LlamaForCausalLM`: the decoder stack and the language-model head.
#[derive(Debug, Traceable)]
#[traceable(kind = "LlamaForCausalLM")]
pub struct Llama {
    #[traceable(path)]
    path: String,
    /// The decoder stack (`model.*` in the state dict).
    pub model: LlamaModel,
    /// The head `[vocab, hidden]` (the embedding matrix when tied).
    pub lm_head: Linear,
    #[traceable(skip)]
    config: LlamaConfig,
    #[traceable(skip)]
    inv_freq: Tensor,
}

impl Llama {
    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Rotary tables `(cos, sin)` `[batch, seq, head_dim]` of the positions `position_ids` `[batch, seq]`.
    fn rotary(&self, position_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        rotary_tables(&self.inv_freq, position_ids, self.lm_head.weight.kind())
    }
}

impl Forward for Llama {
    fn forward(&self, cx: &mut Ctx<'_>, ids: &Tensor) -> Result<Tensor> {
        let h = cx.call(&self.model, ids)?;
        let h = head_positions(cx, &self.path, h)?;
        cx.call(&self.lm_head, &h)
    }
}

impl CausalLm for Llama {
    const ARCHITECTURE: &'static str = "llama";

    fn from_config(raw: &RawConfig, w: &mut Weights) -> Result<Self> {
        let c: LlamaConfig = raw.parse()?;
        c.validate(&raw.source)?;
        let embed_tokens = Embedding::load(w, "model.embed_tokens", c.vocab_size, c.hidden_size)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| LlamaDecoderLayer::load(w, &format!("model.layers.{i}"), &c, i as usize))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(w, "model.norm", c.hidden_size, c.rms_norm_eps)?;
        // A checkpoint that says "tied" may still carry lm_head.weight (some exports do); a separate head is
        // used only when the config says so, or when the tensor is there.
        let lm_head = if c.tie_word_embeddings && !w.contains("lm_head.weight") {
            Linear::from_tensors("lm_head", embed_tokens.weight.shallow_clone(), None)
        } else {
            Linear::load(w, "lm_head", c.hidden_size, c.vocab_size, false)?
        };
        let inv_freq = w.place("model.rotary_emb", inv_freq(c.head_dim(), c.theta(), c.scaling())?)?;
        Ok(Llama {
            path: String::new(),
            model: LlamaModel {
                path: "model".into(),
                embed_tokens,
                layers: ModuleList::new("model.layers", layers),
                norm,
            },
            lm_head,
            config: c,
            inv_freq,
        })
    }

    fn prepare(&self, batch: &Batch) -> Result<ForwardState> {
        let kind = self.lm_head.weight.kind();
        Ok(ForwardState {
            attention_mask: causal_padding_mask(batch, kind, self.config.sliding_window)?,
            position_ids: Some(batch.position_ids.shallow_clone()),
            rotary: Some(self.rotary(&batch.position_ids)?),
            ..ForwardState::default()
        })
    }

    fn cache_layers(&self) -> usize {
        self.model.layers.len()
    }

    fn prepare_cached(&self, input: &CachedInput, kv: KvCache) -> Result<ForwardState> {
        let kind = self.lm_head.weight.kind();
        Ok(ForwardState {
            attention_mask: cached_attention_mask(input, kind, self.config.sliding_window)?,
            position_ids: Some(input.position_ids.shallow_clone()),
            rotary: Some(self.rotary(&input.position_ids)?),
            kv: Some(kv),
            last_logits_only: input.last_logits_only,
        })
    }

    fn vocab_size(&self) -> i64 {
        self.config.vocab_size
    }

    fn dtype(&self) -> Kind {
        self.lm_head.weight.kind()
    }

    fn to_device(&mut self, device: Device, kind: Kind) -> Result<()> {
        super::move_params(self, device, kind)?;
        self.inv_freq = self.inv_freq.f_to_device(device).at("model.rotary_emb")?;
        Ok(())
    }
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
