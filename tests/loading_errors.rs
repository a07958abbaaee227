//! Every loading error names what went wrong and where: missing files, unsupported GGUF tensor types and
//! architectures, missing/unexpected tensors, shape mismatches, a typed load of the wrong architecture.

use crate::common;
use nnsight::prelude::*;
use nnsight::Error;
use std::path::{Path, PathBuf};

fn quiet() -> LoadOptions {
    common::init();
    LoadOptions::default().progress(false)
}

/// A scratch copy of a test-data folder.
fn copy_of(dir: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(common::data(dir)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    tmp
}

/// Rewrites `model.safetensors` in `dir` through `edit` (a list of (name, tensor)).
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let file = dir.join("model.safetensors");
    let mut tensors = Tensor::read_safetensors(&file).unwrap();
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, &file).unwrap();
}

#[test]
fn missing_file_names_the_path() {
    let err = LanguageModel::<Llama>::load_with("no/such/model.gguf", quiet()).err().unwrap();
    assert!(matches!(&err, Error::FileNotFound { path, .. } if path == Path::new("no/such/model.gguf")), "{err}");
    assert!(err.to_string().contains("no/such/model.gguf"));

    let tmp = copy_of("tiny-gpt2");
    std::fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
    let err = LanguageModel::<Gpt2>::load_with(tmp.path(), quiet()).err().unwrap();
    assert!(matches!(&err, Error::FileNotFound { path, .. } if path.ends_with("tokenizer.json")), "{err}");

    let tmp = copy_of("tiny-gpt2");
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let err = LanguageModel::<Gpt2>::load_with(tmp.path(), quiet()).err().unwrap();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn unsupported_architecture_lists_the_supported_ones() {
    let tmp = copy_of("tiny-gpt2");
    let config = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
    std::fs::write(tmp.path().join("config.json"), config.replace("\"gpt2\"", "\"bert\"")).unwrap();
    let err = LanguageModel::<AutoModel>::load_with(tmp.path(), quiet()).err().unwrap();
    let Error::UnsupportedArchitecture { found, supported } = &err else { panic!("{err}") };
    assert_eq!(found, "bert");
    assert!(supported.contains("llama") && supported.contains("gpt2"), "{err}");
}

#[test]
fn wrong_architecture_for_a_typed_load() {
    let err = LanguageModel::<Llama>::load_with(common::data("tiny-gpt2"), quiet()).err().unwrap();
    let Error::WrongArchitecture { expected, found, .. } = &err else { panic!("{err}") };
    assert_eq!((expected.as_str(), found.as_str()), ("llama", "gpt2"));
}

#[test]
fn missing_tensors_are_all_listed() {
    let tmp = copy_of("tiny-gpt2");
    edit_weights(tmp.path(), |ts| {
        ts.retain(|(n, _)| n != "transformer.h.1.mlp.c_fc.weight" && n != "transformer.ln_f.bias")
    });
    let err = LanguageModel::<Gpt2>::load_with(tmp.path(), quiet()).err().unwrap();
    let Error::MissingTensors { names, .. } = &err else { panic!("{err}") };
    assert_eq!(names, &["transformer.h.1.mlp.c_fc.weight", "transformer.ln_f.bias"]);
    assert!(err.to_string().contains("transformer.ln_f.bias"));
}

#[test]
fn unexpected_tensors_are_all_listed() {
    let tmp = copy_of("tiny-gpt2");
    edit_weights(tmp.path(), |ts| {
        ts.push(("transformer.h.7.attn.c_attn.weight".into(), Tensor::zeros([2, 2], (Kind::Float, Device::Cpu))));
        ts.push(("score.weight".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu))));
    });
    let err = LanguageModel::<Gpt2>::load_with(tmp.path(), quiet()).err().unwrap();
    let Error::UnexpectedTensors { names, .. } = &err else { panic!("{err}") };
    assert_eq!(names, &["score.weight", "transformer.h.7.attn.c_attn.weight"]);
}

#[test]
fn shape_mismatch_names_tensor_expected_and_found() {
    let tmp = copy_of("tiny-gpt2");
    edit_weights(tmp.path(), |ts| {
        for (n, t) in ts.iter_mut() {
            if n == "transformer.wpe.weight" {
                *t = Tensor::zeros([64, 64], (Kind::Float, Device::Cpu));
            }
        }
    });
    let err = LanguageModel::<Gpt2>::load_with(tmp.path(), quiet()).err().unwrap();
    let Error::ShapeMismatch { name, expected, found } = &err else { panic!("{err}") };
    assert_eq!(name, "transformer.wpe.weight");
    assert_eq!((expected.as_slice(), found.as_slice()), (&[128i64, 64][..], &[64i64, 64][..]));
}

// ---- GGUF errors, on small files written here --------------------------------------------------------------------

enum Meta<'a> {
    U32(u32),
    F32(f32),
    Str(&'a str),
    Strs(&'a [&'a str]),
}

