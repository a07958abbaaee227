//! Generation benchmark: our plain `generate` (KV cache, greedy) against Hugging Face transformers' `generate` on
//! the same SmolLM2 weights, in the same run, rounds interleaved (a block of ours with the linear kernels chosen per
//! shape (the process's mode, automatic unless `NNSIGHT_LINEAR` says otherwise), a block with every linear layer
//! forced through oneDNN, one with every linear layer through `at::linear` as PyTorch eager runs it, a block of
//! theirs, ...), all on CPU with 2 threads. Both sides decode the same prompt greedily to the same number of new
//! tokens (EOS ignored) and must agree on them. The kernel each linear shape took (the prompt's forward and the
//! one-row decoding steps) is printed under the figures.
//!
//! A second part times, round by round in the same order, our plain `generate` against the same generation traced
//! in `intervene!(model.generate(..) { .. })` with no intervention, and traced with a save of every layer's
//! last-position output at every step (30 layers x every step), and prints the medians and the median per-round
//! ratios to plain.
//!
//! `make bench-generate` runs it (it sets up the Python peer first). Arguments:
//! `[ROUNDS_PER_BLOCK] [BLOCKS] [MAX_NEW_TOKENS]`. The peer is `scripts/peer/hf_generate.py --serve`, run with the
//! venv's python (`NNSIGHT_PYTHON` overrides).

use nnsight::nn::fast_linear::{self, LinearMode};
use nnsight::prelude::*;
use std::time::Instant;

#[path = "support/linear_paths.rs"]
mod linear_paths;
#[path = "support/peer.rs"]
mod peer;
#[path = "support/stats.rs"]
mod stats;
use peer::Peer;
use stats::median;

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const PROMPT: &str = "The Eiffel Tower is in the city of";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let per_block: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5);
    let blocks: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(6);
    let new_tokens: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(10);
    let python = std::env::var("NNSIGHT_PYTHON").unwrap_or_else(|_| "python3".to_string());
    tch::set_num_threads(2);

    let model = LanguageModel::<Llama>::load_with(MODEL, LoadOptions::default().progress(false))?;
    let options = GenerateOptions::new().max_new_tokens(new_tokens).stop_ids([]);

    let n = new_tokens.to_string();
    let mut peer = Peer::start(
        &python,
        &[
            "scripts/peer/hf_generate.py",
            "--gguf",
            MODEL,
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            &n,
            "--threads",
            "2",
            "--warmup",
            "2",
            "--serve",
        ],
    )?;

    let mut ours_ids = Vec::new();
    for _ in 0..2 {
        ours_ids = model.generate(PROMPT, &options)?.rows.remove(0).new_ids;
    }
    let (mut ours, mut ours_onednn, mut ours_mkl, mut theirs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // Our step 0 (the prompt's forward and the first token), per round.
    let (mut prefill, mut prefill_onednn, mut prefill_mkl) = (Vec::new(), Vec::new(), Vec::new());
    let mut their_ids: Vec<i64> = Vec::new();
    // A pause before each block lets the other side's OpenMP threads stop spinning.
    let settle = std::time::Duration::from_millis(300);
    let time_ours = |into: &mut Vec<f64>, step0: &mut Vec<f64>| -> nnsight::Result<()> {
        std::thread::sleep(settle);
        for _ in 0..per_block {
            let t = Instant::now();
            let out = model.generate_stream(PROMPT, &options, |step| {
                if step.step == 0 {
                    step0.push(t.elapsed().as_secs_f64() * 1e3);
                }
                Ok(())
            })?;
            into.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(out.rows[0].new_ids.len(), new_tokens);
        }
        Ok(())
    };
    for _ in 0..blocks {
        // The process's mode (automatic by default), then every linear layer through oneDNN, then through
        // at::linear (MKL sgemm) as PyTorch eager runs it.
        time_ours(&mut ours, &mut prefill)?;
        fast_linear::set_linear_mode(Some(LinearMode::OneDnn));
        time_ours(&mut ours_onednn, &mut prefill_onednn)?;
        fast_linear::set_linear_mode(Some(LinearMode::Aten));
        time_ours(&mut ours_mkl, &mut prefill_mkl)?;
        fast_linear::set_linear_mode(None);
        let block = peer.block(per_block)?;
        theirs.extend(peer::times(&block)?);
        their_ids = block["new_ids"].as_array().ok_or("bad peer reply")?.iter().filter_map(|v| v.as_i64()).collect();
    }
    let hello = peer.hello.clone();
    peer.finish()?;

    let rounds = ours.len();
    let (o, d, m, t) = (median(ours), median(ours_onednn), median(ours_mkl), median(theirs));
    let tps = |ms: f64| new_tokens as f64 / ms * 1e3;
    println!(
        "SmolLM2-135M greedy generate, {PROMPT:?} ({} prompt tokens) + {new_tokens} new tokens, CPU, 2 threads, \
         {rounds} rounds each, interleaved:",
        hello["prompt_tokens"]
    );
    let split = |total: f64, step0: Vec<f64>| {
        let p = median(step0);
        println!(
            "    of which step 0 (prompt forward, first token) {p:.1} ms, each later token {:.1} ms",
            (total - p) / (new_tokens.max(2) - 1) as f64
        );
    };
    println!(
        "  nnsight-rs generate (KV cache), linear kernels {:?}: median {o:8.1} ms  {:6.1} tokens/s",
        fast_linear::process_linear_mode(),
        tps(o)
    );
    split(o, prefill);
    println!("  nnsight-rs, linear layers via oneDNN:     median {d:8.1} ms  {:6.1} tokens/s", tps(d));
    split(d, prefill_onednn);
    println!("  nnsight-rs, linear layers via at::linear: median {m:8.1} ms  {:6.1} tokens/s", tps(m));
    split(m, prefill_mkl);
    println!(
        "  transformers {} generate (torch {}): median {t:8.1} ms  {:6.1} tokens/s",
        hello["transformers"].as_str().unwrap_or("?"),
        hello["torch"].as_str().unwrap_or("?"),
        tps(t)
    );
    println!(
        "  tokens/s ours / transformers: {:.2}x   (with oneDNN: {:.2}x, with at::linear: {:.2}x)   same tokens: {}",
        t / o,
        t / d,
        t / m,
        ours_ids == their_ids
    );
    linear_paths::print_choices(&format!(
        "the prompt's forward: {} rows, each decoding step: 1 row",
        hello["prompt_tokens"]
    ));
    traced_part(&model, &options, per_block * blocks)?;
    if ours_ids != their_ids {
        println!("  ours {ours_ids:?}\n  theirs {their_ids:?}");
        if their_ids.len() != new_tokens {
            println!(
                "  transformers made {} tokens, not {new_tokens}: the tokens/s are not comparable",
                their_ids.len()
            );
        }
    }
    Ok(())
}

