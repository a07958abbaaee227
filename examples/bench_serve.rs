//! A server under many researchers: SmolLM2 served in this process on 127.0.0.1 (one copy of the weights, one
//! worker), 1, 8 and 32 concurrent clients each sending jobs back to back, with co-batching off (every job alone)
//! and on. Two kinds of job:
//!
//! - trace: a user's experiment (halve layer 10's MLP output, save layer 15's output at the last position and the
//!   last position's logits), a job built once and sent as it is;
//! - generate: each client a handle connected to the server (`LanguageModel::connect`) running a generation block
//!   on it as users write it: a short prompt, greedy, 16 new tokens, a steering vector added to layer 10's last
//!   position at every step, the generated ids saved.
//!
//! Prints jobs/s (and for generation the new tokens/s across all clients), the median and 99th-percentile latency
//! (submit to result) and the mean number of jobs per batch, with the CPU model.
//!
//! ```text
//! make bench-serve                                       # both kinds, 8 s per row
//! make bench-serve ARGS="generate 4"
//! cargo run --release --example bench_serve -- [trace|generate|both] [SECONDS]
//! ```

use nnsight::exec::Job;
use nnsight::prelude::*;
use nnsight::remote::server::model_info;
use nnsight::remote::{BatchCounters, CoBatch, LocalQueue, Remote, ServeOptions, Server};
use nnsight::SharedModel;
use std::collections::HashMap;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

#[path = "support/machine.rs"]
mod machine;
#[path = "support/stats.rs"]
mod stats;

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Each client's prompt (one length in tokens: jobs of one length merge).
const CITIES: [&str; 8] = ["Paris", "Rome", "Berlin", "Madrid", "Vienna", "Prague", "Lisbon", "Dublin"];
/// New tokens of each generation job (no stop token: every job makes all of them).
const NEW_TOKENS: usize = 16;
/// SmolLM2's hidden size (the steering vector's length).
const HIDDEN: i64 = 576;

/// A served model: its server and its worker's counters.
struct Served {
    server: Server,
    counters: Arc<BatchCounters>,
}

fn serve(model: &SharedModel<Llama>, co_batch: CoBatch) -> Result<Served, Box<dyn std::error::Error>> {
    let infos = HashMap::from([("smollm2".to_string(), model_info("smollm2", model)?)]);
    let queue =
        LocalQueue::start_pools_with(vec![("smollm2".into(), vec![model.clone()])], 64, Default::default(), co_batch);
    let counters = queue.counters("smollm2").ok_or("no counters")?;
    let options = ServeOptions { listen: "127.0.0.1:0".parse()?, co_batch, ..ServeOptions::default() };
    Ok(Served { server: Server::start_with(Box::new(queue), infos, options)?, counters })
}

