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
    let err = r.run(Job::Trace { graph: saving_graph(), inputs: vec![Some("Hi".into())], edits: vec![] }).unwrap_err();
    assert!(matches!(err, Error::Busy { retry_after_s: 3 }), "{err}");
    let raw =
        ureq::post(&format!("{}/v1/jobs", server.url())).send_bytes(&trace_request(saving_graph(), PROTOCOL_VERSION));
    let Err(ureq::Error::Status(503, response)) = raw else { panic!("expected 503") };
    assert_eq!(response.header("Retry-After"), Some("3"));
}

#[test]
fn an_unreachable_server_is_a_clear_error() {
    let r = Remote::new("http://127.0.0.1:9", "tiny").retries(0);
    let err = r.model_info().unwrap_err();
    assert!(err.to_string().contains("cannot reach the server at http://127.0.0.1:9"), "{err}");
}
