//! The blocks that tie a graph to a model and run it: `trace` and `scan` ([`Trace`], [`Scan`]), `generate`
//! ([`Generate`]) and persistent edits ([`Edited`]). The typed handles they build graphs with (envoys, hook points,
//! proxies) live in `crate::handle` and are re-exported here, so `nnsight::envoy::Proxy` and the like keep working.

pub mod edit;
pub(crate) mod generate;
mod nnsight;
pub(crate) mod results;
pub(crate) mod target;
pub(crate) mod trace;

pub use crate::handle::*;
pub use edit::{EditBlock, EditList, Editable, Edited, IntoEditBlock};
pub use generate::{Generate, GenerateTarget, Generated};
pub use nnsight::NNsight;
pub use results::{
    Cache, CacheOptions, FinishPlain, FinishSaved, FinishUnsaved, FromValue, NotSaved, SavedInsideTheBlock,
    TraceResults, UnsavedUse,
};
pub use target::{Prepared, ScanTarget, TraceTarget};
pub use trace::{Scan, Trace};
