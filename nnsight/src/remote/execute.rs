//! Running a request's job on a model, within limits: what a server's worker does with each job. Only the graph's
//! ops run (each one this program knows); no code of the client's runs.

use super::protocol::Job;
use crate::envoy::generate::run_generate;
use crate::envoy::trace::run_trace;
use crate::envoy::Edited;
use crate::graph::Value;
use crate::interleave::Finished;
use crate::models::CausalLm;
use crate::{Error, LanguageModel, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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

/// Runs `job` on `model` within `limits`; `cancel` set from elsewhere stops it at the next module call.
pub fn execute<M: CausalLm>(
    model: &LanguageModel<M>,
    job: &Job,
    limits: &Limits,
    cancel: &AtomicBool,
) -> Result<Finished> {
    let nodes: u64 = job.graphs().map(|g| g.nodes.len() as u64).sum();
    if nodes > limits.graph_nodes {
        return Err(Error::Limit { what: "graph nodes".into(), limit: limits.graph_nodes, given: nodes });
    }
    for g in job.graphs() {
        crate::function::validate(g)?;
    }
    let start = Instant::now();
    let seconds = limits.wall_time.as_secs_f64();
    let watch = move || -> Result<()> {
        if cancel.load(Ordering::Relaxed) || start.elapsed() > limits.wall_time {
            return Err(Error::TimeLimit { seconds });
        }
        Ok(())
    };
    let finished = crate::interleave::with_value_cap(limits.value_bytes, || run(model, job, &watch))?;
    let saved: u64 = finished.values.values().map(bytes_of).sum();
    if saved > limits.saved_bytes {
        return Err(Error::Limit { what: "saved bytes".into(), limit: limits.saved_bytes, given: saved });
    }
    Ok(finished)
}

/// The job's run, its graphs and edits on `model`, `watch` called at every module event.
fn run<M: CausalLm>(model: &LanguageModel<M>, job: &Job, watch: &dyn Fn() -> Result<()>) -> Result<Finished> {
    Ok(match job {
        Job::Trace { graph, inputs, edits } => {
            if edits.is_empty() {
                run_trace(model, graph, inputs, Some(watch))?
            } else {
                let edited = Edited::with_edits(model, edits.iter().cloned().map(Arc::new).collect());
                run_trace(&edited, graph, inputs, Some(watch))?
            }
        }
        Job::Generate { graph, inputs, options, edits } => {
            if options.on_token.is_some() {
                return Err(Error::InvalidInput { message: "a request cannot carry an `on_token` callback".into() });
            }
            if edits.is_empty() {
                run_generate(model, graph, inputs, options, Some(watch))?
            } else {
                let edited = Edited::with_edits(model, edits.iter().cloned().map(Arc::new).collect());
                run_generate(&edited, graph, inputs, options, Some(watch))?
            }
        }
    })
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
