//! Typed proxies: handles on values that will exist when the graph runs. Operations on proxies add nodes to the
//! graph; nothing is computed while the block builds it.

use super::builder::GraphCell;
use super::index::{IntoDims, IntoIndex};
use crate::graph::{BinaryOp, Constant, NodeId, Op, ReduceOp, TensorData, TensorOp, UnaryOp};
use std::marker::PhantomData;
use tch::{Device, Kind, Tensor};

/// A value of type `T` (usually [`Tensor`]) that the graph will compute. Cheap to copy.
pub struct Proxy<'g, T> {
    pub(crate) id: NodeId,
    pub(crate) g: &'g GraphCell,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Proxy<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Proxy<'_, T> {}

impl<T> std::fmt::Debug for Proxy<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Proxy(node {})", self.id)
    }
}

/// A proxy marked with `.save()`: usable like any proxy inside the block, and a plain value after it.
pub struct Saved<'g, T>(pub(crate) Proxy<'g, T>);

impl<T> Clone for Saved<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Saved<'_, T> {}

impl<'g, T> std::ops::Deref for Saved<'g, T> {
    type Target = Proxy<'g, T>;
    fn deref(&self) -> &Proxy<'g, T> {
        &self.0
    }
}

impl<T> std::fmt::Debug for Saved<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Saved(node {})", self.0.id)
    }
}

impl<'g, T> Proxy<'g, T> {
    pub(crate) fn new(id: NodeId, g: &'g GraphCell) -> Self {
        Proxy { id, g, _t: PhantomData }
    }

    /// The node this proxy stands for.
    pub fn node(&self) -> NodeId {
        self.id
    }

    fn derive<U>(&self, op: impl Into<Op>) -> Proxy<'g, U> {
        Proxy::new(self.g.push(op.into()), self.g)
    }

    /// Keeps the value for after the block, where the binding holding it becomes a plain `T`.
    pub fn save(self) -> Saved<'g, T> {
        self.g.push(Op::Save { value: self.id });
        Saved(self)
    }
}

impl<'g, T> Saved<'g, T> {
    /// The proxy (for passing where a `Proxy` is expected).
    pub fn proxy(self) -> Proxy<'g, T> {
        self.0
    }

    /// Saving twice changes nothing.
    pub fn save(self) -> Saved<'g, T> {
        self
    }
}

/// What can stand where a tensor proxy is expected: proxies, saved proxies, tensors and numbers (as constants).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be used as a tensor inside an intervention",
    label = "expected a tensor proxy (e.g. `model.lm_head.output`), a saved proxy, a `tch::Tensor` or a number"
)]
pub trait IntoTensorProxy<'g> {
    /// The proxy, adding a constant node to `g` for a plain tensor.
    fn into_proxy(self, g: &'g GraphCell) -> Proxy<'g, Tensor>;
}

impl<'g> IntoTensorProxy<'g> for Proxy<'g, Tensor> {
    fn into_proxy(self, _: &'g GraphCell) -> Proxy<'g, Tensor> {
        self
    }
}
impl<'g> IntoTensorProxy<'g> for Saved<'g, Tensor> {
    fn into_proxy(self, _: &'g GraphCell) -> Proxy<'g, Tensor> {
        self.0
    }
}
impl<'g> IntoTensorProxy<'g> for &Proxy<'g, Tensor> {
    fn into_proxy(self, _: &'g GraphCell) -> Proxy<'g, Tensor> {
        *self
    }
}
impl<'g> IntoTensorProxy<'g> for &Saved<'g, Tensor> {
    fn into_proxy(self, _: &'g GraphCell) -> Proxy<'g, Tensor> {
        self.0
    }
}
impl<'g> IntoTensorProxy<'g> for &Tensor {
    fn into_proxy(self, g: &'g GraphCell) -> Proxy<'g, Tensor> {
        g.constant_tensor(self)
    }
}
impl<'g> IntoTensorProxy<'g> for Tensor {
    fn into_proxy(self, g: &'g GraphCell) -> Proxy<'g, Tensor> {
        g.constant_tensor(&self)
    }
}

/// A tensor (not a number) where one must stand whole, as a skipped module's output.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot stand for a module's output",
    label = "expected a tensor proxy (e.g. `model.lm_head.output`), a saved proxy, or a `tch::Tensor` of the output's shape"
)]
pub trait TensorValue<'g>: IntoTensorProxy<'g> {}
impl<'g> TensorValue<'g> for Proxy<'g, Tensor> {}
impl<'g> TensorValue<'g> for Saved<'g, Tensor> {}
impl<'g> TensorValue<'g> for &Tensor {}
impl<'g> TensorValue<'g> for Tensor {}

