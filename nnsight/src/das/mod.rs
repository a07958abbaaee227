//! Boundless distributed alignment search (Wu, Geiger, Icard, Potts and Goodman, "Interpretability at Scale:
//! Identifying Causal Mechanisms in Alpaca", 2023; pyvene's `BoundlessRotatedSpaceIntervention`): find, in the
//! hidden state at one layer and position, a linear subspace that carries a causal variable of the task, by
//! training a rotation and a boundary with interchange interventions.
//!
//! **The intervention.** A (base, source) [`Pair`] of prompts: the base prompt runs, and at the decoder layer's
//! output (`model.layers[layer].output`, the residual stream after the layer, on every architecture) at the pair's
//! position, its hidden state `h_b` becomes
//!
//! ```text
//! h' = ((1 − m) ⊙ (h_b R) + m ⊙ (h_s R)) Rᵀ
//! ```
//!
//! with `h_s` the source prompt's hidden state at the same site, `R` an orthogonal [`Rotation`] and `m` the mask of
//! a [`Boundary`] over the rotated dimensions ([`interchange`]): the first dimensions of the rotated space come from
//! the source, the others stay the base's. The pair's `label` is the counterfactual answer, what the task's causal
//! model says when the variable takes the source's value (for "the capital of X", the source country's capital).
//!
//! **Training** ([`BoundlessDas::train`], [`TrainConfig`]): the cross-entropy of the label at the base prompt's
//! last position, plus `boundary_penalty ·` the boundary as a fraction of the width (which keeps the subspace
//! small), minimised with Adam over the rotation's and the boundary's parameters while the mask's temperature is
//! annealed from hot to cold, as pyvene's tutorials do. Each step is one `intervene!` trace of a batch of base
//! prompts in which the rotation, the mask and the source part are trainable tensors used live, so `loss.backward()`
//! inside the trace reaches them. The source states do not depend on what is trained: they are read once.
//!
//! **Evaluation** ([`BoundlessDas::iia`]): interchange-intervention accuracy, the fraction of pairs whose argmax
//! next token after the intervention (with the hard mask: exactly [`Boundary::dims`] rotated dimensions swapped) is
//! the label. The same with another rotation (a random one, [`Rotation::random`]) and the same number of
//! dimensions is the baseline that says whether training found anything; a boundary at full width swaps the whole
//! hidden state, which is plain activation patching.

mod rotation;
mod train;

pub use rotation::{interchange, Boundary, Rotation};
pub use train::{StepLog, TrainConfig};

use crate::language_model::LanguageModel;
use crate::models::CausalLm;
use crate::{intervene, Error, Result};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// Rows per forward pass when reading sources and evaluating.
const CHUNK: usize = 64;

/// One interchange: run `base`, put the source's subspace in at the site, expect `label` next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// The base prompt's token ids.
    pub base: Vec<i64>,
    /// The position intervened on in the base prompt (negative counts from the end: `-1` is its last token).
    pub base_position: i64,
    /// The source prompt's token ids.
    pub source: Vec<i64>,
    /// The position read in the source prompt (negative counts from the end).
    pub source_position: i64,
    /// The counterfactual next token: the answer when the variable takes the source's value.
    pub label: i64,
}

impl Pair {
    /// A pair intervened on at the same position in both prompts.
    pub fn new(base: Vec<i64>, source: Vec<i64>, position: i64, label: i64) -> Self {
        Pair { base, base_position: position, source, source_position: position, label }
    }
}

/// What an interchange run gives, one row per pair.
#[derive(Debug)]
pub struct Interchanged {
    /// The last position's logits after the intervention, `[pairs, vocab]` float32 on the CPU.
    pub logits: Tensor,
    /// The intervened hidden state `h'` at the site, `[pairs, hidden]` float32 on the CPU.
    pub hidden: Tensor,
}

