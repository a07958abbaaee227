//! A generation block, `intervene!(model.generate(input, options) { .. })`: the graph runs alongside every forward
//! pass of a decoding loop. A module's `n`-th call is generation step `n` (step 0 is the prompt's forward pass,
//! which gives the first new token); `for step in iter(0..3) { .. }` and `for step in all() { .. }` in the block
//! address steps, and `model.generated()` is the token ids (prompt and new tokens, per row) at the end.

use super::results::TraceResults;
use super::trace::Trace;
use super::GraphCell;
use crate::exec::{GenerateBackend, GenerateTarget, Program, TraceTarget};
use crate::graph::{NodeId, Op, Value};
use crate::{Error, Result};

/// A block's own place to generate (`.remote(..)`).
type OwnBackend<T> = Box<dyn GenerateBackend<<T as TraceTarget>::Input, <T as GenerateTarget>::Options>>;

/// One generation block: a [`Trace`] run over a decoding loop.
pub struct Generate<'m, T: GenerateTarget> {
    trace: Trace<'m, T>,
    options: T::Options,
    /// Where the block runs when it names a place itself (`.remote(..)`); else where the target generates.
    backend: std::cell::RefCell<Option<OwnBackend<T>>>,
}

impl<'m, T: GenerateTarget> Generate<'m, T> {
    /// A generation with `options` (the defaults when `None`); with an `input`, its first invoke takes it.
    pub fn new(target: &'m T, input: Option<T::Input>, options: Option<&T::Options>) -> Result<Self> {
        let order = target.call_order(input.as_ref())?;
        let trace = Trace::bare(target, order);
        let options = options.cloned().unwrap_or_default();
        trace.graph().set_max_calls(u32::try_from(T::max_steps(&options)).unwrap_or(u32::MAX));
        let generate = Generate { trace, options, backend: std::cell::RefCell::new(None) };
        if let Some(i) = input {
            generate.trace.invoke(Some(i))?;
        }
        Ok(generate)
    }

    /// Decodes with the graph interleaved, through the block's backend (its server, else the target's); returns
    /// the saved values.
    pub fn run(&self) -> Result<TraceResults> {
        let tr = &self.trace;
        let inputs = tr.take_inputs("generate")?;
        let builder = tr.graph().inner.borrow();
        crate::graph::note_run(&builder.graph);
        let own = self.backend.borrow();
        let backend = own.as_deref().unwrap_or_else(|| tr.target().generate_backend());
        let program = Program { graph: &builder.graph, live: Some(&builder.live) };
        backend.generate(tr.target(), program, &inputs, &self.options).map(TraceResults::from)
    }

    /// Runs this block on a server instead of here.
    pub fn remote(&self, server: &crate::remote::Remote)
    where
        crate::remote::Remote: GenerateBackend<T::Input, T::Options>,
    {
        *self.backend.borrow_mut() = Some(Box::new(server.clone()));
    }
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
    /// The decoding options.
    pub(crate) fn options(&self) -> &T::Options {
        &self.options
    }

    /// The root envoy: `model` inside the block.
    pub fn root(&self) -> &'m T::View {
        self.trace.root()
    }
}
