//! Training a small SAE on a model's activations, and the measures SAE papers report.
//!
//! - [`collect`]: a site's activations over texts, one trace per text, as rows `[n, d_in]`.
//! - [`train`]: SAELens's standard recipe in brief. Inputs are scaled so that their mean squared norm is `d_in`
//!   (SAELens's `expected_average_only_in`; the factor is folded back into the weights at the end, so the SAE
//!   reads raw activations). `W_dec` starts as random rows of norm 0.1 and `W_enc` as its transpose, `b_dec` as
//!   the mean activation, `b_enc` at 0. The loss is `sum((x_hat - x)^2)` per row plus, for ReLU,
//!   `l1 * sum(f_i * |W_dec[i]|)` (the L1 penalty weighted by the decoder norms, Anthropic's April 2024 update),
//!   with the L1 coefficient warmed up linearly; a TopK SAE has no penalty. Adam, learning rate decayed linearly
//!   over the last fifth of the steps.
//! - [`evaluate`]: mean squared error, fraction of variance explained, mean L0 and dead features over rows.
//! - [`loss_recovered`]: the language-model loss (next-token cross-entropy) clean, with the SAE's reconstruction
//!   spliced in, and with the site zero-ablated; recovered = (zero − spliced) / (zero − clean).

use super::{Activation, Sae, Site};
use crate::envoy::cat;
use crate::language_model::LanguageModel;
use crate::models::CausalLm;
use crate::{intervene, Error, Result};
use tch::nn::OptimizerConfig;
use tch::{Device, IndexOp, Kind, Tensor};

/// A site's activations over `texts`, one trace per text: rows `[n, d_in]` in float32 on the CPU, the positions
/// of each text from `from_position` on (1 leaves out each text's first token, whose residual stream is often an
/// outlier of a large norm, an attention sink).
///
/// # Errors
/// [`Error::InvalidInput`] when no row is left; errors of the traces.
pub fn collect<M: CausalLm>(
    model: &LanguageModel<M>,
    texts: &[&str],
    site: Site,
    from_position: i64,
) -> Result<Tensor> {
    let mut rows = Vec::new();
    for text in texts {
        let ids = model.encode(text)?;
        if (ids.len() as i64) <= from_position {
            continue;
        }
        let h = match site {
            Site::Output(l) => {
                intervene!(model.trace(ids) {
                    let h = model.layers[l].output.i(0).save();
                });
                h
            }
            Site::Input(l) => {
                intervene!(model.trace(ids) {
                    let h = model.layers[l].input.i(0).save();
                });
                h
            }
        };
        rows.push(h.i(from_position..).to_device(Device::Cpu).to_kind(Kind::Float));
    }
    if rows.is_empty() {
        return Err(Error::InvalidInput {
            message: format!("sae collect: no text has more than {from_position} tokens (given {})", texts.len()),
        });
    }
    Ok(Tensor::cat(&rows, 0))
}

/// What [`train`] does. `Default` is a ReLU SAE of 2048 features.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    /// The number of features.
    pub d_sae: i64,
    /// ReLU (with the L1 penalty) or TopK (no penalty).
    pub activation: Activation,
    /// The L1 coefficient (ReLU only), on inputs scaled to a mean squared norm of `d_in`.
    pub l1_coefficient: f64,
    /// Adam's learning rate.
    pub lr: f64,
    /// Optimizer steps.
    pub steps: usize,
    /// Rows per step, drawn at random (with the seed) from the activations.
    pub batch_size: i64,
    /// The seed of the initial weights and the batches (libtorch's global generator is seeded with it).
    pub seed: i64,
    /// A [`TrainStep`] is recorded every this many steps (and at the last).
    pub log_every: usize,
    /// The SAE's `hook_name` (where its activations were read: `blocks.15.hook_resid_post`).
    pub hook_name: String,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            d_sae: 2048,
            activation: Activation::Relu,
            l1_coefficient: 5.0,
            lr: 4e-4,
            steps: 1000,
            batch_size: 512,
            seed: 0,
            log_every: 20,
            hook_name: String::new(),
        }
    }
}

/// One point of the training curve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainStep {
    /// The step (counted from 1).
    pub step: usize,
    /// The loss minimized (reconstruction plus penalty), on scaled inputs.
    pub loss: f64,
    /// The reconstruction part, `sum((x_hat - x)^2)` per row divided by `d_in`, on scaled inputs (mean squared
    /// error per element relative to a mean squared value of 1).
    pub mse: f64,
    /// Mean number of active features per row of the batch.
    pub l0: f64,
}

/// Trains an SAE on rows of activations `[n, d_in]` (see the [module docs](self) for the recipe).
///
/// # Errors
/// [`Error::InvalidInput`] for activations that are not a matrix, a bad option (no step, a batch of no rows, a
/// JumpReLU activation, a TopK `k` beyond `d_sae`).
pub fn train(activations: &Tensor, options: &TrainOptions) -> Result<(Sae, Vec<TrainStep>)> {
    tch::with_grad(|| train_with_grad(activations, options))
}

