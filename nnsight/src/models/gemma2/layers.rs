//! The two leaf layers Gemma 2 and Gemma 3 have and Llama does not: the RMSNorm that scales by `1 + weight` in
//! float32, and the token embedding scaled by `sqrt(hidden_size)` inside the module.

use crate::error::TchResultExt;
use crate::load::Weights;
use crate::nn::{join_path, Ctx, Forward};
use crate::{Result, Traceable};
use tch::{Kind, Tensor};

/// Gemma's RMSNorm (`Gemma2RMSNorm`, `Gemma3RMSNorm`): `x / rms(x)` times `1 + weight`, all in float32, then back
/// to the input's dtype (Llama's multiplies by `weight` after the cast back; Gemma's checkpoints store the weight
/// around 0).
#[derive(Debug, Traceable)]
#[traceable(kind_fn = "kind_name", describe = "describe_text")]
pub struct GemmaRmsNorm {
    #[traceable(path)]
    path: String,
    /// The scale minus one, `[dim]`.
    #[traceable(param)]
    pub weight: Tensor,
    #[traceable(skip)]
    eps: f64,
    #[traceable(skip)]
    kind: &'static str,
}

impl GemmaRmsNorm {
    fn kind_name(&self) -> &'static str {
        self.kind
    }
    fn describe_text(&self) -> String {
        format!("({},), eps={}", self.weight.size()[0], self.eps)
    }

    /// Loads `{path}.weight` `[dim]`, printed as `kind` in the module tree.
    pub(crate) fn load(w: &mut Weights, path: &str, dim: i64, eps: f64, kind: &'static str) -> Result<Self> {
        Ok(GemmaRmsNorm { path: path.to_string(), weight: w.take(&join_path(path, "weight"), &[dim])?, eps, kind })
    }
}

impl Forward for GemmaRmsNorm {
    fn forward(&self, _cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        let p = &self.path;
        if crate::meta::is_meta(x) {
            // A scan: the shape and dtype of the whole, in one op.
            return x.f_mul(&self.weight.f_to_kind(x.kind()).at(p)?).at(p);
        }
        let xf = x.f_to_kind(Kind::Float).at(p)?;
        let var = xf.f_square().at(p)?.f_mean_dim(-1, true, None).at(p)?;
        let normed = xf.f_mul(&var.f_add_scalar(self.eps).at(p)?.f_rsqrt().at(p)?).at(p)?;
        let scale = self.weight.f_to_kind(Kind::Float).at(p)?.f_add_scalar(1.0).at(p)?;
        normed.f_mul(&scale).at(p)?.f_to_kind(x.kind()).at(p)
    }
}

/// The token embedding of Gemma 2 and 3 (`Gemma2TextScaledWordEmbedding`, `Gemma3TextScaledWordEmbedding`): a
/// lookup in `[vocab, hidden]`, multiplied by `sqrt(hidden)` rounded to float32 and then to the weight's dtype, as
/// transformers does (in bfloat16, `sqrt(3072)` is 55.5). Its output is the scaled embedding.
#[derive(Debug, Traceable)]
#[traceable(kind_fn = "kind_name", describe = "describe_text")]
pub struct GemmaScaledEmbedding {
    #[traceable(path)]
    path: String,
    /// Table `[num_embeddings, embedding_dim]`.
    #[traceable(param)]
    pub weight: Tensor,
    #[traceable(skip)]
    scale: f32,
    #[traceable(skip)]
    kind: &'static str,
}

impl GemmaScaledEmbedding {
    fn kind_name(&self) -> &'static str {
        self.kind
    }
    fn describe_text(&self) -> String {
        let s = self.weight.size();
        format!("{}, {}", s[0], s[1])
    }

    /// Loads `{path}.weight` `[num, dim]`, scaled by `sqrt(dim)`, printed as `kind` in the module tree.
    pub(crate) fn load(w: &mut Weights, path: &str, num: i64, dim: i64, kind: &'static str) -> Result<Self> {
        let weight = w.take(&join_path(path, "weight"), &[num, dim])?;
        Ok(GemmaScaledEmbedding { path: path.to_string(), weight, scale: (dim as f64).sqrt() as f32, kind })
    }
}

impl Forward for GemmaScaledEmbedding {
    fn forward(&self, _cx: &mut Ctx<'_>, ids: &Tensor) -> Result<Tensor> {
        let p = &self.path;
        let e = Tensor::f_embedding(&self.weight, ids, -1, false, false).at(p)?;
        // A 0-dim CPU tensor, as transformers' float32 buffer: it multiplies tensors of any device.
        let scale = Tensor::f_scalar_tensor(f64::from(self.scale), (Kind::Float, tch::Device::Cpu)).at(p)?;
        let scale = scale.f_to_kind(self.weight.kind()).at(p)?;
        e.f_mul(&scale).at(p)
    }
}
