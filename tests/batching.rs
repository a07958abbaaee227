//! How a trace's invokes become forward passes (`nnsight::Batching`): invokes written in loops run in chunks of at
//! most `max_rows` rows with the results of one batch (values crossing invokes and chunks as in one batch), and
//! invokes on one input share the layers before the first one any of them touches, with the results of the
//! unshared run. `nnsight::exec::last_passes` shows what ran. (An invoke that uses a later invoke's value, which a
//! graph from the wire may hold, stays in one chunk with it: a unit test of `exec::batching`.)

use crate::common::{self, max_abs_diff};
use nnsight::exec::{last_passes, PassInfo};
use nnsight::prelude::*;

const CLEAN: &str = "The quick brown fox";
const CORRUPTED: &str = "The lazy brown fox";

/// The residual patching grid as a user writes it: one trace, a clean invoke, then one invoke per cell in loops.
/// Returns the last position's logits of every cell, `[layers * positions, vocab]`.
fn grid<M: CausalLm>(model: &LanguageModel<M>) -> nnsight::Result<Tensor> {
    let n = model.standard_names().n_layers;
    let seq = model.encode(CLEAN)?.len() as i64;
    intervene!(model.trace() {
        let mut clean = Vec::new();
        invoke(CLEAN) {
            for l in 0..n {
                clean.push(model.layers[l].input);
            }
        }
        let mut cells = Vec::new();
        for (l, clean) in clean.iter().enumerate() {
            for p in 0..seq {
                invoke(CORRUPTED) {
                    model.layers[l].input[(.., p)] = clean.i((.., p));
                    cells.push(model.output.i((.., -1)).save());
                }
            }
        }
    });
    Ok(Tensor::cat(&cells, 0))
}

/// One cell of [`grid`] as its own trace.
fn cell<M: CausalLm>(model: &LanguageModel<M>, l: usize, p: i64) -> nnsight::Result<Tensor> {
    intervene!(model.trace() {
        invoke(CLEAN) {
            let clean = model.layers[l].input;
        }
        invoke(CORRUPTED) {
            model.layers[l].input[(.., p)] = clean.i((.., p));
            let logits = model.output.i((.., -1)).save();
        }
    });
    Ok(logits)
}

fn check_grid<M: CausalLm>(dir: &str) -> nnsight::Result<()> {
    let model = LanguageModel::<M>::load_with(common::data(dir), common::opts())?;
    let n = model.standard_names().n_layers;
    let rows = 1 + 9 * n as i64;

    model.set_batching(Batching::default().one_pass().share_prefix(false));
    let one = grid(&model)?;
    let only =
        PassInfo { invokes: 0..rows as usize, rows, shared_layers: 0, distinct_rows: 0, last_position_only: true };
    assert_eq!(last_passes(), vec![only], "{dir}: one pass; the code reads the last position of the logits only");

    // Chunks of 4 rows: the clean invoke's values reach cells of later chunks.
    model.set_batching(Batching::default().max_rows(4).share_prefix(false));
    let chunked = grid(&model)?;
    let passes = last_passes();
    assert_eq!(passes.len(), ((rows + 3) / 4) as usize, "{dir}: {passes:?}");
    assert!(passes.iter().all(|p| p.rows <= 4 && p.shared_layers == 0), "{dir}: {passes:?}");
    assert!(max_abs_diff(&chunked, &one) < 1e-5, "{dir}: chunked grid differs from one pass");

    // With shared prefixes (10 rows: the clean prompt and layer 0's cells, then one layer's cells a pass): a pass
    // whose cells start at layer l > 0 runs the layers before once, on one row.
    model.set_batching(Batching::default().max_rows(10));
    let shared = grid(&model)?;
    let passes = last_passes();
    assert!(max_abs_diff(&shared, &one) < 1e-5, "{dir}: shared-prefix grid differs from one pass");
    for p in &passes {
        let first_cell = p.invokes.start.max(1) - 1; // invoke 0 is the clean one
        let first_layer = first_cell / 9;
        if p.invokes.start == 0 {
            assert_eq!(p.shared_layers, 0, "{dir}: the first pass holds two prompts and reads layer 0: {p:?}");
        } else if p.rows > 1 {
            assert_eq!(p.shared_layers, first_layer, "{dir}: {p:?}");
            assert_eq!(p.distinct_rows, usize::from(first_layer > 0), "{dir}: {p:?}");
        } else {
            assert_eq!(p.shared_layers, 0, "{dir}: one row has nothing to share with: {p:?}");
        }
    }
    assert!(passes.iter().any(|p| p.shared_layers > 0), "{dir}: nothing was shared: {passes:?}");

    // Each cell equals its own trace.
    for (l, p) in [(0, 1), (n / 2, 3), (n - 1, 8)] {
        let alone = cell(&model, l, p)?;
        let at = (l * 9) as i64 + p;
        assert!(max_abs_diff(&shared.narrow(0, at, 1), &alone) < 1e-4, "{dir}: cell ({l}, {p})");
    }
    Ok(())
}

#[test]
fn a_grid_written_with_invokes_in_loops_runs_in_chunks_with_one_batchs_results() -> nnsight::Result<()> {
    check_grid::<Llama>("tiny-llama")?;
    check_grid::<Gpt2>("tiny-gpt2")
}

