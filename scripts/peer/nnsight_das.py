#!/usr/bin/env python3
"""Python nnsight 0.8.1 side of the boundless-DAS parity check (tests/das.rs): on the embedded SmolLM2 GGUF
(dequantized to float32 by transformers), CPU, the interchange intervention of nnsight::das written as a Python
nnsight user writes it, for a fixed rotation and a fixed soft boundary:

    h' = ((1 - m) * (h_base @ R) + m * (h_source @ R)) @ R.T

at the output of decoder layer LAYER, at the country's token of "Q: What is the capital city of <country>?\\nA: The
capital city is", for a few (base, source) pairs. The source's hidden state comes from its own trace; the base
trace writes h' into the layer's output and saves it back, and the last position's logits.

The rotation is a product of 8 Householder reflections, R = prod_k (I - 2 v_k v_k^T) with unit v_k drawn from
torch.manual_seed(0), built in float64 (the test builds the same product); the mask is
m_i = sigmoid((SIZE - i - 0.5) / TEMPERATURE) for i = 0..575. Writes tests/data/das/reference.safetensors: the
vectors, the mask, the token ids, the intervened hidden states [pairs, 576] and, per pair, the 1024 largest
logits with their token ids (the whole [49152] rows would be 0.8 MB); and reference.json (what and versions).

    ~/.cache/nnsight-rs/venv-torch-2.13.0/bin/python scripts/peer/nnsight_das.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parent.parent.parent
OUT = ROOT / "tests" / "data" / "das"
TEMPLATE = "Q: What is the capital city of {}?\nA: The capital city is"
PAIRS = [("France", "Japan"), ("Germany", "Italy"), ("Spain", "Egypt")]
LAYER = 8
SIZE = 100.0
TEMPERATURE = 2.0
REFLECTIONS = 8
TOP = 1024


def main() -> int:
    import nnsight
    import torch
    import transformers
    from nnsight import LanguageModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(2)
    models = ROOT / "models"
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    hf = AutoModelForCausalLM.from_pretrained(models, gguf_file=gguf, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(models, gguf_file=gguf)
    model = LanguageModel(hf, tokenizer=tok)
    d = hf.config.hidden_size

    torch.manual_seed(0)
    vs = torch.randn(REFLECTIONS, d, dtype=torch.float64)
    vs = vs / vs.norm(dim=1, keepdim=True)
    r = torch.eye(d, dtype=torch.float64)
    for v in vs:
        r = r @ (torch.eye(d, dtype=torch.float64) - 2.0 * torch.outer(v, v))
    r = r.float()
    mask = torch.sigmoid((SIZE - torch.arange(d, dtype=torch.float32) - 0.5) / TEMPERATURE)

    def ids(country: str) -> list[int]:
        return tok(TEMPLATE.format(country)).input_ids

    first, second = ids(PAIRS[0][0]), ids(PAIRS[0][1])
    position = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)

    def output(h):  # a tensor in transformers 5.x ([1, seq, hidden]), a tuple (hidden, ...) in 4.x
        return h[0] if isinstance(h, (tuple, list)) else h

    base_ids, source_ids, hidden, top_ids, top_logits = [], [], [], [], []
    for base, source in PAIRS:
        b, s = ids(base), ids(source)
        assert len(b) == len(s) == len(first), "one-token country names keep the prompts aligned"
        with torch.no_grad(), model.trace(s):
            hs = output(model.model.layers[LAYER].output)[0, position].save()
        with torch.no_grad(), model.trace(b):
            out = output(model.model.layers[LAYER].output)
            hb = out[0, position]
            mixed = ((1 - mask) * (hb @ r) + mask * (hs @ r)) @ r.T
            out[0, position] = mixed
            h = output(model.model.layers[LAYER].output)[0, position].save()
            logits = model.lm_head.output[0, -1].save()
        values, indices = logits.float().topk(TOP)
        base_ids.append(b)
        source_ids.append(s)
        hidden.append(h.float())
        top_ids.append(indices)
        top_logits.append(values)
        print(f"{base} <- {source}: top {tok.decode([int(indices[0])])!r} ({values[0].item():.3f}), |h'| {h.norm().item():.2f}")

    tensors = {
        "householder": vs.float().contiguous(),
        "mask": mask.contiguous(),
        "base_ids": torch.tensor(base_ids, dtype=torch.int64),
        "source_ids": torch.tensor(source_ids, dtype=torch.int64),
        "hidden": torch.stack(hidden).contiguous(),
        "top_ids": torch.stack(top_ids).to(torch.int64).contiguous(),
        "top_logits": torch.stack(top_logits).contiguous(),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(tensors, OUT / "reference.safetensors")
    meta = {
        "what": "Boundless-DAS interchange interventions on SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32) "
        "under Python nnsight, by scripts/peer/nnsight_das.py",
        "template": TEMPLATE,
        "pairs": PAIRS,
        "layer": LAYER,
        "position": position,
        "size": SIZE,
        "temperature": TEMPERATURE,
        "reflections": REFLECTIONS,
        "top": TOP,
        "versions": {"nnsight": nnsight.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
    }
    (OUT / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
