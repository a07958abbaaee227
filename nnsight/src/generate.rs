//! Generation with a KV cache: greedy or sampled decoding of one prompt or a left-padded batch, plain, streamed
//! (a callback or an iterator), or with a [`Hook`] that sees every module call of every step.
//!
//! The first forward (step 0, the *prefill*) runs the whole left-padded prompt and fills the cache; each later
//! forward (step 1, 2, ...) runs one new token per row over the cache. Every module is called once per forward,
//! so a module's n-th call is step n. A row whose token is a stop id stops growing: later steps feed it a pad
//! token that the attention mask hides, and its tokens are reported as `None`. Generation ends when every row
//! stopped or after `max_new_tokens` steps.
//!
//! ```no_run
//! use nnsight::prelude::*;
//!
//! # fn main() -> nnsight::Result<()> {
//! let model = LanguageModel::<Llama>::load("models/SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let out = model.generate("The Eiffel Tower is in the city of", &GenerateOptions::new().max_new_tokens(10))?;
//! println!("{}", out.rows[0].new_text(&model)?);
//! # Ok(())
//! # }
//! ```

use crate::load::tokenizer::SpecialTokens;
use crate::models::batch::Batch;
use crate::models::{CachedInput, CausalLm};
use crate::nn::{Ctx, Hook, KvCache};
use crate::{Error, Result};
use tch::{Device, Kind, Tensor};

/// How [`crate::LanguageModel::generate`] decodes: greedy by default; sampling with a temperature, top-k, top-p and a
/// seed.
///
/// ```
/// use nnsight::GenerateOptions;
/// let greedy = GenerateOptions::new().max_new_tokens(10);
/// let sampled = GenerateOptions::new().do_sample(true).temperature(0.8).top_p(0.95).seed(7);
/// # let _ = (greedy, sampled);
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateOptions {
    /// Most tokens added to each row (default 20; at least 1).
    pub max_new_tokens: usize,
    /// Sample the next token instead of taking the most likely one (default false: greedy).
    pub do_sample: bool,
    /// Sampling temperature (`None`: 1); the logits are divided by it. Must be finite and > 0.
    pub temperature: Option<f64>,
    /// Sample among the `k` most likely tokens only (`None`: all; ties with the k-th are kept, as transformers
    /// does).
    pub top_k: Option<usize>,
    /// Sample among the smallest set of most likely tokens whose probability reaches `p` (nucleus sampling; `None`:
    /// all; in (0, 1]).
    pub top_p: Option<f64>,
    /// Seed of the sampling (`None`: a fresh seed per call). Row `r` of a batch draws from its own stream, seeded
    /// by `(seed, r)`, so a seeded run repeats exactly and a row's draws do not depend on when the others stop.
    pub seed: Option<u64>,
    /// Tokens that end a row (the stop token is kept in its new ids); `None` (default): the model's EOS id if
    /// known. `Some(vec![])`: none, every row runs `max_new_tokens`.
    pub stop_ids: Option<Vec<i64>>,
    /// Run the head on every prompt position at step 0 (`model.output` `[batch, prompt_len, vocab]` for a hook)
    /// instead of the last one only (`[batch, 1, vocab]`, the default, as transformers' `generate` does with
    /// `logits_to_keep=1`). Later steps have one position either way.
    pub full_prefill_logits: bool,
    /// Called with each step's tokens as they come, by every way of generating (`generate`, the iterator, a
    /// traced generation in `intervene!`); an `Err` ends the generation and is returned.
    #[serde(skip)]
    pub on_token: Option<OnToken>,
}

/// A callback on each step's tokens (see [`GenerateOptions::on_token`]). Options holding one compare equal only
/// to options holding the same one.
#[derive(Clone)]
pub struct OnToken(std::sync::Arc<std::sync::Mutex<TokenCallback>>);

/// The callback inside an [`OnToken`].
type TokenCallback = dyn FnMut(&StepTokens) -> Result<()> + Send;

impl OnToken {
    /// Calls the callback.
    pub fn call(&self, tokens: &StepTokens) -> Result<()> {
        let mut f = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(tokens)
    }
}

impl std::fmt::Debug for OnToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnToken(..)")
    }
}

impl PartialEq for OnToken {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 20,
            do_sample: false,
            temperature: None,
            top_k: None,
            top_p: None,
            seed: None,
            stop_ids: None,
            full_prefill_logits: false,
            on_token: None,
        }
    }
}

