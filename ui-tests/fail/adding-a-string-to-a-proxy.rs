use nnsight::prelude::*;

fn run(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace("Hello") {
        let h = (model.model.layers[0].output + "one").save();
    });
    println!("{h:?}");
    Ok(())
}

fn main() {}
