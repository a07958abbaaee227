#!/usr/bin/env python3
"""Write the tiny random Hugging Face checkpoints used by the Rust parity tests.

Run with the project's torch venv (scripts/setup.sh creates it):

    ~/.cache/nnsight-rs/venv-torch-2.13.0/bin/python scripts/make_tiny_models.py

It (re)writes, deterministically (fixed seeds, CPU, float32):

    tests/data/tiny-gpt2/   config.json, model.safetensors, tokenizer.json,
                            reference.safetensors, reference.json
    tests/data/tiny-llama/  config.json, model-0000k-of-0000n.safetensors (sharded),
                            model.safetensors.index.json, tokenizer.json,
                            reference.safetensors, reference.json

Other families (one `make_*` function each, see below) write tests/data/tiny-<family>/ the same way;
tiny-gpt-neox also gets tiny-gpt-neox.f32.gguf, the same weights as llama.cpp's converter lays them out.

All models share one tiny byte-level BPE tokenizer trained on the English text below.
Weights are drawn with a much larger spread than Hugging Face's default init (normal, std 0.2,
biases included; norm weights 1 +- 0.2) so that logits are far from uniform and a parity test
between implementations means something.

reference.safetensors holds, for the prompts P1 and P2 below (tokenizer adds no BOS/EOS):
    p{k}_input_ids      i64 [n]                 token ids of the prompt
    p{k}_logits         f32 [n, vocab]          model(input_ids).logits[0]
    p{k}_hidden_states  f32 [n_layers+1, n, h]  torch.stack(output_hidden_states=True tuple)[:, 0]
    p{k}_layer_outputs  f32 [n_layers, n, h]    output of each decoder block (residual stream
                                                after it, before any final norm), via hooks
    p{k}_final_norm_output f32 [n, h]           output of the final norm (ln_f / model.norm)
    p{k}_attn_probs     f32 [n_layers, heads, n, n]  each layer's attention probabilities (eager
                                                attention, output_attentions=True)
    p{k}_greedy         i64 [24]                greedy continuation (argmax of a full forward at each
                                                step, no cache, no stop token)
reference.json describes the same and records versions, max |logit| and each greedy step's margin
between the first and second logit (a tiny margin would make a parity test fragile).

A family is one `make_*` function: a config, `tiny(...)` to build, initialise, save and describe it. What the
families share lives beside this file: `tiny_common.py` (tokenizer, initialisation, references, `tiny`) and
`tiny_gguf.py` (the GGUF writers, transformers' own reading of a GGUF file).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_common import *  # noqa: E402,F401,F403
from tiny_gguf import *  # noqa: E402,F401,F403


def make_gpt2(tok: Tokenizer) -> None:
    out = fresh_dir(DATA / "tiny-gpt2")
    torch.manual_seed(0)
    eot = tok.token_to_id("<|endoftext|>")
    config = GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=None,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        bos_token_id=eot,
        eos_token_id=eot,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel._from_config(config, attn_implementation="eager", dtype=torch.float32)
    big_init(model, seed=1234)
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    tok.save(str(out / "tokenizer.json"))
    keys = state_dict_keys(out)
    reference(model, tok, out, {"state_dict_keys": keys})
    print(f"tiny-gpt2: vocab {config.vocab_size}, {sum(p.numel() for p in model.parameters()):,} params, "
          f"{len(keys)} state-dict keys")
    report(out)


def make_llama(tok: Tokenizer) -> None:
    out = fresh_dir(DATA / "tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=None,
    )
    model = LlamaForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
    big_init(model, seed=5678)
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="200KB")
    (out / "generation_config.json").unlink(missing_ok=True)
    shutil.copyfile(DATA / "tiny-gpt2" / "tokenizer.json", out / "tokenizer.json")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").exists(), "expected a sharded checkpoint"
    keys = state_dict_keys(out)
    saved_cfg = json.loads((out / "config.json").read_text())
    rope_fields = {k: v for k, v in saved_cfg.items() if "rope" in k or k == "max_position_embeddings"}
    # Show that llama3 scaling changes frequencies at these short positions.
    rot = model.model.rotary_emb
    inv_freq = rot.inv_freq.tolist()
    base = (1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))).tolist()
    reference(model, tok, out, {
        "state_dict_keys": keys,
        "shards": [s.name for s in shards],
        "rope_config_fields": rope_fields,
        "rope_inv_freq": inv_freq,
        "rope_inv_freq_unscaled": base,
        "rope_attention_scaling": float(getattr(rot, "attention_scaling", 1.0)),
    })
    print(f"tiny-llama: vocab {config.vocab_size}, {sum(p.numel() for p in model.parameters()):,} params, "
          f"{len(keys)} state-dict keys in {len(shards)} shards")
    print(f"  rope fields in config.json: {json.dumps(rope_fields)}")
    report(out)


def make_mistral(tok: Tokenizer) -> None:
    """A tiny Mistral: Llama's layout plus a sliding attention window (4 keys) shorter than prompt P1."""
    config = MistralConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        hidden_act="silu",
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        sliding_window=4,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=None,
    )
    tiny("tiny-mistral", tok, MistralForCausalLM, config, seed=9012, extra={"sliding_window": 4})


