//! Tokenizers: a Hugging Face `tokenizer.json`, or one rebuilt from a GGUF file's metadata.
//!
//! A GGUF file carries no `tokenizer.json`, only the vocabulary, the merges, the scores, the token types and the
//! special token ids under llama.cpp's keys (`tokenizer.ggml.*`). [`tokenizer_from_gguf`] rebuilds from them the
//! tokenizer that Hugging Face transformers builds from the same file (`integrations/gguf/gguf_tokenizer_mapping.py`):
//! for `tokenizer.ggml.model = "gpt2"` a byte-level BPE (`byte_level`), for `"llama"` a SentencePiece vocabulary as
//! a BPE with byte fallback in Llama's, Phi-3's or Gemma's shape (`sentencepiece`); for both, control tokens
//! added as special tokens, user-defined tokens as plain added tokens, BOS/EOS as the file says.

use std::path::Path;

use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use self::sentencepiece::Flavour;
use super::gguf::{GgufFile, MetaValue};
use crate::error::{Error, Result};

mod byte_level;
mod sentencepiece;

/// The `tokenizer.ggml.model` values [`tokenizer_from_gguf`] can rebuild.
const SUPPORTED_MODELS: &str = "gpt2, llama";

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

/// The array `key` with each element converted by `convert` (`what` names the element type for the error).
fn typed_array<'a, T>(
    file: &'a GgufFile,
    key: &str,
    what: &str,
    convert: impl Fn(&'a MetaValue) -> Option<T>,
) -> Result<Vec<T>> {
    let arr = file
        .get(key)
        .and_then(MetaValue::as_array)
        .ok_or_else(|| tokenizer_error(file, format!("GGUF metadata `{key}` is missing or not an array")))?;
    arr.iter()
        .enumerate()
        .map(|(i, v)| {
            convert(v).ok_or_else(|| {
                tokenizer_error(file, format!("GGUF metadata `{key}`: element {i} is a {}, not {what}", v.type_name()))
            })
        })
        .collect()
}

fn string_array<'a>(file: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    typed_array(file, key, "a string", MetaValue::as_str)
}

/// `tokenizer.ggml.merges` as pairs (each element is two tokens separated by a space).
fn file_merges(file: &GgufFile) -> Result<Vec<(String, String)>> {
    string_array(file, "tokenizer.ggml.merges")?
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())).ok_or_else(|| {
                tokenizer_error(file, format!("`tokenizer.ggml.merges` element {i} ({m:?}) is not two tokens"))
            })
        })
        .collect()
}

/// Rebuilds the Hugging Face tokenizer from GGUF metadata, as transformers 5 does from the same file.
///
/// `tokenizer.ggml.model` picks the kind:
/// - `gpt2`: a byte-level BPE without normalizer, GPT-2's ByteLevel pre-tokenizer and decoder.
/// - `llama`: a SentencePiece vocabulary, rebuilt as a BPE with byte fallback whose merges come from the file or
///   are recovered from the scores; `general.architecture` picks Llama's shape (Metaspace pre-tokenizer; Llama 2,
///   Mistral), Phi-3's (`phi3`: the prefix `▁` from a normalizer) or Gemma's (`gemma`, `gemma2`, `gemma3`: no
///   prefix, merges in file order, multi-space tokens respelled with `▁`).
///
/// For either kind, llama.cpp's split regex replaces the pre-tokenizer where `tokenizer.ggml.pre` names one
/// (`llama-bpe`, `qwen2`, ...); control tokens (`<|im_start|>`, `<s>`) are kept whole as special tokens, and so
/// are the BOS, EOS, unknown and padding tokens the file names; user-defined tokens are kept whole as plain added
/// tokens; and BOS/EOS are added where `tokenizer.ggml.add_bos_token` / `add_eos_token` say so (BOS by default on
/// a `llama` vocabulary). An unknown `tokenizer.ggml.model`, or a `llama` vocabulary with neither merges nor
/// scores, is an [`Error::Tokenizer`] naming the file and the key.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<Tokenizer> {
    let model = file.get("tokenizer.ggml.model").and_then(MetaValue::as_str).ok_or_else(|| {
        tokenizer_error(file, "the GGUF file has no `tokenizer.ggml.model`, so it holds no tokenizer")
    })?;
    let architecture = file.get("general.architecture").and_then(MetaValue::as_str).unwrap_or("");
    let flavour = Flavour::of(architecture);
    let tokens = string_array(file, "tokenizer.ggml.tokens")?;
    let mut tokenizer = match model {
        "gpt2" => byte_level::build(file, &tokens)?,
        "llama" => sentencepiece::build(file, &tokens, flavour)?,
        _ => {
            return Err(tokenizer_error(
                file,
                format!(
                    "GGUF metadata `tokenizer.ggml.model` is `{model}`, which is not supported; supported \
                     tokenizer models: {SUPPORTED_MODELS} (give a tokenizer.json instead)"
                ),
            ))
        }
    };
    add_gguf_special_tokens(file, &tokens, model == "gpt2", &mut tokenizer);
    // Then the special tokens transformers' tokenizer class names: the file's BOS, EOS, unknown and padding tokens
    // and, for GemmaTokenizer, `<mask>`. transformers appends one missing from the vocabulary as a new token; that
    // would outgrow the model's embedding, so only those in the vocabulary are kept whole here.
    let named = ["bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"]
        .iter()
        .filter_map(|key| token_id(file, &format!("tokenizer.ggml.{key}")))
        .filter_map(|id| tokens.get(id as usize).map(|t| (*t).to_owned()))
        .chain((flavour == Flavour::Gemma && model == "llama").then(|| "<mask>".to_owned()));
    let added: Vec<String> = tokenizer.get_added_tokens_decoder().into_values().map(|t| t.content).collect();
    let mut specials: Vec<AddedToken> = vec![];
    for name in named {
        if !added.contains(&name)
            && tokenizer.token_to_id(&name).is_some()
            && !specials.iter().any(|t| t.content == name)
        {
            specials.push(AddedToken::from(name, true));
        }
    }
    tokenizer.add_special_tokens(&specials);
    set_split_regex(file, &mut tokenizer)?;
    set_post_processor(file, &tokens, &mut tokenizer)?;
    Ok(tokenizer)
}

