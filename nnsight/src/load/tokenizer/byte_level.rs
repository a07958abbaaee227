//! `tokenizer.ggml.model = "gpt2"`: a byte-level BPE (transformers' `byte_level_tokenizer`): the vocabulary in
//! GPT-2's byte alphabet, the file's merges, GPT-2's ByteLevel pre-tokenizer and decoder, no normalizer.

use ahash::AHashMap;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::Tokenizer;

use super::tokenizer_error;
use crate::error::Result;
use crate::load::gguf::GgufFile;

/// GPT-2's byte-to-character table: every byte gets a printable character (bytes that are printable themselves
/// keep theirs; the rest map to U+0100 onwards).
pub(super) fn byte_to_char() -> [char; 256] {
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

/// Whether every character of `token` is in GPT-2's byte alphabet.
pub(super) fn spelled_in_byte_alphabet(token: &str) -> bool {
    let alphabet = byte_to_char();
    token.chars().all(|c| alphabet.contains(&c))
}

/// The byte-level BPE of a `gpt2` vocabulary, without post-processor or added tokens (the caller adds those).
pub(super) fn build(file: &GgufFile, tokens: &[&str]) -> Result<Tokenizer> {
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

    if file.get("tokenizer.ggml.merges").is_none() {
        return Err(tokenizer_error(file, "the GGUF file has a gpt2 vocabulary but no `tokenizer.ggml.merges`"));
    }
    let merges = super::file_merges(file)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| tokenizer_error(file, format!("cannot build the BPE model: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
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
        assert!(spelled_in_byte_alphabet("ĠHello"));
        assert!(!spelled_in_byte_alphabet("<think> x"));
    }
}
