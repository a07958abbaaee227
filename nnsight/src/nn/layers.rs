//! Leaf layers: `Linear`, `Conv1D` (GPT-2's transposed linear), `Embedding`, `LayerNorm`, `RmsNorm`, and the
//! activation functions as modules.
//! Parameter names and shapes are PyTorch's, so state-dict keys load one to one.

use super::{join_path, Ctx, Forward};
use crate::error::TchResultExt;
use crate::load::Weights;
use crate::Result;
use crate::Traceable;
use tch::Tensor;

/// `y = x Wᵀ + b`, weight `[out, in]` as in `torch.nn.Linear`.
#[derive(Debug, Traceable)]
#[traceable(kind = "Linear", describe = "describe_text")]
pub struct Linear {
    #[traceable(path)]
    path: String,
    /// Weight `[out_features, in_features]`.
    #[traceable(param)]
    pub weight: Tensor,
    /// Optional bias `[out_features]`.
    #[traceable(param)]
    pub bias: Option<Tensor>,
}

impl Linear {
    fn describe_text(&self) -> String {
        let s = self.weight.size();
        format!("in_features={}, out_features={}, bias={}", s[1], s[0], self.bias.is_some())
    }
    /// Loads `{path}.weight` (and `{path}.bias` when `bias`) from `w`.
    pub fn load(w: &mut Weights, path: &str, in_features: i64, out_features: i64, bias: bool) -> Result<Self> {
        let weight = w.take(&join_path(path, "weight"), &[out_features, in_features])?;
        let bias = if bias { Some(w.take(&join_path(path, "bias"), &[out_features])?) } else { None };
        Ok(Linear { path: path.to_string(), weight, bias })
    }

    /// A linear layer at `path` over existing tensors (e.g. a head tied to the embedding matrix).
    pub fn from_tensors(path: &str, weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { path: path.to_string(), weight, bias }
    }
}

impl Forward for Linear {
    fn forward(&self, _cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        // oneDNN or at::linear, whichever the thread's mode picks for this shape (see `fast_linear`).
        super::linear_path::linear(x, &self.weight, self.bias.as_ref(), &self.path)
    }
}

/// GPT-2's `Conv1D`: `y = x W + b` with weight `[in, out]`, as Hugging Face stores it.
#[derive(Debug, Traceable)]
#[traceable(kind = "Conv1D", describe = "describe_text")]
pub struct Conv1D {
    #[traceable(path)]
    path: String,
    /// Weight `[in_features, out_features]`.
    #[traceable(param)]
    pub weight: Tensor,
    /// Bias `[out_features]`.
    #[traceable(param)]
    pub bias: Tensor,
}

impl Conv1D {
    fn describe_text(&self) -> String {
        let s = self.weight.size();
        format!("nf={}, nx={}", s[1], s[0])
    }
    /// Loads `{path}.weight` `[in, out]` and `{path}.bias` `[out]`.
    pub fn load(w: &mut Weights, path: &str, in_features: i64, out_features: i64) -> Result<Self> {
        let weight = w.take(&join_path(path, "weight"), &[in_features, out_features])?;
        let bias = w.take(&join_path(path, "bias"), &[out_features])?;
        Ok(Conv1D { path: path.to_string(), weight, bias })
    }
}

impl Forward for Conv1D {
    fn forward(&self, _cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        // addmm on the flattened rows, as Hugging Face's Conv1D does.
        let size = x.size();
        let (rows, last) = (size[..size.len() - 1].iter().product::<i64>(), size[size.len() - 1]);
        let flat = x.f_reshape([rows, last]).at(&self.path)?;
        let y = self.bias.f_addmm(&flat, &self.weight).at(&self.path)?;
        let mut out = size;
        *out.last_mut().expect("non-empty shape") = self.weight.size()[1];
        y.f_reshape(out.as_slice()).at(&self.path)
    }
}

