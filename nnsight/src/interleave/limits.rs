//! The value cap of a run ([`with_value_cap`]): a server refuses a value over the cap before an op that can
//! outgrow its inputs allocates it (`check_growth`), and any other value right after (`check_size`).

use super::sinks::with_thread_value;
use crate::graph::{NodeId, Op, Value};
use crate::{Error, Result};

thread_local! {
    /// The most bytes one value of a graph may have on this thread (`None`: no cap); see [`with_value_cap`].
    static VALUE_CAP: std::cell::RefCell<Option<u64>> = const { std::cell::RefCell::new(None) };
}

/// The cap in force on this thread, if any.
pub(super) fn current_cap() -> Option<u64> {
    VALUE_CAP.with(|c| *c.borrow())
}

/// Runs `f` with every graph run on this thread (a block's and its edits') refusing to compute a value of more
/// than `bytes` bytes: an op whose result would be larger (a broadcast, `cat`, `stack`, `matmul`) is an
/// [`Error::Limit`] before it allocates, and any other result over the cap is one right after. A server caps each
/// job this way, so a graph cannot exhaust its memory.
pub fn with_value_cap<T>(bytes: u64, f: impl FnOnce() -> T) -> T {
    with_thread_value(&VALUE_CAP, Some(bytes), f)
}

/// An error if `op`'s result on `inputs` would be larger than `cap` bytes (known before computing it for the ops
/// whose result can outgrow their inputs). Every op is named here, so a new one must say whether it grows.
pub(super) fn check_growth(id: NodeId, op: &Op, inputs: &[&Value], cap: u64) -> Result<()> {
    let shape = |v: &Value| v.tensor().ok().map(|t| (t.size(), t.kind().elt_size_in_bytes() as u64));
    let broadcast = |shapes: &[Vec<i64>]| -> Vec<i64> {
        let n = shapes.iter().map(Vec::len).max().unwrap_or(0);
        (0..n)
            .map(|i| shapes.iter().map(|s| if i + s.len() >= n { s[i + s.len() - n] } else { 1 }).max().unwrap_or(1))
            .collect()
    };
    let (dims, elt): (Vec<i64>, u64) = match op {
        Op::Binary { kind: crate::graph::BinaryOp::Matmul, .. } => {
            let (Some((a, ea)), Some((b, eb))) = (shape(inputs[0]), shape(inputs[1])) else { return Ok(()) };
            if a.len() < 2 || b.len() < 2 {
                return Ok(());
            }
            let mut out = broadcast(&[a[..a.len() - 2].to_vec(), b[..b.len() - 2].to_vec()]);
            out.extend([a[a.len() - 2], b[b.len() - 1]]);
            (out, ea.max(eb))
        }
        Op::Binary { .. } | Op::Where { .. } => {
            let shapes: Vec<(Vec<i64>, u64)> = inputs.iter().filter_map(|v| shape(v)).collect();
            let dims: Vec<Vec<i64>> = shapes.iter().map(|s| s.0.clone()).collect();
            (broadcast(&dims), shapes.iter().map(|s| s.1).max().unwrap_or(4))
        }
        Op::Cat { .. } | Op::Stack { .. } => {
            let shapes: Vec<(Vec<i64>, u64)> = inputs.iter().filter_map(|v| shape(v)).collect();
            let total: i64 = shapes.iter().map(|s| s.0.iter().product::<i64>()).sum();
            (vec![total], shapes.iter().map(|s| s.1).max().unwrap_or(4))
        }
        // A dtype change keeps the shape and may widen each element.
        Op::ToKind { kind, .. } => {
            let Some((dims, _)) = shape(inputs[0]) else { return Ok(()) };
            (dims, crate::graph::value::kind_from_name(kind)?.elt_size_in_bytes() as u64)
        }
        // No larger than an input (the same shape, a view, a part, a reduction), or of a size known only by
        // computing it (a module call, a registered function: `check_size` takes it right after), or no tensor.
        Op::BinaryScalar { .. }
        | Op::Unary { .. }
        | Op::Reduce { .. }
        | Op::MaxMinDim { .. }
        | Op::Norm { .. }
        | Op::Softmax { .. }
        | Op::Argmax { .. }
        | Op::Topk { .. }
        | Op::Reshape { .. }
        | Op::Transpose { .. }
        | Op::Permute { .. }
        | Op::Narrow { .. }
        | Op::Select { .. }
        | Op::Index { .. }
        | Op::ToDevice { .. }
        | Op::Gather { .. }
        | Op::TupleGet { .. }
        | Op::Unsqueeze { .. }
        | Op::Squeeze { .. }
        | Op::Choose { .. }
        | Op::Save { .. }
        | Op::Const { .. }
        | Op::Apply { .. }
        | Op::Call { .. }
        | Op::Log { .. }
        | Op::Send { .. }
        | Op::Read { .. }
        | Op::ReadInputs { .. }
        | Op::Generated
        | Op::Write { .. }
        | Op::Skip { .. }
        | Op::Cache { .. }
        | Op::Stop
        | Op::Guard { .. }
        | Op::Backward { .. }
        | Op::Grad { .. }
        | Op::ParamGrad { .. }
        | Op::GradWrite { .. } => return Ok(()),
    };
    within_cap(id, op, dims.iter().fold(elt, |acc, &d| acc.saturating_mul(d.max(0) as u64)), cap)
}

/// An error if `v` is larger than `cap` bytes.
pub(super) fn check_size(id: NodeId, op: &Op, v: &Value, cap: u64) -> Result<()> {
    match v {
        Value::Tensor(t) => {
            within_cap(id, op, (t.numel() as u64).saturating_mul(t.kind().elt_size_in_bytes() as u64), cap)
        }
        _ => Ok(()),
    }
}

/// The limit error of node `id`'s result of `bytes` bytes, if that is over `cap`.
fn within_cap(id: NodeId, op: &Op, bytes: u64, cap: u64) -> Result<()> {
    if bytes > cap {
        return Err(Error::Limit {
            what: format!("bytes of node {id}'s result ({})", op.describe()),
            limit: cap,
            given: bytes,
        });
    }
    Ok(())
}