fn train_with_grad(activations: &Tensor, options: &TrainOptions) -> Result<(Sae, Vec<TrainStep>)> {
    let invalid = |message: String| Error::InvalidInput { message: format!("sae train: {message}") };
    if activations.dim() != 2 || activations.size()[0] == 0 {
        return Err(invalid(format!("activations must be rows [n, d_in], given shape {:?}", activations.size())));
    }
    if options.steps == 0 || options.batch_size <= 0 || options.d_sae <= 0 {
        return Err(invalid(format!(
            "steps, batch_size and d_sae must be positive, given {}, {} and {}",
            options.steps, options.batch_size, options.d_sae
        )));
    }
    let code = match options.activation {
        Activation::Relu => 0,
        Activation::TopK { k } if k > 0 && k <= options.d_sae => k,
        Activation::TopK { k } => return Err(invalid(format!("k must be in 1..={}, given {k}", options.d_sae))),
        Activation::JumpRelu => return Err(invalid("training a JumpReLU SAE is not supported (ReLU or TopK)".into())),
    };
    tch::manual_seed(options.seed);
    let x = activations.to_device(Device::Cpu).to_kind(Kind::Float);
    let (n, d_in) = (x.size()[0], x.size()[1]);
    let d_sae = options.d_sae;
    // Inputs scaled to a mean squared norm of d_in.
    let mean_sq = x.square().sum_dim_intlist(-1, false, Kind::Float).mean(Kind::Float).double_value(&[]);
    let scale = (d_in as f64 / mean_sq.max(1e-12)).sqrt();
    let x = x * scale;

    let vs = tch::nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let w_dec0 = Tensor::rand([d_sae, d_in], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let w_dec0 = &w_dec0 / w_dec0.norm_scalaropt_dim(2.0, [1], true) * 0.1;
    let w_dec = root.var_copy("W_dec", &w_dec0);
    let w_enc = root.var_copy("W_enc", &w_dec0.tr().contiguous());
    let b_enc = root.var_copy("b_enc", &Tensor::zeros([d_sae], (Kind::Float, Device::Cpu)));
    let b_dec = root.var_copy("b_dec", &x.mean_dim(0, false, Kind::Float));
    let mut adam = tch::nn::Adam::default().build(&vs, options.lr).map_err(|e| invalid(e.to_string()))?;
    let empty = Tensor::zeros([0], (Kind::Float, Device::Cpu));

    let mut curve = Vec::new();
    let warm_up = (options.steps / 20).max(1);
    let decay_from = options.steps - options.steps / 5;
    for step in 1..=options.steps {
        let index = Tensor::randint(n, [options.batch_size], (Kind::Int64, Device::Cpu));
        let batch = x.index_select(0, &index);
        let pre = super::graph::hidden_pre(&batch, &w_enc, &b_enc, &b_dec);
        let f = super::graph::activate(&pre, code, &empty)?;
        let x_hat = f.matmul(&w_dec) + &b_dec;
        let mse = (&x_hat - &batch).square().sum_dim_intlist(-1, false, Kind::Float).mean(Kind::Float);
        let loss = if code == 0 {
            let l1 = options.l1_coefficient * (step.min(warm_up) as f64 / warm_up as f64);
            let weighted = &f * w_dec.norm_scalaropt_dim(2.0, [1], false);
            &mse + weighted.sum_dim_intlist(-1, false, Kind::Float).mean(Kind::Float) * l1
        } else {
            mse.shallow_clone()
        };
        if step > decay_from {
            let left = (options.steps - step + 1) as f64 / (options.steps - decay_from) as f64;
            adam.set_lr(options.lr * left);
        }
        adam.backward_step(&loss);
        if step % options.log_every.max(1) == 0 || step == options.steps || step == 1 {
            let l0 = f.gt(0.0).to_kind(Kind::Float).sum_dim_intlist(-1, false, Kind::Float).mean(Kind::Float);
            curve.push(TrainStep {
                step,
                loss: loss.double_value(&[]),
                mse: mse.double_value(&[]) / d_in as f64,
                l0: l0.double_value(&[]),
            });
        }
    }
    // Fold the input scaling back: the SAE reads and writes raw activations.
    let sae = tch::no_grad(|| Sae {
        w_enc: (&w_enc * scale).detach().contiguous(),
        b_enc: b_enc.detach().copy(),
        w_dec: (&w_dec / scale).detach().contiguous(),
        b_dec: (&b_dec / scale).detach().contiguous(),
        threshold: None,
        activation: options.activation,
        apply_b_dec_to_input: true,
        hook_name: options.hook_name.clone(),
        model_name: String::new(),
        source: None,
    });
    Ok((sae, curve))
}

/// How well an SAE reconstructs rows of activations ([`evaluate`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reconstruction {
    /// Mean squared error per element.
    pub mse: f64,
    /// The fraction of variance explained: `1 - sum |x - x_hat|^2 / sum |x - mean(x)|^2`.
    pub explained_variance: f64,
    /// Mean number of active features per row.
    pub l0: f64,
    /// Features active on no row.
    pub dead: i64,
}

