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
//! | `GET /v1/jobs/ID` | the job's state ([`JobStatus`]) |
//! | `GET /v1/jobs/ID/events` | server-sent events: `status`, `log` (a `log!` line), `value` (a `send!`), `end` |
//! | `GET /v1/jobs/ID/result` | the saved values (safetensors bytes), once completed |
//!
//! Errors are JSON [`WireError`]s with a fitting status: 401 (key), 400 (malformed, unknown op or function,
//! another protocol version), 404 (model, job), 413 (request bytes), 422 (over a limit, or the job failed), 503
//! (queue full, with `Retry-After`).

use super::execute::{execute, Limits};
use super::protocol::{self, decode_request};
use super::wire::{json, JobState, JobStatus, ModelInfo, SentValue, Submitted, WireError};
use crate::graph::TensorData;
use crate::models::AutoModel;
use crate::{Error, LanguageModel, Result};
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            keys: Vec::new(),
            limits: Limits::default(),
            queue: 64,
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

/// One job: its state, events and result, shared by the worker running it and the requests asking about it.
pub struct JobRecord {
    id: String,
    state: Mutex<(JobState, Option<WireError>)>,
    events: Mutex<Vec<(&'static str, String)>>,
    result: Mutex<Option<Arc<Vec<u8>>>>,
    changed: tokio::sync::Notify,
    cancel: AtomicBool,
    /// When it ended (its result is kept for [`RESULT_TTL`] after).
    ended: Mutex<Option<Instant>>,
}

impl JobRecord {
    fn new(id: String) -> Self {
        JobRecord {
            id,
            state: Mutex::new((JobState::Queued, None)),
            events: Mutex::new(vec![("status", r#"{"state":"queued"}"#.to_string())]),
            result: Mutex::new(None),
            changed: tokio::sync::Notify::new(),
            cancel: AtomicBool::new(false),
            ended: Mutex::new(None),
        }
    }

    /// Adds an event and wakes whoever follows the job.
    fn event(&self, name: &'static str, data: String) {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).push((name, data));
        self.changed.notify_waiters();
    }

    fn set_state(&self, state: JobState, error: Option<WireError>) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = (state, error.clone());
        let data = json(&JobStatus { id: self.id.clone(), state, error }).unwrap_or_default();
        self.event("status", data);
        if state.is_final() {
            *self.ended.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            self.event(
                "end",
                format!(r#"{{"state":"{}"}}"#, if state == JobState::Completed { "completed" } else { "error" }),
            );
        }
    }

    fn status(&self) -> JobStatus {
        let (state, error) = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        JobStatus { id: self.id.clone(), state, error }
    }
}

/// A job waiting for a worker of its model.
pub struct QueuedJob {
    /// Its record.
    pub record: Arc<JobRecord>,
    /// What to run.
    pub request: protocol::Request,
}

/// The queue is full: retry after this long.
#[derive(Debug, Clone, Copy)]
pub struct QueueFull {
    /// When to retry.
    pub retry_after: Duration,
}

/// Where submitted jobs wait for a worker. [`LocalQueue`] keeps them in this process, one worker thread per
/// model; a broker spreading jobs over many machines would implement this too.
pub trait JobQueue: Send + Sync {
    /// The names of the models jobs can be queued for.
    fn models(&self) -> Vec<String>;
    /// Hands `job` to a worker of its model (`Err`: the queue is full).
    fn push(&self, job: QueuedJob) -> std::result::Result<(), QueueFull>;
}

/// The in-process queue: a bounded channel and one worker thread per model; the thread owns the model and runs
/// its jobs one after another.
pub struct LocalQueue {
    senders: HashMap<String, SyncSender<QueuedJob>>,
    stats: Arc<HashMap<String, QueueStats>>,
}

/// A model's queue length and mean job time (for "retry after").
#[derive(Default)]
struct QueueStats {
    waiting: AtomicU64,
    mean_ms: AtomicU64,
}

impl LocalQueue {
    /// Starts a worker per model, each with a queue of `capacity` jobs; jobs run within `limits`.
    pub fn start(models: Vec<(String, LanguageModel<AutoModel>)>, capacity: usize, limits: Limits) -> Self {
        Self::start_pools(models.into_iter().map(|(n, m)| (n, vec![m])).collect(), capacity, limits)
    }

    /// Starts a worker per copy of each model (so that as many of its jobs run at once), the copies of a model
    /// sharing one queue of `capacity` jobs; jobs run within `limits`.
    pub fn start_pools(models: Vec<(String, Vec<LanguageModel<AutoModel>>)>, capacity: usize, limits: Limits) -> Self {
        let stats: Arc<HashMap<String, QueueStats>> = Arc::new(
            models
                .iter()
                .map(|(n, _)| (n.clone(), QueueStats { waiting: AtomicU64::new(0), mean_ms: AtomicU64::new(1000) }))
                .collect(),
        );
        let mut senders = HashMap::new();
        for (name, copies) in models {
            let (tx, rx) = sync_channel::<QueuedJob>(capacity.max(1));
            let rx = Arc::new(Mutex::new(rx));
            let workers = copies.len().max(1) as u64;
            for (i, model) in copies.into_iter().enumerate() {
                let (stats, limits, label, rx) = (stats.clone(), limits.clone(), name.clone(), rx.clone());
                std::thread::Builder::new()
                    .name(format!("nnsight-worker-{name}-{i}"))
                    .spawn(move || {
                        let mine = &stats[&label];
                        loop {
                            // One worker waits on the queue at a time; the lock is let go before the job runs.
                            let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                            let Ok(job) = next else { return };
                            mine.waiting.fetch_sub(1, Ordering::Relaxed);
                            let started = Instant::now();
                            run_job(&model, &job, &limits);
                            // The mean time between two jobs ending, with every worker busy.
                            let ms = started.elapsed().as_millis() as u64 / workers;
                            let old = mine.mean_ms.load(Ordering::Relaxed);
                            mine.mean_ms.store((old * 7 + ms) / 8, Ordering::Relaxed);
                        }
                    })
                    .expect("spawn a worker thread");
            }
            senders.insert(name, tx);
        }
        LocalQueue { senders, stats }
    }
}

impl JobQueue for LocalQueue {
    fn models(&self) -> Vec<String> {
        let mut names: Vec<String> = self.senders.keys().cloned().collect();
        names.sort();
        names
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

/// Runs one job on the worker's thread: events stream as it runs, and a panic in it fails only the job.
fn run_job(model: &LanguageModel<AutoModel>, job: &QueuedJob, limits: &Limits) {
    let record = job.record.clone();
    record.set_state(JobState::Running, None);
    let (for_logs, for_values) = (record.clone(), record.clone());
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        crate::interleave::capture_logs_with(
            move |line| for_logs.event("log", serde_json::json!({ "line": line }).to_string()),
            || {
                crate::interleave::capture_sent(
                    move |label, t| {
                        if let Ok(tensor) = TensorData::from_tensor(&t) {
                            for_values.event("value", json(&SentValue { label, tensor }).unwrap_or_default());
                        }
                    },
                    || {
                        execute(model, &job.request.job, limits, &record.cancel)
                            .and_then(|f| protocol::encode_result(&f))
                    },
                )
            },
        )
    }));
    match outcome {
        Ok(Ok(bytes)) => {
            *record.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(bytes));
            record.set_state(JobState::Completed, None);
        }
        Ok(Err(e)) => record.set_state(JobState::Error, Some(WireError::from(&e))),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            record.set_state(JobState::Error, Some(WireError::Other { message: format!("the job failed: {what}") }));
        }
    }
}

/// What the HTTP handlers share.
struct AppState {
    queue: Box<dyn JobQueue>,
    infos: HashMap<String, ModelInfo>,
    keys: Vec<String>,
    limits: Limits,
    jobs: Mutex<HashMap<String, Arc<JobRecord>>>,
    /// Job ids in submission order (the oldest finished ones are forgotten past [`KEEP_JOBS`]).
    order: Mutex<std::collections::VecDeque<String>>,
    next: AtomicU64,
}

/// How many jobs the server remembers.
const KEEP_JOBS: usize = 4096;

/// How long a finished job's result is kept (then fetching it is an error saying so; its state stays).
pub const RESULT_TTL: Duration = Duration::from_secs(15 * 60);

/// A running server; dropping it (or [`Server::stop`]) shuts it down.
pub struct Server {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Serves `models` (name, loaded model) as `options` say; returns once it listens. Refuses to listen on a
    /// non-loopback address without keys.
    pub fn start(models: Vec<(String, LanguageModel<AutoModel>)>, options: ServeOptions) -> Result<Server> {
        Self::start_pools(models.into_iter().map(|(n, m)| (n, vec![m])).collect(), options)
    }

