"""What every tiny checkpoint of scripts/make_tiny_models.py shares: the tokenizer, the initialisation, the
reference values transformers computes, `tiny()` that builds and saves one."""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
import tokenizers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
)
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"

PROMPTS = {
    "p1": "The quick brown fox jumps over the lazy dog",
    "p2": "Hello world",
}

SPECIAL_TOKENS = ["<|endoftext|>", "<s>", "</s>"]  # ids 0, 1, 2
VOCAB_TARGET = 512

GREEDY_TOKENS = 24
INIT_STD = 0.2

TEXT = """\
The quick brown fox jumps over the lazy dog. This sentence is famous because it uses every letter of the
English alphabet at least once, and typists have practised on it for more than a century. Hello world is
the first program that many people write when they learn a new language: it prints a short greeting and
then it stops.

Interpretability research asks what happens inside a neural network while it runs. A researcher may save
the hidden state of a layer, replace the output of an attention head with zeros, or patch the residual
stream of one prompt into the forward pass of another prompt. The model then predicts the next token,
and the researcher compares the logits with and without the intervention.

The Eiffel Tower is in the city of Paris, in France. It was built of iron for the world fair of 1889 and
for many years it was the tallest structure in the world. Visitors climb the stairs or ride the lifts to
the top, where they can see the river, the old roads, the parks and the roofs of the houses below.

Once upon a time there was a little town by the sea. Every morning the fishermen went out in their boats,
and every evening they came home with their nets full of fish. The children played on the sand, the dogs
ran after the birds, and the old women sat in the sun and told stories about the winters of long ago.

Numbers and symbols appear in text as well: 0 1 2 3 4 5 6 7 8 9, 10, 42, 100, 2024, 3.14, (a + b) * c,
x = y / 2; "quotes", 'single quotes', e-mail@example.com, #tags, 50% and $5. Some words are short, some
words are rather longer, and a few of them, like internationalization, are very long indeed.
"""

def train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT.split("\n\n"), trainer=trainer)
    return tok

def is_norm_weight(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] == "weight" and any(p.startswith("ln_") or p.endswith("norm") for p in parts)

@torch.no_grad()
def big_init(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if is_norm_weight(name):
            p.copy_(1.0 + INIT_STD * noise)
        else:
            p.copy_(INIT_STD * noise)

def block_list(model: torch.nn.Module):
    if hasattr(model, "gpt_neox"):
        return model.gpt_neox.layers, model.gpt_neox.final_layer_norm
    if hasattr(model, "transformer"):
        return model.transformer.h, model.transformer.ln_f
    return model.model.layers, model.model.norm

@torch.no_grad()
def reference(model, tok: Tokenizer, out_dir: Path, extra: dict) -> None:
    model.eval()
    blocks, final_norm = block_list(model)
    tensors: dict[str, torch.Tensor] = {}
    max_logit = 0.0
    prompts_info = {}
    for key, text in PROMPTS.items():
        ids = tok.encode(text).ids
        input_ids = torch.tensor([ids], dtype=torch.long)
        captured: dict[str, torch.Tensor] = {}
        hooks = []
        for i, block in enumerate(blocks):
            def hook(_m, _inp, out, i=i):
                captured[f"layer{i}"] = (out[0] if isinstance(out, tuple) else out).detach().clone()
            hooks.append(block.register_forward_hook(hook))
        hooks.append(final_norm.register_forward_hook(
            lambda _m, _i, out: captured.__setitem__("norm", out.detach().clone())))
        out = model(input_ids=input_ids, output_hidden_states=True, output_attentions=True, use_cache=False)
        for h in hooks:
            h.remove()
        tensors[f"{key}_attn_probs"] = torch.stack([a[0] for a in out.attentions]).float().contiguous()
        greedy, margins = [], []
        seq = input_ids
        for _ in range(GREEDY_TOKENS):
            last = model(input_ids=seq, use_cache=False).logits[0, -1].float()
            top2 = last.topk(2)
            margins.append(float(top2.values[0] - top2.values[1]))
            nxt = int(top2.indices[0])
            greedy.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]], dtype=torch.long)], dim=1)
        tensors[f"{key}_greedy"] = torch.tensor(greedy, dtype=torch.long)
        logits = out.logits[0].float().contiguous()
        hs = torch.stack(out.hidden_states)[:, 0].float().contiguous()
        layers = torch.stack([captured[f"layer{i}"][0] for i in range(len(blocks))]).float().contiguous()
        tensors[f"{key}_input_ids"] = input_ids[0].contiguous()
        tensors[f"{key}_logits"] = logits
        tensors[f"{key}_hidden_states"] = hs
        tensors[f"{key}_layer_outputs"] = layers
        tensors[f"{key}_final_norm_output"] = captured["norm"][0].float().contiguous()
        m = logits.abs().max().item()
        max_logit = max(max_logit, m)
        probs = logits[-1].softmax(-1)
        top = probs.topk(5)
        # Which convention does output_hidden_states follow for the last entry?
        last_is_normed = torch.allclose(hs[-1], tensors[f"{key}_final_norm_output"])
        prompts_info[key] = {
            "text": text,
            "input_ids": ids,
            "tokens": [tok.id_to_token(i) for i in ids],
            "max_abs_logit": m,
            "logits_std": logits.std().item(),
            "last_pos_top5": [
                {"id": int(i), "token": tok.id_to_token(int(i)), "logit": float(logits[-1, i]), "prob": float(p)}
                for p, i in zip(top.values, top.indices)
            ],
            "hidden_states_last_is_final_norm_output": bool(last_is_normed),
            "greedy_ids": greedy,
            "greedy_min_top2_margin": min(margins),
        }
    meta = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "max_abs_logit": f"{max_logit:.6f}",
        "prompts": json.dumps(PROMPTS),
        "description": (
            "pK_input_ids i64 [n]: ids of prompt K (no BOS added); "
            "pK_logits f32 [n,vocab]: float32 CPU eval no_grad logits; "
            "pK_hidden_states f32 [n_layers+1,n,hidden]: output_hidden_states tuple stacked "
            "(entry 0 = embeddings; see reference.json for whether the last entry is after the final norm); "
            "pK_layer_outputs f32 [n_layers,n,hidden]: output of each decoder block via forward hooks; "
            "pK_final_norm_output f32 [n,hidden]: output of the final norm; "
            "pK_attn_probs f32 [n_layers,heads,n,n]: eager attention probabilities of each layer; "
            f"pK_greedy i64 [{GREEDY_TOKENS}]: greedy continuation (full forward per step, no stop token)"
        ),
    }
    save_safetensors_sorted(tensors, out_dir / "reference.safetensors", meta)
    info = {
        "what": meta["description"],
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)} for k, v in tensors.items()},
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "tokenizers": tokenizers.__version__, "python": sys.version.split()[0]},
        "settings": "float32, CPU, model.eval(), torch.no_grad(), use_cache=False, attn_implementation=eager",
        "max_abs_logit": max_logit,
        "prompts": prompts_info,
        **extra,
    }
    (out_dir / "reference.json").write_text(json.dumps(info, indent=2) + "\n")

