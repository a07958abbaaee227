"""The GGUF files of the tiny checkpoints, written with the `gguf` package (llama.cpp's) the way llama.cpp's
converter lays each family out, and transformers' own reading of such a file."""

from __future__ import annotations

from tiny_common import *  # noqa: F401,F403


def add_gguf_tokenizer(w, tok: Tokenizer, c) -> None:
    """The shared tokenizer as a GGUF `gpt2` vocabulary: tokens by id, their types, merges, BOS and EOS ids."""
    import gguf
    vocab = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(vocab["vocab"].items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)


def finish_gguf(w, path: Path) -> None:
    """Writes the GGUF file `w` describes and says so."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"  wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


def write_gpt_neox_gguf(model, tok: Tokenizer, path: Path) -> None:
    """An F32 GGUF of `model` as llama.cpp's convert_hf_to_gguf.py writes a GPT-NeoX (`gptneox`): its metadata
    keys, tensor names, and the rows of `query_key_value` regrouped from [heads, 3, head_dim] to [3, heads,
    head_dim]; with the shared tokenizer as a `gpt2` vocabulary."""
    import gguf
    c = model.config
    heads, hidden = c.num_attention_heads, c.hidden_size
    w = gguf.GGUFWriter(str(path), "gptneox")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(hidden)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_rope_dimension_count(int(c.rope_parameters["partial_rotary_factor"] * (hidden // heads)))
    w.add_head_count(heads)
    w.add_parallel_residual(c.use_parallel_residual)
    w.add_layer_norm_eps(c.layer_norm_eps)
    add_gguf_tokenizer(w, tok, c)
    w.add_tokenizer_pre("gpt2")
    w.add_add_bos_token(False)
    names = {"gpt_neox.embed_in": "token_embd", "gpt_neox.final_layer_norm": "output_norm", "lm_head": "output"}
    parts = {"input_layernorm": "attn_norm", "attention.query_key_value": "attn_qkv", "attention.dense": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"}
    for name, t in model.state_dict().items():
        module, suffix = name.rsplit(".", 1)
        if module.startswith("gpt_neox.layers."):
            idx, part = module[len("gpt_neox.layers."):].split(".", 1)
            out = f"blk.{idx}.{parts[part]}.{suffix}"
        else:
            out = f"{names[module]}.{suffix}"
        t = t.detach().float()
        if module.endswith("attention.query_key_value"):
            t = t.reshape(heads, 3, hidden // heads, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
        w.add_tensor(out, t.contiguous().numpy())
    finish_gguf(w, path)


def write_gguf(model, tok: Tokenizer, path: Path) -> None:
    """The model as llama.cpp's converter lays it out: float32 tensors under the gguf package's own name map
    (TensorNameMap), the metadata keys of GGUFWriter, the tokenizer as a gpt2 vocabulary with its merges.
    (transformers' GGUF reader cannot read it back: it takes no head_dim from attention.key_length for qwen3.)"""
    c = model.config
    w = gguf_sizes(model.config, path, c.model_type)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    add_gguf_tokenizer(w, tok, c)
    add_gguf_tensors(w, model, c.model_type, lambda name, t: t)
    finish_gguf(w, path)


def gguf_sizes(c, path: Path, arch: str):
    """A GGUFWriter of `arch` for `path` with the sizes of config `c`: context, widths, layers, heads, head_dim."""
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    return w


def add_gguf_tensors(w, model, arch: str, fix) -> None:
    """Every tensor of `model` (a tied head left out) in float32 under the gguf package's names for `arch`, as
    `fix(hf_name, tensor)` makes it."""
    import gguf
    c = model.config
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(model_arch, c.num_hidden_layers)
    for name, t in sorted(model.state_dict().items()):
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        t = fix(name, t.float())
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), t.numpy())


