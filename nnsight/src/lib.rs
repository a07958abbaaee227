//! # nnsight for Rust
//!
//! Read and change the internals of neural networks while they run. This crate is the runtime: models whose every
//! submodule call goes through one hook point ([`nn::Ctx::call`]), loaders for Hugging Face folders and GGUF files,
//! and [`LanguageModel`], a tokenizer and a model on a device.
//!
//! ```no_run
//! use nnsight::prelude::*;
//!
//! # fn main() -> nnsight::Result<()> {
//! let model = LanguageModel::<Llama>::load("models/SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let logits = model.forward("The Eiffel Tower is in the city of")?; // [1, seq, vocab]
//! println!("{:?}", logits.size());
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

// Generated code names this crate `::nnsight`, also inside it.
extern crate self as nnsight;

pub mod autograd;
pub mod das;
pub mod envoy;
pub mod error;
pub mod exec;
pub mod function;
pub mod function_vectors;
pub mod generate;
pub mod graph;
pub mod handle;
pub mod interleave;
pub mod load;
pub mod meta;
pub mod models;
pub mod nn;
pub mod patching;
#[cfg(feature = "plot")]
pub mod plot;
pub mod remote;
pub mod sae;
pub mod steering;

mod ffi;
mod language_model;
mod progress;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use envoy::{Editable, Edited, NNsight};
pub use error::{Error, Result};
pub use exec::Batching;
pub use generate::{GenerateOptions, GeneratedRow, Generation, OnToken, StepTokens, TextStream};
pub use handle::{Proxy, Saved, Traceable};
pub use language_model::{Generator, LanguageModel, LoadOptions, SharedModel};
pub use load::{default_model, DEFAULT_MODEL_FILE};
pub use models::batch::{Batch, Input};
pub use nnsight_macros::{function, intervene, Traceable};
/// The `tch` crate this runtime is built on (libtorch 2.13), re-exported so that a crate depending on nnsight alone
/// can name its types and functions (`nnsight::tch::set_num_threads(1)`) at the matching version.
pub use tch;

/// What a program using nnsight needs in scope.
pub mod prelude {
    pub use crate::envoy::UnsavedUse as _;
    pub use crate::envoy::{cat, stack, Cache, CacheOptions, NewAxis, Proxy, Saved};
    pub use crate::models::{
        gemma2::Gemma2, gemma3::Gemma3, gpt2::Gpt2, gpt_neox::GptNeoX, llama::Llama, phi3::Phi3, qwen2::Qwen2,
        qwen3::Qwen3, AutoModel, CausalLm,
    };
    pub use crate::{
        intervene, Batching, Editable, Edited, GenerateOptions, Input, LanguageModel, LoadOptions, NNsight, Traceable,
    };
    pub use crate::{Generation, StepTokens, TextStream};
    pub use tch::{Device, IndexOp, Kind, Tensor};
}

/// The README's examples, compiled (and run where they can) as doctests.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
