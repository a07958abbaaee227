//! Remote execution: a server started here on 127.0.0.1 runs the same blocks as a local run, with the same
//! results (bit for bit on the CPU), refuses what it must, and keeps serving after each refusal.
//!
//! Bit for bit holds because the server's threads and the test's share one process, hence one choice of CPU linear
//! kernel per shape class (`nnsight::nn::fast_linear`); the server started as another process (`command`) runs
//! with `NNSIGHT_LINEAR=aten`, and the local side of those comparisons with its thread in the same mode.

use crate::common::{self, max_abs_diff};
use nnsight::models::AutoModel;
use nnsight::prelude::*;
use nnsight::remote::protocol::{encode_request, Job, Request};
use nnsight::remote::{Limits, Remote, ServeOptions, Server, PROTOCOL_VERSION};
use nnsight::Error;
use std::sync::OnceLock;
use std::time::Duration;

const KEY: &str = "test-key-0123";

/// One server per test process: tiny GPT-2 as `tiny` and SmolLM2 as `smollm2`, one key, small limits.
fn server() -> &'static str {
    static SERVER: OnceLock<(Server, String)> = OnceLock::new();
    &SERVER
        .get_or_init(|| {
            common::init();
            let load = |p| LanguageModel::<AutoModel>::load_with(p, common::opts()).unwrap();
            let models = vec![
                ("tiny".to_string(), load(common::data("tiny-gpt2"))),
                ("smollm2".to_string(), load(common::smollm2_path())),
            ];
            let limits = Limits {
                request_bytes: 1 << 20,
                graph_nodes: 2000,
                saved_bytes: 64 << 20,
                value_bytes: 16 << 20,
                wall_time: Duration::from_millis(1500),
            };
            // Co-batching off: these tests hold a remote run bit for bit to the local one, which holds for a job
            // run alone (tests/serve_batching.rs covers co-batched jobs).
            let options = ServeOptions {
                listen: "127.0.0.1:0".parse().unwrap(),
                keys: vec![KEY.into()],
                limits,
                queue: 64,
                co_batch: nnsight::remote::CoBatch::off(),
            };
            let server = Server::start(models, options).expect("start the server");
            let url = server.url();
            (server, url)
        })
        .1
}

fn tiny() -> Remote {
    Remote::new(server(), "tiny").key(KEY)
}

fn local() -> LanguageModel<Gpt2> {
    LanguageModel::<Gpt2>::load_with(common::data("tiny-gpt2"), common::opts()).unwrap()
}

/// A small job that must succeed (run after each refusal).
fn still_serves() {
    let model = local();
    let r = tiny();
    let run = || -> nnsight::Result<Tensor> {
        intervene!(model.trace("Hello").remote(&r) {
            let out = model.lm_head.output.save();
        });
        Ok(out)
    };
    let out = run().expect("the server still serves");
    assert!(out.equal(&model.forward("Hello").unwrap()));
}

#[test]
fn a_remote_trace_equals_the_local_one_bit_for_bit() -> nnsight::Result<()> {
    let model = local();
    let r = tiny();
    intervene!(model.trace("Hello world") {
        let h = model.transformer.h[0].output.save();
        model.transformer.h[1].mlp.output = model.transformer.h[1].mlp.output * 0.5;
        let out = model.lm_head.output.save();
    });
    intervene!(model.trace("Hello world").remote(&r) {
        let rh = model.transformer.h[0].output.save();
        model.transformer.h[1].mlp.output = model.transformer.h[1].mlp.output * 0.5;
        let rout = model.lm_head.output.save();
    });
    assert!(rh.equal(&h) && rout.equal(&out), "bit-identical");

    // Two invokes.
    intervene!(model.trace() {
        invoke("Hello world") { model.transformer.h[0].output[(.., -1, ..)] = model.transformer.h[0].output[(.., -1, ..)] * 0.0; let a = model.lm_head.output.save(); }
        invoke(["The cat", "A dog sat"]) { let b = model.transformer.h[1].output.norm().save(); }
    });
    intervene!(model.trace().remote(&r) {
        invoke("Hello world") { model.transformer.h[0].output[(.., -1, ..)] = model.transformer.h[0].output[(.., -1, ..)] * 0.0; let ra = model.lm_head.output.save(); }
        invoke(["The cat", "A dog sat"]) { let rb = model.transformer.h[1].output.norm().save(); }
    });
    assert!(ra.equal(&a) && rb.equal(&b));
    still_serves();
    Ok(())
}

