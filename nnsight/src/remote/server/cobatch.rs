//! Co-batching: a model's worker takes the jobs waiting in its queue ([`CoBatch`]: up to so many rows, waiting up
//! to so long for more) and runs the trace jobs that can merge as one trace, each job's graph as its own invokes
//! over its own rows (see [`crate::exec::merge`]); then each job gets its own saved values, `log!` lines and `send!`
//! values (routed by the invoke that emitted them), and its own limits.
//!
//! Isolation: a merged run that fails in any way (an error of one job's graph, a time limit, a cancellation, a
//! panic) gives no job its result; every job of it then runs alone, exactly as it would have without co-batching.
//! A merged job's events are held until its batch ends (so that a failed batch shows nothing twice); a job run
//! alone streams them as they come.
//!
//! What merges: trace jobs whose batches alone have the same padded length (padding a job's rows further would
//! change its values' shapes) and equal persistent edits. Generation jobs that can join run as one continuous
//! batch (`server/continuous.rs`); jobs that take gradients, skip modules or have whole-batch invokes run alone.
//!
//! The in-process queue's jobs ([`QueuedJob`]) and the Redis broker's (whose events, state and result live in
//! Redis) run through the same code: each is a [`Member`], which says where its events go and how it ends.

use super::super::execute::{check, check_saved, Hosted, Limits};
use super::super::protocol;
use super::super::wire::{JobState, WireError};
use super::jobs::QueuedJob;
use crate::exec::merge::{merge, mergeable, same_edits};
use crate::{Error, Result};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How a model's worker batches the jobs waiting for it (`nnsight serve --co-batch on|off --batch-rows N
/// --batch-wait-ms MS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoBatch {
    /// Whether waiting trace jobs run together (default true); off, every job runs alone, bit for bit as a local
    /// run of it.
    pub enabled: bool,
    /// The most rows of one batch, all its jobs' invokes together (default 64); a job of more rows runs alone.
    pub max_rows: usize,
    /// How long a worker that took a job waits for more to fill its batch (default 2 ms); jobs that are already
    /// waiting are taken without waiting.
    pub max_wait: Duration,
}

impl Default for CoBatch {
    fn default() -> Self {
        CoBatch { enabled: true, max_rows: 64, max_wait: Duration::from_millis(2) }
    }
}

impl CoBatch {
    /// Every job alone.
    pub fn off() -> Self {
        CoBatch { enabled: false, ..CoBatch::default() }
    }
}

/// What a model's workers have run: batches, jobs, how many of them ran merged, and how many were run again alone
/// after their batch failed.
#[derive(Debug, Default)]
pub struct BatchCounters {
    batches: AtomicU64,
    jobs: AtomicU64,
    merged: AtomicU64,
    reruns: AtomicU64,
    sizes: Mutex<VecDeque<usize>>,
    joined: AtomicU64,
    steps: AtomicU64,
    step_rows: AtomicU64,
}

/// How many batch sizes [`BatchCounters::recent_sizes`] keeps.
const RECENT: usize = 1024;

impl BatchCounters {
    /// Batches run (a job run alone is a batch of one).
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
    /// Jobs run.
    pub fn jobs(&self) -> u64 {
        self.jobs.load(Ordering::Relaxed)
    }
    /// Jobs that ran in a batch of more than one job (and got its results).
    pub fn merged_jobs(&self) -> u64 {
        self.merged.load(Ordering::Relaxed)
    }
    /// Jobs run again alone because their batch failed.
    pub fn reruns(&self) -> u64 {
        self.reruns.load(Ordering::Relaxed)
    }
    /// The number of jobs of each of the last batches (at most 1024), oldest first.
    pub fn recent_sizes(&self) -> Vec<usize> {
        self.sizes.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect()
    }

    /// Generation jobs that ran in a continuous batch.
    pub fn continuous_jobs(&self) -> u64 {
        self.joined.load(Ordering::Relaxed)
    }
    /// Decode steps of continuous batches.
    pub fn decode_steps(&self) -> u64 {
        self.steps.load(Ordering::Relaxed)
    }
    /// Rows of all decode steps of continuous batches (divided by [`BatchCounters::decode_steps`]: the mean rows
    /// per step).
    pub fn decode_step_rows(&self) -> u64 {
        self.step_rows.load(Ordering::Relaxed)
    }

    pub(super) fn note_joined(&self) {
        self.joined.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn note_step(&self, rows: usize) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.step_rows.fetch_add(rows as u64, Ordering::Relaxed);
    }

    fn note(&self, jobs: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.jobs.fetch_add(jobs as u64, Ordering::Relaxed);
        let mut sizes = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
        if sizes.len() == RECENT {
            sizes.pop_front();
        }
        sizes.push_back(jobs);
    }
}

