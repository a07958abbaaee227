//! Loading corrupt and truncated checkpoints (a bounded proptest run): the small valid GGUF and safetensors files
//! of `tests/data/gguf-quants/`, truncated, with bytes flipped, and with counts, lengths, dims, types and offsets
//! overwritten by huge or wrong values. Every case gives `Ok` (a harmless change) or an `Err` that names the
//! file; none panics, and none allocates more than the file could hold.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::OnceLock;

use nnsight::load::gguf::{GgufFile, MetaValue};
use proptest::prelude::*;
use proptest::sample::Index;
use tch::Kind;

use crate::common;
use crate::gguf_quants::fixture;

/// One change to a file's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    /// Cut the file at this length.
    Truncate(Index),
    /// XOR one byte with a non-zero mask.
    Flip(Index, u8),
    /// Overwrite one of the file's known fields (a count, length, dim, type or offset) with a value.
    Field(Index, u64),
    /// Overwrite 8 bytes anywhere in the first `HEAD` bytes (the header, metadata and tensor table).
    Overwrite(Index, u64),
}

/// The part of the GGUF fixture before its tensor data (its first tensor starts at byte 1024).
const HEAD: usize = 1024;

fn value() -> impl Strategy<Value = u64> {
    prop_oneof![
        prop::sample::select(vec![
            0,
            1,
            3,
            31,
            33,
            255,
            256,
            4096,
            1 << 31,
            u32::MAX as u64,
            1 << 32,
            1 << 40,
            1 << 62,
            i64::MAX as u64,
            u64::MAX - 1,
            u64::MAX,
        ]),
        0..10_000u64,
        any::<u64>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => any::<Index>().prop_map(Mutation::Truncate),
        2 => (any::<Index>(), 1..=255u8).prop_map(|(i, m)| Mutation::Flip(i, m)),
        4 => (any::<Index>(), value()).prop_map(|(i, v)| Mutation::Field(i, v)),
        2 => (any::<Index>(), value()).prop_map(|(i, v)| Mutation::Overwrite(i, v)),
    ]
}

/// Writes the low `width` bytes of `v` (little-endian) at `at`, as far as the file goes.
fn put(bytes: &mut [u8], at: usize, width: usize, v: u64) {
    for (k, b) in v.to_le_bytes()[..width].iter().enumerate() {
        if let Some(x) = bytes.get_mut(at + k) {
            *x = *b;
        }
    }
}

fn apply(bytes: &mut Vec<u8>, fields: &[(usize, usize)], mutations: &[Mutation]) {
    for m in mutations {
        match *m {
            Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len() + 1)),
            Mutation::Flip(i, mask) if !bytes.is_empty() => {
                let at = i.index(bytes.len());
                bytes[at] ^= mask;
            }
            Mutation::Field(i, v) => {
                let (at, width) = fields[i.index(fields.len())];
                put(bytes, at, width, v);
            }
            Mutation::Overwrite(i, v) => {
                let at = i.index(HEAD.min(bytes.len()).max(1));
                put(bytes, at, 8, v);
            }
            Mutation::Flip(..) => {}
        }
    }
}

/// Runs `load`; a panic becomes a test failure that prints the case.
fn no_panic<T>(case: &dyn std::fmt::Debug, load: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    catch_unwind(AssertUnwindSafe(load)).map_err(|p| {
        let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
        TestCaseError::fail(format!("loading panicked ({msg:?}) on the case {case:?}"))
    })
}

/// Where the string `s` (u64 length, then bytes) is in `bytes`: its first or last occurrence.
fn string_at(bytes: &[u8], s: &str, last: bool) -> usize {
    let mut pattern = (s.len() as u64).to_le_bytes().to_vec();
    pattern.extend(s.as_bytes());
    let mut hits = bytes.windows(pattern.len()).enumerate().filter(|(_, w)| *w == pattern.as_slice());
    let hit = if last { hits.next_back() } else { hits.next() };
    hit.unwrap_or_else(|| panic!("`{s}` not found in the fixture")).0
}

/// Where the dimension count of tensor `name` is in the GGUF fixture (the dims, type and offset follow it).
/// Tensor names also appear in `fixture.names`: the tensor table comes after the metadata.
fn tensor_info_at(bytes: &[u8], name: &str) -> usize {
    string_at(bytes, name, true) + 8 + name.len()
}

/// A file's bytes, and the (position, width) of fields worth overwriting.
type Fixture = (Vec<u8>, Vec<(usize, usize)>);