/// Writes a GGUF v3 file with `meta` and tensors given as (name, dims innermost first, ggml type, raw bytes).
fn write_gguf(path: &Path, meta: &[(&str, Meta)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) {
    fn s(out: &mut Vec<u8>, text: &str) {
        out.extend((text.len() as u64).to_le_bytes());
        out.extend(text.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        s(&mut out, k);
        match v {
            Meta::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::Str(x) => {
                out.extend(8u32.to_le_bytes());
                s(&mut out, x);
            }
            Meta::Strs(xs) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((xs.len() as u64).to_le_bytes());
                for x in *xs {
                    s(&mut out, x);
                }
            }
        }
    }
    let mut offset = 0u64;
    for (name, dims, ty, bytes) in tensors {
        s(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (bytes.len() as u64).div_ceil(32) * 32;
    }
    while out.len() % 32 != 0 {
        out.push(0);
    }
    for (_, _, _, bytes) in tensors {
        let start = out.len();
        out.extend(bytes);
        while (out.len() - start) % 32 != 0 {
            out.push(0);
        }
    }
    std::fs::write(path, out).unwrap();
}

fn llama_meta(arch: &str) -> Vec<(&str, Meta<'_>)> {
    vec![
        ("general.architecture", Meta::Str(arch)),
        ("llama.block_count", Meta::U32(1)),
        ("llama.embedding_length", Meta::U32(32)),
        ("llama.feed_forward_length", Meta::U32(64)),
        ("llama.attention.head_count", Meta::U32(2)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("tokenizer.ggml.model", Meta::Str("gpt2")),
        ("tokenizer.ggml.tokens", Meta::Strs(&["a", "b", "ab"])),
        ("tokenizer.ggml.merges", Meta::Strs(&["a b"])),
    ]
}

fn gguf_path(tmp: &tempfile::TempDir) -> PathBuf {
    tmp.path().join("m.gguf")
}

#[test]
fn unsupported_gguf_tensor_type_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    // IQ4_NL (type 20): 18 bytes per block of 32 values.
    write_gguf(&gguf_path(&tmp), &llama_meta("llama"), &[("token_embd.weight", vec![32, 3], 20, vec![0; 54])]);
    let err = LanguageModel::<Llama>::load_with(gguf_path(&tmp), quiet()).err().unwrap();
    let Error::UnsupportedTensorType { tensor, ggml_type, type_name, .. } = &err else { panic!("{err}") };
    assert_eq!((tensor.as_str(), *ggml_type, type_name.as_str()), ("token_embd.weight", 20, "IQ4_NL"));
    assert!(err.to_string().contains("Q4_1"), "the message lists what is supported: {err}");
}

#[test]
fn unsupported_gguf_architecture_lists_the_supported_ones() {
    let tmp = tempfile::tempdir().unwrap();
    write_gguf(&gguf_path(&tmp), &llama_meta("falcon"), &[]);
    let err = LanguageModel::<AutoModel>::load_with(gguf_path(&tmp), quiet()).err().unwrap();
    let Error::UnsupportedArchitecture { found, supported } = &err else { panic!("{err}") };
    assert_eq!(found, "falcon");
    assert!(supported.contains("llama"), "{err}");
}

#[test]
fn gguf_missing_tensors_are_listed_by_hugging_face_name() {
    let tmp = tempfile::tempdir().unwrap();
    let embd: Vec<u8> = (0..3 * 32).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect();
    write_gguf(&gguf_path(&tmp), &llama_meta("llama"), &[("token_embd.weight", vec![32, 3], 0, embd)]);
    let err = LanguageModel::<Llama>::load_with(gguf_path(&tmp), quiet()).err().unwrap();
    let Error::MissingTensors { names, .. } = &err else { panic!("{err}") };
    assert!(names.contains(&"model.layers.0.self_attn.q_proj.weight".to_string()), "{err}");
    assert!(names.contains(&"model.norm.weight".to_string()), "{err}");
    assert!(!names.contains(&"model.embed_tokens.weight".to_string()));
}

#[test]
fn garbage_file_is_a_format_error() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(gguf_path(&tmp), b"this is not a model").unwrap();
    let err = LanguageModel::<Llama>::load_with(gguf_path(&tmp), quiet()).err().unwrap();
    assert!(matches!(err, Error::Format { .. }), "{err}");
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let model = LanguageModel::<Gpt2>::load_with(common::data("tiny-gpt2"), quiet()).unwrap();
    assert!(matches!(model.forward(Vec::<Vec<i64>>::new()), Err(Error::InvalidInput { .. })));
    assert!(matches!(model.forward(vec![5, 100_000]), Err(Error::InvalidInput { .. })));
    assert!(matches!(model.forward(""), Err(Error::InvalidInput { .. })));
    let long: Vec<i64> = vec![5; 200];
    let err = model.forward(long).err().unwrap();
    assert!(err.to_string().contains("128 positions"), "{err}");
}

#[test]
fn a_llama_config_without_attention_heads_is_a_clear_error() {
    common::init();
    for (heads, found) in [(0, "found 0"), (-4, "found -4")] {
        let dir = crate::family_neox::with_config("tiny-mistral", |c| {
            c["num_attention_heads"] = heads.into();
            c["num_key_value_heads"] = serde_json::Value::Null;
        });
        let err = LanguageModel::<Llama>::load_with(dir.path(), common::opts()).err().expect("refused");
        let msg = err.to_string();
        assert!(msg.contains("`num_attention_heads` must be positive") && msg.contains(found), "{msg}");
    }
}
