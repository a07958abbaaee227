//! Module paths: the rewriter's scopes (which names hold envoys), whether an expression is a module path or a hook
//! point over one, and its emission as a place, a read or a write.

use super::syntax::{is_hook, pat_bindings, single_ident, unit};
use super::{gen, Errors};
use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use std::collections::HashMap;
use syn::fold::Fold;
use syn::{Expr, Ident, Member, Pat, Token};

/// What a chain of field accesses and indexing is rooted at.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum PathKind {
    /// The model identifier itself: `model` (stays the real model).
    Root,
    /// An envoy variable itself: `layer`.
    Alias,
    /// A module path with at least one field or index: `model.lm_head`, `layer.mlp`.
    Path,
}

/// The expression rewriter (a [`Fold`] over the body).
pub struct Rewriter<'a> {
    pub(super) root: &'a Ident,
    /// Innermost last: for each name bound in a scope, whether it holds an envoy (`&Envoy`).
    pub(super) scopes: Vec<HashMap<String, bool>>,
    pub(super) errors: &'a mut Errors,
}

impl<'a> Rewriter<'a> {
    /// A rewriter of paths rooted at `root`.
    pub fn new(root: &'a Ident, errors: &'a mut Errors) -> Self {
        Rewriter { root, scopes: vec![HashMap::new()], errors }
    }

    pub(super) fn is_alias(&self, name: &Ident) -> bool {
        for scope in self.scopes.iter().rev() {
            if let Some(&alias) = scope.get(&name.to_string()) {
                return alias;
            }
        }
        false
    }

    pub(super) fn bind(&mut self, name: &Ident, alias: bool) {
        self.scopes.last_mut().expect("a scope").insert(name.to_string(), alias);
    }

    pub(super) fn bind_pat(&mut self, pat: &Pat, alias: bool) {
        let mut names = Vec::new();
        pat_bindings(pat, &mut names);
        for (name, _) in names {
            self.bind(&name, alias);
        }
    }

    pub(super) fn in_scope<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        self.scopes.push(HashMap::new());
        let out = f(self);
        self.scopes.pop();
        out
    }

    /// Whether `e` is the model, an envoy variable, or a module path over them.
    pub(super) fn path_kind(&self, e: &Expr) -> Option<PathKind> {
        match e {
            Expr::Path(p) => {
                let ident = single_ident(p)?;
                if ident == self.root {
                    Some(PathKind::Root)
                } else if self.is_alias(ident) {
                    Some(PathKind::Alias)
                } else {
                    None
                }
            }
            Expr::Field(f) => match &f.member {
                // `.grad` is a gradient, not a submodule.
                Member::Named(name) if !is_hook(name) && name != "grad" => {
                    self.path_kind(&f.base).map(|_| PathKind::Path)
                }
                _ => None,
            },
            Expr::Index(i) => self.path_kind(&i.expr).map(|_| PathKind::Path),
            _ => None,
        }
    }

    /// Whether `e` is `PATH.point` or `PATH.point[INDEX]` (a hook point, possibly indexed).
    pub(super) fn is_hook_point(&self, e: &Expr) -> bool {
        match e {
            Expr::Field(f) => matches!(&f.member, Member::Named(n) if is_hook(n)) && self.path_kind(&f.base).is_some(),
            Expr::Index(i) => matches!(&*i.expr, Expr::Field(_)) && self.is_hook_point(&i.expr),
            _ => false,
        }
    }

    /// A module path as a place of its envoy's type. `e` must satisfy [`Self::path_kind`].
    pub(super) fn place(&mut self, e: Expr) -> TokenStream {
        match e {
            Expr::Path(p) => {
                let ident = single_ident(&p).expect("a path of one identifier").clone();
                let s = gen(ident.span());
                if ident == *self.root {
                    let root = Ident::new("__nn_root", s);
                    quote_spanned!(s=> (*#root))
                } else {
                    quote_spanned!(s=> (*#ident))
                }
            }
            Expr::Field(f) => {
                let base = self.place(*f.base);
                let (dot, member) = (f.dot_token, f.member);
                quote!(#base #dot #member)
            }
            Expr::Index(i) => {
                let base = self.place(*i.expr);
                let index = self.fold_expr(*i.index);
                let s = gen(i.bracket_token.span.join());
                quote_spanned!(s=> (*::nnsight::__private::at(&#base, #index)?))
            }
            other => unreachable!("not a module path: {}", other.to_token_stream()),
        }
    }

    /// The parts of a hook point expression: the module's place, the point, and the index if any.
    pub(super) fn hook_parts(&mut self, e: Expr) -> (TokenStream, Token![.], Ident, Option<(Expr, Span)>) {
        let (field, index) = match e {
            Expr::Index(i) => {
                let Expr::Field(f) = *i.expr else { unreachable!("an indexed hook point") };
                (f, Some((self.fold_expr(*i.index), i.bracket_token.span.join())))
            }
            Expr::Field(f) => (f, None),
            other => unreachable!("not a hook point: {}", other.to_token_stream()),
        };
        let Member::Named(point) = field.member else { unreachable!("a named hook point") };
        (self.place(*field.base), field.dot_token, point, index)
    }

    /// `PATH.output` (`[INDEX]`) as a value: a read node.
    pub(super) fn read(&mut self, e: Expr) -> Expr {
        let (module, dot, point, index) = self.hook_parts(e);
        let tokens = match (point == "inputs", index) {
            (false, None) => {
                let s = gen(point.span());
                let g = Ident::new("__nn_g", s);
                quote_spanned!(s=> ::nnsight::__private::read::<::nnsight::__private::Tensor>(#g, &#module #dot #point)?)
            }
            (false, Some((index, span))) => {
                let s = gen(span);
                let g = Ident::new("__nn_g", s);
                quote_spanned!(s=> ::nnsight::__private::read_index(#g, &#module #dot #point, #index)?)
            }
            (true, None) => {
                let s = gen(point.span());
                let g = Ident::new("__nn_g", s);
                quote_spanned!(s=> ::nnsight::__private::read_inputs(#g, &#module #dot #point)?)
            }
            (true, Some((index, span))) => {
                let s = gen(span);
                let g = Ident::new("__nn_g", s);
                quote_spanned!(s=> ::nnsight::__private::read_inputs(#g, &#module #dot #point)?.get(#index))
            }
        };
        Expr::Verbatim(tokens)
    }

    /// `PATH.output (`[INDEX]`) = VALUE`: a write node. `value` is already rewritten.
    pub(super) fn write(&mut self, left: Expr, value: TokenStream, eq_span: Span) -> Expr {
        let (module, dot, point, index) = self.hook_parts(left);
        if point == "inputs" {
            self.errors.push(syn::Error::new(
                point.span(),
                "`.inputs` cannot be assigned: assign to `.input` (the first input) or `.output`",
            ));
            return unit();
        }
        let s = gen(eq_span);
        let g = Ident::new("__nn_g", s);
        Expr::Verbatim(match index {
            None => quote_spanned!(s=> ::nnsight::__private::write(#g, &#module #dot #point, #value)?),
            Some((index, _)) => {
                quote_spanned!(s=> ::nnsight::__private::write_index(#g, &#module #dot #point, #index, #value)?)
            }
        })
    }
}
