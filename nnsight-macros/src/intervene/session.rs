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
    if errors.to_compile_errors().is_empty() {
        if let (Some(server), Some(blocks)) = (&server, one_request(&body)) {
            return one_request_session(&root, server, blocks);
        }
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
    let lets: Vec<Ident> = kept(&body.stream()).into_iter().map(|(n, _)| n).collect();
    let _ = errors;
    let keeps = lets.iter().map(keep);
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

/// The top-level `let`s of a block's body, which the session keeps for after it, with their `mut`. `invoke(..) {
/// .. }` blocks are not Rust statements: a body with them does not parse here, and its lets stay inside their
/// invokes (save them there); the trace's own parser reports real mistakes.
fn kept(body: &TokenStream) -> Vec<(Ident, bool)> {
    let mut lets = Vec::new();
    if let Ok(stmts) = syn::Block::parse_within.parse2(body.clone()) {
        lets_of(&stmts, &mut lets);
    }
    lets
}

/// The names the `let`s among `stmts` bind, with their `mut`.
fn lets_of(stmts: &[syn::Stmt], out: &mut Vec<(Ident, bool)>) {
    for stmt in stmts {
        if let syn::Stmt::Local(l) = stmt {
            super::rewrite::pat_bindings(&l.pat, out);
        }
    }
}

/// `let NAME = keep(NAME);`: a proxy is saved for the blocks and code after its block.
fn keep(name: &Ident) -> TokenStream {
    let s = Span::call_site().located_at(name.span());
    quote_spanned! {s=>
        #[allow(unused_variables)]
        let #name = {
            use ::nnsight::__private::{KeepPlain as _, KeepProxy as _, KeepProxies as _};
            (&&::nnsight::__private::Keep::new(#name)).__nn_keep()
        };
    }
}

/// One block of a session body made of blocks alone: its form token, args and body.
struct Block {
    form: Ident,
    args: Group,
    body: Group,
}

/// The blocks of `body` if it holds blocks that may run on a server (traces and generations) and nothing else at
/// its top level, each body readable here (statements, with or without `invoke` blocks); else `None` (then the
/// session runs block by block, Rust code between them).
fn one_request(body: &TokenStream) -> Option<Vec<Block>> {
    let tts: Vec<TokenTree> = body.clone().into_iter().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < tts.len() {
        let (TokenTree::Ident(form), Some(TokenTree::Group(args)), Some(TokenTree::Group(body))) =
            (&tts[i], tts.get(i + 1), tts.get(i + 2))
        else {
            return None;
        };
        let kind = Form::from_ident(form)?;
        if !kind.in_session()
            || !kind.may_be_remote()
            || args.delimiter() != Delimiter::Parenthesis
            || body.delimiter() != Delimiter::Brace
        {
            return None;
        }
        exports(&body.stream())?;
        blocks.push(Block { form: form.clone(), args: args.clone(), body: body.clone() });
        i += 3;
        if matches!(tts.get(i), Some(TokenTree::Punct(p)) if p.as_char() == ';') {
            i += 1;
        }
    }
    (!blocks.is_empty()).then_some(blocks)
}

/// Every binding a block's body leaves for after the block (its top-level `let`s and its invokes'), with their
/// `mut`; `None` if the body is not statements and `invoke(..) { .. }` blocks.
fn exports(body: &TokenStream) -> Option<Vec<(Ident, bool)>> {
    let tts: Vec<TokenTree> = body.clone().into_iter().collect();
    let mut rest = Vec::new();
    let mut lets = Vec::new();
    let mut i = 0;
    while i < tts.len() {
        if let (TokenTree::Ident(word), Some(TokenTree::Group(args)), Some(TokenTree::Group(inner))) =
            (&tts[i], tts.get(i + 1), tts.get(i + 2))
        {
            if word == "invoke" && args.delimiter() == Delimiter::Parenthesis && inner.delimiter() == Delimiter::Brace {
                lets_of(&syn::Block::parse_within.parse2(inner.stream()).ok()?, &mut lets);
                i += 3;
                continue;
            }
        }
        rest.push(tts[i].clone());
        i += 1;
    }
    lets_of(&syn::Block::parse_within.parse2(rest.into_iter().collect()).ok()?, &mut lets);
    Some(lets)
}

/// Whether `name` occurs in `tokens` as a variable (at any depth; not after a `.`, as a field or method).
fn mentions(tokens: &TokenStream, name: &Ident) -> bool {
    let mut after_dot = false;
    tokens.clone().into_iter().any(|t| {
        let found = match &t {
            TokenTree::Ident(i) => !after_dot && i == name,
            TokenTree::Group(g) => mentions(&g.stream(), name),
            _ => false,
        };
        after_dot = matches!(&t, TokenTree::Punct(p) if p.as_char() == '.');
        found
    })
}

/// A session of blocks alone on a server, sent as one request: each block is built and added to the session (a
/// value of an earlier block it names is imported: a reference to that block's node, resolved on the server); the
/// session runs once; then every binding the blocks left is finished, as after a block.
///
/// ```text
/// let __nn_sess = ::nnsight::__private::Session::new(&SERVER);
/// ::nnsight::intervene!(model.trace("a").__nn_session(__nn_sess) { let h = ..; KEEPS });
/// ::nnsight::intervene!(model.trace("b").__nn_session(__nn_sess) { let h = carry(h); BODY KEEPS });
/// let mut __nn_results = __nn_sess.run()?;
/// let h = finish(h);
/// ```
fn one_request_session(root: &Ident, server: &TokenStream, blocks: Vec<Block>) -> TokenStream {
    let sess = Ident::new("__nn_sess", Span::call_site());
    let mut out = quote! {
        #[allow(unused_variables)]
        let #sess = ::nnsight::__private::Session::new(::std::borrow::Borrow::borrow(&(#server)));
    };
    // Every binding left so far, with its `mut`, latest last.
    let mut bound: Vec<(Ident, bool)> = Vec::new();
    for b in blocks {
        let Block { form, args, body } = b;
        let stream = body.stream();
        let imports: TokenStream = bound
            .iter()
            .filter(|(name, _)| mentions(&stream, name))
            .map(|(name, mutable)| {
                let s = Span::call_site().located_at(name.span());
                let m = mutable.then(|| quote!(mut));
                quote_spanned! {s=>
                    #[allow(unused_variables, unused_mut)]
                    let #m #name = {
                        use ::nnsight::__private::{CarryPlain as _, CarrySaved as _, CarrySaveds as _, CarryUnsaved as _};
                        (&&&::nnsight::__private::Carry::new(#name)).__nn_carry(&#sess, __nn_g)
                    };
                }
            })
            .collect();
        let keeps: TokenStream = kept(&stream).iter().map(|(n, _)| keep(n)).collect();
        let inner = with_imports(stream.clone(), imports);
        let semi = (!keeps.is_empty()).then(|| quote!(;));
        let s = Span::call_site().located_at(form.span());
        let macro_path = quote_spanned!(s=> ::nnsight::intervene!);
        let args = args.stream();
        out.extend(quote! {
            #macro_path(#root.#form(#args).__nn_session(#sess) { #inner #semi #keeps });
        });
        for (name, mutable) in exports(&stream).unwrap_or_default() {
            bound.retain(|(n, _)| *n != name);
            bound.push((name, mutable));
        }
    }
    out.extend(quote! {
        #[allow(unused_mut, unused_variables)]
        let mut __nn_results = #sess.run()?;
    });
    for (name, mutable) in &bound {
        let s = Span::call_site().located_at(name.span());
        let m = mutable.then(|| quote!(mut));
        out.extend(quote_spanned! {s=>
            #[allow(unused_variables, unused_mut)]
            let #m #name = {
                use ::nnsight::__private::{FinishPlain as _, FinishSaved as _, FinishUnsaved as _};
                (&&&::nnsight::__private::finish(#name)).__nn_finish(&mut __nn_results)?
            };
        });
    }
    out
}

/// `body` with `imports` first: at its start, or at the start of its first invoke when it begins with one (the
/// graph's first invoke exists from there on).
fn with_imports(body: TokenStream, imports: TokenStream) -> TokenStream {
    let mut tts: Vec<TokenTree> = body.into_iter().collect();
    if let [TokenTree::Ident(word), TokenTree::Group(args), TokenTree::Group(inner), ..] = tts.as_slice() {
        if word == "invoke" && args.delimiter() == Delimiter::Parenthesis && inner.delimiter() == Delimiter::Brace {
            let mut stream = imports;
            stream.extend(inner.stream());
            let mut g = Group::new(Delimiter::Brace, stream);
            g.set_span(inner.span());
            tts[2] = TokenTree::Group(g);
            return tts.into_iter().collect();
        }
    }
    let mut out = imports;
    out.extend(tts);
    out
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
    fn a_remote_session_of_blocks_alone_is_one_request() {
        let tokens = quote!(model.session().remote(&server) {
            trace("a") { let h = model.x.output; }
            generate("b", &opts) { model.x.output = &h * 2.0; let g = model.x.output; }
            trace() { invoke("c") { let o = model.x.output + g; } }
        });
        let (root, session, args, body) = split(&tokens).expect("a session");
        let out = expand(root, session, args, body).to_string();
        assert_eq!(out.matches(". __nn_session (__nn_sess)").count(), 3, "{out}");
        assert_eq!(out.matches("__nn_sess . run ()").count(), 1, "{out}");
        // `h` is imported into the second block only, `g` into the third's invoke.
        assert_eq!(out.matches("Carry :: new (h)").count(), 1, "{out}");
        assert!(out.contains("invoke (\"c\") { # [allow (unused_variables , unused_mut)] let g"), "{out}");
        for name in ["h", "g", "o"] {
            assert!(out.contains(&format!("finish ({name})")), "{name}: {out}");
        }
        assert!(!out.contains(". remote ("), "{out}");
    }

    #[test]
    fn rust_code_between_blocks_keeps_one_request_per_block() {
        let tokens = quote!(model.session().remote(&server) {
            trace("a") { let h = model.x.output; }
            let k = 2.0;
            trace("b") { model.x.output = &h * k; }
        });
        let (root, session, args, body) = split(&tokens).expect("a session");
        let out = expand(root, session, args, body).to_string();
        assert!(!out.contains("__nn_session"), "{out}");
        assert_eq!(out.matches(". remote (& server)").count(), 2, "{out}");
        // A scan runs here: a session with one is sent block by block too.
        let tokens = quote!(model.session().remote(&server) { scan("a") { let h = model.x.output; } trace("b") {} });
        let (root, session, args, body) = split(&tokens).expect("a session");
        assert!(!expand(root, session, args, body).to_string().contains("__nn_session"));
    }

    #[test]
    fn a_session_without_traces_is_an_error() {
        let tokens = quote!(model.session(3) { let x = 1; });
        let (root, session, args, body) = split(&tokens).expect("a session");
        let out = expand(root, session, args, body).to_string();
        assert!(out.contains("takes no arguments") && out.contains("a session holds traces"), "{out}");
    }
}