/// `clients` threads sending their job back to back for `time`: every latency in ms.
fn load(url: &str, jobs: &[Job], clients: usize, time: Duration) -> Result<Vec<f64>, String> {
    let end = Instant::now() + time;
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (r, job) = (Remote::new(url, "smollm2"), jobs[c % jobs.len()].clone());
            std::thread::spawn(move || -> Result<Vec<f64>, String> {
                let mut times = Vec::new();
                while Instant::now() < end {
                    let t = Instant::now();
                    r.run(job.clone()).map_err(|e| e.to_string())?;
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
                Ok(times)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in threads {
        all.extend(t.join().map_err(|_| "a client panicked")??);
    }
    Ok(all)
}

/// Client `c`'s generation prompt.
fn generation_prompt(c: usize) -> String {
    format!("The capital city is {},", CITIES[c % CITIES.len()])
}

/// One generation job of a client, run on the server through its connected handle: the new tokens it made.
fn generate_once(model: &LanguageModel<Llama>, prompt: &str, steer: &Tensor) -> nnsight::Result<usize> {
    let options = GenerateOptions::new().max_new_tokens(NEW_TOKENS).stop_ids([]);
    intervene!(model.generate(prompt, &options) {
        let ids = model.generated().save();
        for _ in all() {
            model.model.layers[10].output[(.., -1, ..)] += steer;
        }
    });
    let made = ids.rows.first().map_or(0, |r| r.len()).saturating_sub(model.encode(prompt)?.len());
    Ok(made)
}

/// `clients` threads, each connected to the server, sending generation jobs back to back: at least one each, then
/// more until `time` has passed since they all started. Every latency in ms, the new tokens made, the wall time.
fn load_generate(url: &str, clients: usize, time: Duration) -> Result<(Vec<f64>, usize, f64), String> {
    let start = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (url, start) = (url.to_string(), start.clone());
            std::thread::spawn(move || -> Result<(Vec<f64>, usize), String> {
                let prompt = generation_prompt(c);
                let steer = Tensor::full([HIDDEN], 0.05 * (1 + c % 4) as f64, (Kind::Float, Device::Cpu));
                // Connected before the clock starts; the barrier is passed also when that failed.
                let model = LanguageModel::<Llama>::connect(&Remote::new(url.as_str(), "smollm2"));
                start.wait();
                let model = model.map_err(|e| e.to_string())?;
                let end = Instant::now() + time;
                let (mut times, mut tokens) = (Vec::new(), 0);
                loop {
                    let t = Instant::now();
                    tokens += generate_once(&model, &prompt, &steer).map_err(|e| e.to_string())?;
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                    if Instant::now() >= end {
                        return Ok((times, tokens));
                    }
                }
            })
        })
        .collect();
    start.wait();
    let t = Instant::now();
    let (mut all, mut tokens) = (Vec::new(), 0);
    for thread in threads {
        let (times, made) = thread.join().map_err(|_| "a client panicked")??;
        all.extend(times);
        tokens += made;
    }
    Ok((all, tokens, t.elapsed().as_secs_f64()))
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// What to measure: trace jobs, generation jobs, or both.
#[derive(Clone, Copy, PartialEq)]
enum Part {
    Trace,
    Generate,
    Both,
}

/// `[trace|generate|both] [SECONDS]`, in either order.
fn arguments() -> Result<(Part, f64), String> {
    let (mut part, mut seconds) = (Part::Both, 8.0);
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "trace" => part = Part::Trace,
            "generate" => part = Part::Generate,
            "both" => part = Part::Both,
            s => {
                seconds = s
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .ok_or(format!("bench_serve: `{s}` is neither trace|generate|both nor a number of seconds"))?
            }
        }
    }
    Ok((part, seconds))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tch::set_num_threads(2);
    let (part, seconds) = arguments()?;
    let model = LanguageModel::<Llama>::load_with(MODEL, LoadOptions::default().progress(false))?;
    // Each client's job: the graph its block builds (scanned here, no forward), with its prompt.
    let mut jobs = Vec::new();
    let mut tokens = Vec::new();
    for city in CITIES {
        let prompt = format!("The capital city is {city}, and the");
        tokens.push(model.encode(&prompt)?.len());
        let (run, mut graphs) = nnsight::graph::capture_graphs(|| -> nnsight::Result<()> {
            intervene!(model.scan(prompt.as_str()) {
                model.model.layers[10].mlp.output = model.model.layers[10].mlp.output * 0.5;
                let _ = model.model.layers[15].output[(.., -1, ..)].save();
                let _ = model.lm_head.output[(.., -1, ..)].save();
            });
            Ok(())
        });
        run?;
        let graph = graphs.pop().ok_or("no graph captured")?;
        jobs.push(Job::Trace { graph, inputs: vec![Some(prompt.as_str().into())], edits: vec![] });
    }
    // The generation prompts' length (the cities are one token each).
    let generation_tokens = model.encode(&generation_prompt(0))?.len();
    let shared = SharedModel::new(model);
    let off = serve(&shared, CoBatch::off())?;
    let on = serve(&shared, CoBatch::default())?;
    if part != Part::Generate {
        bench_trace(&off, &on, &jobs, tokens[0], seconds)?;
    }
    if part == Part::Both {
        println!();
    }
    if part != Part::Trace {
        bench_generate(&off, &on, generation_tokens, seconds)?;
    }
    Ok(())
}

