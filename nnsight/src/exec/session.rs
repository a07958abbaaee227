//! A session as one job ([`Job::Session`]): its blocks run one after another on the server, and a later block takes
//! values an earlier one saved by reference ([`Import`]), so they never travel back to the client in between.
//!
//! A block's graph holds a constant placeholder for each value it imports; before the block runs, each placeholder
//! becomes the value (a tensor or a number) that the earlier block saved. The job's result is one [`Finished`]:
//! block `b`'s node `n` is node `offset(b) + n` in it, `offset(b)` being the node count of the blocks before it
//! ([`offsets`]); [`split`] hands each block its own back.

use super::job::Job;
use crate::graph::{Constant, NodeId, Op, TensorData, Value};
use crate::interleave::Finished;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// One block of a session job: a trace or a generation job, and the values it takes from earlier blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionBlock {
    /// The block (a [`Job::Trace`] or a [`Job::Generate`]).
    pub job: Job,
    /// Its constants that stand for values of earlier blocks.
    #[serde(default)]
    pub imports: Vec<Import>,
}

/// A value crossing blocks: constant `node` of this block's graph is, when it runs, the value that block `block`
/// (an earlier one; 0 is the first) saved of its node `from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Import {
    /// The placeholder constant of this block's graph.
    pub node: NodeId,
    /// The earlier block.
    pub block: u32,
    /// The node of that block whose saved value it takes.
    pub from: NodeId,
}

fn protocol(message: String) -> Error {
    Error::Protocol { message }
}

/// Checks a session's structure: at least one block, each a trace or a generation, every import naming an earlier
/// block's saved node and a constant of its own block. Anything else is a [`Error::Protocol`] naming the block.
pub fn validate(blocks: &[SessionBlock]) -> Result<()> {
    if blocks.is_empty() {
        return Err(protocol("a session job has no blocks".into()));
    }
    let mut total: u64 = 0;
    for (i, b) in blocks.iter().enumerate() {
        let n = i + 1;
        let graph = match &b.job {
            Job::Trace { graph, .. } | Job::Generate { graph, .. } => graph,
            Job::Session { .. } => return Err(protocol(format!("block {n} of the session is itself a session"))),
        };
        total += graph.nodes.len() as u64;
        for imp in &b.imports {
            let at = format!("block {n} of the session imports node {} of block {}", imp.from, imp.block + 1);
            if imp.block as usize >= i {
                return Err(protocol(format!("{at}: only an earlier block's values can be imported")));
            }
            match graph.nodes.get(imp.node as usize).map(|node| &node.op) {
                Some(Op::Const { .. }) => {}
                Some(op) => {
                    return Err(protocol(format!(
                        "{at} into node {}, a {}: expected a constant",
                        imp.node,
                        op.describe()
                    )))
                }
                None => {
                    let len = graph.nodes.len();
                    return Err(protocol(format!("{at} into node {}, but the block has {len} nodes", imp.node)));
                }
            }
            let saved = blocks[imp.block as usize].job.graphs().next().is_some_and(|from| {
                from.nodes.iter().any(|node| matches!(node.op, Op::Save { value } if value == imp.from))
            });
            if !saved {
                return Err(protocol(format!("{at}, which that block does not save")));
            }
        }
    }
    if total > u64::from(NodeId::MAX) {
        return Err(protocol(format!("a session job of {total} nodes is too large")));
    }
    Ok(())
}

/// Where each block's nodes start in the session's result: the node counts of the blocks before it.
pub fn offsets(blocks: &[SessionBlock]) -> Vec<NodeId> {
    let mut at: NodeId = 0;
    blocks
        .iter()
        .map(|b| {
            let start = at;
            if let Job::Trace { graph, .. } | Job::Generate { graph, .. } = &b.job {
                at = at.saturating_add(graph.nodes.len() as NodeId);
            }
            start
        })
        .collect()
}

/// Runs a session's `blocks` one after another with `run` (the job of one block, its imports resolved), and puts
/// their results together ([`offsets`]). A block's error names the block (not a limit or a time limit, which are
/// the whole job's).
pub fn run_session(blocks: &[SessionBlock], run: impl Fn(&Job) -> Result<Finished>) -> Result<Finished> {
    validate(blocks)?;
    let mut done: Vec<Finished> = Vec::with_capacity(blocks.len());
    for (i, b) in blocks.iter().enumerate() {
        let finished = resolve(b, &done).and_then(|job| run(&job)).map_err(|e| in_block(i, e))?;
        done.push(finished);
    }
    let mut all = Finished { values: HashMap::new(), unreached: Default::default() };
    for (finished, offset) in done.into_iter().zip(offsets(blocks)) {
        all.values.extend(finished.values.into_iter().map(|(id, v)| (id + offset, v)));
        all.unreached.extend(finished.unreached.into_iter().map(|id| id + offset));
    }
    Ok(all)
}

