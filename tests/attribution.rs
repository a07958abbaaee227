//! Attribution patching (`nnsight::patching::Attribution`) on several architectures through the standard names:
//! every grid equals the same computation written by hand in `intervene!` blocks (within 1e-5), has the axes of the
//! matching activation sweep, and, for a linear metric, tracks activation patching after layer 0; a metric that
//! gives more than one value is a clear error.

use crate::common::{self, max_abs_diff};
use nnsight::patching::{Attribution, Labelled, Patching};
use nnsight::prelude::*;

const CLEAN: &str = "The quick brown fox";
const CORRUPTED: &str = "The lazy brown fox";

/// A metric that is not linear in the logits: log p(token 5) − log p(token 7).
fn log_prob_metric(logits: &Tensor) -> Tensor {
    let lp = logits.log_softmax(-1, Kind::Float);
    lp.get(5) - lp.get(7)
}

/// A linear metric: logit 5 − logit 7.
fn logit_metric(logits: &Tensor) -> Tensor {
    logits.get(5) - logits.get(7)
}

/// `(clean − corrupted) · grad` of each layer, summed over `dims`: `[layer, ..]` in double precision.
fn scores(clean: &[Tensor], corrupted: &[Tensor], grads: &[Tensor], dims: &[i64]) -> Tensor {
    let rows: Vec<Tensor> = (0..clean.len())
        .map(|l| {
            let d = clean[l].to_kind(Kind::Double) - corrupted[l].detach().to_kind(Kind::Double);
            (d * grads[l].to_kind(Kind::Double)).sum_dim_intlist(dims, false, Kind::Double).get(0)
        })
        .collect();
    Tensor::stack(&rows, 0)
}

/// The four grids (residual, attention, MLP, heads) written by hand: a clean trace, and one corrupted trace that
/// takes the gradient of the log-prob metric with respect to every activation in one backward.
fn by_hand<M: CausalLm>(model: &LanguageModel<M>) -> nnsight::Result<[Tensor; 4]> {
    let n = model.standard_names().n_layers;
    intervene!(model.trace(CLEAN) {
        let (mut c_in, mut c_head, mut c_attn, mut c_mlp) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for l in 0..n {
            c_in.push(model.layers[l].input.save());
            c_head.push(model.layers[l].attn.head_output.output.save());
            c_attn.push(model.layers[l].attn.output.save());
            c_mlp.push(model.layers[l].mlp.output.save());
        }
    });
    intervene!(model.trace(CORRUPTED) {
        let (mut inputs, mut heads, mut attns, mut mlps) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for l in 0..n {
            inputs.push(model.layers[l].input);
            heads.push(model.layers[l].attn.head_output.output);
            attns.push(model.layers[l].attn.output);
            mlps.push(model.layers[l].mlp.output);
        }
        let lp = model.output.i((0, -1)).log_softmax(-1);
        let metric = lp.select(-1, 5) - lp.select(-1, 7);
        metric.backward();
        let (mut x_in, mut x_head, mut x_attn, mut x_mlp) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for l in 0..n {
            x_in.push(inputs[l].save());
            x_head.push(heads[l].save());
            x_attn.push(attns[l].save());
            x_mlp.push(mlps[l].save());
        }
        // Backward order: the last layer's gradients first, and within a layer the last point first.
        let (mut g_in, mut g_head, mut g_attn, mut g_mlp) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for l in (0..n).rev() {
            g_mlp.push(mlps[l].grad().save());
            g_attn.push(attns[l].grad().save());
            g_head.push(heads[l].grad().save());
            g_in.push(inputs[l].grad().save());
        }
    });
    for g in [&mut g_in, &mut g_head, &mut g_attn, &mut g_mlp] {
        g.reverse();
    }
    Ok([
        scores(&c_in, &x_in, &g_in, &[2]),
        scores(&c_attn, &x_attn, &g_attn, &[2]),
        scores(&c_mlp, &x_mlp, &g_mlp, &[2]),
        scores(&c_head, &x_head, &g_head, &[1, 3]),
    ])
}

/// Pearson correlation of two tensors' values.
fn correlation(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.flatten(0, -1).to_kind(Kind::Double), b.flatten(0, -1).to_kind(Kind::Double));
    let (a, b) = (&a - a.mean(Kind::Double), &b - b.mean(Kind::Double));
    ((&a * &b).sum(Kind::Double) / (a.square().sum(Kind::Double) * b.square().sum(Kind::Double)).sqrt())
        .double_value(&[])
}

/// The grids of `attribution` for the four sweeps.
fn grids<M: CausalLm>(a: &Attribution<'_, M>) -> nnsight::Result<[Labelled; 4]> {
    Ok([a.residual()?, a.attention()?, a.mlp()?, a.heads()?])
}

