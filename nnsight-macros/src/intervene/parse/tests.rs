//! Unit tests of the frame parser: the shapes it accepts and the errors it reports, all in one build.

use super::*;
use quote::{quote, ToTokens};

fn parse_ok(tokens: TokenStream) -> Intervene {
    let mut errors = Errors::default();
    let ast = parse(tokens, &mut errors).unwrap_or_else(|e| panic!("parse error: {e}"));
    assert!(errors.is_empty(), "unexpected errors: {:?}", errors.messages());
    ast
}

fn parse_messages(tokens: TokenStream) -> Vec<String> {
    let mut errors = Errors::default();
    if let Err(e) = parse(tokens, &mut errors) {
        errors.push(e);
    }
    errors.messages()
}

#[test]
fn invokes_inside_statements_become_invoke_calls() {
    let ast = parse_ok(quote!(model.trace() {
        let mut outs = Vec::new();
        for p in prompts { invoke(p) { outs.push(model.output.save()); } }
        if ok { invoke() { let x = 1; } }
        let y = helper.invoke(3);
    }));
    let text: Vec<String> = ast
        .items
        .iter()
        .map(|i| match i {
            Item::Stmt(s) => s.to_token_stream().to_string().replace(' ', ""),
            Item::Invoke(_) => "invoke".into(),
        })
        .collect();
    assert!(
        text[1].contains("__nn_tr.invoke(::core::option::Option::Some(::core::convert::Into::into(p)))?;outs.push"),
        "{}",
        text[1]
    );
    assert!(text[2].contains("__nn_tr.invoke(::core::option::Option::None)?;letx=1;"), "{}", text[2]);
    assert_eq!(text[3], "lety=helper.invoke(3);");
}

#[test]
fn invokes_inside_statements_follow_the_rules_of_invokes() {
    let with_input = parse_messages(quote!(model.trace("a") { for p in ps { invoke(p) { } } }));
    assert_eq!(with_input, ["`invoke` blocks need a trace without input: `model.trace() { invoke(input) { ... } }`"]);
    let nested = parse_messages(quote!(model.trace() { invoke("a") { for p in ps { invoke(p) { } } } }));
    assert_eq!(nested.len(), 1);
    assert!(nested[0].starts_with("`invoke` blocks cannot be nested"), "{nested:?}");
    let two = parse_messages(quote!(model.trace() { for p in ps { invoke(p, q) { } } }));
    assert_eq!(two, ["`invoke` takes one input, or none for the whole batch"]);
    let edit = parse_messages(quote!(model.edit() { for p in ps { invoke(p) { } } }));
    assert_eq!(edit, ["an edit has no `invoke` blocks: it applies to every row of every later run"]);
}

#[test]
fn single_input_trace() {
    let ast = parse_ok(quote!(model.trace("hello") { let h = model.lm_head.output.save(); model.x.output = h }));
    assert_eq!(ast.root, "model");
    assert!(ast.input.is_some());
    assert_eq!(ast.items.len(), 2);
    assert!(matches!(&ast.items[1], Item::Stmt(Stmt::Expr(Expr::Assign(_), _))));
}

#[test]
fn invoke_blocks_with_statements_around() {
    let ast = parse_ok(quote!(model.trace() {
        let a = 1;
        invoke("a") { let x = model.output.save(); }
        invoke(["b", "c"]) { let y = model.output.save() }
        invoke() { let z = model.output.save(); };
        let b = 2;
    }));
    assert!(ast.input.is_none());
    let shape: Vec<&str> = ast
        .items
        .iter()
        .map(|i| match i {
            Item::Stmt(_) => "stmt",
            Item::Invoke(inv) if inv.input.is_some() => "invoke(x)",
            Item::Invoke(_) => "invoke()",
        })
        .collect();
    assert_eq!(shape, ["stmt", "invoke(x)", "invoke(x)", "invoke()", "stmt"]);
}

#[test]
fn frame_errors_are_all_reported() {
    let msgs = parse_messages(quote!(model.tracee() { invoke(a, b) { } invoke(c) { invoke(d) { } } }));
    assert_eq!(
        msgs,
        [
            "unknown form `model.tracee(...)`: expected `model.trace(input) { ... }`, `model.scan(input) { ... }` to run it on shapes alone, `model.generate(input, options) { ... }` to decode, or `model.edit() { ... }` for a persistent edit",
            // Invokes inside invokes are found before the statements are parsed.
            "`invoke` blocks cannot be nested",
            "`invoke` takes one input, or none for the whole batch",
        ]
    );
}

