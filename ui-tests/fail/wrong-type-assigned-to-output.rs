use nnsight::prelude::*;

fn run(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace("Hello") {
        model.model.layers[0].output = "zero";
    });
    Ok(())
}

fn main() {}
