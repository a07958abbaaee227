//! Small questions about syn trees that every part of the rewrite asks: a lone identifier, a hook point's name,
//! a compound operator, the first span of some tokens, the names a pattern binds.

use super::super::parse::HOOK_POINTS;
use proc_macro2::{Span, TokenStream, TokenTree};
use quote::{quote, ToTokens};
use syn::{BinOp, Expr, Ident, Pat};

pub(super) fn single_ident(p: &syn::ExprPath) -> Option<&Ident> {
    if p.qself.is_none() && p.attrs.is_empty() {
        p.path.get_ident()
    } else {
        None
    }
}

pub(super) fn is_hook(name: &Ident) -> bool {
    HOOK_POINTS.iter().any(|h| name == h)
}

pub(super) fn is_compound(op: &BinOp) -> bool {
    matches!(
        op,
        BinOp::AddAssign(_)
            | BinOp::SubAssign(_)
            | BinOp::MulAssign(_)
            | BinOp::DivAssign(_)
            | BinOp::RemAssign(_)
            | BinOp::BitXorAssign(_)
            | BinOp::BitAndAssign(_)
            | BinOp::BitOrAssign(_)
            | BinOp::ShlAssign(_)
            | BinOp::ShrAssign(_)
    )
}

/// Expressions that need no parentheses as the right operand of a binary operator.
pub(super) fn is_operand(e: &Expr) -> bool {
    matches!(
        e,
        Expr::Lit(_)
            | Expr::Path(_)
            | Expr::Call(_)
            | Expr::MethodCall(_)
            | Expr::Field(_)
            | Expr::Index(_)
            | Expr::Paren(_)
            | Expr::Try(_)
            | Expr::Macro(_)
            | Expr::Verbatim(_)
    )
}

pub(super) fn unit() -> Expr {
    Expr::Verbatim(quote!(()))
}

pub(super) fn expr_span(e: &Expr) -> Span {
    first_span(e)
}

/// The span of the first token of `t` (a whole expression's span needs nightly `join`).
pub(super) fn first_span(t: &impl ToTokens) -> Span {
    t.to_token_stream().into_iter().next().map(|t| t.span()).unwrap_or_else(Span::call_site)
}

/// Whether any identifier in `tokens` (groups included) satisfies `pred`.
pub(super) fn mentions(tokens: &TokenStream, pred: impl Fn(&Ident) -> bool + Copy) -> bool {
    tokens.clone().into_iter().any(|tt| match tt {
        TokenTree::Ident(i) => pred(&i),
        TokenTree::Group(g) => mentions(&g.stream(), pred),
        _ => false,
    })
}

/// The identifiers a pattern binds, with whether each is `mut`.
pub fn pat_bindings(pat: &Pat, out: &mut Vec<(Ident, bool)>) {
    match pat {
        Pat::Ident(p) => {
            out.push((p.ident.clone(), p.mutability.is_some()));
            if let Some((_, sub)) = &p.subpat {
                pat_bindings(sub, out);
            }
        }
        Pat::Tuple(t) => t.elems.iter().for_each(|p| pat_bindings(p, out)),
        Pat::TupleStruct(t) => t.elems.iter().for_each(|p| pat_bindings(p, out)),
        Pat::Struct(s) => s.fields.iter().for_each(|f| pat_bindings(&f.pat, out)),
        Pat::Slice(s) => s.elems.iter().for_each(|p| pat_bindings(p, out)),
        Pat::Paren(p) => pat_bindings(&p.pat, out),
        Pat::Type(t) => pat_bindings(&t.pat, out),
        Pat::Reference(r) => pat_bindings(&r.pat, out),
        _ => {}
    }
}
