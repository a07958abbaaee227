//! Sessions: several traces (and generations) in one `intervene!`, with values crossing traces without `.save()`
//! and Rust loops around traces.

use crate::common::{self, max_abs_diff, Recorder};
use nnsight::prelude::*;

#[test]
fn a_value_of_one_trace_is_usable_in_the_next_without_save() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let mut rec = Recorder::default();
    let _ = model.forward_with_hook(&model.batch("Hello world")?, &mut rec)?;
    let plain_h0 = &rec.outputs["transformer.h.0"];
    intervene!(model.session() {
        trace("Hello world") {
            let h = model.transformer.h[0].output;
        }
        // `h` is the value now (kept automatically), used as a constant in the next trace.
        trace("Hello world") {
            model.transformer.h[0].output = &h * 2.0;
            let seen = model.transformer.h[1].input;
        }
    });
    assert!(max_abs_diff(&h, plain_h0) < 1e-6);
    assert!(max_abs_diff(&seen, &(plain_h0 * 2.0)) < 1e-5);
    Ok(())
}

#[test]
fn rust_loops_around_traces_and_generations_in_a_session() -> nnsight::Result<()> {
    let model = common::tiny_gpt2();
    let mut norms = Vec::new();
    let options = GenerateOptions::new().max_new_tokens(3).stop_ids([]);
    intervene!(model.session() {
        trace("Hello world") {
            let base = model.transformer.h[0].output.norm();
        }
        for k in 1..=3 {
            trace("Hello world") {
                model.transformer.h[0].output *= k as f64;
                let n = model.transformer.h[0].output.norm();
            }
            norms.push(n.double_value(&[]) / base.double_value(&[]));
        }
        generate("Hello world", &options) {
            let ids = model.generated();
        }
    });
    for (k, r) in norms.iter().enumerate() {
        assert!((r - (k + 1) as f64).abs() < 1e-4, "{norms:?}");
    }
    assert_eq!(ids.rows[0].len(), model.encode("Hello world")?.len() + 3);
    Ok(())
}

// ---- a remote session of blocks alone: one request ----------------------------------------------------------------

use nnsight::exec::{Import, Job, SessionBlock};
use nnsight::models::AutoModel;
use nnsight::remote::{CoBatch, Remote, ServeOptions, Server};

const PROMPT: &str = "The Eiffel Tower is in the city of";

/// A server of SmolLM2 as `smollm2` (co-batching off: jobs run alone, bit for bit as here), and its address.
fn smollm2_server() -> nnsight::Result<(Server, String)> {
    let served = LanguageModel::<AutoModel>::load_with(common::smollm2_path(), common::opts())?;
    let options = ServeOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        keys: vec!["k1".into()],
        co_batch: CoBatch::off(),
        ..ServeOptions::default()
    };
    let server = Server::start(vec![("smollm2".into(), served)], options)?;
    let url = server.url();
    Ok((server, url))
}