    /// [`Server::start`] with several copies of a model (loaded once each): that many of its jobs run at once.
    pub fn start_pools(models: Vec<(String, Vec<LanguageModel<AutoModel>>)>, options: ServeOptions) -> Result<Server> {
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
        let queue = LocalQueue::start_pools(models, options.queue, options.limits.clone());
        Self::start_with(Box::new(queue), infos, options)
    }

    /// Serves the models of `queue` (described by `infos`) as `options` say.
    pub fn start_with(
        queue: Box<dyn JobQueue>,
        infos: HashMap<String, ModelInfo>,
        options: ServeOptions,
    ) -> Result<Server> {
        let state = Arc::new(AppState {
            queue,
            infos,
            keys: options.keys,
            limits: options.limits,
            jobs: Mutex::new(HashMap::new()),
            order: Mutex::new(Default::default()),
            next: AtomicU64::new(1),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Error::Remote { message: format!("cannot start the server's runtime: {e}") })?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(options.listen))
            .map_err(|e| Error::Remote { message: format!("cannot listen on {}: {e}", options.listen) })?;
        let addr = listener.local_addr().map_err(|e| Error::Remote { message: e.to_string() })?;
        let app = Router::new()
            .route("/v1/models", get(list_models))
            .route("/v1/models/{name}", get(describe_model))
            .route("/v1/jobs", post(submit))
            .route("/v1/jobs/{id}", get(status))
            .route("/v1/jobs/{id}/events", get(events))
            .route("/v1/jobs/{id}/result", get(result))
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(state);
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

/// A model's description for clients.
pub fn model_info(name: &str, model: &LanguageModel<AutoModel>) -> Result<ModelInfo> {
    let parameters = crate::nn::named_parameters(model.model())
        .into_iter()
        .map(|(n, t)| (n, t.size(), crate::graph::value::kind_name(t.kind()).to_string()))
        .collect();
    Ok(ModelInfo {
        name: name.to_string(),
        architecture: model.model().architecture().to_string(),
        config: model.config_json().clone(),
        tokenizer: model
            .tokenizer()
            .to_string(false)
            .map_err(|e| Error::Tokenizer { message: format!("cannot describe the tokenizer: {e}") })?,
        special: *model.special_tokens(),
        parameters,
    })
}

/// An error response.
fn error(status: StatusCode, e: WireError) -> Response {
    let mut r = (status, json(&e).unwrap_or_default()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    if let WireError::Busy { retry_after_s } = e {
        if let Ok(v) = header::HeaderValue::from_str(&retry_after_s.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    r
}

fn json_response(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

/// The key check: none configured lets everyone in (loopback only); otherwise the bearer key must be one of them.
/// Keys are compared in constant time and never logged.
fn authorize(state: &AppState, headers: &HeaderMap) -> std::result::Result<(), Box<Response>> {
    if state.keys.is_empty() {
        return Ok(());
    }
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let Some(given) = given else {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            WireError::Unauthorized { message: "no API key (set NNSIGHT_API_KEY)".into() },
        )));
    };
    if state.keys.iter().any(|k| same(k.as_bytes(), given.as_bytes())) {
        Ok(())
    } else {
        Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            WireError::Unauthorized { message: "the API key is not valid".into() },
        )))
    }
}

/// Equality without an early exit on the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn list_models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return *r;
    }
    let models: Vec<serde_json::Value> = state
        .queue
        .models()
        .iter()
        .filter_map(|n| state.infos.get(n))
        .map(|i| serde_json::json!({ "name": i.name, "architecture": i.architecture }))
        .collect();
    json_response(
        StatusCode::OK,
        serde_json::json!({ "protocol": protocol::PROTOCOL_VERSION, "models": models }).to_string(),
    )
}

