//! Attribution patching (Nanda, "Attribution Patching: Activation Patching At Industrial Scale", 2023) on SmolLM2:
//! which layers, at which positions, carry "Paris rather than Rome"?
//!
//! Activation patching runs the corrupted prompt ("The Colosseum is in the city of") once per cell, with the
//! residual stream before one layer at one position replaced by its value from the clean prompt ("The Eiffel Tower
//! is in the city of"), and measures the metric `logit(" Paris") - logit(" Rome")`. Attribution patching estimates
//! how much every cell changes the metric at once from one backward pass: `(clean - corrupted) · ∂metric/∂activation`
//! at the corrupted run, a first-order Taylor estimate. This example computes the estimate for all 30 layers × 9
//! positions with `nnsight::patching` (`Patching::attribution`: one clean forward, one forward and backward of the
//! corrupted prompt), checks it against real activation patching of every cell (`Patching::residual`), and prints
//! both for the cells it ranks highest. As Nanda's post warns, the estimate fails right after the embedding at the
//! tokens where the prompts differ (a large, non-linear change): the example reports the correlation over all
//! cells and over the layers after that, and fails if the estimate disagrees there (r < 0.7). It draws both grids as
//! heatmaps with the same axes and colour range into the folder given (default `target/pictures/`).
//!
//! ```text
//! cargo run --release --example attribution_patching [OUT_DIR]
//! ```

use nnsight::patching::Patching;
use nnsight::plot::Heatmap;
use nnsight::prelude::*;
use std::path::PathBuf;
use std::time::Instant;

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const CLEAN: &str = "The Eiffel Tower is in the city of";
const CORRUPT: &str = "The Colosseum is in the city of";
/// The residual stream before this layer and later ones: past the embedding and the first layer's output.
const FIRST_LINEAR_LAYER: i64 = 2;
/// The least correlation from that layer on (0.74 observed over the whole grid from layer 2; the estimate fails at layers 0-1 where the prompts differ).
const MIN_R: f64 = 0.7;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "target/pictures".into()));
    let start = Instant::now();
    let model = LanguageModel::<Llama>::load_with(MODEL, LoadOptions::default().progress(false))?;
    let (paris, rome) = (model.encode(" Paris")?[0], model.encode(" Rome")?[0]);

    // The metric on the last position's logits, differentiable (tch ops), and as a number for activation patching.
    let metric = move |logits: &Tensor| logits.get(paris) - logits.get(rome);
    let patching = Patching::new(&model, CLEAN, CORRUPT, |l: &Tensor| metric(l).double_value(&[]))?;
    let (clean_metric, corrupt_metric) = patching.baselines()?;
    println!("metric logit(\" Paris\") - logit(\" Rome\"): clean {clean_metric:.3}, corrupted {corrupt_metric:.3}");

    // Attribution scores, [layer, position]: the estimated change of the metric when each cell is patched.
    let t = Instant::now();
    let scores = patching.attribution(metric).residual()?;
    let attribution_s = t.elapsed().as_secs_f64();
    // Real activation patching of every cell, as the change of the metric.
    let t = Instant::now();
    let patched = patching.residual()?;
    let patching_s = t.elapsed().as_secs_f64();
    let effects = &patched.values - corrupt_metric;

    let (layers, positions) = (scores.values.size()[0], scores.values.size()[1]);
    let mut cells: Vec<(i64, i64)> = (0..layers).flat_map(|l| (0..positions).map(move |p| (l, p))).collect();
    cells.sort_by(|a, b| scores.at(&[b.0, b.1]).abs().total_cmp(&scores.at(&[a.0, a.1]).abs()));
    println!("\n{:>5} {:>12}  {:>12}  {:>12}", "layer", "position", "attribution", "patching");
    for &(l, p) in cells.iter().take(12) {
        let (label, s, e) = (&scores.axes[1].labels[p as usize], scores.at(&[l, p]), effects.double_value(&[l, p]));
        println!("{l:>5} {label:>12}  {s:>12.3}  {e:>12.3}");
    }
    let r = pearson(&scores.values, &effects);
    let later = layers - FIRST_LINEAR_LAYER;
    let r_later =
        pearson(&scores.values.narrow(0, FIRST_LINEAR_LAYER, later), &effects.narrow(0, FIRST_LINEAR_LAYER, later));
    println!("\ncorrelation of attribution with activation patching: {r:.3} over all {} cells,", layers * positions);
    println!("{r_later:.3} from layer {FIRST_LINEAR_LAYER} on (where the first-order estimate holds)");

    // The two grids as heatmaps with the same axes and colour range.
    let largest = scores.values.abs().max().double_value(&[]).max(effects.abs().max().double_value(&[]));
    for (values, what, file) in [
        (&scores.values, "Attribution patching (one backward)", "attribution_patching_estimate.png"),
        (&effects, "Activation patching (one run per cell)", "attribution_patching_real.png"),
    ] {
        let path = out.join(file);
        Heatmap::from_tensor(values)?
            .title(format!("{what}: the residual stream before each layer, Eiffel Tower into Colosseum"))
            .rows(patched.axes[0].name, patched.axes[0].labels.clone())
            .cols(patched.axes[1].name, patched.axes[1].labels.clone())
            .value_name("change in logit(Paris) - logit(Rome)")
            .range(-largest, largest)
            .save(&path)?;
        println!("wrote {}", path.display());
    }

    // The estimate by layer (summed over positions), for a picture of where the information lies.
    println!("\nattribution summed over positions, by layer:");
    for l in 0..layers {
        let total = scores.values.get(l).sum(Kind::Double).double_value(&[]);
        let bar = "#".repeat((total.abs() * 4.0).round().min(60.0) as usize);
        println!("  layer {l:>2} {total:>8.3} {bar}");
    }
    println!(
        "\n[attribution {attribution_s:.2} s, activation patching {patching_s:.2} s, in all {:.1} s]",
        start.elapsed().as_secs_f64()
    );
    if r_later < MIN_R {
        return Err(format!(
            "attribution patching disagrees with activation patching from layer {FIRST_LINEAR_LAYER} on (r = {r_later:.3})"
        )
        .into());
    }
    Ok(())
}

/// Pearson correlation of two tensors' values.
fn pearson(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.flatten(0, -1).to_kind(Kind::Double), b.flatten(0, -1).to_kind(Kind::Double));
    let (a, b) = (&a - a.mean(Kind::Double), &b - b.mean(Kind::Double));
    ((&a * &b).sum(Kind::Double) / (a.square().sum(Kind::Double) * b.square().sum(Kind::Double)).sqrt())
        .double_value(&[])
}
