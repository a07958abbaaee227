//! A broker for many server processes on many machines: Redis Streams behind [`JobQueue`].
//!
//! Every process serving a model is a consumer of one consumer group on that model's stream. A submitted job is
//! `XADD`ed to the stream; a free worker of any process takes it, with the jobs waiting after it up to the
//! co-batching policy's rows (`XREADGROUP COUNT`, waiting up to the policy's time for more), runs them as the
//! in-process queue does (co-batched where they merge: [`CoBatch`]), and stores each job's result and final state,
//! as it ends, with one script that also `XACK`s (and `XDEL`s) the job's entry. The job's state, events and result live in Redis, so any process answers
//! `/v1/jobs/ID`, `/events` and `/result` for any job.
//!
//! A worker renews its claim on every entry it has taken (all of a batch's) every quarter of [`RedisOptions::reclaim_after`] (`XCLAIM` of
//! its own entry, which resets the entry's idle time). An entry idle longer than that belongs to a process that
//! stopped (killed, crashed, cut off): an idle worker elsewhere takes it over with `XAUTOCLAIM` and runs the job
//! again. A job therefore runs at least once, and possibly more than once; its result is stored exactly once: the
//! script storing it does nothing when the job has already ended, so the client sees one completion. A worker
//! that finds its entry taken over (it was only slow) stops its run at the next module call and stores nothing.
//! A job whose worker stopped [`MAX_STARTS`] times fails rather than taking down workers forever.
//!
//! Keys (under [`RedisOptions::prefix`], `nnsight` by default): `P:queue:MODEL` (the stream: fields `id`,
//! `request`), `P:job:ID` (a hash: `state`, `error`, `model`, `worker`, `starts`, `finished_by`, times),
//! `P:job:ID:events` (a list of `name\ndata`), `P:job:ID:result` (the saved values), `P:ids` (the id counter).
//! A job's events and result expire [`RESULT_TTL`](super::RESULT_TTL) after it ends, its state [`STATE_TTL`] after.

use super::super::execute::{Hosted, Limits};
use super::super::protocol;
use super::super::wire::{json, JobState, JobStatus, WireError};
use super::cobatch::{BatchCounters, CoBatch};
use super::jobs::{JobQueue, JobStore, QueueFull, QueuedJob, StoreError};
use super::metrics::Metrics;
use super::{model_info, ServeOptions, Server};
use crate::{Error, Result};
use ::redis::{cmd, Client, Connection, RedisError};
use scripts::SUBMIT;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod scripts;
mod worker;

/// How long a finished job's state is kept (its events and result go after [`RESULT_TTL`](super::RESULT_TTL)).
pub const STATE_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long the record of a job that has not ended is kept (a job waiting or running longer is forgotten).
const PENDING_TTL: Duration = Duration::from_secs(24 * 3600);
/// A job whose worker stopped this many times (each a crash or a kill while running it) fails.
pub const MAX_STARTS: u32 = 3;
/// The consumer group of every model's stream.
const GROUP: &str = "workers";
/// How long a worker waits on an empty stream before looking for jobs to take over.
const BLOCK: Duration = Duration::from_millis(1000);

/// Where the broker is and how it behaves.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// The Redis server (`redis://HOST:PORT[/DB]`, with `redis://:PASSWORD@HOST:PORT` for a password).
    pub url: String,
    /// The prefix of every key (default `nnsight`): servers with the same prefix on one Redis share their queues,
    /// so they must serve the same models under the same names.
    pub prefix: String,
    /// How long a running job may go without its worker renewing its claim before another process takes it over
    /// (default 30 s). A worker renews every quarter of this.
    pub reclaim_after: Duration,
    /// This process's name as a consumer (default `HOST-PID`); the job's `worker` field names it.
    pub consumer: Option<String>,
}

impl RedisOptions {
    /// The broker at `url`, with the default prefix and reclaim time.
    pub fn new(url: impl Into<String>) -> Self {
        RedisOptions {
            url: url.into(),
            prefix: "nnsight".into(),
            reclaim_after: Duration::from_secs(30),
            consumer: None,
        }
    }