/// The GGUF fixture, and the (position, width) of every field of its header, metadata and tensor table that
/// holds a count, a length, a type, a dim or an offset.
fn gguf_fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let bytes = std::fs::read(fixture("quants.gguf")).unwrap();
        let f = GgufFile::open(fixture("quants.gguf")).unwrap();
        // version, tensor count, metadata count
        let mut fields = vec![(4, 4), (8, 8), (16, 8)];
        for key in f.metadata.keys() {
            let at = string_at(&bytes, key, false);
            let value_type = at + 8 + key.len();
            fields.extend([(at, 8), (value_type, 4)]);
            match f.metadata[key] {
                // A string's length; an array's element type and count.
                MetaValue::String(_) => fields.push((value_type + 4, 8)),
                MetaValue::Array(_) => fields.extend([(value_type + 4, 4), (value_type + 8, 8)]),
                _ => {}
            }
        }
        for t in &f.tensors {
            let n_dims = tensor_info_at(&bytes, &t.name);
            fields.extend([(n_dims - 8 - t.name.len(), 8), (n_dims, 4)]);
            let dims = n_dims + 4;
            fields.extend((0..t.dims.len()).map(|d| (dims + 8 * d, 8)));
            let ty = dims + 8 * t.dims.len();
            fields.extend([(ty, 4), (ty + 4, 8)]);
        }
        (bytes, fields)
    })
}

/// Opens a (mutated) GGUF file and loads every tensor; checks what comes back. The error is the first one met
/// (the fixture's `tq1_0` is always refused).
fn load_gguf(path: &Path, file_len: usize) -> Result<usize, String> {
    let f = GgufFile::open(path).map_err(|e| e.to_string())?;
    let _ = (f.architecture(), f.get_u64("fixture.seed"), f.get_f64("fixture.scale"), f.get_str("general.name"));
    let (mut loaded, mut first_error) = (0, None);
    for info in &f.tensors {
        let _ = f.tensor_bytes(info);
        match f.load_tensor(info, Kind::Float) {
            Ok(t) => {
                // A tensor's values come from its bytes in the file: at most 256 values per 54 bytes (TQ1_0).
                let numel = t.numel();
                assert!(numel <= 8 * file_len, "`{}`: {numel} values out of a {file_len}-byte file", info.name);
                loaded += 1;
            }
            Err(e) => {
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    first_error.map_or(Ok(loaded), Err)
}

/// A clear message: it names the file, and is short enough to read.
fn clear(msg: &str, file: &str) -> bool {
    msg.contains(file) && msg.len() < 500
}

/// Reads a (mutated) `model.safetensors` folder; checks what comes back.
fn load_safetensors(dir: &Path, file_len: usize) -> Result<usize, String> {
    let tensors = nnsight::load::safetensors::read_dir(dir, "corrupt", false).map_err(|e| e.to_string())?;
    let numel: usize = tensors.values().map(|t| t.numel()).sum();
    assert!(numel * 4 <= file_len, "{numel} values out of a {file_len}-byte file");
    Ok(tensors.len())
}

fn safetensors_fixture() -> &'static (Vec<u8>, usize) {
    static FIXTURE: OnceLock<(Vec<u8>, usize)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let bytes = std::fs::read(fixture("dequantized.safetensors")).unwrap();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        (bytes, header)
    })
}

/// A safetensors header edited as text: one run of digits (an offset, a dim) replaced by `digits`, the header's
/// length updated so that the file stays well-formed around the change.
fn edit_safetensors_number(bytes: &[u8], header: usize, which: Index, digits: &str) -> Vec<u8> {
    let text = &bytes[8..8 + header];
    let runs: Vec<(usize, usize)> = {
        let mut runs = vec![];
        let mut i = 0;
        while i < text.len() {
            if text[i].is_ascii_digit() {
                let start = i;
                while i < text.len() && text[i].is_ascii_digit() {
                    i += 1;
                }
                runs.push((start, i));
            } else {
                i += 1;
            }
        }
        runs
    };
    let (start, end) = runs[which.index(runs.len())];
    let mut new_text = text[..start].to_vec();
    new_text.extend(digits.as_bytes());
    new_text.extend(&text[end..]);
    let mut out = (new_text.len() as u64).to_le_bytes().to_vec();
    out.extend(new_text);
    out.extend(&bytes[8 + header..]);
    out
}

#[test]
fn the_unmutated_fixtures_load() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let (bytes, fields) = gguf_fixture();
    assert!(fields.len() > 80, "{} fields", fields.len());
    let path = dir.path().join("corrupt.gguf");
    std::fs::write(&path, bytes).unwrap();
    // Every tensor but the last (TQ1_0, refused by name) loads.
    let e = load_gguf(&path, bytes.len()).unwrap_err();
    assert!(e.contains("TQ1_0"), "{e}");
    let (bytes, _) = safetensors_fixture();
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    assert_eq!(load_safetensors(dir.path(), bytes.len()), Ok(12));
}

