//! Bindings to `csrc/shim.cpp`: the few libtorch facilities that tch does not expose.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;
use tch::Tensor;

unsafe extern "C" {
    fn nnsight_onednn_linear(
        x: *const torch_sys::C_tensor,
        w: *const torch_sys::C_tensor,
        b: *const torch_sys::C_tensor,
        out: *mut *mut torch_sys::C_tensor,
    ) -> std::ffi::c_int;
    fn nnsight_to_meta(t: *const torch_sys::C_tensor, out: *mut *mut torch_sys::C_tensor) -> std::ffi::c_int;
    fn nnsight_empty_meta(
        sizes: *const i64,
        ndim: usize,
        scalar_type: std::ffi::c_int,
        out: *mut *mut torch_sys::C_tensor,
    ) -> std::ffi::c_int;
    fn nnsight_is_meta(t: *const torch_sys::C_tensor) -> std::ffi::c_int;
    fn nnsight_install_meta_kernels() -> std::ffi::c_int;
    fn nnsight_same_tensor(a: *const torch_sys::C_tensor, b: *const torch_sys::C_tensor) -> std::ffi::c_int;
    fn nnsight_backward(
        loss: *const torch_sys::C_tensor,
        keep_graph: std::ffi::c_int,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> std::ffi::c_int;
    fn nnsight_reset_grad(t: *const torch_sys::C_tensor) -> std::ffi::c_int;
    fn nnsight_torch_cuda_anchor() -> *mut std::ffi::c_void;
}

/// Whether this program has libtorch_cuda linked (the libtorch it was built with ships it). Calling it also keeps
/// the reference that makes the linker keep libtorch_cuda in every program built on nnsight (see `build.rs`).
pub(crate) fn keep_torch_cuda() -> bool {
    // SAFETY: returns a constant address (or null); nothing is dereferenced.
    !std::hint::black_box(unsafe { nnsight_torch_cuda_anchor() }).is_null()
}

const UNKNOWN: u8 = 0;
const AVAILABLE: u8 = 1;
const UNAVAILABLE: u8 = 2;
/// Whether this libtorch has the oneDNN operator (learned at the first call).
static ONEDNN: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Whether the oneDNN linear has run successfully in this process (`Some(true)`), is missing from this libtorch
/// (`Some(false)`), or has not been tried yet (`None`).
pub(crate) fn onednn_available() -> Option<bool> {
    match ONEDNN.load(Ordering::Relaxed) {
        AVAILABLE => Some(true),
        UNAVAILABLE => Some(false),
        _ => None,
    }
}

/// `x Wᵀ + b` through oneDNN's matmul (`mkldnn::_linear_pointwise`). The caller checks that the operands suit it
/// (float32 CPU tensors, no gradient wanted); `None` when the operator is missing or refused these operands.
pub(crate) fn onednn_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Option<Tensor> {
    if ONEDNN.load(Ordering::Relaxed) == UNAVAILABLE {
        return None;
    }
    let b_ptr = b.map_or(std::ptr::null(), |b| b.as_ptr());
    let mut out: *mut torch_sys::C_tensor = std::ptr::null_mut();
    // SAFETY: the pointers are live tensors borrowed for the call; on success `out` is a fresh heap tensor whose
    // ownership passes to the returned `Tensor`.
    match unsafe { nnsight_onednn_linear(x.as_ptr(), w.as_ptr(), b_ptr, &mut out) } {
        0 if !out.is_null() => {
            ONEDNN.store(AVAILABLE, Ordering::Relaxed);
            // SAFETY: see above.
            Some(unsafe { Tensor::from_ptr(out) })
        }
        1 => {
            ONEDNN.store(UNAVAILABLE, Ordering::Relaxed);
            None
        }
        _ => None,
    }
}

/// Whether `t` is a meta tensor (shapes and dtypes only, no storage). tch reports a meta tensor's device as
/// `Device::Mps`, so code that branches on a device must ask this first.
pub(crate) fn is_meta(t: &Tensor) -> bool {
    // SAFETY: `t` is a live tensor borrowed for the call.
    unsafe { nnsight_is_meta(t.as_ptr()) != 0 }
}

/// Whether `a` and `b` are handles on one tensor (shallow clones of each other): how tied meta parameters, which
/// have no data pointer to compare, are told apart.
pub(crate) fn same_tensor(a: &Tensor, b: &Tensor) -> bool {
    // SAFETY: both are live tensors borrowed for the call.
    unsafe { nnsight_same_tensor(a.as_ptr(), b.as_ptr()) != 0 }
}

/// `loss.backward()` as in PyTorch: accumulates into the `.grad` of every leaf that requires grad and that `loss`
/// (one element) depends on; keeps the autograd graph when `keep_graph` (tch's `backward` always frees it).
pub(crate) fn backward(loss: &Tensor, keep_graph: bool) -> Result<(), tch::TchError> {
    let mut err = vec![0u8; 1024];
    // SAFETY: `loss` is live for the call; `err` is a writable buffer of the length given.
    let rc = unsafe { nnsight_backward(loss.as_ptr(), keep_graph as _, err.as_mut_ptr().cast(), err.len()) };
    if rc == 0 {
        return Ok(());
    }
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    Err(tch::TchError::Torch(String::from_utf8_lossy(&err[..end]).into_owned()))
}

/// Drops `t`'s gradient (undefined again, its memory freed).
pub(crate) fn reset_grad(t: &Tensor) {
    // SAFETY: `t` is live for the call.
    unsafe {
        nnsight_reset_grad(t.as_ptr());
    }
}

/// A meta tensor of `t`'s sizes, strides and dtype (no data is copied); `t` itself when it is meta already.
pub(crate) fn to_meta(t: &Tensor) -> Result<Tensor, tch::TchError> {
    install_meta_kernels();
    let mut out: *mut torch_sys::C_tensor = std::ptr::null_mut();
    // SAFETY: `t` is live for the call; on success `out` is a fresh heap tensor owned by the returned `Tensor`.
    match unsafe { nnsight_to_meta(t.as_ptr(), &mut out) } {
        // SAFETY: `out` is the non-null fresh tensor the shim allocated with `new`; this `Tensor` is its one owner.
        0 if !out.is_null() => Ok(unsafe { Tensor::from_ptr(out) }),
        _ => Err(tch::TchError::Torch(format!("cannot make a meta tensor of shape {:?}", t.size()))),
    }
}

/// A contiguous meta tensor of `shape` and `kind`.
pub(crate) fn empty_meta(shape: &[i64], kind: tch::Kind) -> Result<Tensor, tch::TchError> {
    let Some(scalar_type) = scalar_type(kind) else {
        return Err(tch::TchError::Kind(format!("no meta tensors of dtype {kind:?}")));
    };
    install_meta_kernels();
    let mut out: *mut torch_sys::C_tensor = std::ptr::null_mut();
    // SAFETY: `shape` is live for the call; on success `out` is a fresh heap tensor owned by the returned `Tensor`.
    match unsafe { nnsight_empty_meta(shape.as_ptr(), shape.len(), scalar_type, &mut out) } {
        // SAFETY: `out` is the non-null fresh tensor the shim allocated with `new`; this `Tensor` is its one owner.
        0 if !out.is_null() => Ok(unsafe { Tensor::from_ptr(out) }),
        _ => Err(tch::TchError::Torch(format!("cannot make a meta tensor of shape {shape:?}"))),
    }
}

/// Registers the shim's meta kernels for the ops libtorch's C++ has none for (PyTorch registers them in Python):
/// the layer norm, `where`, `index_select` (embeddings), `max()`/`min()`, the logical ops, `abs`. Done once, before
/// the first meta tensor exists; a refusal leaves those ops failing with libtorch's own message.
fn install_meta_kernels() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        // SAFETY: no arguments; the C++ side registers once and catches every exception.
        if unsafe { nnsight_install_meta_kernels() } != 0 {
            eprintln!("nnsight: warning: libtorch refused the meta kernels of the shim; some ops cannot be scanned");
        }
    });
}

/// `c10::ScalarType`'s value of a dtype (those a graph can name).
fn scalar_type(kind: tch::Kind) -> Option<std::ffi::c_int> {
    use tch::Kind::*;
    Some(match kind {
        Uint8 => 0,
        Int8 => 1,
        Int16 => 2,
        Int => 3,
        Int64 => 4,
        Half => 5,
        Float => 6,
        Double => 7,
        Bool => 11,
        BFloat16 => 15,
        _ => return None,
    })
}
