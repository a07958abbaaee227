//! `nnsight::autograd`: gradient hooks on tensors through the C++ shim. A hook sees the gradient autograd
//! computes, a replacement changes every gradient upstream (and nothing downstream), hooks compose in order, and
//! the closure is dropped exactly once, however the hook goes; a panic stays on the Rust side.

use crate::common;
use nnsight::autograd::register_hook;
use nnsight::Error;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};

const F: (Kind, Device) = (Kind::Float, Device::Cpu);

/// A two-layer network on fixed random data: `x [5, 3] -> w1 [3, 4] -> tanh = hidden [5, 4] -> w2 [4, 2] -> loss`.
struct Net {
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
}

impl Net {
    fn new() -> Net {
        common::init();
        tch::manual_seed(7);
        Net {
            x: Tensor::randn([5, 3], F),
            w1: Tensor::randn([3, 4], F).set_requires_grad(true),
            w2: Tensor::randn([4, 2], F).set_requires_grad(true),
        }
    }

    fn hidden(&self) -> Tensor {
        self.x.matmul(&self.w1).tanh()
    }

    fn loss(&self, hidden: &Tensor) -> Tensor {
        hidden.matmul(&self.w2).pow_tensor_scalar(2).sum(Kind::Float)
    }

    /// Runs backward from `loss` and returns (w1's gradient, w2's gradient), clearing them for the next run.
    fn backward(&self, loss: &Tensor) -> (Tensor, Tensor) {
        loss.f_backward().expect("backward");
        let grads = (self.w1.grad().copy(), self.w2.grad().copy());
        for w in [&self.w1, &self.w2] {
            let mut g = w.grad();
            let _ = g.zero_();
        }
        grads
    }

    /// The gradients without any hook.
    fn plain(&self) -> (Tensor, Tensor) {
        let h = self.hidden();
        self.backward(&self.loss(&h))
    }
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.equal(b)
}

/// Counts how many times the values it is captured in are dropped.
#[test]
fn a_hook_sees_the_gradient_autograd_computes() -> nnsight::Result<()> {
    let net = Net::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let h = net.hidden();
    let record = Arc::clone(&seen);
    let hook = register_hook(&h, move |g| {
        record.lock().unwrap().push(g.copy());
        None
    })?;
    let _ = net.backward(&net.loss(&h));
    // The reference, as retain_grad + .grad() shows it: the same values made a leaf, and its .grad().
    let leaf = net.hidden().detach().set_requires_grad(true);
    net.loss(&leaf).backward();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "one call per backward");
    assert!(same(&seen[0], &leaf.grad()), "{:?} vs {:?}", seen[0], leaf.grad());
    // And as autograd.grad computes it on a graph without hooks.
    let h2 = net.hidden();
    let g = Tensor::run_backward(&[net.loss(&h2)], &[&h2], false, false);
    assert!(same(&seen[0], &g[0]));
    assert!(hook.take_errors().is_empty());
    hook.remove();
    Ok(())
}

#[test]
fn doubling_an_activation_gradient_doubles_every_gradient_upstream() -> nnsight::Result<()> {
    let net = Net::new();
    let (w1_plain, w2_plain) = net.plain();
    let h = net.hidden();
    let hook = register_hook(&h, |g| Some(g * 2.0))?;
    let (w1, w2) = net.backward(&net.loss(&h));
    assert!(same(&w1, &(&w1_plain * 2.0)), "upstream weight gradient doubles exactly: {w1:?} vs {w1_plain:?}");
    assert!(same(&w2, &w2_plain), "the downstream weight's gradient does not go through `hidden`");
    // A hook on a leaf replaces what accumulates into its .grad().
    let leaf_hook = register_hook(&net.w2, |g| Some(g * 2.0))?;
    let h = net.hidden();
    let (w1_again, w2) = net.backward(&net.loss(&h));
    assert!(same(&w1_again, &w1_plain), "a new graph: the hook on the old `hidden` is not in it");
    assert!(same(&w2, &(&w2_plain * 2.0)));
    assert!(hook.take_errors().is_empty() && leaf_hook.take_errors().is_empty());
    leaf_hook.remove();
    Ok(())
}

#[test]
fn returning_none_changes_nothing() -> nnsight::Result<()> {
    let net = Net::new();
    let (w1_plain, w2_plain) = net.plain();
    let calls = Arc::new(AtomicUsize::new(0));
    let h = net.hidden();
    let c = Arc::clone(&calls);
    let _hook = register_hook(&h, move |_| {
        c.fetch_add(1, Ordering::SeqCst);
        None
    })?;
    let (w1, w2) = net.backward(&net.loss(&h));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(same(&w1, &w1_plain) && same(&w2, &w2_plain));
    Ok(())
}

