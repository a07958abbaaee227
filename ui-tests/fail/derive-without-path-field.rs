use nnsight::nn::Linear;
use nnsight::prelude::*;

#[derive(Traceable)]
struct Model {
    proj: Linear,
}

fn main() {}