#[test]
fn a_connected_handle_has_no_weights_and_runs_everything_on_the_server() -> nnsight::Result<()> {
    let model = local();
    let remote = LanguageModel::<Gpt2>::connect(&tiny())?;
    assert!(remote.server().is_some());
    assert_eq!(remote.tree().to_string(), model.tree().to_string(), "the same module tree");
    assert_eq!(remote.encode("Hello world")?, model.encode("Hello world")?, "the server's tokenizer");
    intervene!(remote.trace("Hello world") {
        let h = remote.transformer.h[1].output.save();
    });
    intervene!(model.trace("Hello world") {
        let lh = model.transformer.h[1].output.save();
    });
    assert!(h.equal(&lh));
    // The standard names travel as the paths they stand for.
    intervene!(remote.trace("Hello world") {
        let lens = remote.unembed(remote.final_norm(remote.layers[0].output)).save();
        let probs = remote.layers[1].attn.probs.output.save();
    });
    intervene!(model.trace("Hello world") {
        let local_lens = model.lm_head(model.transformer.ln_f(model.transformer.h[0].output)).save();
        let local_probs = model.transformer.h[1].attn.probs.output.save();
    });
    assert!(lens.equal(&local_lens) && probs.equal(&local_probs));
    assert!(remote.forward("Hello world")?.equal(&model.forward("Hello world")?));
    // A plain generation asks the server; a local hook is refused clearly.
    let opts = GenerateOptions::new().max_new_tokens(3).stop_ids([]);
    let mut steps = 0;
    let generation = remote.generate_stream("Hello", &opts, |_| {
        steps += 1;
        Ok(())
    })?;
    assert_eq!(generation, model.generate("Hello", &opts)?);
    assert_eq!(steps, 3);
    let mut rec = common::Recorder::default();
    assert!(matches!(remote.forward_with_hook(&remote.batch("Hello")?, &mut rec), Err(Error::InvalidInput { .. })));
    // An edited handle sends its edits along.
    let ablate = intervene!(remote.edit() {
        remote.transformer.h[0].mlp.output = 0.0;
    });
    let local_ablate = intervene!(model.edit() {
        model.transformer.h[0].mlp.output = 0.0;
    });
    assert!(ablate.forward("Hello world")?.equal(&local_ablate.forward("Hello world")?));
    assert_eq!(ablate.generate("Hello", &opts)?, local_ablate.generate("Hello", &opts)?);
    // A scan runs here, on the handle's shapes.
    intervene!(remote.scan("Hello world") {
        let shape = remote.transformer.h[1].output.save();
    });
    assert_eq!(shape.size(), lh.size());
    Ok(())
}

#[test]
fn a_remote_generation_with_per_step_saves_equals_the_local_one() -> nnsight::Result<()> {
    let model = local();
    let r = tiny();
    let opts = GenerateOptions::new().max_new_tokens(4).stop_ids([]);
    intervene!(model.generate("Hello", &opts) {
        let mut hs = Vec::new();
        for _ in all() {
            model.transformer.h[0].output = model.transformer.h[0].output * 1.5;
            hs.push(model.transformer.h[1].output.save());
        }
        let ids = model.generated().save();
    });
    intervene!(model.generate("Hello", &opts).remote(&r) {
        let mut rhs = Vec::new();
        for _ in all() {
            model.transformer.h[0].output = model.transformer.h[0].output * 1.5;
            rhs.push(model.transformer.h[1].output.save());
        }
        let rids = model.generated().save();
    });
    assert_eq!(rids, ids);
    assert_eq!(rhs.len(), 4);
    assert!(rhs.iter().zip(&hs).all(|(a, b)| a.equal(b)));
    Ok(())
}

#[test]
fn a_remote_session_carries_values_across_traces() -> nnsight::Result<()> {
    let model = local();
    let r = tiny();
    intervene!(model.session() {
        trace("Hello world") { let h = model.transformer.h[0].output; }
        trace("Hello world") {
            model.transformer.h[0].output = &h * 2.0;
            let seen = model.transformer.h[1].input;
        }
    });
    intervene!(model.session().remote(&r) {
        trace("Hello world") { let rh = model.transformer.h[0].output; }
        trace("Hello world") {
            model.transformer.h[0].output = &rh * 2.0;
            let rseen = model.transformer.h[1].input;
        }
    });
    assert!(rh.equal(&h) && rseen.equal(&seen));
    Ok(())
}