// A number where a tensor is expected is a one-element constant: `model.x.output[(.., -1, ..)] = 0.0` fills the
// slice, and `model.x.output = 0.0` fills the whole value (a number broadcasts; a tensor must have the shape).
macro_rules! number_proxy {
    ($($t:ty),*) => {$(
        impl<'g> IntoTensorProxy<'g> for $t {
            fn into_proxy(self, g: &'g GraphCell) -> Proxy<'g, Tensor> {
                g.constant_tensor(&Tensor::from(self))
            }
        }
    )*};
}
number_proxy!(f64, f32, i64, i32);

impl<'g> Proxy<'g, Tensor> {
    fn unary(&self, kind: UnaryOp) -> Self {
        self.derive(TensorOp::Unary { kind, a: self.id })
    }

    fn binary(&self, kind: BinaryOp, other: impl IntoTensorProxy<'g>) -> Self {
        let b = other.into_proxy(self.g);
        self.derive(TensorOp::Binary { kind, a: self.id, b: b.id })
    }

    /// Matrix product (`torch.matmul`).
    pub fn matmul(&self, other: impl IntoTensorProxy<'g>) -> Self {
        self.binary(BinaryOp::Matmul, other)
    }
    /// Elementwise power with a tensor exponent.
    pub fn pow_tensor(&self, exponent: impl IntoTensorProxy<'g>) -> Self {
        self.binary(BinaryOp::Pow, exponent)
    }
    /// Elementwise power.
    pub fn pow(&self, exponent: f64) -> Self {
        self.derive(TensorOp::BinaryScalar { kind: BinaryOp::Pow, a: self.id, scalar: exponent, scalar_first: false })
    }
    /// Elementwise maximum with another tensor.
    pub fn maximum(&self, other: impl IntoTensorProxy<'g>) -> Self {
        self.binary(BinaryOp::Maximum, other)
    }
    /// Elementwise minimum with another tensor.
    pub fn minimum(&self, other: impl IntoTensorProxy<'g>) -> Self {
        self.binary(BinaryOp::Minimum, other)
    }
    /// `self == other` elementwise (bool).
    pub fn eq_tensor(&self, other: impl IntoTensorProxy<'g>) -> Self {
        self.binary(BinaryOp::Eq, other)
    }
    /// `self > other` elementwise (bool).
    pub fn gt(&self, other: impl IntoTensorProxy<'g>) -> Self {
        self.binary(BinaryOp::Gt, other)
    }
    /// `self < other` elementwise (bool).
    pub fn lt(&self, other: impl IntoTensorProxy<'g>) -> Self {
        self.binary(BinaryOp::Lt, other)
    }
    /// `self > s` elementwise (bool).
    pub fn gt_scalar(&self, s: f64) -> Self {
        self.derive(TensorOp::BinaryScalar { kind: BinaryOp::Gt, a: self.id, scalar: s, scalar_first: false })
    }
    /// `self < s` elementwise (bool).
    pub fn lt_scalar(&self, s: f64) -> Self {
        self.derive(TensorOp::BinaryScalar { kind: BinaryOp::Lt, a: self.id, scalar: s, scalar_first: false })
    }

    /// `e^x`.
    pub fn exp(&self) -> Self {
        self.unary(UnaryOp::Exp)
    }
    /// Natural logarithm.
    pub fn log(&self) -> Self {
        self.unary(UnaryOp::Log)
    }
    /// Absolute value.
    pub fn abs(&self) -> Self {
        self.unary(UnaryOp::Abs)
    }
    /// Square root.
    pub fn sqrt(&self) -> Self {
        self.unary(UnaryOp::Sqrt)
    }
    /// A copy (`clone()` in PyTorch).
    pub fn copy(&self) -> Self {
        self.unary(UnaryOp::Clone)
    }
    /// Cut from autograd.
    pub fn detach(&self) -> Self {
        self.unary(UnaryOp::Detach)
    }
    /// Contiguous layout.
    pub fn contiguous(&self) -> Self {
        self.unary(UnaryOp::Contiguous)
    }
    /// Zeros of the same shape, dtype and device.
    pub fn zeros_like(&self) -> Self {
        self.unary(UnaryOp::ZerosLike)
    }
    /// Ones of the same shape, dtype and device.
    pub fn ones_like(&self) -> Self {
        self.unary(UnaryOp::OnesLike)
    }
    /// Standard normal noise of the same shape, dtype and device.
    pub fn randn_like(&self) -> Self {
        self.unary(UnaryOp::RandnLike)
    }

    fn reduce(&self, kind: ReduceOp, dims: Vec<i64>, keepdim: bool) -> Self {
        self.derive(TensorOp::Reduce { kind, a: self.id, dims, keepdim })
    }
    /// Sum of all elements.
    pub fn sum(&self) -> Self {
        self.reduce(ReduceOp::Sum, vec![], false)
    }
    /// Sum over `dims`.
    pub fn sum_dim(&self, dims: impl IntoDims, keepdim: bool) -> Self {
        self.reduce(ReduceOp::Sum, dims.dims(), keepdim)
    }
    /// Mean of all elements.
    pub fn mean(&self) -> Self {
        self.reduce(ReduceOp::Mean, vec![], false)
    }
    /// Mean over `dims`.
    pub fn mean_dim(&self, dims: impl IntoDims, keepdim: bool) -> Self {
        self.reduce(ReduceOp::Mean, dims.dims(), keepdim)
    }
    /// Largest element.
    pub fn max(&self) -> Self {
        self.reduce(ReduceOp::Max, vec![], false)
    }
    /// Smallest element.
    pub fn min(&self) -> Self {
        self.reduce(ReduceOp::Min, vec![], false)
    }
    /// Largest values and their indices along `dim`.
    pub fn max_dim(&self, dim: i64, keepdim: bool) -> (Self, Self) {
        let t: Proxy<'g, ()> = self.derive(TensorOp::MaxMinDim { a: self.id, dim, keepdim, max: true });
        (t.derive(TensorOp::TupleGet { a: t.id, index: 0 }), t.derive(TensorOp::TupleGet { a: t.id, index: 1 }))
    }
    /// Smallest values and their indices along `dim`.
    pub fn min_dim(&self, dim: i64, keepdim: bool) -> (Self, Self) {
        let t: Proxy<'g, ()> = self.derive(TensorOp::MaxMinDim { a: self.id, dim, keepdim, max: false });
        (t.derive(TensorOp::TupleGet { a: t.id, index: 0 }), t.derive(TensorOp::TupleGet { a: t.id, index: 1 }))
    }
    /// Euclidean norm of all elements.
    pub fn norm(&self) -> Self {
        self.derive(TensorOp::Norm { a: self.id, p: 2.0, dims: vec![], keepdim: false })
    }
    /// `p`-norm over `dims`.
    pub fn norm_dim(&self, p: f64, dims: impl IntoDims, keepdim: bool) -> Self {
        self.derive(TensorOp::Norm { a: self.id, p, dims: dims.dims(), keepdim })
    }
    /// Softmax along `dim` (computed in float32 or wider).
    pub fn softmax(&self, dim: i64) -> Self {
        self.derive(TensorOp::Softmax { a: self.id, dim, log: false })
    }
    /// Log-softmax along `dim`.
    pub fn log_softmax(&self, dim: i64) -> Self {
        self.derive(TensorOp::Softmax { a: self.id, dim, log: true })
    }
    /// Index of the largest element along `dim` (int64).
    pub fn argmax(&self, dim: i64, keepdim: bool) -> Self {
        self.derive(TensorOp::Argmax { a: self.id, dim: Some(dim), keepdim })
    }
    /// The `k` largest values along `dim` and their indices.
    pub fn topk(&self, k: i64, dim: i64) -> (Self, Self) {
        let t: Proxy<'g, ()> = self.derive(TensorOp::Topk { a: self.id, k, dim, largest: true });
        (t.derive(TensorOp::TupleGet { a: t.id, index: 0 }), t.derive(TensorOp::TupleGet { a: t.id, index: 1 }))
    }

    /// New shape (one `-1` inferred).
    pub fn reshape(&self, shape: impl IntoDims) -> Self {
        self.derive(TensorOp::Reshape { a: self.id, shape: shape.dims() })
    }
    /// New shape, as `view` (same as `reshape` here: never shares a write).
    pub fn view(&self, shape: impl IntoDims) -> Self {
        self.reshape(shape)
    }
    /// Swap two dimensions.
    pub fn transpose(&self, dim0: i64, dim1: i64) -> Self {
        self.derive(TensorOp::Transpose { a: self.id, dim0, dim1 })
    }
    /// Reorder dimensions.
    pub fn permute(&self, dims: impl IntoDims) -> Self {
        self.derive(TensorOp::Permute { a: self.id, dims: dims.dims() })
    }
    /// `len` entries from `start` along `dim`.
    pub fn narrow(&self, dim: i64, start: i64, len: i64) -> Self {
        self.derive(TensorOp::Narrow { a: self.id, dim, start, len })
    }
    /// Entry `index` along `dim`, removing that dimension.
    pub fn select(&self, dim: i64, index: i64) -> Self {
        self.derive(TensorOp::Select { a: self.id, dim, index })
    }
    /// tch-style indexing: `h.i((.., -1, ..))` is `h[:, -1, :]`.
    pub fn i(&self, index: impl IntoIndex) -> Self {
        self.derive(TensorOp::Index { a: self.id, index: index.items() })
    }
    /// Insert a dimension of size 1 at `dim`.
    pub fn unsqueeze(&self, dim: i64) -> Self {
        self.derive(TensorOp::Unsqueeze { a: self.id, dim })
    }
    /// Remove dimension `dim` if it has size 1.
    pub fn squeeze_dim(&self, dim: i64) -> Self {
        self.derive(TensorOp::Squeeze { a: self.id, dim: Some(dim) })
    }
    /// Remove every dimension of size 1.
    pub fn squeeze(&self) -> Self {
        self.derive(TensorOp::Squeeze { a: self.id, dim: None })
    }
    /// Convert the dtype.
    pub fn to_kind(&self, kind: Kind) -> Self {
        self.derive(TensorOp::ToKind { a: self.id, kind: crate::graph::value::kind_name(kind).to_string() })
    }
    /// Move to a device.
    pub fn to_device(&self, device: Device) -> Self {
        self.derive(TensorOp::ToDevice { a: self.id, device: crate::graph::value::device_name(device) })
    }
    /// Elementwise `cond ? self : other`.
    pub fn where_self(&self, cond: impl IntoTensorProxy<'g>, other: impl IntoTensorProxy<'g>) -> Self {
        let c = cond.into_proxy(self.g);
        let o = other.into_proxy(self.g);
        self.derive(TensorOp::Where { cond: c.id, a: self.id, b: o.id })
    }
    /// Values at `index` along `dim`.
    pub fn gather(&self, dim: i64, index: impl IntoTensorProxy<'g>) -> Self {
        let idx = index.into_proxy(self.g);
        self.derive(TensorOp::Gather { a: self.id, dim, index: idx.id })
    }
}

impl<'g> Proxy<'g, Tensor> {
    /// Backpropagates from this value (a single value, e.g. a `.sum()`): the `.grad` of module inputs and outputs
    /// read after it in the block are the gradients of this loss. The forward pass then runs with autograd.
    pub fn backward(&self) {
        let id = self.g.push(Op::Backward { a: self.id });
        let mut b = self.g.inner.borrow_mut();
        let inv = b.invoke;
        b.last_backward.insert(inv, id);
    }

    /// The gradient of the loss of the latest `.backward()` of this invoke with respect to this value, which must
    /// be a module's input or output as read in the block (`model.model.layers[5].output.grad` in `intervene!`).
    pub fn grad(&self) -> Self {
        let is_read =
            matches!(self.g.inner.borrow().graph.nodes.get(self.id as usize).map(|n| &n.op), Some(Op::Read { .. }));
        if !is_read {
            self.g.record_error(crate::Error::Intervention {
                message: "`.grad` is available on a module's input or output (`model.model.layers[5].output.grad`), not on a computed value".into(),
            });
        }
        let Some(backward) = self.g.current_backward() else {
            return self.derive(TensorOp::Unary { kind: UnaryOp::ZerosLike, a: self.id });
        };
        if let Err(e) = self.g.check_grad_order(self.id, backward) {
            self.g.record_error(e);
        }
        self.derive(Op::Grad { a: self.id, backward })
    }
}

impl<'g> Proxy<'g, Vec<Tensor>> {
    /// Input number `i` of a module's inputs.
    pub fn get(&self, i: u32) -> Proxy<'g, Tensor> {
        self.derive(TensorOp::TupleGet { a: self.id, index: i })
    }
}

