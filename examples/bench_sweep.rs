//! Sweeps on SmolLM2 (float32, CPU, 2 threads), each written two ways, timed in one run, every cell's value checked
//! between the ways:
//!
//! - the 30 x 9 activation-patching grid of the residual stream (Eiffel into Colosseum, metric
//!   `logit(" Paris") - logit(" Rome")`): one trace per cell with two invokes, as a first sweep is written; and
//!   `nnsight::patching::Patching::residual`, as the README recommends (cells as invokes of a batch, the layers
//!   before each pass's first cell run once), also without the shared prefix;
//! - the zero-ablation of each of the 270 attention heads on the Colosseum prompt: one trace per head; and
//!   `Patching::zero_heads`;
//! - both again as one trace with an invoke per cell written in loops, which the runtime batches the same way
//!   (`nnsight::Batching`: chunks of MAX_ROWS rows, shared prefixes, the head on the last position only).
//!
//! With `NNSIGHT_PYTHON` naming the torch venv's python (`make bench-sweep` sets it), the same two sweeps run in
//! Python nnsight 0.8.1 as its docs write them (`scripts/peer/nnsight_sweep.py`: one trace per cell with two invokes
//! and a barrier; one trace per head) and the ratios are printed.
//!
//! `cargo run --release --example bench_sweep -- [LAYERS [MAX_ROWS]]` (default: all 30 layers, 64 rows a pass).

#[path = "support/machine.rs"]
mod machine;