/// transformers' `add_gguf_special_tokens`: control tokens (3) become special added tokens, so `<|im_start|>`
/// stays one token and is skipped when decoding with `skip_special_tokens`; in a byte-level vocabulary a control
/// token outside the byte alphabet is a llama.cpp mislabel and is skipped. User-defined tokens (4) in the
/// vocabulary are added non-special.
fn add_gguf_special_tokens(file: &GgufFile, tokens: &[&str], byte_level: bool, tokenizer: &mut Tokenizer) {
    let Some(types) = file.get("tokenizer.ggml.token_type").and_then(MetaValue::as_array) else {
        return;
    };
    let control: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(token, t)| {
            t.as_i64() == Some(TOKEN_TYPE_CONTROL) && (!byte_level || byte_level::spelled_in_byte_alphabet(token))
        })
        .map(|(&token, _)| AddedToken::from(token, true))
        .collect();
    tokenizer.add_special_tokens(&control);
    let vocab = tokenizer.get_vocab(true);
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(token, t)| t.as_i64() == Some(TOKEN_TYPE_USER_DEFINED) && vocab.contains_key(**token))
        .map(|(&token, _)| AddedToken::from(token, false).normalized(false))
        .collect();
    tokenizer.add_tokens(&user);
}

/// transformers' `set_split_regex`: where `tokenizer.ggml.pre` names one of llama.cpp's split regexes, the text is
/// split with it and then mapped to GPT-2's byte alphabet, whatever the kind of vocabulary.
fn set_split_regex(file: &GgufFile, tokenizer: &mut Tokenizer) -> Result<()> {
    let pre = file.get("tokenizer.ggml.pre").and_then(MetaValue::as_str).unwrap_or("");
    if let Some(regex) = pre_tokenizer_split(pre) {
        let split = Split::new(SplitPattern::Regex(regex.to_owned()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| tokenizer_error(file, format!("split regex of pre-tokenizer `{pre}`: {e}")))?;
        let seq = Sequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
        ]);
        tokenizer.with_pre_tokenizer(Some(seq));
    }
    Ok(())
}

/// transformers' post-processor: a template that adds BOS/EOS only where the file asks for it (and names the
/// token: without an id, nothing is added, as in transformers).
fn set_post_processor(file: &GgufFile, tokens: &[&str], tokenizer: &mut Tokenizer) -> Result<()> {
    let special = special_tokens_from_gguf(file);
    let add_eos = file.get("tokenizer.ggml.add_eos_token").and_then(MetaValue::as_bool).unwrap_or(false);
    let name_of = |id: Option<u32>, what: &str| -> Result<Option<(String, u32)>> {
        let Some(id) = id else { return Ok(None) };
        let name = tokens
            .get(id as usize)
            .ok_or_else(|| tokenizer_error(file, format!("{what} token id {id} is beyond the vocabulary")))?;
        Ok(Some(((*name).to_owned(), id)))
    };
    let bos = if special.add_bos { name_of(special.bos, "bos")? } else { None };
    let eos = if add_eos { name_of(special.eos, "eos")? } else { None };
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
    Ok(())
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