def write_gemma_gguf(model, tok: Tokenizer, path: Path) -> None:
    """The model as llama.cpp's converter writes a Gemma 2 / Gemma 3 (`gemma2`, `gemma3`): float32 tensors under
    the gguf package's name map, every norm weight stored as 1 + w (llama.cpp's Gemma norms multiply by the stored
    weight; transformers' GGUF reader subtracts the 1 again), the head tied; its metadata keys, and for what
    llama.cpp would otherwise take from the model size: the attention scale query_pre_attn_scalar^-0.5
    (`attention.scale`), which layers slide (`attention.sliding_window_pattern`, true = sliding), the soft caps,
    and Gemma 3's local rotary base (`rope.freq_base_swa`) and global linear scaling."""
    import gguf
    c = model.config
    arch = {"gemma2": "gemma2", "gemma3_text": "gemma3"}[c.model_type]
    w = gguf_sizes(c, path, arch)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_sliding_window(c.sliding_window)
    w.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
    w.add_attention_scale(c.query_pre_attn_scalar ** -0.5)
    if c.attn_logit_softcapping is not None:
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
    if c.final_logit_softcapping is not None:
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    rope = c.rope_parameters
    if arch == "gemma3":
        w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
        rope = rope["full_attention"]
    w.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    add_gguf_tokenizer(w, tok, c)
    add_gguf_tensors(w, model, arch, lambda name, t: t + 1.0 if name.endswith("norm.weight") else t)
    finish_gguf(w, path)


@torch.no_grad()
def transformers_gguf_reference(model, tok: Tokenizer, out: Path, gguf_name: str) -> None:
    """transformers' own reading of the GGUF file `out/gguf_name`: the logits of P1 and P2 (float32, eager) in
    gguf_reference.safetensors, and how far they are from the checkpoint's."""
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=gguf_name, dtype=torch.float32,
                                                  attn_implementation="eager")
    loaded.eval()
    tensors, diffs = {}, {}
    for key, text in PROMPTS.items():
        ids = torch.tensor([tok.encode(text).ids])
        logits = loaded(input_ids=ids, use_cache=False).logits[0].float().contiguous()
        tensors[f"{key}_logits"] = logits
        diffs[key] = float((logits - model(input_ids=ids, use_cache=False).logits[0]).abs().max())
    meta = {"transformers": transformers.__version__, "torch": torch.__version__,
            "description": f"pK_logits f32 [n,vocab]: transformers' logits of prompt K from {gguf_name}",
            "max_abs_diff_to_checkpoint": json.dumps(diffs)}
    save_safetensors_sorted(tensors, out / "gguf_reference.safetensors", meta)
    print(f"  transformers' reading of {gguf_name}: max |logits - checkpoint's| = {diffs}")


def llama_rope_freqs(rope: dict, head_dim: int) -> torch.Tensor:
    """The `rope_freqs` tensor llama.cpp's converter writes for Llama 3 rope scaling: per rotary frequency, the
    divisor that turns the plain inverse frequency into the scaled one (1 for short wavelengths, `factor` for
    long ones, 1 / ((1 - smooth) / factor + smooth) between)."""
    import math
    base = rope["rope_theta"]
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def write_phi3_gguf(model, tok: Tokenizer, path: Path) -> None:
    """An F32 GGUF of a Phi-3 as llama.cpp's convert_hf_to_gguf.py writes one (`phi3`): the fused attn_qkv and
    ffn_up (gate and up) as they are, the rotated width per head, the original context length, the sliding
    window (0: none), a pad token (EOS), and with longrope scaling the attention factor and the rope_factors_long/short tensors."""
    import gguf
    import math
    c = model.config
    rope = c.rope_parameters
    heads, hidden = c.num_attention_heads, c.hidden_size
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_context_length(c.max_position_embeddings)
    w.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * hidden) // heads)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_sliding_window(c.sliding_window or 0)
    add_gguf_tokenizer(w, tok, c)
    # Phi-3's vocabularies have a pad token; without one transformers' reader takes Phi3Config's 32000.
    w.add_pad_token_id(c.eos_token_id)
    tensors = sorted(model.state_dict().items())
    if rope["rope_type"] == "longrope":
        scale = c.max_position_embeddings / c.original_max_position_embeddings
        orig = c.original_max_position_embeddings
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0)
        tensors += [("rope_factors_long", torch.tensor(rope["long_factor"], dtype=torch.float32)),
                    ("rope_factors_short", torch.tensor(rope["short_factor"], dtype=torch.float32))]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, c.num_hidden_layers)
    for name, t in tensors:
        if name.startswith("rope_factors"):
            w.add_tensor(f"{name}.weight", t.numpy())
            continue
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), t.float().numpy())
    finish_gguf(w, path)
