//! Continuous batching of generation jobs on the server: jobs join a running batch between decode steps and leave
//! when their rows stop; each job's per-step interventions, saves, errors and tokens are its own and equal its run
//! alone.

use crate::common::{self, max_abs_diff};
use nnsight::prelude::*;
use nnsight::remote::server::model_info;
use nnsight::remote::{BatchCounters, CoBatch, Limits, LocalQueue, Remote, ServeOptions, Server};
use nnsight::GenerateOptions;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tch::Tensor;

const EIFFEL: &str = "The Eiffel Tower is in the city of";
const MADRID: &str = "Madrid is the capital of";

/// SmolLM2 served as `smollm2` with co-batching on (the default policy); the server and its counters.
fn serve() -> (Server, Arc<BatchCounters>) {
    serve_within(Limits::default())
}

fn serve_within(limits: Limits) -> (Server, Arc<BatchCounters>) {
    let model = LanguageModel::<Llama>::load_with(common::smollm2_path(), common::opts()).expect("load SmolLM2");
    let info = model_info("smollm2", &model).expect("describe the model");
    let policy = CoBatch::default();
    let queue = LocalQueue::start_pools_with(vec![("smollm2".into(), vec![model])], 64, limits.clone(), policy);
    let counters = queue.counters("smollm2").expect("the model's counters");
    (common::serve_queue(Box::new(queue), info, policy, limits), counters)
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions::new().max_new_tokens(n).stop_ids([])
}

/// A steering direction for layer 8 (fixed numbers, no RNG).
fn steer() -> Tensor {
    let v: Vec<f32> = (0..576).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
    Tensor::from_slice(&v)
}

/// Job A: a long plain generation (the batch the others join).
fn long_job(model: &LanguageModel<Llama>) -> nnsight::Result<Vec<Vec<i64>>> {
    intervene!(model.generate(EIFFEL, greedy(80)) {
        let ids = model.generated().save();
    });
    Ok(ids.rows)
}

/// Job B: steering at every step, layer 10's last position saved at every step.
fn steered_job(model: &LanguageModel<Llama>, steer: &Tensor) -> nnsight::Result<(Vec<Vec<i64>>, Vec<Tensor>)> {
    intervene!(model.generate(MADRID, greedy(12)) {
        let mut hs = Vec::new();
        for _ in all() {
            model.model.layers[8].output[(.., -1, ..)] += steer;
            hs.push(model.model.layers[10].output[(.., -1, ..)].save());
        }
        let ids = model.generated().save();
    });
    Ok((ids.rows, hs))
}

/// Job C: two prompts of other lengths, layer 3's MLP halved at steps 1 to 3, the logits of step 2 saved.
fn two_row_job(model: &LanguageModel<Llama>) -> nnsight::Result<(Vec<Vec<i64>>, Tensor)> {
    intervene!(model.generate(vec!["Once upon a time", "The quick brown fox jumps over"], greedy(8)) {
        let mut logits = Vec::new();
        for step in iter(1..4) {
            model.model.layers[3].mlp.output = model.model.layers[3].mlp.output * 0.5;
            if step == 2 {
                logits.push(model.lm_head.output.save());
            }
        }
        let ids = model.generated().save();
    });
    Ok((ids.rows, logits.remove(0)))
}

/// Job D: fails at its third step (a reshape to a size its rows do not have).
fn failing_job(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.generate(MADRID, greedy(10)) {
        for step in iter(0..5) {
            if step == 2 {
                let _ = model.model.layers[4].output.reshape([7, -1]).save();
            }
        }
    });
    Ok(())
}

/// Equal up to the float drift of a larger batch: 1e-4 + 1e-5 of the largest value.
fn close(a: &Tensor, b: &Tensor) -> bool {
    let scale = b.abs().max().double_value(&[]);
    a.size() == b.size() && max_abs_diff(a, b) <= 1e-4 + 1e-5 * scale
}

#[test]
fn generation_jobs_join_a_running_batch_and_each_equals_its_run_alone() -> nnsight::Result<()> {
    common::init();
    let (server, counters) = serve();
    let remote = Remote::new(server.url(), "smollm2");
    let connect = || LanguageModel::<Llama>::connect(&remote).expect("connect");
    // A starts alone; B, C and D arrive while it decodes and join it between steps.
    let a = {
        let model = connect();
        std::thread::spawn(move || long_job(&model))
    };
    std::thread::sleep(Duration::from_millis(100));
    let b = {
        let (model, s) = (connect(), steer());
        std::thread::spawn(move || steered_job(&model, &s))
    };
    let c = {
        let model = connect();
        std::thread::spawn(move || two_row_job(&model))
    };
    let d = {
        let model = connect();
        std::thread::spawn(move || failing_job(&model))
    };
    let (a, b, c, d) = (a.join().unwrap()?, b.join().unwrap()?, c.join().unwrap()?, d.join().unwrap());

    let guard = common::smollm2();
    let model = &*guard;
    assert_eq!(a, long_job(model)?, "job A's tokens");
    let (ids, hs) = steered_job(model, &steer())?;
    assert_eq!(b.0, ids, "job B's tokens");
    assert_eq!(b.1.len(), 12);
    for (step, (got, alone)) in b.1.iter().zip(&hs).enumerate() {
        assert!(close(got, alone), "job B, step {step}: {}", max_abs_diff(got, alone));
    }
    let (ids, logits) = two_row_job(model)?;
    assert_eq!(c.0, ids, "job C's tokens");
    assert!(close(&c.1, &logits), "job C's logits: {}", max_abs_diff(&c.1, &logits));
    let err = d.expect_err("job D fails");
    let alone = failing_job(model).expect_err("job D fails alone too");
    assert!(err.to_string().contains("reshape") || err.to_string().contains("shape"), "{err}");
    assert!(!alone.to_string().is_empty());

    // Every job ran in a continuous batch, and decode steps ran several jobs' rows at once.
    assert_eq!(counters.continuous_jobs(), 4);
    let (steps, rows) = (counters.decode_steps(), counters.decode_step_rows());
    eprintln!("continuous batch: {rows} rows in {steps} steps");
    assert!(steps > 0 && rows > steps + 20, "{rows} rows in {steps} steps: the jobs overlapped");
    Ok(())
}

