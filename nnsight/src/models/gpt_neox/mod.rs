//! GPT-NeoX and Pythia: LayerNorm, partial rotary position embeddings (`rotary_pct` of each head), a fused
//! q/k/v projection interleaved per head, a GELU MLP, attention and MLP read in parallel from the same residual
//! stream (`use_parallel_residual`) or one after the other, biases, and a separate head (`embed_out`).
//!
//! Papers: Black et al., *GPT-NeoX-20B: An Open-Source Autoregressive Language Model* (2022),
//! <https://arxiv.org/abs/2204.06745>; Biderman et al., *Pythia: A Suite for Analyzing Large Language Models
//! Across Training and Scaling* (2023), <https://arxiv.org/abs/2304.01373>. Reference implementation: Hugging
//! Face transformers' `models/gpt_neox/modeling_gpt_neox.py`, whose module names and nesting this file mirrors
//! (`gpt_neox.layers.5.attention.query_key_value`), with the head named as in the checkpoints, `embed_out`
//! (transformers 5 renames it `lm_head` on load).

mod gguf;

use super::rope::{apply_rotary, inv_freq, rotary_tables, RopeScaling};
use super::{
    append_kv, cached_attention_mask, causal_padding_mask, explicit_attention, head_positions, CachedInput, CausalLm,
    GgufSupport, RawConfig, ATTENTION_POINTS,
};
use crate::error::TchResultExt;
use crate::load::Weights;
use crate::models::batch::Batch;
use crate::nn::{
    join_path, Activation, ActivationFn, Ctx, Embedding, Forward, ForwardState, KvCache, LayerNorm, Linear, ModuleList,
};
use crate::{Error, Result, Traceable};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// A GPT-NeoX `config.json` (Pythia's, GPT-NeoX-20B's; older files and transformers 5's).
///
/// `attention_dropout` and `hidden_dropout` are ignored: this runtime does inference.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GptNeoXConfig {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Width of the residual stream.
    pub hidden_size: i64,
    /// Number of layers.
    pub num_hidden_layers: i64,
    /// Number of attention heads.
    pub num_attention_heads: i64,
    /// Width of the MLP.
    pub intermediate_size: i64,
    /// Activation of the MLP (`gelu` for Pythia, `gelu_fast` for GPT-NeoX-20B; see [`ActivationFn::from_hf`]).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Attention and MLP both read the layer's input and add to it (`x + attn(ln1(x)) + mlp(ln2(x))`); else the
    /// MLP reads the stream after attention (`h = x + attn(ln1(x)); h + mlp(ln2(h))`).
    #[serde(default = "default_true")]
    pub use_parallel_residual: bool,
    /// Fraction of each head that is rotated (older config.json files; default 0.25).
    #[serde(default)]
    pub rotary_pct: Option<f64>,
    /// Base of the rotary frequencies (older config.json files; default 10000).
    #[serde(default)]
    pub rotary_emb_base: Option<f64>,
    /// Rotary scaling (older config.json files).
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Rotary settings (transformers 5: `rope_theta`, `partial_rotary_factor`, scaling).
    #[serde(default)]
    pub rope_parameters: Option<RopeScaling>,
    /// Biases on `query_key_value` and `dense`.
    #[serde(default = "default_true")]
    pub attention_bias: bool,
    /// Whether `embed_out` shares the embedding matrix (never for Pythia).
    #[serde(default)]
    pub tie_word_embeddings: bool,
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
}

