//! The GGUF reader and the GGUF tokenizer on the real default model (SmolLM2-135M-Instruct, Q4_1).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nnsight::load::gguf::{ggml_type_name, GgufFile};
use nnsight::load::tokenizer::{special_tokens_from_gguf, tokenizer_from_file, tokenizer_from_gguf, SpecialTokens};
use tch::Kind;

fn model_path() -> PathBuf {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if !path.is_file() {
        panic!("{} is missing: run `make test` (or scripts/setup.sh) to fetch the model", path.display());
    }
    path
}

fn open() -> GgufFile {
    GgufFile::open(model_path()).expect("open the default GGUF model")
}

fn hf_tokenizer_path() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/smollm2/hf_tokenizer.json"))
}

#[test]
fn gguf_header_metadata_and_tensor_table() {
    let f = open();
    assert_eq!(f.version, 3);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get_u64("llama.block_count").unwrap(), 30);
    assert_eq!(f.get_u64("llama.embedding_length").unwrap(), 576);
    assert_eq!(f.get_u64("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(f.get_f64("llama.rope.freq_base").unwrap(), 100000.0);
    assert_eq!(f.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(f.tensors.len(), 272);
    let mut by_type = BTreeMap::new();
    for t in &f.tensors {
        *by_type.entry(ggml_type_name(t.ggml_type)).or_insert(0) += 1;
    }
    assert_eq!(by_type, BTreeMap::from([("Q4_1", 210), ("F32", 61), ("Q8_0", 1)]));
    let embd = f.tensors.iter().find(|t| t.name == "token_embd.weight").unwrap();
    assert_eq!(embd.dims, [576, 49152]);
    assert_eq!(embd.shape(), [49152, 576]);
    assert_eq!(f.tensor_bytes(embd), 49152 * 576 / 32 * 34);
    let e = f.get_u64("llama.no_such_key").unwrap_err();
    assert!(e.to_string().contains("llama.no_such_key"), "{e}");
}

#[test]
fn gguf_special_tokens() {
    let f = open();
    assert_eq!(
        special_tokens_from_gguf(&f),
        SpecialTokens { bos: Some(1), eos: Some(2), pad: Some(2), add_bos: false }
    );
}

/// Tensor name, shape, `(index, value)` pairs and the sum of all values.
type Case = (&'static str, &'static [i64], &'static [(&'static [i64], f64)], f64);

/// Values computed with the Python `gguf` package (`gguf.quants.dequantize`) on the same file.
#[test]
fn gguf_dequantized_values_match_python_gguf() {
    let f = open();
    let cases: [Case; 4] = [
        (
            "blk.0.ffn_down.weight", // Q4_1
            &[576, 1536],
            &[
                (&[0, 0], -0.330810546875),
                (&[0, 1], 0.3460693359375),
                (&[0, 16], -0.6015625),
                (&[0, 31], -0.06005859375),
                (&[1, 0], 0.17236328125),
                (&[17, 100], 0.181365966796875),
                (&[300, 777], -0.079376220703125),
                (&[575, 1535], -0.181365966796875),
            ],
            150.63577270507812,
        ),
        (
            "blk.29.attn_q.weight", // Q4_1
            &[576, 576],
            &[(&[0, 0], 0.261962890625), (&[575, 575], 0.01812744140625), (&[100, 200], -0.22894287109375)],
            191.08612442016602,
        ),
        (
            "token_embd.weight", // Q8_0
            &[49152, 576],
            &[
                (&[0, 0], -0.10654449462890625),
                (&[504, 3], 0.08220291137695312),
                (&[49151, 575], -0.0417022705078125),
                (&[2240, 100], 0.09472846984863281),
            ],
            -15353.04449415207,
        ),
        ("output_norm.weight", &[576], &[(&[0], 1.7578125), (&[575], 1.984375)], 1038.33203125), // F32
    ];
    for (name, shape, values, sum) in cases {
        let info = f.tensors.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no tensor {name}"));
        let t = f.load_tensor(info, Kind::Float).unwrap();
        assert_eq!(t.size(), shape, "{name}");
        assert_eq!(t.kind(), Kind::Float);
        for &(idx, expected) in values {
            let got = t.double_value(idx);
            assert!((got - expected).abs() <= 1e-6, "{name}{idx:?}: {got} != {expected}");
        }
        let got_sum = t.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
        assert!((got_sum - sum).abs() <= 1e-6 * sum.abs().max(1.0), "{name} sum: {got_sum} != {sum}");
        let half = f.load_tensor(info, Kind::BFloat16).unwrap();
        assert_eq!((half.kind(), half.size()), (Kind::BFloat16, shape.to_vec()));
    }
}

