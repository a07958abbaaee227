use nnsight::prelude::*;

fn run(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace("Hello") {
        let h = model.model.layers[0].ouput.save();
    });
    println!("{h:?}");
    Ok(())
}

fn main() {}
