//! Activation-patching sweeps (`nnsight::patching`): every cell equals the same patch written as its own trace,
//! chunked runs (which skip the layers before their first cell: checked in `last_passes`) equal one batch and runs without the shared prefix, positions where the prompts agree change nothing at the first layer, on several
//! architectures through the standard names; unequal prompts are a clear error.

use crate::common::{self, max_abs_diff};
use nnsight::exec::last_passes;
use nnsight::patching::{Labelled, Patching};
use nnsight::prelude::*;

const CLEAN: &str = "The quick brown fox";
const CORRUPTED: &str = "The lazy brown fox";

fn metric(logits: &Tensor) -> f64 {
    logits.double_value(&[5]) - logits.double_value(&[7])
}

/// The residual-stream patch of cell `(l, p)` as its own trace (clean activations from a trace of their own).
fn residual_cell<M: CausalLm>(model: &LanguageModel<M>, l: usize, p: i64) -> nnsight::Result<f64> {
    intervene!(model.trace(CLEAN) {
        let clean = model.layers[l].input.save();
    });
    intervene!(model.trace(CORRUPTED) {
        model.layers[l].input[(.., p)] = clean.i((.., p));
        let logits = model.output.i((0, -1)).save();
    });
    Ok(metric(&logits))
}

/// The head patch of cell `(l, h)` as its own trace.
fn head_cell<M: CausalLm>(model: &LanguageModel<M>, l: usize, h: i64) -> nnsight::Result<f64> {
    intervene!(model.trace(CLEAN) {
        let clean = model.layers[l].attn.head_output.output.save();
    });
    intervene!(model.trace(CORRUPTED) {
        model.layers[l].attn.head_output.output[(.., .., h)] = clean.i((.., .., h));
        let logits = model.output.i((0, -1)).save();
    });
    Ok(metric(&logits))
}

/// The zero-ablation of head `h` of layer `l` on the corrupted prompt, as its own trace.
fn zero_head_cell<M: CausalLm>(model: &LanguageModel<M>, l: usize, h: i64) -> nnsight::Result<f64> {
    intervene!(model.trace(CORRUPTED) {
        model.layers[l].attn.head_output.output[(.., .., h)] = 0.0;
        let logits = model.output.i((0, -1)).save();
    });
    Ok(metric(&logits))
}

/// The attention-output and MLP-output patches of cell `(l, p)`, each as its own trace.
fn output_cells<M: CausalLm>(model: &LanguageModel<M>, l: usize, p: i64) -> nnsight::Result<(f64, f64)> {
    intervene!(model.trace(CLEAN) {
        let attn = model.layers[l].attn.output.save();
        let mlp = model.layers[l].mlp.output.save();
    });
    intervene!(model.trace(CORRUPTED) {
        model.layers[l].attn.output[(.., p)] = attn.i((.., p));
        let with_attn = model.output.i((0, -1)).save();
    });
    intervene!(model.trace(CORRUPTED) {
        model.layers[l].mlp.output[(.., p)] = mlp.i((.., p));
        let with_mlp = model.output.i((0, -1)).save();
    });
    Ok((metric(&with_attn), metric(&with_mlp)))
}

