use nnsight::prelude::*;

fn run(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    let opts = nnsight::GenerateOptions::new().max_new_tokens(3);
    intervene!(model.generate("Hello", &opts) {
        for _ in iter([0.5, 1.5]) {
            model.model.layers[0].output *= 2.0;
        }
    });
    Ok(())
}

fn main() {}
