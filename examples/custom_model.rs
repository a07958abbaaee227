//! A model of your own, traced like the built-in ones: derive `Traceable` on a struct of `nnsight::nn` layers,
//! implement `Forward` (calling submodules through `cx.call`), wrap it in `NNsight`, and intervene.
//!
//! `cargo run --release --example custom_model`

use nnsight::nn::{Activation, ActivationFn, Ctx, Forward, Linear};
use nnsight::prelude::*;

/// One residual MLP block. Inner point `delta`: what the block adds to the residual stream, `[batch, 8]`.
#[derive(Traceable)]
#[traceable(points(delta))]
struct Block {
    #[traceable(path)]
    path: String,
    up: Linear,
    act: Activation,
    down: Linear,
}

impl Forward for Block {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> nnsight::Result<Tensor> {
        let h = cx.call(&self.up, x)?;
        let h = cx.call(&self.act, &h)?;
        let delta = cx.call(&self.down, &h)?;
        // An inner point: `intervene!` reads and writes it as `net.blocks[i].delta.output`.
        let delta = cx.point(&self.path, "delta", delta)?;
        Ok(x + delta)
    }
}

/// A stack of blocks and a readout.
#[derive(Traceable)]
struct Net {
    #[traceable(path)]
    path: String,
    blocks: Vec<Block>,
    readout: Linear,
}

impl Forward for Net {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> nnsight::Result<Tensor> {
        let mut h = x.shallow_clone();
        for b in &self.blocks {
            h = cx.call(b, &h)?;
        }
        cx.call(&self.readout, &h)
    }
}

fn linear(i: i64, o: i64) -> Linear {
    let opts = (Kind::Float, Device::Cpu);
    Linear::from_tensors("", Tensor::randn([o, i], opts) / (i as f64).sqrt(), Some(Tensor::zeros([o], opts)))
}

fn main() -> nnsight::Result<()> {
    tch::manual_seed(0);
    let blocks = (0..3)
        .map(|_| Block {
            path: String::new(),
            up: linear(8, 32),
            act: Activation::new("", ActivationFn::Silu),
            down: linear(32, 8),
        })
        .collect();
    // NNsight::new gives every module its dotted path: blocks.0.up, blocks.1.down, readout, ...
    let net = NNsight::new(Net { path: String::new(), blocks, readout: linear(8, 2) });
    println!("{}", net.tree());

    let x = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
    intervene!(net.trace(x.shallow_clone()) {
        let before = net.blocks[1].input.save();
        net.blocks[1].down.output = net.blocks[1].down.output * 0.0; // block 1 adds nothing
        let after = net.blocks[1].output.save();
        let delta2 = net.blocks[2].delta.output.save();
        let out = net.output.save();
    });
    let skipped = (&after - &before).abs().max().double_value(&[]);
    let plain_input = net.blocks_input_of(1, &x)?;
    println!("block 1 input {:?}, equal to a plain pass's: {}", before.size(), before.equal(&plain_input));
    println!("with block 1's MLP zeroed, block 1 passes its input through (max diff {skipped:.1e})");
    println!("block 2 adds a {:?} delta of norm {:.3}", delta2.size(), delta2.norm().double_value(&[]));
    println!("readout: {out}");
    Ok(())
}

trait BlockInput {
    fn blocks_input_of(&self, i: usize, x: &Tensor) -> nnsight::Result<Tensor>;
}

impl BlockInput for NNsight<Net> {
    /// The input block `i` receives in a plain forward.
    fn blocks_input_of(&self, i: usize, x: &Tensor) -> nnsight::Result<Tensor> {
        let mut cx = Ctx::new();
        let mut h = x.shallow_clone();
        for b in &self.module().blocks[..i] {
            h = cx.call(b, &h)?;
        }
        Ok(h)
    }
}
