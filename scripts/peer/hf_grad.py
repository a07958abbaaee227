#!/usr/bin/env python3
"""Gradient references for the parity tests: SmolLM2 with Hugging Face transformers, torch autograd.

    hf_grad.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf --out tests/data/smollm2/eiffel_gradients.safetensors

For the Eiffel prompt, the loss is the logit of " Paris" at the last position. Written (float32):
  layer_output_grads[3, 9, 576]  d loss / d (output of decoder layers 5, 15 and 25)
  down_proj_5_grad_rows[4, 576]  rows 0..4 of d loss / d model.layers.5.mlp.down_proj.weight
  down_proj_5_grad_norm[1]       its Frobenius norm
  loss[1]                        the logit itself
Also, with the gradient flowing back through layer 15's output doubled by a tensor hook (nnsight's
`h.grad = h.grad * 2`): doubled_layer_5_grad[9, 576].
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompt", default="The Eiffel Tower is in the city of")
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hf_load import load_gguf

    tokenizer, model, _ = load_gguf(args.gguf, 2)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    paris = tokenizer(" Paris").input_ids[0]
    layers = [5, 15, 25]

    def run(double_at: int | None):
        outs = {}
        hooks = []
        for i in layers:
            def keep(_m, _inp, out, i=i):
                h = out[0] if isinstance(out, tuple) else out
                h.retain_grad()
                if i == double_at:
                    h.register_hook(lambda g: g * 2)
                outs[i] = h
            hooks.append(model.model.layers[i].register_forward_hook(keep))
        model.zero_grad()
        logits = model(input_ids=ids, use_cache=False).logits
        loss = logits[0, -1, paris]
        loss.backward()
        for h in hooks:
            h.remove()
        return loss, outs

    loss, outs = run(None)
    w = model.model.layers[5].mlp.down_proj.weight.grad
    tensors = {
        "layer_output_grads": torch.stack([outs[i].grad[0] for i in layers]).contiguous(),
        "down_proj_5_grad_rows": w[:4].contiguous().clone(),
        "down_proj_5_grad_norm": w.norm().reshape(1),
        "loss": loss.detach().reshape(1),
    }
    _, doubled = run(15)
    tensors["doubled_layer_5_grad"] = doubled[5].grad[0].contiguous()
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, args.out)
    print(f"wrote {args.out}: loss {loss.item():.4f}, |dW| {tensors['down_proj_5_grad_norm'].item():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
