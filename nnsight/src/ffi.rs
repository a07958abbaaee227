//! Bindings to `csrc/shim.cpp`: the few libtorch facilities that tch does not expose.

use std::cell::Cell;
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
}

const UNKNOWN: u8 = 0;
const AVAILABLE: u8 = 1;
const UNAVAILABLE: u8 = 2;
/// Whether this libtorch has the oneDNN operator (learned at the first call).
static ONEDNN: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Off in every thread when the environment variable `NNSIGHT_NO_ONEDNN` is set.
static ENV_OFF: OnceLock<bool> = OnceLock::new();

thread_local! {
    /// This thread's switch (`None`: follow the environment).
    static THREAD_SWITCH: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Whether the oneDNN linear is on for this thread and has run successfully in this process.
pub fn onednn_linear_in_use() -> bool {
    ONEDNN.load(Ordering::Relaxed) == AVAILABLE && !disabled()
}

/// Turns the oneDNN linear on (the default) or off for the calling thread: off, every linear layer it runs uses
/// `at::linear` (MKL), as PyTorch eager does. The environment variable `NNSIGHT_NO_ONEDNN` turns it off in every
/// thread that does not say otherwise.
pub fn set_onednn_linear(enabled: bool) {
    THREAD_SWITCH.with(|s| s.set(Some(enabled)));
}

fn disabled() -> bool {
    THREAD_SWITCH.with(|s| match s.get() {
        Some(on) => !on,
        None => *ENV_OFF.get_or_init(|| std::env::var_os("NNSIGHT_NO_ONEDNN").is_some()),
    })
}

/// `x Wᵀ + b` through oneDNN when that is exact enough and faster (float32 on the CPU, no gradient wanted);
/// `None` when the caller should use `at::linear` (other devices or dtypes, autograd, operator unavailable).
pub(crate) fn onednn_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Option<Tensor> {
    if ONEDNN.load(Ordering::Relaxed) == UNAVAILABLE
        || disabled()
        || x.device() != tch::Device::Cpu
        || x.kind() != tch::Kind::Float
        || w.kind() != tch::Kind::Float
        || x.requires_grad()
        || w.requires_grad()
        || b.is_some_and(|b| b.requires_grad() || b.kind() != tch::Kind::Float)
    {
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
