//! Steering vectors: a direction per decoder layer, added to the residual stream to push a model's behaviour one
//! way (happy rather than sad, formal rather than casual), found here and taken out of the lab as a llama.cpp
//! control vector.
//!
//! - **The recipe** ([`SteeringVector::contrastive`]): given pairs of prompts (positive, negative), the difference
//!   of the mean activations of the positives and of the negatives, per layer, read at the output of each decoder
//!   layer (`model.layers[i].output`, the [standard name](crate::models::standard) every architecture has: the
//!   residual stream after the layer). [`Pooling`] says which tokens of a prompt count: its last token (as repeng's
//!   `read_representations` reads `hidden_states[i + 1][last non-padding token]`), or the mean over all its tokens
//!   (as llama.cpp's `cvector-generator --method mean` averages over every token of each pair). The directions are
//!   the plain mean differences (not normalized: [`SteeringVector::normalized`] gives unit-norm ones, as
//!   `cvector-generator`'s mean method writes).
//! - **Applying it** with a strength `s`: `model.layers[i].output += s * direction[i]` for every listed layer, at
//!   every position of every row (and at every step of a generation, on the new token's position). As a
//!   persistent edit ([`SteeringVector::edit`], [`SteeringVector::edit_in_place`]) every trace, `forward` and
//!   `generate` of the edited model applies it; by hand in any `intervene!` block, [`SteeringVector::additions`]
//!   gives the tensors to add.
//! - **llama.cpp control vectors** ([`control_vector`]): [`SteeringVector::write_control_vector`] and
//!   [`SteeringVector::read_control_vector`], the GGUF files `llama-cli --control-vector` reads; see there for
//!   the format and which layer each `direction.N` steers.

pub mod control_vector;

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::envoy::Edited;
use crate::language_model::LanguageModel;
use crate::models::CausalLm;
use crate::{intervene, Error, Result};
use tch::{Device, IndexOp, Kind, Tensor};

/// Which tokens of a prompt the recipe averages (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pooling {
    /// The prompt's last token only (repeng's choice; the activation that predicts what comes next).
    #[default]
    LastToken,
    /// The mean over all the prompt's tokens (llama.cpp `cvector-generator --method mean`'s choice).
    AllTokens,
}

/// A direction per decoder layer, `[hidden]` each, in float32 on the CPU: what
/// [`SteeringVector::contrastive`] computes and a llama.cpp control vector holds.
#[derive(Debug)]
pub struct SteeringVector {
    /// The directions, by layer index (`model.layers[i]`, counted from 0).
    pub directions: BTreeMap<usize, Tensor>,
    /// The model family it was made for: a control vector's `controlvector.model_hint` (llama.cpp writes the
    /// model's `general.architecture`, repeng its `model_type`; neither reader checks it).
    pub model_hint: String,
    /// The file it was read from, if any (errors about it name the file).
    pub source: Option<PathBuf>,
}

impl Clone for SteeringVector {
    fn clone(&self) -> Self {
        let directions = self.directions.iter().map(|(l, d)| (*l, d.copy())).collect();
        SteeringVector { directions, model_hint: self.model_hint.clone(), source: self.source.clone() }
    }
}

impl SteeringVector {
    /// A vector from directions by layer (each turned into a float32 `[hidden]` tensor on the CPU).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when there is no direction, one is not one-dimensional, or their sizes differ.
    pub fn new(model_hint: impl Into<String>, directions: BTreeMap<usize, Tensor>) -> Result<Self> {
        let directions: BTreeMap<usize, Tensor> = directions
            .into_iter()
            .map(|(l, d)| (l, d.to_device(Device::Cpu).to_kind(Kind::Float).contiguous()))
            .collect();
        let invalid = |message: String| Error::InvalidInput { message: format!("steering vector: {message}") };
        let Some(first) = directions.values().next() else {
            return Err(invalid("no direction given".into()));
        };
        let hidden = first.size();
        for (l, d) in &directions {
            if d.dim() != 1 || d.size() != hidden {
                return Err(invalid(format!(
                    "the direction of layer {l} has shape {:?}; every direction must be one-dimensional, of shape \
                     {hidden:?} like the first",
                    d.size()
                )));
            }
        }
        Ok(SteeringVector { directions, model_hint: model_hint.into(), source: None })
    }

