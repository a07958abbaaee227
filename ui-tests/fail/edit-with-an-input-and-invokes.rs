use nnsight::prelude::*;

fn run(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    let _edited = intervene!(model.edit("Hello") {
        invoke("World") {
            model.model.layers[3].output = model.model.layers[3].output * 0.0;
        }
    });
    Ok(())
}

fn main() {}
