use nnsight::prelude::*;

fn run(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace() {
        invoke("a") {
            for prompt in ["b", "c"] {
                invoke(prompt) {
                    let h = model.model.layers[3].output.save();
                }
            }
        }
    });
    Ok(())
}

fn main() {}
