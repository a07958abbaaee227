use nnsight::nn::Linear;
use nnsight::prelude::*;

#[derive(Traceable)]
#[traceable(points(hidden, proj))]
struct Model {
    #[traceable(path)]
    path: String,
    proj: Linear,
}

fn main() {}
