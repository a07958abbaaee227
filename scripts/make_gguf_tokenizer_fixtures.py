#!/usr/bin/env python3
"""Write the tiny GGUF files with SentencePiece (`tokenizer.ggml.model = "llama"`) vocabularies that
tests/gguf_tokenizers.rs rebuilds, with transformers' own encodings of tricky strings as references.

Run with the project's torch venv after `make setup-peer` (which installs sentencepiece into it):

    ~/.cache/nnsight-rs/venv-torch-2.13.0/bin/python scripts/make_gguf_tokenizer_fixtures.py

It (re)writes, deterministically, in tests/data/gguf-tokenizers/:

    llama.gguf   a Llama 2 / Mistral v0.1 style vocabulary (`general.architecture = "llama"`): SentencePiece BPE
                 with byte fallback, dummy prefix, split digits; `<unk>` `<s>` `</s>` at 0..2, `<0x00>`..`<0xFF>`
                 next; no `add_bos_token` key (transformers then adds BOS); one user-defined token appended.
    phi3.gguf    the same kind of vocabulary under `phi3`, with Phi-3's appended tokens (`<|endoftext|>`,
                 `<|end|>` control; `<|user|>`, `<|assistant|>` user-defined) and `add_bos_token = false`.
    gemma2.gguf  a Gemma style vocabulary under `gemma2`: no dummy prefix, whitespace-only pieces, which the
                 file spells with real spaces as llama.cpp's Gemma files do, `<pad>` `<eos>` `<bos>` `<unk>`
                 at 0..3, control `<start_of_turn>`/`<end_of_turn>`, `<mask>` unmarked, and scores shuffled (transformers orders
                 Gemma's merges by position in the file, not by score).
    unsupported-model.gguf  `tokenizer.ggml.model = "rwkv"` (no builder for it).
    missing-scores.gguf     a `llama` vocabulary without `tokenizer.ggml.scores` (nor merges).
    references.json  per file, per string: transformers' ids (with and without special tokens), its decoding
                 of them (with and without skipping special tokens), and versions.

None of the files holds tensors: only what transformers reads to build the tokenizer, and the few sizes its
config reader wants. The vocabularies are trained here on the English text below with `sentencepiece`.
"""

import io
import json
import random
import tempfile
from pathlib import Path

import gguf
import sentencepiece as spm
import tokenizers
import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "gguf-tokenizers"

CORPUS = """\
The Eiffel Tower is in the city of Paris, and the river Seine runs past it.
In 1889 the tower was the tallest building in the world: 300 metres, 18038 pieces of iron.
A café on the corner sells croissants; the naïve tourist pays 12.50 euros for two.
    def greet(name):
        return "Hello, " + name + "!"
    for i in range(10):
        print(i * i)
Rust is a language for writing fast and reliable software. It has no garbage collector.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159 42.
She said: "don't stop", and he answered, "I won't, I'll keep going; they've seen it, we're sure."
Tokenizers split text into pieces; a piece may be a word, part of a word or a single byte.
Indented  text  with  two  spaces  and    four    spaces  between  words.
"""

TEXTS = [
    "Hello world",
    "The Eiffel Tower is in the city of",
    " leading space",
    "  two leading spaces",
    "double  space and   triple   spaces",
    "trailing space ",
    " ",
    "line one\nline two\n\nend\n",
    "\ttab\tseparated",
    "    def f():\n        return 1",
    "Café naïve façade",
    "東京タワー",
    "I ❤️ 🦀 Rust!",
    "12345 67890 3.14",
    "don't won't I'll",
    "\u2581already a metaspace",
    "",
]

SPECIAL_TEXTS = {
    "llama": ["<s>Hi</s> and <unk> in text", "a<|tool|>b"],
    "phi3": ["<|user|>\nHi<|end|>\n<|assistant|>", " <|endoftext|>x<s>"],
    "gemma2": ["<start_of_turn>user\nHi<end_of_turn>\n", "<bos>x<eos> <pad><mask>"],
}


def train(**options) -> spm.SentencePieceProcessor:
    """A SentencePiece BPE model with byte fallback, trained on CORPUS."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_writer=model, model_type="bpe", vocab_size=420,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, num_threads=1, minloglevel=2, **options)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def pieces(sp: spm.SentencePieceProcessor) -> list[tuple[str, float, int]]:
    """`(piece, score, llama.cpp token type)` by id, as llama.cpp's converter reads a SentencePiece model."""
    out = []
    for i in range(sp.get_piece_size()):
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        out.append((sp.id_to_piece(i), sp.get_score(i), int(kind)))
    return out