use nnsight::patching::Patching;
use nnsight::prelude::*;
use std::time::Instant;

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const CLEAN: &str = "The Eiffel Tower is in the city of";
const CORRUPTED: &str = "The Colosseum is in the city of";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tch::set_num_threads(2);
    let layers: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(30);
    let max_rows: usize = std::env::args().nth(2).map(|a| a.parse()).transpose()?.unwrap_or(64);
    let model = LanguageModel::<Llama>::load_with(MODEL, LoadOptions::default().progress(false))?;
    let (paris, rome) = (model.encode(" Paris")?[0], model.encode(" Rome")?[0]);
    let metric = |logits: &Tensor| logits.double_value(&[paris]) - logits.double_value(&[rome]);
    let seq = model.encode(CLEAN)?.len() as i64;
    let heads = model.config_json()["num_attention_heads"].as_i64().unwrap_or(9);
    println!("machine: {}", machine::cpu());
    println!("SmolLM2-135M, float32, 2 threads; {layers} layers x {seq} positions, {layers} layers x {heads} heads");

    // The grid, one trace per cell (two invokes).
    let start = Instant::now();
    let mut per_cell = Vec::new();
    for l in 0..layers {
        for p in 0..seq {
            intervene!(model.trace() {
                invoke(CLEAN) {
                    let clean = model.layers[l].input;
                }
                invoke(CORRUPTED) {
                    model.layers[l].input[(.., p)] = clean.i((.., p));
                    let logits = model.output.i((0, -1)).save();
                }
            });
            per_cell.push(metric(&logits));
        }
    }
    let per_cell_s = start.elapsed().as_secs_f64();
    let per_cell = Tensor::from_slice(&per_cell).view([layers as i64, seq]);

    let sweep = |share: bool| -> nnsight::Result<(f64, Tensor)> {
        let start = Instant::now();
        let grid =
            Patching::new(&model, CLEAN, CORRUPTED, metric)?.max_rows(max_rows).share_prefix(share).residual()?;
        Ok((start.elapsed().as_secs_f64(), grid.values.narrow(0, 0, layers as i64)))
    };
    let (unshared_s, unshared) = sweep(false)?;
    let (shared_s, shared) = sweep(true)?;

    // The grid as one trace: a clean invoke, then an invoke per cell in loops (the runtime batches them).
    model.set_batching(Batching::default().max_rows(max_rows));
    let start = Instant::now();
    intervene!(model.trace() {
        let mut clean = Vec::new();
        invoke(CLEAN) {
            for l in 0..layers {
                clean.push(model.layers[l].input);
            }
        }
        let mut cells = Vec::new();
        for (l, clean) in clean.iter().enumerate() {
            for p in 0..seq {
                invoke(CORRUPTED) {
                    model.layers[l].input[(.., p)] = clean.i((.., p));
                    cells.push(model.output.i((0, -1)).save());
                }
            }
        }
    });
    let looped_s = start.elapsed().as_secs_f64();
    let looped = Tensor::from_slice(&cells.iter().map(&metric).collect::<Vec<_>>()).view([layers as i64, seq]);

    // Heads, one trace per head.
    let start = Instant::now();
    let mut per_head = Vec::new();
    for l in 0..layers {
        for h in 0..heads {
            intervene!(model.trace(CORRUPTED) {
                model.layers[l].attn.head_output.output[(.., .., h)] = 0.0;
                let logits = model.output.i((0, -1)).save();
            });
            per_head.push(metric(&logits));
        }
    }
    let per_head_s = start.elapsed().as_secs_f64();
    let per_head = Tensor::from_slice(&per_head).view([layers as i64, heads]);
    let start = Instant::now();
    let zeroed = Patching::new(&model, CLEAN, CORRUPTED, metric)?.max_rows(max_rows).zero_heads()?;
    let zeroed_s = start.elapsed().as_secs_f64();
    let zeroed = zeroed.values.narrow(0, 0, layers as i64);
    let start = Instant::now();
    intervene!(model.trace() {
        let mut cells = Vec::new();
        for l in 0..layers {
            for h in 0..heads {
                invoke(CORRUPTED) {
                    model.layers[l].attn.head_output.output[(.., .., h)] = 0.0;
                    cells.push(model.output.i((0, -1)).save());
                }
            }
        }
    });
    let looped_heads_s = start.elapsed().as_secs_f64();
    let looped_heads = Tensor::from_slice(&cells.iter().map(&metric).collect::<Vec<_>>()).view([layers as i64, heads]);

    let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    println!("\n| sweep | way | seconds | max |cell - one trace per cell| |");
    println!("|---|---|---|---|");
    println!("| patching grid | one trace per cell, two invokes | {per_cell_s:.2} | 0 |");
    println!(
        "| patching grid | `Patching::residual`, no shared prefix | {unshared_s:.2} | {:.1e} |",
        diff(&unshared, &per_cell)
    );
    println!("| patching grid | `Patching::residual` | {shared_s:.2} | {:.1e} |", diff(&shared, &per_cell));
    println!(
        "| patching grid | one trace, an invoke per cell in loops | {looped_s:.2} | {:.1e} |",
        diff(&looped, &per_cell)
    );
    println!("| head ablation | one trace per head | {per_head_s:.2} | 0 |");
    println!("| head ablation | `Patching::zero_heads` | {zeroed_s:.2} | {:.1e} |", diff(&zeroed, &per_head));
    println!(
        "| head ablation | one trace, an invoke per head in loops | {looped_heads_s:.2} | {:.1e} |",
        diff(&looped_heads, &per_head)
    );
    println!(
        "\nspeed-up over one trace per cell: grid {:.1}x (no shared prefix {:.1}x), heads {:.1}x",
        per_cell_s / shared_s,
        per_cell_s / unshared_s,
        per_head_s / zeroed_s
    );

    if let Ok(python) = std::env::var("NNSIGHT_PYTHON") {
        eprintln!("running the Python nnsight peer ({python}) ...");
        let out = std::process::Command::new(python)
            .args(["scripts/peer/nnsight_sweep.py", "--threads", "2", "--layers", &layers.to_string()])
            .output()?;
        if !out.status.success() {
            return Err(format!("the peer failed: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let peer: serde_json::Value =
            text.lines().rev().find_map(|l| serde_json::from_str(l).ok()).ok_or("no JSON line from the peer")?;
        let (grid_s, heads_s) =
            (peer["grid_s"].as_f64().unwrap_or(f64::NAN), peer["heads_s"].as_f64().unwrap_or(f64::NAN));
        let values = |key: &str| -> Tensor {
            let rows: Vec<f64> = peer[key]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|r| r.as_array().into_iter().flatten())
                .filter_map(|v| v.as_f64())
                .collect();
            Tensor::from_slice(&rows).view([layers as i64, -1])
        };
        println!("\nPython nnsight {} (same weights, same machine):", peer["versions"]["nnsight"]);
        println!("| sweep | Python nnsight s | ours (recommended) s | ratio ours / Python | max |cell - Python's| |");
        println!("|---|---|---|---|---|");
        println!(
            "| patching grid | {grid_s:.2} | {shared_s:.2} | {:.3} | {:.1e} |",
            shared_s / grid_s,
            diff(&shared, &values("grid"))
        );
        println!(
            "| head ablation | {heads_s:.2} | {zeroed_s:.2} | {:.3} | {:.1e} |",
            zeroed_s / heads_s,
            diff(&zeroed, &values("heads"))
        );
    }
    Ok(())
}
