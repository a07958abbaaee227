//! Remote execution: serve models on one machine, trace them from another.
//!
//! A block's graph is data: the server runs only the ops it knows (and the `#[nnsight::function]`s compiled into
//! it), never code of the client's. [`Server`] hosts loaded models over HTTP; [`Remote`] names a model on a server;
//! `intervene!(model.trace(input).remote(&server) { .. })` (and `generate`, `session`) runs a block there, and
//! [`crate::LanguageModel::connect`] makes a handle of a served model without its weights, whose every block runs
//! there. [`protocol`] is the wire format, [`execute`] what a worker does with a job.

pub mod client;
pub mod execute;
pub mod protocol;
pub mod server;
pub mod wire;

pub use client::{Remote, KEY_VARIABLE};
pub use execute::{Arrivals, Hosted, Joining, Limits};
pub use protocol::{Job, Request, PROTOCOL_VERSION};
pub use server::{BatchCounters, CoBatch, JobQueue, LocalQueue, RedisOptions, RedisQueue, ServeOptions, Server};
pub use wire::{JobState, JobStatus, ModelInfo, WireError};
