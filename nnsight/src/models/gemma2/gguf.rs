//! Reading Gemma 2 and Gemma 3 GGUF files (llama.cpp's `gemma2`, `gemma3`): the configuration from the metadata,
//! llama.cpp's tensor names mapped to Hugging Face's, and the norm weights put back: llama.cpp's converter stores
//! every Gemma norm weight as `1 + w` (its norms multiply by the stored weight), and transformers' GGUF reader
//! subtracts the 1 again, as this one does.
//!
//! What llama.cpp derives from the model size rather than reading it, this reader takes from the keys llama.cpp
//! defines when a file has them, else as llama.cpp derives it: the attention scale (`attention.scale`, else
//! `head_dim^-0.5`, or `(hidden / heads)^-0.5` for the 27B models), which layers slide
//! (`attention.sliding_window_pattern`, else every second layer of Gemma 2 and five of six of Gemma 3), the soft
//! caps (`attn_logit_softcapping`, `final_logit_softcapping`; Gemma 2 defaults to 50 and 30), Gemma 3's local
//! rotary base (`rope.freq_base_swa`, else 10000) and its global linear scaling.

use crate::load::gguf::{GgufFile, MetaValue};
use crate::models::registry::{gguf_special_token_ids, gguf_tensor_name_in, gguf_vocab_size};
use crate::models::GgufSupport;
use crate::{Error, Result};
use serde_json::{json, Value};
use tch::Tensor;

/// The GGUF support of the Gemma family that reads `general.architecture` values `architectures`.
pub(crate) const fn gemma_gguf(architectures: &'static [&'static str]) -> GgufSupport {
    GgufSupport { architectures, config: gguf_config, tensor_name: gguf_tensor_name, fix_tensor: gguf_fix_tensor }
}

/// A float32 metadata value as the decimal it rounds (1e-6, not 9.99999997e-7).
fn decimal(v: f64) -> f64 {
    (v as f32).to_string().parse::<f64>().unwrap_or(v)
}

