//! Activation-patching sweeps in the spirit of TransformerLens's `patching` module, written once over the
//! [standard names](crate::models::standard) so they run on every architecture.
//!
//! A [`Patching`] holds a clean and a corrupted prompt of the same number of tokens and a metric of the last
//! position's logits (e.g. `logit(" Paris") - logit(" Rome")`). Each sweep runs the corrupted prompt once per cell
//! with one activation replaced by its value in the clean run, and returns the metric of every cell as a
//! [`Labelled`] tensor (its axes named, positions labelled with their tokens):
//!
//! | sweep | cell | replaced |
//! |---|---|---|
//! | [`Patching::residual`] | layer × position | the residual stream before the layer (`model.layers[l].input`) at one position |
//! | [`Patching::attention`] | layer × position | the attention's output (`model.layers[l].attn.output`) at one position |
//! | [`Patching::mlp`] | layer × position | the MLP's output (`model.layers[l].mlp.output`) at one position |
//! | [`Patching::heads`] | layer × head | one head's output before the output projection (`attn.head_output`), every position |
//! | [`Patching::zero_heads`] | layer × head | the same, set to zero (an ablation of the corrupted prompt) |
//!
//! The clean activations are saved once; the cells are the invokes of one trace, which the runtime batches
//! ([`crate::exec::batching`]): at most [`Patching::max_rows`] rows per forward pass; cells are in layer order, so
//! the layers before a pass's first patched layer are the same for every row (the corrupted prompt, unpatched) and
//! run once ([`Patching::share_prefix`]); and as only the last position's logits are read, the head runs on that
//! position alone. Every cell equals its own trace within float noise (different batch sizes round matrix products
//! differently).
//!
//! [`Patching::attribution`] gives the same grids estimated by attribution patching (one clean forward, one
//! forward and backward of the corrupted prompt per sweep; see [`attribution`]).

pub mod attribution;

pub use attribution::Attribution;

use crate::language_model::LanguageModel;
use crate::models::CausalLm;
use crate::{intervene, Error, Result};
use tch::{IndexOp, Kind, Tensor};

/// A tensor whose axes have names and labels: what a sweep returns.
#[derive(Debug)]
pub struct Labelled {
    /// The values, one dimension per axis.
    pub values: Tensor,
    /// The axes, in order.
    pub axes: Vec<Axis>,
}

/// One axis of a [`Labelled`] tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Axis {
    /// What runs along it (`"layer"`, `"position"`, `"head"`).
    pub name: &'static str,
    /// A label per index (layer numbers; a position's token as text).
    pub labels: Vec<String>,
}

impl Labelled {
    /// The value at `index` (one index per axis).
    pub fn at(&self, index: &[i64]) -> f64 {
        self.values.double_value(index)
    }
}

/// What a sweep replaces, at each layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Site {
    Residual,
    Attention,
    Mlp,
}

/// An activation-patching experiment: a clean and a corrupted prompt and a metric (see the [module docs](self)).
pub struct Patching<'m, M: CausalLm, F: Fn(&Tensor) -> f64> {
    model: &'m LanguageModel<M>,
    clean: Vec<i64>,
    corrupted: Vec<i64>,
    metric: F,
    max_rows: usize,
    share_prefix: bool,
}

impl<'m, M: CausalLm, F: Fn(&Tensor) -> f64> Patching<'m, M, F> {
    /// An experiment on `model`: `clean` and `corrupted` must tokenize to the same number of tokens; `metric` maps
    /// the last position's logits (`[vocab]`, float32, on the CPU) to a number.
    pub fn new(model: &'m LanguageModel<M>, clean: &str, corrupted: &str, metric: F) -> Result<Self> {
        let (clean_ids, corrupted_ids) = encode_pair(model, clean, corrupted)?;
        Ok(Patching { model, clean: clean_ids, corrupted: corrupted_ids, metric, max_rows: 64, share_prefix: true })
    }

    /// At most `rows` corrupted rows per forward pass (64 by default): more cells run as several passes, with the
    /// same results.
    pub fn max_rows(mut self, rows: usize) -> Self {
        self.max_rows = rows.max(1);
        self
    }

    /// Whether the layers before a pass's first patched layer run once, on the corrupted prompt alone, and are
    /// skipped in the pass with their outputs (true by default: they are the same for every corrupted row; see
    /// [`crate::Batching::share_prefix`]); false runs every row through every layer.
    pub fn share_prefix(mut self, share: bool) -> Self {
        self.share_prefix = share;
        self
    }

    /// The metric on the clean and on the corrupted prompt, unpatched: `(clean, corrupted)`.
    pub fn baselines(&self) -> Result<(f64, f64)> {
        let clean = self.model.forward(self.clean.clone())?;
        let corrupted = self.model.forward(self.corrupted.clone())?;
        Ok((self.metric_of(&clean.i((0, -1))), self.metric_of(&corrupted.i((0, -1)))))
    }