#[test]
fn generate_takes_input_and_options_or_options_with_invokes() {
    let ast = parse_ok(quote!(model.generate("hi") { }));
    assert!(ast.form == Form::Generate && ast.input.is_some() && ast.options.is_none());
    let ast = parse_ok(quote!(model.generate("hi", &opts) { }));
    assert!(ast.input.is_some() && ast.options.is_some());
    let ast = parse_ok(quote!(model.generate(opts) { invoke("a") { } invoke("b") { } }));
    assert!(ast.input.is_none() && ast.options.is_some());
    let ast = parse_ok(quote!(model.generate() { invoke("a") { } }));
    assert!(ast.input.is_none() && ast.options.is_none());
    assert_eq!(
        parse_messages(quote!(model.generate("x", opts) { invoke("a") { } })),
        ["with `invoke` blocks, `generate` takes only the options: `model.generate(options) { invoke(input) { ... } }`"]
    );
    assert_eq!(
        parse_messages(quote!(model.generate("x", opts, 3) { })),
        ["`generate` takes an input and options (`generate(input, options)`), or only options with `invoke` blocks"]
    );
}

#[test]
fn edit_forms_take_no_input_and_no_invokes() {
    let ast = parse_ok(quote!(model.edit() { model.x.output = model.x.output * 2.0; }));
    assert!(ast.form == Form::Edit && ast.input.is_none() && ast.items.len() == 1);
    let ast = parse_ok(quote!(model.edit_in_place() { model.x.output = model.x.output * 2.0; }));
    assert!(ast.form == Form::EditInPlace && ast.trace == "edit_in_place");
    assert_eq!(
        parse_messages(quote!(model.edit(x) { invoke(y) { } })),
        [
            "`edit` takes no input: an edit applies to every row of every later run, `model.edit() { ... }`",
            "an edit has no `invoke` blocks: it applies to every row of every later run"
        ]
    );
}

#[test]
fn scan_is_a_form_with_the_same_body() {
    let ast = parse_ok(quote!(model.scan("hello") { let h = model.lm_head.output.save(); }));
    assert!(ast.form == Form::Scan && ast.input.is_some());
    let ast = parse_ok(quote!(model.scan() { invoke("a") { } invoke("b") { } }));
    assert!(ast.form == Form::Scan && ast.input.is_none() && ast.items.len() == 2);
    assert_eq!(
        parse_messages(quote!(model.scan() { let x = 1; })),
        ["`model.scan()` without input needs `invoke(input) { ... }` blocks, or write `model.scan(input)`"]
    );
    assert_eq!(parse_messages(quote!(model.scan(x, y) { })), ["`scan` takes one input, or none with `invoke` blocks"]);
}

#[test]
fn missing_trace() {
    assert_eq!(
        parse_messages(quote!(model { let x = 1; })),
        ["expected `.trace(...)` after `model`: `intervene!(model.trace(input) { ... })`"]
    );
    assert_eq!(parse_messages(quote!()), ["expected `intervene!(model.trace(input) { ... })`"]);
    assert_eq!(
        parse_messages(quote!(model.trace(x, y) { })),
        ["`trace` takes one input, or none with `invoke` blocks"]
    );
    assert_eq!(
        parse_messages(quote!(model.trace() { let x = 1; })),
        ["`model.trace()` without input needs `invoke(input) { ... }` blocks, or write `model.trace(input)`"]
    );
    assert_eq!(
        parse_messages(quote!(model.trace(p) { invoke(q) { } })),
        ["`invoke` blocks need a trace without input: `model.trace() { invoke(input) { ... } }`"]
    );
}

#[test]
fn tuple_index_after_hook_points_only() {
    let out = tuple_indices(quote!(m.x.output[.., -1] = v[1, 2]; let a = [1, 2];));
    assert_eq!(out.to_string(), quote!(m.x.output[(.., -1)] = v[1, 2]; let a = [1, 2];).to_string());
}
