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

mod graph_forms;

use super::parse::{Intervene, Item, HOOK_POINTS};
use super::Errors;
use proc_macro2::{Span, TokenStream, TokenTree};
use quote::{quote, quote_spanned, ToTokens};
use std::collections::{HashMap, HashSet};
use syn::fold::{self, Fold};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::visit::{self, Visit};
use syn::{BinOp, Block, Expr, ExprForLoop, Ident, Local, LocalInit, Macro, Member, Pat, Stmt, Token};

/// The body after rewriting, and the bindings to hand on.
pub struct Rewritten {
    /// The model's identifier.
    pub root: Ident,
    /// The `trace` token.
    pub trace: Ident,
    /// The input of `ROOT.trace(INPUT)`.
    pub input: Option<Expr>,
    /// The options of `ROOT.generate(.., OPTIONS)`.
    pub options: Option<Expr>,
    /// The server of `.remote(SERVER)`.
    pub remote: Option<Expr>,
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
    let Intervene { root, trace, input, options, remote, items } = ast;
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
    Rewritten { root, trace, input, options, remote, items, exports }
}

/// A span with the call site's hygiene (generated names resolve as if written by the user, lints see macro
/// output) at the location of the user's token `at`.
pub fn gen(at: Span) -> Span {
    Span::call_site().located_at(at)
}

/// What a chain of field accesses and indexing is rooted at.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum PathKind {
    /// The model identifier itself: `model` (stays the real model).
    Root,
    /// An envoy variable itself: `layer`.
    Alias,
    /// A module path with at least one field or index: `model.lm_head`, `layer.mlp`.
    Path,
}

/// The expression rewriter (a [`Fold`] over the body).
pub struct Rewriter<'a> {
    root: &'a Ident,
    /// Innermost last: for each name bound in a scope, whether it holds an envoy (`&Envoy`).
    scopes: Vec<HashMap<String, bool>>,
    errors: &'a mut Errors,
}

impl<'a> Rewriter<'a> {
    /// A rewriter of paths rooted at `root`.
    pub fn new(root: &'a Ident, errors: &'a mut Errors) -> Self {
        Rewriter { root, scopes: vec![HashMap::new()], errors }
    }

    fn is_alias(&self, name: &Ident) -> bool {
        for scope in self.scopes.iter().rev() {
            if let Some(&alias) = scope.get(&name.to_string()) {
                return alias;
            }
        }
        false
    }

    fn bind(&mut self, name: &Ident, alias: bool) {
        self.scopes.last_mut().expect("a scope").insert(name.to_string(), alias);
    }

    fn bind_pat(&mut self, pat: &Pat, alias: bool) {
        let mut names = Vec::new();
        pat_bindings(pat, &mut names);
        for (name, _) in names {
            self.bind(&name, alias);
        }
    }

