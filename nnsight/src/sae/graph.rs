//! An SAE inside a trace: graph functions registered by this crate (so a server built with nnsight runs them too),
//! the [`Sae`] methods that add calls of them to an `intervene!` block, and persistent edits.
//!
//! ```no_run
//! use nnsight::prelude::*;
//! use nnsight::sae::{FeatureEdit, Sae};
//!
//! # fn main() -> nnsight::Result<()> {
//! let model = LanguageModel::<Llama>::load("models/SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let sae = Sae::load("tests/data/sae/smollm2-layer5")?;
//! intervene!(model.trace("The Eiffel Tower is in the city of") {
//!     let h = model.layers[5].output;
//!     let features = sae.encode_in(h).save();                              // [1, seq, d_sae]
//!     model.layers[5].output = sae.edit_feature_in(h, 7, FeatureEdit::Scale(0.0)); // feature 7 off, error kept
//!     let logits = model.output.save();
//! });
//! # Ok(())
//! # }
//! ```
//!
//! The weights travel in the graph as constant tensors (float32), once per call: a graph that calls an SAE of
//! `d_sae` features carries about `8 * d_in * d_sae` bytes per encode-and-decode.

use super::{Sae, Site};
use crate::envoy::Edited;
use crate::handle::Proxy;
use crate::language_model::LanguageModel;
use crate::models::CausalLm;
use crate::{intervene, Error, Result};
use tch::{IndexOp, Kind, Tensor};

/// `(x - input_bias) @ W_enc + b_enc` in float32 on `x`'s device (`input_bias` is `b_dec` when SAELens's
/// `apply_b_dec_to_input` holds, else zeros).
pub(crate) fn hidden_pre(x: &Tensor, w_enc: &Tensor, b_enc: &Tensor, input_bias: &Tensor) -> Tensor {
    let device = x.device();
    let sae_in = x.to_kind(Kind::Float) - input_bias.to_device(device).to_kind(Kind::Float);
    sae_in.matmul(&w_enc.to_device(device).to_kind(Kind::Float)) + b_enc.to_device(device).to_kind(Kind::Float)
}

/// The activation `code` (0 ReLU, -1 JumpReLU, `k` >= 1 TopK) applied to pre-activations.
pub(crate) fn activate(pre: &Tensor, code: i64, threshold: &Tensor) -> Result<Tensor> {
    Ok(match code {
        0 => pre.relu(),
        -1 => {
            let threshold = threshold.to_device(pre.device()).to_kind(Kind::Float);
            pre * pre.gt_tensor(&threshold).to_kind(Kind::Float)
        }
        k if k > 0 => {
            let d_sae = pre.size().last().copied().unwrap_or(0);
            if k > d_sae {
                return Err(Error::InvalidInput { message: format!("sae topk: k must be in 1..={d_sae}, given {k}") });
            }
            let (values, indices) = pre.topk(k, -1, true, true);
            pre.zeros_like().scatter(-1, &indices, &values.relu())
        }
        other => {
            return Err(Error::InvalidInput {
                message: format!("sae: activation code {other} is unknown (0 ReLU, -1 JumpReLU, k >= 1 TopK)"),
            })
        }
    })
}

/// An SAE's encoder as a graph function: the feature activations of `x` (`[..., d_in]` → `[..., d_sae]`, in `x`'s
/// dtype), `(x - input_bias) @ W_enc + b_enc` through `activation` 0 (ReLU), -1 (JumpReLU with `threshold`) or
/// `k` >= 1 (TopK). [`Sae::encode_in`] adds calls of it; [`Sae::encode`] is the same computation outside a trace.
#[crate::function]
pub fn sae_encode(
    x: &Tensor,
    w_enc: &Tensor,
    b_enc: &Tensor,
    input_bias: &Tensor,
    threshold: &Tensor,
    activation: i64,
) -> Result<Tensor> {
    let d_in = w_enc.size().first().copied();
    if x.size().last().copied() != d_in {
        return Err(Error::InvalidInput {
            message: format!(
                "sae encode: the input's last dimension must be d_in = {d_in:?}, given shape {:?}",
                x.size()
            ),
        });
    }
    let pre = hidden_pre(x, w_enc, b_enc, input_bias);
    Ok(activate(&pre, activation, threshold)?.to_kind(x.kind()))
}

