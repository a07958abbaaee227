//! Procedural macros of nnsight for Rust: `#[derive(Traceable)]` describes a module tree (typed envoys, dotted
//! paths, hook plumbing); `intervene!` rewrites a block over model paths into graph-construction code.
//!
//! Use them through the `nnsight` crate (`nnsight::prelude::*`), which re-exports them.

mod derive;

/// Derives `nnsight::nn::Module` and `nnsight::Traceable` for a struct of submodules, and writes its envoy type
/// (`{Struct}Envoy`): a field per submodule plus the hook points `output`, `input` and `inputs`.
///
/// Field attributes: `#[traceable(path)]` on the `String` holding the module's dotted path (required),
/// `#[traceable(param)]` on parameter tensors (`Tensor` or `Option<Tensor>`), `#[traceable(skip)]` on anything
/// else that is not a submodule. Every other field is a submodule: a traceable module, or a `ModuleList<T>`,
/// `Vec<T>` or `Option<T>` of them. Struct attributes: `#[traceable(kind = "Name")]` (the type name printed in
/// the module tree), `#[traceable(describe = "method")]` (a `fn(&self) -> String` printed after it).
/// The struct must also implement `nnsight::nn::Forward`.
#[proc_macro_derive(Traceable, attributes(traceable))]
pub fn derive_traceable(input: proc_macro::TokenStream) -> proc_macro::TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    derive::derive(input).into()
}
