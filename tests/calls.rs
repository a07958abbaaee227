//! Modules called several times in one run: call `n` of a module is addressed with `for step in iter(..)` (in a
//! generation, call `n` is step `n`). A toy recurrent net applies one cell three times.

use crate::common::{self, max_abs_diff};
use nnsight::nn::{Ctx, Forward, Linear};
use nnsight::prelude::*;
use nnsight::Error;

/// `x -> cell(cell(cell(x)))`: the cell's calls 0, 1, 2.
#[derive(Traceable)]
pub struct Recurrent {
    #[traceable(path)]
    path: String,
    cell: Linear,
}

impl Forward for Recurrent {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> nnsight::Result<Tensor> {
        let mut h = x.shallow_clone();
        for _ in 0..3 {
            h = cx.call(&self.cell, &h)?.tanh();
        }
        Ok(h)
    }
}

fn net() -> NNsight<Recurrent> {
    common::init();
    tch::manual_seed(1);
    let w = Tensor::randn([4, 4], (Kind::Float, Device::Cpu)) * 0.5;
    NNsight::new(Recurrent { path: String::new(), cell: Linear::from_tensors("", w, None) })
}

/// The cell's raw outputs of a plain run, by call.
fn by_hand(net: &NNsight<Recurrent>, x: &Tensor, zero_at: Option<usize>) -> Vec<Tensor> {
    let w = &net.module().cell.weight;
    let mut h = x.shallow_clone();
    let mut outs = Vec::new();
    for i in 0..3 {
        let mut y = h.matmul(&w.tr());
        if zero_at == Some(i) {
            y = y.zeros_like();
        }
        outs.push(y.shallow_clone());
        h = y.tanh();
    }
    outs
}

#[test]
fn each_call_of_a_module_is_its_own_step() -> nnsight::Result<()> {
    let net = net();
    let x = Tensor::randn([2, 4], (Kind::Float, Device::Cpu));
    intervene!(net.trace(x.shallow_clone()) {
        let mut outs = Vec::new();
        for _step in iter(0..3) {
            outs.push(net.cell.output.save());
        }
    });
    let want = by_hand(&net, &x, None);
    assert_eq!(outs.len(), 3);
    for (got, want) in outs.iter().zip(&want) {
        assert!(max_abs_diff(got, want) < 1e-6);
    }
    // Reads without a loop address call 0.
    intervene!(net.trace(x.shallow_clone()) {
        let first = net.cell.output.save();
    });
    assert!(max_abs_diff(&first, &want[0]) < 1e-6);
    Ok(())
}

#[test]
fn a_write_at_one_step_changes_that_call_only() -> nnsight::Result<()> {
    let net = net();
    let x = Tensor::randn([2, 4], (Kind::Float, Device::Cpu));
    intervene!(net.trace(x.shallow_clone()) {
        for _ in iter([1]) {
            net.cell.output = net.cell.output * 0.0;
        }
        let mut outs = Vec::new();
        for _ in iter(1..=2) {
            outs.push(net.cell.output.save());
        }
        let out = net.output.save();
    });
    let want = by_hand(&net, &x, Some(1));
    assert!(max_abs_diff(&outs[0], &want[1]) < 1e-6);
    assert!(max_abs_diff(&outs[1], &want[2]) < 1e-6);
    assert!(max_abs_diff(&out, &want[2].tanh()) < 1e-6);
    Ok(())
}

#[test]
fn steps_out_of_order_and_out_of_reach() -> nnsight::Result<()> {
    let net = net();
    let x = Tensor::randn([2, 4], (Kind::Float, Device::Cpu));
    // Step 2 then step 0 of the same module: out of order, found while building.
    let run = || -> nnsight::Result<()> {
        intervene!(net.trace(x.shallow_clone()) {
            for _ in iter([2, 0]) {
                let _h = net.cell.output.save();
            }
        });
        Ok(())
    };
    let err = run().unwrap_err();
    assert!(matches!(err, Error::OutOfOrder { .. }), "{err}");
    assert!(err.to_string().contains("step 2"), "{err}");
    // Steps past the last call: a warning, and what was saved before is kept.
    intervene!(net.trace(x.shallow_clone()) {
        let mut outs = Vec::new();
        for _ in iter(0..5) {
            outs.push(net.cell.output.save());
        }
    });
    assert_eq!(outs.len(), 3);
    // `all()` needs a generation.
    let run = || -> nnsight::Result<()> {
        intervene!(net.trace(x.shallow_clone()) {
            for _ in all() {
                let _h = net.cell.output.save();
            }
        });
        Ok(())
    };
    let err = run().unwrap_err().to_string();
    assert!(err.contains("all()") && err.contains("generate"), "{err}");
    Ok(())
}
