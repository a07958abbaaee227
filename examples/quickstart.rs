//! Quickstart: load the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF), print its module tree and the
//! five most likely next tokens after a prompt, then intervene: save a hidden state, run a logit lens over the
//! layers, and ablate an MLP.
//!
//! Run with `make demo` (which fetches libtorch and the model first), or `cargo run --release --example quickstart
//! -- [MODEL] [PROMPT]`.

use nnsight::prelude::*;

fn main() -> nnsight::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".to_string());
    let prompt = args.next().unwrap_or_else(|| "The Eiffel Tower is in the city of".to_string());
    tch::set_num_threads(2);

    let model = LanguageModel::<Llama>::load(&path)?;
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

    // Save a hidden state and read every layer through the final norm and the head (a logit lens).
    let n_layers = model.model().model.layers.len();
    intervene!(model.trace(prompt.as_str()) {
        let mut saved_h5 = Vec::new();
        let mut lens = Vec::new();
        for i in 0..n_layers {
            let h = model.model.layers[i].output;
            if i == 5 {
                saved_h5.push(h.save());
            }
            lens.push(model.lm_head(model.model.norm(h)).i((0, -1)).argmax(-1, false).save());
        }
    });
    let h5 = &saved_h5[0];
    println!(
        "\nlayer 5 output: {:?}, last position's L2 norm {:.2}",
        h5.size(),
        h5.i((0, -1)).norm().double_value(&[])
    );
    println!("logit lens (top token after each layer, last position):");
    for (i, t) in lens.iter().enumerate() {
        print!("{}{:?}", if i % 6 == 0 { "\n  " } else { " " }, model.decode(&[t.int64_value(&[])])?);
    }
    println!();

    // Ablate layer 10's MLP and see what the model predicts instead.
    intervene!(model.trace(prompt.as_str()) {
        model.model.layers[10].mlp.output = model.model.layers[10].mlp.output * 0.0;
        let ablated = model.output.i((0, -1)).softmax(-1).save();
    });
    let (p, id) = ablated.max_dim(-1, false);
    println!(
        "\nwith layer 10's MLP zeroed, the top next token is {:?} ({:.4})",
        model.decode(&[id.int64_value(&[])])?,
        p.double_value(&[])
    );
    Ok(())
}
