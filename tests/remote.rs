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

mod fuzz {
    //! The request decoder against arbitrary and mutated bytes (a bounded proptest run): it answers, never
    //! panics, and the server keeps serving after garbage.
    use super::*;
    use proptest::prelude::*;

    fn valid() -> Vec<u8> {
        let mut graph = saving_graph();
        let c = graph.push(
            nnsight::graph::Op::Const {
                value: nnsight::graph::Constant::Tensor(
                    nnsight::graph::TensorData::from_tensor(&Tensor::from_slice(&[1.0f32, 2.0, 3.0])).unwrap(),
                ),
            },
            0,
        );
        graph.push(nnsight::graph::Op::Save { value: c }, 0);
        trace_request(graph, PROTOCOL_VERSION)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_crash_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = nnsight::remote::protocol::decode_request(&bytes);
        }

        #[test]
        fn mutated_requests_never_crash_the_decoder(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = valid();
            for (at, v) in flips {
                let i = at.index(bytes.len());
                bytes[i] = v;
            }
            let _ = nnsight::remote::protocol::decode_request(&bytes);
            let end = cut.index(bytes.len());
            let _ = nnsight::remote::protocol::decode_request(&bytes[..end]);
        }
    }

    #[test]
    fn the_server_answers_garbage_and_keeps_serving() {
        let mut bytes = valid();
        assert!(nnsight::remote::protocol::decode_request(&bytes).is_ok(), "the unmutated request is valid");
        for i in (0..bytes.len()).step_by(7) {
            bytes[i] ^= 0x5a;
            let (code, _) = post(&bytes, Some(KEY));
            assert!(code == 202 || code == 400 || code == 404 || code == 422, "status {code}");
        }
        still_serves();
    }
}

mod command {
    //! The `nnsight` binary: `tree`, `generate`, and `serve` in another process, traced from this one.
    use super::*;
    use nnsight::nn::fast_linear;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    /// The binary, quiet, with every linear layer through `at::linear`: the CPU kernel is otherwise chosen by
    /// timing in each process, and two processes that chose differently would round differently (a few ulps), so
    /// the results compared bit for bit below are computed with `at::linear` on both sides (see [`aten_here`]).
    fn nnsight() -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nnsight"));
        c.env("NNSIGHT_QUIET", "1").env("NNSIGHT_LINEAR", "aten").env_remove("NNSIGHT_NO_ONEDNN");
        c
    }

    /// This thread's linear layers through `at::linear`, as the child process's (undone when dropped).
    fn aten_here() -> impl Drop {
        struct Follow;
        impl Drop for Follow {
            fn drop(&mut self) {
                fast_linear::set_linear_mode(None);
            }
        }
        fast_linear::set_linear_mode(Some(fast_linear::LinearMode::Aten));
        Follow
    }

    #[test]
    fn tree_and_generate_print_what_the_library_gives() {
        let out = nnsight().arg("tree").arg(common::data("tiny-gpt2")).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.trim_end(), local().tree().to_string().trim_end());

        let out = nnsight()
            .args(["generate", &common::data("tiny-gpt2").to_string_lossy(), "Hello", "--max-new-tokens", "4"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let _aten = aten_here();
        let model = local();
        let expected = model.generate("Hello", &GenerateOptions::new().max_new_tokens(4)).unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), expected.rows[0].text(&model).unwrap().trim_end());
    }

    #[test]
    fn serve_refuses_a_public_address_without_keys() {
        let out = nnsight()
            .args(["serve", "--model", &common::data("tiny-gpt2").to_string_lossy(), "--listen", "0.0.0.0:0"])
            .env_remove("NNSIGHT_API_KEYS")
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("without API keys"));
    }

    #[test]
    fn a_served_model_is_traced_from_another_process() -> nnsight::Result<()> {
        let model_arg = format!("{}=tiny", common::data("tiny-gpt2").to_string_lossy());
        let mut child = nnsight()
            .args(["serve", "--model", &model_arg, "--listen", "127.0.0.1:0"])
            .env("NNSIGHT_API_KEYS", "k1,k2")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut url = None;
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            assert!(!line.contains("k1") && !line.contains("k2"), "keys are never printed: {line}");
            if let Some(rest) = line.strip_prefix("serving tiny at ") {
                url = rest.split_whitespace().next().map(String::from);
                break;
            }
        }
        let url = url.expect("the server says where it listens");
        let run = || -> nnsight::Result<Tensor> {
            let remote = LanguageModel::<Gpt2>::connect(&Remote::new(url.as_str(), "tiny").key("k2"))?;
            intervene!(remote.trace("Hello world") {
                let out = remote.lm_head.output.save();
            });
            Ok(out)
        };
        let result = run();
        let _ = child.kill();
        let _ = child.wait();
        let _aten = aten_here();
        assert!(result?.equal(&local().forward("Hello world")?));
        Ok(())
    }
}

mod queue {
    //! A full queue answers "busy, retry after N s"; an unreachable server is a clear error.
    use super::*;
    use nnsight::remote::server::{model_info, QueueFull, QueuedJob};
    use nnsight::remote::JobQueue;

    /// A queue that is always full.
    struct Full;

    impl JobQueue for Full {
        fn models(&self) -> Vec<String> {
            vec!["tiny".into()]
        }
        fn push(&self, _job: QueuedJob) -> Result<(), QueueFull> {
            Err(QueueFull { retry_after: Duration::from_secs(3) })
        }
    }

