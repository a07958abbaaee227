#!/usr/bin/env python3
"""Python nnsight 0.8.1 side of the SAE parity check (tests/sae.rs): a small sparse autoencoder with fixed (seeded)
weights on SmolLM2's layer-5 residual stream, written in SAELens's folder format, spliced into a Python nnsight
trace of the embedded SmolLM2 GGUF (dequantized to float32 by transformers), CPU.

The SAE's maths is SAELens's (sae_lens/saes/{standard,jumprelu,topk}_sae.py), written out here in torch so that
the check needs no sae_lens install:

    sae_in     = x - b_dec                              (apply_b_dec_to_input)
    hidden_pre = sae_in @ W_enc + b_enc
    standard:  f = relu(hidden_pre)
    jumprelu:  f = relu(hidden_pre) * (hidden_pre > threshold)
    topk:      f = zeros.scatter(-1, topk(hidden_pre, k).indices, relu(topk(hidden_pre, k).values))
    x_hat      = f @ W_dec + b_dec

Writes tests/data/sae/smollm2-layer5/{cfg.json, sae_weights.safetensors} (a standard SAE, d_in 576, d_sae 128,
hook blocks.5.hook_resid_post) and tests/data/sae/reference.safetensors:

    h               [seq, 576]   layer 5's output, clean
    features        [seq, 128]   the standard SAE's features of h, read inside the trace
    reconstruction  [seq, 576]   its reconstruction, written back as layer 5's output in the same trace
    logits_spliced  [vocab]      the last position's logits of that trace
    logits_edited   [vocab]      the last position's logits with feature EDIT_FEATURE scaled by 0 at layer 5,
                                 the error term kept: x + (0 - f_i) * W_dec[i]
    threshold       [128]        a JumpReLU threshold for the same weights
    features_jumprelu, features_topk (k = TOPK)   [seq, 128]   features of h under those activations

    ~/.cache/nnsight-rs/venv-torch-2.13.0/bin/python scripts/peer/nnsight_sae.py
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
OUT = ROOT / "tests" / "data" / "sae"
PROMPT = "The Eiffel Tower is in the city of"
LAYER = 5
D_IN, D_SAE = 576, 128
TOPK = 8
EDIT_FEATURE = 3


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

    # Fixed weights: decoder rows of norm 0.5 (the residual stream at layer 5 has norms of a few units), the
    # encoder their transpose scaled, a negative encoder bias so that some features are off.
    g = torch.Generator().manual_seed(1234)
    w_dec = torch.randn(D_SAE, D_IN, generator=g)
    w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) * 0.5
    w_enc = (w_dec.T * 4.0).contiguous()
    b_enc = -0.5 * torch.rand(D_SAE, generator=g)
    b_dec = 0.05 * torch.randn(D_IN, generator=g)
    threshold = 0.5 * torch.rand(D_SAE, generator=g)

    def hidden_pre(x):
        return (x - b_dec) @ w_enc + b_enc

    def relu_features(x):
        return torch.relu(hidden_pre(x))

    def jumprelu_features(x):
        pre = hidden_pre(x)
        return torch.relu(pre) * (pre > threshold).to(pre.dtype)

    def topk_features(x):
        pre = hidden_pre(x)
        top = torch.topk(pre, k=TOPK, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def decode(f):
        return f @ w_dec + b_dec

    def unwrap(h):
        # A tensor in transformers 5.x ([1, seq, hidden]), a tuple (hidden, ...) in 4.x.
        return h[0] if isinstance(h, (tuple, list)) else h

    with torch.no_grad(), model.trace(PROMPT):
        h = unwrap(model.model.layers[LAYER].output)
        clean = h.clone().save()
        f = relu_features(h)
        features = f.save()
        recon = decode(f)
        reconstruction = recon.save()
        model.model.layers[LAYER].output = recon
        logits_spliced = model.lm_head.output[0, -1].save()

    with torch.no_grad(), model.trace(PROMPT):
        h = unwrap(model.model.layers[LAYER].output)
        f = relu_features(h)
        fi = f[..., EDIT_FEATURE : EDIT_FEATURE + 1]
        # decode(f with f_i = 0) + (h - decode(f)) = h + (0 - f_i) * W_dec[i]
        model.model.layers[LAYER].output = h + (0.0 * fi - fi) * w_dec[EDIT_FEATURE]
        logits_edited = model.lm_head.output[0, -1].save()

    h0 = clean[0].float()
    OUT.mkdir(parents=True, exist_ok=True)
    folder = OUT / "smollm2-layer5"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {"W_enc": w_enc.contiguous(), "b_enc": b_enc, "W_dec": w_dec.contiguous(), "b_dec": b_dec},
        str(folder / "sae_weights.safetensors"),
    )
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": "SmolLM2-135M-Instruct",
            "hook_name": f"blocks.{LAYER}.hook_resid_post",
            "hook_layer": LAYER,
            "hook_head_index": None,
            "prepend_bos": False,
            "sae_lens_version": "6.0.0",
            "sae_lens_training_version": "6.0.0",
        },
    }
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(
        {
            "h": h0.contiguous(),
            "features": features[0].float().contiguous(),
            "reconstruction": reconstruction[0].float().contiguous(),
            "logits_spliced": logits_spliced.float().contiguous(),
            "logits_edited": logits_edited.float().contiguous(),
            "threshold": threshold.contiguous(),
            "features_jumprelu": jumprelu_features(h0).contiguous(),
            "features_topk": topk_features(h0).contiguous(),
        },
        str(OUT / "reference.safetensors"),
    )
    meta = {
        "prompt": PROMPT,
        "layer": LAYER,
        "topk": TOPK,
        "edit_feature": EDIT_FEATURE,
        "nnsight": nnsight.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "l0_relu": float((features[0] > 0).float().sum(-1).mean()),
        "l0_jumprelu": float((jumprelu_features(h0) > 0).float().sum(-1).mean()),
    }
    (OUT / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
