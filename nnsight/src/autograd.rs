//! Gradient hooks on tensors: read, or replace, the gradient flowing back through a tensor, as
//! `tensor.register_hook(fn)` does in PyTorch.
//!
//! tch exposes no tensor hooks; libtorch does (`at::Tensor::register_hook`). `nnsight/csrc/shim.cpp` registers a
//! C++ lambda that calls back into a Rust closure, so a hook is libtorch's own mechanism: it runs inside the
//! backward pass, before the gradient goes on to the tensor's inputs, and a gradient it returns replaces the
//! original for everything upstream (a leaf's `.grad()` included). This is the first brick of gradients in
//! traces: writing a gradient inside `intervene!` (`h.grad = h.grad * 2.0`) is such a hook.
//!
//! ```
//! use nnsight::autograd::register_hook;
//! use tch::{Device, Kind, Tensor};
//!
//! # fn main() -> nnsight::Result<()> {
//! let w = Tensor::ones([3, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
//! let x = Tensor::ones([4, 3], (Kind::Float, Device::Cpu));
//! let h = x.matmul(&w); // an activation: [4, 2]
//!
//! // Double the gradient of `h`: every gradient upstream of it (w's) doubles.
//! let hook = register_hook(&h, |g| Some(g * 2.0))?;
//! h.sum(Kind::Float).backward();
//! assert_eq!(w.grad().sum(Kind::Float).double_value(&[]), 2.0 * 4.0 * 6.0);
//!
//! // Failures (a panic in the closure, a replacement of the wrong shape) leave the gradient as it was and are
//! // reported by the handle; there were none.
//! assert!(hook.take_errors().is_empty());
//! hook.remove(); // or keep it: it lives as long as `h` and its graph
//! # Ok(())
//! # }
//! ```
//!
//! # Semantics
//!
//! - A hook runs each time a gradient with respect to its tensor is computed (once per backward through it). It
//!   gets the incoming gradient and returns `None` (no change) or `Some(replacement)`, which must have the
//!   gradient's shape, dtype and device.
//! - Several hooks on one tensor run in registration order, each seeing the previous one's result.
//! - A hook that panics, or returns a replacement of the wrong shape, dtype or device, leaves the gradient
//!   unchanged; the backward goes on, and the failure is kept as an [`Error::Intervention`] that
//!   [`HookHandle::take_errors`] hands back (at most 64 are kept per hook).
//! - Dropping a [`HookHandle`] does *not* remove the hook (as a PyTorch `RemovableHandle` that goes out of scope):
//!   the hook lives as long as its tensor and the graph that reaches it. [`HookHandle::remove`] removes it.
//! - The closure (and everything it captured) is dropped exactly once: by [`HookHandle::remove`], or when libtorch
//!   frees the hook with the tensor and its graph, whichever comes first. A handle holds only a weak reference to
//!   the tensor, so it never keeps a tensor or a graph alive. A closure that captures the very tensor it hooks
//!   keeps that tensor alive until the hook is removed (a reference cycle, as in PyTorch without its GC).
//! - The closure is `Send`: libtorch may run a backward pass (and so the hook) on one of its worker threads, as it
//!   does on a GPU. Calls are serialized by a mutex. A closure cannot remove its own hook while it runs (that
//!   panics, and is reported as a failure of the hook).

use crate::error::{Error, Result};
use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::mem::ManuallyDrop;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tch::Tensor;
use torch_sys::C_tensor;

/// The shim's handle on one registered hook (`struct nnsight_grad_hook`): a weak reference to the tensor and the
/// hook's index in its hook list.
#[repr(C)]
struct RawHook {
    _opaque: [u8; 0],
}

/// `0`: no change; `1`: `*out` holds a replacement gradient, a `new at::Tensor` that C++ moves from and deletes.
type CallFn = unsafe extern "C" fn(ctx: *mut c_void, grad: *const C_tensor, out: *mut *mut C_tensor) -> c_int;
/// Frees `ctx`; C++ calls it exactly once.
type DropFn = unsafe extern "C" fn(ctx: *mut c_void);

