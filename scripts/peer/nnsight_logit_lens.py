#!/usr/bin/env python3
"""Python nnsight side of the logit-lens check (tests/plot_lens.rs): on the embedded SmolLM2 GGUF (dequantized to
float32 by transformers), CPU, the logit lens as nnsight's tutorial writes it: every layer's output through the final
norm and the unembedding, softmax over the vocabulary, and at every position the top token and its probability.

Writes tests/data/logit-lens/smollm2.json:
    {"prompt": .., "tokens": [ids], "top": [[id per position] per layer], "prob": [[p per position] per layer],
     "versions": {..}}

    ~/.cache/nnsight-rs/venv-torch-2.13.0/bin/python scripts/peer/nnsight_logit_lens.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parent.parent.parent
PROMPT = "The Eiffel Tower is in the city of"
OUT = ROOT / "tests" / "data" / "logit-lens" / "smollm2.json"


def main() -> int:
    import torch
    import transformers
    import nnsight
    from nnsight import LanguageModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(2)
    models = ROOT / "models"
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    hf = AutoModelForCausalLM.from_pretrained(models, gguf_file=gguf, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(models, gguf_file=gguf)
    model = LanguageModel(hf, tokenizer=tok)

    lens = []  # made outside the trace: nnsight hands back only what was saved or made before it
    with torch.no_grad():
        with model.trace(PROMPT):
            for layer in model.model.layers:
                out = layer.output
                hidden = out[0] if isinstance(out, tuple) else out
                probs = model.lm_head(model.model.norm(hidden)).softmax(-1)
                lens.append(probs.save())
    top = [[int(i) for i in p[0].argmax(-1)] for p in lens]
    prob = [[float(v) for v in p[0].max(-1).values] for p in lens]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "prompt": PROMPT,
        "tokens": tok(PROMPT).input_ids,
        "top": top,
        "prob": prob,
        "versions": {"nnsight": nnsight.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }) + "\n")
    print(f"wrote {OUT}: {len(top)} layers x {len(top[0])} positions; last layer, last position: "
          f"{tok.decode([top[-1][-1]])!r} {prob[-1][-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
