//! How a generation decodes ([`GenerateOptions`]) and the callback that streams its tokens ([`OnToken`]).

use super::StepTokens;
use crate::{Error, Result};

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