    #[test]
    fn a_full_queue_answers_busy_with_when_to_retry() {
        let model = LanguageModel::<AutoModel>::load_with(common::data("tiny-gpt2"), common::opts()).unwrap();
        let infos = std::collections::HashMap::from([("tiny".to_string(), model_info("tiny", &model).unwrap())]);
        let options = ServeOptions { listen: "127.0.0.1:0".parse().unwrap(), ..ServeOptions::default() };
        let server = Server::start_with(Box::new(Full), infos, options).unwrap();
        let r = Remote::new(server.url(), "tiny").retries(0);
        let err =
            r.run(Job::Trace { graph: saving_graph(), inputs: vec![Some("Hi".into())], edits: vec![] }).unwrap_err();
        assert!(matches!(err, Error::Busy { retry_after_s: 3 }), "{err}");
        let raw = ureq::post(&format!("{}/v1/jobs", server.url()))
            .send_bytes(&trace_request(saving_graph(), PROTOCOL_VERSION));
        let Err(ureq::Error::Status(503, response)) = raw else { panic!("expected 503") };
        assert_eq!(response.header("Retry-After"), Some("3"));
    }

    #[test]
    fn an_unreachable_server_is_a_clear_error() {
        let r = Remote::new("http://127.0.0.1:9", "tiny").retries(0);
        let err = r.model_info().unwrap_err();
        assert!(err.to_string().contains("cannot reach the server at http://127.0.0.1:9"), "{err}");
    }
}

mod dropped {
    //! A connection that drops while a client waits for its job is retried, and nothing is relayed twice.
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A TCP proxy to `target` that cuts the first event stream it sees a few bytes into its events.
    fn cutting_proxy(target: std::net::SocketAddr) -> (String, Arc<AtomicBool>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let server = TcpStream::connect(target).unwrap();
                let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut s_write);
                });
                let (mut s_read, mut c_write) = (server, client);
                let flag = flag.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let n = match s_read.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        seen.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&seen);
                        if !flag.load(Ordering::SeqCst) {
                            if let Some(at) = text.find("event: log") {
                                // Forward up to just inside the first log event, then drop the connection.
                                flag.store(true, Ordering::SeqCst);
                                let upto = (at + 8).saturating_sub(seen.len() - n).min(n);
                                let _ = c_write.write_all(&buf[..upto]);
                                let _ = c_write.shutdown(std::net::Shutdown::Both);
                                let _ = s_read.shutdown(std::net::Shutdown::Both);
                                return;
                            }
                        }
                        if c_write.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, cut)
    }

    #[test]
    fn a_dropped_event_stream_is_followed_again_without_repeats() -> nnsight::Result<()> {
        let target: std::net::SocketAddr = server().trim_start_matches("http://").parse().unwrap();
        let (url, cut) = cutting_proxy(target);
        let model = local();
        let r = Remote::new(url, "tiny").key(KEY);
        let (out, lines) = nnsight::interleave::capture_logs(|| -> nnsight::Result<Tensor> {
            intervene!(model.trace("Hello world").remote(&r) {
                log!(model.transformer.h[0].output.norm());
                log!(model.transformer.h[1].output.norm());
                let out = model.lm_head.output.save();
            });
            Ok(out)
        });
        assert!(cut.load(std::sync::atomic::Ordering::SeqCst), "the proxy cut a stream");
        assert!(out?.equal(&model.forward("Hello world")?));
        assert_eq!(lines.len(), 2, "each line once: {lines:?}");
        Ok(())
    }
}

mod workers {
    //! Several copies of a model run that many of its jobs at once.
    use super::*;
    use nnsight::remote::JobState;

    #[test]
    fn a_second_copy_runs_a_job_while_the_first_is_busy() -> nnsight::Result<()> {
        let load = || LanguageModel::<AutoModel>::load_with(common::data("tiny-gpt2"), common::opts()).unwrap();
        let options = ServeOptions { listen: "127.0.0.1:0".parse().unwrap(), ..ServeOptions::default() };
        let server = Server::start_pools(vec![("tiny".into(), vec![load(), load()])], options)?;
        let r = Remote::new(server.url(), "tiny");
        let model = local();
        // A slow job: the outer sum of the ~2000 hidden values with themselves, multiplied by itself four times.
        let prompt = "one two three four five six seven eight nine ten";
        assert!(model.encode(prompt)?.len() >= 24, "a few thousand hidden values");
        let slow = nnsight::graph::capture_graphs(|| -> nnsight::Result<()> {
            intervene!(model.scan(prompt) {
                let h = model.transformer.h[0].output.reshape([-1]);
                let mut m = (h.reshape([-1, 1]) + h.reshape([1, -1])) / 2048.0;
                for _ in 0..4 {
                    m = m.matmul(m) / 2048.0;
                }
                let _ = m.sum().save();
            });
            Ok(())
        })
        .1
        .pop()
        .expect("the scan's graph");
        let slow = r.submit(Job::Trace { graph: slow, inputs: vec![Some(prompt.into())], edits: vec![] })?;
        while r.status(&slow)?.state == JobState::Queued {
            std::thread::sleep(Duration::from_millis(5));
        }
        // A quick job meanwhile: it is done while the slow one still runs.
        let quick = r.run(Job::Trace { graph: saving_graph(), inputs: vec![Some("Hi".into())], edits: vec![] })?;
        assert_eq!(quick.values.len(), 1);
        assert_eq!(r.status(&slow)?.state, JobState::Running, "the quick job did not wait for the slow one");
        assert_eq!(r.wait(&slow)?.values.len(), 1);
        Ok(())
    }
}