/// An SAE's decoder as a graph function: `f @ W_dec + b_dec` (`[..., d_sae]` → `[..., d_in]`, in `f`'s dtype).
#[crate::function]
pub fn sae_decode(f: &Tensor, w_dec: &Tensor, b_dec: &Tensor) -> Result<Tensor> {
    let device = f.device();
    let out = f.to_kind(Kind::Float).f_matmul(&w_dec.to_device(device).to_kind(Kind::Float)).map_err(|e| {
        Error::InvalidInput { message: format!("sae decode: {}", crate::error::clean_torch_message(&e.to_string())) }
    })? + b_dec.to_device(device).to_kind(Kind::Float);
    Ok(out.to_kind(f.kind()))
}

/// One feature changed and decoded back with the error term kept, as a graph function: with `fi` feature
/// `feature` of `f` and `new` either `value` (set) or `value * fi` (`scale`), `x + (new - fi) * direction`, which
/// equals `decode(f with feature i = new) + (x - decode(f))`. `direction` is `W_dec[feature]`.
#[crate::function]
pub fn sae_edit_feature(
    x: &Tensor,
    f: &Tensor,
    direction: &Tensor,
    feature: i64,
    value: f64,
    scale: bool,
) -> Result<Tensor> {
    let d_sae = f.size().last().copied().unwrap_or(0);
    if feature < 0 || feature >= d_sae {
        return Err(feature_out_of_range(feature, d_sae));
    }
    let fi = f.narrow(-1, feature, 1).to_kind(Kind::Float);
    let new = if scale { &fi * value } else { fi.full_like(value) };
    let delta = (new - fi) * direction.to_device(x.device()).to_kind(Kind::Float);
    Ok((x.to_kind(Kind::Float) + delta).to_kind(x.kind()))
}

fn feature_out_of_range(feature: i64, d_sae: i64) -> Error {
    Error::InvalidInput {
        message: format!("sae: feature {feature} is out of range, the SAE has {d_sae} features (0 to {})", d_sae - 1),
    }
}

/// How [`Sae::edit_feature_in`] changes a feature.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FeatureEdit {
    /// The feature's activation becomes this value at every position (clamping, as in "Golden Gate Claude").
    Set(f64),
    /// The feature's activation is multiplied by this factor (0 ablates it).
    Scale(f64),
}

