#!/usr/bin/env python3
"""The bfloat16 reference of SmolLM2 on the CPU: transformers' forward of the embedded GGUF loaded in bfloat16
(`dtype=torch.bfloat16`: weights dequantized, then rounded to bfloat16; compute in bfloat16, as transformers does it
on the CPU), for the Eiffel and Colosseum prompts: the last position's logits (as float32), each position's top token, and the 10-token greedy
continuation. Written to tests/data/smollm2/bf16_reference.safetensors; tests/parity_smollm2.rs compares ours.

Run with the project's torch venv after `make setup-peer`:
    ~/.cache/nnsight-rs/venv-torch-2.13.0/bin/python scripts/peer/hf_bf16_reference.py
"""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = {"eiffel": "The Eiffel Tower is in the city of", "colosseum": "The Colosseum is in the city of"}


def main() -> int:
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    models = ROOT / "models"
    model = AutoModelForCausalLM.from_pretrained(models, gguf_file=GGUF, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(models, gguf_file=GGUF)
    tensors = {}
    for key, text in PROMPTS.items():
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits[0].float().contiguous()
            greedy = model.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].contiguous()
        tensors[f"{key}_input_ids"] = ids[0].contiguous()
        tensors[f"{key}_last_logits"] = logits[-1].contiguous()
        tensors[f"{key}_argmax"] = logits.argmax(-1).contiguous()
        tensors[f"{key}_greedy"] = greedy
    meta = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "description": "KEY_input_ids i64 [n]; KEY_last_logits f32 [vocab]: the last position's logits (computed in "
                       "bfloat16 on the CPU); KEY_argmax i64 [n]: each position's top token; "
                       "KEY_greedy i64 [10]: greedy continuation with the KV cache",
    }
    out = ROOT / "tests" / "data" / "smollm2" / "bf16_reference.safetensors"
    save_file(tensors, str(out), metadata=meta)
    print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
