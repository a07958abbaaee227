//! Training inside a session: a rank-4 LoRA on one SmolLM2 MLP, trained for a few dozen Adam steps to make the
//! model answer " Rome" instead of " Paris" after "The Eiffel Tower is in the city of".
//!
//! The LoRA is two tensors that require grad, `A` `[576, 4]` (small random) and `B` `[4, 576]` (zeros, so training
//! starts from the model itself). Each step is one trace inside `intervene!(model.session() { .. })`: layer 12's MLP
//! output becomes `mlp(x) + (x A) B · α/r`, the loss is the negative log-probability of " Rome" at the last
//! position, and `loss.backward()` accumulates into `A.grad` and `B.grad` (the tensors are used live, not copied);
//! the Adam step and `zero_grad` between traces are ordinary Rust. The weights of the model never change. At the
//! end the trained LoRA becomes a persistent edit (`intervene!(model.edit() { .. })`) and the edited model
//! generates a continuation next to the original's. The example fails if the loss does not fall below a tenth of
//! where it started or if the answer does not become " Rome".
//!
//! ```text
//! cargo run --release --example lora
//! ```

use nnsight::prelude::*;
use std::time::Instant;

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const PROMPT: &str = "The Eiffel Tower is in the city of";
const LAYER: usize = 12;
const RANK: i64 = 4;
const ALPHA: f64 = 8.0;
const STEPS: usize = 30;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let start = Instant::now();
    tch::manual_seed(0);
    let model = LanguageModel::<Llama>::load(MODEL)?;
    let rome = match model.encode(" Rome")?.as_slice() {
        [id] => *id,
        other => return Err(format!("\" Rome\" should be one token, found {other:?}").into()),
    };
    let hidden = model.model().model.embed_tokens.weight.size()[1];
    let scale = ALPHA / RANK as f64;

    // The LoRA: A small and random, B zero (the product starts at zero).
    let a = (Tensor::randn([hidden, RANK], (Kind::Float, Device::Cpu)) * 0.02).set_requires_grad(true);
    let b = Tensor::zeros([RANK, hidden], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let torch = |e| nnsight::Error::torch("adam", e);
    let mut adam = tch::COptimizer::adam(1e-2, 0.9, 0.999, 0.0, 1e-8, false).map_err(torch)?;
    adam.add_parameters(&a, 0).map_err(torch)?;
    adam.add_parameters(&b, 0).map_err(torch)?;

    println!("rank-{RANK} LoRA on model.layers.{LAYER}.mlp, Adam lr 1e-2, {STEPS} steps; target \" Rome\"");
    let mut losses = Vec::new();
    intervene!(model.session() {
        for step in 0..STEPS {
            trace(PROMPT) {
                let x = model.model.layers[LAYER].mlp.input;
                model.model.layers[LAYER].mlp.output =
                    model.model.layers[LAYER].mlp.output + x.matmul(&a).matmul(&b) * scale;
                let logp = model.lm_head.output[(.., -1, ..)].log_softmax(-1);
                let loss = -logp.i((.., rome)).sum();
                loss.backward();
                let top = logp.argmax(-1, false);
            }
            let (l, top) = (loss.double_value(&[]), top.int64_value(&[0]));
            losses.push(l);
            if step % 3 == 0 || step + 1 == STEPS {
                println!("step {step:>2}  loss {l:7.4}  p(\" Rome\") {:.3}  answer {:?}", (-l).exp(), model.decode(&[top])?);
            }
            adam.step().map_err(torch)?;
            adam.zero_grad().map_err(torch)?;
        }
    });

    // The trained LoRA as a persistent edit; the model itself is unchanged.
    let (a, b) = (a.detach(), b.detach());
    let tuned = intervene!(model.edit() {
        let x = model.model.layers[LAYER].mlp.input;
        model.model.layers[LAYER].mlp.output = model.model.layers[LAYER].mlp.output + x.matmul(&a).matmul(&b) * scale;
    });
    let options = GenerateOptions::new().max_new_tokens(8);
    let before = model.generate(PROMPT, &options)?;
    let after = tuned.generate(PROMPT, &options)?;
    println!("original:  {:?}", before.rows[0].text(&model)?);
    println!("with LoRA: {:?}", after.rows[0].text(&model)?);
    println!("{:.1} s in all", start.elapsed().as_secs_f64());

    let (first, last) = (losses[0], losses[STEPS - 1]);
    if last > first / 10.0 {
        return Err(format!("the loss fell only from {first:.3} to {last:.3}").into());
    }
    if after.rows[0].ids().get(model.encode(PROMPT)?.len()) != Some(&rome) {
        return Err("the LoRA did not make \" Rome\" the answer".into());
    }
    Ok(())
}