unsafe extern "C" {
    fn nnsight_register_grad_hook(
        t: *const C_tensor,
        ctx: *mut c_void,
        call: CallFn,
        drop: DropFn,
        handle: *mut *mut RawHook,
    ) -> c_int;
    fn nnsight_remove_grad_hook(handle: *mut RawHook) -> c_int;
    fn nnsight_free_grad_hook(handle: *mut RawHook);
}

type HookFn = Box<dyn FnMut(&Tensor) -> Option<Tensor> + Send>;

/// How many failures a hook keeps before it forgets the newer ones.
const MAX_ERRORS: usize = 64;

/// What the handle and the C++ lambda share: the closure (taken out, and dropped, on removal or when libtorch
/// frees the hook) and the failures recorded while it ran.
struct Shared {
    f: Mutex<Option<HookFn>>,
    errors: Mutex<Vec<Error>>,
}

thread_local! {
    /// The hook whose closure this thread is running (its `Shared`'s address), or 0.
    static RUNNING: Cell<usize> = const { Cell::new(0) };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic is never raised while one of these locks is held (the closure runs under `catch_unwind`), but a
    // poisoned lock is harmless here anyway.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn record(&self, message: String) {
        let mut errors = lock(&self.errors);
        if errors.len() < MAX_ERRORS {
            errors.push(Error::Intervention { message });
        }
    }

    /// Drops the closure (outside the lock: its captures may free tensors, graphs and so other hooks).
    fn drop_closure(&self) {
        let f = lock(&self.f).take();
        drop(f);
    }
}

/// Registers `f` as a gradient hook on `t`: each time the backward pass computes the gradient with respect to `t`,
/// `f` sees it and returns `None` to leave it, or `Some(replacement)` (same shape, dtype and device) to replace it
/// for everything upstream. Works on leaves (parameters) and on computed tensors (activations) alike.
///
/// Fails when `t` does not require grad (a leaf without `set_requires_grad(true)`, or a value computed without
/// gradient tracking), or when libtorch refuses the hook. See the [module documentation](self) for the rules.
pub fn register_hook<F>(t: &Tensor, f: F) -> Result<HookHandle>
where
    F: FnMut(&Tensor) -> Option<Tensor> + Send + 'static,
{
    if !t.defined() {
        return Err(Error::Intervention { message: "cannot register a gradient hook on an undefined tensor".into() });
    }
    if !t.requires_grad() {
        return Err(Error::Intervention {
            message: format!(
                "cannot register a gradient hook on a tensor that does not require grad (shape {:?}); call \
                 `set_requires_grad(true)` on a leaf, or hook a value computed from one with gradients enabled",
                t.size()
            ),
        });
    }
    let shared = Arc::new(Shared { f: Mutex::new(Some(Box::new(f))), errors: Mutex::new(Vec::new()) });
    let ctx = Arc::into_raw(Arc::clone(&shared)) as *mut c_void;
    let mut raw: *mut RawHook = std::ptr::null_mut();
    // SAFETY: `t` is live for the call. From here on C++ owns `ctx` (one strong count of `shared`) and calls
    // `drop_ctx` on it exactly once, failure included; `call_hook` and `drop_ctx` never unwind.
    let status = unsafe { nnsight_register_grad_hook(t.as_ptr(), ctx, call_hook, drop_ctx, &mut raw) };
    match (status, NonNull::new(raw)) {
        (0, Some(raw)) => Ok(HookHandle { raw, shared }),
        (1, _) => Err(Error::Intervention {
            message: "cannot register a gradient hook on a tensor that does not require grad".into(),
        }),
        _ => Err(Error::Intervention {
            message: format!("libtorch refused a gradient hook on a tensor of shape {:?}", t.size()),
        }),
    }
}

/// A registered gradient hook, from [`register_hook`]. Dropping it leaves the hook in place; [`remove`](Self::remove)
/// removes it. Not `Send`: it stays on the thread that registered it.
pub struct HookHandle {
    raw: NonNull<RawHook>,
    shared: Arc<Shared>,
}