#[test]
fn gguf_every_tensor_loads() {
    let f = open();
    for info in &f.tensors {
        let t = f.load_tensor(info, Kind::Float).unwrap();
        assert_eq!(t.size(), info.shape(), "{}", info.name);
        assert!(bool::try_from(t.isfinite().all()).unwrap(), "{} has non-finite values", info.name);
    }
}

const TEXTS: &[&str] = &[
    "The Eiffel Tower is in the city of",
    "12345 67890",
    "Café naïve façade",
    "東京タワーは東京にあります",
    "I ❤️ 🦀 Rust!",
    "a    b\n\n\tc",
    "<|im_start|>user\nHi<|im_end|>",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces and trailing ones   ",
    "don't won't I'll they've we're it's",
    "<|endoftext|>x<|endoftext|>",
    "",
];

#[test]
fn gguf_tokenizer_matches_transformers() {
    let f = open();
    let ours = tokenizer_from_gguf(&f).unwrap();
    let hf = tokenizers::Tokenizer::from_file(hf_tokenizer_path()).unwrap();

    let eiffel = ours.encode("The Eiffel Tower is in the city of", true).unwrap();
    assert_eq!(eiffel.get_ids(), [504, 414, 46682, 18669, 314, 281, 260, 2240, 282]);
    let chat = ours.encode("<|im_start|>user\nHi<|im_end|>", true).unwrap();
    assert_eq!(chat.get_ids().first(), Some(&1), "<|im_start|> is one token");
    assert_eq!(chat.get_ids().last(), Some(&2), "<|im_end|> is one token");

    for text in TEXTS {
        for add_special in [true, false] {
            let a = ours.encode(*text, add_special).unwrap();
            let b = hf.encode(*text, add_special).unwrap();
            assert_eq!(a.get_ids(), b.get_ids(), "ids of {text:?}");
            assert_eq!(a.get_offsets(), b.get_offsets(), "offsets of {text:?}");
        }
        let ids = ours.encode(*text, true).unwrap().get_ids().to_vec();
        assert_eq!(ours.decode(&ids, false).unwrap(), *text, "decode(encode({text:?}))");
        assert_eq!(ours.decode(&ids, true).unwrap(), hf.decode(&ids, true).unwrap(), "decode skipping specials");
    }

    let batch = ours.encode_batch(TEXTS.to_vec(), true).unwrap();
    assert_eq!(batch.len(), TEXTS.len());

    // Same vocabulary, same added tokens.
    assert_eq!(ours.get_vocab_size(true), hf.get_vocab_size(true));
    assert_eq!(ours.get_vocab(true), hf.get_vocab(true));
    let added = |t: &tokenizers::Tokenizer| {
        let mut v: Vec<(u32, String, bool)> =
            t.get_added_tokens_decoder().into_iter().map(|(id, tok)| (id, tok.content, tok.special)).collect();
        v.sort();
        v
    };
    assert_eq!(added(&ours), added(&hf));
}

#[test]
fn tokenizer_json_loads() {
    let t = tokenizer_from_file(hf_tokenizer_path()).unwrap();
    assert_eq!(t.encode("The Eiffel Tower is in the city of", true).unwrap().get_ids()[0], 504);
    let e = tokenizer_from_file(Path::new("/nonexistent/tokenizer.json")).unwrap_err();
    assert!(matches!(e, nnsight::Error::FileNotFound { .. }), "{e}");
}
