//! Training a [`BoundlessDas`]: Adam over the rotation's and the boundary's parameters, one interchange trace per
//! batch, the mask's temperature annealed linearly (pyvene's tutorials: `torch.linspace(50, 0.1, steps)`, Adam with
//! a learning rate of 1e-3 for the rotation and 1e-2 for the boundary, a penalty of 1 × the boundary).

use super::rotation::Rng;
use super::{accuracy, BoundlessDas, Pair};
use crate::models::CausalLm;
use crate::{Error, Result};
use tch::{Kind, Tensor};

/// How [`BoundlessDas::train`] trains.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Optimizer steps (one batch each).
    pub steps: usize,
    /// Pairs per batch (drawn without replacement, reshuffled after each pass over the pairs).
    pub batch_size: usize,
    /// Adam's learning rate for the rotation's parameter.
    pub lr_rotation: f64,
    /// Adam's learning rate for the boundary (a fraction of the hidden size).
    pub lr_boundary: f64,
    /// The mask's temperature at the first and at the last step (linear in between).
    pub temperature: (f64, f64),
    /// The weight of the boundary (as a fraction of the hidden size) added to the loss: it keeps the subspace small.
    pub boundary_penalty: f64,
    /// Seed of the batch order.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 100,
            batch_size: 16,
            lr_rotation: 1e-3,
            lr_boundary: 1e-2,
            temperature: (50.0, 0.1),
            boundary_penalty: 1.0,
            seed: 0,
        }
    }
}

/// What one training step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLog {
    /// The step, from 0.
    pub step: usize,
    /// The loss minimised: `cross_entropy + boundary_penalty · fraction`.
    pub loss: f64,
    /// The mean cross-entropy of the labels on the batch.
    pub cross_entropy: f64,
    /// The fraction of the batch whose argmax was the label (with this step's soft mask, before the update).
    pub accuracy: f64,
    /// The boundary, in dimensions, after the update.
    pub boundary: f64,
    /// The mask's temperature at this step.
    pub temperature: f64,
}

impl<M: CausalLm> BoundlessDas<'_, M> {
    /// Trains the rotation and the boundary on `pairs` (see the [module docs](super) and [`TrainConfig`]); calls
    /// `on_step` after every step with the experiment as it is then (to evaluate held-out pairs now and again) and
    /// the step's log. Returns every step's log.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for bad pairs or settings (no steps, an empty batch, a temperature that is not
    /// positive); errors of the traces and of `on_step`.
    pub fn train(
        &mut self,
        pairs: &[Pair],
        config: &TrainConfig,
        mut on_step: impl FnMut(&Self, &StepLog) -> Result<()>,
    ) -> Result<Vec<StepLog>> {
        let (t0, t1) = config.temperature;
        if config.steps == 0 || config.batch_size == 0 || !(t0 > 0.0 && t1 > 0.0) {
            return Err(Error::InvalidInput {
                message: format!(
                    "das training needs steps >= 1, batch_size >= 1 and positive temperatures; given {} steps, batch \
                     size {}, temperatures {t0} to {t1}",
                    config.steps, config.batch_size
                ),
            });
        }
        let sources = self.source_states(pairs)?;
        let adam_err = |e| Error::torch("das training (Adam)", e);
        let mut adam = tch::COptimizer::adam(config.lr_rotation, 0.9, 0.999, 0.0, 1e-8, false).map_err(adam_err)?;
        adam.add_parameters(self.rotation.parameter(), 0).map_err(adam_err)?;
        adam.add_parameters(self.boundary.parameter(), 1).map_err(adam_err)?;
        adam.set_learning_rate_group(1, config.lr_boundary).map_err(adam_err)?;
        adam.zero_grad().map_err(adam_err)?;

        let mut rng = Rng::new(config.seed);
        let mut order: Vec<usize> = Vec::new();
        let mut logs = Vec::with_capacity(config.steps);
        for step in 0..config.steps {
            let mut batch = Vec::with_capacity(config.batch_size);
            while batch.len() < config.batch_size.min(pairs.len()) {
                if order.is_empty() {
                    order = shuffled(pairs.len(), &mut rng);
                }
                batch.extend(order.pop());
            }
            let temperature =
                if config.steps == 1 { t1 } else { t0 + (t1 - t0) * step as f64 / (config.steps - 1) as f64 };
            let chosen: Vec<Pair> = batch.iter().map(|&i| pairs[i].clone()).collect();
            let rows = Tensor::from_slice(&batch.iter().map(|&i| i as i64).collect::<Vec<_>>());
            let r = self.rotation.matrix()?;
            let mask = self.boundary.mask(temperature)?;
            let run = self.run(&chosen, &sources.index_select(0, &rows), &r, &mask, true)?;
            let cross_entropy = run.loss.unwrap_or(f64::NAN);
            let penalty = self.boundary.size_tensor() * (config.boundary_penalty / self.hidden as f64);
            let loss = cross_entropy + penalty.double_value(&[]);
            if config.boundary_penalty != 0.0 {
                penalty.to_kind(Kind::Float).backward();
            }
            adam.step().map_err(adam_err)?;
            adam.zero_grad().map_err(adam_err)?;
            let log = StepLog {
                step,
                loss,
                cross_entropy,
                accuracy: accuracy(&run.logits, &chosen),
                boundary: self.boundary.size(),
                temperature,
            };
            on_step(self, &log)?;
            logs.push(log);
        }
        Ok(logs)
    }
}

/// `0..n` in a random order (Fisher–Yates).
fn shuffled(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        v.swap(i, rng.below(i + 1));
    }
    v
}
