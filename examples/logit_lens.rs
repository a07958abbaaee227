//! The logit lens (nostalgebraist, "interpreting GPT: the logit lens", 2020), as in Python nnsight's walkthrough:
//! each layer's residual stream read through the final norm and the unembedding, as if the model stopped there.
//! For every layer and position of "The Eiffel Tower is in the city of" on SmolLM2, the top next token and its
//! probability, drawn as a heatmap (cell text: the token) and printed for the last position.
//!
//! ```text
//! cargo run --release --example logit_lens -- [OUT_DIR]     # pictures into OUT_DIR (default target/pictures)
//! ```

use nnsight::plot::{Heatmap, Scale};
use nnsight::prelude::*;
use std::path::PathBuf;

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const PROMPT: &str = "The Eiffel Tower is in the city of";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "target/pictures".into()));
    let model = LanguageModel::<Llama>::load_with(MODEL, LoadOptions::default().progress(false))?;
    let n_layers = model.model().model.layers.len();

    // Each layer's output through the final norm and the unembedding: [seq, vocab] probabilities per layer.
    intervene!(model.trace(PROMPT) {
        let mut lens = Vec::new();
        for i in 0..n_layers {
            let h = model.model.layers[i].output;
            lens.push(model.lm_head(model.model.norm(h)).i(0).softmax(-1).save());
        }
    });
    let mut probs = Vec::new();
    let mut tokens = Vec::new();
    for layer in &lens {
        let (p, top) = layer.max_dim(-1, false);
        probs.push(Vec::<f64>::try_from(p.to_kind(Kind::Double))?);
        let ids = Vec::<i64>::try_from(top)?;
        tokens.push(ids.iter().map(|&id| model.decode(&[id])).collect::<nnsight::Result<Vec<_>>>()?);
    }

    let positions = model.str_tokens(PROMPT)?;
    let path = out.join("logit_lens.png");
    Heatmap::new(probs.clone())
        .title(format!("Logit lens on SmolLM2-135M: the top next token after each layer ({PROMPT:?})"))
        .rows("layer", (0..n_layers).map(|l| l.to_string()))
        .cols("position (input token)", positions.iter().cloned())
        .cell_text(tokens.clone())
        .value_name("probability of the top token")
        .scale(Scale::Sequential)
        .range(0.0, 1.0)
        .save(&path)?;

    println!("prompt tokens: {positions:?}");
    println!("last position ({:?}), top token after each layer:", positions[positions.len() - 1]);
    for (l, (row, p)) in tokens.iter().zip(&probs).enumerate() {
        let last = row.len() - 1;
        println!("  layer {l:>2}  {:<12} {:.3}", format!("{:?}", row[last]), p[last]);
    }
    let first_paris = tokens.iter().position(|row| row[row.len() - 1] == " Paris");
    match first_paris {
        Some(l) => println!("\" Paris\" is the top token at the last position from layer {l} on: {}", {
            let all = tokens[l..].iter().all(|row| row[row.len() - 1] == " Paris");
            if all {
                "and stays there"
            } else {
                "then comes and goes"
            }
        }),
        None => println!("\" Paris\" is never the top token at the last position"),
    }
    println!("wrote {}", path.display());
    Ok(())
}
