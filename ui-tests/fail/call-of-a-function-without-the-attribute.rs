use nnsight::prelude::*;

/// An ordinary function: not registered, so the graph cannot call it.
fn halve(x: &Tensor) -> Tensor {
    x * 0.5
}

fn run(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace("Hello") {
        let h = model.model.layers[3].output;
        model.model.layers[3].output = call!(halve(h));
    });
    Ok(())
}

fn main() {}
