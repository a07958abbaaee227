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
use super::super::wire::WireError;
use super::cobatch::{BatchCounters, CoBatch, Member};
use crate::exec::merge::same_edits;
use crate::{Error, Result};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Where a worker's continuous batch finds its next jobs: its queue (if it may look there: `more` gives what waits
/// now, without waiting) and what it took and could not start yet.
pub(super) struct Source<'q, 'm, H: Hosted, M: Member> {
    pub(super) model: &'q H,
    pub(super) more: Option<&'m mut dyn FnMut() -> Vec<M>>,
    pub(super) limits: &'q Limits,
    pub(super) policy: &'q CoBatch,
    pub(super) counters: &'q BatchCounters,
    /// A job of the batch, for the edits every joining job must share.
    pub(super) like: crate::exec::Job,
    /// Jobs that can join, waiting for rows.
    pub(super) waiting: VecDeque<M>,
}

/// Whether `job` can join a continuous batch of `model` (the policy on, the job within the limits).
pub(super) fn joins<H: Hosted>(model: &H, job: &crate::exec::Job, policy: &CoBatch, limits: &Limits) -> bool {
    policy.enabled && model.joins(job) && check(job, limits).is_ok()
}

/// Runs `jobs` (generations that can join, with the same edits) as one continuous batch of `model`, with the jobs
/// `source` finds between steps; the jobs it hands back (a model that cannot) end with an error.
pub(super) fn run<H: Hosted, M: Member + 'static>(jobs: Vec<M>, mut source: Source<'_, '_, H, M>) {
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

impl<H: Hosted, M: Member + 'static> Source<'_, '_, H, M> {
    /// `job` as the batch takes it: its events streamed to where its queue keeps them, its limits, its outcome
    /// settled there.
    fn ticket(&self, job: M) -> Joining {
        let job = Rc::new(job);
        job.start();
        let emit = job.emitter();
        emit("batch", serde_json::json!({ "continuous": true }).to_string());
        self.counters.note_joined();
        let (start, limits) = (Instant::now(), self.limits.clone());
        let watch = {
            let (job, wall) = (job.clone(), limits.wall_time);
            Box::new(move || -> Result<()> {
                if job.cancel().load(Ordering::Relaxed) || start.elapsed() > wall {
                    return Err(Error::TimeLimit { seconds: wall.as_secs_f64() });
                }
                Ok(())
            })
        };
        let log = {
            let emit = emit.clone();
            Rc::new(move |line: String| emit("log", super::log_event(&line)))
        };
        let sent = Rc::new(move |label: String, t: tch::Tensor| {
            if let Some(data) = super::value_event(label, &t) {
                emit("value", data);
            }
        });
        let what = job.job().clone();
        let done = Box::new(move |outcome: Result<crate::interleave::Finished>| {
            let result =
                outcome.and_then(|f| check_saved(&f, &limits).map(|()| f)).and_then(|f| protocol::encode_result(&f));
            job.settle(result.map_err(|e| WireError::from(&e)));
        });
        Joining { job: what, watch, log, sent, done }
    }

    /// The rows of `job`'s batch.
    fn rows(&self, job: &M) -> usize {
        self.model.batch_shape(job.job()).map_or(1, |s| s.0)
    }
}

impl<H: Hosted, M: Member + 'static> Arrivals for Source<'_, '_, H, M> {
    fn poll(&mut self, running_rows: usize) -> Vec<Joining> {
        let mut others: Vec<M> = Vec::new();
        if let Some(more) = self.more.as_mut() {
            for job in more() {
                match joins(self.model, job.job(), self.policy, self.limits) && same_edits(&self.like, job.job()) {
                    true => self.waiting.push_back(job),
                    false => others.push(job),
                }
            }
        }
        if !others.is_empty() {
            // Jobs that cannot join run now, between two decode steps (alone or co-batched as traces).
            super::cobatch::run_members(self.model, others, self.limits, self.policy, self.counters);
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