#[test]
fn remote_gradients_and_edits_equal_local_ones() -> nnsight::Result<()> {
    let model = local();
    let r = tiny();
    intervene!(model.trace("Hello world") {
        let h = model.transformer.h[0].output;
        model.lm_head.output[(.., -1, 7)].sum().backward();
        let g = h.grad.save();
        let w = model.transformer.h[1].mlp.c_fc.weight.grad.save();
    });
    intervene!(model.trace("Hello world").remote(&r) {
        let rh = model.transformer.h[0].output;
        model.lm_head.output[(.., -1, 7)].sum().backward();
        let w2 = model.transformer.h[1].mlp.c_fc.weight.grad.save();
        let rg = rh.grad.save();
    });
    assert!(max_abs_diff(&rg, &g) == 0.0 && max_abs_diff(&w2, &w) == 0.0);
    // An edited model's edits travel with the request.
    let edited = intervene!(model.edit() {
        model.transformer.h[0].mlp.output = model.transformer.h[0].mlp.output * 0.0;
    });
    intervene!(edited.trace("Hello world").remote(&r) {
        let zero = edited.transformer.h[0].mlp.output.abs().max().save();
        let out = edited.lm_head.output.save();
    });
    assert_eq!(zero.double_value(&[]), 0.0);
    assert!(out.equal(&edited.forward("Hello world")?));
    Ok(())
}

#[test]
fn logs_and_sent_values_arrive_while_the_job_runs() -> nnsight::Result<()> {
    let model = local();
    let r = tiny();
    let sent = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let sink = sent.clone();
    let (run, lines) = nnsight::interleave::capture_logs(|| {
        nnsight::interleave::capture_sent(
            move |label, t| sink.borrow_mut().push((label, t)),
            || -> nnsight::Result<()> {
                intervene!(model.trace("Hello world").remote(&r) {
                    log!(model.transformer.h[0].output.norm());
                    send!(model.transformer.h[1].output[(.., -1, ..)]);
                });
                Ok(())
            },
        )
    });
    run?;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("model.transformer.h[0].output.norm():"), "{lines:?}");
    let sent = sent.borrow();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].1.size(), vec![1, 64]);
    Ok(())
}

#[test]
fn a_job_can_be_submitted_and_fetched_later() -> nnsight::Result<()> {
    let model = local();
    let r = tiny();
    let (graph, read) = nnsight::graph::Graph::saving_read("lm_head", nnsight::graph::Point::Output);
    let id = r.submit(Job::Trace { graph, inputs: vec![Some("Hello".into())], edits: vec![] })?;
    let mut states = Vec::new();
    let mut done = r.wait_with(&id, &mut |s| states.push(s.state))?;
    assert!(r.status(&id)?.state.is_final());
    use nnsight::remote::JobState::{Completed, Queued, Running};
    assert_eq!(states, [Queued, Running, Completed], "the job's states, as a subscriber sees them");
    let again = r.fetch(&id)?;
    let out = done.values.remove(&read).unwrap();
    assert!(out.tensor()?.equal(&model.forward("Hello")?));
    assert!(again.values[&read].tensor()?.equal(out.tensor()?));
    Ok(())
}

#[test]
fn thirty_two_concurrent_clients_get_their_own_results() -> nnsight::Result<()> {
    let url = server().to_string();
    let threads: Vec<_> = (0..32)
        .map(|k| {
            let url = url.clone();
            std::thread::spawn(move || -> nnsight::Result<(usize, Tensor)> {
                let model = LanguageModel::<Gpt2>::connect(&Remote::new(url, "tiny").key(KEY))?;
                let factor = 1.0 + k as f64 / 8.0;
                intervene!(model.trace("Hello world") {
                    model.transformer.h[0].output = model.transformer.h[0].output * factor;
                    let out = model.lm_head.output.save();
                });
                Ok((k, out))
            })
        })
        .collect();
    let model = local();
    for t in threads {
        let (k, out) = t.join().expect("a client thread").expect("a client's run");
        let factor = 1.0 + k as f64 / 8.0;
        intervene!(model.trace("Hello world") {
            model.transformer.h[0].output = model.transformer.h[0].output * factor;
            let expected = model.lm_head.output.save();
        });
        assert!(out.equal(&expected), "client {k}");
    }
    Ok(())
}

/// A raw POST of `body` with `key`; the status and the body.
fn post(body: &[u8], key: Option<&str>) -> (u16, String) {
    let mut req = ureq::post(&format!("{}/v1/jobs", server()));
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    match req.send_bytes(body) {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("transport: {e}"),
    }
}

fn trace_request(graph: nnsight::graph::Graph, protocol: u32) -> Vec<u8> {
    let job = Job::Trace { graph, inputs: vec![Some("Hello".into())], edits: vec![] };
    encode_request(&Request { protocol, model: "tiny".into(), job }).unwrap()
}

fn saving_graph() -> nnsight::graph::Graph {
    nnsight::graph::Graph::saving_read("lm_head", nnsight::graph::Point::Output).0
}

