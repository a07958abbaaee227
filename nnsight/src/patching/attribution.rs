//! Attribution patching (Nanda, "Attribution Patching: Activation Patching At Industrial Scale", 2023): every cell
//! of an activation-patching sweep estimated to first order, `(clean − corrupted) · ∂metric/∂activation` with the
//! gradient taken at the corrupted run, from one clean forward and one forward and backward of the corrupted
//! prompt, instead of a forward per cell.
//!
//! | sweep | cell | activation |
//! |---|---|---|
//! | [`Attribution::residual`] | layer × position | `model.layers[l].input` at one position |
//! | [`Attribution::attention`] | layer × position | `model.layers[l].attn.output` at one position |
//! | [`Attribution::mlp`] | layer × position | `model.layers[l].mlp.output` at one position |
//! | [`Attribution::heads`] | layer × head | one head of `attn.head_output`, summed over positions |
//!
//! Each returns a [`Labelled`] tensor with the axes of the matching [`Patching`](super::Patching) sweep, so
//! the two can be compared cell by cell. An estimate of patching cell `c` is `metric(patched c) − metric(corrupted)`:
//! compare it with the activation sweep minus the corrupted baseline.
//!
//! **The metric.** A gradient needs a metric made of tensor operations, not the `f64` of
//! [`Patching`](super::Patching)'s: here it is `Fn(&Tensor) -> Tensor`, tch ops on the last position's logits
//! (`[vocab]`, float32, on the CPU) giving a single-value tensor, e.g.
//! `move |l: &Tensor| l.get(paris) - l.get(rome)`. It must differentiate, so it has to stay in tch (no
//! `double_value`). The activation sweeps keep their plain `f64` metric (`metric(l).double_value(&[])` of the same
//! closure serves them), so their API is unchanged; [`Patching::attribution`](super::Patching::attribution)
//! takes the differentiable form beside it, and [`Attribution::new`] builds one without a `Patching`.
//!
//! The metric runs inside the corrupted trace, between the forward and its backward, so that the backward
//! starts from it: it is a graph function (`#[nnsight::function]`, registered as this module's
//! `attribution_metric`) that calls the closure set for this thread while the sweep's trace runs. The closure is
//! therefore `'static` (write it with `move`), and called on the thread that runs the trace.

use super::{encode_pair, number_axis, position_axis, Labelled, Site};
use crate::language_model::LanguageModel;
use crate::models::CausalLm;
use crate::{intervene, Error, Result};
use std::cell::RefCell;
use std::rc::Rc;
use tch::{IndexOp, Kind, Tensor};

/// A differentiable metric of the last position's logits.
type Metric = Rc<dyn Fn(&Tensor) -> Tensor>;

thread_local! {
    /// The metric of the attribution trace running on this thread.
    static METRIC: RefCell<Option<Metric>> = const { RefCell::new(None) };
}

/// The metric of the attribution sweep running on this thread, on the last position's logits (a graph function,
/// so that the trace's backward starts from it).
#[crate::function]
fn attribution_metric(logits: &Tensor) -> Result<Tensor> {
    let metric = METRIC.with(|m| m.borrow().clone()).ok_or_else(|| Error::Intervention {
        message: "attribution metric: called outside an attribution sweep (nnsight::patching::Attribution)".into(),
    })?;
    let value = metric(&logits.to_kind(Kind::Float).to_device(tch::Device::Cpu));
    if value.numel() != 1 {
        return Err(Error::InvalidInput {
            message: format!(
                "attribution: the metric must give a single value (e.g. `l.get(a) - l.get(b)` or a `.sum()`), it gave \
                 shape {:?}",
                value.size()
            ),
        });
    }
    Ok(value.reshape(Vec::<i64>::new()))
}

/// Runs `f` with `metric` as this thread's attribution metric, then puts the outer one back.
fn with_metric<R>(metric: &Metric, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Metric>);
    impl Drop for Restore {
        fn drop(&mut self) {
            METRIC.with(|m| *m.borrow_mut() = self.0.take());
        }
    }
    let _restore = Restore(METRIC.with(|m| m.borrow_mut().replace(metric.clone())));
    f()
}

/// The activation a sweep attributes, at each layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Point {
    /// A layer × position site ([`Site`]).
    Position(Site),
    /// The heads' outputs before the output projection (`attn.head_output`).
    Heads,
}

/// An attribution-patching experiment: a clean and a corrupted prompt and a differentiable metric (see the
/// [module docs](self)).
pub struct Attribution<'m, M: CausalLm> {
    model: &'m LanguageModel<M>,
    clean: Vec<i64>,
    corrupted: Vec<i64>,
    metric: Metric,
}

