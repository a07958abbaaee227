//! `tokenizer.ggml.model = "llama"`: a SentencePiece vocabulary (Llama 2, Mistral v0.1, Phi-3, Gemma), rebuilt as
//! the BPE with byte fallback that transformers 5 builds (`sentencepiece_tokenizer`, `phi3_tokenizer`,
//! `gemma_tokenizer` in `integrations/gguf/gguf_tokenizer_mapping.py`, handing to `LlamaTokenizer` or
//! `GemmaTokenizer`).
//!
//! Such files rarely carry merges: they are recovered from the vocabulary as transformers' `generate_merges`
//! does, every split of a token into two tokens of the vocabulary, best first by the token's score (Gemma: by its
//! position in the file, since Gemma's scores do not follow its merge order).

use std::borrow::Cow;

use ahash::AHashMap;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::{tokenizer_error, typed_array};
use crate::error::Result;
use crate::load::gguf::{GgufFile, MetaValue};

/// SentencePiece's word-boundary marker, which stands for a space in the vocabulary.
const METASPACE: char = '\u{2581}';

/// How a `general.architecture` shapes a SentencePiece tokenizer (transformers picks its builder the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flavour {
    /// `LlamaTokenizer`: a Metaspace pre-tokenizer that prepends `▁` to the first word only, and a decoder that
    /// strips the space that gives back.
    Llama,
    /// Phi-3: the prefix `▁` comes from a normalizer, before every piece of text between added tokens, and
    /// spaces become `▁` there too; no pre-tokenizer. Differs from Llama on text starting with a space.
    Phi3,
    /// `GemmaTokenizer`: no prefix space, spaces become `▁` in a normalizer, `<unk>` for what bytes cannot spell;
    /// multi-space tokens the file spells with real spaces are respelled with `▁`, and the merges follow the
    /// file's order.
    Gemma,
}

impl Flavour {
    /// The flavour transformers uses for `architecture` (`gemma`, `gemma2`, `gemma3`, `phi3`; Llama otherwise).
    pub(super) fn of(architecture: &str) -> Self {
        match architecture {
            "gemma" | "gemma2" | "gemma3" => Flavour::Gemma,
            "phi3" => Flavour::Phi3,
            _ => Flavour::Llama,
        }
    }
}

/// Python's `str.isspace` (Unicode White_Space, plus the information separators U+001C..U+001F it also counts).
fn python_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Gemma's respelling: a token of whitespace that holds a space (`"  "`) becomes as many `▁` as it has characters.
fn gemma_spelling(token: &str) -> Cow<'_, str> {
    if token.contains(' ') && token.chars().all(python_isspace) {
        Cow::Owned(std::iter::repeat_n(METASPACE, token.chars().count()).collect())
    } else {
        Cow::Borrowed(token)
    }
}

/// The merges a vocabulary implies (transformers' `generate_merges` with scores): for every token with a score,
/// each split into a left and a right token of the vocabulary (ordered by their ids), all of them sorted by the
/// token's score, then the lengths of left and right, highest first; ties keep their order.
pub(super) fn generate_merges(tokens: &[Cow<'_, str>], scores: &[f64]) -> Vec<(String, String)> {
    // Python dicts: a repeated token keeps its last id and score, at the place it first appeared.
    let mut vocab: AHashMap<&str, usize> = AHashMap::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        vocab.insert(token.as_ref(), id);
    }
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    let mut score_of: AHashMap<&str, f64> = AHashMap::with_capacity(tokens.len());
    for (token, &score) in tokens.iter().zip(scores) {
        if score_of.insert(token.as_ref(), score).is_none() {
            order.push(token.as_ref());
        }
    }
    let mut merges: Vec<(&str, &str, f64, usize, usize)> = Vec::new();
    for merge in order {
        let score = score_of[merge];
        let mut local: Vec<(&str, &str, f64, usize, usize)> = merge
            .char_indices()
            .skip(1)
            .map(|(at, _)| merge.split_at(at))
            .filter(|(left, right)| vocab.contains_key(left) && vocab.contains_key(right))
            .map(|(left, right)| (left, right, score, left.chars().count(), right.chars().count()))
            .collect();
        local.sort_by_key(|&(left, right, ..)| (vocab[left], vocab[right]));
        merges.extend(local);
    }
    merges.sort_by(|a, b| b.2.total_cmp(&a.2).then(b.3.cmp(&a.3)).then(b.4.cmp(&a.4)));
    merges.into_iter().map(|(left, right, ..)| (left.to_owned(), right.to_owned())).collect()
}

/// `tokenizer.ggml.scores` as numbers; a missing key is an error naming it (the merges cannot be recovered).
fn scores(file: &GgufFile) -> Result<Vec<f64>> {
    const KEY: &str = "tokenizer.ggml.scores";
    if file.get(KEY).is_none() {
        return Err(tokenizer_error(
            file,
            format!(
                "GGUF metadata `{KEY}` is missing; a sentencepiece (`llama`) vocabulary without \
                 `tokenizer.ggml.merges` needs its scores to recover the merges"
            ),
        ));
    }
    typed_array(file, KEY, "a number", MetaValue::as_f64)
}

