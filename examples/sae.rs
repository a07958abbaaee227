//! Dictionary learning, as in Python nnsight's tutorial on sparse autoencoders: an SAE trained on SmolLM2's
//! residual stream after layer 15, on text the model writes itself (sampled with a fixed seed from a few dozen
//! varied opening lines), then measured (reconstruction, L0, dead features, the language-model loss recovered when
//! it is spliced in, on held-out sentences), drawn (the training curve; the strongest features of a prompt, token
//! by token) and saved in SAELens's format.
//!
//! ```text
//! cargo run --release --example sae -- [OUT_DIR]     # pictures and the SAE into OUT_DIR (default target/pictures)
//! ```

use nnsight::plot::{Heatmap, Lines, Scale};
use nnsight::prelude::*;
use nnsight::sae::train::{self, TrainOptions};
use nnsight::sae::{Activation, Site};
use std::path::PathBuf;
use std::time::Instant;

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const LAYER: usize = 15;
/// Each text's first token is left out (its residual stream is an outlier of a large norm, an attention sink).
const FROM: i64 = 1;

/// Opening lines the model continues: the training corpus.
const SEEDS: &[&str] = &[
    "The history of the Roman Empire",
    "To bake a loaf of bread, you need",
    "In Python, a list comprehension",
    "The mitochondria is the powerhouse of",
    "Once upon a time, in a small village,",
    "The stock market fell sharply today after",
    "My favourite football team won",
    "The recipe calls for two cups of",
    "Photosynthesis converts sunlight into",
    "Dear customer, thank you for your order",
    "The theory of relativity says that",
    "Paris is the capital of France, and",
    "The best way to learn a new language is",
    "In the year 1969, astronauts",
    "def fibonacci(n):",
    "The weather forecast for tomorrow predicts",
    "She opened the old wooden door and saw",
    "A healthy breakfast should include",
    "The election results were announced",
    "Climate change affects the oceans by",
    "The guitar solo in that song",
    "How do airplanes stay in the air?",
    "The Great Wall of China was built",
    "SELECT name, age FROM users WHERE",
    "My grandmother always told me",
    "The doctor said the patient",
    "Machine learning models learn from",
    "The cat jumped onto the table and",
    "In chess, the queen can move",
    "The Amazon rainforest is home to",
    "To install the package, run",
    "The painting by Van Gogh shows",
    "Water boils at 100 degrees Celsius because",
    "The children played in the park until",
    "An email to my manager about the deadline:",
    "The price of the new phone is",
    "Shakespeare wrote many plays, including",
    "The train to London leaves at",
    "Volcanoes erupt when",
    "The meeting has been moved to Thursday because",
    "Our solar system has eight planets:",
    "The basketball player scored",
    "A poem about the sea:",
    "The law requires every citizen to",
    "In the kitchen, the smell of",
    "The first step in solving an equation is",
    "Birds migrate south in winter because",
    "The museum opens at nine and",
];

/// Held-out text for the loss recovered: sentences written for this example, not generated.
const HELD_OUT: &[&str] = &[
    "The Eiffel Tower is in the city of Paris, and millions of people visit it every year.",
    "Sparse autoencoders split a model's activations into many features, few of them active at once.",
    "She poured a cup of coffee, opened her laptop and started to write the report.",
    "The river flows through the valley and into the sea near the old harbour town.",
    "In 1492, Columbus sailed across the Atlantic Ocean with three ships.",
    "If the function returns an error, the program prints a message and stops.",
    "The team practised every morning, and by the end of the season they won the cup.",
    "Add the flour and the sugar, then stir until the mixture is smooth.",
    "Interpretability research asks what the internal representations of a network mean.",
    "The train was late, so we waited on the platform for almost an hour.",
];

