//! The logit lens of any checkpoint, written once with the standard names: load whatever the path holds (a Hugging
//! Face folder or a GGUF file of any supported family) as an `AutoModel`, and print, for each layer, the token the
//! residual stream after it would predict at the last position, its probability, and the probability it gives the
//! model's final prediction; then the attention of the last layer's heads from the last position.
//!
//! `cargo run --release --example any_model -- [MODEL] [PROMPT]` (default: the embedded SmolLM2 GGUF and the
//! Eiffel prompt). The same functions run on a typed model (`LanguageModel<Llama>`, `LanguageModel<GptNeoX>`):
//! they are generic over the architecture.

use nnsight::prelude::*;

/// Each layer's residual stream after it, through the final norm and the unembedding, at the last position, as
/// probabilities `[vocab]`; and the model's own last-position probabilities.
fn logit_lens<M: CausalLm>(model: &LanguageModel<M>, prompt: &str) -> nnsight::Result<(Vec<Tensor>, Tensor)> {
    let n = model.standard_names().n_layers;
    intervene!(model.trace(prompt) {
        let mut lens = Vec::new();
        for i in 0..n {
            let h = model.layers[i].output;
            lens.push(model.unembed(model.final_norm(h)).i((0, -1)).softmax(-1).save());
        }
        let probs = model.output.i((0, -1)).softmax(-1).save();
    });
    Ok((lens, probs))
}

/// The last layer's attention probabilities from the last position, `[heads, seq]`.
fn last_attention<M: CausalLm>(model: &LanguageModel<M>, prompt: &str) -> nnsight::Result<Tensor> {
    intervene!(model.trace(prompt) {
        let pattern = model.layers[-1].attn.probs.output.i((0, .., -1)).save();
    });
    Ok(pattern)
}

fn main() -> nnsight::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".to_string());
    let prompt = args.next().unwrap_or_else(|| "The Eiffel Tower is in the city of".to_string());
    tch::set_num_threads(2);

    let model = LanguageModel::<AutoModel>::load(&path)?;
    let names = model.standard_names();
    println!(
        "{} is a {} with {} layers; standard names: embed = {}, layers = {}.N, attn = .{}, mlp = .{}, final_norm = {}, unembed = {}",
        model.source().display(),
        model.model().architecture(),
        names.n_layers,
        names.embed,
        names.layers,
        names.attention,
        names.mlp,
        names.final_norm,
        names.unembed,
    );

    let (lens, probs) = logit_lens(&model, &prompt)?;
    let answer = probs.argmax(-1, false).int64_value(&[]);
    println!("\nlogit lens of {prompt:?} (last position); the model predicts {:?}", model.decode(&[answer])?);
    println!("  layer  top token        p(top)  p({:?})", model.decode(&[answer])?);
    for (i, p) in lens.iter().enumerate() {
        let top = p.argmax(-1, false).int64_value(&[]);
        println!(
            "  {i:>5}  {:<15}  {:.4}  {:.4}",
            format!("{:?}", model.decode(&[top])?),
            p.double_value(&[top]),
            p.double_value(&[answer])
        );
    }

    let pattern = last_attention(&model, &prompt)?;
    let ids = model.encode(&prompt)?;
    println!("\nlast layer: where each head looks from the last position (its top key token and weight)");
    for h in 0..pattern.size()[0] {
        let row = pattern.get(h);
        let k = row.argmax(-1, false).int64_value(&[]);
        let token = model.decode(&ids[k as usize..k as usize + 1])?;
        println!("  head {h:>2}: {:<15} {:.3}", format!("{token:?}"), row.double_value(&[k]));
    }
    Ok(())
}
