use nnsight::prelude::*;

fn run(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace("Hello") {
        let h = model.model.layers[3].output;
        // The then branch gives a proxy, the else branch a number.
        let scaled = if cond!(h.norm() > 10.0) { h * 0.5 } else { 1.0 };
        model.model.layers[3].output = scaled;
    });
    Ok(())
}

fn main() {}