    /// The consumer name this process takes: [`RedisOptions::consumer`], else `HOST-PID`.
    pub fn consumer_name(&self) -> String {
        self.consumer.clone().unwrap_or_else(|| format!("{}-{}", host_name(), std::process::id()))
    }
}

/// The queue of a server that shares its jobs with other servers through Redis (`nnsight serve --redis URL`).
/// Dropping it stops its workers (each within a second).
pub struct RedisQueue {
    shared: Arc<Shared>,
    models: Vec<String>,
}

/// What the queue, its workers and its heartbeat share.
struct Shared {
    pool: Pool,
    prefix: String,
    consumer: String,
    capacity: usize,
    limits: Limits,
    /// How a worker batches the jobs it takes.
    policy: CoBatch,
    /// Each model's co-batching counters (all its workers').
    counters: HashMap<String, Arc<BatchCounters>>,
    reclaim_after: Duration,
    stop: AtomicBool,
    /// The entries this process's workers are running: (stream, entry id, set when another process took it over).
    in_flight: Mutex<Vec<(String, String, Arc<AtomicBool>)>>,
    /// Each model's mean job time in ms (for "retry after").
    mean_ms: HashMap<String, AtomicU64>,
    /// The server's figures, where this process's workers count the jobs they end.
    metrics: OnceLock<Arc<Metrics>>,
}

impl Shared {
    fn stream(&self, model: &str) -> String {
        format!("{}:queue:{model}", self.prefix)
    }
    fn job(&self, id: &str) -> String {
        format!("{}:job:{id}", self.prefix)
    }
    fn events(&self, id: &str) -> String {
        format!("{}:job:{id}:events", self.prefix)
    }
    fn result(&self, id: &str) -> String {
        format!("{}:job:{id}:result", self.prefix)
    }
}

/// Connections to Redis, reused.
struct Pool {
    client: Client,
    /// The URL without its password, for messages.
    url: String,
    idle: Mutex<Vec<Connection>>,
}

impl Pool {
    fn connect(&self) -> std::result::Result<Connection, String> {
        let con = self.client.get_connection_with_timeout(Duration::from_secs(3)).map_err(|e| self.describe(&e))?;
        // Longer than the longest blocking read (`BLOCK`).
        let _ = con.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = con.set_write_timeout(Some(Duration::from_secs(10)));
        Ok(con)
    }

    /// Runs `f` on a connection; the error is a message naming the server and what to do.
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> ::redis::RedisResult<T>) -> std::result::Result<T, String> {
        let taken = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut con = match taken {
            Some(c) => c,
            None => self.connect()?,
        };
        match f(&mut con) {
            Ok(v) => {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                if idle.len() < 16 {
                    idle.push(con);
                }
                Ok(v)
            }
            // A broken connection is dropped; one that got an error reply is kept.
            Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() => {
                Err(self.describe(&e))
            }
            Err(e) => {
                self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(con);
                Err(self.describe(&e))
            }
        }
    }

    fn describe(&self, e: &RedisError) -> String {
        if e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() {
            format!(
                "cannot reach Redis at {}: {e}; start it (e.g. `redis-server --port 6379`) or give the right URL (--redis)",
                self.url
            )
        } else {
            format!("Redis at {} answered: {e}", self.url)
        }
    }
}

/// `url` without the password it may hold.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}

/// An event as the list holds it.
fn event(name: &str, data: &str) -> String {
    format!("{name}\n{data}")
}

fn status_event(id: &str, state: JobState, error: Option<WireError>) -> String {
    event("status", &json(&JobStatus { id: id.to_string(), state, error }).unwrap_or_default())
}

fn end_event(state: JobState) -> String {
    event("end", &format!(r#"{{"state":"{}"}}"#, if state == JobState::Completed { "completed" } else { "error" }))
}

fn state_name(state: JobState) -> &'static str {
    match state {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Completed => "completed",
        JobState::Error => "error",
    }
}

fn parse_state(s: &str) -> Option<JobState> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
}

