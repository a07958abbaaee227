//! Tracing overhead on SmolLM2 (CPU, 2 threads): the time each kind of trace adds to a plain forward, as the
//! median over rounds of (case − plain) measured in the same round, the way the Python nnsight reference numbers
//! were measured. Also the time to build the graph of 30 saves alone, and a scan (the same block on shapes alone)
//! as a fraction of a forward.
//!
//! `make bench-trace` runs it (with the Python nnsight peer when `--peer` is given: `scripts/peer/nnsight_bench.py`).
//! Arguments: `[ROUNDS]`.

use nnsight::__private as nn;
use nnsight::prelude::*;
use std::time::Instant;

#[path = "support/stats.rs"]
mod stats;
use stats::median;

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const EIFFEL: &str = "The Eiffel Tower is in the city of";
const COLOSSEUM: &str = "The Colosseum is in the city of";

type Case = (&'static str, Box<dyn Fn(&LanguageModel<Llama>) -> nnsight::Result<()>>);

fn plain(m: &LanguageModel<Llama>) -> nnsight::Result<()> {
    m.forward(EIFFEL).map(|_| ())
}

fn empty(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace(EIFFEL) {});
    Ok(())
}

fn save1(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace(EIFFEL) {
        let h = model.model.layers[5].output.save();
    });
    drop(h);
    Ok(())
}

fn save30(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace(EIFFEL) {
        let mut hs = Vec::with_capacity(30);
        for i in 0..30 {
            hs.push(model.model.layers[i].output.save());
        }
    });
    drop(hs);
    Ok(())
}

fn set1(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace(EIFFEL) {
        model.model.layers[10].mlp.output = model.model.layers[10].mlp.output * 0.0;
        let logits = model.output.save();
    });
    drop(logits);
    Ok(())
}

fn stop3(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace(EIFFEL) {
        let h = model.model.layers[3].output.save();
        model.stop();
    });
    drop(h);
    Ok(())
}

fn cache_all(model: &LanguageModel<Llama>) -> nnsight::Result<usize> {
    intervene!(model.trace(EIFFEL) {
        let cache = model.cache();
    });
    Ok(cache.len())
}

/// Inner points: the attention probabilities of every layer (each attention runs step by step, not fused).
fn probs30(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace(EIFFEL) {
        let mut ps = Vec::with_capacity(30);
        for i in 0..30 {
            ps.push(model.model.layers[i].self_attn.probs.output.save());
        }
    });
    drop(ps);
    Ok(())
}

/// The `1 set` block scanned: the same graph on the meta twin, shapes only.
fn scan_set1(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.scan(EIFFEL) {
        model.model.layers[10].mlp.output = model.model.layers[10].mlp.output * 0.0;
        let logits = model.output.save();
    });
    drop(logits);
    Ok(())
}

fn invoke2(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace() {
        invoke(EIFFEL) {
            let a = model.model.layers[5].output.save();
        }
        invoke(COLOSSEUM) {
            let b = model.model.layers[5].output.save();
        }
    });
    drop((a, b));
    Ok(())
}

fn cases() -> Vec<Case> {
    vec![
        ("plain", Box::new(plain)),
        ("empty trace", Box::new(empty)),
        ("1 save", Box::new(save1)),
        ("30 saves", Box::new(save30)),
        ("1 set", Box::new(set1)),
        ("2 invokes", Box::new(invoke2)),
    ]
}

