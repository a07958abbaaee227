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

mod options;
mod sample;

pub use options::{GenerateOptions, OnToken};

use crate::load::tokenizer::SpecialTokens;
use crate::models::batch::Batch;
use crate::models::{CachedInput, CausalLm};
use crate::nn::{Ctx, Hook, KvCache};
use crate::{Error, Result};
use sample::{fresh_seed, sample, Rng};
use tch::{Device, Kind, Tensor};

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
        let (ids, positions, col) = self.next_rows();
        let mk = |v: &[i64]| Tensor::from_slice(v).f_view([b, 1]).and_then(|t| t.f_to_device(self.device)).map_err(f);
        let input_ids = mk(&ids)?;
        let position_ids = mk(&positions)?;
        let mask = Tensor::f_cat(&[&self.mask, &mk(&col)?], 1).map_err(f)?;
        self.padded |= col.contains(&0);
        self.mask = mask.shallow_clone();
        Ok(CachedInput { input_ids, attention_mask: mask, position_ids, padded: self.padded, last_logits_only: true })
    }

    /// What each row feeds the next decode step: its token (its last new one, a pad once it stopped), that token's
    /// position, and its attention-mask column (1 real, 0 pad); the rows' positions move on.
    pub(crate) fn next_rows(&mut self) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
        let ids: Vec<i64> = self
            .rows
            .iter()
            .zip(&self.active)
            .map(|(r, &a)| if a { *r.new_ids.last().expect("a step ran") } else { self.pad_id })
            .collect();
        let positions = self.next_pos.clone();
        for (pos, &a) in self.next_pos.iter_mut().zip(&self.active) {
            *pos += a as i64;
        }
        (ids, positions, self.active.iter().map(|&a| a as i64).collect())
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
        self.accept(&logits).map(Some)
    }

    /// Takes each active row's token from `logits` `[rows, seq, vocab]` (the last position), the step's
    /// bookkeeping (stops, the step count, the options' callback).
    pub(crate) fn accept(&mut self, logits: &Tensor) -> Result<StepTokens> {
        self.done = true;
        let picked = self.pick(logits)?;
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
        Ok(tokens)
    }

    /// Whether the generation is over (every row stopped, the steps ran out, or a forward failed).
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// The number of rows.
    pub(crate) fn num_rows(&self) -> usize {
        self.rows.len()
    }

    /// Hands the cache and its mask `[rows, past]` over to a caller that runs the decode steps itself (a server's
    /// continuous batch, after this decoder ran the prefill): from then on it calls [`Decoder::next_rows`] and
    /// [`Decoder::accept`]. `None` before the prefill, or for a model whose cache must be recomputed at some
    /// length ([`CausalLm::recompute_cache_at`]).
    pub(crate) fn take_cache(&mut self) -> Option<(KvCache, Tensor)> {
        if self.prefill.is_some() || self.fed.is_some() {
            return None;
        }
        Some((self.kv.take()?, self.mask.shallow_clone()))
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
