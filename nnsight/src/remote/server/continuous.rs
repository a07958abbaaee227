//! Continuous batching of generation jobs on a server ([`Hosted::run_generations`]): the generation jobs a worker
//! takes run as one batch that jobs join between decode steps (after their prefill) and leave when their rows stop.
//! Between two decode steps the worker looks at its queue without waiting: generation jobs that can join do (up to
//! the policy's rows; the others wait for rows to free up), and every other job (a trace, a job that cannot join)
//! runs right there, so that a long generation batch holds up no one.
//!
//! A job's events (its `log!` lines, `send!` values) stream as they come; its limits are its own (its time limit and
//! cancellation end it alone, between steps); its result is its own.

use super::super::execute::{check, check_saved, Arrivals, Hosted, Joining, Limits};
use super::super::protocol;
use super::super::wire::{json, JobState, SentValue};
use super::cobatch::{BatchCounters, CoBatch};
use super::jobs::QueuedJob;
use crate::exec::merge::same_edits;
use crate::graph::TensorData;
use crate::{Error, Result};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Mutex;
use std::time::Instant;

/// Where a worker's continuous batch finds its next jobs: the queue it took them from (if it may look there) and
/// what it took and could not start yet.
pub(super) struct Source<'q, H: Hosted> {
    pub(super) model: &'q H,
    pub(super) queue: Option<&'q Mutex<Receiver<QueuedJob>>>,
    /// Called with the number of jobs taken from `queue` (the queue's waiting count).
    pub(super) took: &'q dyn Fn(usize),
    pub(super) limits: &'q Limits,
    pub(super) policy: &'q CoBatch,
    pub(super) counters: &'q BatchCounters,
    /// A job of the batch, for the edits every joining job must share.
    pub(super) like: crate::exec::Job,
    /// Jobs that can join, waiting for rows.
    pub(super) waiting: VecDeque<QueuedJob>,
}

/// Whether `job` can join a continuous batch of `model` (the policy on, the job within the limits).
pub(super) fn joins<H: Hosted>(model: &H, job: &QueuedJob, policy: &CoBatch, limits: &Limits) -> bool {
    let j = &job.request.job;
    policy.enabled && model.joins(j) && check(j, limits).is_ok()
}

/// Runs `jobs` (generations that can join, with the same edits) as one continuous batch of `model`, with the jobs
/// `source` finds between steps; the jobs it hands back (a model that cannot) run alone.
pub(super) fn run<H: Hosted>(jobs: Vec<QueuedJob>, mut source: Source<'_, H>) {
    let model = source.model;
    let mut first: Vec<Joining> = jobs.into_iter().map(|j| source.ticket(j)).collect();
    // A batch ends when it is empty or has taken its most jobs; what waits for rows then starts the next.
    while !first.is_empty() {
        let value_bytes = source.limits.value_bytes;
        let unrun = crate::interleave::with_value_cap(value_bytes, || model.run_generations(first, &mut source));
        for joining in unrun {
            (joining.done)(Err(Error::InvalidInput { message: "this model cannot batch generations".into() }));
        }
        first = source.poll(0);
    }
}

impl<H: Hosted> Source<'_, H> {
    /// `job` as the batch takes it: its events streamed to its record, its limits, its outcome settled there.
    fn ticket(&self, job: QueuedJob) -> Joining {
        let record = job.record.clone();
        record.set_state(JobState::Running, None);
        record.event("batch", serde_json::json!({ "continuous": true }).to_string());
        self.counters.note_joined();
        let (start, limits) = (Instant::now(), self.limits.clone());
        let watch = {
            let (record, wall) = (record.clone(), limits.wall_time);
            Box::new(move || -> Result<()> {
                if record.cancel.load(Ordering::Relaxed) || start.elapsed() > wall {
                    return Err(Error::TimeLimit { seconds: wall.as_secs_f64() });
                }
                Ok(())
            })
        };
        let log = {
            let record = record.clone();
            Rc::new(move |line: String| record.event("log", serde_json::json!({ "line": line }).to_string()))
        };
        let sent = {
            let record = record.clone();
            Rc::new(move |label: String, t: tch::Tensor| {
                if let Ok(tensor) = TensorData::from_tensor(&t) {
                    record.event("value", json(&SentValue { label, tensor }).unwrap_or_default());
                }
            })
        };
        let done = Box::new(move |outcome: Result<crate::interleave::Finished>| {
            let result =
                outcome.and_then(|f| check_saved(&f, &limits).map(|()| f)).and_then(|f| protocol::encode_result(&f));
            super::settle(&record, result.map_err(|e| super::WireError::from(&e)));
        });
        Joining { job: job.request.job, watch, log, sent, done }
    }

    /// The rows of `job`'s batch.
    fn rows(&self, job: &QueuedJob) -> usize {
        self.model.batch_shape(&job.request.job).map_or(1, |s| s.0)
    }
}

impl<H: Hosted> Arrivals for Source<'_, H> {
    fn poll(&mut self, running_rows: usize) -> Vec<Joining> {
        let mut others: Vec<QueuedJob> = Vec::new();
        if let Some(queue) = self.queue {
            // Never wait: another worker may hold the queue, waiting for a job, and gets what comes.
            if let Ok(rx) = queue.try_lock() {
                let mut n = 0;
                while let Ok(job) = rx.try_recv() {
                    n += 1;
                    match joins(self.model, &job, self.policy, self.limits) && same_edits(&self.like, &job.request.job)
                    {
                        true => self.waiting.push_back(job),
                        false => others.push(job),
                    }
                }
                (self.took)(n);
            }
        }
        if !others.is_empty() {
            // Jobs that cannot join run now, between two decode steps (alone or co-batched as traces).
            super::cobatch::run_jobs(self.model, others, self.limits, self.policy, self.counters);
        }
        let mut joining = Vec::new();
        let mut rows = running_rows;
        while let Some(job) = self.waiting.front() {
            let r = self.rows(job);
            if rows > 0 && rows + r > self.policy.max_rows {
                break;
            }
            rows += r;
            let job = self.waiting.pop_front().expect("looked at above");
            joining.push(self.ticket(job));
        }
        joining
    }

    fn stepped(&mut self, rows: usize) {
        self.counters.note_step(rows);
    }
}
