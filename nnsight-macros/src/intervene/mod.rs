//! `intervene!`: a trace block over a model, compiled into graph-construction code.
//!
//! Three phases, one file (or folder) each: [`parse`] reads the frame (`model.trace(..) { invoke(..) { .. } }`,
//! or another [`Form`](form::Form)), [`rewrite`] turns expressions rooted at the model into typed graph calls
//! (reads, writes, list indexing, ad-hoc module calls) and decides which bindings are handed on, [`expand`] emits
//! the block's runtime type, the flat body, the run and the re-bindings. Errors from every phase are collected and
//! reported together. [`session`] turns `model.session() { .. }` into one `intervene!` per block inside it.
//!
//! The block kinds (`trace`, `scan`, `generate`, `edit`, `edit_in_place`) are one enum, [`Form`](form::Form) in
//! [`form`]; the phases ask it questions (runs on shapes? takes options? may be `.remote`?) rather than compare
//! names. A new block kind is one `Form` variant and the arms the compiler asks for (its name, its answers, its
//! runtime type in [`expand`]), plus its runtime type in the `nnsight` crate (re-exported from `nnsight::__private`,
//! like `Trace`, `Scan` and `Generate`).

mod expand;
mod form;
mod parse;
mod rewrite;
mod session;

use proc_macro2::TokenStream;

