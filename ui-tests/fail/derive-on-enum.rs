use nnsight::prelude::*;

#[derive(Traceable)]
enum Model {
    A,
    B,
}

fn main() {}