/// Sizes and offsets that point past the end of the file are refused by name, before anything is allocated.
#[test]
fn declared_sizes_beyond_the_file_are_errors() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupt.gguf");
    let (valid, _) = gguf_fixture();
    let q4_k = tensor_info_at(valid, "q4_k"); // n_dims, dims [256, 3], type, offset
    let bf16 = tensor_info_at(valid, "bf16"); // dims [8, 2]
    let names = string_at(valid, "fixture.names", false) + 8 + 13 + 4 + 4; // the array's count
    let cases: [(&str, usize, u64, &str); 7] = [
        ("tensor count", 8, u64::MAX, "tensor infos"),
        ("metadata count", 16, 1 << 40, "truncated GGUF file"),
        ("array count", names, 1 << 60, "elements of value of metadata `fixture.names`"),
        ("rows", q4_k + 4 + 8, 1 << 40, "tensor `q4_k` (158329674399744 bytes) lies at bytes"),
        ("offset", q4_k + 4 + 16 + 4, 1 << 20, "tensor `q4_k` (432 bytes) lies at bytes 1049600..1050032"),
        ("zero and huge dims", bf16 + 4, 0, "` [0, 18446744073709551615]: dimension 18446744073709551615"),
        ("block multiple", q4_k + 4, 255, "the innermost dimension 255 is not a multiple of the Q4_K block size 256"),
    ];
    for (what, at, v, expected) in cases {
        let mut bytes = valid.clone();
        bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
        if what == "zero and huge dims" {
            bytes[at + 8..at + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        }
        std::fs::write(&path, &bytes).unwrap();
        let e = load_gguf(&path, bytes.len()).unwrap_err();
        assert!(e.contains(expected) && clear(&e, "corrupt.gguf"), "{what}: {e}");
    }

    let (valid, header) = safetensors_fixture();
    let text = std::str::from_utf8(&valid[8..8 + header]).unwrap();
    let rewritten = |from: &str, to: &str| {
        let text = text.replacen(from, to, 1);
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend(text.as_bytes());
        out.extend(&valid[8 + header..]);
        out
    };
    let end = valid.len() - 8 - header;
    let cases = [
        (
            "header length",
            {
                let mut b = valid.clone();
                b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                b
            },
            "header too large",
        ),
        (
            "data beyond the file",
            rewritten(&format!(",{end}]"), &format!(",{}]", end + 4096)),
            "not a safetensors file",
        ),
        (
            "zero and huge dims",
            rewritten(
                "\"bf16\":",
                "\"a\":{\"dtype\":\"F32\",\"shape\":[0,18446744073709551615],\"data_offsets\":[0,0]},\"bf16\":",
            ),
            "beyond i64",
        ),
    ];
    for (what, bytes, expected) in cases {
        std::fs::write(dir.path().join("model.safetensors"), &bytes).unwrap();
        let e = load_safetensors(dir.path(), bytes.len()).unwrap_err();
        assert!(e.contains(expected) && clear(&e, "model.safetensors"), "{what}: {e}");
    }
}

proptest! {
    // About 2 s for both in the test profile.
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_corrupt_gguf_file_is_an_error_never_a_panic(mutations in prop::collection::vec(mutation(), 1..4)) {
        common::init();
        let (valid, fields) = gguf_fixture();
        let mut bytes = valid.clone();
        apply(&mut bytes, fields, &mutations);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corrupt.gguf");
        std::fs::write(&path, &bytes).unwrap();
        match no_panic(&mutations, || load_gguf(&path, bytes.len()))? {
            Ok(_) => {}
            Err(msg) => prop_assert!(clear(&msg, "corrupt.gguf"), "an unclear error on {mutations:?}: {msg}"),
        }
    }

    #[test]
    fn a_corrupt_safetensors_file_is_an_error_never_a_panic(
        mutations in prop::collection::vec(mutation(), 0..3),
        number in prop::option::of((any::<Index>(), value())),
    ) {
        common::init();
        let (valid, header) = safetensors_fixture();
        let mut bytes = match number {
            Some((which, v)) => edit_safetensors_number(valid, *header, which, &v.to_string()),
            None => valid.clone(),
        };
        // The header-length field (bytes 0..8) is the only binary field.
        apply(&mut bytes, &[(0, 8)], &mutations);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), &bytes).unwrap();
        let case = (&mutations, &number);
        match no_panic(&case, || load_safetensors(dir.path(), bytes.len()))? {
            Ok(_) => {}
            Err(msg) => prop_assert!(clear(&msg, "model.safetensors"), "an unclear error on {case:?}: {msg}"),
        }
    }
}
