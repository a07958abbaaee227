//! A job: what a request asks a server to run (a graph, its invokes' inputs, the client model's edits, and for a
//! generation its options, or a session's blocks), and its local execution ([`run_job`]), which a server's worker
//! calls on its model.

use super::run::{run_generate, run_trace, Watch};
use super::session::SessionBlock;
use super::target::GenerateTarget;
use crate::generate::GenerateOptions;
use crate::graph::Graph;
use crate::interleave::Finished;
use crate::models::batch::Input;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// What a request asks the server to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Job {
    /// One forward pass with the graph interleaved.
    Trace {
        /// The block's graph.
        graph: Graph,
        /// Each invoke's input (`None`: the whole batch).
        inputs: Vec<Option<Input>>,
        /// Persistent edits to apply first, oldest first (the client model's).
        #[serde(default)]
        edits: Vec<Graph>,
    },
    /// A generation with the graph interleaved in every step.
    Generate {
        /// The block's graph.
        graph: Graph,
        /// Each invoke's input.
        inputs: Vec<Option<Input>>,
        /// Decoding options.
        options: GenerateOptions,
        /// Persistent edits to apply first.
        #[serde(default)]
        edits: Vec<Graph>,
    },
    /// A session's blocks (each a trace or a generation job), run one after another in one job; a later block's
    /// [`Import`](super::session::Import)s take values an earlier block saved (see [`super::session`]).
    Session {
        /// The blocks, in order.
        blocks: Vec<SessionBlock>,
    },
}

impl Job {
    /// The graphs of the job (each block's, then its edits'; a session's blocks in order).
    pub fn graphs(&self) -> Box<dyn Iterator<Item = &Graph> + '_> {
        match self {
            Job::Trace { graph, edits, .. } | Job::Generate { graph, edits, .. } => {
                Box::new(std::iter::once(graph).chain(edits.iter()))
            }
            Job::Session { blocks } => Box::new(blocks.iter().flat_map(|b| b.job.graphs())),
        }
    }

    /// The graphs of the job, to change (in the order of [`Job::graphs`]).
    pub fn graphs_mut(&mut self) -> Box<dyn Iterator<Item = &mut Graph> + '_> {
        match self {
            Job::Trace { graph, edits, .. } | Job::Generate { graph, edits, .. } => {
                Box::new(std::iter::once(graph).chain(edits.iter_mut()))
            }
            Job::Session { blocks } => Box::new(blocks.iter_mut().flat_map(|b| b.job.graphs_mut())),
        }
    }

    /// The invokes' inputs of the job (a session's blocks' together).
    pub fn inputs(&self) -> Vec<&Option<Input>> {
        match self {
            Job::Trace { inputs, .. } | Job::Generate { inputs, .. } => inputs.iter().collect(),
            Job::Session { blocks } => blocks.iter().flat_map(|b| b.job.inputs()).collect(),
        }
    }
}

/// Runs `job` on `target` here: its graph over its inputs, the target's own edits and then the job's in front.
/// `watch` is called at every hook event (a server's time limit and cancellation). A generation's options may not
/// carry an `on_token` callback (no code of a client's runs).
pub fn run_job<T>(target: &T, job: &Job, watch: Option<Watch<'_>>) -> Result<Finished>
where
    T: GenerateTarget<Input = Input, Options = GenerateOptions>,
{
    let edits = |extra: &[Graph]| -> Vec<Arc<Graph>> {
        let mut all = target.edits();
        all.extend(extra.iter().cloned().map(Arc::new));
        all
    };
    match job {
        Job::Trace { graph, inputs, edits: extra } => run_trace(target, graph.into(), inputs, &edits(extra), watch),
        Job::Generate { graph, inputs, options, edits: extra } => {
            if options.on_token.is_some() {
                return Err(Error::InvalidInput { message: "a request cannot carry an `on_token` callback".into() });
            }
            run_generate(target, graph.into(), inputs, options, &edits(extra), watch)
        }
        Job::Session { blocks } => super::session::run_session(blocks, |job| run_job(target, job, watch)),
    }
}
