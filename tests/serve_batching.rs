//! Co-batching on the server: jobs waiting for a model run as one trace, each job's results, logs, sent values,
//! errors and limits its own; and one copy of a model's weights shared by several worker threads.
//!
//! The servers here wait up to seconds to fill a batch of exactly as many rows as the test sends, so what merges
//! is decided by the policy, not by timing.

use crate::common;
use nnsight::exec::merge::merge;
use nnsight::exec::{run_job, Job};
use nnsight::graph::{BinaryOp, Graph, NodeId, Op, Point, ReduceOp, TensorOp};
use nnsight::prelude::*;
use nnsight::remote::server::model_info;
use nnsight::remote::{BatchCounters, CoBatch, Hosted, Limits, LocalQueue, Remote, Server};
use nnsight::SharedModel;
use std::sync::Arc;
use std::time::Duration;

/// Serves `copies` (handles of one model) as `tiny`, batching as `policy` says; the server and its counters.
fn serve<H: Hosted>(copies: Vec<H>, policy: CoBatch, limits: Limits) -> (Server, Arc<BatchCounters>) {
    let info = model_info("tiny", &copies[0]).expect("describe the model");
    let queue = LocalQueue::start_pools_with(vec![("tiny".into(), copies)], 64, limits.clone(), policy);
    let counters = queue.counters("tiny").expect("the model's counters");
    (common::serve_queue(Box::new(queue), info, policy, limits), counters)
}

/// Batches of exactly `rows` rows: a worker waits up to 20 s for them.
fn batches_of(rows: usize) -> CoBatch {
    CoBatch { enabled: true, max_rows: rows, max_wait: Duration::from_secs(20) }
}

fn read(g: &mut Graph, module: &str) -> NodeId {
    g.push(Op::Read { module: module.into(), point: Point::Output, call: 0 }, 0)
}

fn scale(g: &mut Graph, a: NodeId, by: f64) -> NodeId {
    g.push(Op::Tensor(TensorOp::BinaryScalar { kind: BinaryOp::Mul, a, scalar: by, scalar_first: false }), 0)
}

/// A user's experiment on the tiny GPT-2: layer 0's output scaled by `factor`, layer 1's output and the logits
/// saved (the values of nodes 3 and 5).
fn experiment(factor: f64) -> Graph {
    let mut g = Graph::default();
    let h0 = read(&mut g, "transformer.h.0");
    let scaled = scale(&mut g, h0, factor);
    g.push(
        Op::Write { module: "transformer.h.0".into(), point: Point::Output, call: 0, value: scaled, index: None },
        0,
    );
    let h1 = read(&mut g, "transformer.h.1");
    g.push(Op::Save { value: h1 }, 0);
    let out = read(&mut g, "lm_head");
    g.push(Op::Save { value: out }, 0);
    g
}

fn trace(graph: Graph, prompt: &str) -> Job {
    Job::Trace { graph, inputs: vec![Some(prompt.into())], edits: vec![] }
}

/// A persistent edit (a whole-batch graph): layer 0's output times `factor`.
fn edit(factor: f64) -> Graph {
    let mut g = Graph::default();
    let h0 = read(&mut g, "transformer.h.0");
    let scaled = scale(&mut g, h0, factor);
    g.push(
        Op::Write { module: "transformer.h.0".into(), point: Point::Output, call: 0, value: scaled, index: None },
        0,
    );
    g
}

/// The largest difference between two runs' saved values (the same nodes in both).
fn max_diff(a: &nnsight::interleave::Finished, b: &nnsight::interleave::Finished) -> f64 {
    assert_eq!(a.values.len(), b.values.len());
    let mut worst = 0.0f64;
    for (id, v) in &a.values {
        let (x, y) = (v.tensor().unwrap(), b.values[id].tensor().unwrap());
        assert_eq!(x.size(), y.size(), "node {id}");
        worst = worst.max(common::max_abs_diff(x, y));
    }
    worst
}

/// Within float noise: a row's numbers do not depend on the other rows, but a product of another number of rows
/// may round differently (a few float32 ulps of the values, |values| < 10 here).
const TOLERANCE: f64 = 1e-4;

