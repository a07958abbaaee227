//! Generates, for a traceable struct `S`: `impl Module for S` (path, type name, children, parameters, forward),
//! the envoy struct `SEnvoy` (a field per submodule and per inner point, plus the hook points), and
//! `impl Traceable for S` (envoy construction, path assignment, visiting as a child).

use super::parse::{FieldKind, Model};
use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;

pub fn expand(m: &Model) -> TokenStream {
    let ident = &m.ident;
    let vis = &m.vis;
    let envoy = format_ident!("{}Envoy", ident);
    let kind_name = &m.kind_name;
    let path_field = &m.path_field;
    let p = quote!(::nnsight::__private);

    // The generated methods' own names (`self`, the closure `f`, the argument `path`) at the call site, where the
    // methods declare them: the code around them is spanned at the field (where an error about the field points),
    // whose tokens may come from a `macro_rules!` (a struct written by a macro, its field types passed in) and
    // would not see them.
    let (this, f_arg, path_arg) = (quote!(self), quote!(f), quote!(path));

    let subs: Vec<_> = m.fields.iter().filter(|f| matches!(f.kind, FieldKind::Submodule)).collect();
    let params: Vec<_> = m.fields.iter().filter(|f| matches!(f.kind, FieldKind::Param { .. })).collect();

    let children = subs.iter().map(|f| {
        let name = &f.ident;
        let ty = &f.ty;
        let key = name.to_string();
        quote_spanned!(ty.span()=> <#ty as #p::Traceable>::visit_child(&#this.#name, #key, #f_arg);)
    });
    let parameters = params.iter().map(|f| {
        let name = &f.ident;
        let key = name.to_string();
        match f.kind {
            FieldKind::Param { optional: true } => quote!(if let Some(t) = &self.#name { f(#key, t); }),
            _ => quote!(f(#key, &self.#name);),
        }
    });
    let set_paths = subs.iter().map(|f| {
        let name = &f.ident;
        let ty = &f.ty;
        let key = name.to_string();
        quote_spanned!(ty.span()=> <#ty as #p::Traceable>::set_path(&mut #this.#name, &#p::join_path(#path_arg, #key));)
    });
    let envoy_fields = subs.iter().map(|f| {
        let name = &f.ident;
        let ty = &f.ty;
        let doc = format!("The `{name}` submodule.");
        quote_spanned!(ty.span()=> #[doc = #doc] pub #name: <#ty as #p::Traceable>::Envoy,)
    });
    let envoy_inits = subs.iter().map(|f| {
        let name = &f.ident;
        let ty = &f.ty;
        quote_spanned!(ty.span()=> #name: <#ty as #p::Traceable>::envoy(&#this.#name),)
    });
    let param_fields = params.iter().map(|f| {
        let name = &f.ident;
        let doc = format!("The parameter `{name}` (its `.grad` after a `.backward()`).");
        quote_spanned!(name.span()=> #[doc = #doc] pub #name: #p::ParamPoint,)
    });
    let param_inits = params.iter().map(|f| {
        let name = &f.ident;
        let key = name.to_string();
        quote_spanned!(name.span()=> #name: #p::ParamPoint::new(&#this.#path_field, #key),)
    });
    let point_fields = m.points.iter().map(|name| {
        let doc = format!("The inner point `{name}` (see the module's documentation for its shape).");
        quote_spanned!(name.span()=> #[doc = #doc] pub #name: #p::InnerPoint,)
    });
    let point_inits = m.points.iter().map(|name| {
        let key = name.to_string();
        quote_spanned!(name.span()=> #name: #p::InnerPoint::new(&#this.#path_field, #key),)
    });
    let describe = match &m.describe {
        Some(method) => quote!(fn describe(&self) -> ::std::string::String { self.#method() }),
        None => quote!(),
    };
    let kind_body = match &m.kind_fn {
        Some(method) => quote!(self.#method()),
        None => quote!(#kind_name),
    };
    let envoy_doc = format!("Typed handle on a `{ident}` inside `intervene!`: its submodules and hook points.");

    quote! {
        #[doc = #envoy_doc]
        #[allow(missing_docs)]
        #vis struct #envoy {
            #(#envoy_fields)*
            #(#param_fields)*
            #(#point_fields)*
            /// The module's output (after it runs).
            pub output: #p::HookPoint<#p::Tensor>,
            /// The module's first input (before it runs).
            pub input: #p::HookPoint<#p::Tensor>,
            /// All of the module's inputs.
            pub inputs: #p::InputsPoint,
            __nn_path: #p::Arc<str>,
        }

        const _: () = {
            #[automatically_derived]
            impl #p::Envoy for #envoy {
                fn module_path(&self) -> &str {
                    &self.__nn_path
                }
            }

            #[automatically_derived]
            impl #p::Module for #ident {
                fn path(&self) -> &str {
                    &self.#path_field
                }
                fn kind(&self) -> &'static str {
                    #kind_body
                }
                fn children<'__nn_a>(&'__nn_a self, f: &mut dyn FnMut(&str, &'__nn_a dyn #p::Module)) {
                    let _ = &f;
                    #(#children)*
                }
                fn parameters(&self, f: &mut dyn FnMut(&str, &#p::Tensor)) {
                    let _ = &f;
                    #(#parameters)*
                }
                fn as_forward(&self) -> ::std::option::Option<&dyn #p::Forward> {
                    ::std::option::Option::Some(self)
                }
                #describe
            }

            #[automatically_derived]
            impl #p::Traceable for #ident {
                type Envoy = #envoy;
                fn envoy(&self) -> #envoy {
                    let points = #p::Points::new(&self.#path_field);
                    #envoy {
                        #(#envoy_inits)*
                        #(#param_inits)*
                        #(#point_inits)*
                        output: points.output(),
                        input: points.input(),
                        inputs: points.inputs(),
                        __nn_path: points.path.clone(),
                    }
                }
                fn set_path(&mut self, path: &str) {
                    self.#path_field = ::std::string::String::from(path);
                    #(#set_paths)*
                }
                fn visit_child<'__nn_a>(&'__nn_a self, name: &str, f: &mut dyn FnMut(&str, &'__nn_a dyn #p::Module)) {
                    f(name, self)
                }
            }
        };
    }
}
