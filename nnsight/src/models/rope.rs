//! Rotary position embeddings, shared by the architectures that use them: the inverse frequencies with their
//! scalings ([`RopeScaling`]: linear, Llama 3, per-frequency factors from a GGUF file), the `(cos, sin)` tables of a batch's positions, and the rotation
//! of queries and keys (whole heads, or the first part of each head for partial rotary embeddings).

use crate::error::TchResultExt;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Rotary scaling settings (`rope_scaling` / `rope_parameters` of config.json).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RopeScaling {
    /// `"default"`, `"linear"` or `"llama3"`.
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    /// Scaling factor.
    #[serde(default)]
    pub factor: Option<f64>,
    /// Llama 3: low-frequency factor.
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    /// Llama 3: high-frequency factor.
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    /// Llama 3: context length the model was trained with before scaling.
    #[serde(default)]
    pub original_max_position_embeddings: Option<f64>,
    /// Base of the rotary frequencies (transformers 5 writes it here).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Fraction of each head that is rotated (transformers 5 writes GPT-NeoX's `rotary_pct` here).
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    /// LongRoPE (Phi-3): the divisors of the inverse frequencies while the sequence fits the original context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub short_factor: Option<Vec<f64>>,
    /// LongRoPE (Phi-3): the divisors of the inverse frequencies once the sequence outgrows the original context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_factor: Option<Vec<f64>>,
    /// LongRoPE: the factor the rotary tables (cos and sin) are multiplied by; derived from the context extension
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_factor: Option<f64>,
    /// Per-frequency divisors of the plain inverse frequencies, as a GGUF file's `rope_freqs` tensor stores
    /// Llama 3 scaling (llama.cpp's converter computes them from `factor`, `low_freq_factor`, ...); when present
    /// they are used instead of the rope type's formula. Not a Hugging Face field: the GGUF reader writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freq_factors: Option<Vec<f64>>,
}

impl RopeScaling {
    /// Refuses a rope type this runtime does not compute (named in the error, with `source`).
    pub fn validate(&self, source: &std::path::Path) -> Result<()> {
        match self.rope_type.as_deref() {
            None | Some("default") | Some("linear") | Some("llama3") => Ok(()),
            Some(other) => {
                Err(Error::config(source, format!("rope type `{other}` is not supported (default, linear, llama3)")))
            }
        }
    }
}