async fn describe_model(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return *r;
    }
    match state.infos.get(&name) {
        Some(info) => json_response(StatusCode::OK, json(info).unwrap_or_default()),
        None => error(StatusCode::NOT_FOUND, WireError::Other { message: format!("no model `{name}` on this server") }),
    }
}

async fn submit(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return *r;
    }
    let limit = state.limits.request_bytes;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let over = |given: u64| {
        error(StatusCode::PAYLOAD_TOO_LARGE, WireError::Limit { what: "request bytes".into(), limit, given })
    };
    // Read up to the limit; past it, read on without keeping (so that the client, still sending, gets the
    // answer rather than a broken connection), up to a bound, then refuse.
    let mut bytes = Vec::new();
    let mut total: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
        let Ok(chunk) = chunk else {
            return error(StatusCode::BAD_REQUEST, WireError::Other { message: "the request body broke off".into() });
        };
        total += chunk.len() as u64;
        if total <= limit {
            bytes.extend_from_slice(&chunk);
        } else if total > limit.saturating_mul(16) {
            break;
        }
    }
    if total > limit || declared.is_some_and(|n| n > limit) {
        return over(declared.unwrap_or(total).max(total));
    }
    let request = match decode_request(&bytes) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, WireError::from(&e)),
    };
    if !state.infos.contains_key(&request.model) {
        let known = state.queue.models().join(", ");
        return error(
            StatusCode::NOT_FOUND,
            WireError::Other { message: format!("no model `{}` on this server (it serves: {known})", request.model) },
        );
    }
    // Refused before anything runs: too many nodes, a malformed graph, a function this program lacks.
    let nodes: u64 = request.job.graphs().map(|g| g.nodes.len() as u64).sum();
    if nodes > state.limits.graph_nodes {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            WireError::Limit { what: "graph nodes".into(), limit: state.limits.graph_nodes, given: nodes },
        );
    }
    for g in request.job.graphs() {
        if let Err(e) = crate::function::validate(g) {
            return error(StatusCode::BAD_REQUEST, WireError::from(&e));
        }
    }
    let id = format!("job-{}", state.next.fetch_add(1, Ordering::Relaxed));
    let record = Arc::new(JobRecord::new(id.clone()));
    if let Err(full) = state.queue.push(QueuedJob { record: record.clone(), request }) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            WireError::Busy { retry_after_s: full.retry_after.as_secs_f64().ceil() as u64 },
        );
    }
    remember(&state, record);
    json_response(StatusCode::ACCEPTED, json(&Submitted { id }).unwrap_or_default())
}