impl GenerateOptions {
    /// Greedy decoding of up to 20 new tokens, stopping at the model's EOS.
    pub fn new() -> Self {
        Self::default()
    }
    /// At most `n` new tokens per row.
    pub fn max_new_tokens(mut self, n: usize) -> Self {
        self.max_new_tokens = n;
        self
    }
    /// Sample (true) or take the most likely token (false, the default).
    pub fn do_sample(mut self, sample: bool) -> Self {
        self.do_sample = sample;
        self
    }
    /// Sampling temperature (needs `do_sample(true)`).
    pub fn temperature(mut self, t: f64) -> Self {
        self.temperature = Some(t);
        self
    }
    /// Top-k sampling (needs `do_sample(true)`).
    pub fn top_k(mut self, k: usize) -> Self {
        self.top_k = Some(k);
        self
    }
    /// Nucleus (top-p) sampling (needs `do_sample(true)`).
    pub fn top_p(mut self, p: f64) -> Self {
        self.top_p = Some(p);
        self
    }
    /// The seed that makes sampling repeat.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }
    /// Tokens that end a row (replacing the default, the model's EOS; an empty list: none).
    pub fn stop_ids(mut self, ids: impl IntoIterator<Item = i64>) -> Self {
        self.stop_ids = Some(ids.into_iter().collect());
        self
    }
    /// Logits of every prompt position at step 0 (see the field).
    pub fn full_prefill_logits(mut self, full: bool) -> Self {
        self.full_prefill_logits = full;
        self
    }

    /// Calls `f` with each step's tokens as they come (streaming), whichever way the generation runs, a traced
    /// one in `intervene!(model.generate(..) { .. })` included.
    pub fn on_token(mut self, f: impl FnMut(&StepTokens) -> Result<()> + Send + 'static) -> Self {
        self.on_token = Some(OnToken(std::sync::Arc::new(std::sync::Mutex::new(f))));
        self
    }

    /// Checks the options against a vocabulary of `vocab` tokens.
    pub(crate) fn validate(&self, vocab: i64) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidInput { message: format!("generate: {m}") });
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens must be at least 1".into());
        }
        if !self.do_sample {
            let set: Vec<&str> = [
                ("temperature", self.temperature.is_some()),
                ("top_k", self.top_k.is_some()),
                ("top_p", self.top_p.is_some()),
            ]
            .into_iter()
            .filter_map(|(n, s)| s.then_some(n))
            .collect();
            if !set.is_empty() {
                return bad(format!(
                    "{} set for greedy decoding, which ignores it: add `.do_sample(true)` to sample",
                    set.join(", ")
                ));
            }
        }
        if let Some(t) = self.temperature {
            if !(t.is_finite() && t > 0.0) {
                return bad(format!(
                    "temperature must be finite and > 0, found {t} (for greedy decoding leave sampling off)"
                ));
            }
        }
        if self.top_k == Some(0) {
            return bad("top_k must be at least 1".into());
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad(format!("top_p must be in (0, 1], found {p}"));
            }
        }
        if let Some(ids) = &self.stop_ids {
            if let Some(&id) = ids.iter().find(|&&i| i < 0 || i >= vocab) {
                return bad(format!("stop id {id} is outside the vocabulary (0..{vocab})"));
            }
        }
        Ok(())
    }
}

/// The tokens one step added: what [`crate::LanguageModel::generate_stream`] and the iterator hand out as they come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepTokens {
    /// The step (forward) that produced them: 0 for the prefill, then 1, 2, ...
    pub step: usize,
    /// The new token of each row, `None` for rows that had already stopped.
    pub tokens: Vec<Option<i64>>,
    /// Whether each row has stopped at a stop id (at this step or before).
    pub stopped: Vec<bool>,
}

/// One row of a [`Generation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedRow {
    /// The prompt's token ids (without padding).
    pub prompt_ids: Vec<i64>,
    /// The new tokens, the stop token included when one was hit.
    pub new_ids: Vec<i64>,
    /// Whether the row ended at a stop id (false: it ran to `max_new_tokens`, or generation ended early).
    pub stopped: bool,
}

impl GeneratedRow {
    /// Prompt and new tokens.
    pub fn ids(&self) -> Vec<i64> {
        self.prompt_ids.iter().chain(&self.new_ids).copied().collect()
    }
}

/// What a generation produced, per row of the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// One entry per prompt, in input order.
    pub rows: Vec<GeneratedRow>,
    /// Forwards run (the prefill included): the length of the longest row's new tokens.
    pub steps: usize,
}

