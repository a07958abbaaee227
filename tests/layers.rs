//! The runtime's shape, held against its code: files one can hold in mind (about 600 lines, each opening with
//! what it holds), and layers: a module may use the ones below it (or beside it), never one above. Run alone with
//! `cargo test --test integration layers`. The layers, from the bottom:
//!
//! | layer | modules |
//! |---|---|
//! | 0 | `error`, `progress`, `ffi`, `meta`, `autograd` |
//! | 1 | `graph` (the IR: pure data) |
//! | 2 | `nn`, `load`, `function` |
//! | 3 | `handle` (typed handles: envoys, hook points, proxies, the graph builder) |
//! | 3 | `nn::layers` (the leaf layers: `Linear`, `Embedding`, norms; they derive their envoys) |
//! | 4 | `models` (with `Batch`) |
//! | 5 | `interleave` |
//! | 6 | `generate` (the decoding loop) |
//! | 7 | `exec` (execution: targets, local runs, edits at run time, jobs, the `Backend` trait) |
//! | 8 | `remote` (the server calls local execution; the client is a `Backend`) |
//! | 9 | `envoy` (the blocks: trace, scan, generate, edit; each runs through a backend) |
//! | 10 | `language_model` (the facade) |
//! | 11 | `__private` (what generated code calls) |
//! | 12 | `patching` (experiments written with `intervene!` over the facade) |
//! | 12 | `steering` (steering vectors and llama.cpp control vectors, over the facade) |
//! | 12 | `sae` (sparse autoencoders: SAELens files, splicing into traces, training, over the facade) |
//! | 12 | `das` (boundless distributed alignment search: a trained rotation and boundary, over the facade) |
//! | 12 | `function_vectors` (function vectors: mean head outputs, causal indirect effects; beside `patching`) |
//! | 13 | `plot` (pictures of results: it may use every layer, nothing uses it) |
//!
//! A unit is a top-level module, or a sub-module listed on its own (`nn::layers`); `nn` re-exports the leaf layers
//! (`nnsight::nn::Linear`) with a `pub use` of its own child, which is not an import of the crate's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const LAYERS: &[(&str, usize)] = &[
    ("error", 0),
    ("progress", 0),
    ("ffi", 0),
    ("meta", 0),
    ("autograd", 0),
    ("graph", 1),
    ("nn", 2),
    ("load", 2),
    ("function", 2),
    ("handle", 3),
    ("nn::layers", 3),
    ("models", 4),
    ("interleave", 5),
    ("generate", 6),
    ("exec", 7),
    ("remote", 8),
    ("envoy", 9),
    ("language_model", 10),
    ("__private", 11),
    ("patching", 12),
    ("steering", 12),
    ("sae", 12),
    ("das", 12),
    ("function_vectors", 12),
    ("plot", 13),
];

/// Names the crate root re-exports, and the module each comes from.
const ROOT_REEXPORTS: &[(&str, &str)] = &[
    ("Error", "error"),
    ("Result", "error"),
    ("Batch", "models"),
    ("Input", "models"),
    ("default_model", "load"),
    ("DEFAULT_MODEL_FILE", "load"),
    ("GenerateOptions", "generate"),
    ("GeneratedRow", "generate"),
    ("Generation", "generate"),
    ("Generator", "generate"),
    ("OnToken", "generate"),
    ("StepTokens", "generate"),
    ("TextStream", "generate"),
    ("Editable", "envoy"),
    ("Edited", "envoy"),
    ("NNsight", "envoy"),
    ("Proxy", "handle"),
    ("Saved", "handle"),
    ("Traceable", "handle"),
    ("LanguageModel", "language_model"),
    ("LoadOptions", "language_model"),
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// The unit a path (`nn::layers::Linear`, `graph::Op`) or a file (`nn/layers.rs`) belongs to: its first two
/// segments where they are listed on their own, else its first.
fn unit(path: &str) -> String {
    let segments: Vec<&str> = path.trim_end_matches(".rs").split(['/', ':']).filter(|s| !s.is_empty()).collect();
    let first = match segments.first() {
        Some(&"private") => "__private",
        Some(f) => f,
        None => "",
    };
    if let Some(second) = segments.get(1) {
        let two = format!("{first}::{second}");
        if layer(&two).is_some() {
            return two;
        }
    }
    first.to_string()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read nnsight/src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its unit tests and comments.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    text.lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("//") {
                return "";
            }
            // A trailing comment: `//` after an even number of quotes.
            let mut quotes = 0;
            let bytes = line.as_bytes();
            for i in 0..bytes.len() {
                match bytes[i] {
                    b'"' => quotes += 1,
                    b'/' if quotes % 2 == 0 && bytes.get(i + 1) == Some(&b'/') => return &line[..i],
                    _ => {}
                }
            }
            line
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path after `crate::`, up to its first `{` or other punctuation (`crate::{a, b::c}` gives `a` and `b::c`).
fn crate_names(code: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map(|(j, _)| j)
                .unwrap_or(group.len());
            let mut depth = 0;
            let mut item = String::new();
            for c in group[..end].chars().chain(std::iter::once(',')) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        let first: String =
                            item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
                        if !first.is_empty() {
                            names.push(first);
                        }
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
        } else {
            let first: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
            names.push(first);
        }
    }
    names
}