def save_safetensors_sorted(tensors: dict, path: Path, meta: dict) -> None:
    """save_file, but with the header's keys sorted so that reruns give identical bytes.

    (safetensors writes `__metadata__` from a hash map, in a different order on every run.)
    Data offsets are relative to the end of the header, so rewriting the header leaves them valid.
    """
    save_file(tensors, str(path), metadata=meta)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])

def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path

def report(path: Path) -> None:
    total = 0
    for f in sorted(path.iterdir()):
        size = f.stat().st_size
        total += size
        print(f"  wrote {f.relative_to(ROOT)} ({size:,} bytes)")
    print(f"  total {total:,} bytes")

def state_dict_keys(path: Path) -> list[str]:
    from safetensors import safe_open
    keys = []
    for f in sorted(path.glob("model*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            keys.extend(sf.keys())
    return sorted(keys)

def tiny(name: str, tok: Tokenizer, model_cls, config, seed: int, extra: dict | None = None, adjust=None):
    """Builds `model_cls` from `config` (eager attention, float32), initialises it with `seed` (then `adjust(model)`,
    if given, under no_grad), saves it with the shared tokenizer into tests/data/<name>/ and writes its reference.
    Returns the model."""
    out = fresh_dir(DATA / name)
    torch.manual_seed(0)
    model = model_cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
    big_init(model, seed=seed)
    if adjust is not None:
        with torch.no_grad():
            adjust(model)
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    shutil.copyfile(DATA / "tiny-gpt2" / "tokenizer.json", out / "tokenizer.json")
    keys = state_dict_keys(out)
    reference(model, tok, out, {"state_dict_keys": keys, **(extra or {})})
    print(f"{name}: vocab {config.vocab_size}, {sum(p.numel() for p in model.parameters()):,} params, "
          f"{len(keys)} state-dict keys")
    report(out)
    return model

@torch.no_grad()
def greedy_no_cache(model, ids: list[int], n: int) -> list[int]:
    seq = torch.tensor([ids], dtype=torch.long)
    out = []
    for _ in range(n):
        nxt = int(model(input_ids=seq, use_cache=False).logits[0, -1].argmax())
        out.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]], dtype=torch.long)], dim=1)
    return out