    /// Attribution patching of this experiment's prompts: the grids of [`residual`](Self::residual),
    /// [`attention`](Self::attention), [`mlp`](Self::mlp) and [`heads`](Self::heads), with the same axes, estimated
    /// to first order from one backward pass each (see [`Attribution`]). `metric` is the differentiable form of
    /// this experiment's metric: tch ops on the last position's logits (`[vocab]`) giving a single-value tensor.
    pub fn attribution(&self, metric: impl Fn(&Tensor) -> Tensor + 'static) -> Attribution<'m, M> {
        Attribution::from_ids(self.model, self.clean.clone(), self.corrupted.clone(), metric)
    }

    /// Patches the residual stream before each layer at each position: `[layer, position]`.
    pub fn residual(&self) -> Result<Labelled> {
        self.by_position(Site::Residual)
    }

    /// Patches each layer's attention output at each position: `[layer, position]`.
    pub fn attention(&self) -> Result<Labelled> {
        self.by_position(Site::Attention)
    }

    /// Patches each layer's MLP output at each position: `[layer, position]`.
    pub fn mlp(&self) -> Result<Labelled> {
        self.by_position(Site::Mlp)
    }

    /// Patches each head's output (before the attention's output projection) at every position:
    /// `[layer, head]`.
    pub fn heads(&self) -> Result<Labelled> {
        let n_layers = self.model.standard_names().n_layers;
        let model = self.model;
        intervene!(model.trace(self.clean.clone()) {
            let mut clean = Vec::new();
            for l in 0..n_layers {
                clean.push(model.layers[l].attn.head_output.output.save());
            }
        });
        self.by_head(clean[0].size()[2], Some(&clean))
    }

    /// Zero-ablates each head's output (before the attention's output projection) at every position of the
    /// corrupted prompt (the clean one plays no part): `[layer, head]`.
    pub fn zero_heads(&self) -> Result<Labelled> {
        let model = self.model;
        intervene!(model.scan(self.corrupted.clone()) {
            let shape = model.layers[0].attn.head_output.output.save();
        });
        self.by_head(shape.size()[2], None)
    }

    /// Each head of each layer (`heads` per layer) set to its value in `clean`, or to zero without one.
    fn by_head(&self, heads: i64, clean: Option<&[Tensor]>) -> Result<Labelled> {
        let n_layers = self.model.standard_names().n_layers;
        let model = self.model;
        let values = self.sweep(|| {
            intervene!(model.trace() {
                let mut logits = Vec::new();
                for l in 0..n_layers {
                    for h in 0..heads {
                        invoke(self.corrupted.clone()) {
                            match clean {
                                Some(clean) => model.layers[l].attn.head_output.output[(.., .., h)] = clean[l].i((.., .., h)),
                                None => model.layers[l].attn.head_output.output[(.., .., h)] = 0.0,
                            }
                            logits.push(model.output.i((0, -1)).save());
                        }
                    }
                }
            });
            Ok(logits)
        })?;
        let values = Tensor::from_slice(&values).view([n_layers as i64, heads]);
        Ok(Labelled { values, axes: vec![number_axis("layer", n_layers), number_axis("head", heads as usize)] })
    }

    fn by_position(&self, site: Site) -> Result<Labelled> {
        let n_layers = self.model.standard_names().n_layers;
        let seq = self.clean.len() as i64;
        let model = self.model;
        intervene!(model.trace(self.clean.clone()) {
            let mut clean = Vec::new();
            for l in 0..n_layers {
                clean.push(match site {
                    Site::Residual => model.layers[l].input.save(),
                    Site::Attention => model.layers[l].attn.output.save(),
                    Site::Mlp => model.layers[l].mlp.output.save(),
                });
            }
        });
        let values = self.sweep(|| {
            intervene!(model.trace() {
                let mut logits = Vec::new();
                for (l, clean) in clean.iter().enumerate() {
                    for p in 0..seq {
                        invoke(self.corrupted.clone()) {
                            let value = clean.i((.., p));
                            match site {
                                Site::Residual => model.layers[l].input[(.., p)] = value,
                                Site::Attention => model.layers[l].attn.output[(.., p)] = value,
                                Site::Mlp => model.layers[l].mlp.output[(.., p)] = value,
                            }
                            logits.push(model.output.i((0, -1)).save());
                        }
                    }
                }
            });
            Ok(logits)
        })?;
        let values = Tensor::from_slice(&values).view([n_layers as i64, seq]);
        Ok(Labelled { values, axes: vec![number_axis("layer", n_layers), position_axis(self.model, &self.clean)?] })
    }

    /// Runs `trace` (one trace, an invoke per cell, giving each cell's last-position logits) with this sweep's
    /// batching; returns the metric of each cell.
    fn sweep(&self, trace: impl FnOnce() -> Result<Vec<Tensor>>) -> Result<Vec<f64>> {
        let batching = crate::Batching::default().max_rows(self.max_rows).share_prefix(self.share_prefix);
        let logits = crate::exec::with_batching(batching, trace)?;
        Ok(logits.iter().map(|t| self.metric_of(t)).collect())
    }

    fn metric_of(&self, logits: &Tensor) -> f64 {
        (self.metric)(&logits.to_kind(Kind::Float).to_device(tch::Device::Cpu))
    }
}

/// The token ids of a clean and a corrupted prompt, which must have the same, non-zero, number of tokens.
fn encode_pair<M: CausalLm>(model: &LanguageModel<M>, clean: &str, corrupted: &str) -> Result<(Vec<i64>, Vec<i64>)> {
    let (clean_ids, corrupted_ids) = (model.encode(clean)?, model.encode(corrupted)?);
    if clean_ids.len() != corrupted_ids.len() || clean_ids.is_empty() {
        return Err(Error::InvalidInput {
            message: format!(
                "patching: the clean and corrupted prompts must have the same number of tokens, but {clean:?} \
                 has {} and {corrupted:?} has {}",
                clean_ids.len(),
                corrupted_ids.len()
            ),
        });
    }
    Ok((clean_ids, corrupted_ids))
}

/// The prompt's tokens, each decoded on its own (with the index, so equal tokens stay apart).
fn position_axis<M: CausalLm>(model: &LanguageModel<M>, ids: &[i64]) -> Result<Axis> {
    let labels = ids
        .iter()
        .enumerate()
        .map(|(i, id)| Ok(format!("{i}:{}", model.decode(&[*id])?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Axis { name: "position", labels })
}

fn number_axis(name: &'static str, n: usize) -> Axis {
    Axis { name, labels: (0..n).map(|i| i.to_string()).collect() }
}
