//! The tensor ops ([`TensorOp`]), three arms each, side by side: what each computes from its operands' values
//! (`eval`), what it computes in a scan on shapes alone (`eval_meta`), and what its result may take before it is
//! computed, held against the value cap (`growth`); with the indexing the ops and writes share. Every match names
//! every tensor op (no wildcard), so a new one gets its three arms here.

use crate::graph::value::{device_from_name, kind_from_name};
use crate::graph::{BinaryOp, IndexItem, ReduceOp, TensorOp, UnaryOp, Value};
use crate::{Error, Result};
use tch::{Kind, TchError, Tensor};

fn t(e: TchError) -> Error {
    Error::torch("intervention", e)
}

/// What `op` computes from its operands' values (in the order of [`TensorOp::inputs`]).
pub(super) fn eval(op: &TensorOp, inputs: &[&Value]) -> Result<Value> {
    let a = || inputs[0].tensor();
    let tensor = |r: std::result::Result<Tensor, TchError>| r.map(Value::Tensor).map_err(t);
    match op {
        TensorOp::Binary { kind, .. } => {
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
        TensorOp::BinaryScalar { kind, scalar, scalar_first, .. } => {
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
        TensorOp::Unary { kind, .. } => {
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
        TensorOp::Reduce { kind, dims, keepdim, .. } => {
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
        TensorOp::MaxMinDim { dim, keepdim, max, .. } => {
            let x = a()?;
            let (v, i) = if *max { x.f_max_dim(*dim, *keepdim) } else { x.f_min_dim(*dim, *keepdim) }.map_err(t)?;
            Ok(Value::Tuple(vec![Value::Tensor(v), Value::Tensor(i)]))
        }
        TensorOp::Norm { p, dims, keepdim, .. } => {
            let x = a()?;
            if dims.is_empty() {
                tensor(x.f_norm_scalaropt_dim(*p, Vec::<i64>::new().as_slice(), false))
            } else {
                tensor(x.f_norm_scalaropt_dim(*p, dims.as_slice(), *keepdim))
            }
        }
        TensorOp::Softmax { dim, log, .. } => {
            let x = a()?;
            let kind = if x.kind() == Kind::Double { Kind::Double } else { Kind::Float };
            tensor(if *log { x.f_log_softmax(*dim, kind) } else { x.f_softmax(*dim, kind) })
        }
        TensorOp::Argmax { dim, keepdim, .. } => tensor(a()?.f_argmax(*dim, *keepdim)),
        TensorOp::Topk { k, dim, largest, .. } => {
            let (v, i) = a()?.f_topk(*k, *dim, *largest, true).map_err(t)?;
            Ok(Value::Tuple(vec![Value::Tensor(v), Value::Tensor(i)]))
        }
        TensorOp::Reshape { shape, .. } => tensor(a()?.f_reshape(shape.as_slice())),
        TensorOp::Transpose { dim0, dim1, .. } => tensor(a()?.f_transpose(*dim0, *dim1)),
        TensorOp::Permute { dims, .. } => tensor(a()?.f_permute(dims.as_slice())),
        TensorOp::Narrow { dim, start, len, .. } => {
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
        TensorOp::Select { dim, index, .. } => {
            let x = a()?;
            check_index(x, check_dim(x, *dim)?, *index)?;
            tensor(x.f_select(*dim, *index))
        }
        TensorOp::Index { index, .. } => Ok(Value::Tensor(self::index(a()?, index)?)),
        TensorOp::Cat { dim, .. } | TensorOp::Stack { dim, .. } => {
            let xs: Vec<&Tensor> = inputs.iter().map(|v| v.tensor()).collect::<Result<_>>()?;
            tensor(if matches!(op, TensorOp::Cat { .. }) {
                Tensor::f_cat(&xs, *dim)
            } else {
                Tensor::f_stack(&xs, *dim)
            })
        }
        TensorOp::ToKind { kind, .. } => tensor(a()?.f_to_kind(kind_from_name(kind)?)),
        TensorOp::ToDevice { device, .. } => tensor(a()?.f_to_device(device_from_name(device)?)),
        TensorOp::Where { .. } => {
            let (c, x, y) = (a()?, inputs[1].tensor()?, inputs[2].tensor()?);
            tensor(x.f_where_self(&c.f_to_kind(Kind::Bool).map_err(t)?, y))
        }
        TensorOp::Gather { dim, .. } => tensor(a()?.f_gather(*dim, inputs[1].tensor()?, false)),
        TensorOp::TupleGet { index, .. } => match inputs[0] {
            Value::Tuple(items) => items.get(*index as usize).map(Value::shallow_clone).ok_or_else(|| {
                Error::Intervention { message: format!("tuple has {} items, no item {index}", items.len()) }
            }),
            other => Err(Error::Intervention { message: format!("expected a tuple, found a {}", other.kind_name()) }),
        },
        TensorOp::Unsqueeze { dim, .. } => tensor(a()?.f_unsqueeze(*dim)),
        TensorOp::Squeeze { dim: Some(d), .. } => tensor(a()?.f_squeeze_dim(*d)),
        TensorOp::Squeeze { dim: None, .. } => tensor(a()?.f_squeeze()),
    }
}

/// [`eval`] in a scan, on meta tensors: a move to a device keeps the value meta; every other op runs as it is.
pub(super) fn eval_meta(op: &TensorOp, inputs: &[&Value]) -> Result<Value> {
    match op {
        TensorOp::ToDevice { .. } => Ok(Value::Tensor(crate::meta::to_meta(inputs[0].tensor()?).map_err(t)?)),
        TensorOp::Binary { .. }
        | TensorOp::BinaryScalar { .. }
        | TensorOp::Unary { .. }
        | TensorOp::Reduce { .. }
        | TensorOp::MaxMinDim { .. }
        | TensorOp::Norm { .. }
        | TensorOp::Softmax { .. }
        | TensorOp::Argmax { .. }
        | TensorOp::Topk { .. }
        | TensorOp::Reshape { .. }
        | TensorOp::Transpose { .. }
        | TensorOp::Permute { .. }
        | TensorOp::Narrow { .. }
        | TensorOp::Select { .. }
        | TensorOp::Index { .. }
        | TensorOp::Cat { .. }
        | TensorOp::Stack { .. }
        | TensorOp::ToKind { .. }
        | TensorOp::Where { .. }
        | TensorOp::Gather { .. }
        | TensorOp::TupleGet { .. }
        | TensorOp::Unsqueeze { .. }
        | TensorOp::Squeeze { .. } => eval(op, inputs),
    }
}

/// The bytes `op`'s result will take, where it can outgrow its operands (known before computing it, so that a
/// capped run refuses it before it allocates); `None` where it cannot (the same shape, a view, a part, a
/// reduction), or no operand is a tensor.
pub(super) fn growth(op: &TensorOp, inputs: &[&Value]) -> Result<Option<u64>> {
    let shape = |v: &Value| v.tensor().ok().map(|t| (t.size(), t.kind().elt_size_in_bytes() as u64));
    let broadcast = |shapes: &[Vec<i64>]| -> Vec<i64> {
        let n = shapes.iter().map(Vec::len).max().unwrap_or(0);
        (0..n)
            .map(|i| shapes.iter().map(|s| if i + s.len() >= n { s[i + s.len() - n] } else { 1 }).max().unwrap_or(1))
            .collect()
    };
    let (dims, elt): (Vec<i64>, u64) = match op {
        TensorOp::Binary { kind: BinaryOp::Matmul, .. } => {
            let (Some((a, ea)), Some((b, eb))) = (shape(inputs[0]), shape(inputs[1])) else { return Ok(None) };
            if a.len() < 2 || b.len() < 2 {
                return Ok(None);
            }
            let mut out = broadcast(&[a[..a.len() - 2].to_vec(), b[..b.len() - 2].to_vec()]);
            out.extend([a[a.len() - 2], b[b.len() - 1]]);
            (out, ea.max(eb))
        }
        TensorOp::Binary { .. } | TensorOp::Where { .. } => {
            let shapes: Vec<(Vec<i64>, u64)> = inputs.iter().filter_map(|v| shape(v)).collect();
            let dims: Vec<Vec<i64>> = shapes.iter().map(|s| s.0.clone()).collect();
            (broadcast(&dims), shapes.iter().map(|s| s.1).max().unwrap_or(4))
        }
        TensorOp::Cat { .. } | TensorOp::Stack { .. } => {
            let shapes: Vec<(Vec<i64>, u64)> = inputs.iter().filter_map(|v| shape(v)).collect();
            let total: i64 = shapes.iter().map(|s| s.0.iter().product::<i64>()).sum();
            (vec![total], shapes.iter().map(|s| s.1).max().unwrap_or(4))
        }
        // A dtype change keeps the shape and may widen each element.
        TensorOp::ToKind { kind, .. } => {
            let Some((dims, _)) = shape(inputs[0]) else { return Ok(None) };
            (dims, kind_from_name(kind)?.elt_size_in_bytes() as u64)
        }
        // No larger than an operand: the same shape, a view, a part, a reduction.
        TensorOp::BinaryScalar { .. }
        | TensorOp::Unary { .. }
        | TensorOp::Reduce { .. }
        | TensorOp::MaxMinDim { .. }
        | TensorOp::Norm { .. }
        | TensorOp::Softmax { .. }
        | TensorOp::Argmax { .. }
        | TensorOp::Topk { .. }
        | TensorOp::Reshape { .. }
        | TensorOp::Transpose { .. }
        | TensorOp::Permute { .. }
        | TensorOp::Narrow { .. }
        | TensorOp::Select { .. }
        | TensorOp::Index { .. }
        | TensorOp::ToDevice { .. }
        | TensorOp::Gather { .. }
        | TensorOp::TupleGet { .. }
        | TensorOp::Unsqueeze { .. }
        | TensorOp::Squeeze { .. } => return Ok(None),
    };
    Ok(Some(dims.iter().fold(elt, |acc, &d| acc.saturating_mul(d.max(0) as u64))))
}

/// tch-style indexing from serializable items: `Select` removes a dimension, `Slice` keeps it, `NewAxis` adds one.
/// The result is a view where tch makes one (so it can be written through).
///
/// # Errors
/// [`Error::IndexOutOfRange`] for a selected index outside its dimension (its place left empty for the caller to
/// name), before libtorch is asked; [`Error::Torch`] for anything else libtorch refuses.
pub(super) fn index(x: &Tensor, items: &[IndexItem]) -> Result<Tensor> {
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
pub(super) fn index_text(items: &[IndexItem]) -> String {
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
pub(super) fn copy(x: &Tensor) -> std::result::Result<Tensor, TchError> {
    let mut out = x.f_empty_like()?;
    out.f_copy_(x)?;
    Ok(out)
}
