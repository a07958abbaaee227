//! Phase 1, parsing: the shape of an `intervene!` call.
//!
//! ```text
//! intervene!(ROOT.trace(INPUT?) { ITEM* })
//! intervene!(ROOT.scan(INPUT?) { ITEM* })     (the same block, run on shapes alone)
//! intervene!(ROOT.generate(INPUT, OPTIONS?) { ITEM* })   (several forward passes: decoding)
//! intervene!(ROOT.generate(OPTIONS?) { invoke(INPUT) { .. } ... })
//! intervene!(ROOT.edit() { STATEMENT* })      (a persistent edit; `edit_in_place` adds it to the model itself)
//! ITEM := a Rust statement | invoke(INPUT?) { STATEMENT* }
//! ```
//!
//! An `invoke(INPUT?) { .. }` may also stand inside a statement's block (a `for` loop's body, an `if`): it adds one
//! invoke each time that code runs, so a loop adds one per round, all run as one batch. Such a block becomes
//! `{ __nn_tr.invoke(INPUT)?; .. }` before the statements are parsed (see [`nested_invokes`]).
//!
//! Statements are parsed by syn and left as they are; only the frame (`ROOT.trace(..)`, `invoke(..)`) is ours.
//! Mistakes in the frame that still leave a usable shape (`tracee`, two inputs) are collected and parsing goes on,
//! so every one of them is reported in one build.

