//! The Redis broker (`nnsight serve --redis URL`): a job through Redis equals the local run bit for bit; two
//! server processes on one Redis share its queue and both run jobs; a process killed (SIGKILL) in the middle of a
//! job loses nothing: the job is taken over and completes on the other, and its result is stored and reported once.
//! Jobs waiting in the stream run co-batched, as in the in-process queue (each job's result and end its own).
//!
//! Each test starts its own `redis-server` (Debian's package, installed by `scripts/setup.sh redis`; a test fails,
//! never skips, without it) on a free loopback port, with no persistence, killed when the test ends. The server
//! processes are the `nnsight` binary with every linear layer through `at::linear` and one libtorch thread
//! (`OMP_NUM_THREADS=1`), as this process's side of the comparisons, so results compare bit for bit.

use crate::common;
use nnsight::graph::Value;
use nnsight::graph::{BinaryOp, Graph, NodeId, Op, Point, TensorOp};
use nnsight::interleave::Finished;
use nnsight::models::AutoModel;
use nnsight::nn::fast_linear;
use nnsight::prelude::*;
use nnsight::remote::execute::execute;
use nnsight::remote::protocol::Job;
use nnsight::remote::server::model_info;
use nnsight::remote::{
    BatchCounters, CoBatch, JobState, Limits, RedisOptions, RedisQueue, Remote, ServeOptions, Server,
};
use nnsight::Error;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A `redis-server` of the test's own, killed (and waited for) when dropped, also when the test panics.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start() -> RedisServer {
        for _ in 0..5 {
            // A port free a moment ago; if another process takes it first, redis-server exits and we try again.
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let child = match child {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                    "redis-server is not installed, and the broker tests need it: run `scripts/setup.sh redis` \
                     (or `make setup-redis`; it installs Debian's redis-server package with apt-get)"
                ),
                Err(e) => panic!("cannot start redis-server: {e}"),
            };
            let mut server = RedisServer { child, port };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = server.child.try_wait() {
                    break; // exited: the port was taken
                }
                if server.connection().is_some() {
                    return server;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("redis-server did not start on a free loopback port");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn connection(&self) -> Option<redis::Connection> {
        let mut c = redis::Client::open(self.url()).ok()?.get_connection().ok()?;
        redis::cmd("PING").query::<String>(&mut c).ok()?;
        Some(c)
    }

    /// A field of a job's record (`P:job:ID`, `P` = `nnsight`).
    fn job_field(&self, id: &str, field: &str) -> Option<String> {
        let mut c = self.connection()?;
        redis::cmd("HGET").arg(format!("nnsight:job:{id}")).arg(field).query(&mut c).ok()?
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The API key of the server processes.
const KEY: &str = "k1";

/// `nnsight serve --redis URL --co-batch off` serving tiny GPT-2 as `tiny` with the key [`KEY`], as a child
/// process killed when dropped; what it writes on stderr after it starts is kept (and shown).
struct ServeProcess {
    child: Child,
    url: String,
    said: Arc<Mutex<Vec<String>>>,
}

impl ServeProcess {
    fn start(redis: &RedisServer) -> ServeProcess {
        let model = format!("{}=tiny", common::data("tiny-gpt2").to_string_lossy());
        let mut child = Command::new(env!("CARGO_BIN_EXE_nnsight"))
            .args(["serve", "--model", &model, "--listen", "127.0.0.1:0", "--redis", &redis.url()])
            .args(["--reclaim-after", "2"])
            // Each slow job alone: two submitted together could otherwise merge on one process.
            .args(["--co-batch", "off"])
            .env("NNSIGHT_QUIET", "1")
            .env("NNSIGHT_LINEAR", "aten")
            .env("OMP_NUM_THREADS", "1")
            .env_remove("NNSIGHT_NO_ONEDNN")
            .env("NNSIGHT_API_KEYS", KEY)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start `nnsight serve`");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut url = None;
        let mut said = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap_or_default();
            if let Some(rest) = line.strip_prefix("serving tiny at ") {
                url = rest.split_whitespace().next().map(String::from);
                assert!(line.contains("jobs shared through Redis"), "{line}");
                break;
            }
            said.push(line);
        }
        let url = url.unwrap_or_else(|| panic!("`nnsight serve --redis` did not start: {said:?}"));
        // The rest of what it says is read (so it never blocks on a full pipe), kept and shown.
        let kept = Arc::new(Mutex::new(Vec::new()));
        let keep = kept.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(|l| l.ok()) {
                eprintln!("[nnsight serve] {line}");
                keep.lock().unwrap().push(line);
            }
        });
        ServeProcess { child, url, said: kept }
    }

    fn remote(&self) -> Remote {
        Remote::new(self.url.as_str(), "tiny").key(KEY)
    }

    /// Its log lines about job `id`.
    fn job_lines(&self, id: &str) -> Vec<String> {
        let needle = format!("\"{id}\"");
        self.said
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("nnsight::job") && l.contains(&needle))
            .cloned()
            .collect()
    }

    /// `GET path` with the key: the status and the body.
    fn get(&self, path: &str) -> (u16, String) {
        match ureq::get(&format!("{}{path}", self.url)).set("Authorization", &format!("Bearer {KEY}")).call() {
            Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
            Err(e) => panic!("transport: {e}"),
        }
    }

    /// A sample of its `/metrics`.
    fn metric(&self, line_start: &str) -> f64 {
        let (code, text) = self.get("/metrics");
        assert_eq!(code, 200, "{text}");
        text.lines().find_map(|l| l.strip_prefix(line_start).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
    }

    /// Its consumer name ends in its process id.
    fn runs(&self, worker: &str) -> bool {
        worker.ends_with(&format!("-{}", self.child.id()))
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tiny() -> LanguageModel<Gpt2> {
    LanguageModel::<Gpt2>::load_with(common::data("tiny-gpt2"), common::opts()).unwrap()
}

const PROMPT: &str = "one two three four five six seven eight nine ten";

/// A slow job on tiny GPT-2 (a second or more here): `rounds` matrix products of the ~2000 hidden values' outer
/// sum, summed, and the logits saved.
fn slow_job(model: &LanguageModel<Gpt2>, rounds: usize) -> Job {
    assert!(model.encode(PROMPT).unwrap().len() >= 24, "a few thousand hidden values");
    let graph = nnsight::graph::capture_graphs(|| -> nnsight::Result<()> {
        intervene!(model.scan(PROMPT) {
            let h = model.transformer.h[0].output.reshape([-1]);
            let m = (h.reshape([-1, 1]) + h.reshape([1, -1])) / 2048.0;
            let mut acc = m.sum();
            for _ in 0..rounds {
                acc = acc + m.matmul(m).mean();
            }
            let _ = acc.save();
            let _ = model.lm_head.output.save();
        });
        Ok(())
    })
    .1
    .pop()
    .expect("the scan's graph");
    Job::Trace { graph, inputs: vec![Some(PROMPT.into())], edits: vec![] }
}

/// The job run here, with `at::linear` as the servers.
fn local_run(model: &LanguageModel<Gpt2>, job: &Job) -> Finished {
    fast_linear::set_linear_mode(Some(fast_linear::LinearMode::Aten));
    let out = execute(model, job, &Limits::default(), &AtomicBool::new(false));
    fast_linear::set_linear_mode(None);
    out.expect("the local run")
}

fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Tensor(a), Value::Tensor(b)) => a.kind() == b.kind() && a.size() == b.size() && a.equal(b),
        (Value::Scalar(a), Value::Scalar(b)) => a.to_bits() == b.to_bits(),
        (Value::Tuple(a), Value::Tuple(b)) => a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same_value(a, b)),
        (Value::Map(a), Value::Map(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|((ka, a), (kb, b))| ka == kb && same_value(a, b))
        }
        _ => false,
    }
}

