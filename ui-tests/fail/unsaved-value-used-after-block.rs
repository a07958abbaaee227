use nnsight::prelude::*;

fn run(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace("Hello") {
        let h = model.model.layers[0].output;
    });
    println!("{:?}", h.size());
    Ok(())
}

fn main() {}
