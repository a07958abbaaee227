use nnsight::nn::Linear;
use nnsight::prelude::*;

#[derive(Traceable)]
#[traceable(kinds = "Typo")]
struct Model {
    #[traceable(path)]
    path: String,
    #[traceable(param)]
    scale: f64,
    output: Linear,
    #[traceable(skipp)]
    config: String,
}

fn main() {}