#[test]
fn a_generation_alone_on_a_batching_server_equals_the_local_one_bit_for_bit() -> nnsight::Result<()> {
    common::init();
    let (server, counters) = serve();
    let remote = LanguageModel::<Llama>::connect(&Remote::new(server.url(), "smollm2"))?;
    let (ids, hs) = steered_job(&remote, &steer())?;
    let guard = common::smollm2();
    let (local_ids, local_hs) = steered_job(&guard, &steer())?;
    assert_eq!(ids, local_ids);
    // One job alone: its batch is its own rows, its cache unpadded: the same numbers as a local run.
    assert!(hs.iter().zip(&local_hs).all(|(a, b)| a.equal(b)));
    assert_eq!(counters.continuous_jobs(), 1);
    Ok(())
}

#[test]
fn a_job_over_its_time_limit_leaves_the_batch_and_the_others_finish() -> nnsight::Result<()> {
    common::init();
    let (server, counters) = serve_within(Limits { wall_time: Duration::from_secs(8), ..Limits::default() });
    let remote = Remote::new(server.url(), "smollm2");
    let endless = {
        let model = LanguageModel::<Llama>::connect(&remote)?;
        std::thread::spawn(move || -> nnsight::Result<()> {
            intervene!(model.generate(EIFFEL, greedy(2000)) {
                let ids = model.generated().save();
            });
            let _ = ids;
            Ok(())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let model = LanguageModel::<Llama>::connect(&remote)?;
    let (ids, hs) = steered_job(&model, &steer())?;
    let err = endless.join().unwrap().expect_err("the endless job runs out of time");
    assert!(matches!(err, nnsight::Error::TimeLimit { .. }), "{err}");
    let guard = common::smollm2();
    let (local_ids, local_hs) = steered_job(&guard, &steer())?;
    assert_eq!(ids, local_ids);
    assert!(hs.iter().zip(&local_hs).all(|(a, b)| close(a, b)));
    assert_eq!(counters.continuous_jobs(), 2);
    assert!(counters.decode_step_rows() > counters.decode_steps(), "the short job ran beside the endless one");
    Ok(())
}

#[test]
fn shared_weights_workers_batch_generations_beside_a_gradient_job() {
    use nnsight::exec::{run_job, Job};
    use nnsight::graph::{Graph, Op, Point, ReduceOp, TensorOp};
    use nnsight::SharedModel;
    common::init();
    let shared = SharedModel::new(common::tiny_gpt2());
    let info = model_info("tiny", &shared).expect("describe the model");
    let (limits, policy) = (Limits::default(), CoBatch::default());
    let queue = LocalQueue::start_pools_with(vec![("tiny".into(), vec![shared.clone(), shared])], 64, limits, policy);
    let counters = queue.counters("tiny").unwrap();
    let options = ServeOptions { listen: "127.0.0.1:0".parse().unwrap(), co_batch: policy, ..Default::default() };
    let server = Server::start_with(Box::new(queue), HashMap::from([("tiny".to_string(), info)]), options).unwrap();
    // Generations of other prompts and lengths (their ids saved), and a job that takes a parameter's gradient (it
    // holds the model alone, between two decode steps of the batch).
    let generation = |prompt: &str, n: usize| {
        let mut g = Graph::default();
        let ids = g.push(Op::Generated, 0);
        g.push(Op::Save { value: ids }, 0);
        Job::Generate { graph: g, inputs: vec![Some(prompt.into())], options: greedy(n), edits: vec![] }
    };
    let mut grad = Graph::default();
    let out = grad.push(Op::Read { module: "lm_head".into(), point: Point::Output, call: 0 }, 0);
    let loss = grad.push(Op::Tensor(TensorOp::Reduce { kind: ReduceOp::Sum, a: out, dims: vec![], keepdim: false }), 0);
    let backward = grad.push(Op::Backward { a: loss }, 0);
    let g = grad.push(Op::ParamGrad { module: "transformer.h.0.mlp.c_fc".into(), param: "weight".into(), backward }, 0);
    grad.push(Op::Save { value: g }, 0);
    let jobs = vec![
        generation("Hello world", 30),
        generation("The", 12),
        Job::Trace { graph: grad, inputs: vec![Some("Hello world".into())], edits: vec![] },
        generation("One two three four", 20),
    ];
    let threads: Vec<_> = jobs
        .iter()
        .cloned()
        .enumerate()
        .map(|(k, job)| {
            let r = Remote::new(server.url(), "tiny");
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50 * k as u64));
                r.run(job)
            })
        })
        .collect();
    let model = common::tiny_gpt2();
    for (k, (t, job)) in threads.into_iter().zip(&jobs).enumerate() {
        let got = t.join().unwrap().expect("a client's job");
        let alone = run_job(&model, job, None).unwrap();
        for (id, v) in &alone.values {
            let (a, b) = (got.values[id].tensor().unwrap(), v.tensor().unwrap());
            assert!(close(a, b), "job {k}, node {id}: {}", max_abs_diff(a, b));
        }
    }
    assert_eq!(counters.continuous_jobs(), 3);
}
