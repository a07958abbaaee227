//! `intervene!(model.session() { .. })`: several traces (and generations) in one block, with ordinary Rust between
//! and around them (loops included). Each `trace(INPUT) { .. }`, `trace() { invoke(..) { .. } .. }`,
//! `scan(..) { .. }` or `generate(..) { .. }` in the body, at any depth, becomes an `intervene!` of its own on the
//! session's model; every top-level `let` of its body is kept for after it (a proxy is saved automatically), so a
//! value of one trace is usable in a later one without `.save()`.
//!
//! ```text
//! intervene!(model.session() {
//!     trace("a") { let h = model.model.layers[5].output; }
//!     for i in 0..3 {
//!         trace("b") { model.model.layers[5].output = h * i as f64; let o = model.output; }
//!     }
//! })
//! ```
//!
//! expands to the statements, with each block replaced by
//! `::nnsight::intervene!(model.trace("a") { let h = ..; let h = ::nnsight::__private::keep(__nn_g, h); })`.

use super::form::Form;
use super::Errors;
use proc_macro2::{Delimiter, Group, Ident, Span, TokenStream, TokenTree};
use quote::{quote, quote_spanned};

use syn::parse::Parser;

/// Whether `tokens` is `ROOT.session(..) { .. }`; returns the root, the `session` token and the body.
pub fn split(tokens: &TokenStream) -> Option<(Ident, Ident, TokenStream, TokenStream)> {
    let tts: Vec<TokenTree> = tokens.clone().into_iter().collect();
    // `ROOT.session(ARGS).remote(SERVER) { BODY }`: the server travels with the arguments, after a `;`.
    if let [TokenTree::Ident(root), TokenTree::Punct(dot), TokenTree::Ident(form), TokenTree::Group(args), TokenTree::Punct(dot2), TokenTree::Ident(remote), TokenTree::Group(server), TokenTree::Group(body), rest @ ..] =
        tts.as_slice()
    {
        if dot.as_char() == '.'
            && dot2.as_char() == '.'
            && form == "session"
            && remote == "remote"
            && args.delimiter() == Delimiter::Parenthesis
            && server.delimiter() == Delimiter::Parenthesis
            && body.delimiter() == Delimiter::Brace
            && rest.iter().all(|t| matches!(t, TokenTree::Punct(p) if p.as_char() == ';'))
        {
            let s = server.stream();
            let a = args.stream();
            return Some((root.clone(), form.clone(), quote!(#a ; remote #s), body.stream()));
        }
    }
    match tts.as_slice() {
        [TokenTree::Ident(root), TokenTree::Punct(dot), TokenTree::Ident(form), TokenTree::Group(args), TokenTree::Group(body), rest @ ..]
            if dot.as_char() == '.'
                && form == "session"
                && args.delimiter() == Delimiter::Parenthesis
                && body.delimiter() == Delimiter::Brace
                && rest.iter().all(|t| matches!(t, TokenTree::Punct(p) if p.as_char() == ';')) =>
        {
            Some((root.clone(), form.clone(), args.stream(), body.stream()))
        }
        _ => None,
    }
}

/// Expands a session.
pub fn expand(root: Ident, session: Ident, args: TokenStream, body: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    // `ARGS ; remote SERVER` (see `split`).
    let tts: Vec<TokenTree> = args.into_iter().collect();
    let cut = tts.iter().position(|t| matches!(t, TokenTree::Punct(p) if p.as_char() == ';'));
    let (args, server): (Vec<TokenTree>, Option<TokenStream>) = match cut {
        Some(i) => (tts[..i].to_vec(), Some(tts[i + 2..].iter().cloned().collect())),
        None => (tts, None),
    };
    if !args.is_empty() {
        errors.push(syn::Error::new(session.span(), "`session()` takes no arguments"));
    }
    let mut count = 0;
    let body = rewrite(body, &root, server.as_ref(), &mut errors, &mut count);
    if count == 0 {
        errors.push(syn::Error::new(
            session.span(),
            format!("a session holds traces: `{root}.session() {{ trace(input) {{ ... }} trace(input) {{ ... }} }}`"),
        ));
    }
    let mut out = errors.to_compile_errors();
    out.extend(body);
    out
}

/// Replaces every `FORM(ARGS) { BODY }` (at any depth) by an `intervene!` of it on `root`.
fn rewrite(
    tokens: TokenStream,
    root: &Ident,
    server: Option<&TokenStream>,
    errors: &mut Errors,
    count: &mut usize,
) -> TokenStream {
    let tts: Vec<TokenTree> = tokens.into_iter().collect();
    let mut out = Vec::with_capacity(tts.len());
    let mut i = 0;
    while i < tts.len() {
        if let (TokenTree::Ident(form), Some(TokenTree::Group(args)), Some(TokenTree::Group(body))) =
            (&tts[i], tts.get(i + 1), tts.get(i + 2))
        {
            let after_dot = i > 0 && matches!(&tts[i - 1], TokenTree::Punct(p) if p.as_char() == '.');
            let shape =
                !after_dot && args.delimiter() == Delimiter::Parenthesis && body.delimiter() == Delimiter::Brace;
            if let Some(kind) = Form::from_ident(form).filter(|kind| kind.in_session() && shape) {
                *count += 1;
                out.extend(block(form, kind, args, body, root, server, errors));
                i += 3;
                // The block is a statement: a `;` after it is optional.
                if matches!(tts.get(i), Some(TokenTree::Punct(p)) if p.as_char() == ';') {
                    i += 1;
                }
                continue;
            }
        }
        match &tts[i] {
            TokenTree::Group(g) => {
                let inner = rewrite(g.stream(), root, server, errors, count);
                let mut ng = Group::new(g.delimiter(), inner);
                ng.set_span(g.span());
                out.push(TokenTree::Group(ng));
            }
            other => out.push(other.clone()),
        }
        i += 1;
    }
    out.into_iter().collect()
}

/// One block of the session: `::nnsight::intervene!(ROOT.FORM(ARGS) { BODY KEEPS });` (`form` is `kind`'s token).
fn block(
    form: &Ident,
    kind: Form,
    args: &Group,
    body: &Group,
    root: &Ident,
    server: Option<&TokenStream>,
    errors: &mut Errors,
) -> TokenStream {
    let s = Span::call_site().located_at(form.span());
    let mut lets = Vec::new();
    // `invoke(..) { .. }` blocks are not Rust statements: a body with them does not parse here, and its lets
    // stay inside their invokes (save them there); the trace's own parser reports real mistakes.
    if let Ok(stmts) = syn::Block::parse_within.parse2(body.stream()) {
        for stmt in &stmts {
            if let syn::Stmt::Local(l) = stmt {
                let mut names = Vec::new();
                super::rewrite::pat_bindings(&l.pat, &mut names);
                lets.extend(names.into_iter().map(|(n, _)| n));
            }
        }
    }
    let _ = errors;
    let keeps = lets.iter().map(|name| {
        let s = Span::call_site().located_at(name.span());
        quote_spanned! {s=>
            #[allow(unused_variables)]
            let #name = {
                use ::nnsight::__private::{KeepPlain as _, KeepProxy as _, KeepProxies as _};
                (&&::nnsight::__private::Keep::new(#name)).__nn_keep()
            };
        }
    });
    let args = args.stream();
    let inner = body.stream();
    let macro_path = quote_spanned!(s=> ::nnsight::intervene!);
    let semi = (!lets.is_empty()).then(|| quote_spanned!(s=> ;));
    // On a server, every block that may run there does (not a scan, which runs here, on shapes).
    let remote = server.filter(|_| kind.may_be_remote()).map(|s| quote!(.remote(#s)));
    quote! {
        #macro_path(#root.#form(#args) #remote { #inner #semi #(#keeps)* });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_at_any_depth_becomes_an_intervene() {
        let tokens = quote!(model.session() {
            trace("a") { let h = model.x.output; }
            for i in 0..2 { trace("b") { model.x.output = h; }; }
            let t = x.trace(1);
        });
        let (root, session, args, body) = split(&tokens).expect("a session");
        let out = expand(root, session, args, body).to_string();
        assert_eq!(out.matches(":: nnsight :: intervene !").count(), 2, "{out}");
        assert!(out.contains("Keep :: new (h)"), "{out}");
        assert!(out.contains("x . trace (1)"), "a method named trace stays: {out}");
    }

    #[test]
    fn a_session_without_traces_is_an_error() {
        let tokens = quote!(model.session(3) { let x = 1; });
        let (root, session, args, body) = split(&tokens).expect("a session");
        let out = expand(root, session, args, body).to_string();
        assert!(out.contains("takes no arguments") && out.contains("a session holds traces"), "{out}");
    }
}