#[test]
fn concurrent_jobs_run_as_one_batch_and_each_equals_its_run_alone() {
    common::init();
    let (server, counters) = serve(vec![common::tiny_gpt2()], batches_of(4), Limits::default());
    let url = server.url();
    let threads: Vec<_> = (0..4)
        .map(|k| {
            let r = Remote::new(url.clone(), "tiny");
            std::thread::spawn(move || r.run(trace(experiment(1.0 + k as f64 / 4.0), "Hello world")))
        })
        .collect();
    let model = common::tiny_gpt2();
    for (k, t) in threads.into_iter().enumerate() {
        let got = t.join().unwrap().expect("a client's job");
        let alone = run_job(&model, &trace(experiment(1.0 + k as f64 / 4.0), "Hello world"), None).unwrap();
        let d = max_diff(&got, &alone);
        assert!(d <= TOLERANCE, "job {k}: {d}");
    }
    assert_eq!(counters.recent_sizes(), vec![4], "the four jobs ran as one batch");
    assert_eq!((counters.merged_jobs(), counters.reruns()), (4, 0));
}

#[test]
fn a_failing_job_in_a_batch_leaves_the_others_results_as_they_are_alone() {
    common::init();
    // A job that fails at run time: layer 0's output [1, 2, 64] reshaped to 7 rows.
    let mut bad = Graph::default();
    let h0 = read(&mut bad, "transformer.h.0");
    let r = bad.push(Op::Tensor(TensorOp::Reshape { a: h0, shape: vec![7, -1] }), 0);
    bad.push(Op::Save { value: r }, 0);
    // A job over its time limit: a chain of products of a 1536x1536 matrix (24 tokens of 64 values) at layer 0.
    let long = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen";
    let mut slow = Graph::default();
    let h0 = read(&mut slow, "transformer.h.0");
    let col = slow.push(Op::Tensor(TensorOp::Reshape { a: h0, shape: vec![-1, 1] }), 0);
    let row = slow.push(Op::Tensor(TensorOp::Reshape { a: h0, shape: vec![1, -1] }), 0);
    let sum = slow.push(Op::Tensor(TensorOp::Binary { kind: BinaryOp::Add, a: col, b: row }), 0);
    let mut m = scale(&mut slow, sum, 1.0 / 2048.0);
    for _ in 0..4 {
        m = slow.push(Op::Tensor(TensorOp::Binary { kind: BinaryOp::Matmul, a: m, b: m }), 0);
    }
    let total = slow.push(Op::Tensor(TensorOp::Reduce { kind: ReduceOp::Sum, a: m, dims: vec![], keepdim: false }), 0);
    slow.push(Op::Save { value: total }, 0);

    let limits = Limits { wall_time: Duration::from_millis(100), ..Limits::default() };
    let (server, counters) = serve(vec![common::tiny_gpt2()], batches_of(3), limits);
    let r = Remote::new(server.url(), "tiny");
    let model = common::tiny_gpt2();
    assert!(model.encode(long).unwrap().len() >= 24, "a matrix of at least 1536 rows");
    for (round, (prompt, failing)) in [("Hello world", bad), (long, slow)].into_iter().enumerate() {
        let good: Vec<Job> = [0.5, 2.0].iter().map(|&f| trace(experiment(f), prompt)).collect();
        let ids = [
            r.submit(good[0].clone()).unwrap(),
            r.submit(trace(failing, prompt)).unwrap(),
            r.submit(good[1].clone()).unwrap(),
        ];
        let err = r.wait(&ids[1]).expect_err("the failing job fails").to_string();
        let expected = if round == 0 { "reshape" } else { "time" };
        assert!(err.to_lowercase().contains(expected), "round {round}: {err}");
        for (job, id) in good.iter().zip([&ids[0], &ids[2]]) {
            // Run again alone after the batch failed: bit for bit the job's run alone.
            let got = r.wait(id).expect("a good job of the batch");
            assert_eq!(max_diff(&got, &run_job(&model, job, None).unwrap()), 0.0, "round {round}");
        }
    }
    assert_eq!(counters.recent_sizes(), vec![3, 3], "each round's three jobs were tried as one batch");
    assert_eq!((counters.merged_jobs(), counters.reruns()), (0, 6));
}