use super::form::Form;
use super::Errors;
use proc_macro2::{Delimiter, Group, TokenStream, TokenTree};
use syn::buffer::Cursor;
use syn::parse::{ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{braced, parenthesized, Expr, Ident, Stmt, Token};

/// Hook points of a module: `.output`, `.input`, `.inputs`.
pub const HOOK_POINTS: [&str; 3] = ["output", "input", "inputs"];

/// `ROOT.FORM(INPUT?) { ITEMS }`: `ROOT.trace(..) { .. }`, `ROOT.scan(..) { .. }`, ...
pub struct Intervene {
    /// The model's identifier: the root of every module path in the body.
    pub root: Ident,
    /// Which block it is (`trace` for an unknown one, which is reported).
    pub form: Form,
    /// The form's token, as written (errors about the trace target point at it).
    pub trace: Ident,
    /// The input of `ROOT.trace(INPUT)`, or none for `ROOT.trace()`.
    pub input: Option<Expr>,
    /// The options of `ROOT.generate(.., OPTIONS)`.
    pub options: Option<Expr>,
    /// The server of `ROOT.trace(..).remote(SERVER)`: the block runs there.
    pub remote: Option<Expr>,
    /// The session of `ROOT.trace(..).__nn_session(SESSION)`, written by a session sent as one request (see
    /// [`super::session`]): the block is added to it instead of run.
    pub session: Option<Ident>,
    /// The statements and invoke blocks of the body, in order.
    pub items: Vec<Item>,
}

/// One item of a trace body.
pub enum Item {
    /// A statement outside any invoke block.
    Stmt(Stmt),
    /// `invoke(INPUT?) { STATEMENTS }`.
    Invoke(Invoke),
}

/// `invoke(INPUT?) { STATEMENTS }`: one more batch entry (none: the whole batch) and what to do with it.
pub struct Invoke {
    /// The `invoke` token.
    pub keyword: Ident,
    /// The input, or none for the whole batch.
    pub input: Option<Expr>,
    /// The statements of the block.
    pub stmts: Vec<Stmt>,
}

/// Parses an `intervene!` call; frame errors that leave a usable shape go to `errors`, others are returned.
pub fn parse(tokens: TokenStream, errors: &mut Errors) -> syn::Result<Intervene> {
    let tokens = tuple_indices(tokens);
    let parser = |input: ParseStream| parse_intervene(input, errors);
    parser.parse2(tokens)
}

fn parse_intervene(input: ParseStream, errors: &mut Errors) -> syn::Result<Intervene> {
    const SHAPE: &str = "expected `intervene!(model.trace(input) { ... })`";
    if input.is_empty() {
        return Err(syn::Error::new(proc_macro2::Span::call_site(), SHAPE));
    }
    let root: Ident = input.parse().map_err(|e| syn::Error::new(e.span(), SHAPE))?;
    if !input.peek(Token![.]) {
        return Err(
            input.error(format!("expected `.trace(...)` after `{root}`: `intervene!({root}.trace(input) {{ ... }})`"))
        );
    }
    input.parse::<Token![.]>()?;
    let trace: Ident =
        input.parse().map_err(|e| syn::Error::new(e.span(), format!("expected `trace` after `{root}.`")))?;
    // An unknown form is reported, and the block read as a trace.
    let kind = Form::from_ident(&trace).unwrap_or_else(|| {
        errors.push(syn::Error::new(
            trace.span(),
            format!(
                "unknown form `{root}.{trace}(...)`: expected `{root}.trace(input) {{ ... }}`, `{root}.scan(input) {{ ... }}` to run it on shapes alone, `{root}.generate(input, options) {{ ... }}` to decode, or `{root}.edit() {{ ... }}` for a persistent edit"
            ),
        ));
        Form::Trace
    });
    // Messages name the form written (`trace` for an unknown one).
    let form = kind.name();
    if !input.peek(syn::token::Paren) {
        return Err(input
            .error(format!("expected `(...)` after `{root}.{trace}`: `{root}.{form}(input)` or `{root}.{form}()`")));
    }
    let args;
    parenthesized!(args in input);
    let generate_args = if kind.takes_options() {
        let all = Punctuated::<Expr, Token![,]>::parse_terminated(&args)?;
        if all.len() > 2 {
            errors.push(syn::Error::new(
                all.iter().nth(2).expect("three").span(),
                "`generate` takes an input and options (`generate(input, options)`), or only options with `invoke` blocks",
            ));
        }
        Some(all.into_iter().take(2).collect::<Vec<Expr>>())
    } else {
        None
    };
    let mut input_expr = match &generate_args {
        Some(_) => None,
        None if kind.is_edit() => {
            let all = Punctuated::<Expr, Token![,]>::parse_terminated(&args)?;
            if let Some(first) = all.first() {
                errors.push(syn::Error::new(
                    first.span(),
                    format!("`{form}` takes no input: an edit applies to every row of every later run, `{root}.{form}() {{ ... }}`"),
                ));
            }
            None
        }
        None => single_input(&args, &format!("`{form}` takes one input, or none with `invoke` blocks"), errors)?,
    };
    // `.remote(server)`: the block runs on a server.
    let mut remote = None;
    let mut session = None;
    if input.peek(Token![.]) {
        input.parse::<Token![.]>()?;
        let word: Ident = input.parse()?;
        if word == "__nn_session" && input.peek(syn::token::Paren) && kind.may_be_remote() {
            let inner;
            parenthesized!(inner in input);
            session = Some(inner.parse::<Ident>()?);
        } else if word != "remote" || !input.peek(syn::token::Paren) {
            return Err(syn::Error::new(
                word.span(),
                format!("expected `.remote(server)` or a block after `{root}.{form}(...)`"),
            ));
        } else {
            let server;
            parenthesized!(server in input);
            let e: Expr = server.parse()?;
            if !kind.may_be_remote() {
                errors.push(syn::Error::new(
                    word.span(),
                    format!("a {form} runs here (on shapes, or as an edit of the model): it cannot be `.remote(..)`"),
                ));
            } else {
                remote = Some(e);
            }
        }
    }
    if !input.peek(syn::token::Brace) {
        return Err(input.error(format!("expected a block `{{ ... }}` after `{root}.{form}(...)`")));
    }
    let body;
    braced!(body in input);
    let refusal = (!kind.may_have_invokes())
        .then_some("an edit has no `invoke` blocks: it applies to every row of every later run");
    let body: TokenStream = body.parse()?;
    let mut nested = Vec::new();
    let body = nested_invokes(body, true, refusal, &mut nested, errors)?;
    let items = (|input: ParseStream| parse_items(input, refusal, errors)).parse2(body)?;
    if input.peek(Token![;]) {
        input.parse::<Token![;]>()?;
    }
    if !input.is_empty() {
        return Err(input.error(format!("unexpected tokens after the {form} block")));
    }

    let invokes: Vec<&Invoke> = items
        .iter()
        .filter_map(|i| match i {
            Item::Invoke(inv) => Some(inv),
            Item::Stmt(_) => None,
        })
        .collect();
    // An invoke to point at: the first at the top of the body, else the first inside a statement's block.
    let first_invoke = invokes.first().map(|i| i.keyword.span()).or(nested.first().copied());
    // `generate(input, options?)` without invokes, `generate(options?)` with them.
    let mut options = None;
    if let Some(mut args) = generate_args {
        if first_invoke.is_none() {
            if args.len() == 2 {
                options = args.pop();
            }
            input_expr = args.pop();
        } else {
            if args.len() == 2 {
                errors.push(syn::Error::new(
                    args[0].span(),
                    format!("with `invoke` blocks, `generate` takes only the options: `{root}.generate(options) {{ invoke(input) {{ ... }} }}`"),
                ));
            }
            options = args.pop();
        }
    }
    match (&input_expr, first_invoke) {
        _ if kind.is_edit() => {}
        (Some(_), Some(first)) => errors.push(syn::Error::new(
            first,
            format!("`invoke` blocks need a {form} without input: `{root}.{form}() {{ invoke(input) {{ ... }} }}`"),
        )),
        (None, None) => errors.push(syn::Error::new(
            trace.span(),
            format!(
                "`{root}.{form}()` without input needs `invoke(input) {{ ... }}` blocks, or write `{root}.{form}(input)`"
            ),
        )),
        _ => {}
    }
    Ok(Intervene { root, form: kind, trace, input: input_expr, options, remote, session, items })
}

/// The one optional input of `trace(..)` / `invoke(..)`; a second one is reported and dropped.
fn single_input(args: ParseStream, message: &str, errors: &mut Errors) -> syn::Result<Option<Expr>> {
    let args = Punctuated::<Expr, Token![,]>::parse_terminated(args)?;
    let mut args = args.into_iter();
    let first = args.next();
    if let Some(extra) = args.next() {
        errors.push(syn::Error::new(extra.span(), message));
    }
    Ok(first)
}

/// Statements and invoke blocks up to the end of `input`; an invoke block is reported with `refusal` when given.
fn parse_items(input: ParseStream, refusal: Option<&str>, errors: &mut Errors) -> syn::Result<Vec<Item>> {
    let mut items = Vec::new();
    while !input.is_empty() {
        if is_invoke(input.cursor()) {
            let keyword: Ident = input.parse()?;
            let args;
            parenthesized!(args in input);
            let input_expr = single_input(&args, "`invoke` takes one input, or none for the whole batch", errors)?;
            let body;
            braced!(body in input);
            let inner = parse_items(&body, Some("`invoke` blocks cannot be nested"), errors)?;
            if input.peek(Token![;]) {
                input.parse::<Token![;]>()?;
            }
            if let Some(refusal) = refusal {
                errors.push(syn::Error::new(keyword.span(), refusal));
                items.extend(inner);
                continue;
            }
            let stmts = inner
                .into_iter()
                .filter_map(|i| match i {
                    Item::Stmt(s) => Some(s),
                    Item::Invoke(_) => None,
                })
                .collect();
            items.push(Item::Invoke(Invoke { keyword, input: input_expr, stmts }));
        } else if input.peek(Token![;]) {
            input.parse::<Token![;]>()?;
        } else {
            items.push(Item::Stmt(parse_stmt(input)?));
        }
    }
    Ok(items)
}

/// The body's tokens with every `invoke(INPUT?) { BODY }` that stands inside a statement's block turned into
/// `{ __nn_tr.invoke(INPUT)?; BODY }`, spanned at the `invoke` token, its span pushed to `nested` (or, with a
/// `refusal`, reported and its body kept as a plain block). At the `top` of the body an invoke block stays as it is
/// for [`parse_items`]; inside any invoke block another one is reported: invokes do not nest.
fn nested_invokes(
    tokens: TokenStream,
    top: bool,
    refusal: Option<&str>,
    nested: &mut Vec<proc_macro2::Span>,
    errors: &mut Errors,
) -> syn::Result<TokenStream> {
    const NESTED: Option<&str> = Some("`invoke` blocks cannot be nested");
    let trees: Vec<TokenTree> = tokens.into_iter().collect();
    let mut out: Vec<TokenTree> = Vec::new();
    let mut i = 0;
    while i < trees.len() {
        let invoke = match (&trees[i], trees.get(i + 1), trees.get(i + 2)) {
            (TokenTree::Ident(kw), Some(TokenTree::Group(args)), Some(TokenTree::Group(body)))
                if kw == "invoke"
                    && args.delimiter() == Delimiter::Parenthesis
                    && body.delimiter() == Delimiter::Brace
                    // Not a method or path segment (`x.invoke(..)`, `a::invoke(..)`).
                    && !matches!(out.last(), Some(TokenTree::Punct(p)) if p.as_char() == '.' || p.as_char() == ':') =>
            {
                Some((kw.clone(), args.clone(), body.clone()))
            }
            _ => None,
        };
        let Some((kw, args, body)) = invoke else {
            match &trees[i] {
                TokenTree::Group(g) => {
                    let inner = nested_invokes(g.stream(), false, refusal, nested, errors)?;
                    out.push(regroup(g, inner));
                }
                other => out.push(other.clone()),
            }
            i += 1;
            continue;
        };
        i += 3;
        let inner = nested_invokes(body.stream(), false, NESTED, nested, errors)?;
        if top {
            out.extend([TokenTree::Ident(kw), TokenTree::Group(args), regroup(&body, inner)]);
            continue;
        }
        let call = if let Some(refusal) = refusal {
            errors.push(syn::Error::new(kw.span(), refusal));
            TokenStream::new()
        } else {
            nested.push(kw.span());
            // The input as a top-level invoke takes it: one expression, or none for the whole batch.
            let message = "`invoke` takes one input, or none for the whole batch";
            let input = (|args: ParseStream| single_input(args, message, errors)).parse2(args.stream())?;
            let s = super::rewrite::gen(kw.span());
            let input = super::rewrite::option_input(input.as_ref(), s);
            let tr = Ident::new("__nn_tr", s);
            quote::quote_spanned!(s=> #tr.invoke(#input)?;)
        };
        let mut block = Group::new(Delimiter::Brace, quote::quote!(#call #inner));
        block.set_span(body.span());
        out.push(TokenTree::Group(block));
    }
    Ok(out.into_iter().collect())
}

/// `g`'s delimiter and span around new contents.
fn regroup(g: &Group, inner: TokenStream) -> TokenTree {
    let mut group = Group::new(g.delimiter(), inner);
    group.set_span(g.span());
    TokenTree::Group(group)
}

/// `invoke ( .. ) { .. }` at the cursor.
fn is_invoke(cursor: Cursor) -> bool {
    let Some((ident, rest)) = cursor.ident() else { return false };
    if ident != "invoke" {
        return false;
    }
    let Some((_, _, rest)) = rest.group(Delimiter::Parenthesis) else { return false };
    rest.group(Delimiter::Brace).is_some()
}

/// One statement; the last one of a block (or the one before an invoke block) may lack its `;`.
fn parse_stmt(input: ParseStream) -> syn::Result<Stmt> {
    use syn::parse::discouraged::Speculative;
    let fork = input.fork();
    match fork.parse::<Stmt>() {
        Ok(stmt) => {
            input.advance_to(&fork);
            Ok(stmt)
        }
        Err(err) => {
            let tokens = input.step(|cursor| {
                let mut rest = *cursor;
                let mut tokens = TokenStream::new();
                while !rest.eof() && !is_invoke(rest) {
                    let (tt, next) = rest.token_tree().expect("not at the end");
                    tokens.extend([tt]);
                    rest = next;
                }
                Ok((tokens, rest))
            })?;
            syn::parse2::<Stmt>(quote::quote!(#tokens ;)).map_err(|_| err)
        }
    }
}

/// `x.output[a, b]` is not Rust syntax; it becomes `x.output[(a, b)]`, a tuple index as tch's `.i((a, b))` takes.
/// Only brackets right after a hook point name are touched.
pub fn tuple_indices(tokens: TokenStream) -> TokenStream {
    let mut out = Vec::new();
    let mut after_hook = false;
    for tt in tokens {
        let next_after_hook = matches!(&tt, TokenTree::Ident(i) if HOOK_POINTS.iter().any(|h| i == h));
        let tt = match tt {
            TokenTree::Group(g) => {
                let inner = tuple_indices(g.stream());
                let inner = if after_hook && g.delimiter() == Delimiter::Bracket && has_top_level_comma(&inner) {
                    let mut paren = Group::new(Delimiter::Parenthesis, inner);
                    paren.set_span(g.span());
                    TokenStream::from(TokenTree::Group(paren))
                } else {
                    inner
                };
                let mut group = Group::new(g.delimiter(), inner);
                group.set_span(g.span());
                TokenTree::Group(group)
            }
            other => other,
        };
        after_hook = next_after_hook;
        out.push(tt);
    }
    out.into_iter().collect()
}

fn has_top_level_comma(tokens: &TokenStream) -> bool {
    tokens.clone().into_iter().any(|tt| matches!(tt, TokenTree::Punct(p) if p.as_char() == ','))
}

#[cfg(test)]
mod tests;
