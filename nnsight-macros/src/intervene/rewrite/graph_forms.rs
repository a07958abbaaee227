//! The forms of the block that become graph control and calls rather than build-time Rust: `if cond!(..)` (a
//! branch that the graph decides when it runs) and `call!(f(..))` (a registered `#[nnsight::function]`).

use super::gen;
use super::paths::Rewriter;
use super::syntax::{first_span, unit};
use proc_macro2::TokenStream;
use quote::{quote_spanned, ToTokens};
use syn::fold::Fold;
use syn::{BinOp, Expr, ExprIf, Ident, Macro, UnOp};

/// Whether `e` is `cond!(..)`.
pub fn is_cond(e: &Expr) -> bool {
    matches!(e, Expr::Macro(m) if m.mac.path.is_ident("cond"))
}

impl Rewriter<'_> {
    /// `if cond!(C) { A } else { B }`: both branches are built, each behind a guard on `C`; the value is `A`'s
    /// when `C` holds when the graph runs, else `B`'s (both must have the same type).
    ///
    /// ```text
    /// {
    ///     let __nn_branch = ::nnsight::__private::cond(__nn_g, C);
    ///     let __nn_guard = __nn_branch.then();
    ///     let __nn_a = { A };
    ///     __nn_branch.end(__nn_guard);
    ///     let __nn_guard = __nn_branch.otherwise();   // with an `else`
    ///     let __nn_b = { B };                         // `()` without one
    ///     __nn_branch.end(__nn_guard);
    ///     __nn_branch.choose(__nn_a, __nn_b)
    /// }
    /// ```
    pub(super) fn graph_if(&mut self, i: ExprIf) -> Expr {
        let Expr::Macro(m) = *i.cond else { unreachable!("checked by is_cond") };
        let s = gen(i.if_token.span);
        let g = Ident::new("__nn_g", s);
        let cond = self.cond_tokens(&m.mac);
        let then = self.fold_block(i.then_branch);
        let then = quote_spanned!(s=> #then);
        let (open_else, otherwise, else_span) = match i.else_branch {
            Some((else_token, e)) => {
                let span = gen(else_token.span);
                let e = match *e {
                    Expr::If(inner) if is_cond(&inner.cond) => self.graph_if(inner),
                    other => self.fold_expr(other),
                };
                (true, e.into_token_stream(), span)
            }
            None => (false, quote_spanned!(s=> ()), s),
        };
        let b = Ident::new("__nn_branch", s);
        let guard = Ident::new("__nn_guard", s);
        let a = Ident::new("__nn_a", s);
        let bv = Ident::new("__nn_b", else_span);
        let else_part = if open_else {
            quote_spanned! {else_span=>
                let #guard = #b.otherwise();
                let #bv = #otherwise;
                #b.end(#guard);
            }
        } else {
            quote_spanned!(else_span=> let #bv = ();)
        };
        Expr::Verbatim(quote_spanned! {s=>
            {
                let #b = ::nnsight::__private::cond(#g, #cond);
                let #guard = #b.then();
                let #a = #then;
                #b.end(#guard);
                #else_part
                #b.choose(#a, #bv)
            }
        })
    }

    /// The inside of `cond!(..)`: comparisons and logic become graph nodes; operands are rewritten as usual.
    fn cond_tokens(&mut self, mac: &Macro) -> TokenStream {
        match syn::parse2::<Expr>(mac.tokens.clone()) {
            Ok(e) => self.cond_expr(e),
            Err(e) => {
                self.errors.push(syn::Error::new(
                    e.span(),
                    "`cond!` takes one condition on graph values, e.g. `cond!(h.norm() > 100.0)`",
                ));
                unit().into_token_stream()
            }
        }
    }

    fn cond_expr(&mut self, e: Expr) -> TokenStream {
        let span = gen(first_span(&e));
        let g = Ident::new("__nn_g", span);
        match e {
            Expr::Paren(p) => self.cond_expr(*p.expr),
            Expr::Binary(b) => {
                let kind = match b.op {
                    BinOp::Gt(_) => "Gt",
                    BinOp::Lt(_) => "Lt",
                    BinOp::Ge(_) => "Ge",
                    BinOp::Le(_) => "Le",
                    BinOp::Eq(_) => "Eq",
                    BinOp::Ne(_) => "Ne",
                    BinOp::And(_) => "And",
                    BinOp::Or(_) => "Or",
                    _ => {
                        let value = self.fold_expr(Expr::Binary(b));
                        return value.into_token_stream();
                    }
                };
                let s = gen(first_span(&b.op));
                let kind = Ident::new(kind, s);
                let (l, r) = (self.cond_expr(*b.left), self.cond_expr(*b.right));
                quote_spanned!(s=> ::nnsight::__private::compare(#g, ::nnsight::__private::BinaryOp::#kind, #l, #r))
            }
            Expr::Unary(u) if matches!(u.op, UnOp::Not(_)) => {
                let inner = self.cond_expr(*u.expr);
                quote_spanned!(span=> ::nnsight::__private::not(#g, #inner))
            }
            other => self.fold_expr(other).into_token_stream(),
        }
    }

    /// `call!(f(a, b))`: a call node of the `#[nnsight::function]` `f`.
    pub(super) fn call_macro(&mut self, mac: Macro) -> Expr {
        let span = first_span(&mac.path);
        let call = match syn::parse2::<Expr>(mac.tokens.clone()) {
            Ok(Expr::Call(c)) if matches!(*c.func, Expr::Path(_)) => c,
            Ok(other) => {
                self.errors.push(syn::Error::new(
                    first_span(&other),
                    "`call!` takes a call of an `#[nnsight::function]`, e.g. `call!(clamp_norm(h, 10.0))`",
                ));
                return unit();
            }
            Err(e) => {
                self.errors.push(syn::Error::new(
                    e.span(),
                    "`call!` takes a call of an `#[nnsight::function]`, e.g. `call!(clamp_norm(h, 10.0))`",
                ));
                return unit();
            }
        };
        let func = call.func;
        let s = gen(first_span(&func));
        let g = Ident::new("__nn_g", gen(span));
        let args: Vec<Expr> = call.args.into_iter().map(|a| self.fold_expr(a)).collect();
        Expr::Verbatim(quote_spanned!(s=> #func::call(#g #(, #args)*)))
    }

    /// `cond!` anywhere but as the condition of an `if`.
    pub(super) fn misplaced_cond(&mut self, mac: &Macro) -> Expr {
        self.errors.push(syn::Error::new(
            first_span(&mac.path),
            "`cond!(..)` is only the condition of an `if`: `if cond!(h.norm() > 1.0) { .. } else { .. }`",
        ));
        unit()
    }
}

/// Whether `e` is `iter(..)` or `all()`: the steps of a generation.
pub fn is_steps(e: &Expr) -> bool {
    match e {
        Expr::Call(c) => matches!(&*c.func, Expr::Path(p) if p.path.is_ident("iter") || p.path.is_ident("all")),
        _ => false,
    }
}

impl Rewriter<'_> {
    /// `for step in iter(STEPS) { BODY }` / `for step in all() { BODY }`: the body runs once per step while the
    /// graph is built, its reads and writes addressing that step (the module's call of that number).
    ///
    /// ```text
    /// for __nn_step in ::nnsight::__private::steps(__nn_g, STEPS)? {
    ///     let step = __nn_step;
    ///     let __nn_scope = ::nnsight::__private::at_step(__nn_g, __nn_step);
    ///     BODY
    /// }
    /// ```
    pub(super) fn step_loop(&mut self, f: syn::ExprForLoop) -> Expr {
        let Expr::Call(call) = *f.expr else { unreachable!("checked by is_steps") };
        let Expr::Path(func) = &*call.func else { unreachable!("checked by is_steps") };
        let name = func.path.get_ident().expect("one identifier").clone();
        let s = gen(name.span());
        let g = Ident::new("__nn_g", s);
        let steps = if name == "all" {
            if !call.args.is_empty() {
                self.errors.push(syn::Error::new(
                    first_span(&call.args),
                    "`all()` takes no arguments: it visits every step of the generation",
                ));
            }
            quote_spanned!(s=> ::nnsight::__private::all_steps(#g)?)
        } else {
            if call.args.len() != 1 {
                self.errors.push(syn::Error::new(
                    name.span(),
                    "`iter` takes the steps: a range (`iter(0..3)`), an array (`iter([0, 2])`) or a vector",
                ));
                return unit();
            }
            let arg = self.fold_expr(call.args.into_iter().next().expect("one argument"));
            quote_spanned!(s=> ::nnsight::__private::steps(#g, #arg)?)
        };
        let pat = &f.pat;
        let step = Ident::new("__nn_step", s);
        let scope = Ident::new("__nn_scope", s);
        let body = self.in_scope(|rw| {
            rw.bind_pat(&f.pat, false);
            rw.fold_block(f.body)
        });
        let stmts = &body.stmts;
        let label = &f.label;
        Expr::Verbatim(quote_spanned! {s=>
            #label for #step in #steps {
                #[allow(unused_variables)]
                let #pat = #step;
                let #scope = ::nnsight::__private::at_step(#g, #step);
                #(#stmts)*
            }
        })
    }
}