/// Decodes one row's tokens as they come into text pieces that can be printed one after another: a piece is
/// held back while the text ends inside a multi-byte character.
///
/// ```no_run
/// # use nnsight::prelude::*;
/// # use nnsight::{GenerateOptions, TextStream};
/// # fn main() -> nnsight::Result<()> {
/// # let model = LanguageModel::<Llama>::load("models/SmolLM2-135M-Instruct.Q4_1.gguf")?;
/// let mut text = TextStream::new();
/// for step in model.generator("Once upon a time", &GenerateOptions::new())? {
///     if let Some(token) = step?.tokens[0] {
///         print!("{}", text.push(&model, token)?);
///     }
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    ids: Vec<i64>,
    shown: String,
}

impl TextStream {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// [`TextStream::push`] with a decoding function of one's own (e.g. a clone of the model's tokenizer, where
    /// the model itself cannot be borrowed, as in a `'static` [`GenerateOptions::on_token`] callback).
    pub fn push_with(&mut self, decode: impl Fn(&[i64]) -> Result<String>, token: i64) -> Result<String> {
        self.ids.push(token);
        let text = decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') || !text.starts_with(&self.shown) {
            return Ok(String::new());
        }
        let piece = text[self.shown.len()..].to_string();
        self.shown = text;
        Ok(piece)
    }

    /// The text shown so far.
    pub fn text(&self) -> &str {
        &self.shown
    }

    /// [`TextStream::finish`](crate::TextStream::finish) with a decoding function of one's own.
    pub fn finish_with(&mut self, decode: impl Fn(&[i64]) -> Result<String>) -> Result<String> {
        let text = decode(&self.ids)?;
        let rest = text.strip_prefix(self.shown.as_str()).unwrap_or_default().to_string();
        self.shown = text;
        Ok(rest)
    }
}