#[test]
fn jobs_with_other_edits_or_another_length_do_not_merge() {
    common::init();
    let (server, counters) = serve(vec![common::tiny_gpt2()], batches_of(4), Limits::default());
    let r = Remote::new(server.url(), "tiny");
    let with = |edits: Vec<Graph>, prompt: &str| Job::Trace {
        graph: experiment(1.0),
        inputs: vec![Some(prompt.into())],
        edits,
    };
    let jobs = [
        with(vec![edit(2.0)], "Hello world"),
        with(vec![edit(3.0)], "Hello world"),
        with(vec![edit(2.0)], "Hello world"),
        with(vec![edit(2.0)], "Hello world, how are you"),
    ];
    let ids: Vec<String> = jobs.iter().map(|j| r.submit(j.clone()).unwrap()).collect();
    let model = common::tiny_gpt2();
    for (job, id) in jobs.iter().zip(&ids) {
        let d = max_diff(&r.wait(id).unwrap(), &run_job(&model, job, None).unwrap());
        assert!(d <= TOLERANCE, "{d}");
    }
    // One batch gathered: the two jobs of one edit and length merged, the other edit and the other length alone.
    let mut sizes = counters.recent_sizes();
    sizes.sort();
    assert_eq!(sizes, vec![1, 1, 2]);
    assert_eq!(counters.merged_jobs(), 2);
}

#[test]
fn logs_and_sent_values_go_to_their_own_job() {
    common::init();
    let (server, counters) = serve(vec![common::tiny_gpt2()], batches_of(3), Limits::default());
    let url = server.url();
    let threads: Vec<_> = (0..3)
        .map(|k| {
            let r = Remote::new(url.clone(), "tiny");
            std::thread::spawn(move || {
                // Job k logs and sends the sum of layer 0's output times k + 1.
                let mut g = Graph::default();
                let h0 = read(&mut g, "transformer.h.0");
                let scaled = scale(&mut g, h0, (k + 1) as f64);
                let sum = g.push(
                    Op::Tensor(TensorOp::Reduce { kind: ReduceOp::Sum, a: scaled, dims: vec![], keepdim: false }),
                    0,
                );
                g.push(Op::Log { a: sum, label: format!("job {k}") }, 0);
                g.push(Op::Send { a: sum, label: format!("job {k}") }, 0);
                g.push(Op::Save { value: sum }, 0);
                let sent = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
                let sink = sent.clone();
                let (run, lines) = nnsight::interleave::capture_logs(|| {
                    nnsight::interleave::capture_sent(
                        move |label, t: Tensor| sink.borrow_mut().push((label, t.double_value(&[]))),
                        || r.run(trace(g, "Hello world")),
                    )
                });
                let sent = sent.borrow().clone();
                (run.expect("the job"), lines, sent)
            })
        })
        .collect();
    for (k, t) in threads.into_iter().enumerate() {
        let (finished, lines, sent) = t.join().unwrap();
        let value = finished.values[&2].tensor().unwrap().double_value(&[]);
        assert_eq!(lines, vec![format!("job {k}: {value}")], "job {k}'s lines");
        assert_eq!(sent, vec![(format!("job {k}"), value)], "job {k}'s sent values");
    }
    assert_eq!(counters.recent_sizes(), vec![3]);
}

