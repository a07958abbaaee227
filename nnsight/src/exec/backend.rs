//! Where a block's graph runs: a [`Backend`]. [`Here`] runs it in this process on the target; a server's client
//! (`crate::remote::Remote`) sends it as a [`Job`](super::Job) and brings back what it saved. A block asks its
//! target for the backend ([`TraceTarget::backend`]) unless it names one itself
//! (`.remote(&server)`), and runs through it: the block never asks where it runs.

use super::run::{run_generate, run_trace, Program};
use super::target::{GenerateTarget, TraceTarget};
use crate::graph::Graph;
use crate::interleave::Finished;
use crate::Result;
use std::sync::Arc;

/// A target as a backend sees it: something that runs a graph here over inputs of type `I`, and the edits every
/// run of it applies. Every [`TraceTarget`] is one.
pub trait LocalTarget<I> {
    /// Runs `graph` here over the invokes' `inputs`, the target's edits first.
    fn run_trace_here(&self, program: Program<'_>, inputs: &[Option<I>]) -> Result<Finished>;
    /// The target's persistent edits, oldest first ([`TraceTarget::edits`]).
    fn run_edits(&self) -> Vec<Arc<Graph>>;
}

impl<T: TraceTarget> LocalTarget<T::Input> for T {
    fn run_trace_here(&self, program: Program<'_>, inputs: &[Option<T::Input>]) -> Result<Finished> {
        run_trace(self, program, inputs, &self.edits(), None)
    }
    fn run_edits(&self) -> Vec<Arc<Graph>> {
        self.edits()
    }
}

/// A generating target as a backend sees it (see [`LocalTarget`]); every [`GenerateTarget`] is one.
pub trait LocalGenerateTarget<I, O>: LocalTarget<I> {
    /// Runs `graph` here over a decoding loop with `options`, the target's edits at every step.
    fn run_generate_here(&self, program: Program<'_>, inputs: &[Option<I>], options: &O) -> Result<Finished>;
}

impl<T: GenerateTarget> LocalGenerateTarget<T::Input, T::Options> for T {
    fn run_generate_here(
        &self,
        program: Program<'_>,
        inputs: &[Option<T::Input>],
        options: &T::Options,
    ) -> Result<Finished> {
        run_generate(self, program, inputs, options, &self.edits(), None)
    }
}

/// Where a block over inputs of type `I` runs: [`Here`], or a server (`crate::remote::Remote`, for a
/// `LanguageModel`'s texts and ids).
#[diagnostic::on_unimplemented(
    message = "a block whose inputs are `{I}` cannot run on `{Self}`",
    label = "only a `LanguageModel`'s inputs (texts, token ids) travel to a server",
    note = "run the block here (without `.remote(..)`), or serve the model and trace a `LanguageModel`"
)]
pub trait Backend<I> {
    /// Runs `program` over the invokes' `inputs` on `target` (or on the server's copy of it, with its edits), and
    /// returns what it saved.
    fn trace(&self, target: &dyn LocalTarget<I>, program: Program<'_>, inputs: &[Option<I>]) -> Result<Finished>;
}

/// Where a generation block runs (see [`Backend`]); `O` is the decoding options.
#[diagnostic::on_unimplemented(
    message = "a generation whose inputs are `{I}` cannot run on `{Self}`",
    label = "only a `LanguageModel`'s generations travel to a server"
)]
pub trait GenerateBackend<I, O>: Backend<I> {
    /// Runs `graph` over a decoding loop of `target` with `options`, and returns what it saved.
    fn generate(
        &self,
        target: &dyn LocalGenerateTarget<I, O>,
        program: Program<'_>,
        inputs: &[Option<I>],
        options: &O,
    ) -> Result<Finished>;
}

/// This process: the graph runs on the target itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Here;

impl<I> Backend<I> for Here {
    fn trace(&self, target: &dyn LocalTarget<I>, program: Program<'_>, inputs: &[Option<I>]) -> Result<Finished> {
        target.run_trace_here(program, inputs)
    }
}

impl<I, O> GenerateBackend<I, O> for Here {
    fn generate(
        &self,
        target: &dyn LocalGenerateTarget<I, O>,
        program: Program<'_>,
        inputs: &[Option<I>],
        options: &O,
    ) -> Result<Finished> {
        target.run_generate_here(program, inputs, options)
    }
}
