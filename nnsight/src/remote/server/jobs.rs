//! A job as the server sees it: its record (state, events, result), what waits in a queue, and the [`JobQueue`]
//! interface that the HTTP side hands jobs to.

use super::super::protocol;
use super::super::wire::{json, JobState, JobStatus, WireError};
use super::metrics::{log_job, JobFacts, Metrics};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One job: its state, events and result, shared by the worker running it and the requests asking about it.
pub struct JobRecord {
    pub(super) id: String,
    state: Mutex<(JobState, Option<WireError>)>,
    pub(super) events: Mutex<Vec<(&'static str, String)>>,
    pub(super) result: Mutex<Option<Arc<Vec<u8>>>>,
    pub(super) changed: tokio::sync::Notify,
    pub(super) cancel: AtomicBool,
    /// When it ended (its result is kept for [`RESULT_TTL`](super::RESULT_TTL) after).
    pub(super) ended: Mutex<Option<Instant>>,
    /// What its log line and the server's figures need.
    observed: Mutex<Option<Observed>>,
}

/// A job as its log line and the server's figures see it.
struct Observed {
    facts: JobFacts,
    metrics: Arc<Metrics>,
    submitted: Instant,
    started: Option<Instant>,
    logged: bool,
}

impl JobRecord {
    pub(super) fn new(id: String) -> Self {
        JobRecord {
            id,
            state: Mutex::new((JobState::Queued, None)),
            events: Mutex::new(vec![("status", r#"{"state":"queued"}"#.to_string())]),
            result: Mutex::new(None),
            changed: tokio::sync::Notify::new(),
            cancel: AtomicBool::new(false),
            ended: Mutex::new(None),
            observed: Mutex::new(None),
        }
    }

    /// Counts the job in `metrics` (waiting, from now) and logs a line when it ends.
    pub(super) fn observe(&self, facts: JobFacts, metrics: Arc<Metrics>) {
        metrics.submitted(&facts.model, true);
        let observed = Observed { facts, metrics, submitted: Instant::now(), started: None, logged: false };
        *self.observed.lock().unwrap_or_else(|p| p.into_inner()) = Some(observed);
    }

    /// Notes a change of state for the figures and, at the end, writes the job's log line.
    fn note(&self, state: JobState) {
        let mut observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        let Some(o) = observed.as_mut() else { return };
        let now = Instant::now();
        if o.started.is_none() && state != JobState::Queued {
            o.started = Some(now);
            o.metrics.started(&o.facts.model);
        }
        if state.is_final() && !o.logged {
            o.logged = true;
            let started = o.started.unwrap_or(now);
            let (wait, run) = (started - o.submitted, now - started);
            let outcome = if state == JobState::Completed { "completed" } else { "error" };
            o.metrics.ended(&o.facts.model, outcome, wait, run);
            log_job(&self.id, &o.facts, wait, run, outcome);
        }
    }

    /// Adds an event and wakes whoever follows the job.
    pub(super) fn event(&self, name: &'static str, data: String) {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).push((name, data));
        self.changed.notify_waiters();
    }

    pub(super) fn set_state(&self, state: JobState, error: Option<WireError>) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = (state, error.clone());
        self.note(state);
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

    pub(super) fn status(&self) -> JobStatus {
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

/// Where submitted jobs wait for a worker. [`LocalQueue`](super::LocalQueue) keeps them in this process, one
/// worker thread per model; [`RedisQueue`](super::RedisQueue) spreads them over many server processes.
pub trait JobQueue: Send + Sync {
    /// The names of the models jobs can be queued for.
    fn models(&self) -> Vec<String>;
    /// Hands `job` to a worker of its model (`Err`: the queue is full).
    fn push(&self, job: QueuedJob) -> std::result::Result<(), QueueFull>;
    /// Where jobs are submitted and their records kept when those live outside this process (a broker shared by
    /// several servers, any of which may be asked about any job). `None` (the default): the server keeps its
    /// jobs' records itself and hands jobs to [`JobQueue::push`].
    fn store(&self) -> Option<&dyn JobStore> {
        None
    }
    /// Hands the queue the server's figures, for the jobs its own workers run (a broker's workers count there;
    /// the in-process queue's jobs are counted through their records). The default does nothing.
    fn observe(&self, _metrics: Arc<Metrics>) {}
}

/// Jobs submitted to, and their records kept in, a store shared by several server processes. Its calls may wait
/// on the network: the HTTP side makes them on blocking threads.
pub trait JobStore: Send + Sync {
    /// Queues `request` (sent with the key of id `key_id`, see [`key_id`](super::key_id)) for a worker of its
    /// model; returns the job's id.
    fn submit(&self, request: protocol::Request, key_id: &str) -> std::result::Result<String, StoreError>;
    /// The jobs waiting for a worker, by model (this also tells whether the store answers).
    fn queue_lengths(&self) -> std::result::Result<Vec<(String, u64)>, StoreError>;
    /// The job's state (`None`: no such job, or it expired).
    fn status(&self, id: &str) -> std::result::Result<Option<JobStatus>, StoreError>;
    /// The job's events from the `from`-th on, as (name, data) (`None`: no such job). Once a job's events have
    /// expired, a finished job's are its final status and `end`.
    fn events(&self, id: &str, from: usize) -> std::result::Result<Option<Vec<(String, String)>>, StoreError>;
    /// The saved values of a completed job (`None`: none stored, or dropped after [`RESULT_TTL`](super::RESULT_TTL)).
    fn result(&self, id: &str) -> std::result::Result<Option<Vec<u8>>, StoreError>;
}

/// Why a [`JobStore`] could not answer.
#[derive(Debug, Clone)]
pub enum StoreError {
    /// The model's queue is full.
    Full(QueueFull),
    /// The store cannot be reached (the message names it and says what to do).
    Unavailable(String),
}
