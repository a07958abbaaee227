//! Reads a `#[derive(Traceable)]` struct into a `Model`, collecting every error.

use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, Ident, LitStr, Type};

/// What a field of a traceable struct is.
pub enum FieldKind {
    /// The module's dotted path (`#[traceable(path)]`, a `String`).
    Path,
    /// A parameter tensor (`#[traceable(param)]`, `Tensor` or `Option<Tensor>`).
    Param { optional: bool },
    /// Not part of the module tree (`#[traceable(skip)]`).
    Skip,
    /// A submodule (the default): a `Traceable` type, a `ModuleList<T>`, `Vec<T>` or `Option<T>` of one.
    Submodule,
}

pub struct Field {
    pub ident: Ident,
    pub ty: Type,
    pub kind: FieldKind,
}

pub struct Model {
    pub ident: Ident,
    pub vis: syn::Visibility,
    pub kind_name: String,
    pub kind_fn: Option<syn::Path>,
    pub describe: Option<syn::Path>,
    pub fields: Vec<Field>,
    pub path_field: Ident,
    /// Inner hook points (`#[traceable(points(query, probs))]`): named values inside the forward.
    pub points: Vec<Ident>,
}

const HOOK_POINTS: [&str; 3] = ["output", "input", "inputs"];

fn push(errors: &mut Option<syn::Error>, e: syn::Error) {
    match errors {
        Some(all) => all.combine(e),
        None => *errors = Some(e),
    }
}

fn is_option_of_tensor(ty: &Type) -> Option<bool> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident == "Tensor" {
        return Some(false);
    }
    if last.ident == "Option" {
        if let syn::PathArguments::AngleBracketed(args) = &last.arguments {
            if let Some(syn::GenericArgument::Type(Type::Path(inner))) = args.args.first() {
                if inner.path.segments.last().is_some_and(|s| s.ident == "Tensor") {
                    return Some(true);
                }
            }
        }
    }
    None
}