/// Concatenates proxies along `dim`.
pub fn cat<'g>(xs: &[Proxy<'g, Tensor>], dim: i64) -> Proxy<'g, Tensor> {
    let g = xs.first().expect("cat of at least one proxy").g;
    Proxy::new(g.push(TensorOp::Cat { xs: xs.iter().map(|p| p.id).collect(), dim }.into()), g)
}

/// Stacks proxies along a new `dim`.
pub fn stack<'g>(xs: &[Proxy<'g, Tensor>], dim: i64) -> Proxy<'g, Tensor> {
    let g = xs.first().expect("stack of at least one proxy").g;
    Proxy::new(g.push(TensorOp::Stack { xs: xs.iter().map(|p| p.id).collect(), dim }.into()), g)
}

/// Proxies and saved proxies as plain proxies (left operands of operators).
trait IntoLeft<'g> {
    fn into_left(self) -> Proxy<'g, Tensor>;
}
impl<'g> IntoLeft<'g> for Proxy<'g, Tensor> {
    fn into_left(self) -> Proxy<'g, Tensor> {
        self
    }
}
impl<'g> IntoLeft<'g> for Saved<'g, Tensor> {
    fn into_left(self) -> Proxy<'g, Tensor> {
        self.0
    }
}
impl<'g> IntoLeft<'g> for &Proxy<'g, Tensor> {
    fn into_left(self) -> Proxy<'g, Tensor> {
        *self
    }
}
impl<'g> IntoLeft<'g> for &Saved<'g, Tensor> {
    fn into_left(self) -> Proxy<'g, Tensor> {
        self.0
    }
}