fn default_act() -> String {
    "gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

impl GptNeoXConfig {
    fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }
    /// The rotary settings as transformers reads them: `rope_scaling` or `rope_parameters`, their `rope_theta`
    /// and `partial_rotary_factor` falling back to `rotary_emb_base` (10000) and `rotary_pct` (0.25).
    fn rope(&self) -> RopeScaling {
        let mut r = self.rope_scaling.clone().or_else(|| self.rope_parameters.clone()).unwrap_or_default();
        r.rope_theta = r.rope_theta.or(self.rotary_emb_base).or(Some(10000.0));
        r.partial_rotary_factor = r.partial_rotary_factor.or(self.rotary_pct).or(Some(0.25));
        r
    }
    /// Rotated values per head: `int(head_dim * partial_rotary_factor)`, as transformers truncates it.
    fn rotary_dims(&self) -> i64 {
        (self.head_dim() as f64 * self.rope().partial_rotary_factor.unwrap_or(0.25)) as i64
    }
    fn activation(&self) -> Option<ActivationFn> {
        ActivationFn::from_hf(&self.hidden_act)
    }

    fn validate(&self, source: &std::path::Path) -> Result<()> {
        let bad = |m: String| Err(Error::config(source, m));
        if self.activation().is_none() {
            return bad(format!("hidden_act `{}` is not supported ({})", self.hidden_act, ActivationFn::HF_NAMES));
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
        ] {
            if v <= 0 {
                return bad(format!("`{name}` must be positive, found {v}"));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size ({}) is not a multiple of num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        let rope = self.rope();
        let factor = rope.partial_rotary_factor.unwrap_or(0.25);
        if !(factor > 0.0 && factor <= 1.0) {
            return bad(format!(
                "the rotary fraction (rotary_pct / partial_rotary_factor) must be in (0, 1], not {factor}"
            ));
        }
        rope.validate(source)
    }
}

/// The MLP: `dense_4h_to_h(act(dense_h_to_4h(x)))`.
#[derive(Debug, Traceable)]
#[traceable(kind = "GPTNeoXMLP")]
pub struct GptNeoXMlp {
    #[traceable(path)]
    path: String,
    /// Expansion `[intermediate, hidden]`.
    pub dense_h_to_4h: Linear,
    /// Projection back `[hidden, intermediate]`.
    pub dense_4h_to_h: Linear,
    /// The activation (`hidden_act`).
    pub act: Activation,
}

impl Forward for GptNeoXMlp {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        let h = cx.call(&self.dense_h_to_4h, x)?;
        let h = cx.call(&self.act, &h)?;
        cx.call(&self.dense_4h_to_h, &h)
    }
}

/// Causal self-attention with a fused q/k/v projection whose output holds, for each head in turn, that head's
/// query, key and value (`[b, s, heads, 3 * head_dim]`, then split in three), and partial rotary embeddings
/// (the first `rotary_pct` of each query and key head is rotated, the rest passes through).
///
/// Inner points, read and written like module outputs (`model.gpt_neox.layers[0].attention.probs.output`):
/// - `query`, `key`: the queries and keys after rotary embedding, `[batch, heads, seq, head_dim]`. In a cached
///   forward (generation) both hold this forward's positions only (`seq` = 1 at a decode step), and what `key`
///   holds goes into the KV cache, so a write persists into later steps;
/// - `probs`: the attention probabilities `[batch, heads, q, k]` (scores scaled by `head_dim^-0.5`, softmax in
///   float32, then the model's dtype, as transformers' eager attention; each row sums to 1, zero above the
///   diagonal and on padding); in a cached forward `k` counts every cached key (past + q);
/// - `head_output`: each head's output before `dense`, `[batch, seq, heads, head_dim]`.
///
/// When nothing reads or writes them, the fused `scaled_dot_product_attention` runs; when something does, the
/// attention is computed step by step and uses the values the points hold (a write changes the output). Both
/// paths append to the forward state's KV cache, if any, in slot `layer`.
#[derive(Debug, Traceable)]
#[traceable(kind = "GPTNeoXAttention", points(query, key, probs, head_output))]
pub struct GptNeoXAttention {
    #[traceable(path)]
    path: String,
    /// Fused q/k/v projection `[3 * hidden, hidden]`, per head interleaved.
    pub query_key_value: Linear,
    /// Output projection `[hidden, hidden]`.
    pub dense: Linear,
    #[traceable(skip)]
    heads: i64,
    #[traceable(skip)]
    head_dim: i64,
    /// Index of the layer (its KV-cache slot).
    #[traceable(skip)]
    layer: usize,
}

impl Forward for GptNeoXAttention {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        let p = self.path.as_str();
        let (b, s, e) = x.size3().at(p)?; // [batch, seq, hidden], else an error naming the module
        let qkv = cx.call(&self.query_key_value, x)?;
        let qkv = qkv.f_view([b, s, self.heads, 3 * self.head_dim]).at(p)?.f_transpose(1, 2).at(p)?;
        let parts = qkv.f_chunk(3, -1).at(p)?;
        let (q, k, v) = (&parts[0], &parts[1], &parts[2]);
        let (cos, sin) =
            cx.state.rotary.as_ref().ok_or_else(|| Error::InvalidInput {
                message: format!("{p}: no rotary tables in the forward state"),
            })?;
        let cos = cos.f_unsqueeze(1).at(p)?;
        let sin = sin.f_unsqueeze(1).at(p)?;
        let q = apply_rotary(q, &cos, &sin).at(p)?;
        let k = apply_rotary(k, &cos, &sin).at(p)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        if cx.wants_points(p, &ATTENTION_POINTS) {
            let out = explicit_attention(cx, p, self.layer, q, k, v, scale)?;
            return cx.call(&self.dense, &out);
        }
        let (k, v) = append_kv(cx, p, self.layer, k, v.shallow_clone())?;
        let mask = cx.state.attention_mask.as_ref();
        let out =
            Tensor::f_scaled_dot_product_attention(&q, &k, &v, mask, 0.0, mask.is_none() && s > 1, Some(scale), false)
                .at(p)?;
        let out = out.f_transpose(1, 2).at(p)?.f_reshape([b, s, e]).at(p)?;
        cx.call(&self.dense, &out)
    }
}

