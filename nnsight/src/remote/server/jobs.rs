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
/// worker thread per model; a broker spreading jobs over many machines would implement this too.
pub trait JobQueue: Send + Sync {
    /// The names of the models jobs can be queued for.
    fn models(&self) -> Vec<String>;
    /// Hands `job` to a worker of its model (`Err`: the queue is full).
    fn push(&self, job: QueuedJob) -> std::result::Result<(), QueueFull>;
}
