//! `#[derive(Traceable)]`: parse the struct (`parse`), then generate the `Module` and `Traceable` impls and the
//! envoy type (`expand`). Every mistake is a spanned error; all are reported in one build.

mod expand;
mod parse;

use proc_macro2::TokenStream;

pub fn derive(input: syn::DeriveInput) -> TokenStream {
    match parse::Model::from_input(&input) {
        Ok(model) => expand::expand(&model),
        Err(e) => e.to_compile_error(),
    }
}
