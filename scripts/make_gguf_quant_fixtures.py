"""Writes the GGUF dequantization fixtures of tests/data/gguf-quants/ (checked by tests/gguf_quants.rs).

Run with the project's venv (torch is not needed, only numpy and llama.cpp's `gguf` package, pinned):

    ~/.cache/nnsight-rs/venv-torch-2.13.0/bin/python -m pip install gguf==0.19.0
    ~/.cache/nnsight-rs/venv-torch-2.13.0/bin/python scripts/make_gguf_quant_fixtures.py

It writes two files, the same bytes on every run (fixed seed; gguf 0.19.0, numpy 2.4.6):

- `quants.gguf`, written by the package's `GGUFWriter`: a little metadata of several value types, and one tensor
  per tested GGML type, named by the type in lower case (`q4_k`): the raw stored bytes. Legacy types (32-value
  blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) have shape [4, 64]: rows 0-1 are random floats quantized with
  `gguf.quants.quantize`, rows 2-3 random block bytes. The K-quants (Q2_K ... Q6_K; the package cannot quantize
  them) have shape [3, 256], random block bytes. In random bytes every f16 scale is forced finite (any finite
  f16: zeros, subnormals, up to 65504). F16 and BF16 are quantized random floats, shape [2, 8]. A `tq1_0` tensor
  (a type the loader refuses) is there for the error message.
- `dequantized.safetensors`: for each of those tensors but `tq1_0`, the package's own `gguf.quants.dequantize`
  of the stored bytes (float32, same name, same shape).

Both files double as the small valid inputs that tests/gguf_quants.rs corrupts to check that loading never
panics.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "gguf-quants"
SEED = 1414

# Offsets of the f16 scales in one block of each type (ggml's block_* structs).
F16_SCALES = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}
LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
K_QUANTS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


def random_blocks(rng: np.random.Generator, qtype: T, n_blocks: int) -> np.ndarray:
    """Random bytes for `n_blocks` blocks of `qtype`, every f16 scale a random finite f16."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for at in F16_SCALES[qtype]:
        bits = rng.integers(0, 1 << 16, size=n_blocks, dtype=np.uint16)
        # Exponent all ones is inf or NaN: clear its top bit.
        bits = np.where((bits & 0x7C00) == 0x7C00, bits & ~np.uint16(0x4000), bits).astype("<u2")
        blocks[:, at : at + 2] = bits.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def random_floats(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Rows of different scales: unit normal, small, large uniform, and a row that starts with a block of zeros."""
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x[1 % rows] *= 0.01
    if rows > 2:
        x[2] = rng.uniform(-1000.0, 1000.0, cols).astype(np.float32)
    if rows > 3:
        x[3, :32] = 0.0
    return x


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file (F32 tensors, in name order), written by hand: 8-byte header size, JSON, data."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", "source": f"gguf {gguf_version()}"}}
    data = bytearray()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [len(data), len(data) + a.nbytes]}
        data += a.tobytes()
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data))


def gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def main() -> None:
    if gguf_version() != "0.19.0":
        raise SystemExit(f"gguf {gguf_version()} is installed; these fixtures are made with gguf==0.19.0")
    rng = np.random.default_rng(SEED)
    stored: dict[str, tuple[T, np.ndarray]] = {}  # name -> (type, raw bytes as [rows, bytes per row])

    for qtype in LEGACY:
        block, type_size = GGML_QUANT_SIZES[qtype]
        quantized = gguf.quants.quantize(random_floats(rng, 2, 64), qtype)
        raw = random_blocks(rng, qtype, 4).reshape(2, 64 // block * type_size)
        stored[qtype.name.lower()] = (qtype, np.concatenate([quantized, raw], axis=0))
    for qtype in K_QUANTS:
        stored[qtype.name.lower()] = (qtype, random_blocks(rng, qtype, 3))
    for qtype in (T.F16, T.BF16):
        q = gguf.quants.quantize(random_floats(rng, 2, 8), qtype)
        stored[qtype.name.lower()] = (qtype, q.view(np.uint8).reshape(2, -1))
    refused = gguf.quants.quantize(random_floats(rng, 1, 256), T.TQ1_0)

    OUT.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(OUT / "quants.gguf", arch="llama")
    w.add_name("gguf-quant-fixtures")
    w.add_uint32("fixture.seed", SEED)
    w.add_float32("fixture.scale", 0.5)
    w.add_bool("fixture.flag", True)
    w.add_array("fixture.names", sorted(stored))
    w.add_array("fixture.counts", [1, 2, 3])
    for name, (qtype, raw) in stored.items():
        w.add_tensor(name, raw, raw_dtype=qtype)
    w.add_tensor("tq1_0", refused, raw_dtype=T.TQ1_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    reference = {}
    for name, (qtype, raw) in stored.items():
        values = gguf.quants.dequantize(raw, qtype)
        assert values.dtype == np.float32 and np.isfinite(values).all(), name
        reference[name] = values
    write_safetensors(OUT / "dequantized.safetensors", reference)

    for p in sorted(OUT.iterdir()):
        print(f"{p.relative_to(OUT.parent.parent.parent)}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