/// The trace part: a row per clients and co-batching mode.
fn bench_trace(
    off: &Served,
    on: &Served,
    jobs: &[Job],
    tokens: usize,
    seconds: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "SmolLM2-135M served on loopback (one copy of the weights, one worker), trace jobs of {tokens} tokens: halve layer 10's"
    );
    println!(
        "MLP output, save layer 15's output and the logits at the last position; {seconds} s per row; {}",
        machine::cpu()
    );
    println!();
    println!("| clients | co-batching | jobs/s | p50 latency (ms) | p99 latency (ms) | jobs per batch |");
    println!("|--------:|:-----------:|-------:|-----------------:|-----------------:|---------------:|");
    let mut rates: HashMap<(usize, bool), (f64, f64)> = HashMap::new();
    for clients in [1, 8, 32] {
        for (mode, served) in [(false, off), (true, on)] {
            let url = served.server.url();
            // Warm-up: the batch shapes of this load (the linear kernels are chosen per shape on first use).
            load(&url, jobs, clients, Duration::from_secs_f64(1.5))?;
            let (b0, j0) = (served.counters.batches(), served.counters.jobs());
            let t = Instant::now();
            let times = load(&url, jobs, clients, Duration::from_secs_f64(seconds))?;
            let wall = t.elapsed().as_secs_f64();
            let (b, j) = (served.counters.batches() - b0, served.counters.jobs() - j0);
            let rate = times.len() as f64 / wall;
            let (p50, p99) = (stats::median(times.clone()), percentile(times, 0.99));
            rates.insert((clients, mode), (rate, p99));
            println!(
                "| {clients:>7} | {:^11} | {rate:>6.1} | {p50:>16.1} | {p99:>16.1} | {:>14.1} |",
                if mode { "on" } else { "off" },
                j as f64 / b.max(1) as f64
            );
        }
    }
    let (a, b) = (rates[&(32, false)], rates[&(32, true)]);
    println!();
    println!("32 clients: co-batching gives {:.1}x the jobs/s of one job at a time, p99 {:.2}x", b.0 / a.0, b.1 / a.1);
    Ok(())
}

/// The generation part: a row per clients and co-batching mode.
fn bench_generate(off: &Served, on: &Served, tokens: usize, seconds: f64) -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "The same server, generation jobs from connected handles: a prompt of {tokens} tokens, greedy, {NEW_TOKENS} new tokens, a"
    );
    println!(
        "steering vector added to layer 10's last position at every step, the ids saved; each client at least one job, then"
    );
    println!("more for {seconds} s; {}", machine::cpu());
    println!();
    println!("| clients | co-batching | jobs/s | tokens/s | p50 latency (ms) | p99 latency (ms) | rows per step |");
    println!("|--------:|:-----------:|-------:|---------:|-----------------:|-----------------:|--------------:|");
    let mut rates: HashMap<(usize, bool), (f64, f64)> = HashMap::new();
    for clients in [1, 8, 32] {
        for (mode, served) in [(false, off), (true, on)] {
            let url = served.server.url();
            // Warm-up: one job per client.
            load_generate(&url, clients, Duration::ZERO)?;
            // Rows per decode step of the continuous batch (1 when each job runs alone).
            let (s0, r0) = (served.counters.decode_steps(), served.counters.decode_step_rows());
            let (times, made, wall) = load_generate(&url, clients, Duration::from_secs_f64(seconds))?;
            let (steps, rows) = (served.counters.decode_steps() - s0, served.counters.decode_step_rows() - r0);
            let expected = times.len() * NEW_TOKENS;
            if made != expected {
                return Err(format!("{made} new tokens from {} jobs of {NEW_TOKENS}", times.len()).into());
            }
            let (rate, token_rate) = (times.len() as f64 / wall, made as f64 / wall);
            let (p50, p99) = (stats::median(times.clone()), percentile(times, 0.99));
            rates.insert((clients, mode), (token_rate, p99));
            println!(
                "| {clients:>7} | {:^11} | {rate:>6.2} | {token_rate:>8.1} | {p50:>16.1} | {p99:>16.1} | {:>13.1} |",
                if mode { "on" } else { "off" },
                if steps == 0 { 1.0 } else { rows as f64 / steps as f64 }
            );
        }
    }
    let (a, b) = (rates[&(32, false)], rates[&(32, true)]);
    println!();
    println!(
        "32 clients, generation: co-batching gives {:.2}x the tokens/s of one job at a time, p99 {:.2}x",
        b.0 / a.0,
        b.1 / a.1
    );
    Ok(())
}
