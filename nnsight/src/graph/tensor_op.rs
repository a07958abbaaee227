//! The pure tensor operations of the graph ([`TensorOp`]): what each computes from its operands alone, with the
//! kinds of its binary, unary and reduction operators. The interleaver evaluates them, on values and on shapes
//! alone, and checks their growth side by side in `interleave::tensor_ops`.

use super::{IndexItem, NodeId};
use serde::{Deserialize, Serialize};

/// Binary tensor operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BinaryOp {
    /// `a + b`
    Add,
    /// `a - b`
    Sub,
    /// `a * b`
    Mul,
    /// `a / b`
    Div,
    /// `a.pow(b)`
    Pow,
    /// Matrix product.
    Matmul,
    /// Elementwise maximum.
    Maximum,
    /// Elementwise minimum.
    Minimum,
    /// `a == b` (bool tensor).
    Eq,
    /// `a > b`
    Gt,
    /// `a < b`
    Lt,
    /// `a >= b`
    Ge,
    /// `a <= b`
    Le,
    /// `a != b`
    Ne,
    /// Logical and (nonzero is true).
    And,
    /// Logical or (nonzero is true).
    Or,
}

/// Unary tensor operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnaryOp {
    /// `-a`
    Neg,
    /// `exp(a)`
    Exp,
    /// `ln(a)`
    Log,
    /// `|a|`
    Abs,
    /// `sqrt(a)`
    Sqrt,
    /// A copy.
    Clone,
    /// Cut from autograd.
    Detach,
    /// Zeros of the same shape and dtype.
    ZerosLike,
    /// Ones of the same shape and dtype.
    OnesLike,
    /// Standard normal noise of the same shape and dtype.
    RandnLike,
    /// Contiguous layout.
    Contiguous,
    /// Logical not (nonzero is true): a bool tensor.
    Not,
}

/// Reductions over dimensions (all dimensions when `dims` is empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReduceOp {
    /// Sum.
    Sum,
    /// Mean.
    Mean,
    /// Maximum values (one dimension: values only; see `MaxDim` for indices).
    Max,
    /// Minimum values.
    Min,
}

/// A pure tensor operation of the graph: its result depends on its operands' values alone (no hook, no control
/// flow, no gradient). Operands are earlier nodes (`a`, `b`, `xs`, ...); each variant's doc says what it
/// computes, and its field names follow PyTorch's arguments. In JSON it is an [`Op`](super::Op) like any other
/// (`{"op": "cat", "xs": [1], "dim": 0}`).
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, strum::VariantNames)]
#[serde(tag = "op", rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum TensorOp {
    /// `a op b`, both nodes.
    Binary { kind: BinaryOp, a: NodeId, b: NodeId },
    /// `a op s` (or `s op a` when `scalar_first`).
    BinaryScalar { kind: BinaryOp, a: NodeId, scalar: f64, scalar_first: bool },
    /// `op(a)`.
    Unary { kind: UnaryOp, a: NodeId },
    /// A reduction over `dims` (all when empty).
    Reduce { kind: ReduceOp, a: NodeId, dims: Vec<i64>, keepdim: bool },
    /// Maximum or minimum along `dim` with indices: a (values, indices) tuple.
    MaxMinDim { a: NodeId, dim: i64, keepdim: bool, max: bool },
    /// `p`-norm over `dims` (all when empty).
    Norm { a: NodeId, p: f64, dims: Vec<i64>, keepdim: bool },
    /// Softmax (or log-softmax) along `dim`.
    Softmax { a: NodeId, dim: i64, log: bool },
    /// Index of the maximum along `dim` (over all elements when `None`).
    Argmax { a: NodeId, dim: Option<i64>, keepdim: bool },
    /// The `k` largest (or smallest) values along `dim`: a (values, indices) tuple.
    Topk { a: NodeId, k: i64, dim: i64, largest: bool },
    /// New shape (one `-1` allowed).
    Reshape { a: NodeId, shape: Vec<i64> },
    /// Swap two dimensions.
    Transpose { a: NodeId, dim0: i64, dim1: i64 },
    /// Reorder dimensions.
    Permute { a: NodeId, dims: Vec<i64> },
    /// `len` entries from `start` along `dim`.
    Narrow { a: NodeId, dim: i64, start: i64, len: i64 },
    /// Entry `index` along `dim` (that dimension removed).
    Select { a: NodeId, dim: i64, index: i64 },
    /// tch-style indexing (`t.i((.., -1, ..))`).
    Index { a: NodeId, index: Vec<IndexItem> },
    /// Concatenate along `dim`.
    Cat { xs: Vec<NodeId>, dim: i64 },
    /// Stack along a new `dim`.
    Stack { xs: Vec<NodeId>, dim: i64 },
    /// Convert the dtype (a tch `Kind` name, e.g. `"Float"`).
    ToKind { a: NodeId, kind: String },
    /// Move to a device (`"cpu"`, `"cuda:0"`).
    ToDevice { a: NodeId, device: String },
    /// `cond ? a : b` elementwise.
    Where { cond: NodeId, a: NodeId, b: NodeId },
    /// Gather along `dim` at `index`.
    Gather { a: NodeId, dim: i64, index: NodeId },
    /// Element `index` of a tuple value.
    TupleGet { a: NodeId, index: u32 },
    /// Unsqueeze at `dim`.
    Unsqueeze { a: NodeId, dim: i64 },
    /// Squeeze `dim` (all size-1 dimensions when `None`).
    Squeeze { a: NodeId, dim: Option<i64> },
}

impl TensorOp {
    /// The nodes this op reads (its operands, in the order evaluation receives their values).
    pub fn inputs(&self) -> Vec<NodeId> {
        use TensorOp::*;
        match self {
            Binary { a, b, .. } => vec![*a, *b],
            Where { cond, a, b } => vec![*cond, *a, *b],
            Gather { a, index, .. } => vec![*a, *index],
            Cat { xs, .. } | Stack { xs, .. } => xs.clone(),
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
            | Squeeze { a, .. } => vec![*a],
        }
    }
}
