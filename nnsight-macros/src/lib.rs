//! Procedural macros of nnsight for Rust.
//!
//! `intervene!` and `#[derive(Traceable)]` arrive with the eDSL issue; this crate is in place so that the
//! workspace layout, and the runtime's re-exports, are fixed from the start.
