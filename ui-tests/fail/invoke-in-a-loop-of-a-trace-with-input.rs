use nnsight::prelude::*;

fn run(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace("Hello") {
        for prompt in ["a", "b"] {
            invoke(prompt) {
                let h = model.model.layers[3].output.save();
            }
        }
    });
    Ok(())
}

fn main() {}