/// The number of jobs the server was sent so far (its `/metrics`).
fn jobs_submitted(url: &str) -> u64 {
    let text = ureq::get(&format!("{url}/metrics")).set("Authorization", "Bearer k1").call().unwrap();
    let text = text.into_string().unwrap();
    let line = text.lines().find(|l| l.starts_with("nnsight_jobs_submitted_total{model=\"smollm2\"}")).unwrap();
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn a_remote_session_of_three_blocks_is_one_job_equal_to_the_local_run_bit_for_bit() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    let (_server, url) = smollm2_server()?;
    let r = Remote::new(url.as_str(), "smollm2").key("k1");
    // Block 1's value is used in block 2, block 2's in block 3.
    intervene!(model.session() {
        trace(PROMPT) { let h = model.model.layers[3].output; }
        trace(PROMPT) {
            model.model.layers[3].output = &h * 1.5;
            let m = model.model.layers[8].mlp.output;
        }
        trace(PROMPT) {
            model.model.layers[8].mlp.output = &m * 0.5;
            let logits = model.lm_head.output;
        }
    });
    let before = jobs_submitted(&url);
    intervene!(model.session().remote(&r) {
        trace(PROMPT) { let rh = model.model.layers[3].output; }
        trace(PROMPT) {
            model.model.layers[3].output = &rh * 1.5;
            let rm = model.model.layers[8].mlp.output;
        }
        trace(PROMPT) {
            model.model.layers[8].mlp.output = &rm * 0.5;
            let rlogits = model.lm_head.output;
        }
    });
    assert_eq!(jobs_submitted(&url) - before, 1, "the three blocks travel as one job");
    for (remote, here) in [(&rh, &h), (&rm, &m), (&rlogits, &logits)] {
        assert_eq!(remote.size(), here.size());
        assert_eq!(max_abs_diff(remote, here), 0.0);
    }
    // The interventions took effect: block 3's logits differ from a plain run's.
    assert!(max_abs_diff(&logits, &model.forward(PROMPT)?) > 1e-3);

    // With Rust code between the blocks, each block is a request of its own, and the values are the same.
    let before = jobs_submitted(&url);
    intervene!(model.session().remote(&r) {
        trace(PROMPT) { let sh = model.model.layers[3].output; }
        let scale = 1.5;
        trace(PROMPT) {
            model.model.layers[3].output = &sh * scale;
            let sm = model.model.layers[8].mlp.output;
        }
    });
    assert_eq!(jobs_submitted(&url) - before, 2);
    assert_eq!(max_abs_diff(&sh, &h), 0.0);
    assert_eq!(max_abs_diff(&sm, &m), 0.0);
    Ok(())
}

#[test]
fn a_malformed_or_failing_session_is_refused_naming_the_block() -> nnsight::Result<()> {
    let guard = common::smollm2();
    let model = &*guard;
    let (_server, url) = smollm2_server()?;
    let r = Remote::new(url.as_str(), "smollm2").key("k1");
    // A failing block: its error names it.
    let failed = (|| -> nnsight::Result<()> {
        intervene!(model.session().remote(&r) {
            trace(PROMPT) { let h = model.model.layers[3].output; }
            trace(PROMPT) { let bad = (&h * 2.0).narrow(2, 570, 10); }
        });
        let _ = (h, bad);
        Ok(())
    })();
    let e = failed.expect_err("block 2 reads past the hidden size");
    assert!(e.to_string().contains("in block 2 of the session"), "{e}");

    // Requests built by hand: an import of a later block, of a node not saved, into a node that is no constant.
    let mut graph = nnsight::graph::Graph::default();
    graph.push(nnsight::graph::Op::Const { value: nnsight::graph::Constant::Scalar(1.0) }, 0);
    graph.push(nnsight::graph::Op::Save { value: 0 }, 0);
    let block = |imports| SessionBlock {
        job: Job::Trace { graph: graph.clone(), inputs: vec![Some(PROMPT.into())], edits: vec![] },
        imports,
    };
    for (import, says) in [
        (Import { node: 0, block: 1, from: 0 }, "only an earlier block"),
        (Import { node: 0, block: 0, from: 1 }, "does not save"),
        (Import { node: 1, block: 0, from: 0 }, "expected a constant"),
        (Import { node: 7, block: 0, from: 0 }, "the block has 2 nodes"),
    ] {
        let e = r.run_session(vec![block(vec![]), block(vec![import])]).expect_err(says);
        let text = e.to_string();
        assert!(text.contains("protocol error") && text.contains("block 2") && text.contains(says), "{text}");
    }
    let e = r.run_session(vec![]).expect_err("no blocks");
    assert!(e.to_string().contains("no blocks"), "{e}");
    // A well-formed one runs: block 2's constant is block 1's saved value.
    let parts = r.run_session(vec![block(vec![]), block(vec![Import { node: 0, block: 0, from: 0 }])])?;
    assert_eq!(parts.len(), 2);
    assert!(parts.iter().all(|p| p.values.contains_key(&0)));
    Ok(())
}
