//! Activation patching, as in Python nnsight's tutorial (after Meng et al., "Locating and Editing Factual
//! Associations in GPT", 2022, and Wang et al., "Interpretability in the Wild", 2022): which activations of SmolLM2
//! carry "Paris rather than Rome"?
//!
//! The corrupted prompt ("The Colosseum is in the city of") runs once per cell with one activation replaced by its
//! value from the clean prompt ("The Eiffel Tower is in the city of"); the metric is `logit(" Paris") -
//! logit(" Rome")` at the last position, shown as the fraction of the clean-minus-corrupted difference that the
//! patch recovers (1: the clean answer back, 0: no change). Two sweeps of `nnsight::patching::Patching`: the
//! residual stream before each layer at each position, and each attention head's output (every position). Writes
//! a heatmap of each and a line plot of the residual stream's recovery by layer at the subject's last token and at
//! the last position.
//!
//! ```text
//! cargo run --release --example activation_patching -- [OUT_DIR]     # pictures into OUT_DIR (default target/pictures)
//! ```

use nnsight::patching::{Labelled, Patching};
use nnsight::plot::Lines;
use nnsight::prelude::*;
use std::path::PathBuf;

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const CLEAN: &str = "The Eiffel Tower is in the city of";
const CORRUPTED: &str = "The Colosseum is in the city of";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "target/pictures".into()));
    let model = LanguageModel::<Llama>::load_with(MODEL, LoadOptions::default().progress(false))?;
    let (paris, rome) = (model.encode(" Paris")?[0], model.encode(" Rome")?[0]);
    let metric = |logits: &Tensor| logits.double_value(&[paris]) - logits.double_value(&[rome]);
    let patching = Patching::new(&model, CLEAN, CORRUPTED, metric)?;
    let (clean, corrupted) = patching.baselines()?;
    println!("logit(\" Paris\") - logit(\" Rome\"): clean {clean:.3}, corrupted {corrupted:.3}");
    let recovered =
        |grid: Labelled| Labelled { values: (grid.values - corrupted) / (clean - corrupted), axes: grid.axes };

    let resid = recovered(patching.residual()?);
    let resid_path = out.join("activation_patching_residual.png");
    resid
        .heatmap()?
        .title(
            "Activation patching on SmolLM2-135M: the residual stream before each layer, Eiffel Tower into Colosseum",
        )
        .value_name("fraction of logit(Paris) - logit(Rome) recovered")
        .save(&resid_path)?;
    let heads = recovered(patching.heads()?);
    let heads_path = out.join("activation_patching_heads.png");
    heads
        .heatmap()?
        .title("Activation patching on SmolLM2-135M: each attention head's output (all positions)")
        .value_name("fraction of logit(Paris) - logit(Rome) recovered")
        .save(&heads_path)?;

    // The residual stream's recovery by layer, at the last token of the subject and at the last position.
    let labels = &resid.axes[1].labels;
    let subject = labels.iter().position(|l| l.ends_with("iffel")).unwrap_or(2) as i64;
    let last = labels.len() as i64 - 1;
    let column = |p: i64| Vec::<f64>::try_from(resid.values.select(1, p).to_kind(Kind::Double));
    let by_layer_path = out.join("activation_patching_by_layer.png");
    Lines::new()
        .title("Residual-stream patching by layer: where the answer moves to the last position")
        .axes("layer", "fraction recovered")
        .series(format!("subject's last token ({})", labels[subject as usize]), &column(subject)?)
        .series(format!("last position ({})", labels[last as usize]), &column(last)?)
        .save(&by_layer_path)?;

    println!("\nresidual stream, the cells that recover most:");
    for (l, p, v) in top(&resid, 6) {
        println!("  layer {l:>2}, position {:<10} {v:>7.3}", resid.axes[1].labels[p]);
    }
    println!("attention heads, the heads that recover most:");
    for (l, h, v) in top(&heads, 6) {
        println!("  layer {l:>2}, head {h}  {v:>7.3}");
    }
    let crossover = (0..resid.values.size()[0])
        .find(|&l| resid.at(&[l, last]) > resid.at(&[l, subject]))
        .map_or("at no layer".to_string(), |l| format!("from layer {l} on"));
    println!("the last position recovers more than the subject's last token {crossover}");
    for p in [&resid_path, &heads_path, &by_layer_path] {
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// The `n` cells with the largest values of a two-axis result: (row, column, value).
fn top(grid: &Labelled, n: usize) -> Vec<(usize, usize, f64)> {
    let (rows, cols) = (grid.values.size()[0], grid.values.size()[1]);
    let mut cells: Vec<(usize, usize, f64)> =
        (0..rows).flat_map(|r| (0..cols).map(move |c| (r as usize, c as usize, grid.at(&[r, c])))).collect();
    cells.sort_by(|a, b| b.2.total_cmp(&a.2));
    cells.truncate(n);
    cells
}
