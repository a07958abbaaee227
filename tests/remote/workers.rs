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