impl<'m, M: CausalLm> Attribution<'m, M> {
    /// An experiment on `model`: `clean` and `corrupted` must tokenize to the same number of tokens; `metric` maps
    /// the last position's logits (`[vocab]`, float32, on the CPU) to a single-value tensor, with tch operations
    /// (it is differentiated).
    pub fn new(
        model: &'m LanguageModel<M>,
        clean: &str,
        corrupted: &str,
        metric: impl Fn(&Tensor) -> Tensor + 'static,
    ) -> Result<Self> {
        let (clean, corrupted) = encode_pair(model, clean, corrupted)?;
        Ok(Self::from_ids(model, clean, corrupted, metric))
    }

    pub(super) fn from_ids(
        model: &'m LanguageModel<M>,
        clean: Vec<i64>,
        corrupted: Vec<i64>,
        metric: impl Fn(&Tensor) -> Tensor + 'static,
    ) -> Self {
        Attribution { model, clean, corrupted, metric: Rc::new(metric) }
    }

    /// The residual stream before each layer at each position: `[layer, position]`.
    pub fn residual(&self) -> Result<Labelled> {
        self.sweep(Point::Position(Site::Residual))
    }

    /// Each layer's attention output at each position: `[layer, position]`.
    pub fn attention(&self) -> Result<Labelled> {
        self.sweep(Point::Position(Site::Attention))
    }

    /// Each layer's MLP output at each position: `[layer, position]`.
    pub fn mlp(&self) -> Result<Labelled> {
        self.sweep(Point::Position(Site::Mlp))
    }

    /// Each head's output (before the attention's output projection), summed over positions: `[layer, head]`.
    pub fn heads(&self) -> Result<Labelled> {
        self.sweep(Point::Heads)
    }

    /// The clean activations at `point` of every layer (one forward), then the corrupted ones with the metric's
    /// gradient with respect to each (one forward and backward); the score of each cell.
    fn sweep(&self, point: Point) -> Result<Labelled> {
        let n_layers = self.model.standard_names().n_layers;
        let model = self.model;
        intervene!(model.trace(self.clean.clone()) {
            let mut clean = Vec::new();
            for l in 0..n_layers {
                clean.push(match point {
                    Point::Position(Site::Residual) => model.layers[l].input.save(),
                    Point::Position(Site::Attention) => model.layers[l].attn.output.save(),
                    Point::Position(Site::Mlp) => model.layers[l].mlp.output.save(),
                    Point::Heads => model.layers[l].attn.head_output.output.save(),
                });
            }
        });
        let (corrupted, grads) = with_metric(&self.metric, || -> Result<(Vec<Tensor>, Vec<Tensor>)> {
            intervene!(model.trace(self.corrupted.clone()) {
                let mut acts = Vec::new();
                for l in 0..n_layers {
                    acts.push(match point {
                        Point::Position(Site::Residual) => model.layers[l].input,
                        Point::Position(Site::Attention) => model.layers[l].attn.output,
                        Point::Position(Site::Mlp) => model.layers[l].mlp.output,
                        Point::Heads => model.layers[l].attn.head_output.output,
                    });
                }
                let last = model.output.i((0, -1));
                let metric = call!(attribution_metric(last));
                metric.backward();
                let mut corrupted = Vec::new();
                for a in &acts {
                    corrupted.push(a.save());
                }
                // Gradients arrive in backward order: the last layer's first.
                let mut grads = Vec::new();
                for a in acts.iter().rev() {
                    grads.push(a.grad().save());
                }
            });
            grads.reverse();
            Ok((corrupted, grads))
        })?;
        let _no_grad = tch::no_grad_guard();
        // `[batch, seq, hidden]`: sum over the hidden size; `[batch, seq, heads, head_dim]`: over positions and
        // the head's size.
        let dims: &[i64] = match point {
            Point::Position(_) => &[2],
            Point::Heads => &[1, 3],
        };
        let rows = clean
            .iter()
            .zip(&corrupted)
            .zip(&grads)
            .map(|((c, x), g)| {
                let delta = c.to_kind(Kind::Double) - x.detach().to_kind(Kind::Double);
                (delta * g.to_kind(Kind::Double)).sum_dim_intlist(dims, false, Kind::Double).i(0)
            })
            .collect::<Vec<_>>();
        let values = Tensor::stack(&rows, 0).to_device(tch::Device::Cpu);
        let second = match point {
            Point::Position(_) => position_axis(self.model, &self.clean)?,
            Point::Heads => number_axis("head", values.size()[1] as usize),
        };
        Ok(Labelled { values, axes: vec![number_axis("layer", n_layers), second] })
    }
}