def make_gpt_neox(tok: Tokenizer) -> None:
    """Two tiny GPT-NeoX models. tiny-gpt-neox has Pythia's layout: parallel residual, a quarter of each head
    rotated (rotary_pct 0.25), exact GELU, biases, a separate head (`embed_out`); it also gets an F32 GGUF.
    tiny-gpt-neox-sequential has the sequential residual, half of each head rotated at another base, gelu_fast
    (GPT-NeoX-20B's), no attention biases and a tied head."""
    eot = tok.token_to_id("<|endoftext|>")
    shape = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=256, max_position_embeddings=128, layer_norm_eps=1e-5, bos_token_id=eot,
                 eos_token_id=eot)
    pythia = GPTNeoXConfig(**shape, hidden_act="gelu", rotary_pct=0.25, rotary_emb_base=10000.0,
                           use_parallel_residual=True, attention_bias=True, tie_word_embeddings=False)
    model = tiny("tiny-gpt-neox", tok, GPTNeoXForCausalLM, pythia, seed=3456,
                 extra={"rope_parameters": pythia.rope_parameters, "use_parallel_residual": True})
    write_gpt_neox_gguf(model, tok, DATA / "tiny-gpt-neox" / "tiny-gpt-neox.f32.gguf")
    sequential = GPTNeoXConfig(**shape, hidden_act="gelu_fast", rotary_pct=0.5, rotary_emb_base=500.0,
                               use_parallel_residual=False, attention_bias=False, tie_word_embeddings=True)
    tiny("tiny-gpt-neox-sequential", tok, GPTNeoXForCausalLM, sequential, seed=7895,
         extra={"rope_parameters": sequential.rope_parameters, "use_parallel_residual": False})


def make_qwen2(tok: Tokenizer) -> None:
    """A tiny Qwen2: biases on q/k/v (none on o), an untied head, rope_theta 1e6, and every layer's attention
    sliding over 4 keys (use_sliding_window from layer max_window_layers = 0 on), shorter than prompt P1."""
    config = Qwen2Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=0,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=None,
    )
    model = tiny("tiny-qwen2", tok, Qwen2ForCausalLM, config, seed=3456, extra={"layer_types": config.layer_types})
    # llama.cpp's qwen2 has no sliding window: the GGUF file attends to every key, as transformers' own GGUF
    # loading of it does (its reference, gguf_reference.safetensors).
    write_gguf(model, tok, DATA / "tiny-qwen2" / "tiny-qwen2.f32.gguf")
    transformers_gguf_reference(model, tok, DATA / "tiny-qwen2", "tiny-qwen2.f32.gguf")