fn check_sweeps<M: CausalLm>(dir: &str) -> nnsight::Result<()> {
    let model = LanguageModel::<M>::load_with(common::data(dir), common::opts())?;
    let patching = Patching::new(&model, CLEAN, CORRUPTED, metric)?;
    let (clean, corrupted) = patching.baselines()?;
    assert!((clean - corrupted).abs() > 1e-3, "{dir}: the prompts must differ in the metric");
    let grid = patching.residual()?;
    let n = model.standard_names().n_layers;
    assert_eq!(grid.values.size(), [n as i64, 9]);
    assert_eq!(grid.axes[0].name, "layer");
    assert_eq!(grid.axes[1].labels[1], "1: qu", "{dir}: positions are labelled with the clean prompt's tokens");
    for l in 0..n {
        for p in 0..9 {
            let want = residual_cell(&model, l, p)?;
            let got = grid.at(&[l as i64, p]);
            assert!((got - want).abs() < 1e-4, "{dir}: residual cell ({l}, {p}): {got} in the sweep, {want} alone");
        }
    }
    // At layer 0 only the embeddings are patched: where the prompts share a token, nothing changes.
    for p in [0, 4, 5, 6, 7, 8] {
        let v = grid.at(&[0, p]);
        assert!((v - corrupted).abs() < 1e-4, "{dir}: patching a shared token changed the metric ({v} vs {corrupted})");
    }
    let v = grid.at(&[0, 1]);
    assert!((v - corrupted).abs() > 1e-4, "{dir}: patching a differing token changed nothing");
    // Chunked into passes of 4 rows (each skipping the layers before its first cell's): the same values; and the
    // same again with every row run through every layer.
    let chunked = Patching::new(&model, CLEAN, CORRUPTED, metric)?.max_rows(4).residual()?;
    assert!(max_abs_diff(&chunked.values, &grid.values) < 1e-5, "{dir}: chunked sweep differs");
    let passes = last_passes();
    assert!(passes.iter().all(|p| p.rows <= 4 && p.last_position_only), "{dir}: {passes:?}");
    assert!(passes.iter().any(|p| p.shared_layers > 0), "{dir}: no pass shared its leading layers: {passes:?}");
    let unshared = Patching::new(&model, CLEAN, CORRUPTED, metric)?.max_rows(4).share_prefix(false).residual()?;
    assert!(max_abs_diff(&unshared.values, &grid.values) < 1e-5, "{dir}: the sweep without shared prefix differs");
    assert!(last_passes().iter().all(|p| p.shared_layers == 0));
    // Heads, attention and MLP outputs.
    let heads: Labelled = patching.heads()?;
    let n_heads = heads.values.size()[1];
    assert_eq!(heads.axes[1].labels.len(), n_heads as usize);
    for (l, h) in [(0, 0), (n - 1, n_heads - 1)] {
        let want = head_cell(&model, l, h)?;
        let got = heads.at(&[l as i64, h]);
        assert!((got - want).abs() < 1e-4, "{dir}: head cell ({l}, {h}): {got} in the sweep, {want} alone");
    }
    let zeroed = patching.zero_heads()?;
    assert_eq!(zeroed.values.size(), heads.values.size());
    for (l, h) in [(0, 1), (n - 1, 0)] {
        let want = zero_head_cell(&model, l, h)?;
        let got = zeroed.at(&[l as i64, h]);
        assert!((got - want).abs() < 1e-4, "{dir}: zeroed head ({l}, {h}): {got} in the sweep, {want} alone");
    }
    let (attention, mlp) = (patching.attention()?, patching.mlp()?);
    for (l, p) in [(0, 1), (n - 1, 8)] {
        let (want_attn, want_mlp) = output_cells(&model, l, p)?;
        let (got_attn, got_mlp) = (attention.at(&[l as i64, p]), mlp.at(&[l as i64, p]));
        assert!((got_attn - want_attn).abs() < 1e-4, "{dir}: attention cell ({l}, {p}): {got_attn} vs {want_attn}");
        assert!((got_mlp - want_mlp).abs() < 1e-4, "{dir}: MLP cell ({l}, {p}): {got_mlp} vs {want_mlp}");
    }
    Ok(())
}

#[test]
fn patching_sweeps_on_llama_equal_their_cells_run_alone() -> nnsight::Result<()> {
    check_sweeps::<Llama>("tiny-llama")
}

#[test]
fn patching_sweeps_on_gpt2_and_gpt_neox_equal_their_cells_run_alone() -> nnsight::Result<()> {
    check_sweeps::<Gpt2>("tiny-gpt2")?;
    check_sweeps::<GptNeoX>("tiny-gpt-neox")
}

#[test]
fn prompts_of_different_lengths_are_refused() {
    common::init();
    let model = LanguageModel::<Gpt2>::load_with(common::data("tiny-gpt2"), common::opts()).unwrap();
    let err = Patching::new(&model, CLEAN, "Hello world", metric).err().expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("same number of tokens") && msg.contains("has 9") && msg.contains("has 3"), "{msg}");
}
