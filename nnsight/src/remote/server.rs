//! The model server: hosts loaded models over HTTP (axum on tokio), runs clients' graphs on them in worker
//! threads, one queue per model, and streams each job's events.
//!
//! Endpoints (every one needs `Authorization: Bearer KEY` when keys are configured):
//!
//! | method and path | what |
//! |---|---|
//! | `GET /v1/models` | the models' names and architectures, and the protocol version |
//! | `GET /v1/models/NAME` | a model's configuration, tokenizer and parameter shapes ([`ModelInfo`]) |
//! | `POST /v1/jobs` | a request (safetensors bytes, see [`super::protocol`]): `202 {"id"}`, or an error |
//! | `GET /v1/jobs/ID` | the job's state ([`JobStatus`](super::JobStatus)) |
//! | `GET /v1/jobs/ID/events` | server-sent events: `status`, `log` (a `log!` line), `value` (a `send!`), `end` |
//! | `GET /v1/jobs/ID/result` | the saved values (safetensors bytes), once completed |
//! | `GET /metrics` | this process's job figures, Prometheus text (`server/metrics.rs`) |
//! | `GET /healthz` | `{"status":"ok"}`, or 503 when the queue's store does not answer; no key needed |
//!
//! Errors are JSON [`WireError`]s with a fitting status: 401 (key), 400 (malformed, unknown op or function,
//! another protocol version), 404 (model, job), 413 (request bytes), 422 (over a limit, or the job failed), 503
//! (queue full, with `Retry-After`).
//!
//! This file holds what touches the hosted models ([`Hosted`]: a `LanguageModel` is one): starting and stopping a
//! server, and the in-process queue ([`LocalQueue`], whose worker threads own the models and run their jobs). The rest is one thing per file:
//! `server/routes.rs` (the route table, the handlers and the jobs they remember), `server/auth.rs` (the key check,
//! one layer over the routes), `server/jobs.rs` (a job's record and the [`JobQueue`] interface),
//! `server/cobatch.rs` (waiting jobs run together as one batch: [`CoBatch`]) and `server/continuous.rs` (generation
//! jobs joining and leaving one batch between decode steps).

mod auth;
mod cobatch;
mod continuous;
mod jobs;
mod metrics;
mod redis;
mod routes;

pub use self::redis::{RedisOptions, RedisQueue, MAX_STARTS, STATE_TTL};
pub use cobatch::{run_jobs, BatchCounters, CoBatch};
pub use jobs::{JobQueue, JobRecord, JobStore, QueueFull, QueuedJob, StoreError};
pub use metrics::{key_id, JobFacts, Metrics};
pub use routes::RESULT_TTL;

use super::execute::{execute, Hosted, Limits};
use super::protocol;
use super::wire::{json, JobState, ModelInfo, SentValue, WireError};
use crate::graph::TensorData;
use crate::{Error, Result};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a server is run.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where it listens (default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// The API keys it accepts. With none it serves only on a loopback address, to anyone on this machine.
    pub keys: Vec<String>,
    /// What one request may ask for.
    pub limits: Limits,
    /// How many jobs may wait for each model; more are refused with "busy" (default 64).
    pub queue: usize,
    /// How a model's worker runs the jobs waiting for it together ([`CoBatch`]; on by default).
    pub co_batch: CoBatch,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            keys: Vec::new(),
            limits: Limits::default(),
            queue: 64,
            co_batch: CoBatch::default(),
        }
    }
}

impl ServeOptions {
    /// The keys of a file (one per line; empty lines and lines starting with `#` are skipped).
    pub fn keys_from_file(path: &std::path::Path) -> Result<Vec<String>> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Ok(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect())
    }
}

/// The in-process queue: a bounded channel and worker threads per model; a worker takes the jobs waiting for its
/// model and runs them, together where they can merge ([`CoBatch`]).
pub struct LocalQueue {
    senders: HashMap<String, SyncSender<QueuedJob>>,
    stats: Arc<HashMap<String, QueueStats>>,
    counters: HashMap<String, Arc<BatchCounters>>,
}

/// A model's queue length and mean job time (for "retry after").
#[derive(Default)]
struct QueueStats {
    waiting: AtomicU64,
    mean_ms: AtomicU64,
}

impl LocalQueue {
    /// Starts a worker per model, each with a queue of `capacity` jobs; jobs run within `limits`.
    pub fn start<H: Hosted>(models: Vec<(String, H)>, capacity: usize, limits: Limits) -> Self {
        Self::start_pools(models.into_iter().map(|(n, m)| (n, vec![m])).collect(), capacity, limits)
    }

    /// Starts a worker per copy of each model (so that as many of its jobs run at once), the copies of a model
    /// sharing one queue of `capacity` jobs; jobs run within `limits`, co-batched as [`CoBatch::default`] says.
    /// Copies may be handles of one model ([`crate::SharedModel`]): then its weights are loaded once.
    pub fn start_pools<H: Hosted>(models: Vec<(String, Vec<H>)>, capacity: usize, limits: Limits) -> Self {
        Self::start_pools_with(models, capacity, limits, CoBatch::default())
    }

