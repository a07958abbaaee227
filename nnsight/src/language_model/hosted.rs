//! A [`LanguageModel`] as a server hosts it ([`Hosted`]): it runs a request's job here and describes itself to
//! clients (configuration, tokenizer, parameter shapes); and [`SharedModel`], one loaded model that several worker
//! threads run jobs on at once.

use super::LanguageModel;
use crate::exec::{run_job, Job, Watch};
use crate::interleave::Finished;
use crate::models::CausalLm;
use crate::remote::{Arrivals, Hosted, Joining, ModelInfo};
use crate::{Error, Result};
use std::sync::{Arc, RwLock};

impl<M: CausalLm + 'static> Hosted for LanguageModel<M>
where
    LanguageModel<M>: Send,
{
    fn run_job(&self, job: &Job, watch: Watch<'_>) -> Result<Finished> {
        run_job(self, job, Some(watch))
    }

    fn batch_shape(&self, job: &Job) -> Option<(usize, usize)> {
        let (Job::Trace { inputs, .. } | Job::Generate { inputs, .. }) = job else { return None };
        let (mut rows, mut len) = (0, 0);
        for input in inputs {
            for row in self.rows_of(input.clone()?).ok()? {
                rows += 1;
                len = len.max(row.len());
            }
        }
        Some((rows, len))
    }

    fn describe(&self, name: &str) -> Result<ModelInfo> {
        let parameters = crate::nn::named_parameters(self.model())
            .into_iter()
            .map(|(n, t)| (n, t.size(), crate::graph::value::kind_name(t.kind()).to_string()))
            .collect();
        Ok(ModelInfo {
            name: name.to_string(),
            architecture: crate::models::by_model_type(self.config.model_type()?)?.name.to_string(),
            config: self.config_json().clone(),
            tokenizer: self
                .tokenizer()
                .to_string(false)
                .map_err(|e| Error::Tokenizer { message: format!("cannot describe the tokenizer: {e}") })?,
            special: *self.special_tokens(),
            parameters,
        })
    }

    fn joins(&self, job: &Job) -> bool {
        self.joins_continuous(job)
    }

    fn run_generations(&self, first: Vec<Joining>, arrivals: &mut dyn Arrivals) -> Vec<Joining> {
        self.run_continuous(first, arrivals);
        Vec::new()
    }
}

/// One loaded model that several worker threads run jobs on at once (`nnsight serve --workers N` keeps one copy
/// of the weights this way): clones are handles of the same model.
///
/// Jobs that take gradients (a `.backward()`, a `.grad` read, a parameter's gradient) change the state of the
/// parameters while they run (a parameter made to require grad, gradients accumulated), so they run alone: each
/// holds the model exclusively; every other job holds it shared and only reads it.
pub struct SharedModel<M: CausalLm + 'static>(Arc<Shared<M>>);

struct Shared<M: CausalLm + 'static> {
    model: LanguageModel<M>,
    /// Shared by jobs that only read the model, exclusive for jobs that take gradients.
    gate: RwLock<()>,
}

// SAFETY: `Shared` is reached only through `SharedModel`'s `Hosted` methods, which take `&self` and run jobs under
// `gate`. A `LanguageModel` is not `Sync` because a `tch::Tensor` is not: tch cannot know whether a tensor is
// written. Here the weights are only read while the gate is shared: a forward pass reads every parameter and
// writes none (in-place ops write only tensors the pass allocated: a KV cache, a hook's copy), and libtorch allows
// reads of one tensor (its data, its metadata, its atomic reference count) from several threads at once. The jobs
// that change a parameter's state (`requires_grad` set for a gradient read and put back at the end, `.grad`
// accumulated by a backward) hold the gate exclusively. What else in a `LanguageModel` changes after loading is
// behind locks or is per thread: the persistent edits and the batching settings are `RwLock`s (a `SharedModel`
// offers no way to change them), the envoy tree, call order and meta twin are `OnceLock`s, the linear kernel
// choices a `Mutex`, and autograd's grad mode, the value cap and the `log!`/`send!` receivers are thread-locals.
// The tokenizer (`tokenizers::Tokenizer`) is `Sync`.
unsafe impl<M: CausalLm + 'static> Sync for Shared<M> {}

impl<M: CausalLm + 'static> SharedModel<M> {
    /// Shares `model` between the handles cloned from this one.
    pub fn new(model: LanguageModel<M>) -> Self {
        SharedModel(Arc::new(Shared { model, gate: RwLock::new(()) }))
    }
}

impl<M: CausalLm + 'static> Clone for SharedModel<M> {
    fn clone(&self) -> Self {
        SharedModel(self.0.clone())
    }
}

/// Whether `job` changes the parameters' state while it runs (it takes gradients).
fn takes_gradients(job: &Job) -> bool {
    use crate::graph::Op;
    job.graphs().any(|g| {
        g.nodes.iter().any(|n| {
            matches!(n.op, Op::Backward { .. } | Op::Grad { .. } | Op::ParamGrad { .. } | Op::GradWrite { .. })
        })
    })
}

impl<M: CausalLm + 'static> Hosted for SharedModel<M>
where
    LanguageModel<M>: Send,
{
    fn run_job(&self, job: &Job, watch: Watch<'_>) -> Result<Finished> {
        let shared = &self.0;
        if takes_gradients(job) {
            let _alone = shared.gate.write().unwrap_or_else(|p| p.into_inner());
            shared.model.run_job(job, watch)
        } else {
            let _reading = shared.gate.read().unwrap_or_else(|p| p.into_inner());
            shared.model.run_job(job, watch)
        }
    }

    fn describe(&self, name: &str) -> Result<ModelInfo> {
        self.0.model.describe(name)
    }

    fn batch_shape(&self, job: &Job) -> Option<(usize, usize)> {
        self.0.model.batch_shape(job)
    }

    fn joins(&self, job: &Job) -> bool {
        self.0.model.joins(job)
    }

    /// Holds the model shared (reading) while the continuous batch runs, and lets go of it while `arrivals` is
    /// asked for jobs (which may run other jobs there, each taking the gate itself, and lets a waiting gradient
    /// job have the model between two steps).
    fn run_generations(&self, first: Vec<Joining>, arrivals: &mut dyn Arrivals) -> Vec<Joining> {
        let gate = &self.0.gate;
        let mut gated = Gated { inner: arrivals, gate, held: Some(gate.read().unwrap_or_else(|p| p.into_inner())) };
        self.0.model.run_generations(first, &mut gated)
    }
}

/// A continuous batch's [`Arrivals`] behind a [`SharedModel`]'s gate: held shared during the steps, let go while
/// the source is asked for jobs.
struct Gated<'g, 'a> {
    inner: &'a mut dyn Arrivals,
    gate: &'g RwLock<()>,
    held: Option<std::sync::RwLockReadGuard<'g, ()>>,
}

impl Arrivals for Gated<'_, '_> {
    fn poll(&mut self, running_rows: usize) -> Vec<Joining> {
        self.held = None;
        let jobs = self.inner.poll(running_rows);
        self.held = Some(self.gate.read().unwrap_or_else(|p| p.into_inner()));
        jobs
    }

    fn stepped(&mut self, rows: usize) {
        self.inner.stepped(rows);
    }
}
