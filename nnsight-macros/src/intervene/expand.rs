//! Phase 3, expansion: the trace, the body as flat statements (so its `let`s stay in scope), the run, and the
//! re-binding of every exported binding (a saved proxy becomes its value).
//!
//! ```text
//! let __nn_tr = ::nnsight::__private::Trace::new(&model, Some(::core::convert::Into::into(INPUT)))?;  // Scan::new for a scan
//! let __nn_root = __nn_tr.root();
//! let __nn_g = __nn_tr.graph();
//! __nn_tr.invoke(Some(::core::convert::Into::into(A)))?;     // per invoke block, then its statements
//! BODY
//! let mut __nn_results = __nn_tr.run()?;
//! let h5 = { use ...; (&&&::nnsight::__private::finish(h5)).__nn_finish(&mut __nn_results)? };
//! ```

use super::form::Form;
use super::parse::Item;
use super::rewrite::{gen, option_input, Export, Rewritten};
use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{Expr, Ident, Stmt};

/// The statements that replace the `intervene!` call.
pub fn expand(r: Rewritten) -> TokenStream {
    let s = gen(r.trace.span());
    // The runtime type that builds and runs the block. A scan runs the same graph on the model's meta twin;
    // everything else is the same code. A generation runs it over one forward pass per new token, with options.
    let kind = match r.form {
        Form::Trace => quote_spanned!(s=> Trace),
        Form::Scan => quote_spanned!(s=> Scan),
        Form::Generate => quote_spanned!(s=> Generate),
        Form::Edit => return expand_edit(r, "finish"),
        Form::EditInPlace => return expand_edit(r, "in_place"),
    };
    let root = &r.root;
    let input = option_input(r.input.as_ref(), s);
    let extra = if r.form.takes_options() {
        match &r.options {
            Some(o) => {
                let so = gen(o.span());
                quote_spanned!(so=> , ::core::option::Option::Some(::std::borrow::Borrow::borrow(&(#o))))
            }
            None => quote_spanned!(s=> , ::core::option::Option::None),
        }
    } else {
        TokenStream::new()
    };
    let mut out = quote_spanned! {s=>
        #[allow(unused_variables)]
        let __nn_tr = ::nnsight::__private::#kind::new(&#root, #input #extra)?;
        #[allow(unused_variables)]
        let __nn_root = __nn_tr.root();
        #[allow(unused_variables)]
        let __nn_g = __nn_tr.graph();
    };
    if let Some(server) = &r.remote {
        let rs = gen(server.span());
        out.extend(quote_spanned!(rs=> __nn_tr.remote(::std::borrow::Borrow::borrow(&(#server)));));
    }
    for item in r.items {
        match item {
            Item::Stmt(stmt) => out.extend(statement(stmt)),
            Item::Invoke(inv) => {
                let s = gen(inv.keyword.span());
                let input = option_input(inv.input.as_ref(), s);
                out.extend(quote_spanned!(s=> __nn_tr.invoke(#input)?;));
                out.extend(inv.stmts.into_iter().map(statement));
            }
        }
    }
    if let Some(session) = &r.session {
        // In a session sent as one request: the block joins it; the session runs and finishes the bindings.
        out.extend(quote_spanned!(s=> #session.add(&__nn_tr)?;));
        return out;
    }
    out.extend(quote_spanned! {s=>
        #[allow(unused_mut, unused_variables)]
        let mut __nn_results = __nn_tr.run()?;
    });
    out.extend(r.exports.iter().map(finish));
    out
}

/// An edit block: one expression, the edited model (`edit`, `end` is `finish`) or `()` after adding the edit to the
/// model (`edit_in_place`, `end` is `in_place`). Its bindings stay inside (an edit keeps no values).
///
/// ```text
/// { let __nn_tr = model.__nn_edit()?; ...; BODY; __nn_tr.END()? }
/// ```
fn expand_edit(r: Rewritten, end: &str) -> TokenStream {
    let s = gen(r.trace.span());
    let root = &r.root;
    let end = Ident::new(end, s);
    let mut body = TokenStream::new();
    for item in r.items {
        match item {
            Item::Stmt(stmt) => body.extend(statement(stmt)),
            Item::Invoke(inv) => body.extend(inv.stmts.into_iter().map(statement)),
        }
    }
    quote_spanned! {s=>
        {
            #[allow(unused_variables)]
            let __nn_tr = {
                use ::nnsight::__private::IntoEditBlock as _;
                #root.__nn_edit()?
            };
            #[allow(unused_variables)]
            let __nn_root = __nn_tr.root();
            #[allow(unused_variables)]
            let __nn_g = __nn_tr.graph();
            #body
            __nn_tr.#end()?
        }
    }
}

/// A statement of the body; an expression without `;` (last in a block) gets one, as it is no longer last.
fn statement(stmt: Stmt) -> TokenStream {
    match stmt {
        Stmt::Expr(e, None) if !is_block_like(&e) => {
            let semi = quote_spanned!(gen(Span::call_site())=> ;);
            quote!(#e #semi)
        }
        other => other.into_token_stream(),
    }
}

/// Expressions that end a statement without `;`.
fn is_block_like(e: &Expr) -> bool {
    matches!(
        e,
        Expr::If(_)
            | Expr::Match(_)
            | Expr::ForLoop(_)
            | Expr::While(_)
            | Expr::Loop(_)
            | Expr::Block(_)
            | Expr::Unsafe(_)
            | Expr::TryBlock(_)
            | Expr::Const(_)
    )
}

/// `let NAME = finish(NAME)`: a saved proxy becomes its value, an unsaved one `NotSaved`, anything else itself.
fn finish(e: &Export) -> TokenStream {
    let name = &e.name;
    let s = gen(name.span());
    let mutability = e.mutable.then(|| quote_spanned!(s=> mut));
    quote_spanned! {s=>
        #[allow(unused_variables, unused_mut)]
        let #mutability #name = {
            use ::nnsight::__private::{FinishPlain as _, FinishSaved as _, FinishUnsaved as _};
            (&&&::nnsight::__private::finish(#name)).__nn_finish(&mut __nn_results)?
        };
    }
}
