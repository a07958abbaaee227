//! Generation on a [`LanguageModel`]: `generate`, `generate_stream`, the step-by-step [`Generator`], a generation
//! with a hook of one's own, a generation on the server a connected handle names, and the text of what was
//! generated. The decoding loop itself (options, sampling, the KV-cache steps) is `crate::generate`'s.

use super::LanguageModel;
use crate::generate::Decoder;
use crate::models::batch::{Batch, Input};
use crate::models::CausalLm;
use crate::nn::Hook;
use crate::{Error, GenerateOptions, GeneratedRow, Generation, Result, StepTokens, TextStream};

impl GeneratedRow {
    /// The text of prompt and new tokens.
    pub fn text<M: CausalLm>(&self, model: &LanguageModel<M>) -> Result<String> {
        model.decode(&self.ids())
    }
    /// The text of the new tokens.
    pub fn new_text<M: CausalLm>(&self, model: &LanguageModel<M>) -> Result<String> {
        model.decode(&self.new_ids)
    }
}

impl Generation {
    /// The text (prompt and continuation) of every row.
    pub fn texts<M: CausalLm>(&self, model: &LanguageModel<M>) -> Result<Vec<String>> {
        self.rows.iter().map(|r| r.text(model)).collect()
    }
    /// The continuation of every row.
    pub fn new_texts<M: CausalLm>(&self, model: &LanguageModel<M>) -> Result<Vec<String>> {
        self.rows.iter().map(|r| r.new_text(model)).collect()
    }
}

impl TextStream {
    /// Adds `token`; returns the text that became printable (often the token's text, sometimes empty).
    pub fn push<M: CausalLm>(&mut self, model: &LanguageModel<M>, token: i64) -> Result<String> {
        self.push_with(|ids| model.decode(ids), token)
    }

    /// What is still held back at the end (an unfinished character shows as `\u{FFFD}`): print it once the
    /// generation is over.
    pub fn finish<M: CausalLm>(&mut self, model: &LanguageModel<M>) -> Result<String> {
        self.finish_with(|ids| model.decode(ids))
    }
}

/// The iterator form of generation ([`LanguageModel::generator`]): each `next` runs one forward and yields its
/// [`StepTokens`]; an error ends the iteration after it is yielded.
pub struct Generator<'m, M: CausalLm> {
    model: &'m LanguageModel<M>,
    decoder: Decoder,
}

impl<M: CausalLm> Generator<'_, M> {
    /// What was generated so far.
    pub fn generation(&self) -> Generation {
        self.decoder.generation()
    }
    /// What was generated, once the iteration is over (or so far, if it is not).
    pub fn finish(self) -> Generation {
        self.decoder.generation()
    }
}

impl<M: CausalLm> Iterator for Generator<'_, M> {
    type Item = Result<StepTokens>;
    fn next(&mut self) -> Option<Result<StepTokens>> {
        let (model, decoder) = (self.model, &mut self.decoder);
        model.edited_step(decoder, None).transpose()
    }
}

impl<M: CausalLm> LanguageModel<M> {
    /// Generates a continuation of each prompt of `input` with a KV cache: greedy by default, sampled with
    /// `options.do_sample`. Several prompts run as one left-padded batch; each row's tokens are those of its solo
    /// run.
    pub fn generate(&self, input: impl Into<Input>, options: &GenerateOptions) -> Result<Generation> {
        self.generate_stream(input, options, |_| Ok(()))
    }

    /// [`LanguageModel::generate`], calling `on_token` with each step's tokens as they come (an `Err` from it ends
    /// the generation and is returned).
    pub fn generate_stream(
        &self,
        input: impl Into<Input>,
        options: &GenerateOptions,
        mut on_token: impl FnMut(&StepTokens) -> Result<()>,
    ) -> Result<Generation> {
        if let Some(remote) = self.server() {
            let edits = super::targets::wire(&self.edits.snapshot());
            return self.generate_remote(remote, input.into(), options, edits, &mut on_token);
        }
        let batch = self.batch(input)?;
        let mut decoder = Decoder::new(self.model(), self.special_tokens(), &batch, options)?;
        while let Some(tokens) = self.edited_step(&mut decoder, None)? {
            on_token(&tokens)?;
        }
        Ok(decoder.generation())
    }

