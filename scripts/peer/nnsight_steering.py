#!/usr/bin/env python3
"""Python nnsight 0.8.1 side of the steering-vector parity check (tests/steering.rs): on the embedded SmolLM2 GGUF
(dequantized to float32 by transformers), CPU, the contrastive recipe of nnsight::steering written as a Python
nnsight user writes it: each prompt in its own trace, every decoder layer's output saved, then per layer

    last_token[l] = mean_i pos_i[l][-1]      - mean_i neg_i[l][-1]
    all_tokens[l] = mean_i mean_t pos_i[l][t] - mean_i mean_t neg_i[l][t]

Writes tests/data/smollm2/steering_reference.safetensors (float32 [30, 576] each) and steering_reference.json
(the pairs and versions), which the test reads.

    ~/.cache/nnsight-rs/venv-torch-2.13.0/bin/python scripts/peer/nnsight_steering.py
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
OUT = ROOT / "tests" / "data" / "smollm2"
PAIRS = [
    ["I love this, it makes me so happy", "I hate this, it makes me so sad"],
    ["What a wonderful day", "What a terrible day"],
    ["She smiled with joy", "She cried with grief"],
    ["The news was great", "The news was awful"],
]


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
    n_layers = len(model.model.layers)

    def layer_outputs(prompt: str) -> list:
        with torch.no_grad(), model.trace(prompt):
            hs = nnsight.save([])
            for i in range(n_layers):
                hs.append(model.model.layers[i].output.save())
        # A tensor in transformers 5.x ([1, seq, hidden]), a tuple (hidden, ...) in 4.x.
        return [(h[0] if isinstance(h, (tuple, list)) else h)[0].float() for h in hs]

    pooled = {"last_token": ([], []), "all_tokens": ([], [])}
    for positive, negative in PAIRS:
        for side, prompt in enumerate((positive, negative)):
            hs = layer_outputs(prompt)
            pooled["last_token"][side].append(torch.stack([h[-1] for h in hs]))
            pooled["all_tokens"][side].append(torch.stack([h.mean(0) for h in hs]))
    tensors = {
        name: (torch.stack(pos).mean(0) - torch.stack(neg).mean(0)).contiguous()
        for name, (pos, neg) in pooled.items()
    }
    save_file(tensors, OUT / "steering_reference.safetensors")
    meta = {
        "what": "Per-layer mean differences (positive minus negative) at every decoder layer's output of "
        "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32), one trace per prompt, by "
        "scripts/peer/nnsight_steering.py",
        "pairs": PAIRS,
        "versions": {"nnsight": nnsight.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
    }
    (OUT / "steering_reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    for name, t in tensors.items():
        print(f"{name}: {tuple(t.shape)}, max |value| {t.abs().max().item():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
