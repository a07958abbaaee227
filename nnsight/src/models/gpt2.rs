//! GPT-2: learned position embeddings, pre-norm blocks with LayerNorm, fused q/k/v projection stored as
//! `Conv1D` (weight `[in, out]`), a GELU (tanh approximation, `gelu_new`) MLP, `lm_head` tied to `wte`.
//!
//! Paper: Radford et al., *Language Models are Unsupervised Multitask Learners* (2019). Reference
//! implementation: Hugging Face transformers' `models/gpt2/modeling_gpt2.py`, whose module names this file
//! mirrors (`transformer.h.0.attn.c_attn`).

use super::{
    append_kv, cached_attention_mask, causal_padding_mask, explicit_attention, head_positions, CachedInput, CausalLm,
    RawConfig, ATTENTION_POINTS,
};
use crate::error::TchResultExt;
use crate::load::Weights;
use crate::models::batch::Batch;
use crate::nn::{
    join_path, Activation, ActivationFn, Conv1D, Ctx, Embedding, Forward, ForwardState, KvCache, LayerNorm, Linear,
    ModuleList,
};
use crate::{Error, Result, Traceable};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// A GPT-2 `config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gpt2Config {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Longest context (rows of `wpe`).
    pub n_positions: i64,
    /// Width of the residual stream.
    pub n_embd: i64,
    /// Number of blocks.
    pub n_layer: i64,
    /// Number of attention heads.
    pub n_head: i64,
    /// Width of the MLP; defaults to `4 * n_embd`.
    #[serde(default)]
    pub n_inner: Option<i64>,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// MLP activation (`gelu_new` and its aliases are supported).
    #[serde(default = "default_act")]
    pub activation_function: String,
    /// Whether `lm_head` shares `wte` (GPT-2 always does).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Divide attention scores by `sqrt(head_dim)`.
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    /// Also divide attention scores by the layer index + 1.
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Beginning-of-sequence token id.
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    /// End-of-sequence token id.
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "gelu_new".into()
}
fn default_true() -> bool {
    true
}

/// GPT-2's MLP: `c_proj(gelu_new(c_fc(x)))`.
#[derive(Debug, Traceable)]
#[traceable(kind = "GPT2MLP")]
pub struct Gpt2Mlp {
    #[traceable(path)]
    path: String,
    /// Expansion `[n_embd, n_inner]`.
    pub c_fc: Conv1D,
    /// Projection back `[n_inner, n_embd]`.
    pub c_proj: Conv1D,
    /// The activation (`gelu_new`).
    pub act: Activation,
}

impl Forward for Gpt2Mlp {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        let h = cx.call(&self.c_fc, x)?;
        let h = cx.call(&self.act, &h)?;
        cx.call(&self.c_proj, &h)
    }
}

/// Causal self-attention with a fused q/k/v projection.
///
/// Inner points, read and written like module outputs (`model.transformer.h[0].attn.probs.output`):
/// - `query`, `key`: the queries and keys split into heads, `[batch, heads, seq, head_dim]`. In a cached forward
///   (generation) both hold this forward's positions only (`seq` = 1 at a decode step), and what `key` holds goes
///   into the KV cache, so a write persists into later steps;
/// - `probs`: the attention probabilities `[batch, heads, q, k]` (softmax in float32, then the model's dtype;
///   each row sums to 1, zero above the diagonal and on padding); in a cached forward `k` counts every cached
///   key (past + q);
/// - `head_output`: each head's output before `c_proj`, `[batch, seq, heads, head_dim]`.
///
/// When nothing reads or writes them, the fused `scaled_dot_product_attention` runs; when something does, the
/// attention is computed step by step and uses the values the points hold (a write changes the output). Both
/// paths append to the forward state's KV cache, if any, in slot `layer`.
#[derive(Debug, Traceable)]
#[traceable(kind = "GPT2Attention", points(query, key, probs, head_output))]
pub struct Gpt2Attention {
    #[traceable(path)]
    path: String,
    /// Fused q/k/v projection `[n_embd, 3 n_embd]`.
    pub c_attn: Conv1D,
    /// Output projection `[n_embd, n_embd]`.
    pub c_proj: Conv1D,
    #[traceable(skip)]
    heads: i64,
    #[traceable(skip)]
    scale: f64,
    /// Index of the block (its KV-cache slot).
    #[traceable(skip)]
    layer: usize,
}