/// One layer: pre-norm attention and MLP, in parallel or in sequence (`use_parallel_residual`).
#[derive(Debug, Traceable)]
#[traceable(kind = "GPTNeoXLayer")]
pub struct GptNeoXLayer {
    #[traceable(path)]
    path: String,
    /// Norm before attention.
    pub input_layernorm: LayerNorm,
    /// Norm before the MLP (of the layer's input when parallel, of the stream after attention when not).
    pub post_attention_layernorm: LayerNorm,
    /// Attention.
    pub attention: GptNeoXAttention,
    /// MLP.
    pub mlp: GptNeoXMlp,
    #[traceable(skip)]
    parallel: bool,
}

impl GptNeoXLayer {
    fn load(w: &mut Weights, path: &str, c: &GptNeoXConfig, layer: usize) -> Result<Self> {
        let (h, i, b, eps) = (c.hidden_size, c.intermediate_size, c.attention_bias, c.layer_norm_eps);
        let act = c.activation().ok_or_else(|| Error::config(w.source(), "unsupported hidden_act"))?;
        let at = |rest: &str| join_path(path, rest);
        Ok(GptNeoXLayer {
            input_layernorm: LayerNorm::load(w, &at("input_layernorm"), h, eps)?,
            post_attention_layernorm: LayerNorm::load(w, &at("post_attention_layernorm"), h, eps)?,
            attention: GptNeoXAttention {
                query_key_value: Linear::load(w, &at("attention.query_key_value"), h, 3 * h, b)?,
                dense: Linear::load(w, &at("attention.dense"), h, h, b)?,
                path: at("attention"),
                heads: c.num_attention_heads,
                head_dim: c.head_dim(),
                layer,
            },
            mlp: GptNeoXMlp {
                dense_h_to_4h: Linear::load(w, &at("mlp.dense_h_to_4h"), h, i, true)?,
                dense_4h_to_h: Linear::load(w, &at("mlp.dense_4h_to_h"), i, h, true)?,
                act: Activation::new(&at("mlp.act"), act),
                path: at("mlp"),
            },
            parallel: c.use_parallel_residual,
            path: path.to_string(),
        })
    }
}

impl Forward for GptNeoXLayer {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        let p = self.path.as_str();
        let h = cx.call(&self.input_layernorm, x)?;
        let attn = cx.call(&self.attention, &h)?;
        // The sums in transformers' order, so that results match bit for bit.
        if self.parallel {
            let h = cx.call(&self.post_attention_layernorm, x)?;
            let mlp = cx.call(&self.mlp, &h)?;
            mlp.f_add(&attn).at(p)?.f_add(x).at(p)
        } else {
            let x = attn.f_add(x).at(p)?;
            let h = cx.call(&self.post_attention_layernorm, &x)?;
            let mlp = cx.call(&self.mlp, &h)?;
            mlp.f_add(&x).at(p)
        }
    }
}

/// The stack (`GPTNeoXModel`): token ids in, final-norm hidden states out.
#[derive(Debug, Traceable)]
#[traceable(kind = "GPTNeoXModel")]
pub struct GptNeoXModel {
    #[traceable(path)]
    path: String,
    /// Token embeddings `[vocab, hidden]`.
    pub embed_in: Embedding,
    /// Layers.
    pub layers: ModuleList<GptNeoXLayer>,
    /// Final norm.
    pub final_layer_norm: LayerNorm,
}

impl Forward for GptNeoXModel {
    fn forward(&self, cx: &mut Ctx<'_>, ids: &Tensor) -> Result<Tensor> {
        let mut h = cx.call(&self.embed_in, ids)?;
        for layer in &self.layers {
            h = cx.call(layer, &h)?;
        }
        cx.call(&self.final_layer_norm, &h)
    }
}

/// `GPTNeoXForCausalLM`: the stack and the language-model head.
#[derive(Debug, Traceable)]
#[traceable(kind = "GPTNeoXForCausalLM")]
pub struct GptNeoX {
    #[traceable(path)]
    path: String,
    /// The stack (`gpt_neox.*` in the state dict).
    pub gpt_neox: GptNeoXModel,
    /// The head `[vocab, hidden]` (`embed_out.weight`; the embedding matrix when tied).
    pub embed_out: Linear,
    #[traceable(skip)]
    config: GptNeoXConfig,
    #[traceable(skip)]
    inv_freq: Tensor,
}

impl GptNeoX {
    /// The configuration.
    pub fn config(&self) -> &GptNeoXConfig {
        &self.config
    }

