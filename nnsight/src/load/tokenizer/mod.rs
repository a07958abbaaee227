//! Tokenizers: a Hugging Face `tokenizer.json`, or one rebuilt from a GGUF file's metadata.
//!
//! A GGUF file carries no `tokenizer.json`, only the vocabulary, the merges, the token types and the special token
//! ids under llama.cpp's keys (`tokenizer.ggml.*`). [`tokenizer_from_gguf`] rebuilds from them the tokenizer that
//! Hugging Face transformers builds from the same file (`integrations/gguf/gguf_tokenizer_mapping.py`): for
//! `tokenizer.ggml.model = "gpt2"` a byte-level BPE without normalizer, with a ByteLevel pre-tokenizer and decoder,
//! control tokens added as special tokens and user-defined tokens as plain added tokens.

use std::path::Path;

use ahash::AHashMap;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::gguf::{GgufFile, MetaValue};
use crate::error::{Error, Result};

/// The `tokenizer.ggml.model` values [`tokenizer_from_gguf`] can rebuild.
const SUPPORTED_MODELS: &str = "gpt2";

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Pre-tokenization regexes of llama.cpp's `tokenizer.ggml.pre` values whose split differs from GPT-2's (the
/// same table as transformers' `GGUF_PRE_TOKENIZER_SPLITS`). Others (`smollm`, `gpt2`, ...) use GPT-2's.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn pre_tokenizer_split(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// The special token ids and BOS policy a GGUF file states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SpecialTokens {
    /// Beginning of sequence (`tokenizer.ggml.bos_token_id`).
    pub bos: Option<u32>,
    /// End of sequence (`tokenizer.ggml.eos_token_id`); generation stops here.
    pub eos: Option<u32>,
    /// Padding (`tokenizer.ggml.padding_token_id`).
    pub pad: Option<u32>,
    /// Whether encoding prepends BOS (`tokenizer.ggml.add_bos_token`; when absent, true only for sentencepiece
    /// `llama` vocabularies, as in transformers).
    pub add_bos: bool,
}

fn tokenizer_error(file: &GgufFile, message: impl std::fmt::Display) -> Error {
    Error::Tokenizer { message: format!("{}: {message}", file.path.display()) }
}

fn token_id(file: &GgufFile, key: &str) -> Option<u32> {
    file.get(key).and_then(MetaValue::as_u64).and_then(|v| u32::try_from(v).ok())
}

/// Reads the special token ids and the BOS policy from GGUF metadata (absent or malformed entries are `None`).
pub fn special_tokens_from_gguf(file: &GgufFile) -> SpecialTokens {
    let model = file.get("tokenizer.ggml.model").and_then(MetaValue::as_str);
    SpecialTokens {
        bos: token_id(file, "tokenizer.ggml.bos_token_id"),
        eos: token_id(file, "tokenizer.ggml.eos_token_id"),
        pad: token_id(file, "tokenizer.ggml.padding_token_id"),
        add_bos: file
            .get("tokenizer.ggml.add_bos_token")
            .and_then(MetaValue::as_bool)
            .unwrap_or(model == Some("llama")),
    }
}

/// GPT-2's byte-to-character table: every byte gets a printable character (bytes that are printable themselves
/// keep theirs; the rest map to U+0100 onwards).
fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut printable = [false; 256];
    for b in (b'!'..=b'~').chain(0xA1..=0xAC).chain(0xAE..=0xFF) {
        printable[b as usize] = true;
        table[b as usize] = b as char;
    }
    let mut n = 0u32;
    for b in 0..256usize {
        if !printable[b] {
            table[b] = char::from_u32(256 + n).expect("valid code point");
            n += 1;
        }
    }
    table
}

fn string_array<'a>(file: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let arr = file
        .get(key)
        .and_then(MetaValue::as_array)
        .ok_or_else(|| tokenizer_error(file, format!("GGUF metadata `{key}` is missing or not an array")))?;
    arr.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str().ok_or_else(|| {
                tokenizer_error(
                    file,
                    format!("GGUF metadata `{key}`: element {i} is a {}, not a string", v.type_name()),
                )
            })
        })
        .collect()
}

