//! Which top-level bindings of the block are handed on after it (see [`Exports`]).

use super::syntax::{is_compound, is_hook, mentions, pat_bindings, single_ident};
use super::Export;
use std::collections::HashSet;
use syn::visit::{self, Visit};
use syn::{Expr, Ident, Macro, Member, Stmt};

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