/// Every saved value bit for bit equal.
fn assert_same(got: &Finished, expected: &Finished) {
    assert!(!expected.values.is_empty());
    assert_eq!(got.values.len(), expected.values.len());
    for (node, value) in &expected.values {
        assert!(got.values.get(node).is_some_and(|g| same_value(g, value)), "node {node:?} differs");
    }
}

/// Polls `what` every 10 ms until it holds (at most `secs`).
fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_job_through_redis_equals_the_local_run_bit_for_bit() -> nnsight::Result<()> {
    let redis = RedisServer::start();
    let served = LanguageModel::<AutoModel>::load_with(common::smollm2_path(), common::opts())?;
    let options = ServeOptions { listen: "127.0.0.1:0".parse().unwrap(), ..ServeOptions::default() };
    let server = RedisQueue::serve(vec![("smollm2".into(), vec![served])], options, RedisOptions::new(redis.url()))?;
    let guard = common::smollm2();
    let model = &*guard;
    let r = Remote::new(server.url(), "smollm2");
    let prompt = "The Eiffel Tower is in the city of";
    intervene!(model.trace(prompt) {
        let h = model.model.layers[5].output.save();
        model.model.layers[10].mlp.output = model.model.layers[10].mlp.output * 0.5;
        let out = model.output.save();
    });
    let (run, lines) = nnsight::interleave::capture_logs(|| -> nnsight::Result<(Tensor, Tensor)> {
        intervene!(model.trace(prompt).remote(&r) {
            log!(model.model.layers[0].output.norm());
            let rh = model.model.layers[5].output.save();
            model.model.layers[10].mlp.output = model.model.layers[10].mlp.output * 0.5;
            let rout = model.output.save();
        });
        Ok((rh, rout))
    });
    let (rh, rout) = run?;
    assert!(rh.equal(&h) && rout.equal(&out), "bit-identical to the local run");
    assert_eq!(lines.len(), 1, "the log line came through Redis once: {lines:?}");
    Ok(())
}