fn check_against_hand<M: CausalLm>(dir: &str) -> nnsight::Result<()> {
    let model = LanguageModel::<M>::load_with(common::data(dir), common::opts())?;
    let got = grids(&Attribution::new(&model, CLEAN, CORRUPTED, log_prob_metric)?)?;
    let want = by_hand(&model)?;
    for (name, (got, want)) in ["residual", "attention", "mlp", "heads"].iter().zip(got.iter().zip(&want)) {
        let diff = max_abs_diff(&got.values, want);
        assert!(diff < 1e-5, "{dir}: {name} attribution differs from the hand-written one by {diff}");
        let scale = want.abs().max().double_value(&[]);
        assert!(scale > 1e-4, "{dir}: {name} attribution is all zero ({scale})");
    }
    // Shapes and labels equal the activation sweeps'.
    let patching = Patching::new(&model, CLEAN, CORRUPTED, |l: &Tensor| logit_metric(l).double_value(&[]))?;
    let sweeps = [patching.residual()?, patching.attention()?, patching.mlp()?, patching.heads()?];
    for (name, (a, p)) in ["residual", "attention", "mlp", "heads"].iter().zip(got.iter().zip(&sweeps)) {
        assert_eq!(a.values.size(), p.values.size(), "{dir}: {name} shape");
        assert_eq!(a.axes, p.axes, "{dir}: {name} axes");
    }
    Ok(())
}

#[test]
fn attribution_on_llama_equals_the_hand_written_gradients() -> nnsight::Result<()> {
    check_against_hand::<Llama>("tiny-llama")
}

#[test]
fn attribution_on_gpt2_and_gpt_neox_equals_the_hand_written_gradients() -> nnsight::Result<()> {
    check_against_hand::<Gpt2>("tiny-gpt2")?;
    check_against_hand::<GptNeoX>("tiny-gpt-neox")
}

/// Attribution (a linear metric) against activation patching minus the corrupted baseline, from layer `from` on
/// in the `[layer, position]` grids: `(residual, attention, mlp)` correlations.
fn agreement<M: CausalLm>(
    model: &LanguageModel<M>,
    clean: &str,
    corrupted: &str,
    from: i64,
) -> nnsight::Result<[f64; 3]> {
    let metric = |l: &Tensor| logit_metric(l).double_value(&[]);
    let patching = Patching::new(model, clean, corrupted, metric)?;
    let (_, base) = patching.baselines()?;
    let attribution = patching.attribution(logit_metric);
    let pairs = [
        (attribution.residual()?, patching.residual()?),
        (attribution.attention()?, patching.attention()?),
        (attribution.mlp()?, patching.mlp()?),
    ];
    Ok(pairs.map(|(a, p)| {
        let n = a.values.size()[0];
        correlation(&a.values.narrow(0, from, n - from), &(p.values.narrow(0, from, n - from) - base))
    }))
}

/// Asserts the correlations `r` (residual, attention, mlp) are above `min`.
fn assert_agree(what: &str, r: [f64; 3], min: [f64; 3]) {
    eprintln!("{what}: correlation after layer 0 (residual, attention, mlp): {r:?}");
    for ((name, r), min) in ["residual", "attention", "mlp"].iter().zip(r).zip(min) {
        assert!(r > min, "{what}: {name} attribution disagrees with activation patching: r = {r} (want > {min})");
    }
}

// The residual stream before layer 1 holds layer 0's output at the tokens where the prompts differ: a large change,
// far from linear, where the first-order estimate is known to fail (Nanda's post); the layers' outputs track
// activation patching closely. Observed (residual, attention, mlp): tiny-llama 0.72, 1.00, 1.00; tiny-gpt2 0.97,
// 1.00, 1.00; tiny-gpt-neox -0.02, 1.00, 1.00; SmolLM2 0.77, 0.82, 0.91 (from layer 4 on: 0.82, 0.92, 0.93).

#[test]
fn attribution_tracks_activation_patching_after_layer_0_on_tiny_models() -> nnsight::Result<()> {
    // Two layers: the residual grid after layer 0 is layer 0's output alone (no assertion on it; observed -0.02 to 0.97).
    let min = [-1.0, 0.9, 0.9];
    let llama = LanguageModel::<Llama>::load_with(common::data("tiny-llama"), common::opts())?;
    assert_agree("tiny-llama", agreement(&llama, CLEAN, CORRUPTED, 1)?, min);
    let gpt2 = LanguageModel::<Gpt2>::load_with(common::data("tiny-gpt2"), common::opts())?;
    assert_agree("tiny-gpt2", agreement(&gpt2, CLEAN, CORRUPTED, 1)?, min);
    let neox = LanguageModel::<GptNeoX>::load_with(common::data("tiny-gpt-neox"), common::opts())?;
    assert_agree("tiny-gpt-neox", agreement(&neox, CLEAN, CORRUPTED, 1)?, min);
    Ok(())
}

#[test]
fn attribution_tracks_activation_patching_after_layer_0_on_smollm2() -> nnsight::Result<()> {
    let model = common::smollm2();
    let r = agreement(&model, "The Eiffel Tower is in the city of", "The Colosseum is in the city of", 1)?;
    assert_agree("SmolLM2", r, [0.7, 0.75, 0.9]);
    Ok(())
}

#[test]
fn a_metric_of_more_than_one_value_is_refused() -> nnsight::Result<()> {
    let model = LanguageModel::<Gpt2>::load_with(common::data("tiny-gpt2"), common::opts())?;
    let attribution = Attribution::new(&model, CLEAN, CORRUPTED, |l: &Tensor| l.narrow(0, 0, 2))?;
    let msg = attribution.residual().expect_err("refused").to_string();
    assert!(msg.contains("single value") && msg.contains("[2]"), "{msg}");
    let msg = Attribution::new(&model, CLEAN, "Hello world", logit_metric).err().expect("refused").to_string();
    assert!(msg.contains("same number of tokens"), "{msg}");
    Ok(())
}