    fn in_scope<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        self.scopes.push(HashMap::new());
        let out = f(self);
        self.scopes.pop();
        out
    }

    /// Whether `e` is the model, an envoy variable, or a module path over them.
    fn path_kind(&self, e: &Expr) -> Option<PathKind> {
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
    fn is_hook_point(&self, e: &Expr) -> bool {
        match e {
            Expr::Field(f) => matches!(&f.member, Member::Named(n) if is_hook(n)) && self.path_kind(&f.base).is_some(),
            Expr::Index(i) => matches!(&*i.expr, Expr::Field(_)) && self.is_hook_point(&i.expr),
            _ => false,
        }
    }

    /// A module path as a place of its envoy's type. `e` must satisfy [`Self::path_kind`].
    fn place(&mut self, e: Expr) -> TokenStream {
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
    fn hook_parts(&mut self, e: Expr) -> (TokenStream, Token![.], Ident, Option<(Expr, Span)>) {
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
    fn read(&mut self, e: Expr) -> Expr {
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
    fn write(&mut self, left: Expr, value: TokenStream, eq_span: Span) -> Expr {
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

fn single_ident(p: &syn::ExprPath) -> Option<&Ident> {
    if p.qself.is_none() && p.attrs.is_empty() {
        p.path.get_ident()
    } else {
        None
    }
}

fn is_hook(name: &Ident) -> bool {
    HOOK_POINTS.iter().any(|h| name == h)
}

fn is_compound(op: &BinOp) -> bool {
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
fn is_operand(e: &Expr) -> bool {
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

fn unit() -> Expr {
    Expr::Verbatim(quote!(()))
}

fn expr_span(e: &Expr) -> Span {
    first_span(e)
}

/// The span of the first token of `t` (a whole expression's span needs nightly `join`).
fn first_span(t: &impl ToTokens) -> Span {
    t.to_token_stream().into_iter().next().map(|t| t.span()).unwrap_or_else(Span::call_site)
}

/// Whether any identifier in `tokens` (groups included) satisfies `pred`.
fn mentions(tokens: &TokenStream, pred: impl Fn(&Ident) -> bool + Copy) -> bool {
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

/// Which top-level bindings are handed on after the block.
///
/// Every top-level binding stays in scope after the block. One that may hold a proxy (its initializer mentions a
/// module path, an ad-hoc call, `.save()` or another such binding; or a later statement pushes or assigns such a
/// value into it) is re-bound through `finish`: a saved proxy becomes its value, an unsaved one becomes unusable,
/// anything else passes unchanged. The others (a steering `Tensor`, a counter) are not touched at all, so moving
/// them into the graph inside the block (`model.x.output += steer;`) stays legal. A name bound twice is finished
/// once, as its last binding.
pub struct Exports {
    root: Ident,
    /// Top-level bindings seen so far, in order: (name, mut, may hold a proxy).
    bindings: Vec<(Ident, bool, bool)>,
    /// Names whose current binding may hold a proxy.
    tainted: HashSet<String>,
}

impl Exports {
    /// No bindings yet.
    pub fn new(root: &Ident) -> Self {
        Exports { root: root.clone(), bindings: Vec::new(), tainted: HashSet::new() }
    }

    /// Takes note of one top-level statement (before it is rewritten).
    pub fn see(&mut self, stmt: &Stmt) {
        if let Stmt::Local(l) = stmt {
            let proxy = l.init.as_ref().is_some_and(|init| {
                self.proxy_like(&init.expr) || init.diverge.as_ref().is_some_and(|(_, e)| self.proxy_like(e))
            });
            let mut names = Vec::new();
            pat_bindings(&l.pat, &mut names);
            for (name, mutable) in names {
                if proxy {
                    self.tainted.insert(name.to_string());
                } else {
                    self.tainted.remove(&name.to_string());
                }
                self.bindings.push((name, mutable, proxy));
            }
            return;
        }
        // `hs.push(model.x.output.save())`, `acc = acc + model.x.output`, also inside loops.
        let mut sinks = Sinks { exports: self, found: Vec::new() };
        sinks.visit_stmt(stmt);
        for name in sinks.found {
            self.tainted.insert(name.to_string());
            if let Some(b) = self.bindings.iter_mut().rev().find(|b| b.0 == name) {
                b.2 = true;
            }
        }
    }

    /// The bindings to finish: the last binding of each name, where it may hold a proxy, in order.
    pub fn finish(self) -> Vec<Export> {
        let mut seen = HashSet::new();
        let mut out: Vec<Export> = self
            .bindings
            .into_iter()
            .rev()
            .filter(|(name, _, _)| seen.insert(name.to_string()))
            .filter(|(_, _, proxy)| *proxy)
            .map(|(name, mutable, _)| Export { name, mutable })
            .collect();
        out.reverse();
        out
    }

    /// Whether `e` may produce a proxy.
    fn proxy_like(&self, e: &Expr) -> bool {
        let mut m = Mentions { exports: self, found: false };
        m.visit_expr(e);
        m.found
    }

    fn is_bound(&self, name: &Ident) -> bool {
        self.bindings.iter().any(|b| b.0 == *name)
    }
}

/// Finds what makes an expression proxy-like.
struct Mentions<'a> {
    exports: &'a Exports,
    found: bool,
}

impl Mentions<'_> {
    /// `model.a.b[..]` with at least one field or index.
    fn rooted_at_model(&self, e: &Expr) -> bool {
        let mut cur = e;
        let mut depth = 0;
        loop {
            match cur {
                Expr::Field(f) => cur = &f.base,
                Expr::Index(i) => cur = &i.expr,
                Expr::Path(p) => return depth > 0 && single_ident(p).is_some_and(|i| *i == self.exports.root),
                _ => return false,
            }
            depth += 1;
        }
    }
}

impl<'ast> Visit<'ast> for Mentions<'_> {
    fn visit_expr(&mut self, e: &'ast Expr) {
        if self.found {
            return;
        }
        match e {
            Expr::Path(p) if single_ident(p).is_some_and(|i| self.exports.tainted.contains(&i.to_string())) => {
                self.found = true
            }
            Expr::Field(_) | Expr::Index(_) if self.rooted_at_model(e) => self.found = true,
            Expr::Field(f) if matches!(&f.member, Member::Named(n) if is_hook(n)) => self.found = true,
            Expr::MethodCall(m)
                if m.method == "save"
                    || ((m.args.len() == 1 || m.method == "cache" || m.method == "generated")
                        && matches!(&*m.receiver, Expr::Path(p) if single_ident(p).is_some_and(|i| *i == self.exports.root))) =>
            {
                self.found = true
            }
            _ => visit::visit_expr(self, e),
        }
    }

    fn visit_macro(&mut self, m: &'ast Macro) {
        let root = &self.exports.root;
        let tainted = &self.exports.tainted;
        if mentions(&m.tokens, |i| i == root || i == "save" || tainted.contains(&i.to_string())) {
            self.found = true;
        }
    }

    fn visit_item(&mut self, _: &'ast syn::Item) {}
}

/// Finds top-level bindings that a statement fills with proxy-like values.
struct Sinks<'a> {
    exports: &'a Exports,
    found: Vec<Ident>,
}

impl Sinks<'_> {
    /// The variable at the base of `x`, `x.f`, `x[i]`, if it is a top-level binding.
    fn base(&self, e: &Expr) -> Option<Ident> {
        match e {
            Expr::Path(p) => single_ident(p).filter(|i| self.exports.is_bound(i)).cloned(),
            Expr::Field(f) => self.base(&f.base),
            Expr::Index(i) => self.base(&i.expr),
            _ => None,
        }
    }
}

impl<'ast> Visit<'ast> for Sinks<'_> {
    fn visit_expr(&mut self, e: &'ast Expr) {
        match e {
            Expr::MethodCall(m) if m.args.iter().any(|a| self.exports.proxy_like(a)) => {
                if let Some(name) = self.base(&m.receiver) {
                    self.found.push(name);
                }
            }
            Expr::Assign(a) if self.exports.proxy_like(&a.right) => {
                if let Some(name) = self.base(&a.left) {
                    self.found.push(name);
                }
            }
            Expr::Binary(b) if is_compound(&b.op) && self.exports.proxy_like(&b.right) => {
                if let Some(name) = self.base(&b.left) {
                    self.found.push(name);
                }
            }
            _ => {}
        }
        visit::visit_expr(self, e);
    }

    fn visit_item(&mut self, _: &'ast syn::Item) {}
}
