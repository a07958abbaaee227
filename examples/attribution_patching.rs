//! Attribution patching (Nanda, "Attribution Patching: Activation Patching At Industrial Scale", 2023) on SmolLM2:
//! which positions of the residual stream, before which layers, carry "Paris rather than Rome"?
//!
//! Activation patching runs the corrupted prompt ("The Colosseum is in the city of") once per cell, with the
//! residual stream before one layer (`model.model.layers[l].input`) at one position replaced by its value from the
//! clean prompt ("The Eiffel Tower is in the city of"), and measures how much the metric `logit(" Paris") -
//! logit(" Rome")` changes. Attribution patching estimates every cell at once from one backward pass:
//! `(clean - corrupted) · ∂metric/∂activation` at the corrupted run, a first order Taylor estimate. This example
//! computes the estimate for all 30 layers × 9 positions with two traces (clean activations; corrupted activations
//! and gradients), then the real patching grid with `nnsight::patching::Patching::residual` (the same cells), and
//! compares them cell by cell and as two heatmaps with the same axes and colour range. As Nanda's post warns, the
//! estimate fails right after the embedding (the inputs of layers 0 and 1), at the tokens where the prompts differ (a
//! large, non-linear change): the example reports the correlation over every cell and over the cells from layer 2's
//! input on, and fails if the estimate disagrees there (r < 0.6: it ranks the
//! right cells, but underestimates the subject's tokens in the middle layers, where one patched cell brings back
//! nearly the whole clean answer, far from linear).
//!
//! ```text
//! cargo run --release --example attribution_patching -- [OUT_DIR]    # pictures into OUT_DIR (default target/pictures)
//! ```

use nnsight::patching::Patching;
use nnsight::plot::Heatmap;
use nnsight::prelude::*;
use std::path::PathBuf;
use std::time::Instant;

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const CLEAN: &str = "The Eiffel Tower is in the city of";
const CORRUPT: &str = "The Colosseum is in the city of";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "target/pictures".into()));
    let start = Instant::now();
    let model = LanguageModel::<Llama>::load_with(MODEL, LoadOptions::default().progress(false))?;
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
            clean.push(model.model.layers[i].input.save());
        }
        let clean_logits = model.output.save();
    });

    // 2. Corrupted activations, and the metric's gradient with respect to each of them.
    intervene!(model.trace(CORRUPT) {
        let mut acts = Vec::new();
        for i in 0..layers {
            acts.push(model.model.layers[i].input);
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

    // 4. Real activation patching of every cell (the same activations: each layer's input at each position).
    let real = Patching::new(&model, CLEAN, CORRUPT, |logits: &Tensor| {
        logits.double_value(&[paris]) - logits.double_value(&[rome])
    })?
    .residual()?;
    let effect = |l: usize, p: i64| real.at(&[l as i64, p]) - corrupt_metric;
    let mut cells: Vec<(usize, i64)> = (0..layers).flat_map(|l| (0..positions).map(move |p| (l, p))).collect();
    cells.sort_by(|a, b| scores[b.0][b.1 as usize].abs().total_cmp(&scores[a.0][a.1 as usize].abs()));
    println!("\nthe cells the estimate ranks highest:");
    println!("{:>5} {:>12}  {:>12}  {:>12}", "layer", "position", "attribution", "patching");
    for &(l, p) in cells.iter().take(8) {
        let label = &real.axes[1].labels[p as usize];
        println!("{l:>5} {label:>12}  {:>12.3}  {:>12.3}", scores[l][p as usize], effect(l, p));
    }
    let pairs = |from: usize| -> (Vec<f64>, Vec<f64>) {
        cells.iter().filter(|c| c.0 >= from).map(|&(l, p)| (scores[l][p as usize], effect(l, p))).unzip()
    };
    let ((est, act), (est_later, act_later)) = (pairs(0), pairs(2));
    let (r, r_later) = (pearson(&est, &act), pearson(&est_later, &act_later));
    println!("\ncorrelation of attribution with real patching: {r:.3} over all {} cells,", est.len());
    println!(
        "{r_later:.3} over the {} cells from layer 2's input on (past the embedding and layer 0)",
        est_later.len()
    );

    // 5. The two grids as heatmaps with the same axes and colour range.
    let largest = est.iter().chain(&act).fold(0f64, |m, v| m.max(v.abs()));
    let picture = |values: Vec<Vec<f64>>, what: &str, file: &str| -> nnsight::Result<PathBuf> {
        let path = out.join(file);
        Heatmap::new(values)
            .title(format!("{what}: the residual stream before each layer, Eiffel Tower into Colosseum"))
            .rows(real.axes[0].name, real.axes[0].labels.clone())
            .cols(real.axes[1].name, real.axes[1].labels.clone())
            .value_name("change in logit(Paris) - logit(Rome)")
            .range(-largest, largest)
            .save(&path)?;
        Ok(path)
    };
    let real_rows = (0..layers).map(|l| (0..positions).map(|p| effect(l, p)).collect()).collect();
    let paths =
        [picture(scores.clone(), "Attribution patching (one backward)", "attribution_patching_estimate.png")?, {
            picture(real_rows, "Activation patching (one run per cell)", "attribution_patching_real.png")?
        }];

    // The largest estimate by layer (summed over positions), for a picture of where the information lies.
    println!("\nattribution summed over positions, by layer:");
    for (l, row) in scores.iter().enumerate() {
        let total: f64 = row.iter().sum();
        let bar = "#".repeat((total.abs() * 4.0).round().min(60.0) as usize);
        println!("  layer {l:>2} {total:>8.3} {bar}");
    }
    for p in &paths {
        println!("wrote {}", p.display());
    }
    println!("\n[{:.1} s]", start.elapsed().as_secs_f64());
    if r_later < 0.6 {
        return Err(format!(
            "attribution patching disagrees with activation patching from layer 2 on (r = {r_later:.3})"
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
