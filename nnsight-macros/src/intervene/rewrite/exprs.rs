//! The expression rewriter's [`Fold`]: which expressions and statements of the body become which graph calls
//! (assignments, compound assignments, ad-hoc module calls, `log!`, method calls on the model, loops over module
//! lists, envoy `let`s); everything else is folded through untouched.

use super::gen;
use super::graph_forms;
use super::paths::{PathKind, Rewriter};
use super::syntax::{expr_span, first_span, is_compound, is_operand, mentions, unit};
use proc_macro2::TokenStream;
use quote::{quote, quote_spanned, ToTokens};
use syn::fold::{self, Fold};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::{BinOp, Block, Expr, ExprForLoop, Ident, Local, LocalInit, Macro, Member, Pat, Stmt, Token};

impl Rewriter<'_> {
    /// `model.lm_head(x)`: an ad-hoc call of a module on a value.
    fn apply(&mut self, m: syn::ExprMethodCall) -> Expr {
        let module = self.place(*m.receiver);
        let (dot, method) = (m.dot_token, m.method);
        let arg = self.fold_expr(m.args.into_iter().next().expect("one argument"));
        let s = gen(method.span());
        let g = Ident::new("__nn_g", s);
        Expr::Verbatim(quote_spanned!(s=> ::nnsight::__private::apply(#g, &#module #dot #method, #arg)))
    }

    /// `log!(value)`: print the value when the graph computes it, labelled with its source text; `send!(value)`:
    /// hand it to whoever runs the graph (a server streams it to its client), labelled the same way.
    fn log(&mut self, mac: Macro) -> Expr {
        let span = first_span(&mac.path);
        let name = if mac.path.is_ident("send") { "send" } else { "log" };
        let value = match syn::parse2::<Expr>(mac.tokens.clone()) {
            Ok(v) => v,
            Err(e) => {
                self.errors
                    .push(syn::Error::new(e.span(), format!("`{name}!` takes one value, e.g. `{name}!(h.norm())`")));
                return unit();
            }
        };
        let label = compact(&mac.tokens.to_string());
        let value = self.fold_expr(value);
        let s = gen(span);
        let g = Ident::new("__nn_g", s);
        let f = Ident::new(name, s);
        Expr::Verbatim(quote_spanned!(s=> ::nnsight::__private::#f(#g, #label, #value)))
    }

    fn assign(&mut self, a: syn::ExprAssign) -> Expr {
        // `X.grad = VALUE`: a gradient write (during the backward, the gradient through X becomes VALUE).
        if matches!(&*a.left, Expr::Field(f) if matches!(&f.member, Member::Named(n) if n == "grad")) {
            let s = gen(a.eq_token.span);
            let g = Ident::new("__nn_g", s);
            let grad = self.fold_expr(*a.left);
            let value = self.fold_expr(*a.right);
            return Expr::Verbatim(quote_spanned!(s=> ::nnsight::__private::write_grad(#g, #grad, #value)));
        }
        if self.is_hook_point(&a.left) {
            let value = self.fold_expr(*a.right).into_token_stream();
            return self.write(*a.left, value, a.eq_token.span);
        }
        if self.path_kind(&a.left) == Some(PathKind::Path) {
            self.errors.push(syn::Error::new_spanned(&a.left, "assign to `.output` or `.input` of a module"));
            return unit();
        }
        fold::fold_expr(self, Expr::Assign(a))
    }

    fn compound_assign(&mut self, b: syn::ExprBinary) -> Expr {
        // `X.grad *= VALUE`: the gradient write `X.grad = X.grad * VALUE`.
        if matches!(&*b.left, Expr::Field(f) if matches!(&f.member, Member::Named(n) if n == "grad")) {
            let Some(op) = self.compound_op(&b.op, "`.grad`") else { return unit() };
            let s = gen(first_span(&b.op));
            let g = Ident::new("__nn_g", s);
            let grad = self.fold_expr((*b.left).clone());
            let current = self.fold_expr(*b.left);
            let right = self.fold_expr(*b.right);
            return Expr::Verbatim(
                quote_spanned!(s=> ::nnsight::__private::write_grad(#g, #grad, #current #op (#right))),
            );
        }
        let hook = self.is_hook_point(&b.left);
        if !hook {
            if self.path_kind(&b.left) == Some(PathKind::Path) {
                self.errors.push(syn::Error::new_spanned(&b.left, "assign to `.output` or `.input` of a module"));
                return unit();
            }
            return fold::fold_expr(self, Expr::Binary(b));
        }
        let Some(op) = self.compound_op(&b.op, "`.output` and `.input`") else { return unit() };
        let op_span = first_span(&b.op);
        let right = self.fold_expr(*b.right);
        let right =
            if is_operand(&right) { right.into_token_stream() } else { quote_spanned!(gen(op_span)=> (#right)) };
        let current = self.read((*b.left).clone());
        self.write(*b.left, quote!(#current #op #right), op_span)
    }

    /// The operator of `+=`, `-=`, `*=` or `/=`; any other is reported (it does not apply to `target`).
    fn compound_op(&mut self, op: &BinOp, target: &str) -> Option<TokenStream> {
        Some(match op {
            BinOp::AddAssign(t) => quote_spanned!(gen(t.spans[0])=> +),
            BinOp::SubAssign(t) => quote_spanned!(gen(t.spans[0])=> -),
            BinOp::MulAssign(t) => quote_spanned!(gen(t.spans[0])=> *),
            BinOp::DivAssign(t) => quote_spanned!(gen(t.spans[0])=> /),
            other => {
                self.errors.push(syn::Error::new_spanned(
                    other,
                    format!("only `=`, `+=`, `-=`, `*=` and `/=` apply to {target}"),
                ));
                return None;
            }
        })
    }

    fn method_call(&mut self, m: syn::ExprMethodCall) -> Expr {
        let kind = self.path_kind(&m.receiver);
        match kind {
            // `model.transformer.h[1].skip(value)`: do not run the module, use the value as its output.
            Some(PathKind::Path) | Some(PathKind::Alias) if m.method == "skip" && m.args.len() == 1 => {
                let s = gen(m.method.span());
                let g = Ident::new("__nn_g", s);
                let module = self.place(*m.receiver);
                let value = self.fold_expr(m.args.into_iter().next().expect("one argument"));
                Expr::Verbatim(quote_spanned!(s=> ::nnsight::__private::skip(#g, &#module, #value)?))
            }
            // `model.cache()` / `model.cache_with(options)`: record module values from here on.
            Some(PathKind::Root) if m.method == "cache" && m.args.is_empty() => {
                let s = gen(m.method.span());
                let g = Ident::new("__nn_g", s);
                Expr::Verbatim(quote_spanned!(s=> ::nnsight::__private::cache(#g, ::core::default::Default::default())))
            }
            Some(PathKind::Root) if m.method == "cache_with" && m.args.len() == 1 => {
                let s = gen(m.method.span());
                let g = Ident::new("__nn_g", s);
                let opts = self.fold_expr(m.args.into_iter().next().expect("one argument"));
                Expr::Verbatim(quote_spanned!(s=> ::nnsight::__private::cache(#g, #opts)))
            }
            Some(PathKind::Root) if m.method == "stop" && !m.args.is_empty() => {
                self.errors.push(syn::Error::new(
                    first_span(&m.args),
                    "`stop()` takes no arguments: it ends the forward pass where it stands in the block",
                ));
                unit()
            }
            // `model.generated()`: the token ids a generation produced (prompt and new tokens).
            Some(PathKind::Root) if m.method == "generated" && m.args.is_empty() => {
                let s = gen(m.method.span());
                let g = Ident::new("__nn_g", s);
                Expr::Verbatim(quote_spanned!(s=> ::nnsight::__private::generated(#g)))
            }
            // `model.stop()`: end the forward pass once everything before this point has run.
            Some(PathKind::Root) if m.method == "stop" && m.args.is_empty() => {
                let s = gen(m.method.span());
                let g = Ident::new("__nn_g", s);
                Expr::Verbatim(quote_spanned!(s=> ::nnsight::__private::stop(#g)))
            }
            Some(_) if m.args.len() == 1 && m.turbofish.is_none() => self.apply(m),
            Some(PathKind::Path) => {
                let syn::ExprMethodCall { attrs, receiver, dot_token, method, turbofish, paren_token, args } = m;
                let receiver = Box::new(Expr::Verbatim(self.place(*receiver)));
                let args = args.into_iter().map(|a| self.fold_expr(a)).collect();
                Expr::MethodCall(syn::ExprMethodCall {
                    attrs,
                    receiver,
                    dot_token,
                    method,
                    turbofish,
                    paren_token,
                    args,
                })
            }
            // `model.tokenizer()`: a method of the real model; `layer.module_path()`: of an envoy.
            Some(PathKind::Root) | Some(PathKind::Alias) => {
                let mut m = m;
                m.args = std::mem::take(&mut m.args).into_iter().map(|a| self.fold_expr(a)).collect();
                Expr::MethodCall(m)
            }
            None => fold::fold_expr(self, Expr::MethodCall(m)),
        }
    }

    /// `for layer in model.transformer.h { .. }` (or `&..`, `.iter()`, `.iter().enumerate()`, ...): `layer` is an
    /// envoy variable in the body.
    fn for_loop(&mut self, f: ExprForLoop) -> Expr {
        let ExprForLoop { attrs, label, for_token, pat, in_token, expr, body } = f;
        let (expr, aliases) = self.loop_source(*expr, &pat);
        let body = self.in_scope(|rw| {
            rw.bind_pat(&pat, false);
            for name in &aliases {
                rw.bind(name, true);
            }
            rw.fold_block(body)
        });
        let expr = Box::new(expr);
        Expr::ForLoop(ExprForLoop { attrs, label, for_token, pat, in_token, expr, body })
    }

    /// The rewritten iterable of a for loop and the loop variables that hold envoys.
    fn loop_source(&mut self, expr: Expr, pat: &Pat) -> (Expr, Vec<Ident>) {
        const ADAPTERS: [&str; 4] = ["iter", "into_iter", "enumerate", "rev"];
        const ADAPTERS_1: [&str; 3] = ["skip", "take", "step_by"];
        let mut enumerated = false;
        let mut cur = &expr;
        loop {
            match cur {
                Expr::MethodCall(m) if m.args.is_empty() && ADAPTERS.iter().any(|n| m.method == n) => {
                    enumerated |= m.method == "enumerate";
                    cur = &m.receiver;
                }
                Expr::MethodCall(m) if m.args.len() == 1 && ADAPTERS_1.iter().any(|n| m.method == n) => {
                    cur = &m.receiver
                }
                Expr::Reference(r) if r.mutability.is_none() => cur = &r.expr,
                Expr::Paren(p) => cur = &p.expr,
                _ => break,
            }
        }
        if self.path_kind(cur) != Some(PathKind::Path) && self.path_kind(cur) != Some(PathKind::Alias) {
            return (self.fold_expr(expr), Vec::new());
        }
        let aliases = match (pat, enumerated) {
            (Pat::Ident(p), false) if p.subpat.is_none() => vec![p.ident.clone()],
            (Pat::Tuple(t), true) if t.elems.len() == 2 => match &t.elems[1] {
                Pat::Ident(p) if p.subpat.is_none() => vec![p.ident.clone()],
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        // A bare module list iterates by reference: `for layer in model.transformer.h` means `&..`.
        let expr = if self.path_kind(&expr) == Some(PathKind::Path) {
            let s = gen(expr_span(&expr));
            let place = self.place(expr);
            Expr::Verbatim(quote_spanned!(s=> &#place))
        } else {
            self.fold_expr(expr)
        };
        (expr, aliases)
    }
}

impl Fold for Rewriter<'_> {
    fn fold_expr(&mut self, e: Expr) -> Expr {
        match e {
            Expr::Assign(a) => self.assign(a),
            Expr::Binary(b) if is_compound(&b.op) => self.compound_assign(b),
            Expr::MethodCall(m) => self.method_call(m),
            // `X.grad`: the gradient of a module input or output after a `.backward()` (a method on proxies).
            Expr::Field(ref f) if matches!(&f.member, Member::Named(n) if n == "grad") => {
                let Expr::Field(f) = e else { unreachable!("a field") };
                let Member::Named(name) = f.member else { unreachable!("a named field") };
                let s = gen(name.span());
                let g = Ident::new("__nn_g", s);
                let base = *f.base;
                let source = if self.is_hook_point(&base) && !matches!(base, Expr::Index(_)) {
                    // `PATH.output.grad`: of the read of that point made before the loss.
                    let (module, dot, point, _) = self.hook_parts(base);
                    quote_spanned!(s=> &#module #dot #point)
                } else if self.path_kind(&base) == Some(PathKind::Path) {
                    // `PATH.weight.grad`: of a parameter.
                    let place = self.place(base);
                    quote_spanned!(s=> &#place)
                } else {
                    self.fold_expr(base).into_token_stream()
                };
                Expr::Verbatim(quote_spanned!(s=> ::nnsight::__private::grad_of(#g, #source)))
            }
            Expr::Field(_) | Expr::Index(_) if self.is_hook_point(&e) => self.read(e),
            Expr::Field(_) | Expr::Index(_) if self.path_kind(&e) == Some(PathKind::Path) => {
                Expr::Verbatim(self.place(e))
            }
            Expr::ForLoop(f) if graph_forms::is_steps(&f.expr) => self.step_loop(f),
            Expr::ForLoop(f) => self.for_loop(f),
            Expr::Macro(m) if m.mac.path.is_ident("log") || m.mac.path.is_ident("send") => self.log(m.mac),
            Expr::Macro(m) if m.mac.path.is_ident("call") => self.call_macro(m.mac),
            Expr::Macro(m) if m.mac.path.is_ident("cond") => self.misplaced_cond(&m.mac),
            Expr::If(i) if graph_forms::is_cond(&i.cond) => self.graph_if(i),
            Expr::While(w) if graph_forms::is_cond(&w.cond) => {
                self.errors.push(syn::Error::new(
                    w.while_token.span,
                    "a loop cannot depend on graph values: `while cond!(..)` is not supported; loop in Rust over a fixed range and use `if cond!(..)` inside",
                ));
                unit()
            }
            Expr::Closure(c) => self.in_scope(|rw| {
                for input in &c.inputs {
                    rw.bind_pat(input, false);
                }
                Expr::Closure(fold::fold_expr_closure(rw, c))
            }),
            other => fold::fold_expr(self, other),
        }
    }

    fn fold_block(&mut self, b: Block) -> Block {
        self.in_scope(|rw| fold::fold_block(rw, b))
    }

    /// `log!(value);` as a statement: a print node.
    fn fold_stmt(&mut self, s: Stmt) -> Stmt {
        match s {
            Stmt::Macro(m) if m.mac.path.is_ident("log") || m.mac.path.is_ident("send") => {
                let semi = m.semi_token.unwrap_or_default();
                Stmt::Expr(self.log(m.mac), Some(semi))
            }
            Stmt::Macro(m) if m.mac.path.is_ident("call") => {
                let semi = m.semi_token.unwrap_or_default();
                Stmt::Expr(self.call_macro(m.mac), Some(semi))
            }
            Stmt::Macro(m) if m.mac.path.is_ident("cond") => {
                let semi = m.semi_token.unwrap_or_default();
                Stmt::Expr(self.misplaced_cond(&m.mac), Some(semi))
            }
            other => fold::fold_stmt(self, other),
        }
    }

    /// `let layer = model.transformer.h[3];` (or `&..`) binds an envoy variable `layer` (an `&Envoy`).
    fn fold_local(&mut self, l: Local) -> Local {
        let Local { attrs, let_token, pat, init, semi_token } = l;
        let mut alias = false;
        let init = init.map(|LocalInit { eq_token, expr, diverge }| {
            let target = match &*expr {
                Expr::Reference(r) if r.mutability.is_none() => &*r.expr,
                other => other,
            };
            let expr = if matches!(pat, Pat::Ident(_))
                && diverge.is_none()
                && self.path_kind(target) == Some(PathKind::Path)
            {
                alias = true;
                let s = gen(expr_span(&expr));
                let target = match *expr {
                    Expr::Reference(r) => *r.expr,
                    other => other,
                };
                let place = self.place(target);
                Box::new(Expr::Verbatim(quote_spanned!(s=> &#place)))
            } else {
                Box::new(self.fold_expr(*expr))
            };
            let diverge = diverge.map(|(else_token, e)| (else_token, Box::new(self.fold_expr(*e))));
            LocalInit { eq_token, expr, diverge }
        });
        self.bind_pat(&pat, alias);
        Local { attrs, let_token, pat, init, semi_token }
    }

    /// Arguments of function-like macros (`println!`, `vec!`, `assert!`) that mention the model are rewritten when
    /// they parse as comma-separated expressions.
    fn fold_macro(&mut self, mut m: Macro) -> Macro {
        if !mentions(&m.tokens, |i| i == self.root || self.is_alias(i)) {
            return m;
        }
        if let Ok(args) = Punctuated::<Expr, Token![,]>::parse_terminated.parse2(m.tokens.clone()) {
            let args: Punctuated<Expr, Token![,]> = args
                .into_pairs()
                .map(|p| {
                    let (e, comma) = p.into_tuple();
                    syn::punctuated::Pair::new(self.fold_expr(e), comma)
                })
                .collect();
            m.tokens = args.into_token_stream();
        }
        m
    }

    /// Items declared inside the body (`fn helper() {}`) are not part of the trace.
    fn fold_item(&mut self, i: syn::Item) -> syn::Item {
        i
    }
}

/// Source text as people write it: `model.h[0].output.norm()`, not `model . h [0] . output . norm ()`.
fn compact(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    for (i, &c) in chars.iter().enumerate() {
        if c == ' ' {
            let prev = out.chars().last();
            let next = chars.get(i + 1).copied();
            if prev.is_some_and(|p| ".([".contains(p)) || next.is_some_and(|n| ".([)],".contains(n)) {
                continue;
            }
        }
        out.push(c);
    }
    out
}
