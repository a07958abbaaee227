use nnsight::nn::{Ctx, Forward, Linear};
use nnsight::prelude::*;

#[derive(Traceable)]
struct Model {
    #[traceable(path)]
    path: String,
    proj: Linear,
    hidden_size: i64,
}

impl Forward for Model {
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> nnsight::Result<Tensor> {
        cx.call(&self.proj, x)
    }
}

fn main() {}
