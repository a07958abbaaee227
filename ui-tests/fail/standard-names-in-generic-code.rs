use nnsight::prelude::*;

// Generic code knows the standard names only: an architecture's own (`model.model`) and a typo (`atn`) are
// compile errors under the name.
fn lens<M: CausalLm>(model: &LanguageModel<M>) -> nnsight::Result<()> {
    intervene!(model.trace("Hello") {
        let h = model.model.layers[0].output.save();
        let p = model.layers[0].atn.probs.output.save();
        let ok = model.unembed(model.final_norm(model.layers[0].output)).save();
    });
    println!("{h:?} {p:?} {ok:?}");
    Ok(())
}

fn main() {}