/// Reconstruction error, variance explained, L0 and dead features of `sae` over rows `[n, d_in]`.
///
/// # Errors
/// [`Error::InvalidInput`] when the rows' width is not `d_in`.
pub fn evaluate(sae: &Sae, activations: &Tensor) -> Result<Reconstruction> {
    let x = activations.to_kind(Kind::Float);
    let _no_grad = tch::no_grad_guard();
    let f = sae.encode(&x)?;
    let x_hat = sae.decode(&f)?;
    let error = (&x_hat - &x).square().sum(Kind::Double).double_value(&[]);
    let total = (&x - x.mean_dim(0, true, Kind::Float)).square().sum(Kind::Double).double_value(&[]);
    let active = f.gt(0.0);
    Ok(Reconstruction {
        mse: error / x.numel() as f64,
        explained_variance: 1.0 - error / total.max(f64::MIN_POSITIVE),
        l0: active.to_kind(Kind::Float).sum_dim_intlist(-1, false, Kind::Float).mean(Kind::Float).double_value(&[]),
        dead: active.any_dim(0, false).logical_not().sum(Kind::Int64).int64_value(&[]),
    })
}

/// The language-model loss with and without an SAE spliced in ([`loss_recovered`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossRecovered {
    /// Mean next-token cross-entropy of the unchanged model.
    pub clean: f64,
    /// With the site replaced by the SAE's reconstruction.
    pub spliced: f64,
    /// With the site set to zero.
    pub zero: f64,
    /// `(zero - spliced) / (zero - clean)`: 1 when splicing costs nothing, 0 when it is as bad as zero ablation.
    pub recovered: f64,
}

/// The language-model loss over `texts` (mean next-token cross-entropy over every predicted position), clean,
/// with the SAE's reconstruction spliced in at its site, and with the site zero-ablated; both changes at the
/// positions from `from_position` on (as the SAE was trained, see [`collect`]), the earlier ones left clean.
///
/// # Errors
/// As [`Sae::check`]; [`Error::InvalidInput`] when no text has more than `from_position + 1` tokens.
pub fn loss_recovered<M: CausalLm>(
    model: &LanguageModel<M>,
    sae: &Sae,
    texts: &[&str],
    from_position: i64,
) -> Result<LossRecovered> {
    let site = sae.check(model)?;
    let Site::Output(l) = site else {
        return Err(Error::InvalidInput {
            message: "sae loss_recovered: only SAEs on a layer's output (hook_resid_post) are measured".into(),
        });
    };
    let (mut clean, mut spliced, mut zero, mut count) = (0.0, 0.0, 0.0, 0usize);
    for text in texts {
        let ids = model.encode(text)?;
        let seq = ids.len() as i64;
        if seq <= from_position + 1 {
            continue;
        }
        let keep = from_position;
        let targets = Tensor::from_slice(&ids[1..]);
        let nll = |logits: &Tensor| -> f64 {
            let lp = logits.i((0, ..seq - 1)).to_device(Device::Cpu).to_kind(Kind::Float).log_softmax(-1, Kind::Float);
            -lp.gather(-1, &targets.unsqueeze(-1), false).sum(Kind::Double).double_value(&[])
        };
        intervene!(model.trace(ids.clone()) {
            let logits = model.output.save();
        });
        clean += nll(&logits);
        intervene!(model.trace(ids.clone()) {
            let h = model.layers[l].output;
            let recon = sae.reconstruct_in(h.narrow(1, keep, seq - keep));
            model.layers[l].output = if keep > 0 { cat(&[h.narrow(1, 0, keep), recon], 1) } else { recon };
            let logits = model.output.save();
        });
        spliced += nll(&logits);
        intervene!(model.trace(ids.clone()) {
            let h = model.layers[l].output;
            let zeros = h.narrow(1, keep, seq - keep).zeros_like();
            model.layers[l].output = if keep > 0 { cat(&[h.narrow(1, 0, keep), zeros], 1) } else { zeros };
            let logits = model.output.save();
        });
        zero += nll(&logits);
        count += (seq - 1) as usize;
    }
    if count == 0 {
        return Err(Error::InvalidInput {
            message: format!("sae loss_recovered: no text has more than {} tokens", from_position + 1),
        });
    }
    let n = count as f64;
    let (clean, spliced, zero) = (clean / n, spliced / n, zero / n);
    Ok(LossRecovered { clean, spliced, zero, recovered: (zero - spliced) / (zero - clean) })
}