// ---- operators ---------------------------------------------------------------------------------------------------

// Operators take concrete right-hand sides (no blanket impl), and numbers only as `f64` and `i64`, so that a
// literal (`h * 2.0`, `h + 1`) has exactly one candidate and `let y = h * 2.0; y.sum()` type-checks. A proxy by
// reference works as by value (`&h * 2.0` reads the same whether `h` is a tensor or, in a session sent as one
// request, an earlier block's saved proxy).
macro_rules! binary_ops {
    ($($trait:ident $method:ident $kind:ident),*) => {$(
        binary_ops!(@lhs $trait $method $kind Proxy<'g, Tensor>);
        binary_ops!(@lhs $trait $method $kind Saved<'g, Tensor>);
        binary_ops!(@lhs $trait $method $kind &Proxy<'g, Tensor>);
        binary_ops!(@lhs $trait $method $kind &Saved<'g, Tensor>);
        binary_ops!(@scalars $trait $method $kind f64 i64);
    )*};
    (@lhs $trait:ident $method:ident $kind:ident $lhs:ty) => {
        binary_ops!(@rhs $trait $method $kind $lhs, Proxy<'g, Tensor>);
        binary_ops!(@rhs $trait $method $kind $lhs, Saved<'g, Tensor>);
        binary_ops!(@rhs $trait $method $kind $lhs, &Proxy<'g, Tensor>);
        binary_ops!(@rhs $trait $method $kind $lhs, &Saved<'g, Tensor>);
        binary_ops!(@rhs $trait $method $kind $lhs, &Tensor);
        binary_ops!(@rhs $trait $method $kind $lhs, Tensor);
    };
    (@rhs $trait:ident $method:ident $kind:ident $lhs:ty, $rhs:ty) => {
        impl<'g> std::ops::$trait<$rhs> for $lhs {
            type Output = Proxy<'g, Tensor>;
            fn $method(self, rhs: $rhs) -> Proxy<'g, Tensor> {
                IntoLeft::into_left(self).binary(BinaryOp::$kind, rhs)
            }
        }
    };
    (@scalars $trait:ident $method:ident $kind:ident $($s:ty)*) => {$(
        impl<'g> std::ops::$trait<$s> for Proxy<'g, Tensor> {
            type Output = Proxy<'g, Tensor>;
            fn $method(self, rhs: $s) -> Proxy<'g, Tensor> {
                self.derive(TensorOp::BinaryScalar { kind: BinaryOp::$kind, a: self.id, scalar: rhs as f64, scalar_first: false })
            }
        }
        impl<'g> std::ops::$trait<$s> for Saved<'g, Tensor> {
            type Output = Proxy<'g, Tensor>;
            fn $method(self, rhs: $s) -> Proxy<'g, Tensor> {
                std::ops::$trait::$method(self.0, rhs)
            }
        }
        impl<'g> std::ops::$trait<$s> for &Proxy<'g, Tensor> {
            type Output = Proxy<'g, Tensor>;
            fn $method(self, rhs: $s) -> Proxy<'g, Tensor> {
                std::ops::$trait::$method(*self, rhs)
            }
        }
        impl<'g> std::ops::$trait<$s> for &Saved<'g, Tensor> {
            type Output = Proxy<'g, Tensor>;
            fn $method(self, rhs: $s) -> Proxy<'g, Tensor> {
                std::ops::$trait::$method(self.0, rhs)
            }
        }
        impl<'g> std::ops::$trait<Proxy<'g, Tensor>> for $s {
            type Output = Proxy<'g, Tensor>;
            fn $method(self, rhs: Proxy<'g, Tensor>) -> Proxy<'g, Tensor> {
                rhs.derive(TensorOp::BinaryScalar { kind: BinaryOp::$kind, a: rhs.id, scalar: self as f64, scalar_first: true })
            }
        }
        impl<'g> std::ops::$trait<Saved<'g, Tensor>> for $s {
            type Output = Proxy<'g, Tensor>;
            fn $method(self, rhs: Saved<'g, Tensor>) -> Proxy<'g, Tensor> {
                std::ops::$trait::$method(self, rhs.0)
            }
        }
    )*};
}
binary_ops!(Add add Add, Sub sub Sub, Mul mul Mul, Div div Div);

impl<'g> std::ops::Neg for Proxy<'g, Tensor> {
    type Output = Proxy<'g, Tensor>;
    fn neg(self) -> Proxy<'g, Tensor> {
        self.unary(UnaryOp::Neg)
    }
}
impl<'g> std::ops::Neg for Saved<'g, Tensor> {
    type Output = Proxy<'g, Tensor>;
    fn neg(self) -> Proxy<'g, Tensor> {
        self.0.unary(UnaryOp::Neg)
    }
}

impl GraphCell {
    /// A constant node holding a copy of `t`.
    ///
    /// A tensor that requires grad (a trainable parameter of a session) is also kept live: the run uses it
    /// itself, so that a backward reaches it (its `.grad` accumulates) and an optimizer step between runs is seen
    /// by the next one. The copy is what the graph serializes.
    pub(crate) fn constant_tensor<'g>(&'g self, t: &Tensor) -> Proxy<'g, Tensor> {
        let data = TensorData::from_tensor(t);
        match data {
            Ok(d) => {
                let id = self.push(Op::Const { value: Constant::Tensor(d) });
                if t.requires_grad() {
                    self.inner.borrow_mut().live.insert(id, t);
                }
                Proxy::new(id, self)
            }
            Err(e) => {
                self.record_error(e);
                Proxy::new(self.push(Op::Const { value: Constant::Scalar(f64::NAN) }), self)
            }
        }
    }
}
