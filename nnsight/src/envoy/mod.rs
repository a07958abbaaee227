//! The blocks that tie a graph to a model and hand it to a backend to run: `trace` and `scan` ([`Trace`],
//! [`Scan`]), `generate` ([`Generate`]), persistent edits ([`Edited`]), and a remote session of blocks alone sent as
//! one request ([`Session`]). What they run on ([`TraceTarget`] and
//! its kin) and how a run goes are the execution layer's ([`crate::exec`]), re-exported here. The typed handles
//! they build graphs with (envoys, hook points, proxies) live in `crate::handle` and are re-exported here too, so
//! `nnsight::envoy::Proxy` and the like keep working.

pub mod edit;
pub(crate) mod generate;
mod nnsight;
pub(crate) mod results;
pub(crate) mod session;
pub(crate) mod trace;

pub use crate::exec::{EditList, GenerateTarget, Prepared, ScanTarget, TraceTarget};
pub use crate::handle::*;
pub use edit::{EditBlock, Editable, Edited, IntoEditBlock};
pub use generate::{Generate, Generated};
pub use nnsight::NNsight;
pub use results::{
    Cache, CacheOptions, FinishPlain, FinishSaved, FinishUnsaved, FromValue, NotSaved, SavedInsideTheBlock,
    SavedValues, TraceResults, UnsavedUse,
};
pub use session::{Session, SessionResults};
pub use trace::{Scan, Trace};