#[test]
fn hooks_compose_in_registration_order() -> nnsight::Result<()> {
    let net = Net::new();
    let order = Arc::new(Mutex::new(Vec::new()));
    let h = net.hidden();
    let (o1, o2, o3) = (Arc::clone(&order), Arc::clone(&order), Arc::clone(&order));
    let first = register_hook(&h, move |g| {
        o1.lock().unwrap().push("plus one");
        Some(g + 1.0)
    })?;
    let second = register_hook(&h, move |g| {
        o2.lock().unwrap().push("times three");
        Some(g * 3.0)
    })?;
    // The third sees what the first two made of the gradient.
    let seen = Arc::new(Mutex::new(None));
    let s = Arc::clone(&seen);
    let third = register_hook(&h, move |g| {
        o3.lock().unwrap().push("read");
        *s.lock().unwrap() = Some(g.copy());
        None
    })?;
    let (w1_composed, _) = net.backward(&net.loss(&h));
    assert_eq!(*order.lock().unwrap(), ["plus one", "times three", "read"]);
    let leaf = net.hidden().detach().set_requires_grad(true);
    net.loss(&leaf).backward();
    let expected = (leaf.grad() + 1.0) * 3.0;
    assert!(same(seen.lock().unwrap().as_ref().unwrap(), &expected));
    // Upstream, the composition is that of one hook doing (g + 1) * 3, not g * 3 + 1.
    let single = |f: fn(&Tensor) -> Tensor| -> nnsight::Result<Tensor> {
        let h = net.hidden();
        let hook = register_hook(&h, move |g| Some(f(g)))?;
        let (w1, _) = net.backward(&net.loss(&h));
        hook.remove();
        Ok(w1)
    };
    assert!(same(&w1_composed, &single(|g| (g + 1.0) * 3.0)?));
    assert!(!same(&w1_composed, &single(|g| g * 3.0 + 1.0)?));
    for hook in [first, second, third] {
        hook.remove();
    }
    Ok(())
}

#[test]
fn a_removed_hook_no_longer_runs_and_its_closure_is_dropped() -> nnsight::Result<()> {
    let net = Net::new();
    let (w1_plain, _) = net.plain();
    let (calls, drops) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let h = net.hidden();
    let loss = net.loss(&h);
    let (c, d) = (Arc::clone(&calls), common::DropCount(Arc::clone(&drops)));
    let hook = register_hook(&h, move |g| {
        let _keep = &d;
        c.fetch_add(1, Ordering::SeqCst);
        Some(g * 2.0)
    })?;
    let kept = register_hook(&h, |_| None)?;
    assert_eq!(drops.load(Ordering::SeqCst), 0);
    hook.remove();
    assert_eq!(drops.load(Ordering::SeqCst), 1, "removal drops the closure at once, while the tensor lives");
    let (w1, _) = net.backward(&loss);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert!(same(&w1, &w1_plain), "the removed doubling no longer applies");
    drop((h, loss, kept));
    assert_eq!(drops.load(Ordering::SeqCst), 1, "dropped exactly once");
    Ok(())
}

#[test]
fn the_closure_is_dropped_with_the_tensor_and_its_graph() -> nnsight::Result<()> {
    let net = Net::new();
    let drops = Arc::new(AtomicUsize::new(0));
    // An activation: the hook lives in the tensor and in its grad_fn; it goes when both do.
    let h = net.hidden();
    let loss = net.loss(&h);
    let d = common::DropCount(Arc::clone(&drops));
    let hook = register_hook(&h, move |_| {
        let _keep = &d;
        None
    })?;
    drop(h);
    assert_eq!(drops.load(Ordering::SeqCst), 0, "the graph still reaches the hook");
    drop(loss);
    assert_eq!(drops.load(Ordering::SeqCst), 1, "tensor and graph freed: the closure is dropped");
    // The handle outlived them; removing now does nothing, and the closure is not dropped twice.
    assert!(hook.take_errors().is_empty());
    hook.remove();
    assert_eq!(drops.load(Ordering::SeqCst), 1);

    // A leaf, after a backward ran through the hook.
    let w = Tensor::randn([3], F).set_requires_grad(true);
    let d = common::DropCount(Arc::clone(&drops));
    let hook = register_hook(&w, move |g| {
        let _keep = &d;
        Some(g * 2.0)
    })?;
    (&w * 3.0).sum(Kind::Float).backward();
    assert!(same(&w.grad(), &Tensor::full([3], 6.0, F)));
    drop(w);
    assert_eq!(drops.load(Ordering::SeqCst), 2);
    drop(hook); // dropping a handle never touches the hook
    assert_eq!(drops.load(Ordering::SeqCst), 2);
    Ok(())
}

#[test]
fn dropping_the_handle_keeps_the_hook() -> nnsight::Result<()> {
    let net = Net::new();
    let (w1_plain, _) = net.plain();
    let h = net.hidden();
    drop(register_hook(&h, |g| Some(g * 2.0))?);
    let (w1, _) = net.backward(&net.loss(&h));
    assert!(same(&w1, &(&w1_plain * 2.0)));
    Ok(())
}

