//! One graph appended to another ([`Graph::append`]): its node ids and invokes shifted past the first graph's, so
//! that several blocks' graphs run as one (a server co-batching its jobs).

use super::{Graph, NodeId, Op, TensorOp};

impl Op {
    /// Every node id this op names (its inputs, and the ids that are not inputs: a branch's end, the read a
    /// gradient write changes, the backward a gradient belongs to), to change in place.
    pub fn ids_mut(&mut self) -> Vec<&mut NodeId> {
        use Op::*;
        match self {
            Read { .. } | ReadInputs { .. } | Generated | Const { .. } | Stop | Cache { .. } => vec![],
            Write { value, .. } | Skip { value, .. } => vec![value],
            Apply { input, .. } => vec![input],
            Save { value } => vec![value],
            Log { a, .. } | Send { a, .. } => vec![a],
            Guard { cond, end } => vec![cond, end],
            Choose { cond, a, b } => vec![cond, a, b],
            Call { args, .. } => args
                .iter_mut()
                .filter_map(|a| match a {
                    super::CallArg::Node(n) => Some(n),
                    _ => None,
                })
                .collect(),
            Backward { a } => vec![a],
            Grad { a, backward } => vec![a, backward],
            ParamGrad { backward, .. } => vec![backward],
            GradWrite { a, value, backward } => vec![a, value, backward],
            Tensor(op) => op.ids_mut(),
        }
    }
}

impl TensorOp {
    /// The nodes this op reads, to change in place (as [`TensorOp::inputs`] lists them).
    pub fn ids_mut(&mut self) -> Vec<&mut NodeId> {
        use TensorOp::*;
        match self {
            Binary { a, b, .. } => vec![a, b],
            Where { cond, a, b } => vec![cond, a, b],
            Gather { a, index, .. } => vec![a, index],
            Cat { xs, .. } | Stack { xs, .. } => xs.iter_mut().collect(),
            BinaryScalar { a, .. }
            | Unary { a, .. }
            | Reduce { a, .. }
            | MaxMinDim { a, .. }
            | Norm { a, .. }
            | Softmax { a, .. }
            | Argmax { a, .. }
            | Topk { a, .. }
            | Reshape { a, .. }
            | Transpose { a, .. }
            | Permute { a, .. }
            | Narrow { a, .. }
            | Select { a, .. }
            | Index { a, .. }
            | ToKind { a, .. }
            | ToDevice { a, .. }
            | TupleGet { a, .. }
            | Unsqueeze { a, .. }
            | Squeeze { a, .. } => vec![a],
        }
    }
}

impl Graph {
    /// Appends `other`'s nodes after this graph's, every id they name shifted by this graph's length and every
    /// invoke by `invoke_offset`; returns the shift (node `n` of `other` is node `shift + n` here). `other`'s nodes
    /// then refer only to one another, and its invokes are its own as long as `invoke_offset` is past this
    /// graph's invokes.
    pub fn append(&mut self, other: &Graph, invoke_offset: u32) -> NodeId {
        let shift = self.nodes.len() as NodeId;
        self.nodes.reserve(other.nodes.len());
        for node in &other.nodes {
            let mut node = node.clone();
            for id in node.op.ids_mut() {
                *id += shift;
            }
            node.invoke += invoke_offset;
            self.nodes.push(node);
        }
        shift
    }
}
