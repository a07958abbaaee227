//! A job as the server sees it: its record (state, events, result), what waits in a queue, and the [`JobQueue`]
//! interface that the HTTP side hands jobs to.

use super::super::protocol;
use super::super::wire::{json, JobState, JobStatus, WireError};
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
        }
    }

    /// Adds an event and wakes whoever follows the job.
    pub(super) fn event(&self, name: &'static str, data: String) {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).push((name, data));
        self.changed.notify_waiters();
    }

    pub(super) fn set_state(&self, state: JobState, error: Option<WireError>) {
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
}

/// Jobs submitted to, and their records kept in, a store shared by several server processes. Its calls may wait
/// on the network: the HTTP side makes them on blocking threads.
pub trait JobStore: Send + Sync {
    /// Queues `request` for a worker of its model; returns the job's id.
    fn submit(&self, request: protocol::Request) -> std::result::Result<String, StoreError>;
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
