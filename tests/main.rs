//! Integration tests of the runtime, one crate with a module per area (linking libtorch once).

mod common;
mod parity_smollm2;
mod tiny_models;
mod loading_errors;