impl RedisQueue {
    /// Joins the broker at `options.url` with `models` (name, copies): a worker thread per copy takes that
    /// model's jobs from the shared stream; at most `capacity` jobs wait per model; jobs run within `limits`,
    /// co-batched as [`CoBatch::default`] says. Fails, naming the URL, when Redis cannot be reached.
    pub fn start<H: Hosted>(
        models: Vec<(String, Vec<H>)>,
        capacity: usize,
        limits: Limits,
        options: RedisOptions,
    ) -> Result<Self> {
        Self::start_with(models, capacity, limits, options, CoBatch::default())
    }

    /// [`RedisQueue::start`], co-batching as `policy` says: a worker takes the jobs waiting in the stream up to
    /// `policy.max_rows` rows, waiting up to `policy.max_wait` for more, and runs those that merge as one batch.
    pub fn start_with<H: Hosted>(
        models: Vec<(String, Vec<H>)>,
        capacity: usize,
        limits: Limits,
        options: RedisOptions,
        policy: CoBatch,
    ) -> Result<Self> {
        let url = redact(&options.url);
        let broker = |message: String| Error::Broker { url: url.clone(), message };
        let client = Client::open(options.url.as_str())
            .map_err(|e| broker(format!("not a Redis URL ({e}); give one like redis://127.0.0.1:6379")))?;
        let pool = Pool { client, url: url.clone(), idle: Mutex::new(Vec::new()) };
        pool.with(|c| cmd("PING").query::<String>(c)).map_err(broker)?;
        let consumer = options.consumer_name();
        let shared = Arc::new(Shared {
            pool,
            prefix: options.prefix.clone(),
            consumer,
            capacity: capacity.max(1),
            limits,
            policy,
            counters: models.iter().map(|(n, _)| (n.clone(), Arc::new(BatchCounters::default()))).collect(),
            reclaim_after: options.reclaim_after.max(Duration::from_millis(200)),
            stop: AtomicBool::new(false),
            in_flight: Mutex::new(Vec::new()),
            mean_ms: models.iter().map(|(n, _)| (n.clone(), AtomicU64::new(1000))).collect(),
            metrics: OnceLock::new(),
        });
        for (name, _) in &models {
            create_group(&shared, &shared.stream(name)).map_err(broker)?;
        }
        let names: Vec<String> = models.iter().map(|(n, _)| n.clone()).collect();
        for (name, copies) in models {
            for (i, model) in copies.into_iter().enumerate() {
                let (shared, name) = (shared.clone(), name.clone());
                std::thread::Builder::new()
                    .name(format!("nnsight-redis-{name}-{i}"))
                    .spawn(move || worker::work(&shared, &model, &name))
                    .map_err(|e| broker(format!("cannot start a worker thread: {e}")))?;
            }
        }
        let beat = shared.clone();
        std::thread::Builder::new()
            .name("nnsight-redis-renew".into())
            .spawn(move || worker::renew_claims(&beat))
            .map_err(|e| broker(format!("cannot start the claim-renewing thread: {e}")))?;
        Ok(RedisQueue { shared, models: names })
    }

    /// Serves `models` (name, copies) as `options` say, their jobs shared through the broker `redis` with every
    /// other server on it. Refuses, as [`Server::start`] does, a non-loopback address without keys.
    pub fn serve<H: Hosted>(
        models: Vec<(String, Vec<H>)>,
        options: ServeOptions,
        redis: RedisOptions,
    ) -> Result<Server> {
        if options.keys.is_empty() && !options.listen.ip().is_loopback() {
            return Err(Error::InvalidInput {
                message: format!(
                    "refusing to serve on {} without API keys: give keys (--keys FILE or NNSIGHT_API_KEYS), or listen on a loopback address",
                    options.listen
                ),
            });
        }
        let mut infos = HashMap::new();
        for (name, copies) in &models {
            let Some(model) = copies.first() else {
                return Err(Error::InvalidInput { message: format!("no copy of model `{name}` to serve") });
            };
            infos.insert(name.clone(), model_info(name, model)?);
        }
        if infos.is_empty() {
            return Err(Error::InvalidInput { message: "no model to serve".into() });
        }
        let queue = RedisQueue::start_with(models, options.queue, options.limits.clone(), redis, options.co_batch)?;
        Server::start_with(Box::new(queue), infos, options)
    }