impl Forward for Gpt2Attention {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        let p = self.path.as_str();
        let (b, s, e) = x.size3().at(p)?; // [batch, seq, embd], else an error naming the module
        let hd = e / self.heads;
        let qkv = cx.call(&self.c_attn, x)?;
        let parts = qkv.f_split(e, 2).at(p)?;
        let heads = |t: &Tensor| t.f_view([b, s, self.heads, hd]).and_then(|t| t.f_transpose(1, 2)).at(p);
        let (q, k, v) = (heads(&parts[0])?, heads(&parts[1])?, heads(&parts[2])?);
        if cx.wants_points(p, &ATTENTION_POINTS) {
            let out = explicit_attention(cx, p, self.layer, q, k, &v, self.scale)?;
            return cx.call(&self.c_proj, &out);
        }
        let (k, v) = append_kv(cx, p, self.layer, k, v)?;
        let mask = cx.state.attention_mask.as_ref();
        let out = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            mask,
            0.0,
            mask.is_none() && s > 1,
            Some(self.scale),
            false,
        )
        .at(p)?;
        let out = out.f_transpose(1, 2).at(p)?.f_reshape([b, s, e]).at(p)?;
        cx.call(&self.c_proj, &out)
    }
}

/// One GPT-2 block.
#[derive(Debug, Traceable)]
#[traceable(kind = "GPT2Block")]
pub struct Gpt2Block {
    #[traceable(path)]
    path: String,
    /// Norm before attention.
    pub ln_1: LayerNorm,
    /// Attention.
    pub attn: Gpt2Attention,
    /// Norm before the MLP.
    pub ln_2: LayerNorm,
    /// MLP.
    pub mlp: Gpt2Mlp,
}

impl Forward for Gpt2Block {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        let p = self.path.as_str();
        let h = cx.call(&self.ln_1, x)?;
        let h = cx.call(&self.attn, &h)?;
        let x = x.f_add(&h).at(p)?;
        let h = cx.call(&self.ln_2, &x)?;
        let h = cx.call(&self.mlp, &h)?;
        x.f_add(&h).at(p)
    }
}

/// The GPT-2 stack (`GPT2Model`): embeddings, blocks, final norm.
#[derive(Debug, Traceable)]
#[traceable(kind = "GPT2Model")]
pub struct Gpt2Model {
    #[traceable(path)]
    path: String,
    /// Token embeddings `[vocab, n_embd]`.
    pub wte: Embedding,
    /// Position embeddings `[n_positions, n_embd]`.
    pub wpe: Embedding,
    /// Blocks.
    pub h: ModuleList<Gpt2Block>,
    /// Final norm.
    pub ln_f: LayerNorm,
}

impl Forward for Gpt2Model {
    fn forward(&self, cx: &mut Ctx<'_>, ids: &Tensor) -> Result<Tensor> {
        let p = self.path.as_str();
        let positions = match &cx.state.position_ids {
            Some(pos) => pos.shallow_clone(),
            None => {
                let s = ids.size()[1];
                let pos = Tensor::f_arange(s, (Kind::Int64, crate::meta::creation_device(ids))).at(p)?;
                crate::meta::to_device_like(&pos, ids).at(p)?.f_unsqueeze(0).at(p)?
            }
        };
        let tok = cx.call(&self.wte, ids)?;
        let pos = cx.call(&self.wpe, &positions)?;
        let mut h = tok.f_add(&pos).at(p)?;
        for block in &self.h {
            h = cx.call(block, &h)?;
        }
        cx.call(&self.ln_f, &h)
    }
}

/// `GPT2LMHeadModel`: the stack and the tied language-model head.
#[derive(Debug, Traceable)]
#[traceable(kind = "GPT2LMHeadModel")]
pub struct Gpt2 {
    #[traceable(path)]
    path: String,
    /// The stack (`transformer.*` in the state dict).
    pub transformer: Gpt2Model,
    /// The head `[vocab, n_embd]` (the `wte` matrix when tied).
    pub lm_head: Linear,
    #[traceable(skip)]
    config: Gpt2Config,
}

impl Gpt2 {
    /// The configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }
}

impl Forward for Gpt2 {
    fn forward(&self, cx: &mut Ctx<'_>, ids: &Tensor) -> Result<Tensor> {
        let h = cx.call(&self.transformer, ids)?;
        let h = head_positions(cx, &self.path, h)?;
        cx.call(&self.lm_head, &h)
    }
}

impl CausalLm for Gpt2 {
    const ARCHITECTURE: &'static str = "gpt2";

