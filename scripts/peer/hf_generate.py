#!/usr/bin/env python3
"""Hugging Face side of the generation benchmark: time `model.generate` (greedy, KV cache) of one prompt.

Run with the project's torch venv (scripts/setup.sh creates it), everything local:

    hf_generate.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --prompt "The Eiffel Tower is in the city of" --max-new-tokens 10 --threads 2 --warmup 2 --rounds 10

The GGUF is dequantized to float32 by transformers. Each round times one `generate` call (batch 1, greedy,
`max_new_tokens` new tokens, EOS ignored so every round makes the same number) with time.perf_counter.
With --serve it reads a number N per stdin line, times N calls and prints one JSON line
{"times_ms": [...], "new_ids": [...]} per request (lets a caller interleave its own rounds); otherwise it prints a
short summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="path to a local .gguf file")
    ap.add_argument("--prompt", default="The Eiffel Tower is in the city of")
    ap.add_argument("--max-new-tokens", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    ap.add_argument("--rounds", type=int, default=10, help="timed calls")
    ap.add_argument("--serve", action="store_true", help="time N calls per stdin line (see above)")
    args = ap.parse_args()

    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hf_load import load_gguf

    tokenizer, model, load_s = load_gguf(args.gguf, args.threads)
    enc = tokenizer(args.prompt, return_tensors="pt")
    n = args.max_new_tokens
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Greedy, no EOS stop (min_new_tokens would add a logits processor): every call makes exactly n tokens. An
    # unset field of the config given to generate falls back to the model's, so the model's EOS is cleared too.
    model.generation_config.eos_token_id = None
    config = transformers.GenerationConfig(
        max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=pad, use_cache=True
    )

    with torch.inference_mode():
        def generate():
            out = model.generate(**enc, generation_config=config)
            return out[0, enc.input_ids.shape[1]:].tolist()

        for _ in range(args.warmup):
            new_ids = generate()
        if args.serve:
            print(json.dumps({"ready": True, "torch": torch.__version__, "transformers": transformers.__version__,
                              "prompt_tokens": int(enc.input_ids.shape[1])}), flush=True)
            for line in sys.stdin:
                k = int(line.strip() or 0)
                if k <= 0:
                    break
                block = []
                time.sleep(0.3)  # let the caller's OpenMP threads stop spinning (the caller does the same)
                for _ in range(k):
                    t = time.perf_counter()
                    new_ids = generate()
                    block.append((time.perf_counter() - t) * 1000.0)
                print(json.dumps({"times_ms": block, "new_ids": new_ids}), flush=True)
            return 0
        times = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            new_ids = generate()
            times.append((time.perf_counter() - t) * 1000.0)
    med = statistics.median(times)
    print(f"loaded {Path(args.gguf).name} in {load_s:.1f} s; transformers {transformers.__version__}, "
          f"torch {torch.__version__}, {args.threads} threads")
    print(f"generate {n} tokens: median {med:.1f} ms ({n / med * 1000:.1f} tokens/s); new ids {new_ids}")
    print(repr(tokenizer.decode(new_ids)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
