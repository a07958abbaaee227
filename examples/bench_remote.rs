//! What running a block on a server costs over running it here: SmolLM2 served on 127.0.0.1 by this process,
//! the same trace (save layer 15's output and the logits of the last position) run locally and remotely in
//! alternating rounds; prints the medians and their ratio, and checks that the results are bit-identical.
//!
//! ```text
//! cargo run --release --example bench_remote
//! ```

use nnsight::models::AutoModel;
use nnsight::prelude::*;
use nnsight::remote::{Remote, ServeOptions, Server};
use std::time::Instant;

#[path = "support/stats.rs"]
mod stats;
use stats::median;

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const PROMPT: &str = "The Eiffel Tower is in the city of";
const ROUNDS: usize = 15;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tch::set_num_threads(2);
    let quiet = LoadOptions::default().progress(false);
    let served = LanguageModel::<AutoModel>::load_with(MODEL, quiet.clone())?;
    let options = ServeOptions { listen: "127.0.0.1:0".parse()?, ..ServeOptions::default() };
    let server = Server::start(vec![("smollm2".into(), served)], options)?;
    let remote = Remote::new(server.url(), "smollm2");
    let model = LanguageModel::<Llama>::load_with(MODEL, quiet)?;

    let local_run = || -> nnsight::Result<(Tensor, Tensor)> {
        intervene!(model.trace(PROMPT) {
            let h = model.model.layers[15].output.save();
            let logits = model.lm_head.output[(.., -1, ..)].save();
        });
        Ok((h, logits))
    };
    let remote_run = || -> nnsight::Result<(Tensor, Tensor)> {
        intervene!(model.trace(PROMPT).remote(&remote) {
            let h = model.model.layers[15].output.save();
            let logits = model.lm_head.output[(.., -1, ..)].save();
        });
        Ok((h, logits))
    };
    let (a, b) = (local_run()?, remote_run()?);
    if !(a.0.equal(&b.0) && a.1.equal(&b.1)) {
        return Err("the remote results differ from the local ones".into());
    }
    let (mut local, mut far) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let _ = local_run()?;
        local.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let _ = remote_run()?;
        far.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (l, r) = (median(local), median(far));
    println!("SmolLM2, {ROUNDS} rounds, save layer 15 + last logits (bit-identical both ways)");
    println!("local trace   {l:8.2} ms");
    println!("remote trace  {r:8.2} ms  (server in this process, loopback HTTP)");
    println!("ratio         {:8.3}x", r / l);
    Ok(())
}