    /// The contrastive recipe at layers `1..n_layers` (llama.cpp never steers layer 0, and repeng's default
    /// leaves it out too): for each layer, the mean activation of the positive prompts minus that of the
    /// negative ones, at the layer's output, pooled over each prompt's tokens as `pooling` says.
    ///
    /// Each prompt runs as its own trace (no padding), in float32 if the model is.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when `pairs` is empty or a prompt has no tokens; errors of the traces.
    pub fn contrastive<M: CausalLm>(
        model: &LanguageModel<M>,
        pairs: &[(&str, &str)],
        pooling: Pooling,
    ) -> Result<Self> {
        let n = model.standard_names().n_layers;
        Self::contrastive_at(model, pairs, pooling, &(1..n).collect::<Vec<_>>())
    }

    /// The contrastive recipe at the given layers (layer 0 included if asked for); see
    /// [`SteeringVector::contrastive`].
    ///
    /// # Errors
    /// As [`SteeringVector::contrastive`]; [`Error::IndexOutOfRange`] for a layer beyond the model.
    pub fn contrastive_at<M: CausalLm>(
        model: &LanguageModel<M>,
        pairs: &[(&str, &str)],
        pooling: Pooling,
        layers: &[usize],
    ) -> Result<Self> {
        if pairs.is_empty() || layers.is_empty() {
            return Err(Error::InvalidInput {
                message: format!(
                    "steering vector: the recipe needs at least one pair of prompts and one layer, given {} pairs \
                     and {} layers",
                    pairs.len(),
                    layers.len()
                ),
            });
        }
        let pooled = |prompt: &str| -> Result<Vec<Tensor>> {
            let ids = model.encode(prompt)?;
            if ids.is_empty() {
                return Err(Error::InvalidInput {
                    message: format!("steering vector: the prompt {prompt:?} has no tokens"),
                });
            }
            intervene!(model.trace(ids) {
                let mut outputs = Vec::new();
                for &l in layers {
                    outputs.push(model.layers[l].output.i(0).save()); // [seq, hidden]
                }
            });
            Ok(outputs
                .iter()
                .map(|h| {
                    let h = h.to_device(Device::Cpu).to_kind(Kind::Float);
                    match pooling {
                        Pooling::LastToken => h.i(-1),
                        Pooling::AllTokens => h.mean_dim(0, false, Kind::Float),
                    }
                })
                .collect())
        };
        // by_layer[j] = (positives, negatives) of layers[j]
        let mut by_layer: Vec<(Vec<Tensor>, Vec<Tensor>)> = layers.iter().map(|_| (Vec::new(), Vec::new())).collect();
        for (positive, negative) in pairs {
            for (j, h) in pooled(positive)?.into_iter().enumerate() {
                by_layer[j].0.push(h);
            }
            for (j, h) in pooled(negative)?.into_iter().enumerate() {
                by_layer[j].1.push(h);
            }
        }
        let directions = layers
            .iter()
            .zip(by_layer)
            .map(|(&l, (pos, neg))| {
                let mean = |v: &[Tensor]| Tensor::stack(v, 0).mean_dim(0, false, Kind::Float);
                (l, mean(&pos) - mean(&neg))
            })
            .collect();
        Self::new(model_hint_of(model), directions)
    }

    /// The layers it steers, in order.
    pub fn layers(&self) -> Vec<usize> {
        self.directions.keys().copied().collect()
    }

    /// The length of each direction (the model's hidden size).
    pub fn hidden_size(&self) -> i64 {
        self.directions.values().next().map_or(0, |d| d.size()[0])
    }

    /// Only the directions of the layers in `layers` (`1..`, `10..20`).
    pub fn select(&self, layers: impl std::ops::RangeBounds<usize>) -> Self {
        let mut out = self.clone();
        out.directions.retain(|l, _| layers.contains(l));
        out
    }

    /// Every direction multiplied by `factor`.
    pub fn scaled(&self, factor: f64) -> Self {
        let mut out = self.clone();
        for d in out.directions.values_mut() {
            *d = &*d * factor;
        }
        out
    }

    /// Every direction divided by its Euclidean norm (a zero direction stays zero), as llama.cpp's
    /// `cvector-generator` writes them.
    pub fn normalized(&self) -> Self {
        let mut out = self.clone();
        for d in out.directions.values_mut() {
            let norm = d.norm().double_value(&[]);
            if norm > 0.0 {
                *d = &*d / norm;
            }
        }
        out
    }

