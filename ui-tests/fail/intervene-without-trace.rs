use nnsight::prelude::*;

fn run(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.run("Hello") {
        let h = model.output.save();
    });
    Ok(())
}

fn main() {}
