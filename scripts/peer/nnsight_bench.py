#!/usr/bin/env python3
"""Python nnsight side of the tracing-overhead benchmark: time nnsight traces against a plain forward.

Run with the project's torch venv (scripts/setup.sh creates it) after `pip install nnsight==0.8.1`
into it, everything local:

    nnsight_bench.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf --threads 2 --warmup 5 --rounds 30 --json

The GGUF is loaded exactly as hf_forward.py loads it (dequantized to float32 by transformers,
offline) and wrapped with `nnsight.LanguageModel(hf_model, tokenizer=tokenizer)`. Cases:

    plain    hf_model(**encoding)       the call nnsight's trace makes (input_ids + attention_mask,
                                        the model's default use_cache), on ids tokenized once up front
    empty    with model.trace(prompt): pass
    save1    save layer 5's output
    save30   save all 30 layers' outputs
    set1     zero layer 10's MLP output and save the logits
    invoke2  model.trace() with two tracer.invoke(prompt) blocks (batch 2), each saving layer 5

Grad mode: nnsight 0.8.1's local trace does not touch autograd (no no_grad / inference_mode
anywhere on its local path; the forward runs in whatever mode the caller is in), so by default every
case, plain included, runs with grad enabled, exactly as `with model.trace(...)` does when a user
writes it at top level. `--grad no_grad|inference` wraps *all* cases in that mode instead, so the
difference from plain stays the tracing cost alone either way.

Timing is round-robin: after --warmup rounds, each round runs every case once in a fixed order,
timed with time.perf_counter; after each batch-2 case (invoke2, plain2) one untimed batch-1 plain
forward runs, since a forward right after a batch-2 one is measurably slower (~1.5 ms). Per case:
the median time, and the median over rounds of (case time - plain time in the same round) --
"overhead is the median of same-round differences from a plain forward". With --json it prints one JSON line:
    {"cases": {"plain": {"median_ms": x, "overhead_ms": 0, ...}, "empty": {...}, ...},
     "nnsight": "...", "torch": "...", "transformers": "...", ...}
Without --json a readable table. --check first asserts the results make sense (layer-5 output
shape [1, 9, 576]; set1 changes the logits; invoke2's two saves differ) and prints them.
Note invoke2 runs a batch of 2, so its difference from (batch-1) plain includes the second row's
compute; --plain2 adds a batch-2 plain forward to separate the two.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF de-quantization progress bar

PROMPT = "The Eiffel Tower is in the city of"
PROMPT2 = "The Colosseum is in the city of"
SAVE_LAYER = 5
SET_LAYER = 10
CASE_ORDER = ("plain", "empty", "save1", "save30", "set1", "invoke2")
BATCH2_CASES = ("invoke2", "plain2")  # followed by an untimed batch-1 forward, see the timing loop


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _layer_tensor(value):
    """A decoder layer's output: a tensor in transformers 5.x, a tuple (hidden, ...) in 4.x."""
    return value[0] if isinstance(value, (tuple, list)) else value


def build_cases(model, hf_model, tokenizer, plain2: bool):
    """The benchmark cases, each a zero-argument function returning what it computed."""
    import nnsight

    layers = model.model.layers
    n_layers = len(layers)
    encoding = tokenizer(PROMPT, return_tensors="pt")  # what nnsight's _call passes: ids + mask
    prompt = PROMPT

    def plain():
        return hf_model(**encoding)

    def empty():
        with model.trace(prompt):
            pass

    def save1():
        with model.trace(prompt):
            h = model.model.layers[SAVE_LAYER].output.save()
        return h

    def save30():
        with model.trace(prompt):
            # A list built inside the block is not itself saved, so a plain comprehension of saved
            # outputs is dropped at exit; save the (empty) list first, then fill it.
            hs = nnsight.save([])
            for i in range(n_layers):
                hs.append(model.model.layers[i].output.save())
        return hs

    def set1():
        with model.trace(prompt):
            model.model.layers[SET_LAYER].mlp.output = model.model.layers[SET_LAYER].mlp.output * 0
            logits = model.output.logits.save()
        return logits

    def invoke2():
        with model.trace() as tracer:
            with tracer.invoke(PROMPT):
                a = model.model.layers[SAVE_LAYER].output.save()
            with tracer.invoke(PROMPT2):
                b = model.model.layers[SAVE_LAYER].output.save()
        return a, b

    cases = {"plain": plain, "empty": empty, "save1": save1, "save30": save30,
             "set1": set1, "invoke2": invoke2}
    if plain2:
        # The batch-2 input nnsight builds for invoke2: the tokenizer is left-padded (nnsight sets
        # padding_side="left" for causal models), pad = eos.
        encoding2 = tokenizer([PROMPT, PROMPT2], return_tensors="pt", padding=True)

        def plain2_fn():
            return hf_model(**encoding2)

        cases["plain2"] = plain2_fn
    return cases