    /// This process's consumer name (the `worker` field of the jobs it runs).
    pub fn consumer(&self) -> &str {
        &self.shared.consumer
    }

    /// What this process's workers of `model` have run so far (batches, merged jobs); `None` for a model not
    /// served here.
    pub fn counters(&self, model: &str) -> Option<Arc<BatchCounters>> {
        self.shared.counters.get(model).cloned()
    }
}

impl Drop for RedisQueue {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// Creates the model's consumer group (reading from the stream's start) unless it exists.
fn create_group(shared: &Shared, stream: &str) -> std::result::Result<(), String> {
    let made = shared.pool.with(|c| {
        match cmd("XGROUP").arg("CREATE").arg(stream).arg(GROUP).arg("0").arg("MKSTREAM").query::<()>(c) {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    });
    made
}

impl JobQueue for RedisQueue {
    fn models(&self) -> Vec<String> {
        let mut names = self.models.clone();
        names.sort();
        names
    }

    /// Queues the job under its record's id (the HTTP side submits through [`JobQueue::store`] instead, which
    /// takes ids from Redis); a Redis failure fails the record.
    fn push(&self, job: QueuedJob) -> std::result::Result<(), QueueFull> {
        match submit(&self.shared, &job.record.id, &job.request, "-") {
            Ok(()) => Ok(()),
            Err(StoreError::Full(full)) => Err(full),
            Err(StoreError::Unavailable(message)) => {
                job.record.set_state(JobState::Error, Some(WireError::Other { message }));
                Ok(())
            }
        }
    }

    fn store(&self) -> Option<&dyn JobStore> {
        Some(self)
    }

    fn observe(&self, metrics: Arc<Metrics>) {
        for (model, counters) in &self.shared.counters {
            metrics.batches(model, counters.clone());
        }
        let _ = self.shared.metrics.set(metrics);
    }
}

fn submit(shared: &Shared, id: &str, request: &protocol::Request, key_id: &str) -> std::result::Result<(), StoreError> {
    let bytes = protocol::encode_request(request).map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let model = &request.model;
    let queued = event("status", r#"{"state":"queued"}"#);
    let waiting: i64 = shared
        .pool
        .with(|c| {
            SUBMIT
                .key(shared.stream(model))
                .key(shared.job(id))
                .key(shared.events(id))
                .arg(id)
                .arg(model)
                .arg(&bytes[..])
                .arg(now_ms())
                .arg(&queued)
                .arg(PENDING_TTL.as_secs())
                .arg(shared.capacity)
                .arg(GROUP)
                .arg(key_id)
                .invoke(c)
        })
        .map_err(StoreError::Unavailable)?;
    if waiting < 0 {
        let waiting = (-1 - waiting) as u64;
        let mean = shared.mean_ms.get(model).map_or(1000, |m| m.load(Ordering::Relaxed));
        let ms = mean.saturating_mul(waiting.max(1)).max(1000);
        return Err(StoreError::Full(QueueFull { retry_after: Duration::from_millis(ms) }));
    }
    Ok(())
}

impl JobStore for RedisQueue {
    fn submit(&self, request: protocol::Request, key_id: &str) -> std::result::Result<String, StoreError> {
        let shared = &self.shared;
        let n: u64 = shared
            .pool
            .with(|c| cmd("INCR").arg(format!("{}:ids", shared.prefix)).query(c))
            .map_err(StoreError::Unavailable)?;
        let id = format!("job-{n}");
        submit(shared, &id, &request, key_id)?;
        Ok(id)
    }

    fn queue_lengths(&self) -> std::result::Result<Vec<(String, u64)>, StoreError> {
        let shared = &self.shared;
        let mut pipe = ::redis::pipe();
        for model in &self.models {
            pipe.cmd("XLEN").arg(shared.stream(model)).cmd("XPENDING").arg(shared.stream(model)).arg(GROUP);
        }
        let answers: Vec<::redis::Value> = shared.pool.with(|c| pipe.query(c)).map_err(StoreError::Unavailable)?;
        let int = |v: Option<&::redis::Value>| match v {
            Some(::redis::Value::Int(n)) => *n as u64,
            Some(::redis::Value::Array(items)) => match items.first() {
                Some(::redis::Value::Int(n)) => *n as u64,
                _ => 0,
            },
            _ => 0,
        };
        let mut lengths = Vec::new();
        for (i, model) in self.models.iter().enumerate() {
            let (len, pending) = (int(answers.get(2 * i)), int(answers.get(2 * i + 1)));
            lengths.push((model.clone(), len.saturating_sub(pending)));
        }
        Ok(lengths)
    }

    fn status(&self, id: &str) -> std::result::Result<Option<JobStatus>, StoreError> {
        let (state, error): (Option<String>, Option<String>) = self
            .shared
            .pool
            .with(|c| cmd("HMGET").arg(self.shared.job(id)).arg("state").arg("error").query(c))
            .map_err(StoreError::Unavailable)?;
        Ok(state.as_deref().and_then(parse_state).map(|state| JobStatus {
            id: id.to_string(),
            state,
            error: error.filter(|e| !e.is_empty()).and_then(|e| serde_json::from_str(&e).ok()),
        }))
    }

    fn events(&self, id: &str, from: usize) -> std::result::Result<Option<Vec<(String, String)>>, StoreError> {
        let shared = &self.shared;
        let (items, state, error): (Vec<Vec<u8>>, Option<String>, Option<String>) = shared
            .pool
            .with(|c| {
                ::redis::pipe()
                    .cmd("LRANGE")
                    .arg(shared.events(id))
                    .arg(from)
                    .arg(-1)
                    .cmd("HGET")
                    .arg(shared.job(id))
                    .arg("state")
                    .cmd("HGET")
                    .arg(shared.job(id))
                    .arg("error")
                    .query(c)
            })
            .map_err(StoreError::Unavailable)?;
        let Some(state) = state.as_deref().and_then(parse_state) else { return Ok(None) };
        if items.is_empty() && from == 0 && state.is_final() {
            // The events have expired; the state has not.
            let error = error.filter(|e| !e.is_empty()).and_then(|e| serde_json::from_str(&e).ok());
            let events = [status_event(id, state, error), end_event(state)];
            return Ok(Some(events.iter().filter_map(|e| split_event(e.as_bytes())).collect()));
        }
        Ok(Some(items.iter().filter_map(|e| split_event(e)).collect()))
    }

    fn result(&self, id: &str) -> std::result::Result<Option<Vec<u8>>, StoreError> {
        self.shared.pool.with(|c| cmd("GET").arg(self.shared.result(id)).query(c)).map_err(StoreError::Unavailable)
    }
}

fn split_event(bytes: &[u8]) -> Option<(String, String)> {
    let text = String::from_utf8_lossy(bytes);
    let (name, data) = text.split_once('\n')?;
    Some((name.to_string(), data.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_the_url_is_never_shown() {
        assert_eq!(redact("redis://:secret@10.0.0.5:6379/2"), "redis://…@10.0.0.5:6379/2");
        assert_eq!(redact("redis://user:p@ss@host:1"), "redis://…@host:1");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[test]
    fn events_are_stored_as_name_newline_data() {
        let stored = status_event("job-7", JobState::Running, None);
        let (name, data) = split_event(stored.as_bytes()).unwrap();
        assert_eq!(name, "status");
        let status: JobStatus = serde_json::from_str(&data).unwrap();
        assert_eq!((status.id.as_str(), status.state), ("job-7", JobState::Running));
        assert_eq!(split_event(end_event(JobState::Error).as_bytes()).unwrap().1, r#"{"state":"error"}"#);
        for s in [JobState::Queued, JobState::Running, JobState::Completed, JobState::Error] {
            assert_eq!(parse_state(state_name(s)), Some(s));
        }
    }
}
