use tch::Tensor;

/// A slice of floats cannot travel in a graph: only tensors, numbers and bools can.
#[nnsight::function]
fn scale_rows(x: &Tensor, factors: &[f32]) -> Tensor {
    x * Tensor::from_slice(factors)
}

fn main() {}