def run_check(cases, hf_model, tokenizer) -> dict:
    """Assert the traced results make sense; return what was checked (printed by the caller)."""
    import torch

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    base_logits = cases["plain"]().logits.detach()
    h = _layer_tensor(cases["save1"]()).detach()
    assert isinstance(h, torch.Tensor), f"layer output is {type(h)}"
    assert list(h.shape) == [1, ids.shape[1], 576], f"layer-5 output shape {list(h.shape)}"
    assert list(h.shape) == [1, 9, 576], f"layer-5 output shape {list(h.shape)}"
    hs = [_layer_tensor(x).detach() for x in cases["save30"]()]
    assert len(hs) == 30 and all(list(x.shape) == [1, 9, 576] for x in hs), "save30 shapes"
    assert torch.equal(hs[SAVE_LAYER], h), "save30's layer 5 differs from save1's"
    set_logits = cases["set1"]().detach()
    assert set_logits.shape == base_logits.shape, f"set1 logits shape {list(set_logits.shape)}"
    set_diff = float((set_logits - base_logits).abs().max())
    assert set_diff > 1e-3, f"zeroing layer {SET_LAYER}'s MLP did not change the logits ({set_diff})"
    a, b = (_layer_tensor(x).detach() for x in cases["invoke2"]())
    ab_diff = float((a[:, -1] - b[:, -1]).abs().max())
    assert a.shape[0] == 1 and b.shape[0] == 1, f"invoke rows {a.shape} {b.shape}"
    assert ab_diff > 1e-3, "invoke2's two saves are the same"
    # Row 0 of the batch (the Eiffel prompt, left-padded only if it is the shorter one) at the last
    # position should match the unbatched run closely.
    a_vs_single = float((a[0, -1] - h[0, -1]).abs().max())
    base_top = int(base_logits[0, -1].argmax())
    set_top = int(set_logits[0, -1].argmax())
    return {
        "layer_output_type": type(cases["save1"]()).__name__,
        "layer5_shape": list(h.shape),
        "save30_count": len(hs),
        "plain_top1": [base_top, tokenizer.decode([base_top])],
        "set1_top1": [set_top, tokenizer.decode([set_top])],
        "set1_max_abs_logit_change": round(set_diff, 4),
        "invoke2_shapes": [list(a.shape), list(b.shape)],
        "invoke2_last_pos_max_abs_diff": round(ab_diff, 4),
        "invoke2_row0_vs_save1_last_pos_max_abs_diff": a_vs_single,
        "prompt_tokens": [ids.shape[1], int(tokenizer(PROMPT2, return_tensors="pt").input_ids.shape[1])],
        "requires_grad_of_saved": bool(_layer_tensor(cases["save1"]()).requires_grad),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="path to a local .gguf file")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--warmup", type=int, default=5, help="untimed rounds before timing")
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds (each runs every case once)")
    ap.add_argument("--grad", choices=("enabled", "no_grad", "inference"), default="enabled",
                    help="autograd mode for every case (default: enabled, what nnsight 0.8.1's trace runs in)")
    ap.add_argument("--plain2", action="store_true", help="also time a batch-2 plain forward (invoke2's input)")
    ap.add_argument("--cases", default=",".join(CASE_ORDER),
                    help="comma-separated cases to run, in this order each round (plain is always run first)")
    ap.add_argument("--check", action="store_true", help="assert the traced results make sense and print them")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()

    import torch
    import transformers

    import nnsight

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hf_load import load_gguf

    t0 = time.perf_counter()
    tokenizer, hf_model, _ = load_gguf(args.gguf, args.threads)
    # A ready module is wrapped as-is (no meta build, nothing to dispatch). LanguageModel is
    # deprecated in 0.8.1 in favour of TransformersModel(..., task="text-generation"); it is the
    # same class underneath, so silence just that warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nnsight.NNsightDeprecationWarning)
        model = nnsight.LanguageModel(hf_model, tokenizer=tokenizer)
    assert model._module is hf_model
    load_s = time.perf_counter() - t0

    grad_ctx = {"enabled": contextlib.nullcontext, "no_grad": torch.no_grad,
                "inference": torch.inference_mode}[args.grad]

    cases = build_cases(model, hf_model, tokenizer, args.plain2)
    wanted = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in CASE_ORDER]
    if unknown:
        print(f"error: unknown case(s) {unknown}; known: {list(CASE_ORDER)}", file=sys.stderr)
        return 2
    names = ["plain"] + [n for n in wanted if n != "plain"] + (["plain2"] if args.plain2 else [])

    check = None
    times: dict[str, list[float]] = {n: [] for n in names}
    with grad_ctx():
        if args.check:
            check = run_check(cases, hf_model, tokenizer)
        settle = cases["plain"]
        for _ in range(args.warmup):
            for n in names:
                cases[n]()
                if n in BATCH2_CASES:
                    settle()
        for _ in range(args.rounds):
            for n in names:
                fn = cases[n]
                t = time.perf_counter()
                fn()
                times[n].append((time.perf_counter() - t) * 1000.0)
                if n in BATCH2_CASES:
                    # A batch-1 forward right after a batch-2 one runs ~1.5 ms slower (measured: the
                    # allocator re-settling), which would inflate the next round's plain and shrink
                    # every overhead; one untimed batch-1 forward restores the steady state.
                    settle()
        t = time.perf_counter()
        for _ in range(100):
            tokenizer(PROMPT, return_tensors="pt")
        tokenize_ms = (time.perf_counter() - t) * 1000.0 / 100

    out_cases = {}
    for n in names:
        ts = times[n]
        diffs = [a - b for a, b in zip(ts, times["plain"])]
        entry = {
            "median_ms": round(statistics.median(ts), 4) if ts else None,
            "overhead_ms": 0 if n == "plain" else (round(statistics.median(diffs), 4) if diffs else None),
            "min_ms": round(min(ts), 4) if ts else None,
            "overhead_p25_ms": round(_quantile(diffs, 0.25), 4) if diffs else None,
            "overhead_p75_ms": round(_quantile(diffs, 0.75), 4) if diffs else None,
        }
        if n == "invoke2" and args.plain2:
            d2 = [a - b for a, b in zip(ts, times["plain2"])]
            entry["overhead_vs_plain2_ms"] = round(statistics.median(d2), 4) if d2 else None
        out_cases[n] = entry

    result = {
        "cases": out_cases,
        "nnsight": nnsight.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "grad": args.grad,
        "threads": args.threads,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "tokenize_ms": round(tokenize_ms, 4),
    }
    if check is not None:
        result["check"] = check

    if args.json:
        print(json.dumps(result), flush=True)
        return 0
    print(f"loaded {gguf.name} in {load_s:.1f} s; nnsight {nnsight.__version__}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"threads {args.threads}, grad {args.grad}, warmup {args.warmup}, rounds {args.rounds}; "
          f"tokenizing the prompt takes {tokenize_ms:.3f} ms (inside every trace, not in plain)")
    if check is not None:
        print("check passed:")
        for k, v in check.items():
            print(f"  {k}: {v}")
    print(f"{'case':<9} {'median ms':>10} {'min ms':>9} {'overhead ms':>12} {'(p25 .. p75)':>18}")
    for n in names:
        e = out_cases[n]
        extra = f"   vs plain2 {e['overhead_vs_plain2_ms']:+.3f}" if "overhead_vs_plain2_ms" in e else ""
        print(f"{n:<9} {e['median_ms']:>10.3f} {e['min_ms']:>9.3f} {e['overhead_ms']:>+12.3f} "
              f"({e['overhead_p25_ms']:+.2f} .. {e['overhead_p75_ms']:+.2f}){extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
