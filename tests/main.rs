//! Integration tests of the runtime, one crate with a module per area (linking libtorch once).

mod autograd;
mod calls;
mod common;
mod corrupt_files;
mod edits;
mod error_messages;
mod generate;
mod generate_trace;
mod gguf;
mod gguf_quants;
mod gradients;
mod graph_control;
mod graph_runtime;
mod inner_points;
mod intervene;
mod layers;
mod linking;
mod loading_errors;
mod parity_smollm2;
mod remote;
mod scan;
mod session;
mod tiny_models;
mod training;
mod ui;
mod user_crate;