impl Model {
    pub fn from_input(input: &DeriveInput) -> syn::Result<Model> {
        let mut errors: Option<syn::Error> = None;
        let mut kind_name = input.ident.to_string();
        let mut describe = None;
        let mut kind_fn = None;
        let mut points: Vec<Ident> = Vec::new();
        for attr in input.attrs.iter().filter(|a| a.path().is_ident("traceable")) {
            let r = attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("kind") {
                    kind_name = meta.value()?.parse::<LitStr>()?.value();
                    Ok(())
                } else if meta.path.is_ident("kind_fn") {
                    kind_fn = Some(meta.value()?.parse::<LitStr>()?.parse::<syn::Path>()?);
                    Ok(())
                } else if meta.path.is_ident("describe") {
                    describe = Some(meta.value()?.parse::<LitStr>()?.parse::<syn::Path>()?);
                    Ok(())
                } else if meta.path.is_ident("points") {
                    meta.parse_nested_meta(|point| match point.path.get_ident() {
                        Some(name) if point.input.is_empty() || point.input.peek(syn::Token![,]) => {
                            points.push(name.clone());
                            Ok(())
                        }
                        _ => Err(point.error("a point is a plain name, as in `points(query, probs)`")),
                    })
                } else {
                    Err(meta.error("unknown `traceable` option on a struct; expected `kind = \"...\"`, `kind_fn = \"method\"`, `describe = \"method\"` or `points(name, ...)`"))
                }
            });
            if let Err(e) = r {
                push(&mut errors, e);
            }
        }
        if !input.generics.params.is_empty() {
            push(
                &mut errors,
                syn::Error::new(input.generics.span(), "`Traceable` cannot be derived for a generic struct yet"),
            );
        }
        let data = match &input.data {
            Data::Struct(s) => s,
            Data::Enum(e) => {
                push(
                    &mut errors,
                    syn::Error::new(
                        e.enum_token.span,
                        "`Traceable` can only be derived for a struct of submodules, not an enum",
                    ),
                );
                return Err(errors.expect("just pushed"));
            }
            Data::Union(u) => {
                push(
                    &mut errors,
                    syn::Error::new(
                        u.union_token.span,
                        "`Traceable` can only be derived for a struct of submodules, not a union",
                    ),
                );
                return Err(errors.expect("just pushed"));
            }
        };
        let named = match &data.fields {
            Fields::Named(n) => n,
            Fields::Unnamed(u) => {
                push(
                    &mut errors,
                    syn::Error::new(
                        u.span(),
                        "`Traceable` needs named fields (submodule names become paths); this is a tuple struct",
                    ),
                );
                return Err(errors.expect("just pushed"));
            }
            Fields::Unit => {
                push(
                    &mut errors,
                    syn::Error::new(
                        input.ident.span(),
                        "`Traceable` needs named fields, including a `#[traceable(path)] path: String`",
                    ),
                );
                return Err(errors.expect("just pushed"));
            }
        };
        let mut fields = Vec::new();
        let mut path_field = None;
        for f in &named.named {
            let ident = f.ident.clone().expect("named field");
            let mut kind = FieldKind::Submodule;
            for attr in f.attrs.iter().filter(|a| a.path().is_ident("traceable")) {
                let r = attr.parse_nested_meta(|meta| {
                    if meta.path.is_ident("path") {
                        kind = FieldKind::Path;
                    } else if meta.path.is_ident("param") {
                        match is_option_of_tensor(&f.ty) {
                            Some(optional) => kind = FieldKind::Param { optional },
                            None => {
                                return Err(syn::Error::new(
                                    f.ty.span(),
                                    "a `#[traceable(param)]` field must be a `Tensor` or an `Option<Tensor>`",
                                ))
                            }
                        }
                    } else if meta.path.is_ident("skip") {
                        kind = FieldKind::Skip;
                    } else {
                        return Err(
                            meta.error("unknown `traceable` option on a field; expected `path`, `param` or `skip`")
                        );
                    }
                    Ok(())
                });
                if let Err(e) = r {
                    push(&mut errors, e);
                }
            }
            if matches!(kind, FieldKind::Path) {
                if path_field.is_some() {
                    push(&mut errors, syn::Error::new(ident.span(), "only one field can be `#[traceable(path)]`"));
                }
                path_field = Some(ident.clone());
            }
            if matches!(kind, FieldKind::Submodule) && HOOK_POINTS.contains(&ident.to_string().as_str()) {
                push(
                    &mut errors,
                    syn::Error::new(
                        ident.span(),
                        format!("a submodule cannot be named `{ident}`: that name is a hook point of every module"),
                    ),
                );
            }
            fields.push(Field { ident, ty: f.ty.clone(), kind });
        }
        for (i, point) in points.iter().enumerate() {
            let name = point.to_string();
            let clash = if HOOK_POINTS.contains(&name.as_str()) {
                Some(format!("an inner point cannot be named `{name}`: that name is a hook point of every module"))
            } else if fields.iter().any(|f| f.ident == name) {
                Some(format!("an inner point cannot be named `{name}`: the struct has a field of that name"))
            } else if points[..i].iter().any(|p| *p == name) {
                Some(format!("inner point `{name}` is declared twice"))
            } else if name.starts_with("__nn") {
                Some(format!("an inner point cannot be named `{name}`: names starting with `__nn` are reserved"))
            } else {
                None
            };
            if let Some(message) = clash {
                push(&mut errors, syn::Error::new(point.span(), message));
            }
        }
        let Some(path_field) = path_field else {
            push(
                &mut errors,
                syn::Error::new(
                    input.ident.span(),
                    "a traceable module needs a `#[traceable(path)] path: String` field holding its dotted path",
                ),
            );
            return Err(errors.expect("just pushed"));
        };
        if let Some(e) = errors {
            return Err(e);
        }
        Ok(Model {
            ident: input.ident.clone(),
            vis: input.vis.clone(),
            kind_name,
            kind_fn,
            describe,
            fields,
            path_field,
            points,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Model;

    fn errors(src: &str) -> Vec<String> {
        let input: syn::DeriveInput = syn::parse_str(src).expect("a struct");
        match Model::from_input(&input) {
            Ok(_) => Vec::new(),
            Err(e) => e.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn points_are_read_in_order() {
        let input: syn::DeriveInput = syn::parse_str(
            "#[traceable(kind = \"Attn\", points(query, probs))] struct A { #[traceable(path)] path: String }",
        )
        .unwrap();
        let m = Model::from_input(&input).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.points.iter().map(|p| p.to_string()).collect::<Vec<_>>(), ["query", "probs"]);
        assert_eq!(m.kind_name, "Attn");
    }

    #[test]
    fn point_mistakes_are_all_reported() {
        let errs = errors(
            "#[traceable(points(output, proj, probs, probs, __nn_x))] \
             struct A { #[traceable(path)] path: String, proj: Linear }",
        );
        assert_eq!(
            errs,
            [
                "an inner point cannot be named `output`: that name is a hook point of every module",
                "an inner point cannot be named `proj`: the struct has a field of that name",
                "inner point `probs` is declared twice",
                "an inner point cannot be named `__nn_x`: names starting with `__nn` are reserved",
            ]
        );
        let errs = errors("#[traceable(points(probs = 1))] struct A { #[traceable(path)] path: String }");
        assert_eq!(errs, ["a point is a plain name, as in `points(query, probs)`"]);
    }
}
