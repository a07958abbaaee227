//! Reading Phi-3 GGUF files (llama.cpp's `phi3`): the configuration from the metadata and the LongRoPE factors
//! from the `rope_factors_long` / `rope_factors_short` tensors, llama.cpp's tensor names mapped to Hugging Face's.
//! llama.cpp's converter keeps the fused `attn_qkv` and `ffn_up` (gate and up) as Hugging Face stores them.

use crate::load::gguf::GgufFile;
use crate::models::registry::{
    gguf_eps, gguf_factors, gguf_rotary_fraction, gguf_special_token_ids, gguf_tensor_name_in, gguf_vocab_size,
};
use crate::{Error, Result};

pub(super) fn gguf_config(f: &GgufFile) -> Result<serde_json::Value> {
    let a = f.architecture()?.to_string();
    let key = |k: &str| format!("{a}.{k}");
    let heads = f.get_u64(&key("attention.head_count"))?;
    let hidden = f.get_u64(&key("embedding_length"))?;
    if heads == 0 || hidden % heads != 0 {
        return Err(Error::config(&f.path, format!("embedding_length {hidden} is not a multiple of {heads} heads")));
    }
    let head_dim = hidden / heads;
    // llama.cpp writes int(partial_rotary_factor * hidden) / heads; transformers truncates head_dim * factor.
    let rotary = f.get_u64(&key("rope.dimension_count")).unwrap_or(head_dim);
    if rotary == 0 || rotary > head_dim || rotary % 2 != 0 {
        return Err(Error::config(
            &f.path,
            format!("{a}.rope.dimension_count is {rotary}; an even number up to head_dim {head_dim} was expected"),
        ));
    }
    let fraction = gguf_rotary_fraction(rotary, head_dim);
    if let Ok(t) = f.get_str(&key("rope.scaling.type")) {
        if t != "none" {
            return Err(Error::config(&f.path, format!("rope scaling type `{t}` in a phi3 GGUF is not supported")));
        }
    }
    let eps = gguf_eps(f, &key("attention.layer_norm_rms_epsilon"))?;
    let context = f.get_u64(&key("context_length"))?;
    let has = |name: &str| f.tensors.iter().any(|t| t.name == name);
    let mut c = serde_json::json!({
        "model_type": "phi3",
        "architectures": ["Phi3ForCausalLM"],
        "vocab_size": gguf_vocab_size(f)?,
        "hidden_size": hidden,
        "intermediate_size": f.get_u64(&key("feed_forward_length"))?,
        "num_hidden_layers": f.get_u64(&key("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": f.get_u64(&key("attention.head_count_kv")).unwrap_or(heads),
        "rms_norm_eps": eps,
        "max_position_embeddings": context,
        "original_max_position_embeddings": f.get_u64(&key("rope.scaling.original_context_length")).unwrap_or(context),
        "rope_theta": f.get_f64(&key("rope.freq_base")).unwrap_or(10000.0),
        "partial_rotary_factor": fraction,
        "tie_word_embeddings": !has("output.weight"),
        "hidden_act": "silu",
    });
    // llama.cpp's converter writes 0 for "no window" (Phi-4).
    if let Some(w) = f.get_u64(&key("attention.sliding_window")).ok().filter(|&w| w > 0) {
        c["sliding_window"] = w.into();
    }
    let what = "one per rotated frequency: rope.dimension_count / 2";
    let long = gguf_factors(f, "rope_factors_long.weight", rotary / 2, what)?;
    let short = gguf_factors(f, "rope_factors_short.weight", rotary / 2, what)?;
    match (long, short) {
        (Some(long), Some(short)) => {
            let mut rope = serde_json::json!({"rope_type": "longrope", "long_factor": long, "short_factor": short});
            if let Ok(factor) = f.get_f64(&key("rope.scaling.attn_factor")) {
                rope["attention_factor"] = factor.into();
            }
            c["rope_scaling"] = rope;
        }
        (None, None) => {}
        _ => {
            return Err(Error::config(
                &f.path,
                "LongRoPE needs both `rope_factors_long.weight` and `rope_factors_short.weight`; the file has one",
            ))
        }
    }
    gguf_special_token_ids(f, &mut c);
    Ok(c)
}

pub(super) fn gguf_tensor_name(name: &str) -> Option<String> {
    let whole = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        // Read into the configuration (`rope_scaling.long_factor` / `short_factor`) by `gguf_config`.
        ("rope_factors_long.weight", "model.rotary_emb.long_factor"),
        ("rope_factors_short.weight", "model.rotary_emb.short_factor"),
    ];
    let parts = [
        ("attn_norm", "input_layernorm"),
        ("attn_qkv", "self_attn.qkv_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_norm", "post_attention_layernorm"),
        ("ffn_up", "mlp.gate_up_proj"),
        ("ffn_down", "mlp.down_proj"),
    ];
    gguf_tensor_name_in(name, &whole, "model.layers", &parts)
}