/// Matrix products in the slow job: about 2 s of one core here (AMD EPYC), longer under load.
const ROUNDS: usize = 8;

#[test]
fn two_server_processes_share_one_queue_and_both_run_jobs() -> nnsight::Result<()> {
    let redis = RedisServer::start();
    let (a, b) = (ServeProcess::start(&redis), ServeProcess::start(&redis));
    let model = tiny();
    let job = slow_job(&model, ROUNDS);
    let (ra, rb) = (a.remote(), b.remote());
    // Two slow jobs at once: while one process runs the first, the second can only go to the other.
    let first = ra.submit(job.clone())?;
    let second = rb.submit(job.clone())?;
    // Each followed through the process it was not submitted to: any process answers for any job.
    let (one, two) = (rb.wait(&first)?, ra.wait(&second)?);
    let expected = local_run(&model, &job);
    assert_same(&one, &expected);
    assert_same(&two, &expected);
    let ran: Vec<String> = [&first, &second].iter().map(|id| redis.job_field(id, "finished_by").unwrap()).collect();
    assert!(
        ran.iter().any(|w| a.runs(w)) && ran.iter().any(|w| b.runs(w)),
        "each process ran one of the jobs: {ran:?} (processes {} and {})",
        a.child.id(),
        b.child.id()
    );
    // Each process counts the job its worker ran, and serves its health and the shared queue's length.
    let completed = "nnsight_jobs_total{model=\"tiny\",outcome=\"completed\"}";
    assert_eq!((a.metric(completed), b.metric(completed)), (1.0, 1.0));
    assert_eq!(a.metric("nnsight_queue_length{model=\"tiny\"}"), 0.0);
    assert_eq!(b.metric("nnsight_jobs_submitted_total{model=\"tiny\"}"), 1.0);
    assert_eq!(a.get("/healthz"), (200, r#"{"status":"ok"}"#.to_string()));
    Ok(())
}

#[test]
fn a_server_killed_in_the_middle_of_a_job_loses_nothing() -> nnsight::Result<()> {
    let redis = RedisServer::start();
    let mut servers = vec![ServeProcess::start(&redis), ServeProcess::start(&redis)];
    let model = tiny();
    let job = slow_job(&model, ROUNDS);
    let id = servers[0].remote().submit(job.clone())?;
    let mut worker = String::new();
    wait_until(60, "the job runs", || match (redis.job_field(&id, "state"), redis.job_field(&id, "worker")) {
        (Some(state), Some(w)) if state == "running" => {
            worker = w;
            true
        }
        _ => false,
    });
    let k = servers.iter().position(|s| s.runs(&worker)).expect("one of the two processes runs the job");
    let mut victim = servers.remove(k);
    let survivor = servers.pop().unwrap();
    // The client follows the job through the survivor, from before the kill to its end.
    let (remote, followed) = (survivor.remote(), id.clone());
    let follower = std::thread::spawn(move || {
        let mut states = Vec::new();
        let finished = remote.wait_with(&followed, &mut |s| states.push(s.state));
        (finished, states)
    });
    victim.child.kill().expect("SIGKILL the process running the job");
    victim.child.wait().unwrap();
    assert_eq!(redis.job_field(&id, "state").as_deref(), Some("running"), "killed before the job ended");

    let (finished, states) = follower.join().expect("the follower");
    let finished = finished?;
    assert_same(&finished, &local_run(&model, &job));
    // One completion, seen once; the job ran twice (started on the killed process, then on the survivor).
    assert_eq!(states.iter().filter(|s| s.is_final()).count(), 1, "{states:?}");
    assert_eq!(states.last(), Some(&JobState::Completed), "{states:?}");
    assert!(survivor.runs(&redis.job_field(&id, "finished_by").unwrap()), "the survivor finished it");
    assert_eq!(redis.job_field(&id, "starts").as_deref(), Some("2"));
    let mut c = redis.connection().unwrap();
    let events: Vec<String> =
        redis::cmd("LRANGE").arg(format!("nnsight:job:{id}:events")).arg(0).arg(-1).query(&mut c).unwrap();
    assert_eq!(events.iter().filter(|e| e.starts_with("end\n")).count(), 1, "{events:?}");
    // Nothing is left in the queue, nothing pending.
    let left: u64 = redis::cmd("XLEN").arg("nnsight:queue:tiny").query(&mut c).unwrap();
    assert_eq!(left, 0);
    // The result is fetched again, the same.
    assert_same(&survivor.remote().fetch(&id)?, &finished);
    // The survivor logged the job once: its id, the model, the key's id (never the key), its outcome.
    let lines = survivor.job_lines(&id);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let key_id = nnsight::remote::server::key_id(KEY);
    for part in
        ["model=\"tiny\"", &format!("key=\"{key_id}\""), "outcome=\"completed\"", "rows=1", "queue_ms=", "run_ms="]
    {
        assert!(lines[0].contains(part), "{part} in {}", lines[0]);
    }
    Ok(())
}

#[test]
fn an_unreachable_redis_is_a_clear_error() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("redis://127.0.0.1:{port}");
    let err =
        RedisQueue::start(vec![("tiny".to_string(), vec![tiny()])], 4, Limits::default(), RedisOptions::new(&url))
            .err()
            .expect("no Redis there");
    let text = err.to_string();
    assert!(matches!(&err, Error::Broker { url: u, .. } if u == &url), "{err:?}");
    assert!(text.contains(&format!("cannot reach Redis at {url}")) && text.contains("redis-server"), "{text}");
    // A password in the URL is never shown.
    let err = RedisQueue::start(
        vec![("tiny".to_string(), vec![tiny()])],
        4,
        Limits::default(),
        RedisOptions::new(format!("redis://:hunter2@127.0.0.1:{port}")),
    )
    .err()
    .expect("no Redis there");
    assert!(!err.to_string().contains("hunter2"), "{err}");

    let model = format!("{}=tiny", common::data("tiny-gpt2").to_string_lossy());
    let out = Command::new(env!("CARGO_BIN_EXE_nnsight"))
        .args(["serve", "--model", &model, "--listen", "127.0.0.1:0", "--redis", &url])
        .env("NNSIGHT_QUIET", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("cannot reach Redis at {url}")), "{stderr}");
}

