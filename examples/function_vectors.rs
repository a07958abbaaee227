//! Function vectors (Todd et al., "Function Vectors in Large Language Models", ICLR 2024), as in Python nnsight's
//! "function vectors" tutorial, on SmolLM2 with `nnsight::function_vectors`: a task SmolLM2 does when shown a few
//! examples (TASK below), and the attention heads that carry it.
//!
//! 1. In-context (ICL) prompts of five examples, "Q: x\nA: y\n\n" each, then "Q: query\nA:"; zero-shot prompts
//!    are "Q: query\nA:" alone. The accuracy (top next token = the answer's first token) on held-out queries, with five examples, with
//!    five examples whose labels are shuffled, and zero-shot.
//! 2. Each head's mean output at the last token over ICL prompts of training pairs; each head's causal indirect
//!    effect: its mean written into shuffled-label prompts, the rise of P(correct answer). A heatmap of it.
//! 3. The function vector: the sum of the top heads' mean outputs (through `o_proj`). Added to the residual stream
//!    after every fourth layer at the last token of zero-shot prompts, at strengths 1 and 3: accuracy on training
//!    queries (to choose the layer and strength) and on held-out ones (what is reported), drawn as lines; and the
//!    held-out shuffled-label prompts with the vector.
//!
//! ```text
//! cargo run --release --example function_vectors -- [OUT_DIR]     # pictures into OUT_DIR (default target/pictures)
//! cargo run --release --example function_vectors -- [OUT_DIR] --heads 14.1,20.5,18.1   # these heads, no sweep
//! ```