/// Every (file, module used) pair of the runtime whose module is a layer of its own.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src"));
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut out = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap().to_string_lossy().replace('\\', "/");
        if rel == "lib.rs" || rel.starts_with("bin/") {
            continue;
        }
        let module = unit(&rel);
        assert!(layer(&module).is_some(), "{rel}: module `{module}` has no layer: add it to LAYERS");
        let text = std::fs::read_to_string(&file).unwrap();
        let used: BTreeSet<String> = crate_names(&code(&text))
            .into_iter()
            .map(|n| match ROOT_REEXPORTS.iter().find(|(name, _)| *name == n.trim_end_matches(':')) {
                Some((_, m)) => m.to_string(),
                None => unit(&n),
            })
            .filter(|m| *m != module && layer(m).is_some())
            .collect();
        out.insert(rel, used);
    }
    out
}

#[test]
fn no_module_imports_from_a_layer_above_it() {
    let mut upward = BTreeSet::new();
    for (file, used) in imports() {
        let here = layer(&unit(&file)).unwrap();
        for m in used {
            if layer(&m).unwrap() > here {
                upward.insert(format!("{file} -> {m}"));
            }
        }
    }
    assert!(upward.is_empty(), "imports from a layer above (see the table at the top of tests/layers.rs): {upward:#?}");
}

#[test]
fn the_parser_reads_grouped_and_plain_paths_but_not_comments() {
    let text = "use crate::{graph::Graph, Error as E, models::{self, batch::Batch}};\n// crate::envoy in a comment\nlet x = crate::meta::is_meta(t); // crate::remote\n";
    let names = crate_names(&code(text));
    assert_eq!(names, ["graph::Graph", "Error", "models::", "meta::is_meta"]);
    let units: Vec<String> = names.iter().map(|n| unit(n)).collect();
    assert_eq!(units, ["graph", "Error", "models", "meta"]);
    assert_eq!(unit("nn::layers::Linear"), "nn::layers");
    assert_eq!(unit("nn/layers.rs"), "nn::layers");
    assert_eq!(unit("nn/tree.rs"), "nn");
}

#[test]
fn modules_of_one_layer_form_no_cycle() {
    // Edges between different units of the same layer (imports downward cannot close a cycle).
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, used) in imports() {
        let from = unit(&file);
        for to in used {
            if layer(&to) == layer(&from) {
                edges.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    // Depth-first search from every unit; a unit met again on the current path closes a cycle.
    fn visit(
        at: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == at) {
            let mut cycle = path[i..].to_vec();
            cycle.push(at.to_string());
            return Some(cycle);
        }
        if !done.insert(at.to_string()) {
            return None;
        }
        path.push(at.to_string());
        for next in edges.get(at).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for start in edges.keys() {
        let cycle = visit(start, &edges, &mut Vec::new(), &mut done);
        assert!(cycle.is_none(), "modules of one layer import each other in a circle: {}", cycle.unwrap().join(" -> "));
    }
    eprintln!("imports within layers: {edges:?}");
}

#[test]
fn every_source_file_is_one_a_person_can_hold_in_mind() {
    // About 600 lines (tests included): past that, split the file along the architecture.
    const MOST: usize = 600;
    let mut files = Vec::new();
    for dir in ["src", "../nnsight-macros/src"] {
        rust_files(&PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/")).join(dir), &mut files);
    }
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > MOST).then(|| format!("{} ({n} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "files over {MOST} lines: {long:#?}");
    // Each opens with a comment saying what it holds.
    let silent: Vec<String> = files
        .iter()
        .filter(|f| !std::fs::read_to_string(f).unwrap().trim_start().starts_with("//"))
        .map(|f| f.display().to_string())
        .collect();
    assert!(silent.is_empty(), "files without an opening comment: {silent:#?}");
}
