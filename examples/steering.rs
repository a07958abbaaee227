//! A steering vector on SmolLM2, taken out of the lab as a llama.cpp control vector.
//!
//! From a handful of contrastive pairs (happy vs sad), `SteeringVector::contrastive` takes the difference of the
//! mean last-token activations at the output of every decoder layer (1 to 29, llama.cpp's range), of which the
//! example keeps layers 8 to 11. It greedily continues two prompts without the vector and with it at two strengths (the vector added to the chosen
//! layers' outputs at every position and every step, as llama.cpp's `--control-vector-scaled` does), writes
//! `target/steering/happy.gguf` (a GGUF control vector: `direction.N` for layer N, F32) and prints the llama.cpp
//! command that applies the same vector to the same model. It reads the file back and checks that it holds the
//! vector bit for bit.
//!
//! ```text
//! cargo run --release --example steering
//! ```

use nnsight::prelude::*;
use nnsight::steering::{Pooling, SteeringVector};
use std::time::Instant;

/// Positive (happy) and negative (sad) prompts, in pairs that differ only in the mood.
const PAIRS: &[(&str, &str)] = &[
    ("I feel so happy and cheerful today", "I feel so sad and miserable today"),
    ("What a wonderful, joyful morning", "What a terrible, gloomy morning"),
    ("She smiled with delight", "She cried with grief"),
    ("The news filled us with joy", "The news filled us with sorrow"),
    ("Life is beautiful and full of hope", "Life is bleak and full of despair"),
    ("We laughed together all evening", "We wept alone all evening"),
];
const PROMPTS: &[&str] = &["Today I went to the park and", "My week has been"];
/// The layers steered: four in the lower middle of SmolLM2's 30 (the directions are not normalized: their norms
/// are 35-38 there, and added at four layers a strength of 0.3 already turns the mood).
const LAYERS: std::ops::Range<usize> = 8..12;
const STRENGTHS: [f64; 2] = [0.15, 0.3];
const NEW_TOKENS: usize = 20;
const OUT: &str = "target/steering/happy.gguf";

fn main() -> nnsight::Result<()> {
    let start = Instant::now();
    let model_path = nnsight::default_model()?;
    let model = LanguageModel::<Llama>::load(&model_path)?;

    let vector = SteeringVector::contrastive(&model, PAIRS, Pooling::LastToken)?.select(LAYERS);
    let norms: Vec<String> =
        vector.directions.iter().map(|(l, d)| format!("{l}:{:.1}", d.norm().double_value(&[]))).collect();
    println!(
        "happy - sad over {} pairs, last token, layers {:?}; |direction| by layer: {}",
        PAIRS.len(),
        LAYERS,
        norms.join(" ")
    );

    let options = GenerateOptions::new().max_new_tokens(NEW_TOKENS).stop_ids([]);
    for prompt in PROMPTS {
        println!("\n{prompt:?}");
        let plain = model.generate(*prompt, &options)?;
        println!("  {:<13} {:?}", "unsteered", plain.rows[0].new_text(&model)?);
        for strength in STRENGTHS {
            let steered = vector.edit(&model, strength)?.generate(*prompt, &options)?;
            println!("  {:<13} {:?}", format!("strength {strength}"), steered.rows[0].new_text(&model)?);
        }
    }

    vector.write_control_vector(OUT)?;
    let back = SteeringVector::read_control_vector(OUT)?;
    if back.layers() != vector.layers() || back.directions.iter().any(|(l, d)| !d.equal(&vector.directions[l])) {
        return Err(nnsight::Error::InvalidInput { message: format!("{OUT} does not read back as written") });
    }
    println!(
        "\nwrote {OUT}: {} directions (direction.{} to direction.{}), {} bytes; it reads back bit for bit",
        back.directions.len(),
        LAYERS.start,
        LAYERS.end - 1,
        std::fs::metadata(OUT).map(|m| m.len()).unwrap_or(0)
    );
    let strength = STRENGTHS[1];
    println!("the same steering in llama.cpp:");
    println!(
        "  llama-cli -m {} --control-vector-scaled {OUT} {strength} -p {:?} -n {NEW_TOKENS} --temp 0",
        model_path.display(),
        PROMPTS[0]
    );
    println!("done in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}