/// The prompt whose features the heatmap shows.
const PROMPT: &str = "The Eiffel Tower is in Paris, and the Colosseum is in Rome.";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "target/pictures".into()));
    std::fs::create_dir_all(&out)?;
    let model = LanguageModel::<Llama>::load_with(MODEL, LoadOptions::default().progress(false))?;
    let start = Instant::now();

    // The corpus: a sampled continuation of every opening line, in one batch.
    let mut texts = Vec::new();
    for seed in [0] {
        let options = GenerateOptions::new().max_new_tokens(48).do_sample(true).temperature(0.9).top_p(0.95).seed(seed);
        let generated = model.generate(SEEDS.to_vec(), &options)?;
        for row in &generated.rows {
            texts.push(row.text(&model)?);
        }
    }
    let corpus: Vec<&str> = texts.iter().map(String::as_str).collect();
    let t_generate = start.elapsed().as_secs_f64();
    eprintln!("generated {} texts in {t_generate:.1} s", texts.len());

    // Layer 15's output over the corpus, and the token at each row.
    let site = Site::Output(LAYER);
    let acts = train::collect(&model, &corpus, site, FROM)?;
    let mut row_tokens = Vec::new();
    for text in &corpus {
        let tokens = model.str_tokens(text)?;
        if tokens.len() as i64 > FROM {
            row_tokens.extend(tokens[FROM as usize..].iter().cloned());
        }
    }
    assert_eq!(row_tokens.len() as i64, acts.size()[0]);
    let held_out = train::collect(&model, HELD_OUT, site, FROM)?;
    let t_collect = start.elapsed().as_secs_f64() - t_generate;
    eprintln!("collected the activations in {t_collect:.1} s");
    println!("corpus: {} texts, {} training rows; {} held-out rows", corpus.len(), acts.size()[0], held_out.size()[0]);
    println!("  e.g. {:?}", &corpus[0]);

    // Train.
    let options = TrainOptions {
        d_sae: 2048,
        activation: Activation::Relu,
        l1_coefficient: 6.0,
        lr: 5e-4,
        steps: 800,
        batch_size: 256,
        seed: 0,
        log_every: 20,
        hook_name: format!("blocks.{LAYER}.hook_resid_post"),
    };
    let (mut sae, curve) = train::train(&acts, &options)?;
    sae.model_name = "SmolLM2-135M-Instruct".into();
    let t_train = start.elapsed().as_secs_f64() - t_generate - t_collect;

    // Measure.
    let on_train = train::evaluate(&sae, &acts)?;
    let on_held = train::evaluate(&sae, &held_out)?;
    let loss = train::loss_recovered(&model, &sae, HELD_OUT, FROM)?;
    println!(
        "SAE d_sae {} ({:?}, L1 {}), {} steps of {} rows",
        options.d_sae, options.activation, options.l1_coefficient, options.steps, options.batch_size
    );
    for (name, r) in [("training rows", on_train), ("held-out rows", on_held)] {
        println!(
            "  {name:<14} MSE {:.4}  variance explained {:.3}  mean L0 {:.1}  dead features {} of {}",
            r.mse, r.explained_variance, r.l0, r.dead, options.d_sae
        );
    }
    println!(
        "  LM loss on held-out text (nats/token): clean {:.3}, SAE spliced in {:.3}, zero-ablated {:.3}; loss recovered {:.3}",
        loss.clean, loss.spliced, loss.zero, loss.recovered
    );

    // The training curve.
    let steps: Vec<f64> = curve.iter().map(|s| s.step as f64).collect();
    let points = |f: fn(&train::TrainStep) -> f64| -> Vec<(f64, f64)> {
        steps.iter().zip(&curve).map(|(&x, s)| (x, f(s))).collect()
    };
    Lines::new()
        .title(format!("SAE on SmolLM2 layer {LAYER}: reconstruction error (on inputs of mean square 1)"))
        .axes("step", "MSE per element")
        .series_xy("MSE", &points(|s| s.mse))
        .save(out.join("sae_training_mse.png"))?;
    Lines::new()
        .title(format!("SAE on SmolLM2 layer {LAYER}: active features per token"))
        .axes("step", "mean L0")
        .series_xy("L0", &points(|s| s.l0))
        .save(out.join("sae_training_l0.png"))?;

    // The strongest features of a prompt, token by token.
    intervene!(model.trace(PROMPT) {
        let h = model.layers[LAYER].output;
        let features = sae.encode_in(h).i(0).save(); // [seq, d_sae]
    });
    let features = features.i(FROM..);
    let tokens = model.str_tokens(PROMPT)?[FROM as usize..].to_vec();
    let (_, order) = features.amax(0, false).sort(0, true);
    let top: Vec<i64> = Vec::<i64>::try_from(order.i(..12))?;
    let rows: Vec<Vec<f64>> = top
        .iter()
        .map(|&i| Vec::<f64>::try_from(features.i((.., i)).to_kind(Kind::Double)))
        .collect::<Result<_, _>>()?;
    Heatmap::new(rows)
        .title(format!("SAE features of SmolLM2 layer {LAYER}: the 12 strongest on {PROMPT:?}"))
        .rows("feature", top.iter().map(|i| format!("#{i}")))
        .cols("token", tokens.iter().cloned())
        .value_name("feature activation")
        .scale(Scale::Sequential)
        .save(out.join("sae_features.png"))?;

    // Where some of those features fire most in the corpus.
    let all = sae.encode(&acts)?;
    println!("top-activating corpus tokens of the prompt's strongest features:");
    for &i in top.iter().take(6) {
        let (values, rows) = all.i((.., i)).topk(8, 0, true, true);
        let values = Vec::<f64>::try_from(values.to_kind(Kind::Double))?;
        let rows = Vec::<i64>::try_from(rows)?;
        let shown: Vec<String> = rows
            .iter()
            .zip(&values)
            .filter(|(_, &v)| v > 0.0)
            .map(|(&r, v)| format!("{:?} {v:.1}", row_tokens[r as usize]))
            .collect();
        println!("  feature #{i:<5} {}", shown.join(", "));
    }

    sae.save(out.join("sae-smollm2-layer15"))?;
    println!(
        "time: generate {t_generate:.1} s, collect {t_collect:.1} s, train {t_train:.1} s, whole {:.1} s",
        start.elapsed().as_secs_f64()
    );
    println!(
        "wrote {}/sae_training_mse.png, sae_training_l0.png, sae_features.png, sae-smollm2-layer15/",
        out.display()
    );
    Ok(())
}
