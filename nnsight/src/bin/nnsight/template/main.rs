//! An experiment on the default model (SmolLM2-135M-Instruct): the most likely next tokens, a hidden state saved,
//! a logit lens over the layers, and an MLP ablated. `cargo run --release`.

use nnsight::prelude::*;

fn main() -> nnsight::Result<()> {
    let model = LanguageModel::<Llama>::load(nnsight::default_model()?)?;
    let prompt = "The Eiffel Tower is in the city of";

    // The five most likely next tokens.
    let logits = model.forward(prompt)?; // [1, seq, vocab]
    let (probs, ids) = logits.i((0, -1)).softmax(-1, Kind::Float).topk(5, -1, true, true);
    println!("top next tokens after {prompt:?}:");
    for k in 0..5 {
        let token = model.decode(&[ids.int64_value(&[k])])?;
        println!("  {:<12} {:.4}", format!("{token:?}"), probs.double_value(&[k]));
    }

    // Save a hidden state.
    intervene!(model.trace(prompt) {
        let h5 = model.model.layers[5].output.save(); // [1, seq, hidden]
    });
    println!("\nlayer 5 output {:?}, last position's norm {:.2}", h5.size(), h5.i((0, -1)).norm().double_value(&[]));

    // A logit lens: every layer's output read through the final norm and the head.
    let n_layers = model.model().model.layers.len();
    intervene!(model.trace(prompt) {
        let mut lens = Vec::new();
        for i in 0..n_layers {
            let h = model.model.layers[i].output;
            lens.push(model.lm_head(model.model.norm(h)).i((0, -1)).argmax(-1, false).save());
        }
    });
    print!("logit lens, top token after each layer:");
    for (i, t) in lens.iter().enumerate() {
        print!("{}{:?}", if i % 10 == 0 { "\n  " } else { " " }, model.decode(&[t.int64_value(&[])])?);
    }
    println!();

    // Ablate layer 10's MLP: what does the model predict now?
    intervene!(model.trace(prompt) {
        model.model.layers[10].mlp.output = model.model.layers[10].mlp.output * 0.0;
        let ablated = model.output.i((0, -1)).softmax(-1).save();
    });
    let (p, id) = ablated.max_dim(-1, false);
    let token = model.decode(&[id.int64_value(&[])])?;
    println!("\nwith layer 10's MLP zeroed, the top next token is {token:?} ({:.4})", p.double_value(&[]));
    Ok(())
}