def write(path: Path, arch: str, vocab: list[tuple[str, float, int]] | None, model: str = "llama",
          scores: bool = True, **keys) -> None:
    """A GGUF file of `arch` holding the tokenizer `vocab` and the metadata `keys` (`tokenizer.ggml.<key>`)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(model)
    w.add_token_list([t for t, _, _ in vocab])
    if scores:
        w.add_token_scores([s for _, s, _ in vocab])
    w.add_token_types([k for _, _, k in vocab])
    for key, value in keys.items():
        if isinstance(value, bool):
            w.add_bool(f"tokenizer.ggml.{key}", value)
        else:
            w.add_uint32(f"tokenizer.ggml.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"  wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes, {len(vocab)} tokens)")


def llama_vocab() -> list[tuple[str, float, int]]:
    """Llama 2's layout: `<unk>` `<s>` `</s>`, the 256 byte tokens, then the merged pieces and the characters."""
    sp = train(add_dummy_prefix=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    return pieces(sp)


def gemma_vocab() -> list[tuple[str, float, int]]:
    """Gemma's layout: `<pad>` `<eos>` `<bos>` `<unk>` first, no dummy prefix, whitespace-only pieces written
    with real spaces, and scores that do not follow the merge order."""
    sp = train(add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_by_whitespace=False, pad_id=0,
               eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
               control_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"])
    # `<mask>` left unmarked (normal), so that what keeps it whole is GemmaTokenizer's own `mask_token`.
    vocab = [(t, s, int(gguf.TokenType.NORMAL) if t == "<mask>" else k) for t, s, k in pieces(sp)]
    respelled = [(" " * len(t) if len(t) > 1 and set(t) == {"\u2581"} else t, s, k) for t, s, k in vocab]
    assert sum(t.startswith("  ") for t, _, _ in respelled) >= 2, "the corpus should give whitespace pieces"
    shuffled = [s for _, s, _ in respelled]
    random.Random(7).shuffle(shuffled)
    return [(t, s, k) for (t, _, k), s in zip(respelled, shuffled)]


def references(directory: Path, name: str, arch: str) -> dict:
    """transformers' encodings of TEXTS (and the file's special texts) by the tokenizer it builds from `name`."""
    tok = AutoTokenizer.from_pretrained(str(directory), gguf_file=name)
    cases = []
    for text in TEXTS + SPECIAL_TEXTS[arch]:
        case = {"text": text}
        for add_special in (True, False):
            ids = tok(text, add_special_tokens=add_special)["input_ids"]
            key = "with_special" if add_special else "without_special"
            case[f"ids_{key}"] = ids
        # The pieces, so that a mismatch reads as text.
        case["tokens_with_special"] = tok.convert_ids_to_tokens(case["ids_with_special"])
        ids = case["ids_with_special"]
        case["decoded"] = tok.decode(ids, skip_special_tokens=False)
        case["decoded_skip_special"] = tok.decode(ids, skip_special_tokens=True)
        cases.append(case)
    return {"class": type(tok).__name__, "vocab_size": len(tok), "cases": cases}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    llama = llama_vocab()
    llama_tokens = llama + [("<|tool|>", -1000.0, int(gguf.TokenType.USER_DEFINED))]
    write(OUT / "llama.gguf", "llama", llama_tokens, bos_token_id=1, eos_token_id=2, unknown_token_id=0)

    added = [("<|endoftext|>", gguf.TokenType.CONTROL), ("<|user|>", gguf.TokenType.USER_DEFINED),
             ("<|end|>", gguf.TokenType.CONTROL), ("<|assistant|>", gguf.TokenType.USER_DEFINED)]
    phi3 = llama + [(t, -1000.0, int(k)) for t, k in added]
    endoftext = len(llama)
    write(OUT / "phi3.gguf", "phi3", phi3, bos_token_id=1, eos_token_id=endoftext, unknown_token_id=0,
          padding_token_id=endoftext, add_bos_token=False, add_eos_token=False)

    write(OUT / "gemma2.gguf", "gemma2", gemma_vocab(), bos_token_id=2, eos_token_id=1, unknown_token_id=3,
          padding_token_id=0, add_bos_token=True, add_eos_token=False)

    small = llama[:300]
    write(OUT / "unsupported-model.gguf", "llama", small, model="rwkv")
    write(OUT / "missing-scores.gguf", "llama", small, scores=False, bos_token_id=1, eos_token_id=2)

    refs = {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "sentencepiece": spm.__version__, "files": {}}
    for name, arch in [("llama.gguf", "llama"), ("phi3.gguf", "phi3"), ("gemma2.gguf", "gemma2")]:
        with tempfile.TemporaryDirectory() as tmp:
            # transformers reads the file from a directory; copy it so that nothing else there is picked up.
            (Path(tmp) / name).write_bytes((OUT / name).read_bytes())
            refs["files"][name] = references(Path(tmp), name, arch)
    # One case a line: small, and a changed case reads as one line of diff.
    lines = {}
    for f in refs["files"].values():
        for i, case in enumerate(f["cases"]):
            lines[f"@case{len(lines)}@"] = json.dumps(case, ensure_ascii=False)
            f["cases"][i] = f"@case{len(lines) - 1}@"
    text = json.dumps(refs, indent=1, ensure_ascii=False)
    for placeholder, line in lines.items():
        text = text.replace(f'"{placeholder}"', line)
    (OUT / "references.json").write_text(text + "\n")
    print(f"  wrote {(OUT / 'references.json').relative_to(ROOT)}")


if __name__ == "__main__":
    main()