/// Token (or position) embedding: a lookup in a `[num, dim]` table.
#[derive(Debug, Traceable)]
#[traceable(kind = "Embedding", describe = "describe_text")]
pub struct Embedding {
    #[traceable(path)]
    path: String,
    /// Table `[num_embeddings, embedding_dim]`.
    #[traceable(param)]
    pub weight: Tensor,
}

impl Embedding {
    fn describe_text(&self) -> String {
        let s = self.weight.size();
        format!("{}, {}", s[0], s[1])
    }
    /// Loads `{path}.weight` `[num, dim]`.
    pub fn load(w: &mut Weights, path: &str, num: i64, dim: i64) -> Result<Self> {
        Ok(Embedding { path: path.to_string(), weight: w.take(&join_path(path, "weight"), &[num, dim])? })
    }
}

impl Forward for Embedding {
    fn forward(&self, _cx: &mut Ctx<'_>, ids: &Tensor) -> Result<Tensor> {
        Tensor::f_embedding(&self.weight, ids, -1, false, false).at(&self.path)
    }
}

/// `torch.nn.LayerNorm` over the last dimension.
#[derive(Debug, Traceable)]
#[traceable(kind = "LayerNorm", describe = "describe_text")]
pub struct LayerNorm {
    #[traceable(path)]
    path: String,
    /// Scale `[dim]`.
    #[traceable(param)]
    pub weight: Tensor,
    /// Shift `[dim]`.
    #[traceable(param)]
    pub bias: Tensor,
    #[traceable(skip)]
    eps: f64,
}

impl LayerNorm {
    fn describe_text(&self) -> String {
        format!("({},), eps={}", self.weight.size()[0], self.eps)
    }
    /// Loads `{path}.weight` and `{path}.bias`, both `[dim]`.
    pub fn load(w: &mut Weights, path: &str, dim: i64, eps: f64) -> Result<Self> {
        let weight = w.take(&join_path(path, "weight"), &[dim])?;
        let bias = w.take(&join_path(path, "bias"), &[dim])?;
        Ok(LayerNorm { path: path.to_string(), weight, bias, eps })
    }
}

impl Forward for LayerNorm {
    fn forward(&self, _cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        let dim = self.weight.size()[0];
        x.f_layer_norm([dim], Some(&self.weight), Some(&self.bias), self.eps, true).at(&self.path)
    }
}

/// Root-mean-square norm as Llama uses it: computed in float32, scaled by `weight` in the input's dtype.
#[derive(Debug, Traceable)]
#[traceable(kind = "RMSNorm", describe = "describe_text")]
pub struct RmsNorm {
    #[traceable(path)]
    path: String,
    /// Scale `[dim]`.
    #[traceable(param)]
    pub weight: Tensor,
    #[traceable(skip)]
    eps: f64,
}

impl RmsNorm {
    fn describe_text(&self) -> String {
        format!("({},), eps={}", self.weight.size()[0], self.eps)
    }
    /// Loads `{path}.weight` `[dim]`.
    pub fn load(w: &mut Weights, path: &str, dim: i64, eps: f64) -> Result<Self> {
        Ok(RmsNorm { path: path.to_string(), weight: w.take(&join_path(path, "weight"), &[dim])?, eps })
    }
}

impl Forward for RmsNorm {
    fn forward(&self, _cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        let p = &self.path;
        if crate::meta::is_meta(x) {
            // A scan: `weight * x` has the shape and dtype of the whole, in one op instead of eight.
            return self.weight.f_mul(x).at(p);
        }
        let kind = x.kind();
        let xf = x.f_to_kind(tch::Kind::Float).at(p)?;
        let var = xf.f_square().at(p)?.f_mean_dim(-1, true, None).at(p)?;
        let normed = xf.f_mul(&var.f_add_scalar(self.eps).at(p)?.f_rsqrt().at(p)?).at(p)?;
        self.weight.f_mul(&normed.f_to_kind(kind).at(p)?).at(p)
    }
}

/// An activation function, as a module so that its input and output are hook points (`mlp.act_fn`).
#[derive(Debug, Traceable)]
#[traceable(kind_fn = "kind_name")]
pub struct Activation {
    #[traceable(path)]
    path: String,
    #[traceable(skip)]
    function: ActivationFn,
}