#[test]
fn workers_share_one_model_and_get_what_sequential_runs_get() {
    common::init();
    let shared = SharedModel::new(common::tiny_gpt2());
    // Jobs that only read the model, and one that takes a parameter's gradient (it holds the model alone).
    let mut jobs: Vec<Job> = (0..6).map(|k| trace(experiment(0.5 + k as f64 / 3.0), "Hello world")).collect();
    let mut grad = Graph::default();
    let out = read(&mut grad, "lm_head");
    let loss = grad.push(Op::Tensor(TensorOp::Reduce { kind: ReduceOp::Sum, a: out, dims: vec![], keepdim: false }), 0);
    let backward = grad.push(Op::Backward { a: loss }, 0);
    let g = grad.push(Op::ParamGrad { module: "transformer.h.0.mlp.c_fc".into(), param: "weight".into(), backward }, 0);
    grad.push(Op::Save { value: g }, 0);
    jobs.push(trace(grad, "Hello world"));
    let watch = || -> nnsight::Result<()> { Ok(()) };
    let sequential: Vec<_> = jobs.iter().map(|j| shared.run_job(j, &watch).unwrap()).collect();
    let jobs = Arc::new(jobs);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (model, jobs) = (shared.clone(), jobs.clone());
            std::thread::spawn(move || {
                let watch = || -> nnsight::Result<()> { Ok(()) };
                // Each thread in another order, three times over.
                (0..3 * jobs.len())
                    .map(|i| {
                        let j = (i + t * 2) % jobs.len();
                        (j, model.run_job(&jobs[j], &watch).unwrap())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for t in threads {
        for (j, got) in t.join().unwrap() {
            assert_eq!(max_diff(&got, &sequential[j]), 0.0, "job {j}");
        }
    }
}

#[test]
fn a_smollm2_job_batched_with_seven_others_is_within_float_noise_of_its_run_alone() {
    common::init();
    let model = LanguageModel::<Llama>::load_with(common::smollm2_path(), common::opts()).unwrap();
    // Eight prompts of one length: each job edits layer 10's MLP and saves layer 20's output and the logits.
    let cities = ["Paris", "Rome", "Berlin", "Madrid", "Vienna", "Prague", "Lisbon", "Dublin"];
    let prompts: Vec<String> = cities.iter().map(|c| format!("The capital city is {c}, and the")).collect();
    let lens: Vec<usize> = prompts.iter().map(|p| model.encode(p).unwrap().len()).collect();
    assert!(lens.iter().all(|&l| l == lens[0]), "one length: {lens:?}");
    let jobs: Vec<Job> = prompts
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let mut g = Graph::default();
            let mlp = read(&mut g, "model.layers.10.mlp");
            let scaled = scale(&mut g, mlp, 0.5 + k as f64 / 8.0);
            g.push(
                Op::Write {
                    module: "model.layers.10.mlp".into(),
                    point: Point::Output,
                    call: 0,
                    value: scaled,
                    index: None,
                },
                0,
            );
            let h = read(&mut g, "model.layers.20");
            g.push(Op::Save { value: h }, 0);
            let out = read(&mut g, "lm_head");
            g.push(Op::Save { value: out }, 0);
            trace(g, p)
        })
        .collect();
    let refs: Vec<&Job> = jobs.iter().collect();
    let merged = merge(&refs).expect("the jobs merge");
    let parts = merged.split(run_job(&model, &merged.job, None).unwrap());
    let mut worst = 0.0f64;
    for (job, part) in jobs.iter().zip(&parts) {
        let alone = run_job(&model, job, None).unwrap();
        for (id, v) in &alone.values {
            let (x, y) = (v.tensor().unwrap(), part.values[id].tensor().unwrap());
            let d = common::max_abs_diff(x, y);
            worst = worst.max(d / x.abs().max().double_value(&[]));
        }
    }
    // Measured: 0 with one linear kernel for every shape (NNSIGHT_LINEAR=aten or onednn); with the kernel chosen
    // per rows bucket (the default), up to 2.3e-6 of the largest value (5.6e-5 on logits up to 25, 0.025 on layer
    // 20's output, whose values reach 2.3e4).
    eprintln!("SmolLM2, 8 jobs batched vs alone: largest difference {worst:e} of the saved value's largest magnitude");
    assert!(worst <= 1e-5, "{worst}");
}

#[test]
fn what_cannot_merge_is_refused() {
    let edited = Job::Trace { graph: experiment(1.0), inputs: vec![Some("a".into())], edits: vec![edit(2.0)] };
    let plain = trace(experiment(1.0), "a");
    assert!(merge(&[&plain, &plain]).is_some());
    assert!(merge(&[&plain, &edited]).is_none(), "other edits");
    let whole = Job::Trace { graph: experiment(1.0), inputs: vec![None], edits: vec![] };
    assert!(merge(&[&plain, &whole]).is_none(), "a whole-batch invoke");
    let mut foreign = experiment(1.0);
    foreign.nodes[4].invoke = 1;
    assert!(merge(&[&plain, &trace(foreign, "a")]).is_none(), "a node of an invoke the job lacks");
    let generate = Job::Generate {
        graph: experiment(1.0),
        inputs: vec![Some("a".into())],
        options: Default::default(),
        edits: vec![],
    };
    assert!(merge(&[&plain, &generate]).is_none(), "a generation");
    // Merged: each job's nodes and invokes shifted past the ones before.
    let merged = merge(&[&plain, &plain]).unwrap();
    let Job::Trace { graph, inputs, .. } = &merged.job else { unreachable!() };
    assert_eq!((graph.nodes.len(), inputs.len()), (14, 2));
    assert_eq!(
        graph.nodes[7 + 2].op,
        Op::Write { module: "transformer.h.0".into(), point: Point::Output, call: 0, value: 8, index: None }
    );
    assert_eq!(graph.nodes[9].invoke, 1);
    assert_eq!((merged.job_of_invoke(0), merged.job_of_invoke(1), merged.job_of_invoke(2)), (Some(0), Some(1), None));
}

/// The resident memory of process `pid`, in MiB (Linux: `VmRSS` of `/proc/PID/status`).
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read the server's /proc status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc status");
    kib / 1024.0
}

/// The soak of issue 17: 10 000 trace jobs (an edit and two saves each) from 8 clients through `nnsight serve`
/// (its own process, so that its resident memory is its own), co-batching on. The server remembers the last 4096
/// jobs, so after the first 5000 its memory must stay flat: the last 5000 may add at most 24 MiB (allocator
/// slack; a leak of one result per job, 4 KiB or more, would add 20 MiB and more). Every result is checked.
#[test]
fn ten_thousand_jobs_leave_the_servers_memory_flat() {
    use std::io::{BufRead, BufReader};
    common::init();
    let model_arg = format!("{}=tiny", common::data("tiny-gpt2").to_string_lossy());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nnsight"))
        .args(["serve", "--model", &model_arg, "--listen", "127.0.0.1:0"])
        .env("NNSIGHT_QUIET", "1")
        .env_remove("NNSIGHT_API_KEYS")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start nnsight serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut url = None;
    for line in lines.by_ref() {
        if let Some(rest) = line.unwrap().strip_prefix("serving tiny at ") {
            url = rest.split_whitespace().next().map(String::from);
            break;
        }
    }
    // Its job log lines are read (and dropped) so that the pipe never fills.
    std::thread::spawn(move || lines.for_each(drop));
    let url = url.expect("the server says where it listens");
    let pid = child.id();
    let model = common::tiny_gpt2();
    let expected = run_job(&model, &trace(experiment(0.5), "Hello world"), None).unwrap();
    let (clients, per_client) = (8usize, 625usize);
    let run_half = || {
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                let r = Remote::new(url.clone(), "tiny");
                std::thread::spawn(move || {
                    let mut last = None;
                    for _ in 0..per_client {
                        last = Some(r.run(trace(experiment(0.5), "Hello world")).expect("a soak job"));
                    }
                    last.expect("at least one job")
                })
            })
            .collect();
        for t in threads {
            let got = t.join().expect("a client thread");
            assert!(max_diff(&got, &expected) <= TOLERANCE);
        }
    };
    let start = std::time::Instant::now();
    run_half();
    let warm = rss_mib(pid);
    run_half();
    let end = rss_mib(pid);
    let _ = child.kill();
    let _ = child.wait();
    eprintln!(
        "soak: {} jobs in {:.1} s; server RSS {warm:.1} MiB after 5000, {end:.1} MiB after 10000",
        2 * clients * per_client,
        start.elapsed().as_secs_f64()
    );
    assert!(end - warm <= 24.0, "the server's memory grew from {warm:.1} to {end:.1} MiB over the last 5000 jobs");
}