def make_qwen3(tok: Tokenizer) -> None:
    """A tiny Qwen3: q/k RMSNorms per head, biases on all four attention projections (attention_bias), head_dim 32
    (not hidden / heads = 16), a head tied to the embeddings, rope_theta 5e5; also written as a GGUF file
    (tests/data/tiny-qwen3/tiny-qwen3.f32.gguf)."""
    config = Qwen3Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        hidden_act="silu",
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=None,
    )
    model = tiny("tiny-qwen3", tok, Qwen3ForCausalLM, config, seed=7895)
    write_gguf(model, tok, DATA / "tiny-qwen3" / "tiny-qwen3.f32.gguf")


def gemma_shape(tok: Tokenizer, layers: int) -> dict:
    """The sizes both tiny Gemmas share: grouped-query attention (4 heads, 2 key/value heads) of head_dim 24 (not
    hidden / heads = 16), a window of 4 keys, a tied head, the tanh GELU."""
    return dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=24, hidden_activation="gelu_pytorch_tanh",
                max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=True, sliding_window=4,
                bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"), pad_token_id=None)


def make_gemma2(tok: Tokenizer) -> None:
    """A tiny Gemma 2: local (sliding over 4 keys, shorter than prompt P1) and global layers alternating (the
    default `layer_types`), grouped-query attention with head_dim 24 (not hidden / heads = 16),
    query_pre_attn_scalar 256 (not head_dim), the default soft caps (attention 50, final 30) made to bite by
    larger q/k weights and a larger final norm (see reference.json: the largest scores and logits before the caps),
    a head tied to the embeddings. Also written as tiny-gemma2.f32.gguf, which transformers reads back too: its
    logits are gguf_reference.safetensors."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    config = Gemma2Config(
        **gemma_shape(tok, layers=2),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        query_pre_attn_scalar=256,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    )

    def adjust(model):
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(3.0)
            layer.self_attn.k_proj.weight.mul_(3.0)
        model.model.norm.weight.add_(4.0)

    extra = {"layer_types": config.layer_types}
    model = tiny("tiny-gemma2", tok, Gemma2ForCausalLM, config, seed=2468, extra=extra, adjust=adjust)
    out = DATA / "tiny-gemma2"
    caps = uncapped_extremes(model, tok)
    info = json.loads((out / "reference.json").read_text())
    info["before_soft_caps"] = caps
    (out / "reference.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"  before the caps: {caps}")
    write_gemma_gguf(model, tok, out / "tiny-gemma2.f32.gguf")
    transformers_gguf_reference(model, tok, out, "tiny-gemma2.f32.gguf")


def make_gemma3(tok: Tokenizer) -> None:
    """A tiny Gemma 3 (text): q/k norms per head, three layers (sliding, sliding, global: `layer_types`) with a
    window of 4, local and global rotary bases (10000; 100 with linear scaling by 4 on the global layer),
    head_dim 24 (not hidden / heads = 16), query_pre_attn_scalar 32, a final soft cap of 8 that bites, an
    `attn_logit_softcapping` of 5 that transformers' Gemma 3 does not apply (so neither may we), a tied head. Also
    written as tiny-gemma3.f32.gguf (transformers' GGUF reader takes neither the rope scaling nor the final cap
    of a gemma3 file, so it has no reference of its own)."""
    from transformers import Gemma3TextConfig, Gemma3ForCausalLM
    config = Gemma3TextConfig(
        **gemma_shape(tok, layers=3),
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=32,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=8.0,
    )
    extra = {"layer_types": config.layer_types, "rope_parameters": config.rope_parameters}
    model = tiny("tiny-gemma3", tok, Gemma3ForCausalLM, config, seed=1357, extra=extra)
    write_gemma_gguf(model, tok, DATA / "tiny-gemma3" / "tiny-gemma3.f32.gguf")


@torch.no_grad()
def uncapped_extremes(model, tok: Tokenizer) -> dict:
    """The largest |attention score| and |logit| of prompt P1 before the soft caps (the caps bite where these
    exceed them)."""
    import transformers.models.gemma2.modeling_gemma2 as gemma2
    ids = torch.tensor([tok.encode(PROMPTS["p1"]).ids])
    scores = []
    eager = gemma2.eager_attention_forward

    def record(module, q, k, v, mask, dropout=0.0, scaling=None, softcap=None, **kw):
        keys = gemma2.repeat_kv(k, module.num_key_value_groups)
        scores.append(float((torch.matmul(q, keys.transpose(2, 3)) * scaling).abs().max()))
        return eager(module, q, k, v, mask, dropout, scaling, softcap, **kw)

    gemma2.eager_attention_forward = record
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        gemma2.eager_attention_forward = eager
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    return {"max_abs_attention_score": max(scores), "max_abs_logit": float(model.lm_head(hidden).abs().max())}


def make_llama_rope_freqs_gguf(tok: Tokenizer) -> None:
    """tests/data/tiny-llama/tiny-llama.f32.gguf: tiny-llama (llama3 rope scaling, original context 16, biases)
    as llama.cpp's converter writes a Llama 3.1: q/k rows permuted for its rope layout, and the scaling as the
    `rope_freqs` tensor (no rope metadata)."""
    import gguf
    model = LlamaForCausalLM.from_pretrained(str(DATA / "tiny-llama"), dtype=torch.float32).eval()
    c = model.config
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
    head_dim = c.hidden_size // heads
    path = DATA / "tiny-llama" / "tiny-llama.f32.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    add_gguf_tokenizer(w, tok, c)

    def permute(t: torch.Tensor, n: int) -> torch.Tensor:
        return t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    w.add_tensor("rope_freqs.weight", llama_rope_freqs(c.rope_parameters, head_dim).numpy())
    for name, t in sorted(model.state_dict().items()):
        t = t.float()
        if ".q_proj." in name:
            t = permute(t, heads)
        elif ".k_proj." in name:
            t = permute(t, kv_heads)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), t.contiguous().numpy())
    finish_gguf(w, path)


# Phi-3: the tiny model's rotary settings. Half of each 16-wide head is rotated (8 values: 4 frequencies); the
# factors divide those 4 frequencies (short ones at or below `original_max_position_embeddings`, long ones beyond).
PHI3_SHORT_FACTOR = [1.0, 1.25, 1.5, 2.0]


PHI3_LONG_FACTOR = [1.0, 3.0, 9.0, 27.0]


def phi3_config(tok: Tokenizer, **changes):
    """A tiny Phi-3: fused qkv_proj (4 query heads, 2 key/value heads) and gate_up_proj, half of each head rotated
    (partial_rotary_factor 0.5), longrope scaling with original_max_position_embeddings 2 and
    max_position_embeddings 8 (so that both prompts, 20 and 3 tokens, use the long factors, and the attention
    factor is sqrt(1 + ln 4 / ln 2)), a sliding window of 6 keys (shorter than P1), an untied head."""
    from transformers import Phi3Config
    fields = dict(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=8,
        original_max_position_embeddings=2,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "short_factor": PHI3_SHORT_FACTOR, "long_factor": PHI3_LONG_FACTOR},
        sliding_window=6,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=None,
    )
    fields.update(changes)
    return Phi3Config(**fields)


def phi3_twin(model, config):
    """`model`'s weights under another Phi-3 `config` (eager attention, eval)."""
    from transformers import Phi3ForCausalLM
    twin = Phi3ForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def make_phi3(tok: Tokenizer) -> None:
    """tests/data/tiny-phi3: the Phi-3 of `phi3_config` with its reference; `switch.safetensors`, the same weights
    with original_max_position_embeddings 16 (P2 starts on the short factors and crosses to the long ones while
    generating; P1 is long); tiny-phi3.f32.gguf, as llama.cpp's converter writes a `phi3` (rope_factors_long/short,
    the original context and the attention factor in the metadata); tiny-phi3-plain.f32.gguf, the same weights
    with what transformers' GGUF reader keeps of a phi3 file (no rope scaling, whole heads rotated, no window), and
    plain-reference.safetensors, the logits transformers computes on that file."""
    from transformers import AutoModelForCausalLM, Phi3ForCausalLM
    config = phi3_config(tok)
    model = tiny("tiny-phi3", tok, Phi3ForCausalLM, config, seed=2468, extra={
        "rope_parameters": config.rope_parameters,
        "original_max_position_embeddings": config.original_max_position_embeddings,
        "sliding_window": config.sliding_window,
        "attention_scaling": float(model_rotary(config).attention_scaling),
    })
    out = DATA / "tiny-phi3"
    # Both regimes and the switch between them: transformers' generate() with a cache drops the cache when the
    # sequence first outgrows original_max_position_embeddings and recomputes it with the long factors, so its
    # continuation equals the uncached one.
    switch_cfg = phi3_config(tok, original_max_position_embeddings=16)
    twin = phi3_twin(model, switch_cfg)
    tensors, info = {}, {"original_max_position_embeddings": 16}
    for key, text in PROMPTS.items():
        ids = tok.encode(text).ids
        input_ids = torch.tensor([ids], dtype=torch.long)
        with torch.no_grad():
            tensors[f"{key}_logits"] = twin(input_ids=input_ids, use_cache=False).logits[0].float().contiguous()
            cached = twin.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=GREEDY_TOKENS,
                                   do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
        uncached = greedy_no_cache(twin, ids, GREEDY_TOKENS)
        assert cached[0, len(ids):].tolist() == uncached, f"{key}: cached and uncached greedy differ"
        tensors[f"{key}_greedy"] = torch.tensor(uncached, dtype=torch.long)
        info[key] = {"tokens": len(ids), "greedy_ids": uncached}
    save_safetensors_sorted(tensors, out / "switch.safetensors", {"original_max_position_embeddings": "16"})
    (out / "switch.json").write_text(json.dumps(info, indent=2) + "\n")
    write_phi3_gguf(model, tok, out / "tiny-phi3.f32.gguf")
    # What transformers' GGUF reader makes of a phi3 file: check, then record its logits on the plain twin's file.
    plain = phi3_twin(model, phi3_config(tok, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                         sliding_window=None))
    write_phi3_gguf(plain, tok, out / "tiny-phi3-plain.f32.gguf")
    hf_gguf = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="tiny-phi3-plain.f32.gguf",
                                                   dtype=torch.float32, attn_implementation="eager").eval()
    tensors = {}
    for key, text in PROMPTS.items():
        input_ids = torch.tensor([tok.encode(text).ids], dtype=torch.long)
        with torch.no_grad():
            logits = hf_gguf(input_ids=input_ids, use_cache=False).logits[0].float().contiguous()
            want = plain(input_ids=input_ids, use_cache=False).logits[0].float()
        assert (logits - want).abs().max() < 1e-4, f"{key}: transformers' GGUF phi3 differs from the plain twin"
        tensors[f"{key}_logits"] = logits
    save_safetensors_sorted(tensors, out / "plain-reference.safetensors",
                            {"what": "logits of transformers' GGUF loading of tiny-phi3-plain.f32.gguf"})
    report(out)


def model_rotary(config):
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
    return Phi3RotaryEmbedding(config)


def main() -> None:
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    DATA.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    print(f"tokenizer: {tok.get_vocab_size()} tokens; P1 -> {tok.encode(PROMPTS['p1']).ids}; "
          f"P2 -> {tok.encode(PROMPTS['p2']).ids}")
    make_gpt2(tok)
    make_llama(tok)
    make_mistral(tok)
    make_gpt_neox(tok)
    make_qwen2(tok)
    make_qwen3(tok)
    make_gemma2(tok)
    make_gemma3(tok)
    make_llama_rope_freqs_gguf(tok)
    make_phi3(tok)


if __name__ == "__main__":
    main()
