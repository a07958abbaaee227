//! A server's operations endpoints: `/healthz` (no key needed) and `/metrics` (Prometheus text, behind the key),
//! with the in-process queue. (The Redis broker's are checked in `redis_broker`.)

use crate::common;
use nnsight::models::AutoModel;
use nnsight::prelude::*;
use nnsight::remote::{Remote, ServeOptions, Server};
use nnsight::GenerateOptions;

fn get(url: &str, key: Option<&str>) -> (u16, String) {
    let mut req = ureq::get(url);
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    match req.call() {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("transport: {e}"),
    }
}

#[test]
fn health_and_metrics_count_the_jobs() -> nnsight::Result<()> {
    let served = LanguageModel::<AutoModel>::load_with(common::data("tiny-gpt2"), common::opts())?;
    let options =
        ServeOptions { listen: "127.0.0.1:0".parse().unwrap(), keys: vec!["k1".into()], ..ServeOptions::default() };
    let server = Server::start(vec![("tiny".into(), served)], options)?;
    let url = server.url();
    assert_eq!(get(&format!("{url}/healthz"), None), (200, r#"{"status":"ok"}"#.to_string()));
    assert_eq!(get(&format!("{url}/metrics"), None).0, 401, "the figures need the key");

    let model = LanguageModel::<Gpt2>::connect(&Remote::new(url.as_str(), "tiny").key("k1"))?;
    for _ in 0..2 {
        intervene!(model.trace("Hello world") {
            let _out = model.lm_head.output.save();
        });
    }
    // A job that fails on the server: an index past the hidden size.
    let failed = (|| -> nnsight::Result<()> {
        intervene!(model.trace("Hello world") {
            let _x = model.transformer.h[0].output.narrow(2, 60, 10).save();
        });
        Ok(())
    })();
    assert!(failed.is_err());
    // A generation: a continuous batch of its own, its prefill and then two decode steps of one row.
    model.generate("Hello", &GenerateOptions::new().max_new_tokens(3).stop_ids([]))?;

    let (code, text) = get(&format!("{url}/metrics"), Some("k1"));
    assert_eq!(code, 200);
    for line in [
        "nnsight_up 1",
        "nnsight_queue_length{model=\"tiny\"} 0",
        "nnsight_jobs_submitted_total{model=\"tiny\"} 4",
        "nnsight_jobs_total{model=\"tiny\",outcome=\"completed\"} 3",
        "nnsight_jobs_total{model=\"tiny\",outcome=\"error\"} 1",
        "nnsight_job_run_seconds_count{model=\"tiny\"} 4",
        "nnsight_job_queue_seconds_bucket{model=\"tiny\",le=\"+Inf\"} 4",
        // The three traces came one after another: three batches of one, none merged.
        "nnsight_batches_total{model=\"tiny\"} 3",
        "nnsight_batch_jobs_total{model=\"tiny\"} 3",
        "nnsight_merged_jobs_total{model=\"tiny\"} 0",
        "nnsight_batch_reruns_total{model=\"tiny\"} 0",
        "nnsight_continuous_jobs_total{model=\"tiny\"} 1",
        "nnsight_decode_steps_total{model=\"tiny\"} 2",
        "nnsight_decode_step_rows_total{model=\"tiny\"} 2",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
    }
    assert!(text.contains("# TYPE nnsight_job_run_seconds histogram"));
    Ok(())
}