/// Median milliseconds of a plain forward and of `case`, alternating, over `rounds` (at least 20) rounds.
fn paired(
    model: &LanguageModel<Llama>,
    rounds: usize,
    case: impl Fn(&LanguageModel<Llama>) -> nnsight::Result<()>,
) -> nnsight::Result<(f64, f64)> {
    let (mut p_times, mut c_times) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(20) {
        let t = Instant::now();
        plain(model)?;
        p_times.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        case(model)?;
        c_times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok((median(p_times), median(c_times)))
}

/// Records the hook events of a forward pass, and the modules that asked whether their inner points are wanted.
#[derive(Default)]
struct Events(Vec<(String, bool)>, Vec<String>);

impl nnsight::nn::Hook for Events {
    fn input(&mut self, m: &str, x: Tensor) -> nnsight::Result<Tensor> {
        self.0.push((m.to_string(), true));
        Ok(x)
    }
    fn output(&mut self, m: &str, y: Tensor) -> nnsight::Result<Tensor> {
        self.0.push((m.to_string(), false));
        Ok(y)
    }
    fn wants_points(&mut self, m: &str, _names: &[&str]) -> bool {
        self.1.push(m.to_string());
        false
    }
}

/// The interleaver's own cost per forward: the hook events of one SmolLM2 pass replayed against an interleaver,
/// without the model's arithmetic (with the 30 attentions' questions whether their inner points are wanted), minus
/// the cost of the replay loop itself. Returns (number of events, µs with an
/// empty graph, µs with 30 saves).
fn interleaver_cost(model: &LanguageModel<Llama>) -> nnsight::Result<(usize, f64, f64)> {
    use nnsight::interleave::Interleaver;
    use nnsight::nn::Hook;
    let mut events = Events::default();
    let _ = model.forward_with_hook(&model.batch(EIFFEL)?, &mut events)?;
    let stand_in = Tensor::zeros([1, 9, 576], (Kind::Float, Device::Cpu));
    let graphs = {
        let empty = nn::Trace::new(model, Some(EIFFEL.into()))?.graph().graph();
        let tr = nn::Trace::new(model, Some(EIFFEL.into()))?;
        for i in 0..30 {
            let _ = nn::read(tr.graph(), &nn::at(&tr.root().model.layers, i)?.output)?.save();
        }
        [empty, tr.graph().graph()]
    };
    // The replay itself (cloning the stand-in handle 790 times) through a hook that does nothing.
    let mut base = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        let mut noop = Events::default();
        for (m, is_input) in &events.0 {
            let _ = std::hint::black_box((stand_in.shallow_clone(), *is_input, m.len() + noop.0.len()));
        }
        noop.0.clear();
        base.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let base = median(base);
    let mut out = [0.0; 2];
    for (k, graph) in graphs.iter().enumerate() {
        let mut samples = Vec::new();
        for _ in 0..300 {
            let t = Instant::now();
            let mut inter = Interleaver::new(graph, vec![(0, 1)], 1, model.model())?;
            inter.start()?;
            for (m, is_input) in &events.0 {
                let _ = if *is_input {
                    inter.input(m, stand_in.shallow_clone())?
                } else {
                    inter.output(m, stand_in.shallow_clone())?
                };
            }
            for m in &events.1 {
                std::hint::black_box(inter.wants_points(m, &["query", "key", "probs", "head_output"]));
            }
            let saved = inter.finish()?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
            drop(saved);
        }
        out[k] = (median(samples) - base).max(0.0);
    }
    Ok((events.0.len(), out[0], out[1]))
}

/// Runs the Python nnsight side (`scripts/peer/nnsight_bench.py`) when `NNSIGHT_PYTHON` names a python with
/// nnsight installed (`make bench-trace` sets it up); `None` otherwise.
fn run_peer(rounds: usize) -> Option<serde_json::Value> {
    let python = std::env::var("NNSIGHT_PYTHON").ok()?;
    eprintln!("running the Python nnsight peer ({python}) ...");
    let out = std::process::Command::new(python)
        .args(["scripts/peer/nnsight_bench.py", "--gguf", MODEL, "--threads", "2", "--warmup", "5", "--json"])
        .args(["--rounds", &rounds.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("peer failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().rev().find_map(|l| serde_json::from_str(l).ok())
}

fn main() -> nnsight::Result<()> {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(40);
    tch::set_num_threads(2);
    let model = LanguageModel::<Llama>::load_with(MODEL, LoadOptions::default().progress(false))?;
    let cases = cases();
    for _ in 0..3 {
        for (_, f) in &cases {
            f(&model)?;
        }
    }
    let mut times = vec![Vec::new(); cases.len()];
    for _ in 0..rounds {
        for (k, (_, f)) in cases.iter().enumerate() {
            let t = Instant::now();
            f(&model)?;
            times[k].push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    // Graph build alone: 30 saves.
    let mut build = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        let tr = nn::Trace::new(&model, Some(EIFFEL.into()))?;
        for i in 0..30 {
            let _ = nn::read(tr.graph(), &nn::at(&tr.root().model.layers, i)?.output)?.save();
        }
        build.push(t.elapsed().as_secs_f64() * 1e6);
        drop(tr);
    }
    // Early stop, caching and scans are measured apart, each alternating with a plain forward (a much shorter or
    // longer case would change the others' round-robin neighbours).
    let (stop_plain, stop_ms) = paired(&model, rounds, stop3)?;
    let entries = cache_all(&model)?;
    let (cache_plain, cache_ms) = paired(&model, rounds, |m| cache_all(m).map(|_| ()))?;
    scan_set1(&model)?; // builds the meta twin once
    let (scan_plain, scan_ms) = paired(&model, rounds, scan_set1)?;
    let (probs_plain, probs_ms) = paired(&model, rounds, probs30)?;
    let interleaver_us = interleaver_cost(&model)?;
    let peer = run_peer(rounds);
    let plain = times[0].clone();
    println!("SmolLM2-135M, {EIFFEL:?}, CPU, 2 threads, {rounds} rounds (round-robin):");
    println!(
        "{:<12} {:>10} {:>14} {:>7}   {:>16} {:>16}",
        "case", "median ms", "over plain ms", "ratio", "nnsight (Py) ms", "Py over plain ms"
    );
    let keys = ["plain", "empty", "save1", "save30", "set1", "invoke2"];
    for (k, (name, _)) in cases.iter().enumerate() {
        let over: Vec<f64> = times[k].iter().zip(&plain).map(|(a, b)| a - b).collect();
        let (m, p) = (median(times[k].clone()), median(plain.clone()));
        let (pm, po) = match &peer {
            Some(j) => {
                let c = &j["cases"][keys[k]];
                (
                    format!("{:.2}", c["median_ms"].as_f64().unwrap_or(f64::NAN)),
                    format!("{:.3}", c["overhead_ms"].as_f64().unwrap_or(f64::NAN)),
                )
            }
            None => ("-".into(), "-".into()),
        };
        println!("{:<12} {:>10.2} {:>14.3} {:>7.3}   {:>16} {:>16}", name, m, median(over), m / p, pm, po);
    }
    println!(
        "stop() after layer 3 of 30 (save layer 3, then stop): {stop_ms:.2} ms vs {stop_plain:.2} ms plain = {:.3}",
        stop_ms / stop_plain
    );
    println!(
        "cache() of every module's output ({entries} entries): {cache_ms:.2} ms vs {cache_plain:.2} ms plain = {:.3}",
        cache_ms / cache_plain
    );
    println!(
        "attention probabilities of all 30 layers (inner points, explicit attention): {probs_ms:.2} ms vs \
         {probs_plain:.2} ms plain = {:.3}",
        probs_ms / probs_plain
    );
    println!(
        "scan of the 1-set block (meta twin, shapes only): {scan_ms:.3} ms vs {scan_plain:.2} ms plain = {:.3}",
        scan_ms / scan_plain
    );
    println!("graph build of 30 saves: median {:.1} µs", median(build));
    println!(
        "interleaver alone, per forward (the {} hook events of a SmolLM2 pass replayed on a stand-in tensor, and the \
         30 attentions' inner-point queries): empty graph {:.1} µs, 30 saves {:.1} µs",
        interleaver_us.0, interleaver_us.1, interleaver_us.2
    );
    if let Some(j) = &peer {
        println!(
            "Python: nnsight {}, transformers {}, torch {}",
            j["nnsight"].as_str().unwrap_or("?"),
            j["transformers"].as_str().unwrap_or("?"),
            j["torch"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}
