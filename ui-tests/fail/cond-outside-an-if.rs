use nnsight::prelude::*;

fn run(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace("Hello") {
        let h = model.model.layers[3].output;
        let big = cond!(h.norm() > 10.0);
    });
    Ok(())
}

fn main() {}
