//! Every form of `intervene!` compiles (never run: there is no model file here).
use nnsight::prelude::*;

fn single(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    let layer = 3;
    intervene!(model.trace("The Eiffel Tower is in the city of") {
        let h = model.model.layers[layer].output.save();
        model.model.layers[10].mlp.output = model.model.layers[10].mlp.output * 0.0;
        model.model.layers[11].output[(.., -1, ..)] = model.model.layers[11].output[(.., -1, ..)] * 2.0;
        model.model.layers[12].output += model.model.layers[12].output * 0.5;
        let mut per_layer = Vec::new();
        for i in 13..30 {
            per_layer.push(model.model.layers[i].output.mean().save());
        }
        let lens = model.lm_head(model.model.norm(model.model.layers[-1].output)).softmax(-1).save();
        let logits = model.output.save();
        let n = 3 + 4;
    });
    let _: (Tensor, Vec<Tensor>, Tensor, Tensor, i32) = (h, per_layer, lens, logits, n);
    Ok(())
}

fn invokes(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace() {
        invoke("The Colosseum is in the city of") {
            let emb = model.model.embed_tokens.output;
        }
        invoke(vec![504_i64, 414, 46682]) {
            let _ids = model.input.save();
        }
        invoke() {
            let all = model.output.save();
        }
    });
    let _: Tensor = all;
    Ok(())
}

fn issue4(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    intervene!(model.trace("The Eiffel Tower is in the city of") {
        let cache = model.cache_with(CacheOptions::default().modules(["model.model.layers.0"]).inputs(true));
        model.model.layers[1].skip(model.model.layers[1].input);
        log!(model.model.layers[2].output.norm());
        let attn = &model.model.layers[3].self_attn;
        attn.probs.output[(.., 0)] = attn.probs.output[(.., 0)] * 0.0;
        let pattern = attn.probs.output.save();
        let h = model.model.layers[3].output.save();
        model.stop();
    });
    let _: (Cache, Tensor, Tensor) = (cache, pattern, h);
    Ok(())
}

/// Scales each position's vector to at most `max` in L2 norm.
#[nnsight::function]
fn clamp_norm(x: &Tensor, max: f64) -> Tensor {
    x / (x.norm_scalaropt_dim(2.0, [-1], true) / max).clamp_min(1.0)
}

fn conditions_and_functions(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    let limit = 10.0;
    intervene!(model.scan("The Eiffel Tower is in the city of") {
        let h = model.model.layers[2].output;
        if cond!(h.norm() > limit && !(h.max() < 0.0)) {
            model.model.layers[2].output = call!(clamp_norm(h, limit));
        } else if cond!(h.norm() == 0.0) {
            model.model.layers[2].output = h + 1.0;
        }
        let scale = if cond!(h.mean() >= 0.0) { 2.0 } else { 0.5 };
        let pair = if cond!(h.min() != 0.0) { (h * 2.0, h) } else { (h, h * 2.0) };
        let out = (model.model.layers[3].output * scale).save();
        let _ = pair;
    });
    let _: Tensor = out;
    Ok(())
}

fn generation(model: &LanguageModel<Llama>) -> nnsight::Result<()> {
    let opts = nnsight::GenerateOptions::new().max_new_tokens(5);
    intervene!(model.generate("The Eiffel Tower is in the city of", &opts) {
        let ids = model.generated().save();
        let mut hidden = Vec::new();
        for step in iter(0..3) {
            hidden.push(model.model.layers[5].output[(.., -1, ..)].save());
            let _ = step;
        }
        for _ in all() {
            model.model.layers[10].mlp.output *= 0.5;
        }
    });
    let _: (nnsight::envoy::Generated, Vec<Tensor>) = (ids, hidden);
    intervene!(model.generate(opts.clone()) {
        invoke("Madrid is the capital of") {
            for _ in iter([1, 3]) {
                model.model.layers[0].output *= 2.0;
            }
        }
        invoke("Rome is") {
            let all = model.generated().save();
        }
    });
    let _: nnsight::envoy::Generated = all;
    Ok(())
}

/// Issue 6 and 7 forms: edits, compound gradient writes, sessions, `send!`, remote blocks.
fn edits_training_remote(model: &LanguageModel<Llama>, server: &nnsight::remote::Remote) -> nnsight::Result<()> {
    let edited = intervene!(model.edit() {
        model.model.layers[3].mlp.output = model.model.layers[3].mlp.output * 0.0;
    });
    let twice = intervene!(edited.edit() {
        edited.model.layers[4].output *= 2.0;
    });
    intervene!(model.edit_in_place() {
        model.model.layers[5].output *= 0.5;
    });
    intervene!(twice.trace("Hello") {
        let h = twice.model.layers[5].output;
        twice.lm_head.output[(.., -1, 7)].sum().backward();
        h.grad *= 2.0;
        let g = h.grad.save();
        send!(twice.model.layers[6].output.norm());
    });
    let _: Tensor = g;
    intervene!(model.trace("Hello").remote(server) {
        let out = model.lm_head.output.save();
    });
    let opts = nnsight::GenerateOptions::new().max_new_tokens(2);
    intervene!(model.generate("Hello", &opts).remote(server) {
        let ids = model.generated().save();
    });
    intervene!(model.session().remote(server) {
        trace("Hello") { let h = model.model.layers[1].output; }
        trace("Hello") { model.model.layers[1].output = &h * 2.0; }
    });
    model.clear_edits();
    let _ = (out, ids);
    Ok(())
}

fn main() {
    let _ = (single, invokes, issue4, conditions_and_functions, generation, edits_training_remote);
}
