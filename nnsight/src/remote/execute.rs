//! Running a request's job on a model, within limits: what a server's worker does with each job. Only the graph's
//! ops run (each one this program knows); no code of the client's runs.

use super::wire::ModelInfo;
use crate::exec::{Job, Watch};
use crate::graph::Value;
use crate::interleave::Finished;
use crate::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What one request may ask for.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Most bytes of a request (default 64 MiB).
    pub request_bytes: u64,
    /// Most nodes in its graphs, the block's and its edits' together (default 100 000).
    pub graph_nodes: u64,
    /// Most bytes of the values it saves (default 1 GiB).
    pub saved_bytes: u64,
    /// Most bytes of any one value its graphs compute (default 1 GiB): an op whose result would be larger is
    /// refused before it allocates (see [`crate::interleave::with_value_cap`]).
    pub value_bytes: u64,
    /// Longest it may run (default 300 s); past it the job is cancelled at the next module call.
    pub wall_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_bytes: 64 << 20,
            graph_nodes: 100_000,
            saved_bytes: 1 << 30,
            value_bytes: 1 << 30,
            wall_time: Duration::from_secs(300),
        }
    }
}

/// A model a server hosts: it runs jobs here and describes itself to clients. [`crate::LanguageModel`] is one
/// (a worker thread owns it, hence `Send`).
pub trait Hosted: Send + 'static {
    /// Runs `job` on this model, `watch` called at every hook event (see [`crate::exec::run_job`]).
    fn run_job(&self, job: &Job, watch: Watch<'_>) -> Result<Finished>;
    /// What a client needs to build a handle of it, under the name `name` ([`ModelInfo`]).
    fn describe(&self, name: &str) -> Result<ModelInfo>;
    /// The rows and the padded length of `job`'s batch were it run alone: a server co-batching jobs merges only
    /// jobs of one length (padding a job's rows to another length would change the shapes of its values). `None`
    /// (the default): the model cannot say, and the job runs alone.
    fn batch_shape(&self, job: &Job) -> Option<(usize, usize)> {
        let _ = job;
        None
    }
    /// Whether `job` can take part in a continuous batch of generations ([`Hosted::run_generations`]): a
    /// generation whose graph reads nothing that depends on the other rows' cache lengths. `false` (the default):
    /// it runs alone.
    fn joins(&self, job: &Job) -> bool {
        let _ = job;
        false
    }
    /// Runs the generations `first` and those `arrivals` hands over between decode steps as one continuous batch
    /// (each job's prefill alone, then one decode step over every running job's rows at a time; a job joins after
    /// its prefill and leaves when its rows stop), until none is left; each job's outcome goes to its
    /// [`Joining::done`]. Only jobs for which [`Hosted::joins`] is true may be handed over. The default (a model
    /// that cannot) runs none and hands `first` back.
    fn run_generations(&self, first: Vec<Joining>, arrivals: &mut dyn Arrivals) -> Vec<Joining> {
        let _ = arrivals;
        first
    }
}

/// A generation job handed to [`Hosted::run_generations`], with where its events and outcome go.
pub struct Joining {
    /// The job (a [`Job::Generate`] for which [`Hosted::joins`] is true).
    pub job: Job,
    /// Called before each of the job's steps; an `Err` ends the job with it (its time limit, its cancellation).
    pub watch: Box<dyn Fn() -> Result<()>>,
    /// Receives the job's `log!` lines as they come.
    pub log: std::rc::Rc<dyn Fn(String)>,
    /// Receives the job's `send!` values as they come.
    pub sent: std::rc::Rc<dyn Fn(String, tch::Tensor)>,
    /// Receives the job's outcome (its saved values, or the error that ended it).
    pub done: Box<dyn FnOnce(Result<Finished>)>,
}

/// Where a continuous batch finds the jobs that join it between decode steps.
pub trait Arrivals {
    /// The jobs that join now, given the rows running (what does not fit, or cannot join, the source keeps or runs
    /// otherwise). Called between decode steps; it should not wait when `running_rows > 0`.
    fn poll(&mut self, running_rows: usize) -> Vec<Joining>;
    /// Called after each decode step with the rows it ran (for a server's counters); the default does nothing.
    fn stepped(&mut self, rows: usize) {
        let _ = rows;
    }
}

/// Runs `job` on `model` within `limits`; `cancel` set from elsewhere stops it at the next module call.
pub fn execute<H: Hosted + ?Sized>(model: &H, job: &Job, limits: &Limits, cancel: &AtomicBool) -> Result<Finished> {
    check(job, limits)?;
    let start = Instant::now();
    let seconds = limits.wall_time.as_secs_f64();
    let watch = move || -> Result<()> {
        if cancel.load(Ordering::Relaxed) || start.elapsed() > limits.wall_time {
            return Err(Error::TimeLimit { seconds });
        }
        Ok(())
    };
    let finished = crate::interleave::with_value_cap(limits.value_bytes, || model.run_job(job, &watch))?;
    check_saved(&finished, limits)?;
    Ok(finished)
}

/// What is checked of `job` before it runs: its graphs' node count within `limits`, and every function they call
/// known here.
pub fn check(job: &Job, limits: &Limits) -> Result<()> {
    let nodes: u64 = job.graphs().map(|g| g.nodes.len() as u64).sum();
    if nodes > limits.graph_nodes {
        return Err(Error::Limit { what: "graph nodes".into(), limit: limits.graph_nodes, given: nodes });
    }
    for g in job.graphs() {
        crate::function::validate(g)?;
    }
    Ok(())
}

/// What is checked of a job's results after it ran: the bytes of its saved values within `limits`.
pub fn check_saved(finished: &Finished, limits: &Limits) -> Result<()> {
    let saved: u64 = finished.values.values().map(bytes_of).sum();
    if saved > limits.saved_bytes {
        return Err(Error::Limit { what: "saved bytes".into(), limit: limits.saved_bytes, given: saved });
    }
    Ok(())
}

/// Bytes of the tensors in a value.
fn bytes_of(v: &Value) -> u64 {
    match v {
        Value::Tensor(t) => (t.numel() * t.kind().elt_size_in_bytes()) as u64,
        Value::Scalar(_) => 8,
        Value::Tuple(items) => items.iter().map(bytes_of).sum(),
        Value::Map(entries) => entries.iter().map(|(_, v)| bytes_of(v)).sum(),
    }
}