/// Keeps the record, forgetting the oldest finished jobs past [`KEEP_JOBS`] and results older than
/// [`RESULT_TTL`].
fn remember(state: &AppState, record: Arc<JobRecord>) {
    let mut jobs = state.jobs.lock().unwrap_or_else(|p| p.into_inner());
    let mut order = state.order.lock().unwrap_or_else(|p| p.into_inner());
    for job in jobs.values() {
        let ended = *job.ended.lock().unwrap_or_else(|p| p.into_inner());
        if ended.is_some_and(|t| t.elapsed() > RESULT_TTL) {
            job.result.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
    }
    order.push_back(record.id.clone());
    jobs.insert(record.id.clone(), record);
    while order.len() > KEEP_JOBS {
        let Some(oldest) = order.front().cloned() else { break };
        if !jobs.get(&oldest).is_none_or(|j| j.status().state.is_final()) {
            break;
        }
        order.pop_front();
        jobs.remove(&oldest);
    }
}

fn find(state: &AppState, id: &str) -> std::result::Result<Arc<JobRecord>, Box<Response>> {
    state.jobs.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned().ok_or_else(|| {
        Box::new(error(StatusCode::NOT_FOUND, WireError::Other { message: format!("no job `{id}` on this server") }))
    })
}

async fn status(State(state): State<Arc<AppState>>, headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return *r;
    }
    match find(&state, &id) {
        Ok(job) => json_response(StatusCode::OK, json(&job.status()).unwrap_or_default()),
        Err(r) => *r,
    }
}

async fn result(State(state): State<Arc<AppState>>, headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return *r;
    }
    let job = match find(&state, &id) {
        Ok(j) => j,
        Err(r) => return *r,
    };
    let status = job.status();
    match status.state {
        JobState::Completed => {
            let Some(bytes) = job.result.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
                let message = format!("the result of job `{id}` was dropped {} s after it ended", RESULT_TTL.as_secs());
                return error(StatusCode::GONE, WireError::Other { message });
            };
            let mut r = Response::new(Body::from(bytes.as_ref().clone()));
            r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/octet-stream"));
            r
        }
        JobState::Error => {
            let e = status.error.unwrap_or(WireError::Other { message: "the job failed".into() });
            error(StatusCode::UNPROCESSABLE_ENTITY, e)
        }
        _ => error(StatusCode::CONFLICT, WireError::Other { message: format!("job `{id}` has not finished yet") }),
    }
}

/// Server-sent events of a job: every event so far, then each new one as it comes, until `end`.
async fn events(State(state): State<Arc<AppState>>, headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return *r;
    }
    let job = match find(&state, &id) {
        Ok(j) => j,
        Err(r) => return *r,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<std::result::Result<String, std::io::Error>>(64);
    tokio::spawn(async move {
        let mut next = 0;
        loop {
            let notified = job.changed.notified();
            let batch: Vec<(&'static str, String)> = {
                let events = job.events.lock().unwrap_or_else(|p| p.into_inner());
                events[next..].to_vec()
            };
            next += batch.len();
            for (name, data) in batch {
                if tx.send(Ok(format!("event: {name}\ndata: {data}\n\n"))).await.is_err() {
                    return; // the client went away
                }
                if name == "end" {
                    return;
                }
            }
            // Woken by the next event; a timeout also wakes it, as a keep-alive.
            if tokio::time::timeout(Duration::from_secs(15), notified).await.is_err()
                && tx.send(Ok(": keep-alive\n\n".into())).await.is_err()
            {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/event-stream"));
    r.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
    r
}