impl Sae {
    /// Inside an `intervene!` block: the feature activations of `x` (a proxy of `[..., d_in]`), `[..., d_sae]`.
    pub fn encode_in<'g>(&self, x: Proxy<'g, Tensor>) -> Proxy<'g, Tensor> {
        let threshold = self.threshold_or_empty();
        sae_encode::call(x.g, x, &self.w_enc, &self.b_enc, self.input_bias(), &threshold, self.activation.code())
    }

    /// Inside an `intervene!` block: the reconstruction of feature activations `f`, `[..., d_in]`.
    pub fn decode_in<'g>(&self, f: Proxy<'g, Tensor>) -> Proxy<'g, Tensor> {
        sae_decode::call(f.g, f, &self.w_dec, &self.b_dec)
    }

    /// Inside an `intervene!` block: the SAE's reconstruction of `x` (what replaces an activation when the SAE is
    /// spliced in without its error term).
    pub fn reconstruct_in<'g>(&self, x: Proxy<'g, Tensor>) -> Proxy<'g, Tensor> {
        self.decode_in(self.encode_in(x))
    }

    /// Inside an `intervene!` block: `x` with feature `feature` set or scaled and decoded back, the SAE's error
    /// term kept (so the rest of `x` is unchanged): `decode(f') + (x - decode(f))`, as SAELens's hooked splicing
    /// with `use_error_term` gives. A feature beyond `d_sae` is an error when the graph runs.
    pub fn edit_feature_in<'g>(&self, x: Proxy<'g, Tensor>, feature: i64, edit: FeatureEdit) -> Proxy<'g, Tensor> {
        let f = self.encode_in(x);
        let in_range = (0..self.d_sae()).contains(&feature);
        let direction = if in_range { self.w_dec.i(feature) } else { self.w_dec.i(0).zeros_like() };
        let (value, scale) = match edit {
            FeatureEdit::Set(v) => (v, false),
            FeatureEdit::Scale(s) => (s, true),
        };
        // Out of range, the direction is a placeholder and the function's own check gives the error.
        sae_edit_feature::call(x.g, x, f, &direction, feature, value, scale)
    }

    /// Checks that it fits `model` (its site within the model's layers, `d_in` the model's width), and gives its
    /// site.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (or [`Error::Format`] naming the folder it was read from) when its `hook_name` is not
    /// a residual-stream site (see [`Sae::site`]), the layer is beyond the model's, or `d_in` is not the model's
    /// hidden size.
    pub fn check<M: CausalLm>(&self, model: &LanguageModel<M>) -> Result<Site> {
        let wrong = |message: String| match &self.source {
            Some(dir) => Error::format(dir.join(super::saelens::CFG_FILE), message),
            None => Error::InvalidInput { message: format!("sae: {message}") },
        };
        let site = self.site().ok_or_else(|| {
            wrong(format!(
                "hook_name `{}` is not a residual-stream site this runtime splices by itself (blocks.N.hook_resid_post, \
                 blocks.N.hook_resid_pre, model.layers.N); splice it by hand with Sae::reconstruct_in",
                self.hook_name
            ))
        })?;
        let n_layers = model.standard_names().n_layers;
        let layer = match site {
            Site::Output(l) | Site::Input(l) => l,
        };
        if layer >= n_layers {
            return Err(wrong(format!(
                "hook_name `{}` is at layer {layer}, but the model has {n_layers} layers (0 to {})",
                self.hook_name,
                n_layers - 1
            )));
        }
        intervene!(model.scan(vec![0_i64]) {
            let shape = model.layers[0].output.save();
        });
        let hidden = shape.size().last().copied().unwrap_or(0);
        if hidden != self.d_in() {
            return Err(wrong(format!(
                "d_in is {}, but this model's hidden size is {hidden} (an SAE made for another model?{})",
                self.d_in(),
                if self.model_name.is_empty() {
                    String::new()
                } else {
                    format!(" its model_name is `{}`", self.model_name)
                }
            )));
        }
        Ok(site)
    }

    /// An edited model whose every later forward pass (traces, `forward`, `generate`) replaces the SAE's site by its
    /// reconstruction at every position (see [`Sae::check`] for the errors).
    pub fn splice<'m, M: CausalLm>(&self, model: &'m LanguageModel<M>) -> Result<Edited<'m, LanguageModel<M>>> {
        let site = self.check(model)?;
        Ok(match site {
            Site::Output(l) => intervene!(model.edit() {
                let h = model.layers[l].output;
                model.layers[l].output = self.reconstruct_in(h);
            }),
            Site::Input(l) => intervene!(model.edit() {
                let h = model.layers[l].input;
                model.layers[l].input = self.reconstruct_in(h);
            }),
        })
    }

    /// An edited model whose every later forward pass sets or scales feature `feature` at the SAE's site, keeping
    /// the error term ([`Sae::edit_feature_in`]).
    ///
    /// # Errors
    /// As [`Sae::check`]; [`Error::InvalidInput`] for a feature beyond `d_sae`.
    pub fn edit_feature<'m, M: CausalLm>(
        &self,
        model: &'m LanguageModel<M>,
        feature: i64,
        edit: FeatureEdit,
    ) -> Result<Edited<'m, LanguageModel<M>>> {
        if !(0..self.d_sae()).contains(&feature) {
            return Err(feature_out_of_range(feature, self.d_sae()));
        }
        let site = self.check(model)?;
        Ok(match site {
            Site::Output(l) => intervene!(model.edit() {
                let h = model.layers[l].output;
                model.layers[l].output = self.edit_feature_in(h, feature, edit);
            }),
            Site::Input(l) => intervene!(model.edit() {
                let h = model.layers[l].input;
                model.layers[l].input = self.edit_feature_in(h, feature, edit);
            }),
        })
    }
}
