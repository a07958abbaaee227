//! Attribution patching (Nanda, "Attribution Patching: Activation Patching At Industrial Scale", 2023) on SmolLM2:
//! which layer outputs, at which positions, carry "Paris rather than Rome"?
//!
//! Activation patching runs the corrupted prompt ("The Colosseum is in the city of") once per cell, with one layer's
//! output at one position replaced by its value from the clean prompt ("The Eiffel Tower is in the city of"), and
//! measures how much the metric `logit(" Paris") - logit(" Rome")` recovers. Attribution patching estimates every
//! cell at once from one backward pass: `(clean - corrupted) · ∂metric/∂activation` at the corrupted run, a first
//! order Taylor estimate. This example computes the estimate for all 30 layers × 9 positions with two traces
//! (clean activations; corrupted activations and gradients), then checks it against real activation patching on the
//! cells it ranks highest and on a few others, and prints both. As Nanda's post warns, the estimate fails right after
//! the embedding at the tokens where the prompts differ (a large, non-linear change): the example reports the
//! correlation with and without layer 0 and fails if the estimate disagrees after layer 0 (r < 0.9).
//!
//! ```text
//! cargo run --release --example attribution_patching
//! ```

use nnsight::prelude::*;
use std::time::Instant;

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const CLEAN: &str = "The Eiffel Tower is in the city of";
const CORRUPT: &str = "The Colosseum is in the city of";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let start = Instant::now();
    let model = LanguageModel::<Llama>::load(MODEL)?;
    let paris = model.encode(" Paris")?[0];
    let rome = model.encode(" Rome")?[0];
    let layers = model.model().model.layers.len();
    let (clean_ids, corrupt_ids) = (model.encode(CLEAN)?, model.encode(CORRUPT)?);
    assert_eq!(clean_ids.len(), corrupt_ids.len(), "the prompts must have the same number of tokens");
    let positions = clean_ids.len() as i64;

    // The metric on the last position's logits.
    let metric_of = |logits: &Tensor| -> f64 {
        let last = logits.select(1, -1);
        last.double_value(&[0, paris]) - last.double_value(&[0, rome])
    };

    // 1. Clean activations of every layer.
    intervene!(model.trace(CLEAN) {
        let mut clean = Vec::new();
        for i in 0..layers {
            clean.push(model.model.layers[i].output.save());
        }
        let clean_logits = model.output.save();
    });

    // 2. Corrupted activations, and the metric's gradient with respect to each of them.
    intervene!(model.trace(CORRUPT) {
        let mut acts = Vec::new();
        for i in 0..layers {
            acts.push(model.model.layers[i].output);
        }
        let last = model.output[(.., -1, ..)];
        let metric = (last.select(-1, paris) - last.select(-1, rome)).sum();
        metric.backward();
        let mut corrupt = Vec::new();
        for a in &acts {
            corrupt.push(a.save());
        }
        // Gradients arrive in backward order: the last layer's first.
        let mut grads = Vec::new();
        for a in acts.iter().rev() {
            grads.push(a.grad().save());
        }
        let corrupt_logits = model.output.save();
    });
    grads.reverse();
    let (clean_metric, corrupt_metric) = (metric_of(&clean_logits), metric_of(&corrupt_logits));
    println!("metric logit(\" Paris\") - logit(\" Rome\"): clean {clean_metric:.3}, corrupted {corrupt_metric:.3}");

    // 3. Attribution scores: [layers, positions].
    let scores: Vec<Vec<f64>> = (0..layers)
        .map(|l| {
            let delta = &clean[l] - &corrupt[l];
            let per_pos = (delta * &grads[l]).sum_dim_intlist([-1].as_slice(), false, Kind::Float);
            (0..positions).map(|p| per_pos.double_value(&[0, p])).collect()
        })
        .collect();

    // 4. Real activation patching on the cells ranked highest and on a spread of others.
    let mut cells: Vec<(usize, i64)> =
        (0..layers).flat_map(|l| (0..positions).map(move |p| (l, p))).collect::<Vec<_>>();
    cells.sort_by(|a, b| scores[b.0][b.1 as usize].abs().total_cmp(&scores[a.0][a.1 as usize].abs()));
    let mut checked: Vec<(usize, i64)> = cells.iter().take(6).copied().collect();
    checked.extend([(2, 1), (10, 3), (20, 5), (29, 0), (15, 8), (5, 7)]);
    checked.dedup();
    println!("\n{:>5} {:>4}  {:>12}  {:>12}", "layer", "pos", "attribution", "patching");
    let (mut est, mut real) = (Vec::new(), Vec::new());
    for &(l, p) in &checked {
        let value = clean[l].narrow(1, p, 1);
        intervene!(model.trace(CORRUPT) {
            model.model.layers[l].output[(.., p, ..)] = value.squeeze_dim(1);
            let patched = model.output.save();
        });
        let effect = metric_of(&patched) - corrupt_metric;
        let s = scores[l][p as usize];
        println!("{l:>5} {p:>4}  {s:>12.3}  {effect:>12.3}");
        est.push(s);
        real.push(effect);
    }
    let r = pearson(&est, &real);
    // The first-order estimate is known to fail where the activation difference is large and the model far from
    // linear in it: the residual stream right after the embedding, at the tokens where the prompts differ (here
    // " E"/" Col", "iffel"/"osse"). Elsewhere it tracks real patching closely.
    let later: Vec<usize> = (0..checked.len()).filter(|&i| checked[i].0 >= 1).collect();
    let r_later = pearson(
        &later.iter().map(|&i| est[i]).collect::<Vec<_>>(),
        &later.iter().map(|&i| real[i]).collect::<Vec<_>>(),
    );
    println!("\ncorrelation of attribution with real patching: {r:.3} over all {} cells checked,", checked.len());
    println!("{r_later:.3} over the {} cells after layer 0 (where the first-order estimate holds)", later.len());

    // The largest estimate by layer (summed over positions), for a picture of where the information lies.
    println!("\nattribution summed over positions, by layer:");
    for (l, row) in scores.iter().enumerate() {
        let total: f64 = row.iter().sum();
        let bar = "#".repeat((total.abs() * 4.0).round().min(60.0) as usize);
        println!("  layer {l:>2} {total:>8.3} {bar}");
    }
    println!("\n[{:.1} s]", start.elapsed().as_secs_f64());
    if r_later < 0.9 {
        return Err(format!(
            "attribution patching disagrees with activation patching after layer 0 (r = {r_later:.3})"
        )
        .into());
    }
    Ok(())
}

/// Pearson correlation of two equally long samples.
fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va.sqrt() * vb.sqrt())
}