    /// A generation on the server a connected handle names, with `edits` applied there: one job; each step's
    /// tokens are handed to the callbacks once it is back.
    pub(crate) fn generate_remote(
        &self,
        remote: &crate::remote::Remote,
        input: Input,
        options: &GenerateOptions,
        edits: Vec<crate::graph::Graph>,
        on_token: &mut dyn FnMut(&StepTokens) -> Result<()>,
    ) -> Result<Generation> {
        use crate::graph::{Graph, Op};
        let prompts = self.rows_of(input)?;
        let mut graph = Graph::default();
        let read = graph.push(Op::Generated, 0);
        graph.push(Op::Save { value: read }, 0);
        let mut sent = options.clone();
        sent.on_token = None;
        let job = crate::remote::Job::Generate {
            graph,
            inputs: vec![Some(Input::Ids(prompts.clone()))],
            options: sent,
            edits,
        };
        let mut done = remote.run(job)?;
        let ids: crate::envoy::Generated = crate::envoy::FromValue::from_value(
            done.values.remove(&read).ok_or_else(|| Error::Remote { message: "the server sent no tokens".into() })?,
        )?;
        let stops: Vec<i64> = match &options.stop_ids {
            Some(s) => s.clone(),
            None => self.special_tokens().eos.map(i64::from).into_iter().collect(),
        };
        let rows: Vec<GeneratedRow> = prompts
            .iter()
            .zip(&ids.rows)
            .map(|(p, all)| {
                let new_ids = all.get(p.len()..).unwrap_or_default().to_vec();
                let stopped = new_ids.last().is_some_and(|t| stops.contains(t));
                GeneratedRow { prompt_ids: p.clone(), new_ids, stopped }
            })
            .collect();
        let steps = rows.iter().map(|r| r.new_ids.len()).max().unwrap_or(0);
        for step in 0..steps {
            let tokens = StepTokens {
                step,
                tokens: rows.iter().map(|r| r.new_ids.get(step).copied()).collect(),
                stopped: rows.iter().map(|r| r.stopped && step + 1 >= r.new_ids.len()).collect(),
            };
            if let Some(f) = &options.on_token {
                f.call(&tokens)?;
            }
            on_token(&tokens)?;
        }
        Ok(Generation { rows, steps })
    }

    /// The iterator form: each item is one step's tokens.
    pub fn generator(&self, input: impl Into<Input>, options: &GenerateOptions) -> Result<Generator<'_, M>> {
        self.refuse_if_connected("the step-by-step generator")?;
        let batch = self.batch(input)?;
        Ok(Generator { model: self, decoder: Decoder::new(self.model(), self.special_tokens(), &batch, options)? })
    }

    /// Generation over a prepared `batch` in which `hook` sees every module call of every forward: the prefill is
    /// step 0, each later one-token forward step 1, 2, ...; every module is called once per forward, so the n-th
    /// call of a module is step n. Each step's token is picked from the last position of the logits the root
    /// returns, after the hook could change them (`lm_head`'s and the root's outputs). `on_token` sees each step's
    /// tokens. An `Err` from the hook or from `on_token` ends generation and is returned unchanged (e.g.
    /// [`Error::Stopped`]).
    pub fn generate_hooked(
        &self,
        batch: &Batch,
        options: &GenerateOptions,
        hook: &mut dyn Hook,
        on_token: &mut dyn FnMut(&StepTokens) -> Result<()>,
    ) -> Result<Generation> {
        self.refuse_if_connected("a generation with a local hook")?;
        let mut decoder = Decoder::new(self.model(), self.special_tokens(), batch, options)?;
        while let Some(tokens) = self.edited_step(&mut decoder, Some(&mut *hook))? {
            on_token(&tokens)?;
        }
        Ok(decoder.generation())
    }

    /// [`LanguageModel::generate_hooked`] without the model's in-place edits (a block's executor puts the edits
    /// in front of `hook` itself).
    pub(crate) fn decode_hooked(
        &self,
        batch: &Batch,
        options: &GenerateOptions,
        hook: &mut dyn Hook,
    ) -> Result<Generation> {
        self.refuse_if_connected("a generation with a local hook")?;
        let mut decoder = Decoder::new(self.model(), self.special_tokens(), batch, options)?;
        while decoder.step(self.model(), Some(&mut *hook))?.is_some() {}
        Ok(decoder.generation())
    }

    /// An error for what a connected handle (no weights here) cannot do.
    fn refuse_if_connected(&self, what: &str) -> Result<()> {
        match self.server() {
            Some(r) => Err(Error::InvalidInput {
                message: format!(
                    "{what} cannot run on a handle connected to {} (its weights are there): use `generate`, `generate_stream` or an `intervene!` block",
                    r.url()
                ),
            }),
            None => Ok(()),
        }
    }

    /// One decoding step with the model's in-place edits in front of `hook`.
    fn edited_step(&self, decoder: &mut Decoder, hook: Option<&mut dyn Hook>) -> Result<Option<StepTokens>> {
        crate::exec::edits::with_edits(&self.edits, self.model(), false, hook, |h| decoder.step(self.model(), h))
    }
}
