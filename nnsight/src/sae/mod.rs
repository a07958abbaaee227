//! Sparse autoencoders (dictionary learning): a wide, sparse code for a model's activations, whose features are
//! often easier to read than the model's own neurons (Bricken et al., "Towards Monosemanticity", 2023; Cunningham
//! et al., "Sparse Autoencoders Find Highly Interpretable Features in Language Models", 2023).
//!
//! An [`Sae`] holds SAELens's weights and semantics (`jbloomAus/SAELens`, `sae_lens/saes/*.py`):
//!
//! ```text
//! sae_in     = x - b_dec                       (only if apply_b_dec_to_input)
//! hidden_pre = sae_in @ W_enc + b_enc          W_enc [d_in, d_sae], b_enc [d_sae]
//! f          = ReLU(hidden_pre)                "standard"
//!            | hidden_pre * (hidden_pre > threshold)        "jumprelu" (threshold [d_sae])
//!            | ReLU of the k largest of hidden_pre, 0 elsewhere "topk"
//! x_hat      = f @ W_dec + b_dec               W_dec [d_sae, d_in], b_dec [d_in]
//! ```
//!
//! - **Files** ([`saelens`]): [`Sae::load`] reads SAELens's folder (`cfg.json` + `sae_weights.safetensors`, the
//!   format before and after SAELens 6), [`Sae::save`] writes it (SAELens 6's `cfg.json`).
//! - **In a trace** ([`graph`]): [`Sae::encode_in`], [`Sae::decode_in`], [`Sae::reconstruct_in`] and
//!   [`Sae::edit_feature_in`] take a proxy inside any `intervene!` block and give proxies; they add calls of
//!   registered graph functions ([`graph::sae_encode()`], [`graph::sae_decode()`]) with the weights as constant
//!   tensors, so the graph stays data and runs on a server too. [`Sae::splice`] and [`Sae::edit_feature`] give
//!   persistent edits, as [`crate::steering`] does.
//! - **Training** ([`train`]): activations collected with traces, an SAE fitted with Adam (L2 reconstruction plus
//!   an L1 penalty weighted by the decoder norms, or TopK), and the usual measures (variance explained, L0, dead
//!   features, the language-model loss recovered when spliced in).

pub mod graph;
pub mod saelens;
pub mod train;

pub use graph::FeatureEdit;

use crate::{Error, Result};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// The activation function of an SAE's encoder (SAELens's `architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `ReLU(hidden_pre)`: SAELens's "standard" architecture.
    Relu,
    /// `hidden_pre * (hidden_pre > threshold)` with a threshold per feature (the SAE's [`Sae::threshold`]):
    /// SAELens's "jumprelu" (Rajamanoharan et al., 2024; Gemma Scope).
    JumpRelu,
    /// The `k` largest pre-activations of each position, ReLU'd; every other feature 0: SAELens's "topk" (Gao et
    /// al., 2024).
    TopK {
        /// How many features may be active at each position.
        k: i64,
    },
}

impl Activation {
    /// SAELens's name of the architecture: `standard`, `jumprelu` or `topk`.
    pub fn architecture(&self) -> &'static str {
        match self {
            Activation::Relu => "standard",
            Activation::JumpRelu => "jumprelu",
            Activation::TopK { .. } => "topk",
        }
    }

    /// The code graph functions take for it: 0 ReLU, -1 JumpReLU, `k` (at least 1) TopK.
    pub(crate) fn code(&self) -> i64 {
        match self {
            Activation::Relu => 0,
            Activation::JumpRelu => -1,
            Activation::TopK { k } => *k,
        }
    }
}

/// Where in a decoder-layer model an SAE reads, from its `hook_name` (see [`Sae::site`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// The residual stream after decoder layer `i`: `model.layers[i].output` (TransformerLens's
    /// `blocks.i.hook_resid_post`; Hugging Face-style `model.layers.i`).
    Output(usize),
    /// The residual stream before decoder layer `i`: `model.layers[i].input` (`blocks.i.hook_resid_pre`).
    Input(usize),
}

