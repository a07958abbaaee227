//! Forward-pass benchmark: our SmolLM2 forward against Hugging Face transformers' on the same weights, in the
//! same run, rounds interleaved (a block of ours with the linear kernels chosen per shape (the process's mode,
//! automatic unless `NNSIGHT_LINEAR` says otherwise), a block with every linear layer forced through oneDNN, one
//! with every linear layer through `at::linear` as PyTorch eager runs it, a block of theirs, ...), all on CPU with
//! 2 threads. The kernel each linear shape took is printed under the figures.
//!
//! Then the same in bfloat16: our model loaded with `Kind::BFloat16` against transformers' cast to bfloat16.
//!
//! `make bench` runs it (it sets up the Python peer first). Arguments: `[ROUNDS_PER_BLOCK] [BLOCKS]`.
//! The peer is `scripts/peer/hf_forward.py --serve`, run with the venv's python (`NNSIGHT_PYTHON` overrides).

use nnsight::nn::fast_linear::{self, LinearMode};
use nnsight::prelude::*;
use std::time::Instant;

#[path = "support/linear_paths.rs"]
mod linear_paths;
#[path = "support/machine.rs"]
mod machine;
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
    let per_block: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(10);
    let blocks: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(6);
    let python = std::env::var("NNSIGHT_PYTHON").unwrap_or_else(|_| "python3".to_string());
    tch::set_num_threads(2);

    let model = LanguageModel::<Llama>::load_with(MODEL, LoadOptions::default().progress(false))?;
    let bf16 = LanguageModel::<Llama>::load_with(MODEL, LoadOptions::default().progress(false).kind(Kind::BFloat16))?;
    let batch = model.batch(PROMPT)?;

    let start_peer = |dtype: &str| {
        Peer::start(
            &python,
            &[
                "scripts/peer/hf_forward.py",
                "--gguf",
                MODEL,
                "--prompt",
                PROMPT,
                "--threads",
                "2",
                "--warmup",
                "3",
                "--dtype",
                dtype,
                "--serve",
            ],
        )
    };
    let mut peer = start_peer("float32")?;
    let mut peer_bf16 = start_peer("bfloat16")?;

    for _ in 0..3 {
        let _ = model.forward_batch(&batch)?;
        let _ = bf16.forward_batch(&batch)?;
    }
    let (mut ours, mut ours_onednn, mut ours_mkl, mut theirs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut ours_bf16, mut theirs_bf16) = (Vec::new(), Vec::new());
    // A pause before each block lets the other side's OpenMP threads stop spinning, so neither side pays for the
    // other's idle workers.
    let settle = std::time::Duration::from_millis(300);
    for _ in 0..blocks {
        // The process's mode (automatic by default), then every linear layer through oneDNN, then through
        // at::linear (MKL sgemm) as PyTorch eager runs it.
        for (mode, into) in
            [(None, &mut ours), (Some(LinearMode::OneDnn), &mut ours_onednn), (Some(LinearMode::Aten), &mut ours_mkl)]
        {
            fast_linear::set_linear_mode(mode);
            std::thread::sleep(settle);
            for _ in 0..per_block {
                let t = Instant::now();
                let _ = model.forward_batch(&batch)?;
                into.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        fast_linear::set_linear_mode(None);
        let block = peer.block(per_block)?;
        theirs.extend(peer::times(&block)?);
        std::thread::sleep(settle);
        for _ in 0..per_block {
            let t = Instant::now();
            let _ = bf16.forward_batch(&batch)?;
            ours_bf16.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let block = peer_bf16.block(per_block)?;
        theirs_bf16.extend(peer::times(&block)?);
    }
    let hello = peer.hello.clone();
    peer.finish()?;
    peer_bf16.finish()?;

    let rounds = ours.len();
    let (o, d, m, t) = (median(ours), median(ours_onednn), median(ours_mkl), median(theirs));
    println!(
        "SmolLM2-135M forward, {:?} ({} tokens), CPU, 2 threads, {} rounds each, interleaved:",
        PROMPT, batch.lengths[0], rounds
    );
    println!("  nnsight-rs (tch 0.26), linear kernels {:?}: median {o:7.2} ms", fast_linear::process_linear_mode());
    println!("  nnsight-rs, linear layers via oneDNN:     median {d:7.2} ms");
    println!("  nnsight-rs, linear layers via at::linear: median {m:7.2} ms");
    println!(
        "  transformers {} (torch {}):   median {t:7.2} ms",
        hello["transformers"].as_str().unwrap_or("?"),
        hello["torch"].as_str().unwrap_or("?")
    );
    println!("  ratio ours / transformers: {:.3}   (with oneDNN: {:.3}, with at::linear: {:.3})", o / t, d / t, m / t);
    linear_paths::print_choices(&format!("the forward: {} rows", batch.lengths[0]));
    let (ob, tb) = (median(ours_bf16), median(theirs_bf16));
    println!("  bfloat16: nnsight-rs median {ob:7.2} ms, transformers median {tb:7.2} ms, ratio {:.3}", ob / tb);
    println!("  bfloat16 against float32: ours {:.3}, transformers {:.3}", ob / o, tb / t);
    println!("  machine: {}", machine::cpu());
    Ok(())
}
