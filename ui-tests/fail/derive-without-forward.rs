use nnsight::nn::Linear;
use nnsight::prelude::*;

#[derive(Traceable)]
struct Model {
    #[traceable(path)]
    path: String,
    proj: Linear,
}

fn main() {}
