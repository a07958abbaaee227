#!/usr/bin/env python3
"""Python nnsight 0.8.1 side of the function-vector check (tests/function_vectors.rs): on the embedded SmolLM2 GGUF
(dequantized to float32 by transformers), CPU, the recipe of nnsight::function_vectors written as a Python nnsight
user writes it (after the "function vectors" tutorial and Todd et al.'s code):

- each in-context prompt in its own trace; the input of every layer's `self_attn.o_proj` at the last token, split
  into heads ([heads, head_dim]): for a few fixed heads, the mean over the prompts (`activations`, [k, head_dim]);
- each of those through its own columns of `o_proj` (`W[:, h*d:(h+1)*d] @ mean`; `outputs`, [k, hidden]); the
  function vector is their sum (`vector`, [hidden]);
- a zero-shot prompt traced with the vector added to `model.model.layers[LAYER].output` at the last position:
  its last-position logits (`logits`, [vocab]), and without it (`logits_plain`).

Writes tests/data/function-vectors/smollm2.safetensors and smollm2.json (prompts, heads, layer, versions).

    ~/.cache/nnsight-rs/venv-torch-2.13.0/bin/python scripts/peer/nnsight_function_vectors.py
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
OUT = ROOT / "tests" / "data" / "function-vectors"
PROMPTS = [
    "hot: cold\nbig: small\nfast: slow\nup: down\nhappy: sad\nold:",
    "good: bad\nrich: poor\nopen: closed\nlight: dark\nhard: soft\nhigh:",
    "early: late\nfull: empty\nstrong: weak\nwet: dry\nclean: dirty\nlove:",
    "win: lose\ntrue: false\nday: night\nleft: right\nblack: white\nthick:",
]
HEADS = [[20, 5], [14, 1], [29, 0], [23, 3], [17, 8], [11, 2]]
LAYER = 6
ZERO_SHOT = "near:"


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
    cfg = hf.config
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads

    per_prompt = []
    with torch.no_grad():
        for prompt in PROMPTS:
            layers = sorted({layer for layer, _ in HEADS})  # read in forward order
            with model.trace(prompt):
                saved = nnsight.save({})
                for layer in layers:
                    saved[layer] = model.model.layers[layer].self_attn.o_proj.input[0, -1].save()
            per_prompt.append(torch.stack([saved[l].view(heads, head_dim)[h] for l, h in HEADS]))
        activations = torch.stack(per_prompt).mean(0)  # [k, head_dim]
        outputs = torch.stack([
            hf.model.layers[l].self_attn.o_proj.weight[:, h * head_dim:(h + 1) * head_dim] @ activations[i]
            for i, (l, h) in enumerate(HEADS)
        ])  # [k, hidden]
        vector = outputs.sum(0)

        with model.trace(ZERO_SHOT):
            out = model.model.layers[LAYER].output
            hidden = out[0] if isinstance(out, tuple) else out
            hidden[:, -1] += vector
            logits = model.output.logits[0, -1].save()
        with model.trace(ZERO_SHOT):
            logits_plain = model.output.logits[0, -1].save()

    tensors = {
        "activations": activations.contiguous(),
        "outputs": outputs.contiguous(),
        "vector": vector.contiguous(),
        "logits": logits.float().contiguous(),
        "logits_plain": logits_plain.float().contiguous(),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(tensors, OUT / "smollm2.safetensors")
    meta = {
        "what": "Mean head activations (o_proj's input at the last token, per head) over in-context prompts, "
        "their o_proj outputs, the function vector (their sum), and a zero-shot prompt's last-position logits with "
        "the vector added to model.model.layers[layer].output at the last position, on SmolLM2-135M-Instruct "
        "(Q4_1 GGUF dequantized to float32), by scripts/peer/nnsight_function_vectors.py",
        "prompts": PROMPTS,
        "heads": HEADS,
        "layer": LAYER,
        "zero_shot": ZERO_SHOT,
        "versions": {"nnsight": nnsight.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }
    (OUT / "smollm2.json").write_text(json.dumps(meta, indent=1) + "\n")
    top = lambda l: repr(tok.decode([int(l.argmax())]))
    print(f"|vector| {vector.norm().item():.3f}; zero-shot top token without {top(logits_plain)}, with {top(logits)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