/// Rebuilds the Hugging Face tokenizer from GGUF metadata (`tokenizer.ggml.model = "gpt2"`: byte-level BPE).
///
/// The result encodes like the tokenizer transformers builds from the same file: no normalizer, GPT-2's
/// ByteLevel pre-tokenizer (or llama.cpp's split regex for `tokenizer.ggml.pre` values such as `llama-bpe` and
/// `qwen2`), control tokens (`<|im_start|>`) kept whole as special tokens, user-defined tokens kept whole, a
/// ByteLevel decoder, and BOS/EOS added only where `tokenizer.ggml.add_bos_token`/`add_eos_token` say so.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<Tokenizer> {
    let model = file.get("tokenizer.ggml.model").and_then(MetaValue::as_str).ok_or_else(|| {
        tokenizer_error(file, "the GGUF file has no `tokenizer.ggml.model`, so it holds no tokenizer")
    })?;
    if model != "gpt2" {
        return Err(tokenizer_error(
            file,
            format!(
                "GGUF tokenizer model `{model}` is not supported; supported tokenizer models: {SUPPORTED_MODELS} \
                 (give a tokenizer.json instead)"
            ),
        ));
    }

    let tokens = string_array(file, "tokenizer.ggml.tokens")?;
    // Byte-level vocabularies spell every token in GPT-2's byte alphabet. A token outside it is written as plain
    // text in the file; respell it byte by byte, as transformers does, so that it is reachable.
    let alphabet = byte_to_char();
    let mut in_alphabet = [false; 0x144];
    for c in alphabet {
        in_alphabet[c as usize] = true;
    }
    let spelled = |t: &str| t.chars().all(|c| (c as usize) < in_alphabet.len() && in_alphabet[c as usize]);
    let mut vocab: AHashMap<String, u32> = AHashMap::with_capacity(tokens.len());
    for (id, &token) in tokens.iter().enumerate() {
        let id = u32::try_from(id).map_err(|_| tokenizer_error(file, "more than 2^32 tokens"))?;
        let key = if spelled(token) { token.to_owned() } else { token.bytes().map(|b| alphabet[b as usize]).collect() };
        vocab.insert(key, id);
    }

    let merges = match file.get("tokenizer.ggml.merges") {
        Some(_) => string_array(file, "tokenizer.ggml.merges")?
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())).ok_or_else(|| {
                    tokenizer_error(file, format!("`tokenizer.ggml.merges` element {i} ({m:?}) is not two tokens"))
                })
            })
            .collect::<Result<Vec<_>>>()?,
        None => {
            return Err(tokenizer_error(file, "the GGUF file has a gpt2 vocabulary but no `tokenizer.ggml.merges`"))
        }
    };

    let bpe = BPE::builder()
        .vocab_and_merges(vocab.clone(), merges)
        .build()
        .map_err(|e| tokenizer_error(file, format!("cannot build the BPE model: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);

    let pre = file.get("tokenizer.ggml.pre").and_then(MetaValue::as_str).unwrap_or("");
    match pre_tokenizer_split(pre) {
        None => {
            tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        }
        Some(regex) => {
            let split = Split::new(SplitPattern::Regex(regex.to_owned()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| tokenizer_error(file, format!("split regex of pre-tokenizer `{pre}`: {e}")))?;
            let seq = Sequence::new(vec![
                PreTokenizerWrapper::Split(split),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
            ]);
            tokenizer.with_pre_tokenizer(Some(seq));
        }
    }
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    // transformers' post-processor: a template that adds BOS/EOS only where the file asks for it.
    let special = special_tokens_from_gguf(file);
    let add_eos = file.get("tokenizer.ggml.add_eos_token").and_then(MetaValue::as_bool).unwrap_or(false);
    let name_of = |id: Option<u32>, what: &str| -> Result<(String, u32)> {
        let id = id.ok_or_else(|| tokenizer_error(file, format!("add_{what}_token is set but no {what} token id")))?;
        let name = tokens
            .get(id as usize)
            .ok_or_else(|| tokenizer_error(file, format!("{what} token id {id} is beyond the vocabulary")))?;
        Ok(((*name).to_owned(), id))
    };
    let bos = if special.add_bos { Some(name_of(special.bos, "bos")?) } else { None };
    let eos = if add_eos { Some(name_of(special.eos, "eos")?) } else { None };
    let (mut single, mut pair) = (String::new(), String::new());
    if let Some((b, _)) = &bos {
        single.push_str(&format!("{b}:0 "));
    }
    single.push_str("$A:0");
    if let Some((e, _)) = &eos {
        single.push_str(&format!(" {e}:0"));
    }
    pair.push_str(&single);
    if let Some((b, _)) = &bos {
        pair.push_str(&format!(" {b}:1"));
    }
    pair.push_str(" $B:1");
    if let Some((e, _)) = &eos {
        pair.push_str(&format!(" {e}:1"));
    }
    let mut specials: Vec<(String, u32)> = bos.into_iter().collect();
    specials.extend(eos);
    specials.dedup();
    let template = TemplateProcessing::builder()
        .try_single(single.as_str())
        .and_then(|b| b.try_pair(pair.as_str()))
        .map_err(|e| tokenizer_error(file, format!("post-processor template: {e}")))?
        .special_tokens(specials)
        .build()
        .map_err(|e| tokenizer_error(file, format!("post-processor template: {e}")))?;
    tokenizer.with_post_processor(Some(template));

    // Control tokens (3) become special added tokens, so `<|im_start|>` stays one token and is skipped when
    // decoding with `skip_special_tokens`; a control token outside the byte alphabet is a llama.cpp mislabel and
    // is skipped, as transformers does. User-defined tokens (4) already in the vocabulary are added non-special.
    if let Some(types) = file.get("tokenizer.ggml.token_type").and_then(MetaValue::as_array) {
        let mut control = vec![];
        let mut user = vec![];
        for (&token, t) in tokens.iter().zip(types) {
            match t.as_i64() {
                Some(TOKEN_TYPE_CONTROL) if spelled(token) => control.push(AddedToken::from(token, true)),
                Some(TOKEN_TYPE_USER_DEFINED) if vocab.contains_key(token) => {
                    user.push(AddedToken::from(token, false).normalized(false))
                }
                _ => {}
            }
        }
        tokenizer.add_special_tokens(&control);
        tokenizer.add_tokens(&user);
    }
    Ok(tokenizer)
}

/// Loads a Hugging Face `tokenizer.json`; a missing file gives [`Error::FileNotFound`].
pub fn tokenizer_from_file(path: &Path) -> Result<Tokenizer> {
    if !path.is_file() {
        return Err(Error::FileNotFound { path: path.to_path_buf(), what: "tokenizer.json".to_owned() });
    }
    Tokenizer::from_file(path).map_err(|e| Error::Tokenizer { message: format!("{}: {e}", path.display()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let t = byte_to_char();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[0], 'Ā');
        let mut sorted = t.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }

    #[test]
    fn split_regexes_compile() {
        for pre in ["llama-bpe", "qwen2", "qwen35", "tekken", "gpt-4o"] {
            let regex = pre_tokenizer_split(pre).unwrap();
            Split::new(SplitPattern::Regex(regex.to_owned()), SplitDelimiterBehavior::Isolated, false)
                .unwrap_or_else(|e| panic!("{pre}: {e}"));
        }
        assert!(pre_tokenizer_split("smollm").is_none());
    }

    #[test]
    fn missing_tokenizer_json() {
        let e = tokenizer_from_file(Path::new("/nonexistent/tokenizer.json")).unwrap_err();
        assert!(matches!(e, Error::FileNotFound { .. }), "{e}");
    }
}