/// A sparse autoencoder: SAELens's weights (float32, CPU) and settings. See the [module docs](self).
#[derive(Debug)]
pub struct Sae {
    /// Encoder weights, `[d_in, d_sae]`.
    pub w_enc: Tensor,
    /// Encoder bias, `[d_sae]`.
    pub b_enc: Tensor,
    /// Decoder weights, `[d_sae, d_in]`: row `i` is feature `i`'s direction in the model's activation space.
    pub w_dec: Tensor,
    /// Decoder bias, `[d_in]`.
    pub b_dec: Tensor,
    /// JumpReLU thresholds, `[d_sae]` (`None` for the other activations).
    pub threshold: Option<Tensor>,
    /// The encoder's activation function.
    pub activation: Activation,
    /// Whether `b_dec` is subtracted from the input before encoding (SAELens's `apply_b_dec_to_input`).
    pub apply_b_dec_to_input: bool,
    /// Where the SAE reads in its model, as SAELens names it (`blocks.15.hook_resid_post`) or a Hugging Face-style
    /// module path (`model.layers.15`); see [`Sae::site`].
    pub hook_name: String,
    /// The model it was trained on (SAELens's `model_name`), free text.
    pub model_name: String,
    /// The folder it was read from, if any (errors about it name the folder).
    pub source: Option<PathBuf>,
}

impl Clone for Sae {
    fn clone(&self) -> Self {
        Sae {
            w_enc: self.w_enc.copy(),
            b_enc: self.b_enc.copy(),
            w_dec: self.w_dec.copy(),
            b_dec: self.b_dec.copy(),
            threshold: self.threshold.as_ref().map(Tensor::copy),
            activation: self.activation,
            apply_b_dec_to_input: self.apply_b_dec_to_input,
            hook_name: self.hook_name.clone(),
            model_name: self.model_name.clone(),
            source: self.source.clone(),
        }
    }
}

fn float(t: &Tensor) -> Tensor {
    t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous()
}

impl Sae {
    /// An SAE from its weights (turned into float32 CPU tensors), checked against each other: `w_enc [d_in, d_sae]`,
    /// `b_enc [d_sae]`, `w_dec [d_sae, d_in]`, `b_dec [d_in]`, a `threshold [d_sae]` exactly when the activation is
    /// JumpReLU, and `0 < k <= d_sae` for TopK. `hook_name` says where it reads (see [`Sae::site`]).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] naming the tensor whose shape disagrees; [`Error::InvalidInput`] for a missing or
    /// extra threshold or a bad `k`.
    pub fn new(
        w_enc: &Tensor,
        b_enc: &Tensor,
        w_dec: &Tensor,
        b_dec: &Tensor,
        threshold: Option<&Tensor>,
        activation: Activation,
        hook_name: impl Into<String>,
    ) -> Result<Self> {
        if w_enc.dim() != 2 {
            return Err(Error::InvalidInput {
                message: format!("sae: W_enc must be [d_in, d_sae], given shape {:?}", w_enc.size()),
            });
        }
        let (d_in, d_sae) = (w_enc.size()[0], w_enc.size()[1]);
        let sae = Sae {
            w_enc: float(w_enc),
            b_enc: float(b_enc),
            w_dec: float(w_dec),
            b_dec: float(b_dec),
            threshold: threshold.map(float),
            activation,
            apply_b_dec_to_input: true,
            hook_name: hook_name.into(),
            model_name: String::new(),
            source: None,
        };
        sae.check_shapes(d_in, d_sae, |message| Error::InvalidInput { message: format!("sae: {message}") })?;
        Ok(sae)
    }

    /// Checks every tensor against `d_in` and `d_sae`; `invalid` makes the error of a bad setting.
    pub(crate) fn check_shapes(&self, d_in: i64, d_sae: i64, invalid: impl Fn(String) -> Error) -> Result<()> {
        let shapes: [(&str, &Tensor, Vec<i64>); 4] = [
            ("W_enc", &self.w_enc, vec![d_in, d_sae]),
            ("b_enc", &self.b_enc, vec![d_sae]),
            ("W_dec", &self.w_dec, vec![d_sae, d_in]),
            ("b_dec", &self.b_dec, vec![d_in]),
        ];
        for (name, t, expected) in shapes {
            if t.size() != expected {
                return Err(Error::ShapeMismatch { name: self.name_of(name), expected, found: t.size() });
            }
        }
        match (&self.threshold, self.activation) {
            (Some(t), Activation::JumpRelu) if t.size() != [d_sae] => {
                return Err(Error::ShapeMismatch {
                    name: self.name_of("threshold"),
                    expected: vec![d_sae],
                    found: t.size(),
                })
            }
            (None, Activation::JumpRelu) => return Err(invalid("a JumpReLU SAE needs a `threshold` [d_sae]".into())),
            (Some(_), Activation::Relu | Activation::TopK { .. }) => {
                return Err(invalid(format!(
                    "a `threshold` was given, but the architecture is `{}` (only `jumprelu` has one)",
                    self.activation.architecture()
                )))
            }
            _ => {}
        }
        if let Activation::TopK { k } = self.activation {
            if k <= 0 || k > d_sae {
                return Err(invalid(format!("topk: k must be between 1 and d_sae = {d_sae}, given {k}")));
            }
        }
        Ok(())
    }