fn replace(file: &GgufFile, pattern: &str, content: &str) -> Result<Replace> {
    Replace::new(pattern, content).map_err(|e| tokenizer_error(file, format!("replace {pattern:?}: {e}")))
}

/// The SentencePiece tokenizer of `tokens` in `flavour`, without post-processor or added tokens (the caller adds
/// those).
pub(super) fn build(file: &GgufFile, tokens: &[&str], flavour: Flavour) -> Result<Tokenizer> {
    let spelled: Vec<Cow<'_, str>> = match flavour {
        Flavour::Gemma => tokens.iter().map(|t| gemma_spelling(t)).collect(),
        Flavour::Llama | Flavour::Phi3 => tokens.iter().map(|&t| Cow::Borrowed(t)).collect(),
    };
    let mut vocab: AHashMap<String, u32> = AHashMap::with_capacity(tokens.len());
    for (id, token) in spelled.iter().enumerate() {
        let id = u32::try_from(id).map_err(|_| tokenizer_error(file, "more than 2^32 tokens"))?;
        vocab.insert(token.as_ref().to_owned(), id);
    }
    let merges = if file.get("tokenizer.ggml.merges").is_some() {
        super::file_merges(file)?
    } else {
        let ranks = match flavour {
            Flavour::Gemma => (0..spelled.len()).map(|i| -(i as f64)).collect(),
            Flavour::Llama | Flavour::Phi3 => scores(file)?,
        };
        generate_merges(&spelled, &ranks)
    };

    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).fuse_unk(true).byte_fallback(true);
    if flavour == Flavour::Gemma {
        builder = builder.unk_token("<unk>".to_owned());
    }
    let bpe = builder.build().map_err(|e| tokenizer_error(file, format!("cannot build the BPE model: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);

    let mut decoders = vec![
        DecoderWrapper::Replace(replace(file, &METASPACE.to_string(), " ")?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    match flavour {
        Flavour::Llama => {
            tokenizer.with_pre_tokenizer(Some(Metaspace::new(METASPACE, PrependScheme::First, false)));
        }
        Flavour::Phi3 => {
            tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![
                NormalizerWrapper::Prepend(Prepend::new(METASPACE.to_string())),
                NormalizerWrapper::Replace(replace(file, " ", &METASPACE.to_string())?),
            ])));
            tokenizer.with_pre_tokenizer(None::<PreTokenizerWrapper>);
        }
        Flavour::Gemma => {
            tokenizer.with_normalizer(Some(replace(file, " ", &METASPACE.to_string())?));
            let split =
                Split::new(SplitPattern::String(" ".to_owned()), SplitDelimiterBehavior::MergedWithPrevious, false)
                    .map_err(|e| tokenizer_error(file, format!("split on spaces: {e}")))?;
            tokenizer.with_pre_tokenizer(Some(split));
        }
    }
    if flavour != Flavour::Gemma {
        // LlamaTokenizer's `add_prefix_space`: the space the prefix `▁` decodes to is dropped.
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cows<'a>(tokens: &[&'a str]) -> Vec<Cow<'a, str>> {
        tokens.iter().map(|&t| Cow::Borrowed(t)).collect()
    }

    #[test]
    fn merges_from_scores_best_first() {
        let tokens = cows(&["a", "b", "c", "ab", "abc", "bc"]);
        let scores = [0.0, 0.0, 0.0, -1.0, -3.0, -2.0];
        let merges = generate_merges(&tokens, &scores);
        let pairs: Vec<(&str, &str)> = merges.iter().map(|(l, r)| (l.as_str(), r.as_str())).collect();
        // "abc" splits as a+bc and ab+c (in that order by the ids of the left parts); equal scores then put the
        // longer left part first. transformers gives the same list.
        assert_eq!(pairs, [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]);
    }

    #[test]
    fn ties_keep_the_order_and_longer_splits_come_first() {
        let tokens = cows(&["x", "y", "xy", "xx", "xxy"]);
        let merges = generate_merges(&tokens, &[0.0, 0.0, -1.0, -1.0, -1.0]);
        let pairs: Vec<(&str, &str)> = merges.iter().map(|(l, r)| (l.as_str(), r.as_str())).collect();
        assert_eq!(pairs, [("xx", "y"), ("x", "xy"), ("x", "y"), ("x", "x")]);
    }

    #[test]
    fn gemma_respells_space_runs_only() {
        assert_eq!(gemma_spelling("  "), "▁▁");
        assert_eq!(gemma_spelling(" \n"), "▁▁");
        assert_eq!(gemma_spelling("\n\n"), "\n\n");
        assert_eq!(gemma_spelling("▁a"), "▁a");
        assert_eq!(gemma_spelling(" a"), " a");
        assert_eq!(Flavour::of("gemma3"), Flavour::Gemma);
        assert_eq!(Flavour::of("phi3"), Flavour::Phi3);
        assert_eq!(Flavour::of("mistral"), Flavour::Llama);
    }
}
