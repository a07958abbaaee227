#!/usr/bin/env python3
"""Python nnsight side of the sweep benchmark (examples/bench_sweep.rs): on the embedded SmolLM2 GGUF (dequantized to
float32 by transformers), CPU, the two sweeps as a Python nnsight user writes them:

    grid   activation patching of the residual stream before each layer at each position, Eiffel (clean) into
           Colosseum (corrupted): one trace per cell, two invokes (the clean one hands its activation to the
           corrupted one through a barrier, as nnsight's docs show), metric logit(" Paris") - logit(" Rome") at the last position; 30 x 9 = 270 traces
    heads  zero-ablation of each attention head (its slice of o_proj's input) on the Colosseum prompt, one trace
           per head; 30 x 9 = 270 traces

Prints one JSON line: {"grid_s": .., "heads_s": .., "grid": [[..]], "heads": [[..]], "versions": {..}}.

    ~/.cache/nnsight-rs/venv-torch-2.13.0/bin/python scripts/peer/nnsight_sweep.py --threads 2 [--layers N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parent.parent.parent
CLEAN = "The Eiffel Tower is in the city of"
CORRUPTED = "The Colosseum is in the city of"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=0, help="only the first N layers (0: all)")
    args = ap.parse_args()

    import torch
    import transformers
    import nnsight
    from nnsight import LanguageModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    models = ROOT / "models"
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    hf = AutoModelForCausalLM.from_pretrained(models, gguf_file=gguf, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(models, gguf_file=gguf)
    model = LanguageModel(hf, tokenizer=tok)
    paris, rome = tok(" Paris").input_ids[0], tok(" Rome").input_ids[0]
    layers = model.model.layers
    n_layers = args.layers or len(layers)
    seq = len(tok(CLEAN).input_ids)
    assert seq == len(tok(CORRUPTED).input_ids)
    heads = hf.config.num_attention_heads
    head_dim = hf.config.hidden_size // heads

    def metric(logits) -> float:
        return float(logits[paris] - logits[rome])

    with torch.no_grad():
        start = time.perf_counter()
        grid = []
        for l in range(n_layers):
            row = []
            for p in range(seq):
                with model.trace() as tracer:
                    barrier = tracer.barrier(2)
                    with tracer.invoke(CLEAN):
                        clean = model.model.layers[l].input[:, p]
                        barrier()
                    with tracer.invoke(CORRUPTED):
                        barrier()
                        model.model.layers[l].input[:, p] = clean
                        logits = model.lm_head.output[0, -1].save()
                row.append(metric(logits))
            grid.append(row)
        grid_s = time.perf_counter() - start

        start = time.perf_counter()
        ablated = []
        for l in range(n_layers):
            row = []
            for h in range(heads):
                with model.trace(CORRUPTED):
                    model.model.layers[l].self_attn.o_proj.input[:, :, h * head_dim:(h + 1) * head_dim] = 0
                    logits = model.lm_head.output[0, -1].save()
                row.append(metric(logits))
            ablated.append(row)
        heads_s = time.perf_counter() - start

    print(json.dumps({
        "grid_s": grid_s, "heads_s": heads_s, "grid": grid, "heads": ablated,
        "versions": {"nnsight": nnsight.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
