use nnsight::prelude::*;

fn run(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace("Hello") {
        model.model.layers[3].skip(0.5);
    });
    Ok(())
}

fn main() {}