    /// [`LocalQueue::start_pools`], co-batching as `policy` says.
    pub fn start_pools_with<H: Hosted>(
        models: Vec<(String, Vec<H>)>,
        capacity: usize,
        limits: Limits,
        policy: CoBatch,
    ) -> Self {
        let stats: Arc<HashMap<String, QueueStats>> = Arc::new(
            models
                .iter()
                .map(|(n, _)| (n.clone(), QueueStats { waiting: AtomicU64::new(0), mean_ms: AtomicU64::new(1000) }))
                .collect(),
        );
        let mut senders = HashMap::new();
        let mut all_counters = HashMap::new();
        for (name, copies) in models {
            let counters = Arc::new(BatchCounters::default());
            all_counters.insert(name.clone(), counters.clone());
            let (tx, rx) = sync_channel::<QueuedJob>(capacity.max(1));
            let rx = Arc::new(Mutex::new(rx));
            let workers = copies.len().max(1) as u64;
            for (i, model) in copies.into_iter().enumerate() {
                let (stats, limits, label, rx) = (stats.clone(), limits.clone(), name.clone(), rx.clone());
                let counters = counters.clone();
                std::thread::Builder::new()
                    .name(format!("nnsight-worker-{name}-{i}"))
                    .spawn(move || {
                        let mine = &stats[&label];
                        loop {
                            // One worker waits on the queue at a time (and gathers a batch); the lock is let go
                            // before the jobs run.
                            let taken = {
                                let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
                                let Ok(first) = rx.recv() else { return };
                                cobatch::gather(&model, first, &rx, &policy, &limits)
                            };
                            let n = taken.len() as u64;
                            mine.waiting.fetch_sub(n, Ordering::Relaxed);
                            let started = Instant::now();
                            // What waits in the queue now, for a continuous batch between two decode steps
                            // (never waiting: another worker may hold the queue, waiting for a job).
                            let mut more = || -> Vec<QueuedJob> {
                                let Ok(rx) = rx.try_lock() else { return Vec::new() };
                                let jobs: Vec<QueuedJob> = rx.try_iter().collect();
                                mine.waiting.fetch_sub(jobs.len() as u64, Ordering::Relaxed);
                                jobs
                            };
                            cobatch::run_taken(&model, taken, &limits, &policy, &counters, Some(&mut more));
                            // The mean time between two jobs ending, with every worker busy.
                            let ms = started.elapsed().as_millis() as u64 / n.max(1) / workers;
                            let old = mine.mean_ms.load(Ordering::Relaxed);
                            mine.mean_ms.store((old * 7 + ms) / 8, Ordering::Relaxed);
                        }
                    })
                    .expect("spawn a worker thread");
            }
            senders.insert(name, tx);
        }
        LocalQueue { senders, stats, counters: all_counters }
    }

    /// What `model`'s workers have run so far (batches, merged jobs); `None` for a model not served here.
    pub fn counters(&self, model: &str) -> Option<Arc<BatchCounters>> {
        self.counters.get(model).cloned()
    }
}

impl JobQueue for LocalQueue {
    fn models(&self) -> Vec<String> {
        let mut names: Vec<String> = self.senders.keys().cloned().collect();
        names.sort();
        names
    }

    fn observe(&self, metrics: Arc<Metrics>) {
        for (model, counters) in &self.counters {
            metrics.batches(model, counters.clone());
        }
    }

    fn push(&self, job: QueuedJob) -> std::result::Result<(), QueueFull> {
        let model = job.request.model.clone();
        let Some(tx) = self.senders.get(&model) else {
            let message = format!("no worker serves model `{model}`");
            job.record.set_state(JobState::Error, Some(WireError::Other { message }));
            return Ok(());
        };
        let stats = &self.stats[&model];
        // Counted before the send, so that the worker's decrement never comes first.
        stats.waiting.fetch_add(1, Ordering::Relaxed);
        match tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                let waiting = stats.waiting.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
                let ms = stats.mean_ms.load(Ordering::Relaxed).saturating_mul(waiting.max(1));
                Err(QueueFull { retry_after: Duration::from_millis(ms.max(1000)) })
            }
        }
    }
}

