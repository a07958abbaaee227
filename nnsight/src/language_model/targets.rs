//! What makes a [`LanguageModel`] a target of every block: a trace and a scan ([`TraceTarget`], [`ScanTarget`]),
//! a generation ([`GenerateTarget`]), edits ([`Editable`], and an edited model's `forward` and `generate`).

use super::LanguageModel;
use crate::envoy::{CallOrder, Editable, Edited, Generated};
use crate::exec::{
    Backend, Batching, EditHook, EditList, GenerateBackend, GenerateTarget, Here, OrderRecorder, PassThrough,
    ScanTarget, TraceTarget,
};
use crate::graph::Graph;
use crate::models::batch::{Batch, Input};
use crate::models::{CausalLm, StandardEnvoy};
use crate::nn::{Ctx, Hook};
use crate::GenerateOptions;
use crate::Result;
use std::sync::Arc;
use tch::{Device, Tensor};

impl Generated {
    /// Each row decoded to text (prompt and continuation).
    pub fn texts<M: CausalLm>(&self, model: &LanguageModel<M>) -> Result<Vec<String>> {
        self.rows.iter().map(|r| model.decode(r)).collect()
    }
}

impl<M: CausalLm> TraceTarget for LanguageModel<M> {
    type Root = M;
    type Input = Input;
    type Prepared = Batch;
    type View = StandardEnvoy<M::Envoy>;

    fn root(&self) -> &M {
        &self.model
    }

    /// The architecture's envoy with the standard names beside it.
    fn view(&self) -> &StandardEnvoy<M::Envoy> {
        self.envoy.get_or_init(|| StandardEnvoy::new(self.model.envoy(), &self.model.standard_names()))
    }

    fn call_order(&self, _sample: Option<&Input>) -> Result<Option<Arc<CallOrder>>> {
        // The order of module calls does not depend on the tokens: record it once on a one-token pass (on shapes
        // alone for a handle without weights).
        Ok(OrderRecorder::record_once(&self.order, |hook| {
            let mut batch = Batch::from_rows(&[vec![0]], 0, self.device)?;
            if self.remote.is_some() {
                batch = batch.to_meta()?;
            }
            self.model.run(&mut Ctx::with_hook(hook), &batch).map(|_| ())
        }))
    }

    fn prepare(&self, inputs: &[Option<Input>]) -> Result<crate::exec::Prepared<Batch>> {
        let mut all: Vec<Vec<i64>> = Vec::new();
        let mut spans = Vec::with_capacity(inputs.len());
        for input in inputs {
            match input {
                Some(i) => {
                    let rows = self.rows_of(i.clone())?;
                    spans.push(Some((all.len() as i64, rows.len() as i64)));
                    all.extend(rows);
                }
                None => spans.push(None),
            }
        }
        let total = all.len() as i64;
        let pad = self.special.pad.or(self.special.eos).unwrap_or(0) as i64;
        let batch = Batch::from_rows(&all, pad, self.device)?;
        Ok((batch, spans.into_iter().map(|s| s.unwrap_or((0, total))).collect(), total))
    }

    fn forward_hooked(&self, batch: &Batch, hook: &mut dyn Hook) -> Result<()> {
        self.model.run(&mut Ctx::with_hook(hook), batch).map(|_| ())
    }

    fn edits(&self) -> Vec<Arc<Graph>> {
        self.edits.snapshot()
    }

    /// The server of a connected handle, else here.
    fn backend(&self) -> &dyn Backend<Input> {
        match &self.remote {
            Some(r) => r,
            None => &Here,
        }
    }

    fn batching(&self) -> Batching {
        LanguageModel::batching(self)
    }

    /// The decoder layers of the standard names (`model.layers.0`, ...): each takes the previous one's hidden
    /// state and the pass's masks and positions, which every row of a pass computes for itself.
    fn layer_paths(&self) -> Option<Vec<String>> {
        let names = self.model.standard_names();
        Some((0..names.n_layers).map(|i| format!("{}.{i}", names.layers)).collect())
    }