/// Where a job's events go ([`Member::emitter`]): called with an event's name and JSON data.
pub(super) type Emitter = Arc<dyn Fn(&'static str, String)>;

/// A job a worker took from its queue, as co-batching sees it: what to run, where its events go, and how it ends.
pub(super) trait Member {
    /// What to run.
    fn job(&self) -> &crate::exec::Job;
    /// Where its events go (as they come for a job run alone; when its batch ends for a merged one).
    fn emitter(&self) -> Emitter;
    /// Marks it running.
    fn start(&self);
    /// Set from elsewhere to stop it (a cancellation, or its job taken over): it stops at the next module call.
    fn cancel(&self) -> &AtomicBool;
    /// Ends it with its result's bytes or its error; called once.
    fn settle(&self, outcome: std::result::Result<Vec<u8>, WireError>);
}

impl Member for QueuedJob {
    fn job(&self) -> &crate::exec::Job {
        &self.request.job
    }
    fn emitter(&self) -> Emitter {
        let record = self.record.clone();
        Arc::new(move |name, data| record.event(name, data))
    }
    fn start(&self) {
        self.record.set_state(JobState::Running, None);
    }
    fn cancel(&self) -> &AtomicBool {
        &self.record.cancel
    }
    fn settle(&self, outcome: std::result::Result<Vec<u8>, WireError>) {
        super::settle(&self.record, outcome);
    }
}

/// A job taken from the queue, with its batch's (rows, padded length) if it can merge.
pub(super) type Taken<M = QueuedJob> = (M, Option<(usize, usize)>);

/// The (rows, padded length) of `job`'s batch alone if `policy` lets it merge with others, else `None` (it runs
/// alone).
pub(super) fn shape_of<H: Hosted>(
    model: &H,
    job: &crate::exec::Job,
    policy: &CoBatch,
    limits: &Limits,
) -> Option<(usize, usize)> {
    (policy.enabled && mergeable(job) && check(job, limits).is_ok()).then(|| model.batch_shape(job)).flatten()
}

/// `first` and the jobs waiting after it, as `policy` says: all that wait, up to `policy.max_rows` rows, waiting up
/// to `policy.max_wait` for more.
pub(super) fn gather<H: Hosted>(
    model: &H,
    first: QueuedJob,
    queue: &Receiver<QueuedJob>,
    policy: &CoBatch,
    limits: &Limits,
) -> Vec<Taken> {
    let shape = |job: &QueuedJob| shape_of(model, &job.request.job, policy, limits);
    let rows = |s: &Option<(usize, usize)>| s.map_or(policy.max_rows, |s| s.0);
    let s = shape(&first);
    let mut total = rows(&s);
    let mut taken = vec![(first, s)];
    if !policy.enabled {
        return taken;
    }
    let deadline = Instant::now() + policy.max_wait;
    while total < policy.max_rows {
        let next = match queue.try_recv() {
            Ok(job) => job,
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => match queue.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            },
        };
        let s = shape(&next);
        total += rows(&s);
        taken.push((next, s));
    }
    taken
}

/// Runs `jobs` (taken from one model's queue, oldest first): those that can merge as batches of at most
/// `policy.max_rows` rows, the others alone; counts them in `counters`. (The Redis broker's workers run what they
/// take through the same code.)
pub fn run_jobs<H: Hosted>(
    model: &H,
    jobs: Vec<QueuedJob>,
    limits: &Limits,
    policy: &CoBatch,
    counters: &BatchCounters,
) {
    run_members(model, jobs, limits, policy, counters);
}

/// [`run_jobs`] on jobs of any queue.
pub(super) fn run_members<H: Hosted, M: Member + 'static>(
    model: &H,
    jobs: Vec<M>,
    limits: &Limits,
    policy: &CoBatch,
    counters: &BatchCounters,
) {
    let taken = jobs
        .into_iter()
        .map(|j| {
            let s = shape_of(model, j.job(), policy, limits);
            (j, s)
        })
        .collect();
    run_taken(model, taken, limits, policy, counters, None);
}