/// Plain `generate` against traced generation (empty block; every layer's last position saved at every step).
fn traced_part(model: &LanguageModel<Llama>, options: &GenerateOptions, rounds: usize) -> nnsight::Result<()> {
    let layers = model.model().model.layers.len();
    let steps = options.max_new_tokens;
    let plain = || -> nnsight::Result<Vec<i64>> { Ok(model.generate(PROMPT, options)?.rows.remove(0).ids()) };
    let traced = || -> nnsight::Result<Vec<i64>> {
        intervene!(model.generate(PROMPT, options) {
            let ids = model.generated().save();
        });
        Ok(ids.rows[0].clone())
    };
    let saving = || -> nnsight::Result<(Vec<i64>, usize)> {
        intervene!(model.generate(PROMPT, options) {
            let ids = model.generated().save();
            let mut hidden = Vec::new();
            for _ in all() {
                for i in 0..layers {
                    hidden.push(model.model.layers[i].output[(.., -1, ..)].save());
                }
            }
        });
        Ok((ids.rows[0].clone(), hidden.len()))
    };
    let want = plain()?;
    assert_eq!(traced()?, want, "a traced generation makes the same tokens");
    let (ids, saved) = saving()?;
    assert_eq!((ids, saved), (want, layers * steps), "saves do not change the tokens");
    let (mut p, mut t, mut s) = (Vec::new(), Vec::new(), Vec::new());
    let (mut rt, mut rs) = (Vec::new(), Vec::new());
    let time = |f: &dyn Fn() -> nnsight::Result<()>| -> nnsight::Result<f64> {
        let start = Instant::now();
        f()?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    for _ in 0..rounds {
        let a = time(&|| plain().map(|_| ()))?;
        let b = time(&|| traced().map(|_| ()))?;
        let c = time(&|| saving().map(|_| ()))?;
        p.push(a);
        t.push(b);
        s.push(c);
        rt.push(b / a);
        rs.push(c / a);
    }
    println!("Traced generation, same prompt and tokens, {rounds} rounds (plain, traced, saving in turn):");
    println!("  plain generate:                              median {:8.1} ms", median(p));
    println!("  traced, empty block:                         median {:8.1} ms   {:.3}x plain", median(t), median(rt));
    println!(
        "  traced, {layers} layers' last position saved x {steps} steps: median {:8.1} ms   {:.3}x plain",
        median(s),
        median(rs)
    );
    Ok(())
}
