//! A generation block, `intervene!(model.generate(input, options) { .. })`: the graph runs alongside every forward
//! pass of a decoding loop. A module's `n`-th call is generation step `n` (step 0 is the prompt's forward pass,
//! which gives the first new token); `for step in iter(0..3) { .. }` and `for step in all() { .. }` in the block
//! address steps, and `model.generated()` is the token ids (prompt and new tokens, per row) at the end.

use super::results::TraceResults;
use super::target::TraceTarget;
use super::trace::Trace;
use super::{GraphCell, Traceable};
use crate::graph::{NodeId, Op, Value};
use crate::nn::Hook;
use crate::{Error, Result};
use tch::Tensor;

/// What can generate inside a block: a [`TraceTarget`] with a decoding loop.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot generate",
    label = "`generate` runs a decoding loop, which `LanguageModel<M>` has",
    note = "trace it instead (`intervene!(model.trace(input) {{ ... }})`), or load the model as a `LanguageModel`"
)]
pub trait GenerateTarget: TraceTarget {
    /// Decoding options (`GenerateOptions` for a language model).
    type Options: Default + Clone;
    /// The most forward passes a generation with `options` makes (what `all()` visits).
    fn max_steps(options: &Self::Options) -> usize;
    /// Decodes `batch` with `hook` seeing every module call of every forward pass; returns each row's ids
    /// (prompt and new tokens, without padding).
    fn generate_hooked(
        &self,
        batch: &Self::Prepared,
        options: &Self::Options,
        hook: &mut dyn Hook,
    ) -> Result<Vec<Vec<i64>>>;

    /// The request of a remote generation of `graph` over `inputs` with `options`; by default this model cannot
    /// generate remotely.
    fn wire_generate(
        &self,
        graph: crate::graph::Graph,
        inputs: &[Option<Self::Input>],
        options: &Self::Options,
    ) -> Result<crate::remote::Job> {
        let _ = (graph, inputs, options);
        Err(Error::InvalidInput { message: "this model cannot generate on a server".into() })
    }
}

impl<T: GenerateTarget> GenerateTarget for &T {
    type Options = T::Options;
    fn max_steps(options: &Self::Options) -> usize {
        T::max_steps(options)
    }
    fn generate_hooked(
        &self,
        batch: &Self::Prepared,
        options: &Self::Options,
        hook: &mut dyn Hook,
    ) -> Result<Vec<Vec<i64>>> {
        (**self).generate_hooked(batch, options, hook)
    }
    fn wire_generate(
        &self,
        graph: crate::graph::Graph,
        inputs: &[Option<Self::Input>],
        options: &Self::Options,
    ) -> Result<crate::remote::Job> {
        (**self).wire_generate(graph, inputs, options)
    }
}

/// One generation block: a [`Trace`] run over a decoding loop.
pub struct Generate<'m, T: GenerateTarget> {
    trace: Trace<'m, T>,
    options: T::Options,
}

impl<'m, T: GenerateTarget> Generate<'m, T> {
    /// A generation with `options` (the defaults when `None`); with an `input`, its first invoke takes it.
    pub fn new(target: &'m T, input: Option<T::Input>, options: Option<&T::Options>) -> Result<Self> {
        let order = target.call_order(input.as_ref())?;
        let trace = Trace::bare(target, order);
        let options = options.cloned().unwrap_or_default();
        trace.graph().set_max_calls(u32::try_from(T::max_steps(&options)).unwrap_or(u32::MAX));
        let generate = Generate { trace, options };
        if let Some(i) = input {
            generate.trace.invoke(Some(i))?;
        }
        Ok(generate)
    }

    /// Decodes with the graph interleaved (on the server, when the block or the model names one); returns the
    /// saved values.
    pub fn run(&self) -> Result<TraceResults> {
        let tr = &self.trace;
        let inputs = tr.take_inputs("generate")?;
        let builder = tr.graph().inner.borrow();
        crate::graph::note_run(&builder.graph);
        if let Some(remote) = tr.remote_target() {
            let job = tr.target().wire_generate(builder.graph.clone(), &inputs, &self.options)?;
            return remote.run(job).map(TraceResults::from);
        }
        run_generate(tr.target(), &builder.graph, &inputs, &self.options, None).map(TraceResults::from)
    }

    /// Runs this block on a server instead of here.
    pub fn remote(&self, server: &crate::remote::Remote) {
        self.trace.remote(server);
    }
}

/// Runs `graph` over a decoding loop of `target` on the invokes' `inputs`; `watch` as in
/// [`super::trace::run_trace`].
pub fn run_generate<T: GenerateTarget>(
    target: &T,
    graph: &crate::graph::Graph,
    inputs: &[Option<T::Input>],
    options: &T::Options,
    watch: Option<&dyn Fn() -> Result<()>>,
) -> Result<crate::interleave::Finished> {
    let (batch, mut inter) = super::trace::started(target, graph, inputs)?;
    if !inter.all_stopped() {
        let _no_grad = tch::no_grad_guard();
        let mut watched;
        let hook: &mut dyn Hook = match watch {
            Some(w) => {
                watched = super::trace::Watched { inner: &mut inter, watch: w };
                &mut watched
            }
            None => &mut inter,
        };
        let run = target.generate_hooked(&batch, options, hook);
        match run {
            Ok(ids) => {
                // `model.generated()`: the ids as one event, right-padded with -1 (no token has that id).
                let width = ids.iter().map(Vec::len).max().unwrap_or(0);
                let flat: Vec<i64> = ids
                    .iter()
                    .flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(-1, width - r.len())))
                    .collect();
                let t = Tensor::from_slice(&flat).reshape([ids.len() as i64, width as i64]);
                inter.provide_generated(&t)?;
            }
            Err(Error::Stopped) => {}
            Err(e) => return Err(e),
        }
    }
    inter.finish_all()
}

impl<'m, T: GenerateTarget> std::ops::Deref for Generate<'m, T> {
    type Target = Trace<'m, T>;
    fn deref(&self) -> &Trace<'m, T> {
        &self.trace
    }
}

/// The token ids of a generation (`model.generated()`), one row per batch entry of the invoke: prompt tokens and
/// new tokens, without padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// Each row's ids.
    pub rows: Vec<Vec<i64>>,
}

impl Generated {
    /// The only row (an invoke of one prompt); an error naming the count otherwise.
    pub fn row(&self) -> Result<&[i64]> {
        match self.rows.as_slice() {
            [r] => Ok(r),
            other => Err(Error::InvalidInput { message: format!("generated() has {} rows, not one", other.len()) }),
        }
    }
}

impl super::FromValue for Generated {
    fn from_value(v: Value) -> Result<Self> {
        let t = v.tensor()?;
        let (n, w) = (t.size()[0], t.size().get(1).copied().unwrap_or(0));
        let flat = Vec::<i64>::try_from(t.reshape([-1])).map_err(|e| Error::torch("generated", e))?;
        let rows = (0..n as usize)
            .map(|i| flat[i * w as usize..(i + 1) * w as usize].iter().copied().take_while(|&x| x >= 0).collect())
            .collect();
        Ok(Generated { rows })
    }
}

/// `model.generated()` inside a generation block: the token ids at the end ([`Op::Generated`]).
pub fn generated(g: &GraphCell) -> super::Proxy<'_, Generated> {
    let id: NodeId = g.push(Op::Generated);
    super::Proxy::new(id, g)
}

impl<'m, T: GenerateTarget> Generate<'m, T> {
    /// The root envoy: `model` inside the block.
    pub fn root(&self) -> &'m <T::Root as Traceable>::Envoy {
        self.trace.root()
    }
}
