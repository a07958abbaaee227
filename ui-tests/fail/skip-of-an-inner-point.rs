use nnsight::prelude::*;

fn run(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace("Hello") {
        model.model.layers[0].self_attn.probs.skip(model.model.layers[0].self_attn.probs.output);
    });
    Ok(())
}

fn main() {}