fn gguf_config(f: &GgufFile) -> Result<Value> {
    let a = f.architecture()?.to_string();
    let gemma3 = a == "gemma3";
    let key = |k: &str| format!("{a}.{k}");
    let float = |k: &str| f.get(&key(k)).and_then(MetaValue::as_f64).map(decimal);
    let heads = f.get_u64(&key("attention.head_count"))?;
    let hidden = f.get_u64(&key("embedding_length"))?;
    let layers = f.get_u64(&key("block_count"))?;
    if heads == 0 {
        return Err(Error::config(&f.path, format!("{a}: `attention.head_count` is 0")));
    }
    let head_dim = f.get_u64(&key("attention.key_length")).unwrap_or(hidden / heads);
    // llama.cpp: 1/sqrt(head_dim), but 1/sqrt(hidden / heads) for the 27B models (46 layers of Gemma 2, 62 of
    // Gemma 3).
    let big = layers == (if gemma3 { 62 } else { 46 });
    let scalar = match float("attention.scale") {
        Some(s) if s > 0.0 => {
            let q = 1.0 / (s * s);
            if (q - q.round()).abs() < 1e-3 {
                q.round()
            } else {
                q
            }
        }
        Some(s) => return Err(Error::config(&f.path, format!("{a}.attention.scale must be positive, not {s}"))),
        None if big => (hidden / heads) as f64,
        None => head_dim as f64,
    };
    let pattern = match f.get(&key("attention.sliding_window_pattern")) {
        Some(MetaValue::Array(flags)) => flags
            .iter()
            .map(|b| {
                b.as_bool().ok_or_else(|| {
                    Error::config(&f.path, format!("{a}.attention.sliding_window_pattern: not booleans"))
                })
            })
            .collect::<Result<Vec<bool>>>()?,
        Some(v) => {
            let n = v.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                Error::config(&f.path, format!("{a}.attention.sliding_window_pattern: not a positive period"))
            })?;
            (0..layers).map(|i| (i + 1) % n != 0).collect()
        }
        None => (0..layers).map(|i| (i + 1) % if gemma3 { 6 } else { 2 } != 0).collect(),
    };
    let layer_types: Vec<&str> =
        pattern.iter().map(|&s| if s { "sliding_attention" } else { "full_attention" }).collect();
    let has = |name: &str| f.tensors.iter().any(|t| t.name == name);
    let mut c = json!({
        "model_type": if gemma3 { "gemma3_text" } else { "gemma2" },
        "architectures": [if gemma3 { "Gemma3ForCausalLM" } else { "Gemma2ForCausalLM" }],
        "vocab_size": gguf_vocab_size(f)?,
        "hidden_size": hidden,
        "intermediate_size": f.get_u64(&key("feed_forward_length"))?,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": f.get_u64(&key("attention.head_count_kv")).unwrap_or(heads),
        "head_dim": head_dim,
        "rms_norm_eps": decimal(f.get_f64(&key("attention.layer_norm_rms_epsilon"))?),
        "query_pre_attn_scalar": scalar,
        "sliding_window": f.get_u64(&key("attention.sliding_window")).unwrap_or(4096),
        "layer_types": layer_types,
        "tie_word_embeddings": !has("output.weight"),
        "attention_bias": has("blk.0.attn_q.bias"),
        "hidden_activation": "gelu_pytorch_tanh",
        "attn_logit_softcapping": float("attn_logit_softcapping").or(if gemma3 { None } else { Some(50.0) }),
        "final_logit_softcapping": float("final_logit_softcapping").or(if gemma3 { None } else { Some(30.0) }),
    });
    if let Ok(ctx) = f.get_u64(&key("context_length")) {
        c["max_position_embeddings"] = ctx.into();
    }
    let mut global = json!({"rope_type": "default", "rope_theta": float("rope.freq_base").unwrap_or(if gemma3 { 1e6 } else { 1e4 })});
    if let Ok(t) = f.get_str(&key("rope.scaling.type")) {
        match t {
            "linear" => {
                let factor = float("rope.scaling.factor").ok_or_else(|| {
                    Error::config(&f.path, format!("{a}: linear rope scaling without `rope.scaling.factor`"))
                })?;
                global["rope_type"] = "linear".into();
                global["factor"] = factor.into();
            }
            "none" => {}
            other => {
                return Err(Error::config(
                    &f.path,
                    format!("rope scaling type `{other}` in a {a} GGUF is not supported"),
                ))
            }
        }
    }
    c["rope_parameters"] = match gemma3 {
        true => json!({
            "full_attention": global,
            "sliding_attention": {"rope_type": "default", "rope_theta": float("rope.freq_base_swa").unwrap_or(1e4)},
        }),
        false => global,
    };
    gguf_special_token_ids(f, &mut c);
    Ok(c)
}

/// The Hugging Face name of a llama.cpp tensor name: Llama's, but for the norms around attention and MLP
/// (`post_attention_norm`, `ffn_norm` before the MLP, `post_ffw_norm`).
fn gguf_tensor_name(name: &str) -> Option<String> {
    let parts = [
        ("post_attention_norm", "post_attention_layernorm"),
        ("ffn_norm", "pre_feedforward_layernorm"),
        ("post_ffw_norm", "post_feedforward_layernorm"),
    ];
    gguf_tensor_name_in(name, &[], "model.layers", &parts).or_else(|| crate::models::llama::gguf_tensor_name(name))
}

/// Norm weights were stored as `1 + w`: subtract the 1 (as transformers' GGUF reader does, for every name ending
/// in `norm.weight`).
fn gguf_fix_tensor(name: &str, t: Tensor, _c: &Value) -> Result<Tensor> {
    match name.ends_with("norm.weight") {
        true => t.f_sub_scalar(1.0).map_err(|e| Error::torch(name, e)),
        false => Ok(t),
    }
}
