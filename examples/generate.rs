//! Streams a continuation of a prompt, printing tokens as they come (KV-cache decoding, greedy unless asked to
//! sample).
//!
//! ```text
//! cargo run --release --example generate -- "The Eiffel Tower is" --max-new-tokens 20
//! cargo run --release --example generate -- "Once upon a time" --sample --temperature 0.8 --top-p 0.95 --seed 7
//! ```
//!
//! Options: `--max-new-tokens N` (default 20), `--sample`, `--temperature T`, `--top-k K`, `--top-p P`,
//! `--seed S`, `--model PATH` (a GGUF file or a Hugging Face folder; default the bundled SmolLM2).

use nnsight::prelude::*;
use std::io::Write;
use std::time::Instant;

const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

struct Args {
    prompt: String,
    model: String,
    options: GenerateOptions,
}

fn parse_args() -> Result<Args, String> {
    let mut prompt = None;
    let mut model = DEFAULT_MODEL.to_string();
    let mut options = GenerateOptions::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        let num = |name: &str, v: String| v.parse::<f64>().map_err(|e| format!("{name} {v:?}: {e}"));
        match arg.as_str() {
            "--max-new-tokens" => {
                let v = value(&arg)?;
                options = options.max_new_tokens(v.parse().map_err(|e| format!("--max-new-tokens {v:?}: {e}"))?);
            }
            "--sample" => options = options.do_sample(true),
            "--temperature" => options = options.temperature(num(&arg, value(&arg)?)?),
            "--top-p" => options = options.top_p(num(&arg, value(&arg)?)?),
            "--top-k" => options = options.top_k(num(&arg, value(&arg)?)? as usize),
            "--seed" => options = options.seed(num(&arg, value(&arg)?)? as u64),
            "--model" => model = value(&arg)?,
            // Steering (once traced generation lands): `--steer LAYER SCALE` adds a vector to one layer's output
            // at every step; parse it here and run `intervene!(model.generate(..) { .. })` in `main` instead of
            // the plain stream.
            s if s.starts_with("--") => return Err(format!("unknown option {s}")),
            _ if prompt.is_none() => prompt = Some(arg),
            _ => return Err(format!("unexpected argument {arg:?} (quote the prompt)")),
        }
    }
    let prompt = prompt.ok_or(
        "usage: generate \"PROMPT\" [--max-new-tokens N] [--sample] [--temperature T] \
                              [--top-k K] [--top-p P] [--seed S] [--model PATH]",
    )?;
    Ok(Args { prompt, model, options })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let model = LanguageModel::<AutoModel>::load(&args.model)?;

    let start = Instant::now();
    let mut generator = model.generator(args.prompt.as_str(), &args.options)?; // checks the options
    print!("{}", args.prompt);
    std::io::stdout().flush()?;
    let mut text = TextStream::new();
    for step in generator.by_ref() {
        if let Some(token) = step?.tokens[0] {
            print!("{}", text.push(&model, token)?);
            std::io::stdout().flush()?;
        }
    }
    let row = generator.finish().rows.remove(0);
    let secs = start.elapsed().as_secs_f64();
    println!();
    eprintln!(
        "[{} new tokens in {:.2} s, {:.1} tokens/s{}]",
        row.new_ids.len(),
        secs,
        row.new_ids.len() as f64 / secs,
        if row.stopped { ", stopped at a stop token" } else { "" }
    );
    Ok(())
}
