//! Quickstart: load the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF), print its module tree, and
//! print the five most likely next tokens after a prompt.
//!
//! Run with `make demo` (which fetches libtorch and the model first), or `cargo run --release --example quickstart
//! -- [MODEL] [PROMPT]`.

use nnsight::prelude::*;

fn main() -> nnsight::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".to_string());
    let prompt = args.next().unwrap_or_else(|| "The Eiffel Tower is in the city of".to_string());
    tch::set_num_threads(2);

    let model = LanguageModel::<AutoModel>::load(&path)?;
    println!("{}", model.tree());

    let logits = model.forward(prompt.as_str())?; // [1, seq, vocab]
    let last = logits.i((0, -1)).softmax(-1, Kind::Float);
    let (probs, ids) = last.topk(5, -1, true, true);
    println!("Top 5 next tokens after {prompt:?}:");
    for k in 0..5 {
        let id = ids.int64_value(&[k]);
        let p = probs.double_value(&[k]);
        println!("  {:>6}  {:<14} {:.4}", id, format!("{:?}", model.decode(&[id])?), p);
    }
    Ok(())
}