/// Serves tiny GPT-2 as `tiny` in this process with its jobs in `redis`, batching as `policy` says: the server and
/// its workers' counters.
fn serve_here(redis: &RedisServer, policy: CoBatch, limits: Limits) -> (Server, Arc<BatchCounters>) {
    let served = tiny();
    let info = model_info("tiny", &served).expect("describe the model");
    let models = vec![("tiny".to_string(), vec![served])];
    let queue = RedisQueue::start_with(models, 64, limits.clone(), RedisOptions::new(redis.url()), policy)
        .expect("join the broker");
    let counters = queue.counters("tiny").expect("the model's counters");
    (common::serve_queue(Box::new(queue), info, policy, limits), counters)
}

/// Batches of exactly `rows` rows: a worker waits up to 20 s for them, so what merges is decided by the policy.
fn batches_of(rows: usize) -> CoBatch {
    CoBatch { enabled: true, max_rows: rows, max_wait: Duration::from_secs(20) }
}

fn read(g: &mut Graph, module: &str) -> NodeId {
    g.push(Op::Read { module: module.into(), point: Point::Output, call: 0 }, 0)
}

/// A user's experiment on tiny GPT-2: layer 0's output scaled by `factor`, layer 1's output and the logits saved.
fn experiment(factor: f64) -> Job {
    let mut g = Graph::default();
    let h0 = read(&mut g, "transformer.h.0");
    let scaled = g.push(
        Op::Tensor(TensorOp::BinaryScalar { kind: BinaryOp::Mul, a: h0, scalar: factor, scalar_first: false }),
        0,
    );
    g.push(
        Op::Write { module: "transformer.h.0".into(), point: Point::Output, call: 0, value: scaled, index: None },
        0,
    );
    let h1 = read(&mut g, "transformer.h.1");
    g.push(Op::Save { value: h1 }, 0);
    let out = read(&mut g, "lm_head");
    g.push(Op::Save { value: out }, 0);
    Job::Trace { graph: g, inputs: vec![Some("Hello world".into())], edits: vec![] }
}

