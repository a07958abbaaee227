//! Generation with a KV cache: greedy parity with transformers on SmolLM2, cached logits against full re-forwards,
//! batched rows against solo runs, stop ids, seeded sampling, the hooked, streamed and iterator forms, the tiny
//! models (GQA, llama3 rope, Mistral's sliding window, GPT-2 positions) and the option errors.

use crate::common::{self, max_abs_diff};
use nnsight::nn::Hook;
use nnsight::prelude::*;
use nnsight::{Error, Generation, StepTokens};

const EIFFEL: &str = "The Eiffel Tower is in the city of";
const SHORT: &str = "Madrid is the capital of";
const LONG: &str = "Once upon a time, in a small village by the sea, there lived an old fisherman who";

/// Tolerance of cached logits against a full re-forward's last position (float32; SmolLM2's logits reach ~30).
const LOGITS_ATOL: f64 = 1e-4;

fn reference_new_ids() -> (Vec<i64>, String) {
    let text = std::fs::read_to_string(common::data("smollm2/reference.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let g = &json["greedy_generation_10"];
    let ids = g["new_ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    (ids, g["new_text"].as_str().unwrap().to_string())
}

/// Greedy decoding without a cache: the whole sequence re-run for every token.
fn greedy_without_cache<M: nnsight::models::CausalLm>(model: &LanguageModel<M>, prompt: &str, n: usize) -> Vec<i64> {
    let mut ids = model.encode(prompt).unwrap();
    let start = ids.len();
    for _ in 0..n {
        let logits = model.forward(vec![ids.clone()]).unwrap();
        ids.push(logits.get(0).get(-1).argmax(-1, false).int64_value(&[]));
    }
    ids[start..].to_vec()
}

/// Records the root's output (the logits) of every forward, and counts forwards.
#[derive(Default)]
struct LogitsRecorder {
    logits: Vec<Tensor>,
}

impl Hook for LogitsRecorder {
    fn input(&mut self, _: &str, x: Tensor) -> nnsight::Result<Tensor> {
        Ok(x)
    }
    fn output(&mut self, module: &str, y: Tensor) -> nnsight::Result<Tensor> {
        if module.is_empty() {
            self.logits.push(y.to_device(Device::Cpu));
        }
        Ok(y)
    }
}

/// For every step, the cached forward's last-position logits against a full forward of the row's prompt and the
/// tokens so far; returns the worst difference.
fn cached_vs_full<M: nnsight::models::CausalLm>(model: &LanguageModel<M>, prompts: &[&str], n: usize) -> f64 {
    let batch = model.batch(prompts.to_vec()).unwrap();
    let mut rec = LogitsRecorder::default();
    let opts = GenerateOptions::new().max_new_tokens(n).stop_ids([]);
    let out = model.generate_hooked(&batch, &opts, &mut rec, &mut |_| Ok(())).unwrap();
    assert_eq!(rec.logits.len(), n, "one forward per new token");
    let mut worst = 0.0f64;
    for (step, logits) in rec.logits.iter().enumerate() {
        assert_eq!(logits.size()[1], 1, "the head runs on the last position only");
        for (r, row) in out.rows.iter().enumerate() {
            let mut ids = row.prompt_ids.clone();
            ids.extend(&row.new_ids[..step]);
            let full = model.forward(vec![ids]).unwrap();
            let d = max_abs_diff(&logits.get(r as i64).get(-1), &full.get(0).get(-1));
            worst = worst.max(d);
        }
    }
    worst
}

#[test]
fn greedy_generate_reproduces_the_transformers_reference() {
    let model = common::smollm2();
    let (want, text) = reference_new_ids();
    let out = model.generate(EIFFEL, &GenerateOptions::new().max_new_tokens(10)).unwrap();
    assert_eq!(out.rows.len(), 1);
    assert_eq!(out.rows[0].new_ids, want);
    assert_eq!(out.rows[0].new_text(&model).unwrap(), text);
    assert_eq!(out.rows[0].prompt_ids, model.encode(EIFFEL).unwrap());
    assert_eq!(out.rows[0].text(&model).unwrap(), format!("{EIFFEL}{text}"));
    assert!(!out.rows[0].stopped);
    assert_eq!(out.steps, 10);
}

#[test]
fn cached_logits_equal_a_full_forward_at_every_step() {
    let model = common::smollm2();
    let single = cached_vs_full(&model, &[EIFFEL], 8);
    let batched = cached_vs_full(&model, &[EIFFEL, SHORT, LONG], 6);
    eprintln!("SmolLM2: max |cached - full| last-position logits: single {single:.2e}, batched {batched:.2e}");
    assert!(single < LOGITS_ATOL, "single prompt: cached logits differ by {single}");
    assert!(batched < LOGITS_ATOL, "left-padded batch: cached logits differ by {batched}");
}

#[test]
fn batched_prompts_of_different_lengths_each_equal_their_solo_runs() {
    let model = common::smollm2();
    let prompts = [EIFFEL, SHORT, LONG];
    let opts = GenerateOptions::new().max_new_tokens(12).stop_ids([]);
    let batched = model.generate(prompts.to_vec(), &opts).unwrap();
    assert_eq!(batched.rows.len(), 3);
    for (r, prompt) in prompts.iter().enumerate() {
        let solo = model.generate(*prompt, &opts).unwrap();
        assert_eq!(batched.rows[r], solo.rows[0], "row {r} ({prompt:?})");
        assert_eq!(batched.rows[r].new_ids.len(), 12);
    }
}

#[test]
fn a_row_that_hits_a_stop_id_stops_growing_while_the_others_continue() {
    let model = common::smollm2();
    let n = 10;
    let free = GenerateOptions::new().max_new_tokens(n).stop_ids([]);
    let a = model.generate(EIFFEL, &free).unwrap().rows.remove(0).new_ids;
    let b = model.generate(LONG, &free).unwrap().rows.remove(0).new_ids;
    // A token of row A's continuation (not its first) that row B never produces.
    let (idx, stop) = a.iter().copied().enumerate().skip(1).find(|(_, t)| !b.contains(t)).expect("a stop candidate");
    let first = a.iter().position(|&t| t == stop).unwrap();
    assert!(first < n - 1, "the stop token should come before the end");

    let mut streamed: Vec<StepTokens> = Vec::new();
    let opts = GenerateOptions::new().max_new_tokens(n).stop_ids([stop]);
    let out = model
        .generate_stream(vec![EIFFEL, LONG], &opts, |t| {
            streamed.push(t.clone());
            Ok(())
        })
        .unwrap();
    eprintln!("stop id {stop} (index {idx}, first at {first}); row A: {:?}", out.rows[0].new_ids);
    assert_eq!(out.rows[0].new_ids, a[..=first].to_vec(), "row A ends with its stop token");
    assert!(out.rows[0].stopped);
    assert_eq!(out.rows[1].new_ids, b, "row B continues as in its solo run");
    assert!(!out.rows[1].stopped);
    assert_eq!(out.steps, n);
    assert_eq!(streamed.len(), n);
    for t in &streamed {
        assert_eq!(t.tokens[0].is_none(), t.step > first, "row A's token at step {}", t.step);
        assert_eq!(t.stopped[0], t.step >= first);
        assert_eq!(t.tokens[1], Some(b[t.step]));
    }
    // Every row stopped: generation ends early.
    let solo = model.generate(EIFFEL, &opts).unwrap();
    assert_eq!(solo.steps, first + 1);
    assert_eq!(solo.rows[0].new_ids, a[..=first].to_vec());
}

#[test]
fn the_default_stop_id_is_the_models_eos() {
    let model = common::smollm2();
    let eos = model.special_tokens().eos.expect("SmolLM2 has an EOS") as i64;
    // A chat-formatted prompt ends in EOS quickly.
    let prompt = "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n";
    let out = model.generate(prompt, &GenerateOptions::new().max_new_tokens(40)).unwrap();
    let row = &out.rows[0];
    eprintln!("chat reply: {:?}", row.new_text(&model).unwrap());
    if row.stopped {
        assert_eq!(*row.new_ids.last().unwrap(), eos);
        assert_eq!(row.new_ids.iter().filter(|&&t| t == eos).count(), 1);
    } else {
        assert!(!row.new_ids.contains(&eos));
        assert_eq!(row.new_ids.len(), 40);
    }
}

#[test]
fn seeded_sampling_repeats_and_differs_across_seeds() {
    let model = common::smollm2();
    let opts = |seed| GenerateOptions::new().max_new_tokens(12).do_sample(true).temperature(1.5).seed(seed);
    let a = model.generate(EIFFEL, &opts(1)).unwrap();
    let again = model.generate(EIFFEL, &opts(1)).unwrap();
    let other = model.generate(EIFFEL, &opts(2)).unwrap();
    eprintln!("seed 1: {:?}\nseed 2: {:?}", a.rows[0].new_text(&model), other.rows[0].new_text(&model));
    assert_eq!(a, again, "the same seed repeats exactly");
    assert_ne!(a.rows[0].new_ids, other.rows[0].new_ids, "another seed differs");
    // Row 0 of a batch draws from the same stream as a solo run.
    let batched = model.generate(vec![EIFFEL, SHORT], &opts(1).stop_ids([])).unwrap();
    assert_eq!(batched.rows[0].new_ids, model.generate(EIFFEL, &opts(1).stop_ids([])).unwrap().rows[0].new_ids);
    // Nucleus sampling with a small p keeps the top token only: greedy.
    let greedy = model.generate(EIFFEL, &GenerateOptions::new().max_new_tokens(12)).unwrap();
    let nucleus = model.generate(EIFFEL, &opts(3).temperature(1.0).top_p(1e-6)).unwrap();
    assert_eq!(nucleus.rows[0].new_ids, greedy.rows[0].new_ids);
}

#[test]
fn sampling_with_top_k_1_equals_greedy() {
    let model = common::smollm2();
    let greedy = model.generate(vec![EIFFEL, SHORT], &GenerateOptions::new().max_new_tokens(10)).unwrap();
    for seed in [0, 1, 2] {
        let opts = GenerateOptions::new().max_new_tokens(10).do_sample(true).top_k(1).temperature(0.7).seed(seed);
        let sampled = model.generate(vec![EIFFEL, SHORT], &opts).unwrap();
        assert_eq!(sampled, greedy, "seed {seed}");
    }
}

#[test]
fn a_hook_sees_every_step_and_its_changes_to_the_logits_pick_the_token() {
    /// Counts calls of `lm_head` and makes token `forced` the most likely at every step.
    struct Force {
        forced: i64,
        steps: usize,
        stop_at: Option<usize>,
    }
    impl Hook for Force {
        fn input(&mut self, _: &str, x: Tensor) -> nnsight::Result<Tensor> {
            Ok(x)
        }
        fn output(&mut self, module: &str, y: Tensor) -> nnsight::Result<Tensor> {
            if module != "lm_head" {
                return Ok(y);
            }
            if self.stop_at == Some(self.steps) {
                return Err(Error::Stopped);
            }
            self.steps += 1;
            let _ = y.narrow(2, self.forced, 1).fill_(1e4);
            Ok(y)
        }
    }
    let model = common::smollm2();
    let batch = model.batch(vec![EIFFEL, SHORT]).unwrap();
    let opts = GenerateOptions::new().max_new_tokens(5).stop_ids([]);
    let mut hook = Force { forced: 42, steps: 0, stop_at: None };
    let mut seen = Vec::new();
    let out = model
        .generate_hooked(&batch, &opts, &mut hook, &mut |t| {
            seen.push(t.step);
            Ok(())
        })
        .unwrap();
    assert_eq!(hook.steps, 5, "lm_head is called once per step");
    assert_eq!(seen, vec![0, 1, 2, 3, 4]);
    for row in &out.rows {
        assert_eq!(row.new_ids, vec![42; 5]);
    }
    // An error from the hook ends generation and comes back unchanged.
    let mut hook = Force { forced: 42, steps: 0, stop_at: Some(2) };
    let mut seen = 0;
    let err = model
        .generate_hooked(&batch, &opts, &mut hook, &mut |_| {
            seen += 1;
            Ok(())
        })
        .unwrap_err();
    assert!(matches!(err, Error::Stopped), "{err}");
    assert_eq!(seen, 2);
    // So does one from on_token.
    let err =
        model.generate_stream(EIFFEL, &opts, |t| if t.step == 1 { Err(Error::Stopped) } else { Ok(()) }).unwrap_err();
    assert!(matches!(err, Error::Stopped));
}

#[test]
fn the_iterator_and_text_stream_give_the_same_tokens_and_text() {
    let model = common::smollm2();
    let opts = GenerateOptions::new().max_new_tokens(10);
    let whole = model.generate(EIFFEL, &opts).unwrap();
    let mut text = nnsight::TextStream::new();
    let mut pieces = String::new();
    let mut gen = model.generator(EIFFEL, &opts).unwrap();
    for (i, step) in gen.by_ref().enumerate() {
        let step = step.unwrap();
        assert_eq!(step.step, i);
        pieces.push_str(&text.push(&model, step.tokens[0].unwrap()).unwrap());
    }
    assert_eq!(gen.finish(), whole);
    assert_eq!(pieces, whole.rows[0].new_text(&model).unwrap());
    assert_eq!(text.text(), pieces);
}

/// A hook that asks for every attention's inner points (the explicit path) and records their shapes per step.
#[derive(Default)]
struct Points {
    shapes: Vec<(String, Vec<i64>)>,
}

impl Hook for Points {
    fn input(&mut self, _: &str, x: Tensor) -> nnsight::Result<Tensor> {
        Ok(x)
    }
    fn output(&mut self, _: &str, y: Tensor) -> nnsight::Result<Tensor> {
        Ok(y)
    }
    fn wants_points(&mut self, _: &str, _: &[&str]) -> bool {
        true
    }
    fn point(&mut self, path: &str, t: Tensor) -> nnsight::Result<Tensor> {
        if path.contains(".0.") {
            self.shapes.push((path.rsplit('.').next().unwrap().to_string(), t.size()));
        }
        Ok(t)
    }
}

fn check_tiny<M: nnsight::models::CausalLm>(dir: &str) {
    common::init();
    let model = LanguageModel::<M>::load_with(common::data(dir), common::opts()).unwrap();
    let p1 = "The quick brown fox jumps over the lazy dog";
    let p2 = "Hello world";
    let n = 24;
    let opts = GenerateOptions::new().max_new_tokens(n).stop_ids([]);
    let batched = model.generate(vec![p1, p2], &opts).unwrap();
    for (r, prompt) in [p1, p2].into_iter().enumerate() {
        let want = greedy_without_cache(&model, prompt, n);
        let solo = model.generate(prompt, &opts).unwrap();
        assert_eq!(solo.rows[0].new_ids, want, "{dir}: cached greedy of {prompt:?} against re-forwards");
        assert_eq!(batched.rows[r].new_ids, want, "{dir}: batched row {r}");
    }
    let d = cached_vs_full(&model, &[p1, p2], 12);
    eprintln!("{dir}: max |cached - full| logits {d:.2e}");
    assert!(d < LOGITS_ATOL, "{dir}: cached logits differ by {d}");

    // The explicit inner-points path with the cache gives the same tokens; `key` holds the new positions only.
    let batch = model.batch(vec![p1, p2]).unwrap();
    let mut hook = Points::default();
    let explicit = model.generate_hooked(&batch, &opts.clone().max_new_tokens(4), &mut hook, &mut |_| Ok(())).unwrap();
    for (a, b) in explicit.rows.iter().zip(&batched.rows) {
        assert_eq!(a.new_ids, b.new_ids[..4].to_vec(), "{dir}: explicit path");
    }
    let seq = batch.input_ids.size()[1];
    let shapes: Vec<_> = hook.shapes.iter().filter(|(n, _)| n == "key" || n == "probs").collect();
    assert_eq!(shapes.len(), 8, "{dir}: key and probs of layer 0 at 4 steps: {shapes:?}");
    for (step, pair) in shapes.chunks(2).enumerate() {
        let q = if step == 0 { seq } else { 1 };
        let (key, probs) = (&pair[0].1, &pair[1].1);
        assert_eq!(key[2], q, "{dir} step {step}: key holds the new positions");
        assert_eq!(probs[2..], [q, seq + step as i64], "{dir} step {step}: probs over every cached key");
    }
}

#[test]
fn tiny_gpt2_cached_generation_equals_greedy_without_cache() {
    check_tiny::<Gpt2>("tiny-gpt2");
}

#[test]
fn tiny_llama_cached_generation_equals_greedy_without_cache() {
    check_tiny::<Llama>("tiny-llama");
}

#[test]
fn tiny_mistral_cached_generation_with_a_sliding_window_equals_greedy_without_cache() {
    check_tiny::<Llama>("tiny-mistral");
}

#[test]
fn tiny_gpt2_generation_past_its_positions_is_an_error() {
    common::init();
    let model = LanguageModel::<Gpt2>::load_with(common::data("tiny-gpt2"), common::opts()).unwrap();
    let err = model.generate("Hello world", &GenerateOptions::new().max_new_tokens(200).stop_ids([])).unwrap_err();
    assert!(err.to_string().contains("exceed GPT-2's 128 positions"), "{err}");
}

#[test]
fn bad_options_are_clear_errors() {
    common::init();
    let model = LanguageModel::<Gpt2>::load_with(common::data("tiny-gpt2"), common::opts()).unwrap();
    let cases: Vec<(GenerateOptions, &str)> = vec![
        (GenerateOptions::new().max_new_tokens(0), "max_new_tokens must be at least 1"),
        (GenerateOptions::new().do_sample(true).temperature(0.0), "temperature must be finite and > 0"),
        (GenerateOptions::new().do_sample(true).temperature(-1.0), "temperature must be finite and > 0"),
        (GenerateOptions::new().do_sample(true).temperature(f64::NAN), "temperature must be finite and > 0"),
        (GenerateOptions::new().do_sample(true).top_p(0.0), "top_p must be in (0, 1]"),
        (GenerateOptions::new().do_sample(true).top_p(1.5), "top_p must be in (0, 1]"),
        (GenerateOptions::new().do_sample(true).top_k(0), "top_k must be at least 1"),
        (GenerateOptions::new().temperature(0.7), "temperature set for greedy decoding"),
        (GenerateOptions::new().stop_ids([100_000]), "stop id 100000 is outside the vocabulary"),
    ];
    for (opts, want) in cases {
        let err = model.generate("Hello", &opts).unwrap_err();
        assert!(err.to_string().contains(want), "{opts:?}: {err}");
        assert!(model.generator("Hello", &opts).is_err());
    }
    let empty: Vec<&str> = Vec::new();
    assert!(model.generate(empty, &GenerateOptions::new()).is_err());
}

#[test]
fn generation_helpers_decode_rows() {
    common::init();
    let model = LanguageModel::<Gpt2>::load_with(common::data("tiny-gpt2"), common::opts()).unwrap();
    let out: Generation = model.generate(vec!["Hello world", "A"], &GenerateOptions::new().max_new_tokens(3)).unwrap();
    let texts = out.texts(&model).unwrap();
    let new = out.new_texts(&model).unwrap();
    for (r, row) in out.rows.iter().enumerate() {
        assert_eq!(texts[r], model.decode(&row.ids()).unwrap());
        assert_eq!(new[r], model.decode(&row.new_ids).unwrap());
        assert!(row.new_ids.len() <= 3);
    }
}

#[test]
fn auto_model_generates_like_the_typed_model() {
    common::init();
    let opts = GenerateOptions::new().max_new_tokens(10).stop_ids([]);
    let auto = LanguageModel::<AutoModel>::load_with(common::data("tiny-llama"), common::opts()).unwrap();
    let typed = LanguageModel::<Llama>::load_with(common::data("tiny-llama"), common::opts()).unwrap();
    let prompts = vec!["Hello world", "The quick brown fox"];
    assert_eq!(auto.generate(prompts.clone(), &opts).unwrap(), typed.generate(prompts, &opts).unwrap());
}

#[test]
fn a_write_to_the_key_point_at_step_0_persists_in_the_cache() {
    /// Zeroes layer 0's keys at the prefill only, and records layer 0's attention probabilities at step 1.
    #[derive(Default)]
    struct ZeroKeys {
        step: usize,
        probs: Option<Tensor>,
    }
    impl Hook for ZeroKeys {
        fn input(&mut self, _: &str, x: Tensor) -> nnsight::Result<Tensor> {
            Ok(x)
        }
        fn output(&mut self, module: &str, y: Tensor) -> nnsight::Result<Tensor> {
            if module.is_empty() {
                self.step += 1;
            }
            Ok(y)
        }
        fn wants_points(&mut self, module: &str, _: &[&str]) -> bool {
            module == "transformer.h.0.attn"
        }
        fn point(&mut self, path: &str, t: Tensor) -> nnsight::Result<Tensor> {
            match (path, self.step) {
                ("transformer.h.0.attn.key", 0) => Ok(t.zeros_like()),
                ("transformer.h.0.attn.probs", 1) => {
                    self.probs = Some(t.copy());
                    Ok(t)
                }
                _ => Ok(t),
            }
        }
    }
    common::init();
    let model = LanguageModel::<Gpt2>::load_with(common::data("tiny-gpt2"), common::opts()).unwrap();
    let batch = model.batch("The quick brown fox").unwrap();
    let n = batch.lengths[0] as i64;
    let mut hook = ZeroKeys::default();
    let opts = GenerateOptions::new().max_new_tokens(2).stop_ids([]);
    model.generate_hooked(&batch, &opts, &mut hook, &mut |_| Ok(())).unwrap();
    // At step 1 the query meets the prompt's zeroed keys (equal scores: equal probabilities) and its own key.
    let probs = hook.probs.expect("probs at step 1").squeeze_dim(0); // [heads, 1, n + 1]
    assert_eq!(probs.size(), vec![4, 1, n + 1]);
    let prompt = probs.narrow(2, 0, n);
    let spread = (prompt.max_dim(2, false).0 - prompt.min_dim(2, false).0).abs().max().double_value(&[]);
    assert!(spread < 1e-6, "the cached prompt keys should all be zero (equal scores), spread {spread}");
}