#[test]
fn repeated_rows_share_the_layers_before_the_first_touched_one() -> nnsight::Result<()> {
    let model = LanguageModel::<Llama>::load_with(common::data("tiny-llama"), common::opts())?;
    let n = model.standard_names().n_layers;
    assert!(n >= 2);
    let sweep = |model: &LanguageModel<Llama>| -> nnsight::Result<(Vec<Tensor>, Tensor)> {
        intervene!(model.trace() {
            let mut outs = Vec::new();
            for scale in [0.0, 0.5, 2.0] {
                invoke(CORRUPTED) {
                    model.layers[n - 1].mlp.output *= scale;
                    outs.push(model.output.save());
                }
            }
            invoke(CLEAN) {
                let other = model.layers[n - 1].output.save();
            }
        });
        Ok((outs, other))
    };
    model.set_batching(Batching::default().share_prefix(false));
    let (plain, plain_other) = sweep(&model)?;
    assert_eq!(last_passes()[0].shared_layers, 0);
    model.set_batching(Batching::default());
    let (shared, shared_other) = sweep(&model)?;
    let pass = &last_passes()[0];
    assert_eq!((pass.shared_layers, pass.distinct_rows, pass.rows), (n - 1, 2, 4), "{pass:?}");
    for (a, b) in shared.iter().zip(&plain) {
        assert!(max_abs_diff(a, b) < 1e-5);
    }
    assert!(max_abs_diff(&shared_other, &plain_other) < 1e-5);
    // The scales took effect (the rows are not all the same).
    assert!(max_abs_diff(&shared[0], &shared[2]) > 1e-3);

    // A read before the layers (the embeddings) shares nothing; so does a persistent edit of layer 0.
    intervene!(model.trace() {
        invoke(CLEAN) {
            let e = model.embed.output.save();
        }
        invoke(CLEAN) {
            let o = model.output.save();
        }
    });
    assert_eq!(last_passes()[0].shared_layers, 0);
    let edited = intervene!(model.edit() {
        model.layers[0].output *= 1.0;
    });
    intervene!(edited.trace() {
        invoke(CLEAN) {
            let a = edited.output.save();
        }
        invoke(CLEAN) {
            let b = edited.output.save();
        }
    });
    assert_eq!(last_passes()[0].shared_layers, 0, "a persistent edit of layer 0 must see the layer run");
    assert!(max_abs_diff(&a, &b) < 1e-6);
    let _ = (e, o);
    Ok(())
}

#[test]
fn stops_and_skips_work_per_chunk() -> nnsight::Result<()> {
    let model = LanguageModel::<Llama>::load_with(common::data("tiny-llama"), common::opts())?;
    model.set_batching(Batching::default().max_rows(1));
    intervene!(model.trace() {
        let mut early = Vec::new();
        for _ in 0..3 {
            invoke(CLEAN) {
                early.push(model.layers[0].output.save());
                model.stop();
            }
        }
    });
    assert_eq!(early.len(), 3);
    assert_eq!(last_passes().len(), 3);
    // Every invoke of a chunk skips layer 1 with a value (its input): allowed per chunk, as in one batch.
    intervene!(model.trace() {
        let (mut before, mut after) = (Vec::new(), Vec::new());
        for _ in 0..2 {
            invoke(CLEAN) {
                before.push(model.layers[0].output.save());
                model.layers[1].skip(model.layers[1].input);
                after.push(model.layers[1].output.save());
            }
        }
    });
    assert_eq!(last_passes().len(), 2);
    assert!(before.iter().zip(&after).all(|(a, b)| a.equal(b)));
    Ok(())
}

#[test]
fn the_head_runs_on_the_last_position_only_when_nothing_else_of_the_logits_is_read() -> nnsight::Result<()> {
    let model = LanguageModel::<Llama>::load_with(common::data("tiny-llama"), common::opts())?;
    intervene!(model.trace(CLEAN) {
        let all = model.output.save();
    });
    assert!(!last_passes()[0].last_position_only);
    intervene!(model.trace(CLEAN) {
        let last = model.output.i((.., -1)).save();
        let first_row_last = model.output.i((0, -1)).save();
        let kept = model.output.i((.., -1..)).save();
    });
    assert!(last_passes()[0].last_position_only);
    let seq = all.size()[1];
    assert!(max_abs_diff(&last, &all.select(1, seq - 1)) < 1e-5);
    assert!(max_abs_diff(&first_row_last, &all.get(0).select(0, seq - 1)) < 1e-5);
    assert_eq!(kept.size(), [1, 1, all.size()[2]]);
    // Another position, the head's input, a write to the logits, or an edit of the head: the whole head runs.
    intervene!(model.trace(CLEAN) {
        let other = model.output.i((.., 0)).save();
    });
    assert!(!last_passes()[0].last_position_only);
    assert!(max_abs_diff(&other, &all.select(1, 0)) < 1e-6);
    intervene!(model.trace(CLEAN) {
        let x = model.unembed.input.save();
        let l = model.output.i((.., -1)).save();
    });
    assert!(!last_passes()[0].last_position_only);
    assert_eq!(x.size()[1], seq);
    intervene!(model.trace(CLEAN) {
        model.output[(.., 0)] = 0.0;
        let l = model.output.i((.., -1)).save();
    });
    assert!(!last_passes()[0].last_position_only);
    let _ = l;
    Ok(())
}
