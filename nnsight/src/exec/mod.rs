//! Execution: what runs a block's graph, below the blocks that build it and the server that receives it.
//!
//! - [`target`]: what a graph runs on ([`TraceTarget`], [`ScanTarget`], [`GenerateTarget`]).
//! - [`batching`]: how a trace's invokes become forward passes (chunks of at most so many rows, shared prefixes).
//! - [`run`]: local execution, a graph interleaved with a forward pass, a decoding loop or a meta twin.
//! - [`edits`]: persistent edits at run time ([`EditList`], the [`EditHook`] chain).
//! - [`backend`]: where a block runs ([`Backend`]): [`Here`], or a server's client, which implements it too.
//! - [`job`]: a [`Job`] (what a request carries) and its local execution on a server's model ([`run_job`]).
//! - [`session`]: a session's blocks as one job ([`Job::Session`]): values crossing blocks on the server.
//! - [`merge`]: several trace jobs as one trace and its results split back per job (a server's co-batching).

pub mod backend;
pub mod batching;
pub mod edits;
pub mod job;
pub mod merge;
pub mod run;
pub mod session;
pub mod target;

pub use backend::{Backend, GenerateBackend, Here, LocalGenerateTarget, LocalTarget};
pub use batching::{last_passes, with_batching, Batching, PassInfo};
pub use edits::{EditHook, EditList, PassThrough};
pub use job::{run_job, Job};
pub use run::{run_generate, run_scan, run_trace, Program, Watch};
pub use session::{Import, SessionBlock};
pub(crate) use target::OrderRecorder;
pub use target::{GenerateTarget, Prepared, ScanTarget, TraceTarget};
