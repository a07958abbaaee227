//! Phi-3's `config.json` as transformers 5 reads it, and its rotary embeddings: plain, or LongRoPE (`longrope`,
//! spelled `su` or `yarn` in older files), whose frequencies depend on how long the sequence is.

use crate::error::TchResultExt;
use crate::load::Weights;
use crate::models::rope::{inv_freq, rotary_tables, RopeScaling};
use crate::nn::ActivationFn;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// A Phi-3 `config.json` (Phi-3, Phi-3.5 and Phi-4-mini; older files with `rope_scaling` and transformers 5's
/// with `rope_parameters`).
///
/// The dropouts (`resid_pdrop`, `embd_pdrop`, `attention_dropout`) are ignored: this runtime does inference.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Phi3Config {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Width of the residual stream.
    pub hidden_size: i64,
    /// Width of the MLP (half of `gate_up_proj`'s output).
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
    /// Activation of the MLP's gate (`silu`).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Longest context the model serves; with `original_max_position_embeddings` it gives LongRoPE's
    /// extension factor when the rope settings have no `factor`.
    #[serde(default = "default_context")]
    pub max_position_embeddings: i64,
    /// The context the model was pretrained with: LongRoPE uses the short factors while the sequence fits in it,
    /// the long ones beyond. It takes precedence over the same field in the rope settings, as in transformers.
    #[serde(default = "default_context")]
    pub original_max_position_embeddings: i64,
    /// Base of the rotary frequencies (older config.json files).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Fraction of each head that is rotated (older config.json files; Phi-4-mini's 0.75).
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    /// Rotary scaling (older config.json files).
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Rotary settings (transformers 5).
    #[serde(default)]
    pub rope_parameters: Option<RopeScaling>,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Each query attends to at most this many keys (itself included).
    #[serde(default)]
    pub sliding_window: Option<i64>,
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

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "silu".into()
}
fn default_context() -> i64 {
    4096
}

impl Phi3Config {
    /// Number of key/value heads.
    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one head.
    pub fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The rotary settings as transformers 5 reads them: `rope_scaling`, else `rope_parameters`, with
    /// `rope_theta` (10000) and `partial_rotary_factor` (1) from the top level where they lack them, `su` and
    /// `yarn` read as `longrope`, and, for LongRoPE, the top-level `original_max_position_embeddings`.
    pub fn rope(&self) -> RopeScaling {
        let mut r = self.rope_scaling.clone().or_else(|| self.rope_parameters.clone()).unwrap_or_default();
        r.rope_theta = r.rope_theta.or(self.rope_theta).or(Some(10000.0));
        r.partial_rotary_factor = r.partial_rotary_factor.or(self.partial_rotary_factor).or(Some(1.0));
        r.rope_type = Some(match r.rope_type.as_deref() {
            None | Some("default") => "default".into(),
            Some("su" | "yarn" | "longrope") => "longrope".into(),
            Some(other) => other.to_string(),
        });
        if r.rope_type.as_deref() == Some("longrope") {
            r.original_max_position_embeddings = Some(self.original_max_position_embeddings as f64);
        }
        r
    }

    /// Rotated values per head: `int(head_dim * partial_rotary_factor)`, as transformers truncates it.
    pub fn rotary_dims(&self) -> i64 {
        (self.head_dim() as f64 * self.rope().partial_rotary_factor.unwrap_or(1.0)) as i64
    }

    /// The activation of the gate.
    pub(crate) fn activation(&self) -> Option<ActivationFn> {
        ActivationFn::from_hf(&self.hidden_act)
    }

    /// LongRoPE's factor on the rotary tables: `attention_factor` when given, else
    /// `sqrt(1 + ln(factor) / ln(original_max_position_embeddings))` for an extension `factor` (given, else
    /// `max_position_embeddings / original_max_position_embeddings`) above 1, else 1.
    fn attention_factor(&self, r: &RopeScaling) -> f64 {
        if let Some(a) = r.attention_factor {
            return a;
        }
        let original = self.original_max_position_embeddings as f64;
        let factor = r.factor.unwrap_or(self.max_position_embeddings as f64 / original);
        if factor <= 1.0 {
            1.0
        } else {
            (1.0 + factor.ln() / original.ln()).sqrt()
        }
    }

    pub(crate) fn validate(&self, source: &std::path::Path) -> Result<()> {
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
            ("num_key_value_heads", self.kv_heads()),
            ("head_dim", self.head_dim()),
            ("max_position_embeddings", self.max_position_embeddings),
            ("original_max_position_embeddings", self.original_max_position_embeddings),
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
        if let Some(w) = self.sliding_window.filter(|&w| w <= 0) {
            return bad(format!("`sliding_window` must be positive, found {w}"));
        }
        let r = self.rope();
        let fraction = r.partial_rotary_factor.unwrap_or(1.0);
        let dims = self.rotary_dims();
        if !(fraction > 0.0 && fraction <= 1.0) || dims < 2 || dims % 2 != 0 {
            return bad(format!(
                "partial_rotary_factor {fraction} of head_dim {} rotates {dims} values per head; it must be in \
                 (0, 1] and rotate an even number of them",
                self.head_dim()
            ));
        }
        match r.rope_type.as_deref() {
            Some("default") => Ok(()),
            Some("longrope") => {
                for (name, factors) in [("short_factor", &r.short_factor), ("long_factor", &r.long_factor)] {
                    match factors {
                        None => return bad(format!("longrope rope scaling needs `{name}`")),
                        Some(f) if f.len() as i64 != dims / 2 => {
                            return bad(format!(
                                "longrope `{name}` has {} values, the {dims} rotated values per head need {}",
                                f.len(),
                                dims / 2
                            ))
                        }
                        Some(f) if f.iter().any(|&x| !(x > 0.0 && x.is_finite())) => {
                            return bad(format!("longrope `{name}` must hold positive numbers, found {f:?}"))
                        }
                        Some(_) => {}
                    }
                }
                let a = self.attention_factor(&r);
                if !(a.is_finite() && a > 0.0) {
                    return bad(format!(
                        "the longrope attention factor is {a} (original_max_position_embeddings {}, \
                         max_position_embeddings {}); give `attention_factor` in the rope settings",
                        self.original_max_position_embeddings, self.max_position_embeddings
                    ));
                }
                Ok(())
            }
            Some(other) => bad(format!("rope type `{other}` is not supported for phi3 (default, longrope / su)")),
            None => Ok(()),
        }
    }
}

