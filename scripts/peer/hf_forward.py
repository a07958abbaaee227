#!/usr/bin/env python3
"""Hugging Face side of the forward-pass benchmark: time plain forwards of one prompt.

Run with the project's torch venv (scripts/setup.sh creates it), everything local:

    hf_forward.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --prompt "The Eiffel Tower is in the city of" --threads 2 --warmup 3 --rounds 20 --json

The GGUF is dequantized to float32 by transformers. Each round times one forward of the tokenized
prompt (batch 1, no KV cache) with time.perf_counter. With --json it prints one JSON line:
    {"times_ms": [...], "median_ms": x, "top1_id": id, "torch": "...", "transformers": "..."}
(plus "top5" when --top5 is given). Without --json it prints a short human-readable summary.
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
os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF de-quantization progress bar


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="path to a local .gguf file")
    ap.add_argument("--prompt", default="The Eiffel Tower is in the city of")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--warmup", type=int, default=3, help="untimed forwards before timing")
    ap.add_argument("--rounds", type=int, default=20, help="timed forwards")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--top5", action="store_true", help="also report the top-5 next tokens")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the dtype the dequantized weights are cast to (and the forward computes in)")
    ap.add_argument("--serve", action="store_true",
                    help="after warm-up, read a number N per stdin line, time N forwards, print one JSON line "
                         "{\"times_ms\": [...]} per request (lets a caller interleave its own rounds)")
    args = ap.parse_args()

    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hf_load import load_gguf

    tokenizer, model, load_s = load_gguf(args.gguf, args.threads)
    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    gguf = Path(args.gguf).resolve()

    input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids

    with torch.inference_mode():
        def forward():
            return model(input_ids=input_ids, use_cache=False).logits

        for _ in range(args.warmup):
            forward()
        if args.serve:
            print(json.dumps({"ready": True, "torch": torch.__version__,
                              "transformers": transformers.__version__}), flush=True)
            for line in sys.stdin:
                n = int(line.strip() or 0)
                if n <= 0:
                    break
                block = []
                time.sleep(0.3)  # let the caller's OpenMP threads stop spinning (the caller does the same)
                for _ in range(n):
                    t = time.perf_counter()
                    forward()
                    block.append((time.perf_counter() - t) * 1000.0)
                print(json.dumps({"times_ms": block}), flush=True)
            return 0
        times_ms = []
        logits = None
        for _ in range(args.rounds):
            t = time.perf_counter()
            logits = forward()
            times_ms.append((time.perf_counter() - t) * 1000.0)
        if logits is None:
            logits = forward()

    last = logits[0, -1].float()
    top1_id = int(last.argmax())
    result = {
        "times_ms": [round(t, 4) for t in times_ms],
        "median_ms": round(statistics.median(times_ms), 4) if times_ms else None,
        "top1_id": top1_id,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if args.top5:
        probs = last.softmax(-1)
        top = probs.topk(5)
        result["top5"] = [
            {"id": int(i), "token": tokenizer.decode([int(i)]), "logit": round(float(last[i]), 4),
             "prob": round(float(p), 4)}
            for p, i in zip(top.values, top.indices)
        ]

    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(f"loaded {gguf.name} in {load_s:.1f} s; prompt ids {input_ids[0].tolist()}")
        print(f"threads {args.threads}, warmup {args.warmup}, rounds {args.rounds}: "
              f"median {result['median_ms']} ms (min {min(times_ms, default=float('nan')):.2f}, "
              f"max {max(times_ms, default=float('nan')):.2f})")
        print(f"top1 id {top1_id} {tokenizer.decode([top1_id])!r}")
        for row in result.get("top5", []):
            print(f"  {row['id']:>6} {row['token']!r:>12} logit {row['logit']:8.4f} p {row['prob']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
