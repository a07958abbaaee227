use nnsight::nn::{Ctx, Forward, Linear};
use nnsight::prelude::*;

#[derive(Traceable)]
struct Net {
    #[traceable(path)]
    path: String,
    layer: Linear,
}

impl Forward for Net {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> nnsight::Result<Tensor> {
        cx.call(&self.layer, x)
    }
}

fn run(net: &NNsight<Net>, x: Tensor) -> nnsight::Result<()> {
    intervene!(net.scan(x) {
        let h = net.layer.output.save();
    });
    println!("{:?}", h.size());
    Ok(())
}

fn main() {}
