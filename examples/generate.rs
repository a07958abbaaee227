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
//!
//! Steering: `--steer "TOWARD" "AWAY"` adds, at every step, `SCALE × (h(TOWARD) − h(AWAY))` to the output of
//! decoder layer `LAYER` at the last position (`--layer`, default 6; `--scale`, default 1), where `h(text)` is that
//! layer's output at the last position of `text` (activation addition). The continuation still streams as it is
//! produced:
//!
//! ```text
//! cargo run --release --example generate -- "I went to the park and" --steer " happy" " sad"
//! I went to the park and had a great time. I was so happy. I was so happy. I was so happy.
//! ```
//!
//! (Without `--steer`: "I went to the park and I saw a deer. I was so excited to see it. ...". Larger scales
//! soon push the model off its distribution.)

use nnsight::prelude::*;
use nnsight::GeneratedRow;
use std::io::Write;
use std::time::Instant;

const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

struct Args {
    prompt: String,
    model: String,
    options: GenerateOptions,
    steer: Option<Steer>,
}

/// `--steer TOWARD AWAY [--layer L] [--scale S]`.
struct Steer {
    toward: String,
    away: String,
    layer: i64,
    scale: f64,
}

fn parse_args() -> Result<Args, String> {
    let mut prompt = None;
    let mut model = DEFAULT_MODEL.to_string();
    let mut options = GenerateOptions::new();
    let mut steer: Option<(String, String)> = None;
    let (mut layer, mut scale) = (6_i64, 1.0);
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
            "--steer" => steer = Some((value(&arg)?, value(&arg)?)),
            "--layer" => layer = num(&arg, value(&arg)?)? as i64,
            "--scale" => scale = num(&arg, value(&arg)?)?,
            s if s.starts_with("--") => return Err(format!("unknown option {s}")),
            _ if prompt.is_none() => prompt = Some(arg),
            _ => return Err(format!("unexpected argument {arg:?} (quote the prompt)")),
        }
    }
    let prompt = prompt.ok_or(
        "usage: generate \"PROMPT\" [--max-new-tokens N] [--sample] [--temperature T] \
                              [--top-k K] [--top-p P] [--seed S] [--model PATH] \
                              [--steer TOWARD AWAY [--layer L] [--scale S]]",
    )?;
    let steer = steer.map(|(toward, away)| Steer { toward, away, layer, scale });
    Ok(Args { prompt, model, options, steer })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let (row, secs) = match &args.steer {
        None => {
            let model = LanguageModel::<AutoModel>::load(&args.model)?;
            let start = Instant::now();
            (stream(&model, &args)?, start.elapsed().as_secs_f64())
        }
        // The steering block names Llama's modules (`model.model.layers[i]`): a Llama-family model.
        Some(steer) => {
            let model = LanguageModel::<Llama>::load(&args.model)?;
            let start = Instant::now();
            (stream_steered(&model, &args, steer)?, start.elapsed().as_secs_f64())
        }
    };
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

/// Plain generation through the iterator, printing each token as it comes.
fn stream(model: &LanguageModel<AutoModel>, args: &Args) -> Result<GeneratedRow, Box<dyn std::error::Error>> {
    let mut generator = model.generator(args.prompt.as_str(), &args.options)?; // checks the options
    print!("{}", args.prompt);
    std::io::stdout().flush()?;
    let mut text = TextStream::new();
    for step in generator.by_ref() {
        if let Some(token) = step?.tokens[0] {
            print!("{}", text.push(model, token)?);
            std::io::stdout().flush()?;
        }
    }
    Ok(generator.finish().rows.remove(0))
}

/// Generation with a steering vector added to one layer at every step, inside `intervene!`; the tokens stream
/// through the options' `on_token` callback while the block runs.
fn stream_steered(
    model: &LanguageModel<Llama>,
    args: &Args,
    steer: &Steer,
) -> Result<GeneratedRow, Box<dyn std::error::Error>> {
    let layer = steer.layer;
    // The direction: the layer's last-position output for TOWARD minus that for AWAY.
    intervene!(model.trace() {
        invoke(steer.toward.as_str()) {
            let toward = model.model.layers[layer].output[(.., -1, ..)].save();
        }
        invoke(steer.away.as_str()) {
            let away = model.model.layers[layer].output[(.., -1, ..)].save();
        }
    });
    let vector = (toward - away) * steer.scale;
    eprintln!("[steering layer {layer} toward {:?}, away from {:?}, scale {}]", steer.toward, steer.away, steer.scale);

    // Each token is decoded and printed as it comes, from inside the generation (the callback owns a clone of
    // the tokenizer: it must be 'static).
    let tokenizer = model.tokenizer().clone();
    let mut text = TextStream::new();
    let options = args.options.clone().on_token(move |step| {
        if let Some(token) = step.tokens[0] {
            let decode = |ids: &[i64]| {
                let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
                tokenizer.decode(&ids, false).map_err(|e| nnsight::Error::Tokenizer { message: e.to_string() })
            };
            print!("{}", text.push_with(decode, token)?);
            let _ = std::io::stdout().flush();
        }
        Ok(())
    });
    print!("{}", args.prompt);
    std::io::stdout().flush()?;
    intervene!(model.generate(args.prompt.as_str(), &options) {
        for _ in all() {
            model.model.layers[layer].output[(.., -1, ..)] += &vector;
        }
        let ids = model.generated().save();
    });
    let prompt_len = model.encode(&args.prompt)?.len();
    let row = ids.row()?;
    Ok(GeneratedRow {
        prompt_ids: row[..prompt_len].to_vec(),
        new_ids: row[prompt_len..].to_vec(),
        stopped: row.len() - prompt_len < args.options.max_new_tokens,
    })
}
