//! One arm per graph op: what each node computes from its inputs' values (`eval`, and `eval_meta` in a scan on
//! shapes alone), the tensor ops through `tensor_ops`, and how a failing node is named in its error (`at_node`).

use super::tensor_ops;
use crate::graph::{display, CallArg, Constant, Graph, NodeId, Op, Point, Value};
use crate::{Error, Result};

/// Computes an op that needs no hook event from its input values (in the order of [`Op::inputs`]).
pub fn eval(op: &Op, inputs: &[&Value]) -> Result<Value> {
    let t = |e| Error::torch("intervention", e);
    match op {
        Op::Tensor(op) => tensor_ops::eval(op, inputs),
        // Values and control.
        Op::Const { value } => match value {
            Constant::Tensor(d) => Ok(Value::Tensor(d.to_tensor(tch::Device::Cpu)?)),
            Constant::Scalar(s) => Ok(Value::Scalar(*s)),
        },
        Op::Save { .. } => Ok(inputs[0].shallow_clone()),
        Op::Stop => Ok(Value::Tuple(vec![])),
        Op::Call { function, args } => {
            let mut nodes = inputs.iter();
            let mut list = Vec::with_capacity(args.len());
            for arg in args {
                list.push(match arg {
                    CallArg::Node(_) => {
                        crate::function::Arg::Tensor(nodes.next().expect("one input per node argument").tensor()?)
                    }
                    CallArg::Float(x) => crate::function::Arg::Float(*x),
                    CallArg::Int(i) => crate::function::Arg::Int(*i),
                    CallArg::Bool(b) => crate::function::Arg::Bool(*b),
                });
            }
            crate::function::call(function, &list)
        }
        Op::Choose { .. } => Ok(if truth(inputs[0])? { inputs[1] } else { inputs[2] }.shallow_clone()),
        Op::Log { label, .. } => {
            let line = match inputs[0] {
                Value::Tensor(x) if x.numel() == 1 => format!("{label}: {}", x.f_double_value(&[]).map_err(t)?),
                Value::Tensor(x) => format!("{label}: {x}"),
                other => format!("{label}: {other:?}"),
            };
            super::emit_log(line);
            Ok(Value::Tuple(vec![]))
        }
        Op::Send { label, .. } => {
            super::emit_sent(label.clone(), inputs[0].tensor()?.shallow_clone());
            Ok(Value::Tuple(vec![]))
        }
        // A cache's record, filled by the hooks from here on.
        Op::Cache { .. } => Ok(Value::Map(vec![])),
        // The interleaver's own, at a hook event or in a backward pass.
        Op::Read { .. }
        | Op::ReadInputs { .. }
        | Op::Generated
        | Op::Write { .. }
        | Op::Apply { .. }
        | Op::Skip { .. }
        | Op::Guard { .. }
        | Op::Backward { .. }
        | Op::Grad { .. }
        | Op::ParamGrad { .. }
        | Op::GradWrite { .. } => {
            Err(Error::Intervention { message: format!("{} needs the forward pass", op.describe()) })
        }
    }
}

/// Whether a condition's value holds: one value, nonzero. A shape-only (meta) value holds, so that a scan checks
/// both branches.
pub(crate) fn truth(v: &Value) -> Result<bool> {
    let t = match v {
        Value::Scalar(s) => return Ok(*s != 0.0),
        other => other.tensor()?,
    };
    if t.numel() != 1 {
        return Err(Error::Intervention {
            message: format!("a condition must be a single value, found a tensor of shape {:?}", t.size()),
        });
    }
    if crate::meta::is_meta(t) {
        return Ok(true);
    }
    let x = t.f_reshape([-1]).and_then(|f| f.f_to_kind(tch::Kind::Double)).and_then(|f| f.f_double_value(&[0]));
    Ok(x.map_err(|e| Error::torch("condition", e))? != 0.0)
}

/// [`eval`] in a scan: tensor constants are meta tensors of their shape and dtype, the tensor ops run as
/// `tensor_ops::eval_meta` says, `log!` prints the shape; every other op runs as it is, on meta tensors.
pub(super) fn eval_meta(op: &Op, inputs: &[&Value]) -> Result<Value> {
    let t = |e| Error::torch("intervention", e);
    match op {
        Op::Tensor(op) => tensor_ops::eval_meta(op, inputs),
        Op::Const { value: Constant::Tensor(d) } => {
            let kind = crate::graph::value::kind_from_name(&d.kind)?;
            Ok(Value::Tensor(crate::meta::empty(&d.shape, kind).map_err(t)?))
        }
        Op::Log { label, .. } => {
            let line = match inputs[0] {
                Value::Tensor(x) => format!("{label}: Tensor[{:?}, {:?}] (scan: shape only)", x.size(), x.kind()),
                other => format!("{label}: {other:?}"),
            };
            super::emit_log(line);
            Ok(Value::Tuple(vec![]))
        }
        // Every other op runs as it is, on meta tensors (named one by one, so a new op is placed here too).
        Op::Const { value: Constant::Scalar(_) }
        | Op::Save { .. }
        | Op::Send { .. }
        | Op::Choose { .. }
        | Op::Call { .. }
        | Op::Stop
        | Op::Guard { .. }
        | Op::Read { .. }
        | Op::ReadInputs { .. }
        | Op::Generated
        | Op::Write { .. }
        | Op::Skip { .. }
        | Op::Apply { .. }
        | Op::Cache { .. }
        | Op::Backward { .. }
        | Op::Grad { .. }
        | Op::ParamGrad { .. }
        | Op::GradWrite { .. } => eval(op, inputs),
    }
}

/// An error of node `id`, said where it happened: libtorch's as an intervention failure naming the node, an
/// index out of range naming the value indexed.
pub(super) fn at_node(e: Error, id: NodeId, graph: &Graph) -> Error {
    let op = &graph.nodes[id as usize].op;
    match e {
        Error::Torch { source, .. } => Error::Intervention {
            message: format!(
                "node {id} ({}): {}",
                op.describe(),
                crate::error::clean_torch_message(&source.to_string())
            ),
        },
        other => placed(other, || match op.inputs().first() {
            Some(&a) => value_place(graph, a),
            None => format!("node {id}"),
        }),
    }
}

/// A value as users wrote it: `` `model.model.layers.0.self_attn.head_output` output ``, or the node computing it.
fn value_place(graph: &Graph, id: NodeId) -> String {
    match &graph.nodes[id as usize].op {
        Op::Read { module, point, call } => {
            let call = if *call > 0 { format!(" (call {call})") } else { String::new() };
            let point = if *point == Point::Input { "input" } else { "output" };
            format!("`{}` {point}{call}", display(module))
        }
        Op::ReadInputs { module, .. } => format!("`{}` inputs", display(module)),
        other => format!("the value of node {id} ({})", other.describe()),
    }
}

/// `e` with the place of an index error filled in, where the op that found it left it empty (see
/// `tensor_ops::index`).
pub(super) fn placed(e: Error, place: impl FnOnce() -> String) -> Error {
    match e {
        Error::IndexOutOfRange { module, index, len, dim } if module.is_empty() => {
            Error::IndexOutOfRange { module: place(), index, len, dim }
        }
        other => other,
    }
}