/// [`run_jobs`] on jobs whose shapes are known ([`shape_of`]).
///
/// Generations that can join run after the others as one continuous batch, which asks `more` (when given) for the
/// jobs waiting in the worker's queue between its decode steps.
pub(super) fn run_taken<H: Hosted, M: Member + 'static>(
    model: &H,
    taken: Vec<Taken<M>>,
    limits: &Limits,
    policy: &CoBatch,
    counters: &BatchCounters,
    more: Option<&mut dyn FnMut() -> Vec<M>>,
) {
    // Generations that can join one continuous batch (the edits of the first), run after the rest.
    let mut generations: Vec<M> = Vec::new();
    // Groups in the order of their first job: (padded length, rows so far, jobs).
    let mut groups: Vec<(Option<usize>, usize, Vec<M>)> = Vec::new();
    for (job, shape) in taken {
        if super::continuous::joins(model, job.job(), policy, limits)
            && generations.first().is_none_or(|g| same_edits(g.job(), job.job()))
        {
            generations.push(job);
            continue;
        }
        let fits = |g: &(Option<usize>, usize, Vec<M>), (rows, len): (usize, usize)| {
            g.0 == Some(len) && g.1 + rows <= policy.max_rows && same_edits(g.2[0].job(), job.job())
        };
        match shape {
            Some(s) if s.0 <= policy.max_rows => match groups.iter_mut().find(|g| fits(g, s)) {
                Some(g) => {
                    g.1 += s.0;
                    g.2.push(job);
                }
                None => groups.push((Some(s.1), s.0, vec![job])),
            },
            _ => groups.push((None, 0, vec![job])),
        }
    }
    for (_, rows, group) in groups {
        counters.note(group.len());
        if group.len() == 1 {
            let job = &group[0];
            (job.emitter())("batch", serde_json::json!({ "jobs": 1 }).to_string());
            run_alone(model, job, limits);
        } else {
            run_merged(model, group, rows, limits, counters);
        }
    }
    if let Some(like) = generations.first().map(|g| g.job().clone()) {
        let source =
            super::continuous::Source { model, more, limits, policy, counters, like, waiting: Default::default() };
        super::continuous::run(generations, source);
    }
}

/// A job's events (name, JSON data) held until its batch ends.
type Events = Vec<(&'static str, String)>;

/// Runs `group` (mergeable jobs of one padded length and the same edits, `rows` rows in all) as one trace; if that
/// fails, each job alone.
fn run_merged<H: Hosted, M: Member>(model: &H, group: Vec<M>, rows: usize, limits: &Limits, counters: &BatchCounters) {
    let jobs: Vec<&crate::exec::Job> = group.iter().map(|j| j.job()).collect();
    let Some(merged) = merge(&jobs) else {
        counters.reruns.fetch_add(group.len() as u64, Ordering::Relaxed);
        group.iter().for_each(|job| alone(model, job, limits));
        return;
    };
    let n = group.len();
    for job in &group {
        job.start();
        (job.emitter())("batch", serde_json::json!({ "jobs": n, "rows": rows }).to_string());
    }
    // Each job's events, held until the batch ends; a line no invoke names (an edit's) goes to every job.
    let events: Rc<RefCell<Vec<Events>>> = Rc::new(RefCell::new(vec![Vec::new(); n]));
    let owners = Rc::new(merged.invoke_owners());
    let route = {
        let (events, owners) = (events.clone(), owners.clone());
        move |name: &'static str, data: String| {
            let mut events = events.borrow_mut();
            match crate::interleave::emitting_invoke().and_then(|i| owners.get(i as usize)) {
                Some(&j) => events[j].push((name, data)),
                None => events.iter_mut().for_each(|e| e.push((name, data.clone()))),
            }
        }
    };
    let start = Instant::now();
    let seconds = limits.wall_time.as_secs_f64();
    let watch = || -> Result<()> {
        let cancelled = group.iter().any(|j| j.cancel().load(Ordering::Relaxed));
        if cancelled || start.elapsed() > limits.wall_time {
            return Err(Error::TimeLimit { seconds });
        }
        Ok(())
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        super::with_events(route, || {
            crate::interleave::with_value_cap(limits.value_bytes, || model.run_job(&merged.job, &watch))
        })
    }));
    let Ok(Ok(finished)) = outcome else {
        // Nothing of the batch reached its jobs: each runs alone, as it would have without co-batching.
        counters.reruns.fetch_add(n as u64, Ordering::Relaxed);
        group.iter().for_each(|job| alone(model, job, limits));
        return;
    };
    counters.merged.fetch_add(n as u64, Ordering::Relaxed);
    let events = std::mem::take(&mut *events.borrow_mut());
    for ((job, part), events) in group.iter().zip(merged.split(finished)).zip(events) {
        let emit = job.emitter();
        for (name, data) in events {
            emit(name, data);
        }
        let result = check_saved(&part, limits).and_then(|()| protocol::encode_result(&part));
        job.settle(result.map_err(|e| WireError::from(&e)));
    }
}

/// Runs `job` alone after its batch failed.
fn alone<H: Hosted, M: Member>(model: &H, job: &M, limits: &Limits) {
    (job.emitter())("batch", serde_json::json!({ "jobs": 1, "rerun": true }).to_string());
    run_alone(model, job, limits);
}

/// Runs one job on the worker's thread: its events stream as it runs, and a panic in it fails only the job.
fn run_alone<H: Hosted, M: Member>(model: &H, job: &M, limits: &Limits) {
    job.start();
    // A job alone names no invoke of another's: its lines are all its own.
    let emit = job.emitter();
    let outcome = super::run_streaming(model, job.job(), limits, job.cancel(), move |name, data| emit(name, data));
    job.settle(outcome);
}
