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

fn main() {
    let _ = (single, invokes, issue4);
}
