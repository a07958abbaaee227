"""Loading the GGUF model with Hugging Face transformers, shared by the peer scripts (everything local)."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def load_gguf(path: str, threads: int):
    """Returns (tokenizer, float32 model in eval mode, load seconds), or exits with status 2 if the file is
    missing. Sets torch's thread count and quiets transformers' logging and progress bars."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)

    gguf = Path(path).resolve()
    if not gguf.is_file():
        print(f"error: no such GGUF file: {gguf}", file=sys.stderr)
        sys.exit(2)
    folder, name = str(gguf.parent), gguf.name
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
    model.eval()
    return tokenizer, model, time.perf_counter() - t0
