//! Resident-memory tests, in a test binary of their own: nothing else runs in this process while they measure
//! (`cargo test` runs test binaries one after another, and these two tests take turns through `ALONE`).

#[path = "common.rs"]
#[allow(dead_code)]
mod common;

use nnsight::autograd::register_hook;
use nnsight::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The two tests measure one at a time.
static ALONE: Mutex<()> = Mutex::new(());

fn resident_kb() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).expect("resident pages") * 4
}

#[test]
fn ten_thousand_traces_keep_resident_memory_flat() -> nnsight::Result<()> {
    let _alone = ALONE.lock().unwrap_or_else(|p| p.into_inner());
    let model = common::tiny_gpt2();
    let run = || -> nnsight::Result<()> {
        intervene!(model.trace("Hello world") {
            let h = model.transformer.h[0].output.save();
            model.transformer.h[1].mlp.output = model.transformer.h[1].mlp.output * 0.5;
            let logits = model.output.save();
        });
        drop((h, logits));
        Ok(())
    };
    for _ in 0..1000 {
        run()?;
    }
    let warm = resident_kb();
    for _ in 0..10_000 {
        run()?;
    }
    let after = resident_kb();
    eprintln!("resident memory after warm-up {warm} kB, after 10 000 more traces {after} kB");
    assert!((after as f64) <= warm as f64 * 1.05, "resident memory grew from {warm} kB to {after} kB");
    Ok(())
}

#[test]
fn ten_thousand_register_remove_cycles_keep_resident_memory_flat() -> nnsight::Result<()> {
    let _alone = ALONE.lock().unwrap_or_else(|p| p.into_inner());
    common::init();
    let f = (Kind::Float, Device::Cpu);
    let (x, w) = (Tensor::randn([5, 3], f), Tensor::randn([3, 4], f).set_requires_grad(true));
    let hidden = || x.matmul(&w).tanh();
    let drops = Arc::new(AtomicUsize::new(0));
    let one = hidden();
    // Each closure holds 16 kB: 10 000 leaked ones would be 160 MB.
    let cycle = |i: usize| -> nnsight::Result<()> {
        let fresh;
        let t = if i % 2 == 0 {
            &one
        } else {
            fresh = hidden();
            &fresh
        };
        let (buf, d) = (vec![1u8; 16 << 10], common::DropCount(Arc::clone(&drops)));
        let hook = register_hook(t, move |_| {
            let _keep = (&buf, &d);
            None
        })?;
        hook.remove();
        Ok(())
    };
    for i in 0..1000 {
        cycle(i)?;
    }
    let warm = resident_kb();
    for i in 0..10_000 {
        cycle(i)?;
    }
    let after = resident_kb();
    assert_eq!(drops.load(Ordering::SeqCst), 11_000, "every closure dropped once");
    eprintln!("resident memory after warm-up {warm} kB, after 10 000 more register/remove cycles {after} kB");
    let slack = (warm / 20).max(16 << 10);
    assert!(after <= warm + slack, "resident memory grew from {warm} kB to {after} kB");
    Ok(())
}