/// Phi-3's rotary embeddings (`Phi3RotaryEmbedding`): the inverse frequencies, and with LongRoPE a second set
/// for long sequences and a factor on the tables.
///
/// Which set a forward uses follows transformers' `dynamic_rope_update`: the long one when the longest position
/// of the forward (over the whole batch) is at or beyond `original_max_position_embeddings`, i.e. when
/// `max(position_ids) + 1 > original_max_position_embeddings`, else the short one. In a cached forward the
/// positions are the new tokens', so the keys already cached keep the rotation they were computed with; see
/// [`Phi3`](super::Phi3) for what generation does when the sequence crosses the boundary.
#[derive(Debug)]
pub(crate) struct Phi3Rope {
    /// The inverse frequencies `[rotary_dims / 2]` (float32): LongRoPE's short ones, or the plain ones.
    short: Tensor,
    /// LongRoPE's long ones.
    long: Option<Tensor>,
    original_max: i64,
    /// The factor cos and sin are multiplied by (1 without LongRoPE).
    scaling: f64,
}

/// `1 / (factors * theta^(2i / dim))` (float32), as transformers' `_compute_longrope_parameters`.
fn longrope_inv_freq(dim: i64, theta: f64, factors: &[f64]) -> Result<Tensor> {
    let p = "model.rotary_emb";
    let exps = Tensor::f_arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))
        .at(p)?
        .f_to_kind(Kind::Float)
        .at(p)?
        .f_div_scalar(dim as f64)
        .at(p)?;
    let factors: Vec<f32> = factors.iter().map(|&f| f as f32).collect();
    Tensor::from_slice(&factors).f_mul(&Tensor::f_pow_scalar(theta, &exps).at(p)?).at(p)?.f_reciprocal().at(p)
}

impl Phi3Rope {
    /// The frequencies of a (validated) config, placed where `w`'s parameters go.
    pub(crate) fn new(c: &Phi3Config, w: &Weights) -> Result<Self> {
        let r = c.rope();
        let (dim, theta) = (c.rotary_dims(), r.rope_theta.unwrap_or(10000.0));
        let place = |t: Tensor| w.place("model.rotary_emb", t);
        let (Some(short), Some(long)) = (&r.short_factor, &r.long_factor) else {
            return Ok(Phi3Rope {
                short: place(inv_freq(dim, theta, None)?)?,
                long: None,
                original_max: c.original_max_position_embeddings,
                scaling: 1.0,
            });
        };
        Ok(Phi3Rope {
            short: place(longrope_inv_freq(dim, theta, short)?)?,
            long: Some(place(longrope_inv_freq(dim, theta, long)?)?),
            original_max: c.original_max_position_embeddings,
            scaling: c.attention_factor(&r),
        })
    }

    /// Whether a forward over `position_ids` uses LongRoPE's long factors (never on meta positions: a scan's
    /// shapes are the same either way).
    pub(crate) fn uses_long(&self, position_ids: &Tensor) -> Result<bool> {
        if self.long.is_none() || crate::meta::is_meta(position_ids) || position_ids.numel() == 0 {
            return Ok(false);
        }
        let last = position_ids.f_max().and_then(|m| m.f_int64_value(&[])).at("model.rotary_emb")?;
        Ok(last + 1 > self.original_max)
    }

    /// The context LongRoPE's factors switch at (`original_max_position_embeddings`), `None` without LongRoPE.
    pub(crate) fn switch_length(&self) -> Option<i64> {
        self.long.as_ref().map(|_| self.original_max)
    }

    /// The tables `(cos, sin)` `[batch, seq, rotary_dims]` in `kind` for `position_ids` `[batch, seq]`: computed
    /// in float32, multiplied by the attention factor, then cast, as transformers does.
    pub(crate) fn tables(&self, position_ids: &Tensor, kind: Kind) -> Result<(Tensor, Tensor)> {
        let p = "model.rotary_emb";
        let inv = match &self.long {
            Some(long) if self.uses_long(position_ids)? => long,
            _ => &self.short,
        };
        if self.scaling == 1.0 {
            return rotary_tables(inv, position_ids, kind);
        }
        let (cos, sin) = rotary_tables(inv, position_ids, Kind::Float)?;
        let scaled = |t: Tensor| t.f_mul_scalar(self.scaling).and_then(|t| t.f_to_kind(kind)).at(p);
        Ok((scaled(cos)?, scaled(sin)?))
    }

    /// Moves the frequencies to `device`.
    pub(crate) fn move_to(&mut self, device: Device) -> Result<()> {
        let p = "model.rotary_emb";
        self.short = self.short.f_to_device(device).at(p)?;
        if let Some(long) = &self.long {
            self.long = Some(long.f_to_device(device).at(p)?);
        }
        Ok(())
    }
}