/// Expands `intervene!(INPUT)`.
pub fn intervene(input: TokenStream) -> TokenStream {
    if let Some((root, session, args, body)) = session::split(&input) {
        return session::expand(root, session, args, body);
    }
    let mut errors = Errors::default();
    let ast = match parse::parse(input, &mut errors) {
        Ok(ast) => ast,
        Err(e) => {
            errors.push(e);
            return errors.to_compile_errors();
        }
    };
    let edit = ast.form.is_edit();
    let rewritten = rewrite::rewrite(ast, &mut errors);
    let mut out = errors.to_compile_errors();
    out.extend(expand::expand(rewritten));
    if edit {
        // An edit block is an expression: its errors go inside it.
        return quote::quote!({ #out });
    }
    out
}

/// Errors collected across phases, reported together.
#[derive(Default)]
pub struct Errors(Option<syn::Error>);

impl Errors {
    /// Adds an error.
    pub fn push(&mut self, e: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }

    /// Whether none was found.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// `compile_error!`s, one per error (nothing when there is none).
    pub fn to_compile_errors(&self) -> TokenStream {
        self.0.as_ref().map(syn::Error::to_compile_error).unwrap_or_default()
    }

    /// The messages, in order (for tests).
    #[cfg(test)]
    pub fn messages(&self) -> Vec<String> {
        self.0.iter().flat_map(|e| e.into_iter().map(|e| e.to_string())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    /// The expansion as a string (token spacing as `quote!` prints it).
    fn expand(tokens: TokenStream) -> String {
        intervene(tokens).to_string()
    }

    /// Asserts that `haystack` contains each of `needles` (written as tokens), in order.
    #[track_caller]
    fn assert_contains_in_order(haystack: &str, needles: &[TokenStream]) {
        let mut rest = haystack;
        for needle in needles {
            // rustfmt adds trailing commas to long `quote!` arguments.
            let needle = needle.to_string().replace(" ,)", ")");
            match rest.find(&needle) {
                Some(at) => rest = &rest[at + needle.len()..],
                None => panic!("expected `{needle}` in (the rest of)\n{haystack}"),
            }
        }
    }

    #[track_caller]
    fn assert_strs_in_order(haystack: &str, needles: &[&str]) {
        let mut rest = haystack;
        for needle in needles {
            match rest.find(needle) {
                Some(at) => rest = &rest[at + needle.len()..],
                None => panic!("expected `{needle}` in (the rest of)\n{haystack}"),
            }
        }
    }

    fn errors(tokens: TokenStream) -> Vec<String> {
        let mut errors = Errors::default();
        match parse::parse(tokens, &mut errors) {
            Ok(ast) => {
                rewrite::rewrite(ast, &mut errors);
            }
            Err(e) => errors.push(e),
        }
        errors.messages()
    }

    #[test]
    fn read_and_save() {
        let out = expand(quote!(model.trace("The Eiffel Tower") {
            let h5 = model.model.layers[5].output.save();
        }));
        assert_contains_in_order(
            &out,
            &[
                quote!(let __nn_tr = ::nnsight::__private::Trace::new(&model, ::core::option::Option::Some(::core::convert::Into::into("The Eiffel Tower")))?;),
                quote!(let __nn_root = __nn_tr.root();),
                quote!(let __nn_g = __nn_tr.graph();),
                quote!(let h5 = ::nnsight::__private::read::<::nnsight::__private::Tensor>(__nn_g, &(*::nnsight::__private::at(&(*__nn_root).model.layers, 5)?).output)?.save();),
                quote!(let mut __nn_results = __nn_tr.run()?;),
                quote!(let h5 = {
                    use ::nnsight::__private::{FinishPlain as _, FinishSaved as _, FinishUnsaved as _};
                    (&&&::nnsight::__private::finish(h5)).__nn_finish(&mut __nn_results)?
                };),
            ],
        );
    }

    #[test]
    fn scan_expands_to_the_same_code_on_a_scan() {
        let out = expand(quote!(model.scan("The Eiffel Tower") {
            let h5 = model.model.layers[5].output.save();
        }));
        assert_contains_in_order(
            &out,
            &[
                quote!(let __nn_tr = ::nnsight::__private::Scan::new(&model, ::core::option::Option::Some(::core::convert::Into::into("The Eiffel Tower")))?;),
                quote!(let __nn_root = __nn_tr.root();),
                quote!(let mut __nn_results = __nn_tr.run()?;),
            ],
        );
    }

    #[test]
    fn write_and_compound_write() {
        let out = expand(quote!(model.trace(x) {
            model.model.layers[10].mlp.output = model.model.layers[10].mlp.output * 0.0;
            model.lm_head.input += a + b;
            model.transformer.h[-1].output /= 2.0
        }));
        assert_contains_in_order(
            &out,
            &[
                quote!(::nnsight::__private::write(__nn_g, &(*::nnsight::__private::at(&(*__nn_root).model.layers, 10)?).mlp.output,
                    ::nnsight::__private::read::<::nnsight::__private::Tensor>(__nn_g, &(*::nnsight::__private::at(&(*__nn_root).model.layers, 10)?).mlp.output)? * 0.0)?;),
                quote!(::nnsight::__private::write(__nn_g, &(*__nn_root).lm_head.input,
                    ::nnsight::__private::read::<::nnsight::__private::Tensor>(__nn_g, &(*__nn_root).lm_head.input)? + (a + b))?;),
                quote!(::nnsight::__private::write(__nn_g, &(*::nnsight::__private::at(&(*__nn_root).transformer.h, -1)?).output,
                    ::nnsight::__private::read::<::nnsight::__private::Tensor>(__nn_g, &(*::nnsight::__private::at(&(*__nn_root).transformer.h, -1)?).output)? / 2.0)?;),
                quote!(let mut __nn_results),
            ],
        );
    }

    #[test]
    fn indexed_read_and_write() {
        let out = expand(quote!(model.trace(x) {
            let last = model.lm_head.output[.., -1].save();
            model.transformer.h[0].output[(.., 0)] = v;
            model.transformer.h[1].output[3] *= 2.0;
            let first = model.lm_head.inputs[0];
        }));
        assert_contains_in_order(
            &out,
            &[
                quote!(let last = ::nnsight::__private::read_index(__nn_g, &(*__nn_root).lm_head.output, (.., -1))?.save();),
                quote!(::nnsight::__private::write_index(__nn_g, &(*::nnsight::__private::at(&(*__nn_root).transformer.h, 0)?).output, (.., 0), v)?;),
                quote!(::nnsight::__private::write_index(__nn_g, &(*::nnsight::__private::at(&(*__nn_root).transformer.h, 1)?).output, 3,
                    ::nnsight::__private::read_index(__nn_g, &(*::nnsight::__private::at(&(*__nn_root).transformer.h, 1)?).output, 3)? * 2.0)?;),
                quote!(let first = ::nnsight::__private::read_inputs(__nn_g, &(*__nn_root).lm_head.inputs)?.get(0);),
            ],
        );
    }

    #[test]
    fn list_index_with_any_expression() {
        let out = expand(quote!(model.trace(x) {
            for i in 0..model.transformer.h.len() {
                hs.push(model.transformer.h[i].output.save());
            }
            let n = model.model.layers[n_layers - 1].mlp.down_proj.output;
        }));
        assert_contains_in_order(
            &out,
            &[
                quote!(for i in 0..(*__nn_root).transformer.h.len() {
                    hs.push(
                        ::nnsight::__private::read::<::nnsight::__private::Tensor>(
                            __nn_g,
                            &(*::nnsight::__private::at(&(*__nn_root).transformer.h, i)?).output,
                        )?
                        .save(),
                    );
                }),
                quote!(let n = ::nnsight::__private::read::<::nnsight::__private::Tensor>(__nn_g, &(*::nnsight::__private::at(&(*__nn_root).model.layers, n_layers - 1)?).mlp.down_proj.output)?;),
            ],
        );
    }

    #[test]
    fn ad_hoc_module_calls() {
        let out = expand(quote!(model.trace(x) {
            let logits = model.lm_head(model.model.norm(model.model.layers[-1].output)).save();
            let probs = model.lm_head.output.softmax(-1).save();
            let tok = model.tokenizer();
            let y = (model.x.output * 2.0).save();
        }));
        assert_contains_in_order(
            &out,
            &[
                quote!(let logits = ::nnsight::__private::apply(__nn_g, &(*__nn_root).lm_head,
                    ::nnsight::__private::apply(__nn_g, &(*__nn_root).model.norm,
                        ::nnsight::__private::read::<::nnsight::__private::Tensor>(__nn_g, &(*::nnsight::__private::at(&(*__nn_root).model.layers, -1)?).output)?)).save();),
                quote!(let probs = ::nnsight::__private::read::<::nnsight::__private::Tensor>(__nn_g, &(*__nn_root).lm_head.output)?.softmax(-1).save();),
                quote!(let tok = model.tokenizer();),
                quote!(let y = (::nnsight::__private::read::<::nnsight::__private::Tensor>(__nn_g, &(*__nn_root).x.output)? * 2.0).save();),
            ],
        );
    }

    #[test]
    fn invoke_blocks_in_order() {
        let out = expand(quote!(model.trace() {
            let k = 3;
            invoke("Paris") { let a = model.output.save(); }
            invoke(["Rome", "Oslo"]) { model.lm_head.output = a; }
            invoke() { let all = model.output.save() }
        }));
        assert_contains_in_order(
            &out,
            &[
                quote!(let __nn_tr = ::nnsight::__private::Trace::new(&model, ::core::option::Option::None)?;),
                quote!(let k = 3;),
                quote!(__nn_tr.invoke(::core::option::Option::Some(::core::convert::Into::into("Paris")))?;),
                quote!(let a = ::nnsight::__private::read::<::nnsight::__private::Tensor>(__nn_g, &(*__nn_root).output)?.save();),
                quote!(__nn_tr.invoke(::core::option::Option::Some(::core::convert::Into::into(["Rome", "Oslo"])))?;),
                quote!(::nnsight::__private::write(__nn_g, &(*__nn_root).lm_head.output, a)?;),
                quote!(__nn_tr.invoke(::core::option::Option::None)?;),
                quote!(let all = ::nnsight::__private::read::<::nnsight::__private::Tensor>(__nn_g, &(*__nn_root).output)?.save();),
                quote!(let mut __nn_results = __nn_tr.run()?;),
            ],
        );
        assert_strs_in_order(&out, &["let a = {", "let all = {"]);
        // `k` is a plain value: not re-bound.
        assert!(!out.contains(&quote!(finish(k)).to_string()), "{out}");
    }

    #[test]
    fn exported_lets() {
        let out = expand(quote!(model.trace(x) {
            let steer = Tensor::ones([8], (Kind::Float, Device::Cpu));
            model.x.output += steer;
            let (mut a, b) = model.x.output.topk(5, -1);
            let h = model.x.output;
            let h = h.save();
            let mut hs = Vec::new();
            for i in 0..3 { hs.push(model.layers[i].output.save()); }
            let n = 1;
        }));
        let finished: Vec<&str> = out
            .split(":: nnsight :: __private :: finish (")
            .skip(1)
            .map(|s| s[..s.find(')').unwrap()].trim())
            .collect();
        assert_eq!(finished, ["a", "b", "h", "hs"], "{out}");
        assert_strs_in_order(&out, &["let mut a = {", "let b = {", "let h = {", "let mut hs = {"]);
    }

    #[test]
    fn envoy_variables() {
        let out = expand(quote!(model.trace(x) {
            let layer = model.transformer.h[3];
            layer.mlp.output = layer.mlp.output * 2.0;
            for (i, block) in model.transformer.h.iter().enumerate() {
                let y = block.attn(block.ln_1.output);
            }
            for block in model.transformer.h { println!("{:?}", block.output); }
        }));
        assert_contains_in_order(
            &out,
            &[
                quote!(let layer = &(*::nnsight::__private::at(&(*__nn_root).transformer.h, 3)?);),
                quote!(::nnsight::__private::write(__nn_g, &(*layer).mlp.output, ::nnsight::__private::read::<::nnsight::__private::Tensor>(__nn_g, &(*layer).mlp.output)? * 2.0)?;),
                quote!(for (i, block) in (*__nn_root).transformer.h.iter().enumerate() {
                    let y = ::nnsight::__private::apply(
                        __nn_g,
                        &(*block).attn,
                        ::nnsight::__private::read::<::nnsight::__private::Tensor>(__nn_g, &(*block).ln_1.output)?,
                    );
                }),
                quote!(for block in &(*__nn_root).transformer.h {
                    println!(
                        "{:?}",
                        ::nnsight::__private::read::<::nnsight::__private::Tensor>(__nn_g, &(*block).output)?
                    );
                }),
            ],
        );
    }

    #[test]
    fn untouched_statements() {
        let body = quote! {
            let n = 5;
            if n > 3 { println!("big"); } else { let y = vec![1, 2]; }
            fn helper(model: &str) -> usize { model.len() }
            let c = |x: i64| x * 2;
        };
        let out = expand(quote!(model.trace(x) { #body }));
        assert_contains_in_order(&out, &[body]);
    }

    #[test]
    fn rewrite_errors_are_all_reported() {
        let msgs = errors(quote!(model.trace(x) {
            model.lm_head = x;
            model.model.layers[0] += y;
            model.lm_head.inputs = z;
            model.lm_head.output %= 2;
        }));
        assert_eq!(
            msgs,
            [
                "assign to `.output` or `.input` of a module",
                "assign to `.output` or `.input` of a module",
                "`.inputs` cannot be assigned: assign to `.input` (the first input) or `.output`",
                "only `=`, `+=`, `-=`, `*=` and `/=` apply to `.output` and `.input`",
            ]
        );
    }

    #[test]
    fn parse_and_rewrite_errors_together() {
        let msgs = errors(quote!(model.tracee(x) { model.lm_head = x; }));
        assert_eq!(
            msgs,
            [
                "unknown form `model.tracee(...)`: expected `model.trace(input) { ... }`, `model.scan(input) { ... }` to run it on shapes alone, `model.generate(input, options) { ... }` to decode, or `model.edit() { ... }` for a persistent edit",
                "assign to `.output` or `.input` of a module"
            ]
        );
        let out = expand(quote!(model.tracee(x) { model.lm_head = x; }));
        assert_eq!(out.matches("compile_error").count(), 2, "{out}");
    }

    /// One expansion, printed (`cargo test -p nnsight-macros print_expansion -- --nocapture`) and checked: the
    /// trace, an invoke per block, the run, and the saved values re-bound after it.
    #[test]
    fn print_expansion() {
        let out = intervene(quote!(model.trace() {
            invoke("The Eiffel Tower is in the city of") {
                let h5 = model.model.layers[5].output.save();
                model.model.layers[10].mlp.output *= 0.0;
            }
            invoke("Madrid is in") {
                let logits = model.lm_head.output[.., -1].save();
            }
        }));
        println!("{out}");
        let text = out.to_string().replace(' ', "");
        assert_eq!(text.matches("__nn_tr.invoke(").count(), 2, "{out}");
        assert_eq!(text.matches("__nn_tr.run()?").count(), 1, "{out}");
        for saved in ["leth5=", "letlogits="] {
            assert_eq!(
                text.matches(saved).count(),
                2,
                "{saved} is bound in the block and re-bound after the run: {out}"
            );
        }
        assert!(!text.contains("compile_error"), "{out}");
    }
}
