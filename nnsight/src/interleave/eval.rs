//! One arm per graph op: what each node computes from its inputs' values (`eval`, and `eval_meta` in a scan on
//! shapes alone), and how a failing node is named in its error (`at_node`).

use crate::graph::value::{device_from_name, kind_from_name};
use crate::graph::{
    display, BinaryOp, CallArg, Constant, Graph, IndexItem, NodeId, Op, Point, ReduceOp, UnaryOp, Value,
};
use crate::{Error, Result};
use tch::{Kind, TchError, Tensor};

fn t(e: TchError) -> Error {
    Error::torch("intervention", e)
}

/// Computes an op that needs no hook event from its input values (in the order of [`Op::inputs`]).
pub fn eval(op: &Op, inputs: &[&Value]) -> Result<Value> {
    let a = || inputs[0].tensor();
    let tensor = |r: std::result::Result<Tensor, TchError>| r.map(Value::Tensor).map_err(t);
    match op {
        Op::Const { value } => match value {
            Constant::Tensor(d) => Ok(Value::Tensor(d.to_tensor(tch::Device::Cpu)?)),
            Constant::Scalar(s) => Ok(Value::Scalar(*s)),
        },
        Op::Save { .. } => Ok(inputs[0].shallow_clone()),
        Op::Binary { kind, .. } => {
            let (x, y) = (a()?, inputs[1].tensor()?);
            // Where x is (meta in a scan: tch reports a meta tensor's device as MPS).
            let y = crate::meta::to_device_like(y, x).map_err(t)?;
            tensor(match kind {
                BinaryOp::Add => x.f_add(&y),
                BinaryOp::Sub => x.f_sub(&y),
                BinaryOp::Mul => x.f_mul(&y),
                BinaryOp::Div => x.f_div(&y),
                BinaryOp::Pow => x.f_pow(&y),
                BinaryOp::Matmul => x.f_matmul(&y),
                BinaryOp::Maximum => x.f_maximum(&y),
                BinaryOp::Minimum => x.f_minimum(&y),
                BinaryOp::Eq => x.f_eq_tensor(&y),
                BinaryOp::Gt => x.f_gt_tensor(&y),
                BinaryOp::Lt => x.f_lt_tensor(&y),
                BinaryOp::Ge => x.f_ge_tensor(&y),
                BinaryOp::Le => x.f_le_tensor(&y),
                BinaryOp::Ne => x.f_ne_tensor(&y),
                BinaryOp::And => x.f_logical_and(&y),
                BinaryOp::Or => x.f_logical_or(&y),
            })
        }
        Op::BinaryScalar { kind, scalar, scalar_first, .. } => {
            let x = a()?;
            let s = *scalar;
            tensor(match (kind, scalar_first) {
                (BinaryOp::Add, _) => x.f_add_scalar(s),
                (BinaryOp::Mul, _) => x.f_mul_scalar(s),
                (BinaryOp::Sub, false) => x.f_sub_scalar(s),
                (BinaryOp::Sub, true) => x.f_neg().and_then(|n| n.f_add_scalar(s)),
                (BinaryOp::Div, false) => x.f_div_scalar(s),
                (BinaryOp::Div, true) => x.f_reciprocal().and_then(|r| r.f_mul_scalar(s)),
                (BinaryOp::Pow, false) => x.f_pow_tensor_scalar(s),
                (BinaryOp::Pow, true) => Tensor::f_pow_scalar(s, x),
                (BinaryOp::Maximum, _) => x.f_clamp_min(s),
                (BinaryOp::Minimum, _) => x.f_clamp_max(s),
                (BinaryOp::Eq, _) => x.f_eq(s),
                (BinaryOp::Gt, false) | (BinaryOp::Lt, true) => x.f_gt(s),
                (BinaryOp::Lt, false) | (BinaryOp::Gt, true) => x.f_lt(s),
                (BinaryOp::Ge, false) | (BinaryOp::Le, true) => x.f_ge(s),
                (BinaryOp::Le, false) | (BinaryOp::Ge, true) => x.f_le(s),
                (BinaryOp::Ne, _) => x.f_ne(s),
                (BinaryOp::And, _) => {
                    x.f_logical_and(&crate::meta::to_device_like(&Tensor::from(s != 0.0), x).map_err(t)?)
                }
                (BinaryOp::Or, _) => {
                    x.f_logical_or(&crate::meta::to_device_like(&Tensor::from(s != 0.0), x).map_err(t)?)
                }
                (BinaryOp::Matmul, _) => {
                    return Err(Error::Intervention { message: "matmul with a scalar".into() });
                }
            })
        }
        Op::Unary { kind, .. } => {
            let x = a()?;
            tensor(match kind {
                UnaryOp::Neg => x.f_neg(),
                UnaryOp::Exp => x.f_exp(),
                UnaryOp::Log => x.f_log(),
                UnaryOp::Abs => x.f_abs(),
                UnaryOp::Sqrt => x.f_sqrt(),
                UnaryOp::Clone => copy(x),
                UnaryOp::Detach => x.f_detach(),
                UnaryOp::ZerosLike => x.f_zeros_like(),
                UnaryOp::OnesLike => x.f_ones_like(),
                UnaryOp::RandnLike => x.f_randn_like(),
                UnaryOp::Contiguous => Ok(x.contiguous()),
                UnaryOp::Not => x.f_logical_not(),
            })
        }
        Op::Reduce { kind, dims, keepdim, .. } => {
            let x = a()?;
            let all = dims.is_empty();
            tensor(match kind {
                ReduceOp::Sum if all => x.f_sum(x.kind()),
                ReduceOp::Sum => x.f_sum_dim_intlist(dims.as_slice(), *keepdim, x.kind()),
                ReduceOp::Mean if all => x.f_mean(x.kind()),
                ReduceOp::Mean => x.f_mean_dim(dims.as_slice(), *keepdim, x.kind()),
                ReduceOp::Max if all => x.f_max(),
                ReduceOp::Max => x.f_amax(dims.as_slice(), *keepdim),
                ReduceOp::Min if all => x.f_min(),
                ReduceOp::Min => x.f_amin(dims.as_slice(), *keepdim),
            })
        }
        Op::MaxMinDim { dim, keepdim, max, .. } => {
            let x = a()?;
            let (v, i) = if *max { x.f_max_dim(*dim, *keepdim) } else { x.f_min_dim(*dim, *keepdim) }.map_err(t)?;
            Ok(Value::Tuple(vec![Value::Tensor(v), Value::Tensor(i)]))
        }
        Op::Norm { p, dims, keepdim, .. } => {
            let x = a()?;
            if dims.is_empty() {
                tensor(x.f_norm_scalaropt_dim(*p, Vec::<i64>::new().as_slice(), false))
            } else {
                tensor(x.f_norm_scalaropt_dim(*p, dims.as_slice(), *keepdim))
            }
        }
        Op::Softmax { dim, log, .. } => {
            let x = a()?;
            let kind = if x.kind() == Kind::Double { Kind::Double } else { Kind::Float };
            tensor(if *log { x.f_log_softmax(*dim, kind) } else { x.f_softmax(*dim, kind) })
        }
        Op::Argmax { dim, keepdim, .. } => tensor(a()?.f_argmax(*dim, *keepdim)),
        Op::Topk { k, dim, largest, .. } => {
            let (v, i) = a()?.f_topk(*k, *dim, *largest, true).map_err(t)?;
            Ok(Value::Tuple(vec![Value::Tensor(v), Value::Tensor(i)]))
        }
        Op::Reshape { shape, .. } => tensor(a()?.f_reshape(shape.as_slice())),
        Op::Transpose { dim0, dim1, .. } => tensor(a()?.f_transpose(*dim0, *dim1)),
        Op::Permute { dims, .. } => tensor(a()?.f_permute(dims.as_slice())),
        Op::Narrow { dim, start, len, .. } => {
            let x = a()?;
            let d = check_dim(x, *dim)?;
            let size = x.size()[d];
            let first = if *start < 0 { start + size } else { *start };
            if first < 0 || first > size {
                return Err(out_of_range(*start, d, size));
            }
            if *len < 0 || first + len > size {
                return Err(out_of_range(first + len - 1, d, size));
            }
            tensor(x.f_narrow(*dim, *start, *len))
        }
        Op::Select { dim, index, .. } => {
            let x = a()?;
            check_index(x, check_dim(x, *dim)?, *index)?;
            tensor(x.f_select(*dim, *index))
        }
        Op::Index { index, .. } => Ok(Value::Tensor(self::index(a()?, index)?)),
        Op::Cat { dim, .. } | Op::Stack { dim, .. } => {
            let xs: Vec<&Tensor> = inputs.iter().map(|v| v.tensor()).collect::<Result<_>>()?;
            tensor(if matches!(op, Op::Cat { .. }) { Tensor::f_cat(&xs, *dim) } else { Tensor::f_stack(&xs, *dim) })
        }
        Op::ToKind { kind, .. } => tensor(a()?.f_to_kind(kind_from_name(kind)?)),
        Op::ToDevice { device, .. } => tensor(a()?.f_to_device(device_from_name(device)?)),
        Op::Where { .. } => {
            let (c, x, y) = (a()?, inputs[1].tensor()?, inputs[2].tensor()?);
            tensor(x.f_where_self(&c.f_to_kind(Kind::Bool).map_err(t)?, y))
        }
        Op::Gather { dim, .. } => tensor(a()?.f_gather(*dim, inputs[1].tensor()?, false)),
        Op::TupleGet { index, .. } => match inputs[0] {
            Value::Tuple(items) => items.get(*index as usize).map(Value::shallow_clone).ok_or_else(|| {
                Error::Intervention { message: format!("tuple has {} items, no item {index}", items.len()) }
            }),
            other => Err(Error::Intervention { message: format!("expected a tuple, found a {}", other.kind_name()) }),
        },
        Op::Unsqueeze { dim, .. } => tensor(a()?.f_unsqueeze(*dim)),
        Op::Squeeze { dim: Some(d), .. } => tensor(a()?.f_squeeze_dim(*d)),
        Op::Squeeze { dim: None, .. } => tensor(a()?.f_squeeze()),
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
        Op::Cache { .. } => Ok(Value::Map(vec![])),
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

/// tch-style indexing from serializable items: `Select` removes a dimension, `Slice` keeps it, `NewAxis` adds one.
/// The result is a view where tch makes one (so it can be written through).
///
/// # Errors
/// [`Error::IndexOutOfRange`] for a selected index outside its dimension (its place left empty for the caller to
/// name), before libtorch is asked; [`Error::Torch`] for anything else libtorch refuses.
pub fn index(x: &Tensor, items: &[IndexItem]) -> Result<Tensor> {
    let mut out = x.shallow_clone();
    let mut dim = 0i64;
    // The dimension of the value indexed that `dim` of `out` stands for (a new axis has none).
    let mut source_dim = 0usize;
    let selects = items.iter().filter(|i| !matches!(i, IndexItem::NewAxis)).count();
    if selects > x.dim() {
        return Err(Error::Intervention {
            message: format!(
                "{} indexes {selects} dimensions of a value with {}: {:?}",
                index_text(items),
                x.dim(),
                x.size()
            ),
        });
    }
    for item in items {
        match *item {
            IndexItem::Select(i) => {
                // Each item but a new axis takes one dimension of `x` in turn, of the size it has in `x`.
                check_index(x, source_dim, i)?;
                out = out.f_select(dim, i).map_err(t)?;
                source_dim += 1;
            }
            IndexItem::Slice { start, end } => {
                let size = out.size().get(dim as usize).copied().unwrap_or(0);
                let norm = |v: i64| if v < 0 { (v + size).max(0) } else { v.min(size) };
                let s = start.map(norm).unwrap_or(0);
                let e = end.map(norm).unwrap_or(size);
                out = out.f_slice(dim, s, e.max(s), 1).map_err(t)?;
                dim += 1;
                source_dim += 1;
            }
            IndexItem::NewAxis => {
                out = out.f_unsqueeze(dim).map_err(t)?;
                dim += 1;
            }
        }
    }
    Ok(out)
}

/// `dim` (negative counts from the end) as a dimension of `x`.
fn check_dim(x: &Tensor, dim: i64) -> Result<usize> {
    let n = x.dim() as i64;
    let d = if dim < 0 { dim + n } else { dim };
    if d < 0 || d >= n {
        return Err(Error::Intervention {
            message: format!("dimension {dim} does not exist in a value of shape {:?} ({n} dimensions)", x.size()),
        });
    }
    Ok(d as usize)
}

/// An index of dimension `d` of `x` (negative counts from the end) must be inside it.
fn check_index(x: &Tensor, d: usize, index: i64) -> Result<()> {
    let size = x.size().get(d).copied().unwrap_or(0);
    if index >= size || index < -size {
        return Err(out_of_range(index, d, size));
    }
    Ok(())
}

/// An out-of-range error whose place the caller fills in (see `interleave::at_node`).
fn out_of_range(index: i64, dim: usize, size: i64) -> Error {
    Error::IndexOutOfRange { module: String::new(), index, len: size.max(0) as usize, dim: Some(dim) }
}

/// An index as users write it: `(.., -1, 2..5)`.
pub fn index_text(items: &[IndexItem]) -> String {
    let parts: Vec<String> = items
        .iter()
        .map(|i| match i {
            IndexItem::Select(i) => i.to_string(),
            IndexItem::Slice { start, end } => format!(
                "{}..{}",
                start.map(|v| v.to_string()).unwrap_or_default(),
                end.map(|v| v.to_string()).unwrap_or_default()
            ),
            IndexItem::NewAxis => "NewAxis".into(),
        })
        .collect();
    format!("({})", parts.join(", "))
}

/// A copy of `x` with its own storage.
pub fn copy(x: &Tensor) -> std::result::Result<Tensor, TchError> {
    let mut out = x.f_empty_like()?;
    out.f_copy_(x)?;
    Ok(out)
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

/// [`eval`] in a scan: tensor constants are meta tensors of their shape and dtype, a move to a device keeps the
/// value meta, `log!` prints the shape; every other op runs as it is, on meta tensors.
pub(super) fn eval_meta(op: &Op, inputs: &[&Value]) -> Result<Value> {
    let t = |e| Error::torch("intervention", e);
    match op {
        Op::Const { value: crate::graph::Constant::Tensor(d) } => {
            let kind = crate::graph::value::kind_from_name(&d.kind)?;
            Ok(Value::Tensor(crate::meta::empty(&d.shape, kind).map_err(t)?))
        }
        Op::ToDevice { .. } => Ok(Value::Tensor(crate::meta::to_meta(inputs[0].tensor()?).map_err(t)?)),
        Op::Log { label, .. } => {
            let line = match inputs[0] {
                Value::Tensor(x) => format!("{label}: Tensor[{:?}, {:?}] (scan: shape only)", x.size(), x.kind()),
                other => format!("{label}: {other:?}"),
            };
            super::emit_log(line);
            Ok(Value::Tuple(vec![]))
        }
        // Every other op runs as it is, on meta tensors (named one by one, so a new op is placed here too).
        Op::Const { value: crate::graph::Constant::Scalar(_) }
        | Op::Save { .. }
        | Op::Binary { .. }
        | Op::BinaryScalar { .. }
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
        | Op::Cat { .. }
        | Op::Stack { .. }
        | Op::ToKind { .. }
        | Op::Where { .. }
        | Op::Gather { .. }
        | Op::TupleGet { .. }
        | Op::Unsqueeze { .. }
        | Op::Squeeze { .. }
        | Op::Send { .. }
        | Op::Choose { .. }
        | Op::Call { .. }
        | Op::Read { .. }
        | Op::ReadInputs { .. }
        | Op::Generated
        | Op::Write { .. }
        | Op::Skip { .. }
        | Op::Apply { .. }
        | Op::Cache { .. }
        | Op::Stop
        | Op::Guard { .. }
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

/// `e` with the place of an index error filled in, where the op that found it left it empty (see `index`).
pub(super) fn placed(e: Error, place: impl FnOnce() -> String) -> Error {
    match e {
        Error::IndexOutOfRange { module, index, len, dim } if module.is_empty() => {
            Error::IndexOutOfRange { module: place(), index, len, dim }
        }
        other => other,
    }
}