/// The block's job with each import's placeholder replaced by the value `done` (the earlier blocks' results)
/// holds.
fn resolve(block: &SessionBlock, done: &[Finished]) -> Result<Job> {
    let mut job = block.job.clone();
    let graph = match &mut job {
        Job::Trace { graph, .. } | Job::Generate { graph, .. } => graph,
        Job::Session { .. } => return Err(protocol("a session inside a session".into())),
    };
    for imp in &block.imports {
        let from = done.get(imp.block as usize).ok_or_else(|| protocol(format!("no block {}", imp.block + 1)))?;
        let what = format!("node {} of block {}", imp.from, imp.block + 1);
        let constant = match from.values.get(&imp.from) {
            Some(Value::Tensor(t)) => Constant::Tensor(TensorData::from_tensor(t)?),
            Some(Value::Scalar(s)) => Constant::Scalar(*s),
            Some(other) => {
                return Err(Error::InvalidInput {
                    message: format!(
                        "{what} is a {}: only tensors and numbers cross the blocks of a session on a server",
                        other.kind_name()
                    ),
                })
            }
            None => {
                return Err(Error::NeverReached {
                    node: what,
                    reason: "the block ended before it (a `stop()`, or a generation step that never came)".into(),
                })
            }
        };
        if let Some(node) = graph.nodes.get_mut(imp.node as usize) {
            node.op = Op::Const { value: constant };
        }
    }
    Ok(job)
}

/// `e`, raised by block `i` (from 0), naming the block; the whole job's limits stay as they are.
fn in_block(i: usize, e: Error) -> Error {
    match e {
        e @ (Error::TimeLimit { .. } | Error::Limit { .. } | Error::Busy { .. } | Error::SessionBlock { .. }) => e,
        e => Error::SessionBlock { block: i + 1, source: Box::new(e) },
    }
}

/// A session job's result (see [`run_session`]) split back into its blocks' results, by the node counts of
/// their graphs (`sizes`, in order). A node beyond the last block is a [`Error::Protocol`].
pub fn split(all: Finished, sizes: &[usize]) -> Result<Vec<Finished>> {
    let mut out: Vec<Finished> =
        sizes.iter().map(|_| Finished { values: HashMap::new(), unreached: Default::default() }).collect();
    let starts: Vec<u64> = sizes
        .iter()
        .scan(0u64, |at, &n| {
            let start = *at;
            *at += n as u64;
            Some(start)
        })
        .collect();
    let end: u64 = sizes.iter().map(|&n| n as u64).sum();
    let place = |id: NodeId| -> Result<(usize, NodeId)> {
        let id64 = u64::from(id);
        if id64 >= end {
            return Err(protocol(format!("the session's result names node {id}, beyond its {end} nodes")));
        }
        let b = starts.partition_point(|&s| s <= id64) - 1;
        Ok((b, (id64 - starts[b]) as NodeId))
    };
    for (id, v) in all.values {
        let (b, id) = place(id)?;
        out[b].values.insert(id, v);
    }
    for id in all.unreached {
        let (b, id) = place(id)?;
        out[b].unreached.insert(id);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Graph;

    fn block(graph: Graph, imports: Vec<Import>) -> SessionBlock {
        SessionBlock { job: Job::Trace { graph, inputs: vec![Some("a".into())], edits: vec![] }, imports }
    }

    fn saving() -> Graph {
        let mut g = Graph::default();
        g.push(Op::Const { value: Constant::Scalar(1.0) }, 0);
        g.push(Op::Save { value: 0 }, 0);
        g
    }

    #[test]
    fn bad_imports_are_protocol_errors_naming_the_block() {
        let ok = Import { node: 0, block: 0, from: 0 };
        assert!(validate(&[block(saving(), vec![]), block(saving(), vec![ok])]).is_ok());
        let cases = [
            (Import { node: 0, block: 1, from: 0 }, "only an earlier block"),
            (Import { node: 1, block: 0, from: 0 }, "expected a constant"),
            (Import { node: 9, block: 0, from: 0 }, "the block has 2 nodes"),
            (Import { node: 0, block: 0, from: 1 }, "does not save"),
        ];
        for (imp, says) in cases {
            let e = validate(&[block(saving(), vec![]), block(saving(), vec![imp])]).unwrap_err();
            assert!(
                matches!(&e, Error::Protocol { message } if message.contains("block 2") && message.contains(says)),
                "{e}"
            );
        }
        assert!(matches!(validate(&[]), Err(Error::Protocol { .. })));
        let nested = SessionBlock { job: Job::Session { blocks: vec![] }, imports: vec![] };
        assert!(
            matches!(validate(&[nested]), Err(Error::Protocol { message }) if message.contains("itself a session"))
        );
    }

    #[test]
    fn results_split_back_by_block() {
        let mut all = Finished { values: HashMap::new(), unreached: Default::default() };
        all.values.insert(1, Value::Scalar(1.0));
        all.values.insert(3, Value::Scalar(2.0));
        all.unreached.insert(4);
        let parts = split(all, &[2, 3]).unwrap();
        assert!(matches!(parts[0].values.get(&1), Some(Value::Scalar(x)) if *x == 1.0));
        assert!(matches!(parts[1].values.get(&1), Some(Value::Scalar(x)) if *x == 2.0));
        assert!(parts[1].unreached.contains(&2));
        let mut beyond = Finished { values: HashMap::new(), unreached: Default::default() };
        beyond.unreached.insert(5);
        assert!(matches!(split(beyond, &[2, 3]), Err(Error::Protocol { .. })));
    }
}
