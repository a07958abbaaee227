use nnsight::prelude::*;

fn run(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace() {
        invoke("Hello", "World") {
            let h = model.output.save();
        }
    });
    Ok(())
}

fn main() {}
