//! Reading GPT-NeoX GGUF files (llama.cpp's `gptneox`): the configuration from the metadata, llama.cpp's tensor
//! names mapped to Hugging Face's, and the fused q/k/v rows that llama.cpp's converter regrouped (all queries,
//! then all keys, then all values) put back in Hugging Face's order (each head's query, key and value in turn).

use crate::load::gguf::{GgufFile, MetaValue};
use crate::models::registry::{
    gguf_eps, gguf_rotary_fraction, gguf_special_token_ids, gguf_tensor_name_in, gguf_vocab_size,
};
use crate::{Error, Result};
use tch::Tensor;

pub(super) fn gguf_config(f: &GgufFile) -> Result<serde_json::Value> {
    let a = f.architecture()?.to_string();
    let key = |k: &str| format!("{a}.{k}");
    let heads = f.get_u64(&key("attention.head_count"))?;
    let hidden = f.get_u64(&key("embedding_length"))?;
    if heads == 0 || hidden % heads != 0 {
        return Err(Error::config(&f.path, format!("embedding_length {hidden} is not a multiple of {heads} heads")));
    }
    let head_dim = hidden / heads;
    let rotary = f.get_u64(&key("rope.dimension_count"))?;
    let pct = gguf_rotary_fraction(rotary, head_dim);
    if let Ok(t) = f.get_str(&key("rope.scaling.type")) {
        if t != "none" {
            return Err(Error::config(&f.path, format!("rope scaling type `{t}` in a gptneox GGUF is not supported")));
        }
    }
    let eps = gguf_eps(f, &key("attention.layer_norm_epsilon"))?;
    let has = |name: &str| f.tensors.iter().any(|t| t.name == name);
    let mut c = serde_json::json!({
        "model_type": "gpt_neox",
        "architectures": ["GPTNeoXForCausalLM"],
        "vocab_size": gguf_vocab_size(f)?,
        "hidden_size": hidden,
        "intermediate_size": f.get_u64(&key("feed_forward_length"))?,
        "num_hidden_layers": f.get_u64(&key("block_count"))?,
        "num_attention_heads": heads,
        "layer_norm_eps": eps,
        "use_parallel_residual": f.get(&key("use_parallel_residual")).and_then(MetaValue::as_bool).unwrap_or(true),
        "rotary_pct": pct,
        "rotary_emb_base": f.get_f64(&key("rope.freq_base")).unwrap_or(10000.0),
        "attention_bias": has("blk.0.attn_qkv.bias"),
        "tie_word_embeddings": !has("output.weight"),
        "hidden_act": "gelu",
    });
    if let Ok(ctx) = f.get_u64(&key("context_length")) {
        c["max_position_embeddings"] = ctx.into();
    }
    gguf_special_token_ids(f, &mut c);
    Ok(c)
}

pub(super) fn gguf_tensor_name(name: &str) -> Option<String> {
    let whole = [
        ("token_embd.weight", "gpt_neox.embed_in.weight"),
        ("output_norm.weight", "gpt_neox.final_layer_norm.weight"),
        ("output_norm.bias", "gpt_neox.final_layer_norm.bias"),
        ("output.weight", "embed_out.weight"),
    ];
    let parts = [
        ("attn_norm", "input_layernorm"),
        ("attn_qkv", "attention.query_key_value"),
        ("attn_output", "attention.dense"),
        ("ffn_norm", "post_attention_layernorm"),
        ("ffn_up", "mlp.dense_h_to_4h"),
        ("ffn_down", "mlp.dense_4h_to_h"),
    ];
    gguf_tensor_name_in(name, &whole, "gpt_neox.layers", &parts)
}

/// llama.cpp's converter regrouped the rows of `query_key_value` from `[heads, 3, head_dim]` to
/// `[3, heads, head_dim]`; swap the two axes back.
pub(super) fn gguf_fix_tensor(name: &str, t: Tensor, c: &serde_json::Value) -> Result<Tensor> {
    if !name.ends_with("attention.query_key_value.weight") && !name.ends_with("attention.query_key_value.bias") {
        return Ok(t);
    }
    let heads = c["num_attention_heads"].as_i64().unwrap_or(0);
    let shape = t.size();
    let rows = shape[0];
    if heads <= 0 || rows % (3 * heads) != 0 {
        return Err(Error::ShapeMismatch { name: name.into(), expected: vec![3 * heads], found: shape });
    }
    let mut split = vec![3, heads, rows / 3 / heads];
    split.extend_from_slice(&shape[1..]);
    t.f_reshape(split.as_slice())
        .and_then(|t| t.f_transpose(0, 1))
        .and_then(|t| t.f_reshape(shape.as_slice()))
        .map_err(|e| Error::torch(name, e))
}
