//! Several trace jobs as one ([`merge`]): a server co-batching the jobs waiting for a model runs them as one trace,
//! each job's graph appended as its own invokes over its own rows, then splits the saved values back per job
//! ([`Merged::split`]).
//!
//! What may merge ([`mergeable`]): a trace whose every invoke has its own input (no whole-batch invoke), whose
//! graph is well formed and names only its own invokes, and whose graphs take no gradients and skip no module
//! (a skip must be given by every invoke of a pass, a backward sees the whole pass). Jobs merge only when their
//! persistent edits are equal (an edit's graph sees the whole batch), and those edits must neither `log!` nor
//! `send!` (their lines would show every job's rows).

use super::job::Job;
use crate::graph::{Graph, NodeId, Op};
use crate::interleave::Finished;
use std::ops::Range;

/// Whether `job` can run in one trace with others (see the [module docs](self)).
pub fn mergeable(job: &Job) -> bool {
    let Job::Trace { graph, inputs, edits } = job else { return false };
    if inputs.is_empty() || inputs.iter().any(Option::is_none) || graph.validate().is_err() {
        return false;
    }
    let invokes = inputs.len() as u32;
    if graph.nodes.iter().any(|n| n.invoke >= invokes || !merges(&n.op)) {
        return false;
    }
    edits.iter().all(|e| e.nodes.iter().all(|n| merges(&n.op) && !matches!(n.op, Op::Log { .. } | Op::Send { .. })))
}

/// Whether a node of this op can run beside other jobs' nodes.
fn merges(op: &Op) -> bool {
    !matches!(op, Op::Skip { .. } | Op::Backward { .. } | Op::Grad { .. } | Op::ParamGrad { .. } | Op::GradWrite { .. })
}

/// Whether two mergeable jobs may run in one trace, or two generations in one continuous batch: they are of one
/// kind and their persistent edits are equal.
pub fn same_edits(a: &Job, b: &Job) -> bool {
    match (a, b) {
        (Job::Trace { edits: x, .. }, Job::Trace { edits: y, .. }) => x == y,
        (Job::Generate { edits: x, .. }, Job::Generate { edits: y, .. }) => x == y,
        _ => false,
    }
}

/// Whether a generation job can run in a continuous batch beside others (each invoke has its own input; no node
/// skips a module, takes gradients or touches attention probabilities, whose last dimension is the batch's cache
/// length, not the job's own; its edits log and send nothing). The model must agree too (see
/// [`crate::remote::Hosted::joins`]).
pub fn joins_continuous(job: &Job) -> bool {
    let Job::Generate { graph, inputs, options, edits } = job else { return false };
    if inputs.is_empty()
        || inputs.iter().any(Option::is_none)
        || options.on_token.is_some()
        || graph.validate().is_err()
    {
        return false;
    }
    let invokes = inputs.len() as u32;
    let own_rows = |op: &Op| match op {
        Op::Read { module, .. } | Op::ReadInputs { module, .. } | Op::Write { module, .. } => {
            !module.ends_with(".probs")
        }
        op => merges(op),
    };
    if graph.nodes.iter().any(|n| n.invoke >= invokes || !own_rows(&n.op)) {
        return false;
    }
    edits.iter().all(|e| e.nodes.iter().all(|n| own_rows(&n.op) && !matches!(n.op, Op::Log { .. } | Op::Send { .. })))
}

/// The one trace several jobs run as, and where each job's nodes and invokes lie in it.
#[derive(Debug)]
pub struct Merged {
    /// The merged job: the graphs one after another, the inputs likewise, the edits of the first (all equal).
    pub job: Job,
    /// Each job's nodes and invokes in the merged graph.
    parts: Vec<(Range<NodeId>, Range<u32>)>,
}

/// The jobs as one trace, or `None` when one of them is not [`mergeable`] or their edits differ.
pub fn merge(jobs: &[&Job]) -> Option<Merged> {
    let first = jobs.first()?;
    if !jobs.iter().all(|j| mergeable(j) && same_edits(first, j)) {
        return None;
    }
    let mut graph = Graph::default();
    let mut inputs = Vec::new();
    let mut parts = Vec::with_capacity(jobs.len());
    for job in jobs {
        let Job::Trace { graph: g, inputs: i, .. } = job else { return None };
        let invokes = inputs.len() as u32;
        let start = graph.append(g, invokes);
        parts.push((start..start + g.nodes.len() as NodeId, invokes..invokes + i.len() as u32));
        inputs.extend(i.iter().cloned());
    }
    let Job::Trace { edits, .. } = first else { return None };
    Some(Merged { job: Job::Trace { graph, inputs, edits: edits.clone() }, parts })
}

impl Merged {
    /// How many jobs it holds.
    pub fn len(&self) -> usize {
        self.parts.len()
    }

    /// Whether it holds no job.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The job (its index in the list given to [`merge`]) that owns invoke `invoke` of the merged trace.
    pub fn job_of_invoke(&self, invoke: u32) -> Option<usize> {
        self.parts.iter().position(|(_, inv)| inv.contains(&invoke))
    }

    /// Each job's own invoke for each invoke of the merged trace (index: the merged invoke).
    pub fn invoke_owners(&self) -> Vec<usize> {
        self.parts.iter().enumerate().flat_map(|(j, (_, inv))| inv.clone().map(move |_| j)).collect()
    }

    /// The merged run's saved values and unreached nodes split per job, under each job's own node ids.
    pub fn split(&self, finished: Finished) -> Vec<Finished> {
        let mut out: Vec<Finished> =
            self.parts.iter().map(|_| Finished { values: Default::default(), unreached: Default::default() }).collect();
        let owner = |id: NodeId| self.parts.iter().position(|(nodes, _)| nodes.contains(&id));
        for (id, value) in finished.values {
            if let Some(j) = owner(id) {
                out[j].values.insert(id - self.parts[j].0.start, value);
            }
        }
        for id in finished.unreached {
            if let Some(j) = owner(id) {
                out[j].unreached.insert(id - self.parts[j].0.start);
            }
        }
        out
    }
}