/// SplitMix64 (Steele, Lea and Flood 2014): a small seeded generator, so sampling repeats exactly and leaves
/// libtorch's global generator alone.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn for_row(seed: u64, row: usize) -> Self {
        let mut r = Rng(seed ^ (row as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next_u64();
        r
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ std::process::id() as u64
}

/// Draws a token from one row's logits: temperature, then top-k, then top-p (the order of transformers' logits
/// warpers), then a draw from the softmax of what is left.
fn sample(logits: &[f32], o: &GenerateOptions, rng: &mut Rng) -> i64 {
    let t = o.temperature.unwrap_or(1.0);
    let mut x: Vec<f64> = logits.iter().map(|&l| l as f64 / t).collect();
    let n = x.len();
    if let Some(k) = o.top_k.filter(|&k| k < n) {
        let mut sorted: Vec<f64> = x.iter().copied().filter(|v| !v.is_nan()).collect();
        let kth = if k <= sorted.len() {
            let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            *kth
        } else {
            f64::NEG_INFINITY
        };
        x.iter_mut().filter(|v| v.is_nan() || **v < kth).for_each(|v| *v = f64::NEG_INFINITY);
    }
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut p: Vec<f64> = x.iter().map(|&v| if v > f64::NEG_INFINITY { (v - max).exp() } else { 0.0 }).collect();
    let mut sum: f64 = p.iter().sum();
    if let Some(top_p) = o.top_p.filter(|&q| q < 1.0) {
        // transformers: sort ascending, drop tokens whose cumulative probability is <= 1 - top_p, keep the most
        // likely one.
        let mut order: Vec<usize> = (0..n).filter(|&i| p[i] > 0.0).collect();
        order.sort_by(|&a, &b| p[a].total_cmp(&p[b]).then(b.cmp(&a)));
        let mut cum = 0.0;
        let last = order.len().saturating_sub(1);
        for (rank, &i) in order.iter().enumerate() {
            cum += p[i] / sum;
            if cum <= 1.0 - top_p && rank < last {
                p[i] = 0.0;
            }
        }
        sum = p.iter().sum();
    }
    let u = rng.next_f64() * sum;
    let mut acc = 0.0;
    let mut chosen = None;
    for (i, &pi) in p.iter().enumerate() {
        if pi > 0.0 {
            acc += pi;
            chosen = Some(i);
            if u < acc {
                break;
            }
        }
    }
    chosen.unwrap_or(0) as i64
}

/// The decoding loop's state between forwards: the cache, the mask over every cached position, each row's
/// tokens. [`crate::LanguageModel::generate_hooked`] and the [`crate::Generator`] drive it one step at a time.
pub(crate) struct Decoder {
    options: GenerateOptions,
    rows: Vec<GeneratedRow>,
    /// Rows still growing.
    active: Vec<bool>,
    /// Position of each row's next fed token (its real tokens so far).
    next_pos: Vec<i64>,
    stop_ids: Vec<i64>,
    pad_id: i64,
    kv: Option<KvCache>,
    /// The prompt batch until the prefill ran.
    prefill: Option<CachedInput>,
    /// Every token fed so far `[batch, past]`, kept for a model whose cache must be recomputed at some length
    /// ([`CausalLm::recompute_cache_at`]), with that length.
    fed: Option<(Tensor, i64)>,
    /// `[batch, past]` mask of the cached positions (1 real, 0 pad).
    mask: Tensor,
    padded: bool,
    rngs: Vec<Rng>,
    step: usize,
    device: Device,
    vocab: i64,
    done: bool,
}

impl Decoder {
    /// The state before the prefill of `batch`; `special` gives the default stop id (EOS) and the pad id.
    pub(crate) fn new<M: CausalLm>(
        model: &M,
        special: &SpecialTokens,
        batch: &Batch,
        options: &GenerateOptions,
    ) -> Result<Self> {
        let vocab = model.vocab_size();
        options.validate(vocab)?;
        let layers = model.cache_layers();
        if layers == 0 {
            return Err(Error::InvalidInput {
                message: format!("generate: the `{}` architecture has no KV cache", M::ARCHITECTURE),
            });
        }
        let (b, seq) = batch.input_ids.size2().map_err(|e| Error::torch("input_ids", e))?;
        if batch.lengths.len() != b as usize || batch.lengths.iter().any(|&n| n == 0 || n as i64 > seq) {
            return Err(Error::InvalidInput {
                message: format!("batch of {b} rows of {seq} ids has row lengths {:?}", batch.lengths),
            });
        }
        let ids = Vec::<i64>::try_from(&batch.input_ids.to_device(Device::Cpu).reshape([-1]))
            .map_err(|e| Error::torch("input_ids", e))?;
        let rows: Vec<GeneratedRow> = batch
            .lengths
            .iter()
            .enumerate()
            .map(|(r, &n)| {
                let row = &ids[r * seq as usize..(r + 1) * seq as usize];
                GeneratedRow { prompt_ids: row[row.len() - n..].to_vec(), new_ids: Vec::new(), stopped: false }
            })
            .collect();
        let stop_ids = match &options.stop_ids {
            Some(ids) => ids.clone(),
            None => special.eos.map(|e| vec![e as i64]).unwrap_or_default(),
        };
        let seed = options.seed.unwrap_or_else(fresh_seed);
        Ok(Decoder {
            options: options.clone(),
            active: vec![true; rows.len()],
            next_pos: batch.lengths.iter().map(|&n| n as i64).collect(),
            stop_ids,
            pad_id: special.pad.or(special.eos).unwrap_or(0) as i64,
            kv: Some(KvCache::new(layers, seq + options.max_new_tokens as i64)),
            prefill: Some(CachedInput::prefill(batch, !options.full_prefill_logits)),
            fed: model.recompute_cache_at().map(|at| (batch.input_ids.shallow_clone(), at)),
            mask: batch.attention_mask.shallow_clone(),
            padded: batch.padded,
            rngs: (0..rows.len()).map(|r| Rng::for_row(seed, r)).collect(),
            rows,
            step: 0,
            device: batch.input_ids.device(),
            vocab,
            done: false,
        })
    }

    /// The inputs of the next decode step: each active row's last token (a masked pad for the others).
    fn next_input(&mut self) -> Result<CachedInput> {
        let f = |e| Error::torch("generate", e);
        let b = self.rows.len() as i64;
        let ids: Vec<i64> = self
            .rows
            .iter()
            .zip(&self.active)
            .map(|(r, &a)| if a { *r.new_ids.last().expect("a step ran") } else { self.pad_id })
            .collect();
        let col: Vec<i64> = self.active.iter().map(|&a| a as i64).collect();
        let mk = |v: &[i64]| Tensor::from_slice(v).f_view([b, 1]).and_then(|t| t.f_to_device(self.device)).map_err(f);
        let input_ids = mk(&ids)?;
        let position_ids = mk(&self.next_pos)?;
        for (pos, &a) in self.next_pos.iter_mut().zip(&self.active) {
            *pos += a as i64;
        }
        let mask = Tensor::f_cat(&[&self.mask, &mk(&col)?], 1).map_err(f)?;
        self.padded |= self.active.iter().any(|a| !a);
        self.mask = mask.shallow_clone();
        Ok(CachedInput { input_ids, attention_mask: mask, position_ids, padded: self.padded, last_logits_only: true })
    }

    /// Runs the next forward (with `hook`, if any) and picks each active row's token; `None` once done.
    /// One forward: the prefill, or one token per active row; `None` once every row stopped or the steps ran out.
    pub(crate) fn step<M: CausalLm>(&mut self, model: &M, hook: Option<&mut dyn Hook>) -> Result<Option<StepTokens>> {
        if self.done {
            return Ok(None);
        }
        let _guard = tch::no_grad_guard();
        let input = match self.prefill.take() {
            Some(p) => p,
            None => self.next_input()?,
        };
        let mut cx = match hook {
            Some(h) => Ctx::with_hook(h),
            None => Ctx::new(),
        };
        let kv = self.kv.take().unwrap_or_default();
        // A failed forward ends the generation: the cache is gone with it.
        self.done = true;
        let (input, kv) = self.whole_sequence_if_due(input, kv)?;
        let (logits, kv) = model.run_cached(&mut cx, &input, kv)?;
        self.kv = Some(kv);
        let picked = self.pick(&logits)?;
        let mut tokens = Vec::with_capacity(self.rows.len());
        for (r, tok) in picked.into_iter().enumerate() {
            if !self.active[r] {
                tokens.push(None);
                continue;
            }
            let row = &mut self.rows[r];
            row.new_ids.push(tok);
            if self.stop_ids.contains(&tok) {
                row.stopped = true;
                self.active[r] = false;
            }
            tokens.push(Some(tok));
        }
        let step = self.step;
        self.step += 1;
        self.done = self.step >= self.options.max_new_tokens || !self.active.iter().any(|&a| a);
        let tokens = StepTokens { step, tokens, stopped: self.rows.iter().map(|r| r.stopped).collect() };
        // The options' callback sees every step, whichever way the generation runs.
        if let Some(f) = &self.options.on_token {
            f.call(&tokens)?;
        }
        Ok(Some(tokens))
    }

    /// The next forward's input and cache, or, at the decode step where the model asks for it
    /// ([`CausalLm::recompute_cache_at`]: the cache holds exactly that many positions), every token so far with an
    /// empty cache: transformers' Phi-3 generation drops its cache there and runs the whole sequence again.
    fn whole_sequence_if_due(&mut self, input: CachedInput, kv: KvCache) -> Result<(CachedInput, KvCache)> {
        let (Some((fed, at)), past) = (self.fed.as_mut(), kv.past_len()) else { return Ok((input, kv)) };
        if past > 0 {
            *fed = Tensor::f_cat(&[&*fed, &input.input_ids], 1).map_err(|e| Error::torch("generate", e))?;
        }
        if past == 0 || past != *at {
            return Ok((input, kv));
        }
        let room = fed.size()[1] + (self.options.max_new_tokens - self.step) as i64;
        Ok((CachedInput::whole_sequence(fed.shallow_clone(), &input)?, KvCache::new(kv.num_layers(), room)))
    }

    /// Each row's next token from the last position of `logits` `[batch, seq, vocab]` (inactive rows: 0).
    fn pick(&mut self, logits: &Tensor) -> Result<Vec<i64>> {
        let p = "generate";
        let size = logits.size();
        let b = self.rows.len() as i64;
        if size.len() != 3 || size[0] != b || size[2] != self.vocab || size[1] < 1 {
            return Err(Error::InvalidInput {
                message: format!(
                    "generate: the model's output should be logits [{b}, seq, {}], found {size:?}",
                    self.vocab
                ),
            });
        }
        let last = logits.f_select(1, -1).map_err(|e| Error::torch(p, e))?;
        if !self.options.do_sample {
            let ids =
                last.f_argmax(-1, false).and_then(|t| t.f_to_device(Device::Cpu)).map_err(|e| Error::torch(p, e))?;
            return Vec::<i64>::try_from(&ids).map_err(|e| Error::torch(p, e));
        }
        let cpu = last
            .f_to_kind(Kind::Float)
            .and_then(|t| t.f_to_device(Device::Cpu))
            .and_then(|t| t.f_contiguous())
            .map_err(|e| Error::torch(p, e))?;
        let all = Vec::<f32>::try_from(&cpu.reshape([-1])).map_err(|e| Error::torch(p, e))?;
        let v = self.vocab as usize;
        Ok((0..self.rows.len())
            .map(
                |r| if self.active[r] { sample(&all[r * v..(r + 1) * v], &self.options, &mut self.rngs[r]) } else { 0 },
            )
            .collect())
    }

    /// What was generated so far.
    pub(crate) fn generation(&self) -> Generation {
        Generation { rows: self.rows.clone(), steps: self.step }
    }
}