    fn from_config(raw: &RawConfig, w: &mut Weights) -> Result<Self> {
        let c: Gpt2Config = raw.parse()?;
        if !matches!(c.activation_function.as_str(), "gelu_new" | "gelu_pytorch_tanh") {
            return Err(Error::config(
                &raw.source,
                format!("activation_function `{}` is not supported (gelu_new)", c.activation_function),
            ));
        }
        if c.n_head <= 0 || c.n_embd % c.n_head != 0 {
            return Err(Error::config(
                &raw.source,
                format!("n_embd {} is not a multiple of n_head {}", c.n_embd, c.n_head),
            ));
        }
        // Original GPT-2 checkpoints (saved from `GPT2Model`) name tensors without the `transformer.` prefix.
        if !w.names().any(|k| k.starts_with("transformer.")) {
            w.rename(|k| if k.starts_with("lm_head.") { k.to_string() } else { format!("transformer.{k}") });
        }
        let (e, eps) = (c.n_embd, c.layer_norm_epsilon);
        let inner = c.n_inner.unwrap_or(4 * e);
        let hd = (e / c.n_head) as f64;
        let blocks = (0..c.n_layer)
            .map(|i| {
                let p = format!("transformer.h.{i}");
                let mut scale = if c.scale_attn_weights { 1.0 / hd.sqrt() } else { 1.0 };
                if c.scale_attn_by_inverse_layer_idx {
                    scale /= (i + 1) as f64;
                }
                Ok(Gpt2Block {
                    ln_1: LayerNorm::load(w, &join_path(&p, "ln_1"), e, eps)?,
                    attn: Gpt2Attention {
                        c_attn: Conv1D::load(w, &join_path(&p, "attn.c_attn"), e, 3 * e)?,
                        c_proj: Conv1D::load(w, &join_path(&p, "attn.c_proj"), e, e)?,
                        path: join_path(&p, "attn"),
                        heads: c.n_head,
                        scale,
                        layer: i as usize,
                    },
                    ln_2: LayerNorm::load(w, &join_path(&p, "ln_2"), e, eps)?,
                    mlp: Gpt2Mlp {
                        c_fc: Conv1D::load(w, &join_path(&p, "mlp.c_fc"), e, inner)?,
                        c_proj: Conv1D::load(w, &join_path(&p, "mlp.c_proj"), inner, e)?,
                        act: Activation::new(&join_path(&p, "mlp.act"), ActivationFn::GeluNew),
                        path: join_path(&p, "mlp"),
                    },
                    path: p,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let wte = Embedding::load(w, "transformer.wte", c.vocab_size, e)?;
        let wpe = Embedding::load(w, "transformer.wpe", c.n_positions, e)?;
        let ln_f = LayerNorm::load(w, "transformer.ln_f", e, eps)?;
        let lm_head = if c.tie_word_embeddings && !w.contains("lm_head.weight") {
            Linear::from_tensors("lm_head", wte.weight.shallow_clone(), None)
        } else {
            Linear::load(w, "lm_head", e, c.vocab_size, false)?
        };
        Ok(Gpt2 {
            path: String::new(),
            transformer: Gpt2Model {
                path: "transformer".into(),
                wte,
                wpe,
                h: ModuleList::new("transformer.h", blocks),
                ln_f,
            },
            lm_head,
            config: c,
        })
    }

    fn prepare(&self, batch: &Batch) -> Result<ForwardState> {
        let s = batch.input_ids.size()[1];
        if s > self.config.n_positions {
            return Err(Error::InvalidInput {
                message: format!("{s} tokens exceed GPT-2's {} positions", self.config.n_positions),
            });
        }
        Ok(ForwardState {
            attention_mask: causal_padding_mask(batch, self.lm_head.weight.kind(), None)?,
            position_ids: Some(batch.position_ids.shallow_clone()),
            ..ForwardState::default()
        })
    }

    fn cache_layers(&self) -> usize {
        self.transformer.h.len()
    }

    fn standard_names(&self) -> super::StandardNames {
        super::StandardNames {
            embed: "transformer.wte",
            layers: "transformer.h",
            attention: "attn",
            mlp: "mlp",
            final_norm: "transformer.ln_f",
            unembed: "lm_head",
            n_layers: self.transformer.h.len(),
        }
    }

    fn prepare_cached(&self, input: &CachedInput, kv: KvCache) -> Result<ForwardState> {
        let k = input.attention_mask.size()[1];
        if k > self.config.n_positions {
            return Err(Error::InvalidInput {
                message: format!("{k} tokens exceed GPT-2's {} positions", self.config.n_positions),
            });
        }
        Ok(ForwardState {
            attention_mask: cached_attention_mask(input, self.lm_head.weight.kind(), None)?,
            position_ids: Some(input.position_ids.shallow_clone()),
            rotary: None,
            kv: Some(kv),
            last_logits_only: input.last_logits_only,
            ..ForwardState::default()
        })
    }

    fn vocab_size(&self) -> i64 {
        self.config.vocab_size
    }

    fn dtype(&self) -> Kind {
        self.lm_head.weight.kind()
    }

    fn to_device(&mut self, device: Device, kind: Kind) -> Result<()> {
        super::move_params(self, device, kind)
    }
}

inventory::submit! {
    super::Architecture {
        name: "gpt2",
        model_types: &["gpt2"],
        hf_class: "GPT2LMHeadModel",
        build: super::build_boxed::<Gpt2>,
        gguf: None,
    }
}
