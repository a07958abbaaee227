//! Boundless DAS on SmolLM2 (`nnsight::das`): where, in the residual stream at a country's token, does the model
//! keep which country it is, as far as naming its capital goes?
//!
//! The task: "Q: What is the capital city of France?\nA: The capital city is" → " Paris". Its causal variable is
//! the country; an interchange intervention puts the source prompt's country into the base prompt, and the
//! counterfactual label is the source country's capital. The example first checks the model solves the task
//! (its accuracy over 40 countries), keeps the countries it answers right whose name is one token (so the
//! country sits at the same position in every prompt) and whose capitals start with different tokens, splits the
//! ordered (base, source) pairs into training and held-out pairs, and trains a rotation and a boundary at the
//! output of one decoder layer, at the country's token. It prints the interchange-intervention accuracy (IIA) on
//! the held-out pairs for the trained rotation and boundary, for a random rotation with the same number of
//! dimensions, and for a swap of the whole hidden state (activation patching), and draws the training curve.
//!
//! ```text
//! cargo run --release --example boundless_das [-- OUTPUT_FOLDER]    # default target/pictures
//! ```

use nnsight::das::{Boundary, BoundlessDas, Pair, Rotation, TrainConfig};
use nnsight::plot::Lines;
use nnsight::prelude::*;
use std::path::PathBuf;
use std::time::Instant;

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const TEMPLATE: (&str, &str) = ("Q: What is the capital city of", "?\nA: The capital city is");
/// Countries and their capitals (the first token of " " + capital is the answer).
const COUNTRIES: [(&str, &str); 40] = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("China", "Beijing"),
    ("Russia", "Moscow"),
    ("Egypt", "Cairo"),
    ("Greece", "Athens"),
    ("England", "London"),
    ("Canada", "Ottawa"),
    ("India", "New Delhi"),
    ("Austria", "Vienna"),
    ("Poland", "Warsaw"),
    ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Turkey", "Ankara"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Cuba", "Havana"),
    ("Thailand", "Bangkok"),
    ("Korea", "Seoul"),
    ("Hungary", "Budapest"),
    ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"),
    ("Belgium", "Brussels"),
    ("Argentina", "Buenos Aires"),
    ("Mexico", "Mexico City"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Syria", "Damascus"),
    ("Vietnam", "Hanoi"),
    ("Chile", "Santiago"),
    ("Colombia", "Bogotá"),
    ("Netherlands", "Amsterdam"),
    ("Australia", "Canberra"),
    ("Brazil", "Brasília"),
    ("Israel", "Jerusalem"),
];