#[test]
fn the_server_refuses_bad_requests_and_keeps_serving() {
    let good = trace_request(saving_graph(), PROTOCOL_VERSION);
    // No key, a wrong key.
    let (code, body) = post(&good, None);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("no API key"), "{body}");
    still_serves();
    let (code, body) = post(&good, Some("wrong"));
    assert_eq!(code, 401, "{body}");
    assert!(!body.contains(KEY), "keys are never echoed");
    still_serves();
    // A malformed body.
    let (code, body) = post(b"not a request", Some(KEY));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not a safetensors file"), "{body}");
    still_serves();
    // Another protocol version: the client's error names both.
    let (code, body) = post(&trace_request(saving_graph(), 99), Some(KEY));
    assert_eq!(code, 400, "{body}");
    let err = serde_json::from_str::<nnsight::remote::WireError>(&body).unwrap().into_error();
    assert!(matches!(err, Error::ProtocolVersion { server: PROTOCOL_VERSION, client: 99 }), "{err}");
    still_serves();
    // An unknown op, named.
    let json = format!(
        r#"{{"protocol":{PROTOCOL_VERSION},"model":"tiny","job":{{"kind":"trace","inputs":[{{"text":"Hi"}}],"graph":{{"nodes":[{{"op":"frobnicate","a":0,"invoke":0}}]}}}}}}"#
    );
    let bytes = safetensors::serialize(
        Vec::<(String, safetensors::tensor::TensorView<'_>)>::new(),
        Some(std::collections::HashMap::from([("nnsight".to_string(), json.to_string())])),
    )
    .unwrap();
    let (code, body) = post(&bytes, Some(KEY));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("frobnicate"), "{body}");
    still_serves();
    // An unknown function, named, before anything runs.
    let mut graph = saving_graph();
    graph.push(nnsight::graph::Op::Call { function: "nowhere::steer".into(), args: vec![] }, 0);
    let (code, body) = post(&trace_request(graph, PROTOCOL_VERSION), Some(KEY));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("nowhere::steer") && body.contains("unknown_function"), "{body}");
    still_serves();
    // Too many bytes (a 2 MiB constant), too many nodes.
    let model = local();
    let big = Tensor::zeros([512, 1024], (Kind::Float, Device::Cpu));
    let run = || -> nnsight::Result<()> {
        intervene!(model.trace("Hello").remote(&tiny()) {
            let x = (model.transformer.h[0].output.sum() + &big).sum().save();
        });
        Ok(())
    };
    let err = run().unwrap_err();
    assert!(matches!(&err, Error::Limit { what, .. } if what == "request bytes"), "{err}");
    let _ = &big;
    still_serves();
    let run = || -> nnsight::Result<()> {
        intervene!(model.trace("Hello").remote(&tiny()) {
            let mut h = model.transformer.h[0].output;
            for _ in 0..2100 {
                h = h * 1.0;
            }
            model.transformer.h[0].output = h;
        });
        Ok(())
    };
    let err = run().unwrap_err();
    assert!(matches!(&err, Error::Limit { what, limit: 2000, .. } if what == "graph nodes"), "{err}");
    still_serves();
    // A value too large to compute: refused before it is allocated (a 1 GiB broadcast against a 16 MiB cap).
    let run = || -> nnsight::Result<()> {
        intervene!(model.trace("Hello").remote(&tiny()) {
            let h = model.transformer.h[0].output.reshape([-1]);
            let outer = h.reshape([-1, 1]) + h.reshape([1, -1]);
            let huge = outer.reshape([-1, 1]) + outer.reshape([1, -1]);
            let _ = huge.sum().save();
        });
        Ok(())
    };
    let err = run().unwrap_err();
    assert!(
        matches!(&err, Error::Limit { what, given, .. } if what.contains("bytes of node") && *given >= 1 << 30),
        "{err}"
    );
    still_serves();
}

#[test]
fn a_job_over_its_time_limit_is_cancelled_and_the_worker_stays_healthy() -> nnsight::Result<()> {
    let r = Remote::new(server(), "smollm2").key(KEY);
    let model = LanguageModel::<Llama>::connect(&r)?;
    let opts = GenerateOptions::new().max_new_tokens(400).stop_ids([]);
    let started = std::time::Instant::now();
    let run = || -> nnsight::Result<()> {
        intervene!(model.generate("The Eiffel Tower is in the city of", &opts) {
            let ids = model.generated().save();
        });
        let _ = ids;
        Ok(())
    };
    let err = run().unwrap_err();
    assert!(matches!(err, Error::TimeLimit { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "cancelled near the limit, not at the end");
    // The same worker serves the next job.
    intervene!(model.trace("The Eiffel Tower is in the city of") {
        let logits = model.lm_head.output[(.., -1, ..)].save();
    });
    assert_eq!(logits.argmax(-1, false).int64_value(&[0]), model.encode(" Paris")?[0]);
    Ok(())
}

mod fuzz;

mod command;

mod queue;

mod dropped;

mod workers;
