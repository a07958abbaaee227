use nnsight::prelude::*;

fn run(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace("Hello") {
        model.model.layers[1] = model.model.layers[0].output;
    });
    Ok(())
}

fn main() {}