/// A boundless DAS experiment at one decoder layer of a model: its [`Rotation`] and [`Boundary`] (see the
/// [module docs](self)).
pub struct BoundlessDas<'m, M: CausalLm> {
    model: &'m LanguageModel<M>,
    layer: usize,
    hidden: i64,
    vocab: i64,
    kind: Kind,
    /// The rotation (trained by [`BoundlessDas::train`]).
    pub rotation: Rotation,
    /// The boundary (trained by [`BoundlessDas::train`]).
    pub boundary: Boundary,
}

impl<'m, M: CausalLm> BoundlessDas<'m, M> {
    /// An experiment at the output of decoder layer `layer`, starting from a random rotation (drawn with `seed`)
    /// and a boundary at half the hidden size (pyvene's start).
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for a layer beyond the model's.
    pub fn new(model: &'m LanguageModel<M>, layer: usize, seed: u64) -> Result<Self> {
        let (hidden, _, _) = Self::shape(model, layer)?;
        Self::with_parts(model, layer, Rotation::random(hidden, seed)?, Boundary::new(hidden, hidden as f64 / 2.0)?)
    }

    /// An experiment with a given rotation and boundary (e.g. a random rotation with a trained boundary's size,
    /// or a fixed one read from a file).
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for a layer beyond the model's; [`Error::InvalidInput`] when the rotation or the
    /// boundary is not of the model's hidden size.
    pub fn with_parts(
        model: &'m LanguageModel<M>,
        layer: usize,
        rotation: Rotation,
        boundary: Boundary,
    ) -> Result<Self> {
        let (hidden, vocab, kind) = Self::shape(model, layer)?;
        if rotation.dim() != hidden || boundary.dim() != hidden {
            return Err(Error::InvalidInput {
                message: format!(
                    "das: the rotation ({0}x{0}) and the boundary (over {1} dimensions) must be of the hidden size of \
                     model.layers.{layer}.output, {hidden}",
                    rotation.dim(),
                    boundary.dim()
                ),
            });
        }
        Ok(BoundlessDas { model, layer, hidden, vocab, kind, rotation, boundary })
    }

    /// The hidden size, the vocabulary size and the dtype at the site, from a scan (shapes only).
    fn shape(model: &LanguageModel<M>, layer: usize) -> Result<(i64, i64, Kind)> {
        let n_layers = model.standard_names().n_layers;
        if layer >= n_layers {
            return Err(Error::IndexOutOfRange {
                module: "model.layers".into(),
                index: layer as i64,
                len: n_layers,
                dim: None,
            });
        }
        intervene!(model.scan(vec![0_i64]) {
            let h = model.layers[layer].output.save();
            let logits = model.output.save();
        });
        Ok((*h.size().last().unwrap_or(&0), *logits.size().last().unwrap_or(&0), h.kind()))
    }

    /// The decoder layer whose output is intervened on.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// The model's hidden size (the rotation's dimension).
    pub fn hidden_size(&self) -> i64 {
        self.hidden
    }