impl HookHandle {
    /// Removes the hook: it no longer runs, and its closure is dropped now. When the tensor is already gone but its
    /// graph is not, libtorch keeps an empty shell of the hook until the graph is freed; the closure is dropped
    /// all the same. Must not race a backward pass running through the tensor on another thread.
    pub fn remove(self) {
        if RUNNING.with(Cell::get) == Arc::as_ptr(&self.shared) as usize {
            panic!("a gradient hook cannot remove itself while it runs");
        }
        // SAFETY: `raw` is the live handle this value owns (freed only by `Drop`).
        unsafe { nnsight_remove_grad_hook(self.raw.as_ptr()) };
        self.shared.drop_closure();
    }

    /// The failures recorded since the last call (a panic in the closure, or a replacement of the wrong shape,
    /// dtype or device; each left the gradient unchanged), oldest first, as [`Error::Intervention`].
    pub fn take_errors(&self) -> Vec<Error> {
        std::mem::take(&mut *lock(&self.shared.errors))
    }
}

impl Drop for HookHandle {
    fn drop(&mut self) {
        // SAFETY: frees the handle allocated by the shim, once; the hook itself stays with its tensor.
        unsafe { nnsight_free_grad_hook(self.raw.as_ptr()) };
    }
}

impl std::fmt::Debug for HookHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A closure running on another thread holds the lock: it is live.
        let live = self.shared.f.try_lock().map_or(true, |f| f.is_some());
        f.debug_struct("HookHandle").field("live", &live).finish_non_exhaustive()
    }
}

/// The message of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".into()
    }
}

/// Called by the C++ lambda with the incoming gradient (borrowed). Never unwinds.
unsafe extern "C" fn call_hook(ctx: *mut c_void, grad: *const C_tensor, out: *mut *mut C_tensor) -> c_int {
    // SAFETY: `ctx` is the `Arc<Shared>` given at registration, alive until `drop_ctx`, which libtorch calls only
    // after the last call has returned.
    let shared = unsafe { &*(ctx as *const Shared) };
    let run = || -> Option<Tensor> {
        // SAFETY: `grad` is a live `at::Tensor` borrowed for this call; `ManuallyDrop` keeps Rust from freeing it.
        let grad = ManuallyDrop::new(unsafe { Tensor::from_ptr(grad as *mut C_tensor) });
        let mut f = lock(&shared.f);
        let f = f.as_mut()?; // removed
        let shape = grad.size();
        let outer = RUNNING.with(|r| r.replace(ctx as usize));
        let result = catch_unwind(AssertUnwindSafe(|| f(&grad)));
        RUNNING.with(|r| r.set(outer));
        let replacement = match result {
            Ok(r) => r?,
            Err(payload) => {
                let message = panic_message(payload.as_ref());
                shared.record(format!(
                    "gradient hook panicked: {message}; the gradient (shape {shape:?}) was left unchanged"
                ));
                return None;
            }
        };
        let (given, kind, device) = (replacement.size(), replacement.kind(), replacement.device());
        if given != shape || kind != grad.kind() || device != grad.device() {
            shared.record(format!(
                "gradient hook returned a {kind:?} tensor of shape {given:?} on {device:?} for a {:?} gradient of \
                 shape {shape:?} on {:?}; the gradient was left unchanged",
                grad.kind(),
                grad.device()
            ));
            return None;
        }
        Some(replacement)
    };
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(Some(replacement)) => {
            let mut replacement = ManuallyDrop::new(replacement);
            // SAFETY: hands the `new at::Tensor` behind `replacement` to C++, which deletes it; Rust never drops it.
            unsafe { *out = replacement.as_mut_ptr() };
            1
        }
        Ok(None) => 0,
        Err(payload) => {
            let message = panic_message(payload.as_ref());
            let _ = catch_unwind(AssertUnwindSafe(|| {
                shared.record(format!("gradient hook failed: {message}; the gradient was left unchanged"))
            }));
            0
        }
    }
}

/// Called by C++ once, when the last copy of the lambda goes: releases its `Arc<Shared>` and drops the closure.
/// Never unwinds.
unsafe extern "C" fn drop_ctx(ctx: *mut c_void) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `ctx` came from `Arc::into_raw` at registration, and this is its only release.
        let shared = unsafe { Arc::from_raw(ctx as *const Shared) };
        shared.drop_closure();
    }));
}
