//! A server under many researchers: SmolLM2 served in this process on 127.0.0.1 (one copy of the weights, one
//! worker), 1, 8 and 32 concurrent clients each sending trace jobs back to back (a user's experiment: halve layer
//! 10's MLP output, save layer 15's output at the last position and the last position's logits), with co-batching
//! off (every job alone) and on. Prints jobs/s, the median and 99th-percentile latency (submit to result) and the
//! mean number of jobs per batch, with the CPU model.
//!
//! ```text
//! make bench-serve                                       # 8 s per row
//! cargo run --release --example bench_serve -- SECONDS
//! ```

use nnsight::exec::Job;
use nnsight::prelude::*;
use nnsight::remote::server::model_info;
use nnsight::remote::{BatchCounters, CoBatch, LocalQueue, Remote, ServeOptions, Server};
use nnsight::SharedModel;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "support/machine.rs"]
mod machine;
#[path = "support/stats.rs"]
mod stats;

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Each client's prompt (one length in tokens: jobs of one length merge).
const CITIES: [&str; 8] = ["Paris", "Rome", "Berlin", "Madrid", "Vienna", "Prague", "Lisbon", "Dublin"];

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

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tch::set_num_threads(2);
    let seconds: f64 = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(8.0);
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
    let shared = SharedModel::new(model);
    let off = serve(&shared, CoBatch::off())?;
    let on = serve(&shared, CoBatch::default())?;
    println!(
        "SmolLM2-135M served on loopback (one copy of the weights, one worker), trace jobs of {} tokens: halve layer 10's",
        tokens[0]
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
        for (mode, served) in [(false, &off), (true, &on)] {
            let url = served.server.url();
            // Warm-up: the batch shapes of this load (the linear kernels are chosen per shape on first use).
            load(&url, &jobs, clients, Duration::from_secs_f64(1.5))?;
            let (b0, j0) = (served.counters.batches(), served.counters.jobs());
            let t = Instant::now();
            let times = load(&url, &jobs, clients, Duration::from_secs_f64(seconds))?;
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
