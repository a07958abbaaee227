//! Meta tensors: sizes, strides and dtypes without storage, on which libtorch runs ops for their shapes alone.
//! tch has no meta device; the C++ shim (`csrc/shim.cpp`) makes them. A scan (`intervene!(model.scan(..) { .. })`)
//! runs a model's meta twin on meta inputs, so that every value it hands back is a meta tensor: read its
//! `.size()` and `.kind()`, not its data.
//!
//! tch reports a meta tensor's device as `Device::Mps`: code that creates or moves tensors "where `x` is" goes
//! through [`to_device_like`] and [`creation_device`] instead of `x.device()`.

use tch::{Device, Kind, TchError, Tensor};

/// Whether `t` is a meta tensor (shapes only, no data).
pub fn is_meta(t: &Tensor) -> bool {
    crate::ffi::is_meta(t)
}

/// A meta tensor with `t`'s sizes, strides and dtype; no data is copied (`t` itself when it is meta already).
pub fn to_meta(t: &Tensor) -> Result<Tensor, TchError> {
    crate::ffi::to_meta(t)
}

/// A contiguous meta tensor of `shape` and `kind`.
pub fn empty(shape: &[i64], kind: Kind) -> Result<Tensor, TchError> {
    crate::ffi::empty_meta(shape, kind)
}

/// `t` where `like` is: a meta tensor when `like` is meta, else on `like`'s device (a handle on `t` when it is
/// there already).
pub fn to_device_like(t: &Tensor, like: &Tensor) -> Result<Tensor, TchError> {
    if is_meta(like) {
        to_meta(t)
    } else if is_meta(t) {
        Err(TchError::Torch(format!(
            "a meta tensor of shape {:?} (from a scan) cannot be used with data on {:?}",
            t.size(),
            like.device()
        )))
    } else if t.device() == like.device() {
        Ok(t.shallow_clone())
    } else {
        t.f_to_device(like.device())
    }
}

