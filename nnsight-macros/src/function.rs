//! `#[nnsight::function]`: an ordinary Rust `fn` over tensors and numbers, also callable inside `intervene!`
//! (`call!(f(h, 2.0))`) as a graph node, and registered by its full name so that a graph from elsewhere can call
//! it.
//!
//! For `fn clamp_norm(x: &Tensor, max: f64) -> Tensor` it emits, next to the untouched function:
//!
//! ```text
//! struct clamp_norm {}                       // type namespace only: the fn keeps its name
//! impl clamp_norm {
//!     pub const NAME: &str = "my_crate::clamp_norm";
//!     pub fn call<'g>(g, x: impl IntoTensorProxy<'g>, max: f64) -> Proxy<'g, Tensor>;   // adds the node
//!     fn __nn_adapter(args: &[Arg]) -> Result<Tensor>;                                  // runs the fn
//! }
//! inventory::submit! { Function { name: clamp_norm::NAME, arity: 2, call: clamp_norm::__nn_adapter } }
//! ```

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, Pat, ReturnType, Type};

/// How a parameter travels in the graph.
enum Param {
    /// `&Tensor` (borrowed) or `Tensor` (owned): a node.
    Tensor { owned: bool },
    /// `f64` / `f32`: a float.
    Float { ty: &'static str },
    /// `i64`: an integer.
    Int,
    /// `bool`.
    Bool,
}

const SUPPORTED: &str = "`Tensor`, `&Tensor`, `f64`, `f32`, `i64` or `bool`";

fn last_ident(ty: &Type) -> Option<String> {
    match ty {
        Type::Path(p) if p.qself.is_none() => {
            let seg = p.path.segments.last()?;
            matches!(seg.arguments, syn::PathArguments::None).then(|| seg.ident.to_string())
        }
        _ => None,
    }
}

fn param_kind(ty: &Type) -> Option<Param> {
    match ty {
        Type::Reference(r) if r.mutability.is_none() => {
            (last_ident(&r.elem).as_deref() == Some("Tensor")).then_some(Param::Tensor { owned: false })
        }
        other => match last_ident(other)?.as_str() {
            "Tensor" => Some(Param::Tensor { owned: true }),
            "f64" => Some(Param::Float { ty: "f64" }),
            "f32" => Some(Param::Float { ty: "f32" }),
            "i64" => Some(Param::Int),
            "bool" => Some(Param::Bool),
            _ => None,
        },
    }
}

/// Whether the return type is `Tensor` (false) or a `Result<Tensor, _>` (true); `None` if neither.
fn returns_result(ret: &ReturnType) -> Option<bool> {
    let ReturnType::Type(_, ty) = ret else { return None };
    if last_ident(ty).as_deref() == Some("Tensor") {
        return Some(false);
    }
    let Type::Path(p) = &**ty else { return None };
    let seg = p.path.segments.last()?;
    if seg.ident != "Result" {
        return None;
    }
    let syn::PathArguments::AngleBracketed(args) = &seg.arguments else { return None };
    match args.args.first() {
        Some(syn::GenericArgument::Type(t)) if last_ident(t).as_deref() == Some("Tensor") => Some(true),
        _ => None,
    }
}

fn push(errors: &mut Option<syn::Error>, e: syn::Error) {
    match errors {
        Some(all) => all.combine(e),
        None => *errors = Some(e),
    }
}

/// Expands `#[nnsight::function]` on `item` (`attr` must be empty).
pub fn function(attr: TokenStream, item: ItemFn) -> TokenStream {
    let mut errors = None;
    if !attr.is_empty() {
        push(&mut errors, syn::Error::new(attr.span(), "`#[nnsight::function]` takes no arguments"));
    }
    let sig = &item.sig;
    if let Some(c) = &sig.constness {
        push(&mut errors, syn::Error::new(c.span, "an nnsight function cannot be `const`"));
    }
    if let Some(a) = &sig.asyncness {
        push(&mut errors, syn::Error::new(a.span, "an nnsight function cannot be `async`"));
    }
    if let Some(u) = &sig.unsafety {
        push(&mut errors, syn::Error::new(u.span, "an nnsight function cannot be `unsafe`"));
    }
    if !sig.generics.params.is_empty() {
        push(
            &mut errors,
            syn::Error::new(sig.generics.span(), "an nnsight function cannot be generic: a graph names one function"),
        );
    }
    if let Some(v) = &sig.variadic {
        push(&mut errors, syn::Error::new(v.span(), "an nnsight function cannot be variadic"));
    }
    let mut params = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(r) => push(
                &mut errors,
                syn::Error::new(r.span(), "an nnsight function is a free function: it cannot take `self`"),
            ),
            FnArg::Typed(t) => {
                let name = match &*t.pat {
                    Pat::Ident(p) if p.subpat.is_none() => Some(p.ident.clone()),
                    other => {
                        push(&mut errors, syn::Error::new(other.span(), "name this parameter with a plain identifier"));
                        None
                    }
                };
                match param_kind(&t.ty) {
                    Some(kind) => params.extend(name.map(|n| (n, kind, t.ty.span()))),
                    None => push(
                        &mut errors,
                        syn::Error::new_spanned(
                            &t.ty,
                            format!("unsupported parameter type for an nnsight function: expected {SUPPORTED}"),
                        ),
                    ),
                }
            }
        }
    }
    let result = returns_result(&sig.output);
    if result.is_none() {
        let span = match &sig.output {
            ReturnType::Default => sig.paren_token.span.close(),
            ReturnType::Type(_, ty) => ty.span(),
        };
        push(&mut errors, syn::Error::new(span, "an nnsight function returns `Tensor` or `Result<Tensor, E>`"));
    }
    if let Some(e) = errors {
        let mut out = e.to_compile_error();
        out.extend(quote!(#item));
        return out;
    }
    expand(&item, &params, result == Some(true))
}

fn expand(item: &ItemFn, params: &[(syn::Ident, Param, Span)], result: bool) -> TokenStream {
    let name = &item.sig.ident;
    let vis = &item.vis;
    let p = quote!(::nnsight::__private);
    let key = name.to_string();
    let arity = params.len();
    let doc = format!(
        "Graph handle of the function [`{key}`](fn@{key}) (from `#[nnsight::function]`): `call!({key}(..))` inside \
         `intervene!` adds a call of it; `NAME` is the name it is registered under."
    );
    let call_params = params.iter().map(|(n, kind, span)| match kind {
        Param::Tensor { .. } => quote_spanned!(*span=> #n: impl #p::IntoTensorProxy<'g>),
        Param::Float { ty } => {
            let ty = format_ident!("{}", ty);
            quote_spanned!(*span=> #n: #ty)
        }
        Param::Int => quote_spanned!(*span=> #n: i64),
        Param::Bool => quote_spanned!(*span=> #n: bool),
    });
    let call_args = params.iter().map(|(n, kind, _)| match kind {
        Param::Tensor { .. } => quote!(#p::CallArg::Node(#p::IntoTensorProxy::into_proxy(#n, g).node())),
        Param::Float { .. } => quote!(#p::CallArg::Float(#n as f64)),
        Param::Int => quote!(#p::CallArg::Int(#n)),
        Param::Bool => quote!(#p::CallArg::Bool(#n)),
    });
    let adapter_args = params.iter().enumerate().map(|(i, (_, kind, _))| match kind {
        Param::Tensor { owned: false } => quote!(args[#i].tensor(Self::NAME, #i)?),
        Param::Tensor { owned: true } => quote!(args[#i].tensor(Self::NAME, #i)?.shallow_clone()),
        Param::Float { ty: "f32" } => quote!(args[#i].float(Self::NAME, #i)? as f32),
        Param::Float { .. } => quote!(args[#i].float(Self::NAME, #i)?),
        Param::Int => quote!(args[#i].int(Self::NAME, #i)?),
        Param::Bool => quote!(args[#i].bool(Self::NAME, #i)?),
    });
    let body = if result {
        quote! {
            #name(#(#adapter_args),*).map_err(|e| #p::Error::Intervention {
                message: ::std::format!("function `{}` failed: {}", Self::NAME, e),
            })
        }
    } else {
        quote!(::core::result::Result::Ok(#name(#(#adapter_args),*)))
    };
    quote! {
        #item

        #[doc = #doc]
        #[allow(non_camel_case_types, dead_code)]
        #vis struct #name {}

        #[automatically_derived]
        #[allow(dead_code)]
        impl #name {
            /// The name this function is registered under (its full Rust path).
            pub const NAME: &'static str = ::core::concat!(::core::module_path!(), "::", #key);

            /// Adds a call of this function to the graph of an `intervene!` block (what `call!` expands to).
            pub fn call<'g>(g: &'g #p::GraphCell #(, #call_params)*) -> #p::Proxy<'g, #p::Tensor> {
                #p::call_function(g, Self::NAME, ::std::vec![#(#call_args),*])
            }

            #[doc(hidden)]
            fn __nn_adapter(args: &[#p::Arg<'_>]) -> #p::Result<#p::Tensor> {
                #body
            }
        }

        #p::inventory::submit! {
            #p::Function { name: #name::NAME, arity: #arity, call: #name::__nn_adapter }
        }
    }
}