/// The largest difference between two runs' saved values (the same nodes in both).
fn max_diff(a: &Finished, b: &Finished) -> f64 {
    assert!(!b.values.is_empty());
    assert_eq!(a.values.len(), b.values.len());
    let mut worst = 0.0f64;
    for (id, v) in &b.values {
        let (x, y) = (a.values[id].tensor().unwrap(), v.tensor().unwrap());
        assert_eq!(x.size(), y.size(), "node {id}");
        worst = worst.max(common::max_abs_diff(x, y));
    }
    worst
}

/// A job's events as Redis holds them (`name\ndata`).
fn stored_events(redis: &RedisServer, id: &str) -> Vec<String> {
    let mut c = redis.connection().unwrap();
    redis::cmd("LRANGE").arg(format!("nnsight:job:{id}:events")).arg(0).arg(-1).query(&mut c).unwrap()
}

/// A sample of the server's `/metrics` (served without keys).
fn metric(server: &Server, line_start: &str) -> f64 {
    let text = ureq::get(&format!("{}/metrics", server.url())).call().unwrap().into_string().unwrap();
    text.lines().find_map(|l| l.strip_prefix(line_start).and_then(|v| v.trim().parse().ok())).unwrap_or(-1.0)
}

/// Within float noise, as in `serve_batching`: a merged job's rows are computed in a product of more rows.
const TOLERANCE: f64 = 1e-4;

#[test]
fn jobs_waiting_in_redis_run_as_one_batch_and_each_equals_its_run_alone() {
    common::init();
    let redis = RedisServer::start();
    let (server, counters) = serve_here(&redis, batches_of(4), Limits::default());
    let r = Remote::new(server.url(), "tiny");
    let jobs: Vec<Job> = (0..4).map(|k| experiment(1.0 + k as f64 / 4.0)).collect();
    let ids: Vec<String> = jobs.iter().map(|j| r.submit(j.clone()).unwrap()).collect();
    let model = tiny();
    for (job, id) in jobs.iter().zip(&ids) {
        let got = r.wait(id).expect("a job of the batch");
        let d = max_diff(&got, &nnsight::exec::run_job(&model, job, None).unwrap());
        assert!(d <= TOLERANCE, "{id}: {d}");
        // Its own events: it ran in the batch of four, and ended once.
        let events = stored_events(&redis, id);
        assert_eq!(events.iter().filter(|e| e.starts_with("batch\n{\"jobs\":4")).count(), 1, "{events:?}");
        assert_eq!(events.iter().filter(|e| e.starts_with("end\n")).count(), 1, "{events:?}");
    }
    assert_eq!(counters.recent_sizes(), vec![4], "the four jobs ran as one batch");
    assert_eq!((counters.merged_jobs(), counters.reruns()), (4, 0));
    assert_eq!(metric(&server, "nnsight_batches_total{model=\"tiny\"}"), 1.0);
    assert_eq!(metric(&server, "nnsight_merged_jobs_total{model=\"tiny\"}"), 4.0);
    assert_eq!(metric(&server, "nnsight_jobs_total{model=\"tiny\",outcome=\"completed\"}"), 4.0);
    // Every entry acknowledged and deleted: nothing waits, nothing is pending.
    let mut c = redis.connection().unwrap();
    let left: u64 = redis::cmd("XLEN").arg("nnsight:queue:tiny").query(&mut c).unwrap();
    assert_eq!(left, 0);
}

