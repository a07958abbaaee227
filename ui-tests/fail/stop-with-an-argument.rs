use nnsight::prelude::*;

fn run(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace("Hello") {
        let h = model.model.layers[3].output.save();
        model.stop(3);
    });
    println!("{h:?}");
    Ok(())
}

fn main() {}
