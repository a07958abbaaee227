//! The blocks that tie a graph to a model and run it: `trace` and `scan` ([`Trace`], [`Scan`]), `generate`
//! ([`Generate`]) and persistent edits ([`Edited`]). The typed handles they build graphs with (envoys, hook points,
//! proxies) live in `crate::handle` and are re-exported here, so `nnsight::envoy::Proxy` and the like keep working.

pub mod edit;
pub(crate) mod generate;
pub(crate) mod trace;

pub use crate::handle::*;
pub use edit::{EditBlock, EditList, Editable, Edited, IntoEditBlock};
pub use generate::{Generate, GenerateTarget, Generated};
pub use trace::{
    Cache, CacheOptions, FinishPlain, FinishSaved, FinishUnsaved, FromValue, NNsight, NotSaved, Prepared,
    SavedInsideTheBlock, Scan, ScanTarget, Trace, TraceResults, TraceTarget, UnsavedUse,
};
