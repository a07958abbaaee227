//! Phase 2, rewriting: expressions rooted at the model become graph-construction calls; everything else stays.
//!
//! A *module path* is a chain of field accesses and indexing rooted at the model (`model.model.layers[5].mlp`) or
//! at an envoy variable (`layer` in `for layer in model.transformer.h`). It is emitted as a place of the envoy's
//! type: `model` becomes `(*__nn_root)`, `.field` stays a real field access with the user's tokens (a typo is
//! rustc's "no field" error under the typo), `[i]` becomes `(*at(&list, i)?)`. A hook point after it (`.output`,
//! `.input`, `.inputs`) becomes a read, or a write when assigned. Generated tokens carry call-site hygiene located
//! at the user's tokens, so errors land there while lints treat them as macro output.
//!
//! Which top-level bindings are handed on after the block is decided here too (see [`Exports`]).
//!
//! This file holds the phase's entry, [`rewrite`]; the rest is one thing per file: [`paths`] (what a module path
//! is, and its place, read and write), [`exprs`] (the [`Fold`] that picks the rewrite of each expression),
//! [`graph_forms`] (`if cond!(..)`, `call!(..)`, step loops), [`exports`] (which bindings are handed on), and
//! [`syntax`] (small questions about syn trees that all of them ask).

mod exports;
mod exprs;
mod graph_forms;
mod paths;
mod syntax;

use super::form::Form;
use super::parse::{Intervene, Item};
use super::Errors;
use exports::Exports;
use paths::Rewriter;
use proc_macro2::Span;
use syn::fold::Fold;
use syn::{Expr, Ident, Stmt};

pub use syntax::pat_bindings;

/// The body after rewriting, and the bindings to hand on.
pub struct Rewritten {
    /// The model's identifier.
    pub root: Ident,
    /// Which block it is.
    pub form: Form,
    /// The form's token, as written (spans).
    pub trace: Ident,
    /// The input of `ROOT.trace(INPUT)`.
    pub input: Option<Expr>,
    /// The options of `ROOT.generate(.., OPTIONS)`.
    pub options: Option<Expr>,
    /// The server of `.remote(SERVER)`.
    pub remote: Option<Expr>,
    /// The session the block is added to (see [`super::parse::Intervene::session`]).
    pub session: Option<syn::Ident>,
    /// Rewritten statements and invoke blocks, in order.
    pub items: Vec<Item>,
    /// Top-level bindings to finish after the run, in order.
    pub exports: Vec<Export>,
}

/// A top-level binding handed on after the block: `let NAME = finish(NAME)`.
pub struct Export {
    /// The binding's identifier (the user's token).
    pub name: Ident,
    /// Whether the user's binding was `mut`.
    pub mutable: bool,
}

/// Rewrites every statement of the body and decides the exports.
pub fn rewrite(ast: Intervene, errors: &mut Errors) -> Rewritten {
    let Intervene { root, form, trace, input, options, remote, session, items } = ast;
    let mut exports = Exports::new(&root);
    let mut rw = Rewriter::new(&root, errors);
    let mut stmt = |s: Stmt, rw: &mut Rewriter| {
        exports.see(&s);
        rw.fold_stmt(s)
    };
    let items = items
        .into_iter()
        .map(|item| match item {
            Item::Stmt(s) => Item::Stmt(stmt(s, &mut rw)),
            Item::Invoke(mut inv) => {
                inv.stmts = std::mem::take(&mut inv.stmts).into_iter().map(|s| stmt(s, &mut rw)).collect();
                Item::Invoke(inv)
            }
        })
        .collect();
    let exports = exports.finish();
    Rewritten { root, form, trace, input, options, remote, session, items, exports }
}

/// A span with the call site's hygiene (generated names resolve as if written by the user, lints see macro
/// output) at the location of the user's token `at`.
pub fn gen(at: Span) -> Span {
    Span::call_site().located_at(at)
}

/// `Some(Into::into(INPUT))` or `None`.
pub fn option_input(input: Option<&Expr>, s: Span) -> proc_macro2::TokenStream {
    match input {
        Some(e) => {
            let s = gen(syn::spanned::Spanned::span(e));
            quote::quote_spanned!(s=> ::core::option::Option::Some(::core::convert::Into::into(#e)))
        }
        None => quote::quote_spanned!(s=> ::core::option::Option::None),
    }
}