    /// A tensor's name in errors: `folder/sae_weights.safetensors: W_enc` for a loaded SAE, else `sae W_enc`.
    fn name_of(&self, tensor: &str) -> String {
        match &self.source {
            Some(dir) => format!("{}: {tensor}", dir.join(saelens::WEIGHTS_FILE).display()),
            None => format!("sae {tensor}"),
        }
    }

    /// The width of the activations it reads (`d_in`).
    pub fn d_in(&self) -> i64 {
        self.w_enc.size()[0]
    }

    /// The number of features (`d_sae`).
    pub fn d_sae(&self) -> i64 {
        self.w_enc.size()[1]
    }

    /// Where it reads in a decoder-layer model, from its `hook_name`: `blocks.N.hook_resid_post`,
    /// `model.layers.N`, `model.layers.N.output` or `layers.N` are the output of layer N;
    /// `blocks.N.hook_resid_pre` and `model.layers.N.input` its input. `None` for any other hook (attention or MLP
    /// hooks, `hook_z`): splice those by hand with [`Sae::reconstruct_in`].
    pub fn site(&self) -> Option<Site> {
        let parts: Vec<&str> = self.hook_name.split('.').collect();
        let layer = |s: &str| s.parse::<usize>().ok();
        match parts.as_slice() {
            ["blocks", n, "hook_resid_post"] | ["model", "layers", n] | ["layers", n] => layer(n).map(Site::Output),
            ["model", "layers", n, "output"] | ["layers", n, "output"] => layer(n).map(Site::Output),
            ["blocks", n, "hook_resid_pre"] | ["model", "layers", n, "input"] | ["layers", n, "input"] => {
                layer(n).map(Site::Input)
            }
            _ => None,
        }
    }

    /// Checks that `x`'s last dimension is `d_in`.
    fn check_input(&self, x: &Tensor, what: &str) -> Result<()> {
        let last = x.size().last().copied();
        if last != Some(self.d_in()) {
            return Err(Error::InvalidInput {
                message: format!(
                    "sae {what}: the input's last dimension must be d_in = {}, given shape {:?}",
                    self.d_in(),
                    x.size()
                ),
            });
        }
        Ok(())
    }

    /// The pre-activations `(x - b_dec) @ W_enc + b_enc`, `[..., d_sae]`, in float32.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when `x`'s last dimension is not `d_in`.
    pub fn hidden_pre(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x, "encode")?;
        Ok(graph::hidden_pre(&float(x), &self.w_enc, &self.b_enc, &self.input_bias()))
    }

    /// The feature activations of `x` (`[..., d_in]` → `[..., d_sae]`), in `x`'s dtype.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when `x`'s last dimension is not `d_in`.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x, "encode")?;
        graph::sae_encode(
            x,
            &self.w_enc,
            &self.b_enc,
            &self.input_bias(),
            &self.threshold_or_empty(),
            self.activation.code(),
        )
    }

    /// The reconstruction `f @ W_dec + b_dec` of feature activations `f` (`[..., d_sae]` → `[..., d_in]`), in `f`'s
    /// dtype.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when `f`'s last dimension is not `d_sae`.
    pub fn decode(&self, f: &Tensor) -> Result<Tensor> {
        if f.size().last().copied() != Some(self.d_sae()) {
            return Err(Error::InvalidInput {
                message: format!(
                    "sae decode: the input's last dimension must be d_sae = {}, given shape {:?}",
                    self.d_sae(),
                    f.size()
                ),
            });
        }
        graph::sae_decode(f, &self.w_dec, &self.b_dec)
    }

    /// The reconstruction of `x`: `decode(encode(x))`.
    ///
    /// # Errors
    /// As [`Sae::encode`].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.decode(&self.encode(x)?)
    }

    /// What is subtracted from the input before encoding: `b_dec` if `apply_b_dec_to_input`, else zeros.
    fn input_bias(&self) -> Tensor {
        if self.apply_b_dec_to_input {
            self.b_dec.shallow_clone()
        } else {
            self.b_dec.zeros_like()
        }
    }

    /// The threshold, or an empty tensor (what the graph function takes when there is none).
    fn threshold_or_empty(&self) -> Tensor {
        self.threshold.as_ref().map_or_else(|| Tensor::zeros([0], (Kind::Float, Device::Cpu)), Tensor::shallow_clone)
    }
}
