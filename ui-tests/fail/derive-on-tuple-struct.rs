use nnsight::nn::Linear;
use nnsight::prelude::*;

#[derive(Traceable)]
struct Model(Linear, Linear);

fn main() {}