#[test]
fn a_panicking_hook_leaves_the_gradient_and_reports_the_panic() -> nnsight::Result<()> {
    let net = Net::new();
    let (w1_plain, w2_plain) = net.plain();
    let h = net.hidden();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let hook = register_hook(&h, move |g| {
        if c.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("hook exploded on purpose");
        }
        Some(g * 2.0)
    })?;
    let after = register_hook(&h, |g| Some(g * 1.0))?;
    let loss = net.loss(&h);
    // torch.autograd.grad with respect to the weights, keeping the graph for a second backward.
    let grads = Tensor::f_run_backward(&[&loss], &[&net.w1, &net.w2], true, false).expect("the backward completes");
    let (w1, w2) = (&grads[0], &grads[1]);
    assert!(same(w1, &w1_plain) && same(w2, &w2_plain), "the panicking hook changed nothing");
    let errors = hook.take_errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    let message = errors[0].to_string();
    assert!(matches!(errors[0], Error::Intervention { .. }), "{message}");
    assert!(message.contains("panicked: hook exploded on purpose"), "{message}");
    assert!(message.contains("left unchanged"), "{message}");
    assert!(hook.take_errors().is_empty(), "taken");
    assert!(after.take_errors().is_empty(), "the next hook ran normally");
    // The hook is still usable: the second backward doubles.
    let (w1, _) = net.backward(&loss);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(same(&w1, &(&w1_plain * 2.0)));
    Ok(())
}

#[test]
fn a_replacement_of_the_wrong_shape_or_dtype_is_refused() -> nnsight::Result<()> {
    let net = Net::new();
    let (w1_plain, _) = net.plain();
    let h = net.hidden();
    let shape = register_hook(&h, |g| Some(g.sum_dim_intlist([0i64].as_slice(), false, Kind::Float)))?;
    let dtype = register_hook(&h, |g| Some(g.to_kind(Kind::Double)))?;
    let (w1, _) = net.backward(&net.loss(&h));
    assert!(same(&w1, &w1_plain));
    let shape_errors = shape.take_errors();
    assert_eq!(shape_errors.len(), 1);
    assert!(
        shape_errors[0].to_string().contains("shape [4] on Cpu for a Float gradient of shape [5, 4]"),
        "{}",
        shape_errors[0]
    );
    let dtype_errors = dtype.take_errors();
    assert!(dtype_errors[0].to_string().contains("returned a Double tensor"), "{}", dtype_errors[0]);
    Ok(())
}

#[test]
fn a_tensor_without_grad_cannot_be_hooked() {
    common::init();
    let t = Tensor::ones([2, 2], F);
    let err = register_hook(&t, |_| None).unwrap_err();
    assert!(matches!(err, Error::Intervention { .. }));
    assert!(err.to_string().contains("does not require grad"), "{err}");
    let computed = tch::no_grad(|| Tensor::ones([2], F).set_requires_grad(true) * 2.0);
    assert!(register_hook(&computed, |_| None).unwrap_err().to_string().contains("does not require grad"));
}

#[test]
fn a_hook_runs_on_the_thread_of_the_backward() -> nnsight::Result<()> {
    let net = Net::new();
    let (w1_plain, _) = net.plain();
    let h = net.hidden();
    let hook = register_hook(&h, |g| Some(g * 2.0))?;
    let loss = net.loss(&h);
    std::thread::spawn(move || loss.backward()).join().expect("backward on another thread");
    assert!(same(&net.w1.grad(), &(&w1_plain * 2.0)));
    hook.remove();
    Ok(())
}

#[test]
fn a_hook_that_removes_itself_fails_without_deadlock() -> nnsight::Result<()> {
    thread_local! {
        static HANDLE: std::cell::RefCell<Option<nnsight::autograd::HookHandle>> = const { std::cell::RefCell::new(None) };
    }
    let net = Net::new();
    let (w1_plain, _) = net.plain();
    let h = net.hidden();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let hook = register_hook(&h, move |g| {
        c.fetch_add(1, Ordering::SeqCst);
        if let Some(me) = HANDLE.with(|s| s.borrow_mut().take()) {
            me.remove(); // panics: a hook cannot remove itself while it runs
        }
        Some(g * 2.0)
    })?;
    HANDLE.with(|s| *s.borrow_mut() = Some(hook));
    let loss = net.loss(&h);
    let grads = Tensor::f_run_backward(&[&loss], &[&net.w1], true, false).expect("the backward completes");
    assert!(same(&grads[0], &w1_plain), "the failed call left the gradient unchanged");
    // The hook is still registered: the next backward doubles.
    let (w1, _) = net.backward(&loss);
    assert!(same(&w1, &(&w1_plain * 2.0)));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    Ok(())
}
