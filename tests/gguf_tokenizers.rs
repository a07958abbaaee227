//! SentencePiece (`tokenizer.ggml.model = "llama"`) tokenizers rebuilt from tiny GGUF files of the `llama`, `phi3`
//! and `gemma2` architectures (tests/data/gguf-tokenizers/, written by scripts/make_gguf_tokenizer_fixtures.py)
//! against transformers' own tokenizer from the same files: ids of tricky strings with and without special tokens,
//! and their decoding; plus the errors of files it cannot rebuild.

use crate::common;
use nnsight::load::gguf::GgufFile;
use nnsight::load::tokenizer::{special_tokens_from_gguf, tokenizer_from_gguf, SpecialTokens};
use nnsight::Error;
use serde_json::Value;

fn path(name: &str) -> std::path::PathBuf {
    common::data(&format!("gguf-tokenizers/{name}"))
}

fn open(name: &str) -> GgufFile {
    GgufFile::open(path(name)).unwrap_or_else(|e| panic!("open {name}: {e}"))
}

fn references() -> Value {
    let text = std::fs::read_to_string(path("references.json")).expect("references.json");
    serde_json::from_str(&text).expect("references.json is JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("ids").iter().map(|x| x.as_u64().expect("an id") as u32).collect()
}

/// Every reference string of `name` encodes to transformers' ids (with and without special tokens) and decodes to
/// transformers' text (with and without skipping special tokens).
fn matches_transformers(name: &str) {
    let refs = references();
    let file_refs = &refs["files"][name];
    let tokenizer = tokenizer_from_gguf(&open(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(tokenizer.get_vocab_size(true), file_refs["vocab_size"].as_u64().unwrap() as usize, "{name}");
    let cases = file_refs["cases"].as_array().expect("cases");
    assert!(cases.len() >= 17, "{name}: {} cases", cases.len());
    let mut failures = vec![];
    for case in cases {
        let text = case["text"].as_str().unwrap();
        for (add_special, key) in [(true, "ids_with_special"), (false, "ids_without_special")] {
            let ours = tokenizer.encode(text, add_special).unwrap();
            if ours.get_ids() != ids(&case[key]).as_slice() {
                failures.push(format!(
                    "{name} {text:?} ({key}): ours {:?} {:?}, transformers' {} {}",
                    ours.get_ids(),
                    ours.get_tokens(),
                    case[key],
                    case["tokens_with_special"]
                ));
            }
        }
        let reference_ids = ids(&case["ids_with_special"]);
        for (skip, key) in [(false, "decoded"), (true, "decoded_skip_special")] {
            let ours = tokenizer.decode(&reference_ids, skip).unwrap();
            if ours != case[key].as_str().unwrap() {
                failures.push(format!("{name} {text:?} ({key}): ours {ours:?}, transformers' {}", case[key]));
            }
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn gguf_sentencepiece_llama_matches_transformers() {
    matches_transformers("llama.gguf");
}

#[test]
fn gguf_sentencepiece_phi3_matches_transformers() {
    matches_transformers("phi3.gguf");
}

#[test]
fn gguf_sentencepiece_gemma2_matches_transformers() {
    matches_transformers("gemma2.gguf");
}

#[test]
fn gguf_sentencepiece_special_tokens() {
    // No `add_bos_token` key: a sentencepiece vocabulary adds BOS, as in transformers and llama.cpp.
    assert_eq!(
        special_tokens_from_gguf(&open("llama.gguf")),
        SpecialTokens { bos: Some(1), eos: Some(2), pad: None, add_bos: true }
    );
    let phi3 = special_tokens_from_gguf(&open("phi3.gguf"));
    assert!(!phi3.add_bos);
    let tokenizer = tokenizer_from_gguf(&open("phi3.gguf")).unwrap();
    let eos = tokenizer.token_to_id("<|endoftext|>").unwrap();
    assert_eq!(phi3.eos, Some(eos));
    // Control tokens are special (skipped when decoding), user-defined ones are not.
    let chat = tokenizer.encode("<|user|>\nHi<|end|>", false).unwrap();
    assert_eq!(chat.get_tokens().first().map(String::as_str), Some("<|user|>"));
    assert_eq!(chat.get_tokens().last().map(String::as_str), Some("<|end|>"));
    assert_eq!(tokenizer.decode(chat.get_ids(), true).unwrap(), "<|user|> \nHi");
}

/// The error of building the tokenizer of `name`; it must name the file and `key`.
fn error_of(name: &str, key: &str) -> String {
    let e = tokenizer_from_gguf(&open(name)).expect_err(name);
    assert!(matches!(e, Error::Tokenizer { .. }), "{name}: {e:?}");
    let message = e.to_string();
    assert!(message.contains(&path(name).display().to_string()), "{name}: the file is not named: {message}");
    assert!(message.contains(key), "{name}: `{key}` is not named: {message}");
    message
}

#[test]
fn gguf_tokenizer_unsupported_model_is_an_error() {
    let message = error_of("unsupported-model.gguf", "tokenizer.ggml.model");
    assert!(message.contains("`rwkv`") && message.contains("gpt2, llama"), "{message}");
}

#[test]
fn gguf_sentencepiece_without_scores_is_an_error() {
    let message = error_of("missing-scores.gguf", "tokenizer.ggml.scores");
    assert!(message.contains("tokenizer.ggml.merges"), "{message}");
}