/// The decoder layer whose output is intervened on.
const LAYER: usize = 8;
/// The boundary's start, in dimensions of 576.
const START: f64 = 64.0;
/// Held-out pairs (IIA), and how many of them the curve evaluates every `EVERY` steps.
const HELD_OUT: usize = 96;
const CURVE: usize = 48;
const EVERY: usize = 10;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let start = Instant::now();
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "target/pictures".into()));
    std::fs::create_dir_all(&out)?;
    let layer = LAYER;
    let config = TrainConfig { steps: 40, batch_size: 16, boundary_penalty: 2.0, ..TrainConfig::default() };
    let model = LanguageModel::<Llama>::load(MODEL)?;

    // 1. Does the model solve the task? The prompts of every country, one batch; the answer is the argmax.
    let prompts: Vec<Vec<i64>> = COUNTRIES
        .iter()
        .map(|(c, _)| model.encode(&format!("{} {c}{}", TEMPLATE.0, TEMPLATE.1)))
        .collect::<nnsight::Result<_>>()?;
    let answers: Vec<i64> =
        COUNTRIES.iter().map(|(_, cap)| Ok(model.encode(&format!(" {cap}"))?[0])).collect::<nnsight::Result<_>>()?;
    let mut top = Vec::new();
    for ids in &prompts {
        let logits = model.forward(ids.clone())?;
        top.push(logits.get(0).get(-1).argmax(-1, false).int64_value(&[]));
    }
    let solved: Vec<usize> = (0..COUNTRIES.len()).filter(|&i| top[i] == answers[i]).collect();
    println!(
        "the task: {:?} -> capital; SmolLM2 answers {} of {} countries right ({:.0}%)",
        format!("{} <country>{}", TEMPLATE.0, TEMPLATE.1),
        solved.len(),
        COUNTRIES.len(),
        100.0 * solved.len() as f64 / COUNTRIES.len() as f64
    );
    // Keep those whose prompt has the common length (a one-token name) and whose answer token no other has.
    let length = prompts[0].len().min(prompts.iter().map(Vec::len).min().unwrap_or(0));
    let kept: Vec<usize> = solved
        .iter()
        .copied()
        .filter(|&i| prompts[i].len() == length)
        .filter(|&i| solved.iter().filter(|&&j| answers[j] == answers[i]).count() == 1)
        .collect();
    let position = (0..length).find(|&p| prompts[kept[0]][p] != prompts[kept[1]][p]).ok_or("no differing token")?;
    println!(
        "kept {} countries (one-token names, distinct answers); the country is token {position} of {length}",
        kept.len()
    );

    // 2. Pairs: every ordered (base, source) of two kept countries, shuffled; HELD_OUT held out, the rest train.
    let mut pairs: Vec<Pair> = Vec::new();
    for &b in &kept {
        for &s in &kept {
            if b != s {
                pairs.push(Pair::new(prompts[b].clone(), prompts[s].clone(), position as i64, answers[s]));
            }
        }
    }
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for i in (1..pairs.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        pairs.swap(i, (state % (i as u64 + 1)) as usize);
    }
    let held_out = pairs.split_off(pairs.len() - HELD_OUT);
    let train = pairs;
    println!("{} training pairs, {} held-out pairs", train.len(), held_out.len());

    // 3. Train at one layer, the country's token.
    let mut das = BoundlessDas::new(&model, layer, 0)?;
    das.boundary = Boundary::new(das.hidden_size(), START)?;
    let mut iia_curve: Vec<(f64, f64)> = Vec::new();
    let t_train = Instant::now();
    println!("training at model.layers[{layer}].output, token {position}: {config:?}");
    let logs = das.train(&train, &config, |das, log| {
        if log.step % EVERY == 0 || log.step + 1 == config.steps {
            let iia = das.iia(&held_out[..CURVE])?;
            iia_curve.push((log.step as f64, iia));
            println!(
                "step {:>3}  loss {:.3}  batch accuracy {:.2}  boundary {:6.1} dims  T {:6.2}  IIA on {CURVE} held-out {iia:.3}  ({:.0} s)",
                log.step,
                log.loss,
                log.accuracy,
                log.boundary,
                log.temperature,
                t_train.elapsed().as_secs_f64()
            );
        }
        Ok(())
    })?;

    // 4. IIA: trained, a random rotation with the same boundary, the whole state (activation patching), nothing.
    let dims = das.boundary.dims();
    let hidden = das.hidden_size();
    let trained = das.iia(&held_out)?;
    let random =
        BoundlessDas::with_parts(&model, layer, Rotation::random(hidden, 1)?, Boundary::new(hidden, dims as f64)?)?
            .iia(&held_out)?;
    let full =
        BoundlessDas::with_parts(&model, layer, Rotation::random(hidden, 1)?, Boundary::new(hidden, hidden as f64)?)?
            .iia(&held_out)?;
    println!("held-out IIA at model.layers[{layer}].output, token {position}:");
    println!("  trained rotation, {dims} of {hidden} dimensions: {trained:.3}");
    println!("  random rotation, the same {dims} dimensions:    {random:.3}");
    println!("  the whole hidden state (activation patching):   {full:.3}");

    // 5. Pictures.
    let steps: Vec<f64> = logs.iter().map(|l| l.step as f64).collect();
    let xy = |f: &dyn Fn(&nnsight::das::StepLog) -> f64| -> Vec<(f64, f64)> {
        steps.iter().zip(&logs).map(|(&s, l)| (s, f(l))).collect()
    };
    Lines::new()
        .title(format!("boundless DAS at layer {layer}: training"))
        .axes("step", "loss")
        .series_xy("cross-entropy of the counterfactual label", &xy(&|l| l.cross_entropy))
        .save(out.join("boundless_das_loss.png"))?;
    Lines::new()
        .title(format!("boundless DAS at layer {layer}: accuracy"))
        .axes("step", "accuracy")
        .series_xy("training batch (soft mask)", &xy(&|l| l.accuracy))
        .series_xy(format!("IIA on {CURVE} held-out pairs (hard mask)"), &iia_curve)
        .save(out.join("boundless_das_iia.png"))?;
    Lines::new()
        .title(format!("boundless DAS at layer {layer}: boundary"))
        .axes("step", "dimensions swapped")
        .series_xy("boundary", &xy(&|l| l.boundary))
        .save(out.join("boundless_das_boundary.png"))?;
    println!(
        "wrote {}/boundless_das_{{loss,iia,boundary}}.png; {:.1} s in all",
        out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
