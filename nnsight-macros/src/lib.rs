//! Procedural macros of nnsight for Rust: `#[derive(Traceable)]` describes a module tree (typed envoys, dotted
//! paths, hook plumbing); `intervene!` rewrites a block over model paths into graph-construction code.
//!
//! Use them through the `nnsight` crate (`nnsight::prelude::*`), which re-exports them.

#![forbid(unsafe_code)]

mod derive;
mod function;
mod intervene;

/// Derives `nnsight::nn::Module` and `nnsight::Traceable` for a struct of submodules, and writes its envoy type
/// (`{Struct}Envoy`): a field per submodule plus the hook points `output`, `input` and `inputs`.
///
/// Field attributes: `#[traceable(path)]` on the `String` holding the module's dotted path (required),
/// `#[traceable(param)]` on parameter tensors (`Tensor` or `Option<Tensor>`), `#[traceable(skip)]` on anything
/// else that is not a submodule. Every other field is a submodule: a traceable module, or a `ModuleList<T>`,
/// `Vec<T>` or `Option<T>` of them. Struct attributes: `#[traceable(kind = "Name")]` (the type name printed in
/// the module tree), `#[traceable(describe = "method")]` (a `fn(&self) -> String` printed after it),
/// `#[traceable(points(query, probs))]` (inner hook points: named values inside the forward, each an envoy field
/// whose `.output` reads and writes like a module's; the forward passes them through `Ctx::point` when
/// `Ctx::wants_points` says so). The struct must also implement `nnsight::nn::Forward`.
#[proc_macro_derive(Traceable, attributes(traceable))]
pub fn derive_traceable(input: proc_macro::TokenStream) -> proc_macro::TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    derive::derive(input).into()
}

/// A trace block: `intervene!(model.trace(input) { ... })`, or `intervene!(model.trace() { invoke(a) { ... }
/// invoke(b) { ... } })` for several batch entries (`invoke()` sees the whole batch).
///
/// Inside the block, paths rooted at the model are envoys (`model.model.layers[5].mlp`); their `.output`,
/// `.input` and `.inputs` are proxies when read and graph writes when assigned (`=`, `+=`, `-=`, `*=`, `/=`, also
/// indexed: `model.lm_head.output[(.., -1)] = v`), and `model.lm_head(x)` applies a module to a value. Everything
/// else is ordinary Rust, run while the graph is built (a loop over layers unrolls). After the block, each
/// top-level `let` of the body is in scope: a `.save()`d proxy as its plain value, anything else unchanged.
///
/// Other forms: `model.scan(input) { .. }` runs the block on shapes alone; `model.generate(input, options) { .. }`
/// (or `model.generate(options) { invoke(..) { .. } .. }`) runs it alongside every step of a generation, steps
/// addressed with `for step in iter(..)` / `all()`; `model.session() { trace(a) { .. } .. }` holds several such
/// blocks with Rust around them, each block's top-level `let`s kept (saved) for the blocks after it. Inside any
/// block: `if cond!(..) { .. } else { .. }` decides on graph values, `call!(f(..))` calls an
/// `#[nnsight::function]`, `log!(v)` prints, `loss.backward()` then `x.grad` reads gradients.
///
/// Used in statement position in a function returning a `Result` whose error converts from `nnsight::Error`.
#[proc_macro]
pub fn intervene(input: proc_macro::TokenStream) -> proc_macro::TokenStream {
    intervene::intervene(input.into()).into()
}

/// Makes an ordinary Rust function over tensors and numbers callable inside `intervene!` as a graph node, and
/// registers it by its full path so that a graph read from JSON (or run by a server compiled with it) can call it.
///
/// Parameters: `Tensor`, `&Tensor`, `f64`, `f32`, `i64`, `bool`; result: `Tensor` or `Result<Tensor, E>` with
/// `E: Display`. The function stays as written; next to it a type of the same name holds `NAME` (the registered
/// name) and `call`, which `call!(name(args))` inside `intervene!` uses.
#[proc_macro_attribute]
pub fn function(attr: proc_macro::TokenStream, item: proc_macro::TokenStream) -> proc_macro::TokenStream {
    let item = syn::parse_macro_input!(item as syn::ItemFn);
    function::function(attr.into(), item).into()
}
