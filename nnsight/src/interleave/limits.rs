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
/// whose result can outgrow their inputs: tensor ops, as `tensor_ops::growth` says). Every op is named here, so a
/// new one must say whether it grows.
pub(super) fn check_growth(id: NodeId, op: &Op, inputs: &[&Value], cap: u64) -> Result<()> {
    let bytes = match op {
        Op::Tensor(t) => super::tensor_ops::growth(t, inputs)?,
        // No larger than an input, or of a size known only by computing it (a module call, a registered function:
        // `check_size` takes it right after), or no tensor.
        Op::Choose { .. }
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
        | Op::GradWrite { .. } => None,
    };
    match bytes {
        Some(bytes) => within_cap(id, op, bytes, cap),
        None => Ok(()),
    }
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