    /// The model.
    pub fn model(&self) -> &'m LanguageModel<M> {
        self.model
    }

    /// Checks the pairs: prompts with tokens, positions inside them, labels inside the vocabulary.
    fn check(&self, pairs: &[Pair]) -> Result<()> {
        if pairs.is_empty() {
            return Err(Error::InvalidInput { message: "das: no pairs given".into() });
        }
        for (i, p) in pairs.iter().enumerate() {
            resolve(&p.base, p.base_position).map_err(|m| pair_error(i, "base", m))?;
            resolve(&p.source, p.source_position).map_err(|m| pair_error(i, "source", m))?;
            if !(0..self.vocab).contains(&p.label) {
                return Err(pair_error(
                    i,
                    "label",
                    format!("token id {} is outside the vocabulary of {}", p.label, self.vocab),
                ));
            }
        }
        Ok(())
    }

    /// A one-hot selector of each row's site in the left-padded batch of `rows`, `[n, seq, 1]`.
    fn selector(&self, rows: &[(&[i64], i64)]) -> Result<Tensor> {
        let seq = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        let mut sel = vec![0f32; rows.len() * seq];
        for (i, (ids, position)) in rows.iter().enumerate() {
            let p = resolve(ids, *position).map_err(|m| Error::InvalidInput { message: format!("das: {m}") })?;
            sel[i * seq + seq - ids.len() + p] = 1.0;
        }
        Ok(Tensor::from_slice(&sel)
            .view([rows.len() as i64, seq as i64, 1])
            .to_kind(self.kind)
            .to_device(self.model.device()))
    }

    /// The hidden state at each row's site, `[n, hidden]` float32 on the CPU (no intervention, no gradient).
    fn states(&self, rows: &[(&[i64], i64)]) -> Result<Tensor> {
        let model = self.model;
        let layer = self.layer;
        let mut out = Vec::new();
        for chunk in rows.chunks(CHUNK) {
            let sel = self.selector(chunk)?;
            let ids: Vec<Vec<i64>> = chunk.iter().map(|(ids, _)| ids.to_vec()).collect();
            intervene!(model.trace(ids) {
                let state = (model.layers[layer].output * &sel).sum_dim(1, false).save();
                model.stop();
            });
            out.push(state.to_device(Device::Cpu).to_kind(Kind::Float));
        }
        Ok(Tensor::cat(&out, 0))
    }

    /// The source prompts' hidden states at their sites, `[pairs, hidden]` float32 on the CPU; each distinct
    /// (prompt, position) runs once.
    pub fn source_states(&self, pairs: &[Pair]) -> Result<Tensor> {
        self.check(pairs)?;
        let mut index: HashMap<(&[i64], i64), i64> = HashMap::new();
        let mut unique: Vec<(&[i64], i64)> = Vec::new();
        let rows: Vec<i64> = pairs
            .iter()
            .map(|p| {
                let key = (p.source.as_slice(), p.source_position);
                *index.entry(key).or_insert_with(|| {
                    unique.push(key);
                    unique.len() as i64 - 1
                })
            })
            .collect();
        let states = self.states(&unique)?;
        Ok(states.index_select(0, &Tensor::from_slice(&rows)))
    }

    /// The interchange with the current rotation and `mask` (`[hidden]`: [`Boundary::hard_mask`], a soft
    /// [`Boundary::mask`], or any), without gradients: the last position's logits and the intervened hidden state
    /// of every pair.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an empty list, a position outside its prompt, a label outside the vocabulary or a
    /// mask of the wrong shape.
    pub fn interchanged(&self, pairs: &[Pair], mask: &Tensor) -> Result<Interchanged> {
        if mask.size() != [self.hidden] {
            return Err(Error::InvalidInput {
                message: format!("das: the mask must have shape [{}], given {:?}", self.hidden, mask.size()),
            });
        }
        let sources = self.source_states(pairs)?;
        let r = self.rotation.detached()?;
        let mask = mask.to_kind(Kind::Float).to_device(Device::Cpu).detach();
        let (mut logits, mut hidden) = (Vec::new(), Vec::new());
        for (i, chunk) in pairs.chunks(CHUNK).enumerate() {
            let src = sources.narrow(0, (i * CHUNK) as i64, chunk.len() as i64);
            let out = tch::no_grad(|| self.run(chunk, &src, &r, &mask, false))?;
            logits.push(out.logits);
            hidden.push(out.hidden);
        }
        Ok(Interchanged { logits: Tensor::cat(&logits, 0), hidden: Tensor::cat(&hidden, 0) })
    }

    /// Interchange-intervention accuracy with the hard mask: the fraction of pairs whose argmax next token after
    /// the intervention is the label.
    pub fn iia(&self, pairs: &[Pair]) -> Result<f64> {
        let out = self.interchanged(pairs, &self.boundary.hard_mask())?;
        Ok(accuracy(&out.logits, pairs))
    }

    /// One trace of a batch: each base prompt runs with its site replaced by the interchange of its hidden state
    /// with `sources` (`[n, hidden]`, the sources' states), under rotation `r` and `mask` (float32, CPU; they may
    /// carry gradient history). With `train`, the mean cross-entropy of the labels at the last position is
    /// backpropagated inside the trace (reaching whatever `r` and `mask` were computed from) and returned.
    fn run(&self, pairs: &[Pair], sources: &Tensor, r: &Tensor, mask: &Tensor, train: bool) -> Result<Run> {
        let (kind, device) = (self.kind, self.model.device());
        let rows: Vec<(&[i64], i64)> = pairs.iter().map(|p| (p.base.as_slice(), p.base_position)).collect();
        let sel = self.selector(&rows)?;
        let ids: Vec<Vec<i64>> = pairs.iter().map(|p| p.base.clone()).collect();
        // (h_s R) ⊙ m is the same whatever the base: computed here, the trace adds it to (h_b R) ⊙ (1 − m).
        let src = (sources.matmul(r) * mask).to_kind(kind).to_device(device);
        let keep = (mask.ones_like() - mask).to_kind(kind).to_device(device);
        let rt = r.tr().to_kind(kind).to_device(device);
        let r = r.to_kind(kind).to_device(device);
        let model = self.model;
        let layer = self.layer;
        if !train {
            intervene!(model.trace(ids) {
                let h = model.layers[layer].output;
                let hb = (h * &sel).sum_dim(1, false);
                let mixed = (hb.matmul(&r) * &keep + &src).matmul(&rt);
                model.layers[layer].output = h + (mixed - hb).unsqueeze(1) * &sel;
                let hidden = mixed.save();
                let logits = model.output.i((.., -1)).save();
            });
            return Ok(Run { logits: cpu(&logits), hidden: cpu(&hidden), loss: None });
        }
        let labels =
            Tensor::from_slice(&pairs.iter().map(|p| p.label).collect::<Vec<_>>()).unsqueeze(1).to_device(device);
        intervene!(model.trace(ids) {
            let h = model.layers[layer].output;
            let hb = (h * &sel).sum_dim(1, false);
            let mixed = (hb.matmul(&r) * &keep + &src).matmul(&rt);
            model.layers[layer].output = h + (mixed - hb).unsqueeze(1) * &sel;
            let hidden = mixed.save();
            let last = model.output.i((.., -1));
            let loss = -last.log_softmax(-1).gather(1, &labels).mean();
            loss.backward();
            let loss = loss.save();
            let logits = last.save();
        });
        Ok(Run { logits: cpu(&logits), hidden: cpu(&hidden), loss: Some(loss.double_value(&[])) })
    }
}