    fn distinct_rows(&self, batch: &Batch) -> Result<Option<(Batch, Vec<i64>)>> {
        batch.distinct_rows()
    }

    /// The unembedding and the root (whose output is the logits, after any final soft cap).
    fn head_paths(&self) -> Option<Vec<String>> {
        Some(vec![String::new(), self.model.standard_names().unembed.to_string()])
    }

    fn last_position_only(&self, batch: &mut Batch) {
        batch.last_logits_only = true;
    }
}

impl<M: CausalLm> ScanTarget for LanguageModel<M> {
    fn scan_root(&self) -> Result<&M> {
        self.meta_model()
    }

    fn scan_call_order(&self) -> Result<Option<Arc<CallOrder>>> {
        // Recorded on the twin (the order is the architecture's): a scan runs nothing real.
        let twin = self.meta_model()?;
        Ok(OrderRecorder::record_once(&self.order, |hook| {
            let batch = Batch::from_rows(&[vec![0]], 0, Device::Cpu)?.to_meta()?;
            twin.run(&mut Ctx::with_hook(hook), &batch).map(|_| ())
        }))
    }

    fn forward_scan(&self, batch: &Batch, hook: &mut dyn Hook) -> Result<()> {
        let twin = self.meta_model()?;
        let batch = batch.to_meta()?;
        twin.run(&mut Ctx::with_hook(hook), &batch).map(|_| ())
    }
}

impl<M: CausalLm> Editable for LanguageModel<M> {
    fn edit_list(&self) -> &EditList {
        &self.edits
    }
}

/// BOS, EOS and padding ids from a `config.json` (an `eos_token_id` list gives its first id).
impl<M: crate::models::CausalLm> Edited<'_, crate::LanguageModel<M>> {
    /// A forward pass with the edits applied: logits `[batch, seq, vocab]`.
    pub fn forward(&self, input: impl Into<crate::models::batch::Input>) -> Result<Tensor> {
        if let Some(remote) = self.base.server() {
            let rows = self.base.rows_of(input.into())?;
            return crate::LanguageModel::<M>::remote_logits(remote, rows, wire(&self.edits()));
        }
        let batch = self.base.batch(input)?;
        let own = self.edits.snapshot();
        let mut pass = PassThrough;
        let mut hook = EditHook::new(&own, self.base.model(), false, &mut pass)?;
        self.base.forward_with_hook(&batch, &mut hook)
    }

    /// A generation with the edits applied at every step (see [`crate::LanguageModel::generate`]).
    pub fn generate(
        &self,
        input: impl Into<crate::models::batch::Input>,
        options: &crate::GenerateOptions,
    ) -> Result<crate::Generation> {
        if let Some(remote) = self.base.server() {
            return self.base.generate_remote(remote, input.into(), options, wire(&self.edits()), &mut |_| Ok(()));
        }
        let batch = self.base.batch(input)?;
        let own = self.edits.snapshot();
        let mut pass = PassThrough;
        let mut hook = EditHook::new(&own, self.base.model(), false, &mut pass)?;
        self.base.generate_hooked(&batch, options, &mut hook, &mut |_| Ok(()))
    }
}

impl<M: CausalLm> GenerateTarget for LanguageModel<M> {
    type Options = GenerateOptions;

    fn max_steps(options: &GenerateOptions) -> usize {
        options.max_new_tokens
    }

    fn generate_hooked(&self, batch: &Batch, options: &GenerateOptions, hook: &mut dyn Hook) -> Result<Vec<Vec<i64>>> {
        let generation = self.decode_hooked(batch, options, hook)?;
        Ok(generation.rows.iter().map(|r| r.ids()).collect())
    }

    /// The server of a connected handle, else here.
    fn generate_backend(&self) -> &dyn GenerateBackend<Input, GenerateOptions> {
        match &self.remote {
            Some(r) => r,
            None => &Here,
        }
    }
}

/// Edits as a request carries them.
pub(crate) fn wire(edits: &[Arc<Graph>]) -> Vec<Graph> {
    edits.iter().map(|g| Graph::clone(g)).collect()
}