/// The activation functions models use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationFn {
    /// `x * sigmoid(x)` (PyTorch's `SiLU`).
    Silu,
    /// GPT-2's `gelu_new`: `0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`, as transformers'
    /// `NewGELUActivation` writes it.
    GeluNew,
    /// The exact GELU `x Φ(x)` (transformers' `gelu`, `GELUActivation`; Pythia's).
    Gelu,
    /// PyTorch's tanh-approximated GELU (transformers' `gelu_pytorch_tanh`, `GELUTanh`).
    GeluTanh,
    /// `0.5 x (1 + tanh(0.7978845608 x (1 + 0.044715 x²)))` (transformers' `gelu_fast`, `FastGELUActivation`;
    /// GPT-NeoX-20B's).
    GeluFast,
    /// `max(x, 0)`.
    Relu,
}

impl ActivationFn {
    /// The function a config's `hidden_act` names (transformers' `ACT2FN` keys), if supported.
    pub fn from_hf(name: &str) -> Option<Self> {
        Some(match name {
            "silu" | "swish" => ActivationFn::Silu,
            "gelu_new" => ActivationFn::GeluNew,
            "gelu" => ActivationFn::Gelu,
            "gelu_pytorch_tanh" => ActivationFn::GeluTanh,
            "gelu_fast" => ActivationFn::GeluFast,
            "relu" => ActivationFn::Relu,
            _ => return None,
        })
    }

    /// The `hidden_act` names [`ActivationFn::from_hf`] accepts, for error messages.
    pub const HF_NAMES: &'static str = "silu, swish, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu";
}

impl Activation {
    fn kind_name(&self) -> &'static str {
        match self.function {
            ActivationFn::Silu => "SiLU",
            ActivationFn::GeluNew => "NewGELUActivation",
            ActivationFn::Gelu => "GELUActivation",
            ActivationFn::GeluTanh => "GELUTanh",
            ActivationFn::GeluFast => "FastGELUActivation",
            ActivationFn::Relu => "ReLU",
        }
    }

    /// An activation module at `path`.
    pub fn new(path: &str, function: ActivationFn) -> Self {
        Activation { path: path.to_string(), function }
    }
}

impl Forward for Activation {
    fn forward(&self, _cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor> {
        match self.function {
            ActivationFn::Silu => x.f_silu().at(&self.path),
            ActivationFn::GeluNew => gelu_new(x).at(&self.path),
            ActivationFn::Gelu => x.f_gelu("none").at(&self.path),
            ActivationFn::GeluTanh => x.f_gelu("tanh").at(&self.path),
            ActivationFn::GeluFast => gelu_fast(x).at(&self.path),
            ActivationFn::Relu => x.f_relu().at(&self.path),
        }
    }
}

/// GPT-2's `gelu_new`, with the operations of transformers' `NewGELUActivation` (so results match bit for bit).
pub fn gelu_new(x: &Tensor) -> std::result::Result<Tensor, tch::TchError> {
    let inner = x.f_pow_tensor_scalar(3.0)?.f_mul_scalar(0.044715)?.f_add(x)?;
    let t = inner.f_mul_scalar((2.0 / std::f64::consts::PI).sqrt())?.f_tanh()?;
    x.f_mul_scalar(0.5)?.f_mul(&t.f_add_scalar(1.0)?)
}

/// transformers' `gelu_fast` (`FastGELUActivation`), with its operations in its order.
pub fn gelu_fast(x: &Tensor) -> std::result::Result<Tensor, tch::TchError> {
    let inner = x.f_mul_scalar(0.044715)?.f_mul(x)?.f_add_scalar(1.0)?;
    let t = x.f_mul_scalar(0.7978845608)?.f_mul(&inner)?.f_tanh()?;
    x.f_mul_scalar(0.5)?.f_mul(&t.f_add_scalar(1.0)?)
}