#[test]
fn a_failing_job_in_a_redis_batch_leaves_the_others_as_they_are_alone() {
    common::init();
    let redis = RedisServer::start();
    let (server, counters) = serve_here(&redis, batches_of(3), Limits::default());
    let r = Remote::new(server.url(), "tiny");
    // Fails at run time: layer 0's output [1, 2, 64] reshaped to 7 rows.
    let mut g = Graph::default();
    let h0 = read(&mut g, "transformer.h.0");
    let bad = g.push(Op::Tensor(TensorOp::Reshape { a: h0, shape: vec![7, -1] }), 0);
    g.push(Op::Save { value: bad }, 0);
    let failing = Job::Trace { graph: g, inputs: vec![Some("Hello world".into())], edits: vec![] };
    let good = [experiment(0.5), experiment(2.0)];
    let ids = [r.submit(good[0].clone()).unwrap(), r.submit(failing).unwrap(), r.submit(good[1].clone()).unwrap()];
    let err = r.wait(&ids[1]).expect_err("the failing job fails").to_string();
    assert!(err.to_lowercase().contains("reshape"), "{err}");
    let model = tiny();
    for (job, id) in good.iter().zip([&ids[0], &ids[2]]) {
        // Run again alone after the batch failed: bit for bit the job's run alone.
        let got = r.wait(id).expect("a good job of the batch");
        assert_eq!(max_diff(&got, &nnsight::exec::run_job(&model, job, None).unwrap()), 0.0, "{id}");
    }
    for id in &ids {
        let events = stored_events(&redis, id);
        assert!(events.iter().any(|e| e.starts_with("batch\n") && e.contains("\"rerun\":true")), "{events:?}");
        assert_eq!(events.iter().filter(|e| e.starts_with("end\n")).count(), 1, "{events:?}");
    }
    assert_eq!(counters.recent_sizes(), vec![3], "the three jobs were tried as one batch");
    assert_eq!((counters.merged_jobs(), counters.reruns()), (0, 3));
    assert_eq!(metric(&server, "nnsight_batch_reruns_total{model=\"tiny\"}"), 3.0);
}

#[test]
fn generations_through_redis_join_a_running_continuous_batch() -> nnsight::Result<()> {
    common::init();
    let redis = RedisServer::start();
    let served = LanguageModel::<Llama>::load_with(common::smollm2_path(), common::opts())?;
    let info = model_info("smollm2", &served)?;
    let (limits, policy) = (Limits::default(), CoBatch::default());
    let models = vec![("smollm2".to_string(), vec![served])];
    let queue = RedisQueue::start_with(models, 64, limits.clone(), RedisOptions::new(redis.url()), policy)?;
    let counters = queue.counters("smollm2").expect("the model's counters");
    let server = common::serve_queue(Box::new(queue), info, policy, limits);
    let r = Remote::new(server.url(), "smollm2");
    let generation = |prompt: &str, n: usize| {
        let mut g = Graph::default();
        let ids = g.push(Op::Generated, 0);
        g.push(Op::Save { value: ids }, 0);
        let options = nnsight::GenerateOptions::new().max_new_tokens(n).stop_ids([]);
        Job::Generate { graph: g, inputs: vec![Some(prompt.into())], options, edits: vec![] }
    };
    // A long generation first; two more arrive while it decodes and join it between steps.
    let jobs = [
        generation("The Eiffel Tower is in the city of", 80),
        generation("Madrid is", 10),
        generation("One, two, three, four, five,", 12),
    ];
    let first = r.submit(jobs[0].clone())?;
    std::thread::sleep(Duration::from_millis(200));
    let rest: Vec<String> = jobs[1..].iter().map(|j| r.submit(j.clone())).collect::<nnsight::Result<_>>()?;
    let guard = common::smollm2();
    for (job, id) in jobs.iter().zip(std::iter::once(&first).chain(&rest)) {
        let got = r.wait(id)?;
        let alone = nnsight::exec::run_job(&*guard, job, None)?;
        assert_same(&got, &alone);
    }
    assert_eq!(counters.continuous_jobs(), 3);
    let (steps, rows) = (counters.decode_steps(), counters.decode_step_rows());
    assert!(rows > steps + 10, "{rows} rows in {steps} steps: the later jobs joined the running one");
    Ok(())
}