use nnsight::function_vectors::{self as fv, FunctionVector};
use nnsight::plot::Lines;
use nnsight::prelude::*;
use std::path::PathBuf;
use std::time::Instant;

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The task: (input, output) pairs; the first half trains (examples, means, effects), the second half is held out.
const TASK: &str = "antonyms";
const PAIRS: &[(&str, &str)] = &[
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("up", "down"),
    ("happy", "sad"),
    ("good", "bad"),
    ("old", "young"),
    ("rich", "poor"),
    ("open", "closed"),
    ("light", "dark"),
    ("hard", "soft"),
    ("high", "low"),
    ("long", "short"),
    ("early", "late"),
    ("full", "empty"),
    ("strong", "weak"),
    ("wet", "dry"),
    ("clean", "dirty"),
    ("love", "hate"),
    ("win", "lose"),
    ("true", "false"),
    ("day", "night"),
    ("left", "right"),
    ("black", "white"),
    ("thick", "thin"),
    ("cheap", "expensive"),
    ("loud", "quiet"),
    ("near", "far"),
    ("heavy", "light"),
    ("first", "last"),
    ("before", "after"),
    ("push", "pull"),
    ("buy", "sell"),
    ("alive", "dead"),
    ("inside", "outside"),
    ("top", "bottom"),
    ("war", "peace"),
    ("friend", "enemy"),
    ("north", "south"),
    ("east", "west"),
    ("sweet", "sour"),
    ("wide", "narrow"),
    ("deep", "shallow"),
    ("safe", "dangerous"),
    ("question", "answer"),
    ("give", "take"),
    ("remember", "forget"),
    ("asleep", "awake"),
];
/// Examples shown in an in-context prompt.
const SHOTS: usize = 5;
/// ICL prompts whose heads are averaged, and shuffled-label prompts the effects are measured on.
const MEAN_PROMPTS: usize = 16;
const EFFECT_PROMPTS: usize = 3;
/// Heads summed into the vector, and the strengths it is tried with.
const TOP_HEADS: usize = 10;
const STRENGTHS: &[f64] = &[1.0, 3.0];
/// The vector is tried after every LAYER_STEP-th layer.
const LAYER_STEP: usize = 4;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = PathBuf::from(
        args.first().filter(|a| !a.starts_with("--")).cloned().unwrap_or_else(|| "target/pictures".into()),
    );
    // `--heads 14.1,20.5,..`: use these heads and skip the effects sweep (the slow part).
    let given: Option<Vec<(usize, usize)>> =
        args.iter().position(|a| a == "--heads").and_then(|i| args.get(i + 1)).map(|list| {
            list.split(',')
                .filter_map(|lh| lh.split_once('.').and_then(|(l, h)| Some((l.parse().ok()?, h.parse().ok()?))))
                .collect()
        });
    let start = Instant::now();
    let model = LanguageModel::<Llama>::load_with(MODEL, LoadOptions::default().progress(false))?;
    let n_layers = model.standard_names().n_layers;
    let (train, test) = PAIRS.split_at(PAIRS.len() / 2);
    let mut rng = Lcg(7);
    let answer = |y: &str| -> nnsight::Result<i64> { Ok(model.encode(&format!(" {y}"))?[0]) };
    let accuracy = |next: &[i64], pairs: &[(&str, &str)]| -> nnsight::Result<f64> {
        let right = next.iter().zip(pairs).filter(|(t, (_, y))| answer(y).is_ok_and(|a| a == **t)).count();
        Ok(right as f64 / pairs.len() as f64)
    };

    // 1. Accuracy on held-out queries: with examples (correct and shuffled labels) and zero-shot.
    let icl: Vec<String> = test.iter().map(|(x, _)| icl_prompt(&rng.examples(train, SHOTS), x)).collect();
    let shuffled: Vec<String> = test.iter().map(|(x, _)| icl_prompt(&rng.shuffled(train, SHOTS), x)).collect();
    let zero_shot: Vec<String> = test.iter().map(|(x, _)| zero_shot_prompt(x)).collect();
    let icl_acc = accuracy(&fv::next_tokens(&model, &icl)?, test)?;
    let shuffled_acc = accuracy(&fv::next_tokens(&model, &shuffled)?, test)?;
    let zero_next = fv::next_tokens(&model, &zero_shot)?;
    let zero_acc = accuracy(&zero_next, test)?;
    println!("{TASK} on SmolLM2-135M, {} held-out queries:", test.len());
    println!(
        "  {SHOTS} examples {:.0}%, {SHOTS} shuffled examples {:.0}%, zero-shot {:.0}%",
        100.0 * icl_acc,
        100.0 * shuffled_acc,
        100.0 * zero_acc
    );

    // 2. Mean head outputs over ICL prompts of training pairs; causal indirect effects on shuffled prompts.
    let mean_prompts: Vec<String> = (0..MEAN_PROMPTS)
        .map(|_| {
            let ex = rng.examples(train, SHOTS + 1);
            icl_prompt(&ex[..SHOTS], ex[SHOTS].0)
        })
        .collect();
    let means = fv::mean_head_outputs(&model, &mean_prompts)?;
    let top = match &given {
        Some(heads) => heads.clone(),
        None => {
            let (effect_prompts, effect_answers): (Vec<String>, Vec<i64>) = (0..EFFECT_PROMPTS)
                .map(|_| {
                    let q = rng.examples(train, 1)[0];
                    (icl_prompt(&rng.shuffled(train, SHOTS), q.0), answer(q.1).unwrap_or(0))
                })
                .unzip();
            let t = Instant::now();
            let cie = fv::causal_indirect_effects(&model, &means.activations, &effect_prompts, &effect_answers)?;
            let cie_time = t.elapsed().as_secs_f64();
            let top = fv::top_heads(&cie, TOP_HEADS);
            println!("\ncausal indirect effect of each head ({} heads x {EFFECT_PROMPTS} shuffled prompts, {cie_time:.1} s); the top {TOP_HEADS}:", cie.values.numel());
            println!(
                "  {}",
                top.iter()
                    .map(|&(l, h)| format!("{l}.{h} ({:.3})", cie.at(&[l as i64, h as i64])))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let cie_path = out.join("function_vectors_cie.png");
            cie.heatmap()?
                .title(format!("Function vectors on SmolLM2-135M ({TASK}): each head's causal indirect effect"))
                .value_name("rise of P(correct answer), shuffled-label prompts")
                .save(&cie_path)?;
            println!("wrote {}", cie_path.display());
            top
        }
    };

    // 3. The function vector, added after each layer at the last token of zero-shot prompts, at each strength;
    // the layer and strength chosen on the training queries, the accuracy reported on the held-out ones.
    let vector = FunctionVector::from_heads(&means.outputs, &top)?;
    let layers: Vec<usize> = (0..n_layers).step_by(LAYER_STEP).collect();
    let train_zero: Vec<String> = train.iter().map(|(x, _)| zero_shot_prompt(x)).collect();
    let mut sweeps = Vec::new(); // (strength, train accuracy by layer, held-out accuracy by layer, held-out tokens)
    for &strength in STRENGTHS {
        let on_train = vector.layer_sweep(&model, &train_zero, &layers, strength)?;
        let on_test = vector.layer_sweep(&model, &zero_shot, &layers, strength)?;
        let train_acc: Vec<f64> = on_train.iter().map(|n| accuracy(n, train)).collect::<nnsight::Result<_>>()?;
        let test_acc: Vec<f64> = on_test.iter().map(|n| accuracy(n, test)).collect::<nnsight::Result<_>>()?;
        sweeps.push((strength, train_acc, test_acc, on_test));
    }
    let (mut best, mut best_acc) = ((0, 0), -1.0);
    for (s, (_, train_acc, _, _)) in sweeps.iter().enumerate() {
        for (l, &a) in train_acc.iter().enumerate() {
            if a > best_acc {
                (best, best_acc) = ((s, l), a);
            }
        }
    }
    let (s_best, i_best) = best;
    let l_best = layers[i_best];
    let strength = sweeps[s_best].0;
    let fv_acc = sweeps[s_best].2[i_best];
    let shuffled_fv = accuracy(&vector.next_tokens(&model, &shuffled, l_best, strength)?, test)?;
    println!("\nfunction vector: the top {TOP_HEADS} heads, |v| = {:.1}", vector.vector.norm().double_value(&[]));
    println!("zero-shot accuracy by the layer it is added after (training queries / held-out):");
    for (i, &l) in layers.iter().enumerate() {
        let cells: Vec<String> = sweeps
            .iter()
            .map(|(s, tr, te, _)| format!("strength {s}: {:>3.0}% / {:>3.0}%", 100.0 * tr[i], 100.0 * te[i]))
            .collect();
        println!("  layer {l:>2}  {}{}", cells.join("   "), if l == l_best { "  <- chosen" } else { "" });
    }
    println!(
        "\nheld-out accuracy with the vector after layer {l_best}, strength {strength} (chosen on the training queries):"
    );
    println!("  zero-shot                  {:>3.0}% -> {:>3.0}%", 100.0 * zero_acc, 100.0 * fv_acc);
    println!("  {SHOTS} shuffled-label examples {:>3.0}% -> {:>3.0}%", 100.0 * shuffled_acc, 100.0 * shuffled_fv);
    println!("  ({SHOTS} correct examples, no vector: {:.0}%)", 100.0 * icl_acc);
    println!("  {:<10} {:<10} {:<14} with the vector", "query", "answer", "zero-shot");
    for ((x, y), (plain, with)) in test.iter().zip(zero_next.iter().zip(&sweeps[s_best].3[i_best])).take(10) {
        println!("  {x:<10} {y:<10} {:<14} {:?}", format!("{:?}", model.decode(&[*plain])?), model.decode(&[*with])?);
    }
    let by_layer_path = out.join("function_vectors_by_layer.png");
    let mut lines = Lines::new()
        .title(format!("Function vector by layer: zero-shot {TASK}, SmolLM2-135M, held out"))
        .axes("layer the vector is added after (at the last token)", "accuracy (%)");
    let xy = |v: &[f64]| layers.iter().zip(v).map(|(&l, a)| (l as f64, 100.0 * a)).collect::<Vec<_>>();
    for (s, _, test_acc, _) in &sweeps {
        lines = lines.series_xy(format!("zero-shot + vector x{s}"), &xy(test_acc));
    }
    lines
        .series_xy(format!("{SHOTS} examples, no vector"), &xy(&vec![icl_acc; layers.len()]))
        .series_xy("zero-shot, no vector", &xy(&vec![zero_acc; layers.len()]))
        .save(&by_layer_path)?;
    println!("wrote {}", by_layer_path.display());
    println!("whole run {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// "Q: x\nA: y\n\n" for each example, then "Q: query\nA:" (Todd et al.'s template).
fn icl_prompt(examples: &[(&str, &str)], query: &str) -> String {
    let mut s: String = examples.iter().map(|(x, y)| format!("Q: {x}\nA: {y}\n\n")).collect();
    s.push_str(&zero_shot_prompt(query));
    s
}

/// "Q: query\nA:".
fn zero_shot_prompt(query: &str) -> String {
    format!("Q: {query}\nA:")
}

/// A small deterministic generator (no dependency): the same prompts every run.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }

    /// `k` distinct pairs of `pool`.
    fn examples<'a>(&mut self, pool: &[(&'a str, &'a str)], k: usize) -> Vec<(&'a str, &'a str)> {
        let mut idx: Vec<usize> = (0..pool.len()).collect();
        for i in 0..k {
            let j = i + self.below(pool.len() - i);
            idx.swap(i, j);
        }
        idx[..k].iter().map(|&i| pool[i]).collect()
    }

    /// `k` distinct pairs of `pool` with their labels shuffled among them (a derangement: no label stays).
    fn shuffled<'a>(&mut self, pool: &[(&'a str, &'a str)], k: usize) -> Vec<(&'a str, &'a str)> {
        let ex = self.examples(pool, k);
        let shift = 1 + self.below(k - 1);
        (0..k).map(|i| (ex[i].0, ex[(i + shift) % k].1)).collect()
    }
}
