//! Reading Llama-family GGUF files (llama.cpp's layout): the configuration from the metadata (and Llama 3.1's
//! rope scaling from the `rope_freqs` tensor), llama.cpp's tensor names mapped to Hugging Face's, and the q/k rows
//! llama.cpp permuted for its rope layout put back. The families
//! that share Llama's stack (Qwen2, Qwen3) read their files with the same functions.

use crate::load::gguf::GgufFile;
use crate::models::registry::{gguf_factors, gguf_special_token_ids, gguf_tensor_name_in, gguf_vocab_size};
use crate::{Error, Result};
use tch::Tensor;

pub(super) fn gguf_config(f: &GgufFile) -> Result<serde_json::Value> {
    gguf_config_for(f, "llama", "LlamaForCausalLM")
}

/// The `config.json` equivalent of a Llama-shaped GGUF file's metadata (`{arch}.*` keys), for `model_type` and
/// the Hugging Face class `hf_class`.
pub(crate) fn gguf_config_for(f: &GgufFile, model_type: &str, hf_class: &str) -> Result<serde_json::Value> {
    let a = f.architecture()?.to_string();
    let key = |k: &str| format!("{a}.{k}");
    let heads = f.get_u64(&key("attention.head_count"))?;
    let hidden = f.get_u64(&key("embedding_length"))?;
    let vocab = gguf_vocab_size(f)?;
    let has = |name: &str| f.tensors.iter().any(|t| t.name == name);
    let tied = !has("output.weight");
    let mut c = serde_json::json!({
        "model_type": model_type,
        "architectures": [hf_class],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": f.get_u64(&key("feed_forward_length"))?,
        "num_hidden_layers": f.get_u64(&key("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": f.get_u64(&key("attention.head_count_kv")).unwrap_or(heads),
        "rms_norm_eps": f.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
        "rope_theta": f.get_f64(&key("rope.freq_base")).unwrap_or(10000.0),
        "tie_word_embeddings": tied,
        // No metadata key says so: the biases are there or not (Qwen2's q/k/v biases are its layout's anyway).
        "attention_bias": has("blk.0.attn_output.bias"),
        "mlp_bias": has("blk.0.ffn_down.bias"),
        "hidden_act": "silu",
    });
    if let Ok(ctx) = f.get_u64(&key("context_length")) {
        c["max_position_embeddings"] = ctx.into();
    }
    if let Ok(kl) = f.get_u64(&key("attention.key_length")) {
        c["head_dim"] = kl.into();
    }
    if let Ok(t) = f.get_str(&key("rope.scaling.type")) {
        if t == "linear" {
            c["rope_scaling"] =
                serde_json::json!({"rope_type": "linear", "factor": f.get_f64(&key("rope.scaling.factor"))?});
        } else if t != "none" {
            return Err(Error::config(&f.path, format!("rope scaling type `{t}` in GGUF is not supported")));
        }
    }
    // Llama 3.1+: the llama3 scaling as llama.cpp's converter stores it, one divisor per rotary frequency.
    let head_dim = c.get("head_dim").and_then(|v| v.as_u64()).unwrap_or(hidden / heads.max(1));
    if let Some(factors) = gguf_factors(f, "rope_freqs.weight", head_dim / 2, "one per rotary frequency: head_dim / 2")?
    {
        if c.get("rope_scaling").is_some() {
            return Err(Error::config(&f.path, "both `rope_freqs` and a rope scaling type in the GGUF metadata"));
        }
        c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "freq_factors": factors});
    }
    gguf_special_token_ids(f, &mut c);
    Ok(c)
}

/// The Hugging Face name of a llama.cpp tensor name (`blk.3.attn_q.weight`: `model.layers.3.self_attn.q_proj.weight`).
pub(crate) fn gguf_tensor_name(name: &str) -> Option<String> {
    let whole = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        // Read into the configuration (`rope_scaling.freq_factors`) by `gguf_config_for`.
        ("rope_freqs.weight", "model.rotary_emb.rope_freqs"),
    ];
    let parts = [
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("attn_q_norm", "self_attn.q_norm"),
        ("attn_k_norm", "self_attn.k_norm"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
        ("attn_norm", "input_layernorm"),
        ("ffn_norm", "post_attention_layernorm"),
    ];
    gguf_tensor_name_in(name, &whole, "model.layers", &parts)
}

/// llama.cpp's converter permuted the rows of q and k for its rotary layout; undo it per block of `n` heads:
/// reshape to `[n, rows / n / 2, 2, ...]`, swap axes 1 and 2, reshape back.
pub(super) fn gguf_fix_tensor(name: &str, t: Tensor, c: &serde_json::Value) -> Result<Tensor> {
    let n = if name.ends_with("self_attn.q_proj.weight") || name.ends_with("self_attn.q_proj.bias") {
        c["num_attention_heads"].as_i64()
    } else if name.ends_with("self_attn.k_proj.weight") || name.ends_with("self_attn.k_proj.bias") {
        c["num_key_value_heads"].as_i64()
    } else {
        None
    };
    let Some(n) = n else { return Ok(t) };
    let shape = t.size();
    let rows = shape[0];
    if n <= 0 || rows % (2 * n) != 0 {
        return Err(Error::ShapeMismatch { name: name.into(), expected: vec![2 * n], found: shape });
    }
    let mut split = vec![n, rows / n / 2, 2];
    split.extend_from_slice(&shape[1..]);
    t.f_reshape(split.as_slice())
        .and_then(|t| t.f_transpose(1, 2))
        .and_then(|t| t.f_reshape(shape.as_slice()))
        .map_err(|e| Error::torch(name, e))
}

/// The tensor as stored: llama.cpp's converter leaves the q/k rows of the Qwen families in Hugging Face's order.
pub(crate) fn gguf_keep_tensor(_name: &str, t: Tensor, _c: &serde_json::Value) -> Result<Tensor> {
    Ok(t)
}