/// One batch's results.
struct Run {
    logits: Tensor,
    hidden: Tensor,
    loss: Option<f64>,
}

fn cpu(t: &Tensor) -> Tensor {
    t.detach().to_device(Device::Cpu).to_kind(Kind::Float)
}

/// The fraction of rows of `logits` (`[pairs, vocab]`) whose argmax is the pair's label.
pub fn accuracy(logits: &Tensor, pairs: &[Pair]) -> f64 {
    let top = logits.argmax(-1, false);
    let hits = pairs.iter().enumerate().filter(|(i, p)| top.int64_value(&[*i as i64]) == p.label).count();
    hits as f64 / pairs.len().max(1) as f64
}

/// A position (negative from the end) as an index into `ids`.
fn resolve(ids: &[i64], position: i64) -> std::result::Result<usize, String> {
    let n = ids.len() as i64;
    if n == 0 {
        return Err("the prompt has no tokens".into());
    }
    let p = if position < 0 { n + position } else { position };
    if !(0..n).contains(&p) {
        return Err(format!("position {position} is outside the prompt's {n} tokens"));
    }
    Ok(p as usize)
}

fn pair_error(i: usize, what: &str, message: String) -> Error {
    Error::InvalidInput { message: format!("das: pair {i}, {what}: {message}") }
}