/// Runs `job` on `model` within `limits` on this thread, handing each `log!` line and `send!` value to `emit` as an
/// event (its name and JSON data) as they come; the result's bytes, or the job's error (a panic of the run fails
/// only the job). The in-process queue's workers and the Redis broker's run jobs through it.
pub(super) fn run_streaming<H: Hosted>(
    model: &H,
    job: &crate::exec::Job,
    limits: &Limits,
    cancel: &std::sync::atomic::AtomicBool,
    emit: impl Fn(&'static str, String) + Clone + 'static,
) -> std::result::Result<Vec<u8>, WireError> {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        with_events(emit, || execute(model, job, limits, cancel).and_then(|f| protocol::encode_result(&f)))
    }));
    match outcome {
        Ok(result) => result.map_err(|e| WireError::from(&e)),
        Err(panic) => {
            Err(WireError::Other { message: format!("the job failed: {}", crate::error::panic_text(&*panic)) })
        }
    }
}

/// Runs `f` with this thread's `log!` lines and `send!` values handed to `emit` as a job's events as they come
/// ([`log_event`], [`value_event`]): what every way of running a job streams.
pub(super) fn with_events<T>(emit: impl Fn(&'static str, String) + Clone + 'static, f: impl FnOnce() -> T) -> T {
    let (for_logs, for_values) = (emit.clone(), emit);
    crate::interleave::capture_logs_with(
        move |line| for_logs("log", log_event(&line)),
        || {
            crate::interleave::capture_sent(
                move |label, t| {
                    if let Some(data) = value_event(label, &t) {
                        for_values("value", data);
                    }
                },
                f,
            )
        },
    )
}

/// The data of a `log` event: `{"line": ..}`.
pub(super) fn log_event(line: &str) -> String {
    serde_json::json!({ "line": line }).to_string()
}

/// The data of a `value` event (a [`SentValue`]); `None` for a tensor that cannot travel.
pub(super) fn value_event(label: String, t: &tch::Tensor) -> Option<String> {
    let tensor = TensorData::from_tensor(t).ok()?;
    Some(json(&SentValue { label, tensor }).unwrap_or_default())
}

/// Ends a job's record with its outcome: its result bytes or its error.
fn settle(record: &JobRecord, outcome: std::result::Result<Vec<u8>, WireError>) {
    match outcome {
        Ok(bytes) => {
            *record.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(bytes));
            record.set_state(JobState::Completed, None);
        }
        Err(error) => record.set_state(JobState::Error, Some(error)),
    }
}

/// A running server; dropping it (or [`Server::stop`]) shuts it down.
pub struct Server {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Serves `models` (name, loaded model) as `options` say; returns once it listens. Refuses to listen on a
    /// non-loopback address without keys.
    pub fn start<H: Hosted>(models: Vec<(String, H)>, options: ServeOptions) -> Result<Server> {
        Self::start_pools(models.into_iter().map(|(n, m)| (n, vec![m])).collect(), options)
    }

    /// [`Server::start`] with several workers per model, one per copy given (each copy loaded once, or handles of
    /// one model: [`crate::SharedModel`]): that many of its batches run at once.
    pub fn start_pools<H: Hosted>(models: Vec<(String, Vec<H>)>, options: ServeOptions) -> Result<Server> {
        if options.keys.is_empty() && !options.listen.ip().is_loopback() {
            return Err(Error::InvalidInput {
                message: format!(
                    "refusing to serve on {} without API keys: give keys (--keys FILE or NNSIGHT_API_KEYS), or listen on a loopback address",
                    options.listen
                ),
            });
        }
        if models.is_empty() {
            return Err(Error::InvalidInput { message: "no model to serve".into() });
        }
        let mut infos = HashMap::new();
        for (name, copies) in &models {
            let Some(model) = copies.first() else {
                return Err(Error::InvalidInput { message: format!("no copy of model `{name}` to serve") });
            };
            infos.insert(name.clone(), model_info(name, model)?);
        }
        let queue = LocalQueue::start_pools_with(models, options.queue, options.limits.clone(), options.co_batch);
        Self::start_with(Box::new(queue), infos, options)
    }

    /// Serves the models of `queue` (described by `infos`) as `options` say.
    pub fn start_with(
        queue: Box<dyn JobQueue>,
        infos: HashMap<String, ModelInfo>,
        options: ServeOptions,
    ) -> Result<Server> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Error::Remote { message: format!("cannot start the server's runtime: {e}") })?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(options.listen))
            .map_err(|e| Error::Remote { message: format!("cannot listen on {}: {e}", options.listen) })?;
        let addr = listener.local_addr().map_err(|e| Error::Remote { message: e.to_string() })?;
        let app = routes::router(queue, infos, options.keys, options.limits);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("nnsight-server".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = rx.await;
                        })
                        .await;
                });
            })
            .map_err(|e| Error::Remote { message: format!("cannot start the server thread: {e}") })?;
        Ok(Server { addr, shutdown: Some(tx), thread: Some(thread) })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its URL (`http://addr`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Blocks until the server stops (it runs until the process ends).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Stops listening and waits for the server to end.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shut();
    }
}

/// A model's description for clients ([`Hosted::describe`]).
pub fn model_info<H: Hosted>(name: &str, model: &H) -> Result<ModelInfo> {
    model.describe(name)
}
