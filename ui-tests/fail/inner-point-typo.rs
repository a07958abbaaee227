use nnsight::prelude::*;

fn run(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace("Hello") {
        let pattern = model.model.layers[0].self_attn.prob.output.save();
    });
    println!("{pattern:?}");
    Ok(())
}

fn main() {}