    /// Rotary tables `(cos, sin)` `[batch, seq, rotary_dims]` of the positions `position_ids` `[batch, seq]`.
    fn rotary(&self, position_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        rotary_tables(&self.inv_freq, position_ids, self.embed_out.weight.kind())
    }
}

impl Forward for GptNeoX {
    fn forward(&self, cx: &mut Ctx<'_>, ids: &Tensor) -> Result<Tensor> {
        let h = cx.call(&self.gpt_neox, ids)?;
        let h = head_positions(cx, &self.path, h)?;
        cx.call(&self.embed_out, &h)
    }
}

impl CausalLm for GptNeoX {
    const ARCHITECTURE: &'static str = "gpt_neox";

    fn from_config(raw: &RawConfig, w: &mut Weights) -> Result<Self> {
        let c: GptNeoXConfig = raw.parse()?;
        c.validate(&raw.source)?;
        // Older checkpoints (Pythia's) carry each layer's causal-mask buffers, which transformers ignores too.
        w.discard(|k| k.ends_with(".attention.bias") || k.ends_with(".attention.masked_bias"));
        // A checkpoint saved under transformers 5's module name.
        if w.contains("lm_head.weight") && !w.contains("embed_out.weight") {
            w.rename(|k| if k == "lm_head.weight" { "embed_out.weight".into() } else { k.to_string() });
        }
        let (h, eps) = (c.hidden_size, c.layer_norm_eps);
        let embed_in = Embedding::load(w, "gpt_neox.embed_in", c.vocab_size, h)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| GptNeoXLayer::load(w, &format!("gpt_neox.layers.{i}"), &c, i as usize))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::load(w, "gpt_neox.final_layer_norm", h, eps)?;
        let embed_out = if c.tie_word_embeddings && !w.contains("embed_out.weight") {
            Linear::from_tensors("embed_out", embed_in.weight.shallow_clone(), None)
        } else {
            Linear::load(w, "embed_out", h, c.vocab_size, false)?
        };
        let rope = c.rope();
        let inv_freq = inv_freq(c.rotary_dims(), rope.rope_theta.unwrap_or(10000.0), Some(&rope))?;
        let inv_freq = w.place("gpt_neox.rotary_emb", inv_freq)?;
        Ok(GptNeoX {
            path: String::new(),
            gpt_neox: GptNeoXModel {
                path: "gpt_neox".into(),
                embed_in,
                layers: ModuleList::new("gpt_neox.layers", layers),
                final_layer_norm,
            },
            embed_out,
            config: c,
            inv_freq,
        })
    }

    fn prepare(&self, batch: &Batch) -> Result<ForwardState> {
        let kind = self.embed_out.weight.kind();
        Ok(ForwardState {
            attention_mask: causal_padding_mask(batch, kind, None)?,
            position_ids: Some(batch.position_ids.shallow_clone()),
            rotary: Some(self.rotary(&batch.position_ids)?),
            ..ForwardState::default()
        })
    }

    fn cache_layers(&self) -> usize {
        self.gpt_neox.layers.len()
    }

    fn standard_names(&self) -> super::StandardNames {
        super::StandardNames {
            embed: "gpt_neox.embed_in",
            layers: "gpt_neox.layers",
            attention: "attention",
            mlp: "mlp",
            final_norm: "gpt_neox.final_layer_norm",
            unembed: "embed_out",
            n_layers: self.gpt_neox.layers.len(),
        }
    }

    fn prepare_cached(&self, input: &CachedInput, kv: KvCache) -> Result<ForwardState> {
        let kind = self.embed_out.weight.kind();
        Ok(ForwardState {
            attention_mask: cached_attention_mask(input, kind, None)?,
            position_ids: Some(input.position_ids.shallow_clone()),
            rotary: Some(self.rotary(&input.position_ids)?),
            kv: Some(kv),
            last_logits_only: input.last_logits_only,
            ..ForwardState::default()
        })
    }

    fn vocab_size(&self) -> i64 {
        self.config.vocab_size
    }

    fn dtype(&self) -> Kind {
        self.embed_out.weight.kind()
    }

    fn to_device(&mut self, device: Device, kind: Kind) -> Result<()> {
        super::move_params(self, device, kind)?;
        self.inv_freq = self.inv_freq.f_to_device(device).at("gpt_neox.rotary_emb")?;
        Ok(())
    }
}

inventory::submit! {
    super::Architecture {
        name: "gpt_neox",
        model_types: &["gpt_neox"],
        hf_class: "GPTNeoXForCausalLM",
        build: super::build_boxed::<GptNeoX>,
        gguf: Some(GgufSupport {
            architectures: &["gptneox"],
            config: gguf::gguf_config,
            tensor_name: gguf::gguf_tensor_name,
            fix_tensor: gguf::gguf_fix_tensor,
        }),
    }
}
