use nnsight::nn::{Ctx, Forward, Linear};
use nnsight::prelude::*;
use nnsight::remote::Remote;

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

fn run(net: &NNsight<Net>, x: Tensor, server: &Remote) -> nnsight::Result<()> {
    intervene!(net.trace(x).remote(server) {
        let h = net.layer.output.save();
    });
    println!("{:?}", h.size());
    Ok(())
}

fn main() {}