/// The device on which to create a tensor that will meet `like`: `like`'s device, or the CPU when `like` is meta
/// (the new tensor then goes through [`to_device_like`]).
pub fn creation_device(like: &Tensor) -> Device {
    if is_meta(like) {
        Device::Cpu
    } else {
        like.device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_tensors_keep_shape_and_dtype_and_compute_shapes() {
        let x = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)).f_transpose(0, 1).unwrap();
        let m = to_meta(&x).unwrap();
        assert!(is_meta(&m) && !is_meta(&x));
        assert_eq!((m.size(), m.stride(), m.kind()), (vec![3, 2], x.stride(), Kind::Float));
        let w = empty(&[2, 5], Kind::Float).unwrap();
        let y = m.f_matmul(&w).unwrap().f_softmax(-1, Kind::Float).unwrap();
        assert!(is_meta(&y));
        assert_eq!(y.size(), vec![3, 5]);
        assert!(m.f_matmul(&m).is_err(), "a shape mismatch is an error on meta tensors too");
    }

    #[test]
    fn placing_like_a_meta_tensor_makes_meta() {
        let m = empty(&[4], Kind::Int64).unwrap();
        let c = Tensor::from_slice(&[1i64, 2]);
        assert!(is_meta(&to_device_like(&c, &m).unwrap()));
        assert!(!is_meta(&to_device_like(&c, &c).unwrap()));
        assert!(to_device_like(&m, &c).is_err());
        assert_eq!(creation_device(&m), Device::Cpu);
    }

    /// Every op the models and the graph use runs on meta tensors (some through the shim's own meta kernels).
    #[test]
    #[allow(clippy::redundant_closure_call)] // each case is a closure, so that it can use `?`
    fn model_and_graph_ops_run_on_meta_tensors() {
        let x = empty(&[2, 3, 8], Kind::Float).unwrap();
        let w = empty(&[8], Kind::Float).unwrap();
        let m = empty(&[2, 3, 8], Kind::Bool).unwrap();
        let i = empty(&[2, 3, 8], Kind::Int64).unwrap();
        let q = empty(&[2, 4, 3, 8], Kind::Float).unwrap();
        let mask4 = empty(&[2, 1, 3, 3], Kind::Float).unwrap();
        let ids = empty(&[2, 3], Kind::Int64).unwrap();
        let table = empty(&[10, 8], Kind::Float).unwrap();
        let mut fails = vec![];
        macro_rules! p {
            ($name:expr, $e:expr) => {
                if let Err(e) = (|| -> Result<Tensor, TchError> { $e })() {
                    fails.push(format!("{}: {}", $name, e.to_string().lines().next().unwrap_or("")));
                }
            };
        }
        p!("layer_norm", x.f_layer_norm([8], Some(&w), Some(&w), 1e-5, true));
        p!("where", x.f_where_self(&m, &x));
        p!("masked_fill", x.f_masked_fill(&m, 0.0));
        p!("sdpa causal", Tensor::f_scaled_dot_product_attention(&q, &q, &q, None::<&Tensor>, 0.0, true, None, false));
        p!("sdpa mask", Tensor::f_scaled_dot_product_attention(&q, &q, &q, Some(&mask4), 0.0, false, None, false));
        p!(
            "sdpa gqa",
            Tensor::f_scaled_dot_product_attention(
                &q,
                &q.f_narrow(1, 0, 2)?,
                &q.f_narrow(1, 0, 2)?,
                None::<&Tensor>,
                0.0,
                true,
                None,
                true
            )
        );
        p!("softmax", x.f_softmax(-1, Kind::Float));
        p!("log_softmax", x.f_log_softmax(-1, Kind::Float));
        p!("topk", x.f_topk(2, -1, true, true).map(|t| t.0));
        p!("gather", x.f_gather(-1, &i, false));
        p!("argmax", x.f_argmax(-1, false));
        p!("max_dim", x.f_max_dim(-1, false).map(|t| t.0));
        p!("max", x.f_max());
        p!("amax", x.f_amax([-1], false));
        p!("norm", x.f_norm_scalaropt_dim(2.0, [-1].as_slice(), false));
        p!("norm all", x.f_norm_scalaropt_dim(2.0, Vec::<i64>::new().as_slice(), false));
        p!("cat", Tensor::f_cat(&[&x, &x], 0));
        p!("stack", Tensor::f_stack(&[&x, &x], 0));
        p!("split", x.f_split(4, 2).map(|v| v[0].shallow_clone()));
        p!("addmm", w.f_addmm(&x.f_reshape([6, 8])?, &table.f_transpose(0, 1)?));
        p!("linear", x.f_linear(&table, None::<&Tensor>));
        p!("gelu tanh", x.f_gelu("tanh"));
        p!("tanh", x.f_tanh());
        p!("silu", x.f_silu());
        p!("pow", x.f_pow_tensor_scalar(3.0));
        p!("rsqrt", x.f_rsqrt());
        p!("square", x.f_square());
        p!("mean_dim", x.f_mean_dim(-1, true, None));
        p!("repeat_interleave", q.f_repeat_interleave_self_int(2, 1, None::<i64>));
        p!("slice_scatter", x.f_slice_scatter(&x.f_narrow(0, 0, 1)?, 0, 0, 1, 1));
        p!("copy_", {
            let mut c = x.f_empty_like()?;
            c.f_copy_(&x)?;
            Ok(c)
        });
        p!("tril", m.f_tril(0));
        p!("logical_and", m.f_logical_and(&m));
        p!("ne", i.f_ne(0));
        p!("cos", x.f_cos());
        p!("embedding", Tensor::f_embedding(&table, &ids, -1, false, false));
        p!("index_select", table.f_index_select(0, &ids.f_reshape([-1])?));
        p!("index tensor", table.f_index(&[Some(ids.shallow_clone())]));
        p!("broadcast_to", w.f_broadcast_to([2, 3, 8]));
        p!("zeros_like", x.f_zeros_like());
        p!("randn_like", x.f_randn_like());
        p!("maximum", x.f_maximum(&x));
        p!("clamp_min", x.f_clamp_min(0.0));
        p!("eq_scalar", x.f_eq(0.0));
        p!("to_kind", x.f_to_kind(Kind::Double));
        p!("select", x.f_select(1, 0));
        p!("sum", x.f_sum(Kind::Float));
        p!("mul 0dim cpu", x.f_mul(&Tensor::from(2.0f32)));
        p!("exp", x.f_exp());
        p!("abs", x.f_abs());
        p!("min_dim", x.f_min_dim(-1, false).map(|t| t.0));
        p!("matmul", q.f_matmul(&q.f_transpose(-2, -1)?));
        p!("reciprocal", x.f_reciprocal());
        p!("neg", x.f_neg());
        p!("contiguous", Ok(x.f_transpose(0, 1)?.contiguous()));
        p!("view", x.f_view([6, 8]));
        p!("unsqueeze", x.f_unsqueeze(0));
        p!("triu", m.f_triu(1));
        p!("logical_not", m.f_logical_not());
        assert!(fails.is_empty(), "{fails:#?}");
        // The shim's kernels give the right shapes and dtypes.
        assert_eq!(x.f_where_self(&m, &empty(&[8], Kind::Double).unwrap()).unwrap().kind(), Kind::Double);
        let (nx, _, _) = x.f_native_layer_norm([8], Some(&w), Some(&w), 1e-5).unwrap();
        assert_eq!(nx.size(), [2, 3, 8]);
        assert_eq!(Tensor::f_embedding(&table, &ids, -1, false, false).unwrap().size(), [2, 3, 8]);
        assert_eq!(m.f_logical_and(&empty(&[8], Kind::Bool).unwrap()).unwrap().size(), [2, 3, 8]);
        assert_eq!(x.f_max().unwrap().size(), Vec::<i64>::new());
        assert!(x.f_where_self(&empty(&[5], Kind::Bool).unwrap(), &x).is_err(), "shapes that do not broadcast");
    }
}