/// Inverse rotary frequencies `[dim / 2]` (float32) for rotary width `dim` (the head width, or the rotated part
/// of it for partial rotary embeddings) and base `theta`, with `scaling` applied, computed with the same
/// operations as transformers so that the tables match bit for bit.
pub fn inv_freq(dim: i64, theta: f64, scaling: Option<&RopeScaling>) -> Result<Tensor> {
    let p = "model.rotary_emb";
    let exps = Tensor::f_arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))
        .at(p)?
        .f_to_kind(Kind::Float)
        .at(p)?
        .f_div_scalar(dim as f64)
        .at(p)?;
    let base = Tensor::f_pow_scalar(theta, &exps).at(p)?;
    let inv = base.f_reciprocal().at(p)?;
    let Some(s) = scaling else { return Ok(inv) };
    if let Some(factors) = &s.freq_factors {
        if factors.len() as i64 != dim / 2 {
            return Err(Error::config(
                p,
                format!(
                    "the rope frequency factors (a GGUF file's `rope_freqs`) number {}, the rotary width {dim} needs \
                     {}",
                    factors.len(),
                    dim / 2
                ),
            ));
        }
        let factors: Vec<f32> = factors.iter().map(|&f| f as f32).collect();
        return inv.f_div(&Tensor::from_slice(&factors)).at(p);
    }
    match s.rope_type.as_deref() {
        Some("linear") => inv.f_div_scalar(s.factor.unwrap_or(1.0)).at(p),
        Some("llama3") => {
            let missing = |k: &str| Error::config("config.json", format!("llama3 rope scaling needs `{k}`"));
            let factor = s.factor.ok_or_else(|| missing("factor"))?;
            let low = s.low_freq_factor.ok_or_else(|| missing("low_freq_factor"))?;
            let high = s.high_freq_factor.ok_or_else(|| missing("high_freq_factor"))?;
            let old = s.original_max_position_embeddings.ok_or_else(|| missing("original_max_position_embeddings"))?;
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            let wavelen = inv.f_reciprocal().at(p)?.f_mul_scalar(2.0 * std::f64::consts::PI).at(p)?;
            let scaled = inv.f_div_scalar(factor).at(p)?;
            let long = wavelen.f_gt(low_wavelen).at(p)?;
            let inv_llama = scaled.f_where_self(&long, &inv).at(p)?;
            // smooth = (old / wavelen - low) / (high - low)
            let smooth = wavelen
                .f_reciprocal()
                .at(p)?
                .f_mul_scalar(old)
                .at(p)?
                .f_sub_scalar(low)
                .at(p)?
                .f_div_scalar(high - low)
                .at(p)?;
            let one_minus = smooth.f_neg().at(p)?.f_add_scalar(1.0).at(p)?;
            let smoothed = one_minus
                .f_mul(&inv_llama)
                .at(p)?
                .f_div_scalar(factor)
                .at(p)?
                .f_add(&smooth.f_mul(&inv_llama).at(p)?)
                .at(p)?;
            let medium = wavelen
                .f_lt(high_wavelen)
                .at(p)?
                .f_logical_not()
                .at(p)?
                .f_logical_and(&long.f_logical_not().at(p)?)
                .at(p)?;
            smoothed.f_where_self(&medium, &inv_llama).at(p)
        }
        _ => Ok(inv),
    }
}

/// Rotary tables `(cos, sin)` `[batch, seq, 2 * inv_freq.len()]` in `kind` for the positions `position_ids`
/// `[batch, seq]` (computed in float32, as transformers does).
pub fn rotary_tables(inv_freq: &Tensor, position_ids: &Tensor, kind: Kind) -> Result<(Tensor, Tensor)> {
    let p = "model.rotary_emb";
    // freqs[b, s, d/2] = position[b, s] * inv_freq[d/2], then cat(freqs, freqs).
    let pos = position_ids.f_to_kind(Kind::Float).at(p)?.f_unsqueeze(-1).at(p)?;
    let freqs = pos.f_mul(&inv_freq.f_view([1, 1, -1]).at(p)?).at(p)?;
    let emb = Tensor::f_cat(&[&freqs, &freqs], -1).at(p)?;
    let cos = emb.f_cos().at(p)?.f_to_kind(kind).at(p)?;
    let sin = emb.f_sin().at(p)?.f_to_kind(kind).at(p)?;
    Ok((cos, sin))
}

/// `x * cos + rotate_half(x) * sin` over the last dimension of `x` `[batch, heads, seq, head_dim]`, with
/// `rotate_half(x) = cat(-x2, x1)`. Tables narrower than the head (partial rotary embeddings, GPT-NeoX's
/// `rotary_pct`) rotate the first `cos.size(-1)` values of each head and pass the rest through.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> std::result::Result<Tensor, tch::TchError> {
    let (width, rot) = (x.size()[3], cos.size()[cos.dim() - 1]);
    if rot < width {
        let rotated = apply_rotary(&x.f_narrow(3, 0, rot)?, cos, sin)?;
        return Tensor::f_cat(&[rotated, x.f_narrow(3, rot, width - rot)?], 3);
    }
    if crate::meta::is_meta(x) {
        // A scan: `x * cos` has the shape and dtype of the whole (and checks that the tables broadcast), in one op.
        return x.f_mul(cos);
    }
    let half = x.size()[3] / 2;
    let x1 = x.f_narrow(3, 0, half)?;
    let x2 = x.f_narrow(3, half, half)?;
    let rotated = Tensor::f_cat(&[x2.f_neg()?, x1], 3)?;
    x.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)
}
