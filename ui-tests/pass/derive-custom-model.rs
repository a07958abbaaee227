use nnsight::nn::{Ctx, Forward, Linear, ModuleList};
use nnsight::prelude::*;

#[derive(Traceable)]
#[traceable(kind = "MyBlock")]
struct Block {
    #[traceable(path)]
    path: String,
    proj: Linear,
    gate: Option<Linear>,
    #[traceable(param)]
    scale: Tensor,
    #[traceable(skip)]
    width: i64,
}

impl Forward for Block {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> nnsight::Result<Tensor> {
        let _ = self.width;
        Ok(cx.call(&self.proj, x)? * &self.scale)
    }
}

#[derive(Traceable)]
struct Net {
    #[traceable(path)]
    path: String,
    blocks: ModuleList<Block>,
    extra: Vec<Block>,
}

impl Forward for Net {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> nnsight::Result<Tensor> {
        let mut h = x.shallow_clone();
        for b in self.blocks.iter().chain(self.extra.iter()) {
            h = cx.call(b, &h)?;
        }
        Ok(h)
    }
}

fn main() {
    // The envoy types exist and have the submodules and hook points.
    fn _paths(e: &NetEnvoy) {
        let _ = (&e.blocks, &e.extra, &e.output, &e.input, &e.inputs);
    }
    fn _block(e: &BlockEnvoy) {
        let _ = (&e.proj.output, &e.gate);
    }
}