    /// What a steered forward pass adds: for each layer, `strength * direction` in the model's dtype and on its
    /// device, to add to `model.layers[layer].output` (it broadcasts over rows and positions). The by-hand form
    /// of [`SteeringVector::edit`], for use inside any `intervene!` block:
    ///
    /// ```no_run
    /// # use nnsight::prelude::*;
    /// # use nnsight::steering::SteeringVector;
    /// # fn main() -> nnsight::Result<()> {
    /// # let model = LanguageModel::<Llama>::load("models/SmolLM2-135M-Instruct.Q4_1.gguf")?;
    /// let vector = SteeringVector::read_control_vector("target/steering/happy.gguf")?;
    /// let additions = vector.additions(&model, 4.0)?;
    /// intervene!(model.trace("I feel") {
    ///     for (layer, add) in &additions {
    ///         model.layers[*layer].output += add;
    ///     }
    ///     let logits = model.output.save();
    /// });
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::Format`] naming the file (or [`Error::InvalidInput`] for a vector made here) when a layer is beyond
    /// the model's or the hidden size is not the model's.
    pub fn additions<M: CausalLm>(&self, model: &LanguageModel<M>, strength: f64) -> Result<Vec<(usize, Tensor)>> {
        let kind = self.check(model)?;
        Ok(self.directions.iter().map(|(l, d)| (*l, (d * strength).to_kind(kind).to_device(model.device()))).collect())
    }

    /// An edited model that adds `strength * direction` to each listed layer's output in every later forward pass
    /// of it: traces, `forward`, every step of `generate` (see [`SteeringVector::additions`] for the errors).
    pub fn edit<'m, M: CausalLm>(
        &self,
        model: &'m LanguageModel<M>,
        strength: f64,
    ) -> Result<Edited<'m, LanguageModel<M>>> {
        let additions = self.additions(model, strength)?;
        let edited = intervene!(model.edit() {
            for (layer, add) in &additions {
                model.layers[*layer].output += add;
            }
        });
        Ok(edited)
    }

    /// Adds the steering to the model itself, as [`SteeringVector::edit`] does to an edited copy;
    /// `model.clear_edits()` takes it off.
    pub fn edit_in_place<M: CausalLm>(&self, model: &LanguageModel<M>, strength: f64) -> Result<()> {
        let additions = self.additions(model, strength)?;
        intervene!(model.edit_in_place() {
            for (layer, add) in &additions {
                model.layers[*layer].output += add;
            }
        });
        Ok(())
    }

    /// Checks that the vector fits `model` (layers within the model, the model's hidden size), and gives the
    /// dtype of the model's layer outputs.
    fn check<M: CausalLm>(&self, model: &LanguageModel<M>) -> Result<Kind> {
        let n_layers = model.standard_names().n_layers;
        intervene!(model.scan(vec![0_i64]) {
            let shape = model.layers[0].output.save();
        });
        let hidden = *shape.size().last().unwrap_or(&0);
        let wrong = |message: String| match &self.source {
            Some(path) => Error::format(path, message),
            None => Error::InvalidInput { message: format!("steering vector: {message}") },
        };
        if let Some(&beyond) = self.directions.keys().find(|&&l| l >= n_layers) {
            return Err(wrong(format!(
                "{} steers layer {beyond}, but the model has {n_layers} layers (0 to {})",
                self.what(beyond),
                n_layers - 1
            )));
        }
        if self.hidden_size() != hidden {
            let first = *self.directions.keys().next().unwrap_or(&0);
            return Err(wrong(format!(
                "{} has {} values, but this model's hidden size is {hidden} (a vector made for another model?{})",
                self.what(first),
                self.hidden_size(),
                if self.model_hint.is_empty() { String::new() } else { format!(" its hint is `{}`", self.model_hint) }
            )));
        }
        Ok(shape.kind())
    }

    /// How a layer's direction is named in messages: `direction.N` for a file, else `the direction of layer N`.
    fn what(&self, layer: usize) -> String {
        match self.source {
            Some(_) => format!("direction.{layer}"),
            None => format!("the direction of layer {layer}"),
        }
    }
}

/// The model's family as a control vector's hint: `model_type` from its config (what repeng writes), else the
/// architecture's name.
fn model_hint_of<M: CausalLm>(model: &LanguageModel<M>) -> String {
    match model.config_json().get("model_type").and_then(|v| v.as_str()) {
        Some(t) => t.to_string(),
        None => M::ARCHITECTURE.to_string(),
    }
}
