//! Qwen2 and Qwen2.5: Llama's layout (RMSNorm, rotary position embeddings, grouped-query attention, a SwiGLU MLP,
//! tied or separate `lm_head`) with biases on the q, k and v projections and none on o, and an optional sliding
//! attention window on every layer or on some (`layer_types`). Also the configuration Qwen3 shares
//! ([`QwenConfig`]).
//!
//! Paper: Qwen Team, *Qwen2 Technical Report* (2024), <https://arxiv.org/abs/2407.10671>; *Qwen2.5 Technical
//! Report* (2024), <https://arxiv.org/abs/2412.15115>. Reference implementation: Hugging Face transformers'
//! `models/qwen2/modeling_qwen2.py` and `configuration_qwen2.py`, whose module names and nesting this file mirrors
//! (`model.layers.5.self_attn.q_proj`), built from the decoder stack Llama's file writes
//! ([`decoder_stack!`](super::llama)).

use super::llama::{
    decoder_stack, gguf_config_for, gguf_keep_tensor, gguf_tensor_name, LlamaAttention, LlamaConfig, StackConfig,
};
use super::{GgufSupport, RawConfig};
use crate::load::gguf::GgufFile;
use crate::load::Weights;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// A Qwen2 / Qwen2.5 / Qwen3 `config.json`: Llama's fields and the sliding-window settings, normalized as
/// transformers' `Qwen2Config` and `Qwen3Config` do when they load it: `sliding_window` is kept only under
/// `use_sliding_window` (4096 when absent), `layer_types` is derived when absent (sliding attention from layer
/// `max_window_layers` on, when there is a window), and a Qwen3 config without `head_dim` has 128. Each layer
/// attends as its `layer_types` entry says: within the window or to every earlier key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QwenConfig {
    /// The fields Llama has (sizes, norms, rotary settings, `attention_bias` (Qwen3 only: Qwen2 has biases on q, k
    /// and v and none on o), `sliding_window`).
    #[serde(flatten)]
    pub llama: LlamaConfig,
    /// Whether `sliding_window` applies at all.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// The first layer with sliding-window attention, when `layer_types` is absent.
    #[serde(default = "default_max_window_layers")]
    pub max_window_layers: i64,
    /// Each layer's attention: `full_attention` or `sliding_attention`.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
}

fn default_max_window_layers() -> i64 {
    28
}

impl QwenConfig {
    /// Each layer's sliding window (`None`: full attention).
    pub fn layer_windows(&self) -> Vec<Option<i64>> {
        let types = self.layer_types.as_deref().unwrap_or_default();
        types.iter().map(|t| if t == "sliding_attention" { self.llama.sliding_window } else { None }).collect()
    }

    /// Whether layer `layer` attends within the sliding window.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.layer_windows().get(layer).copied().flatten().is_some()
    }

    fn validate(&self, source: &std::path::Path) -> Result<()> {
        self.llama.validate(source)?;
        let bad = |m: String| Err(Error::config(source, m));
        let types = self.layer_types.as_deref().unwrap_or_default();
        if types.len() as i64 != self.llama.num_hidden_layers {
            return bad(format!(
                "`layer_types` lists {} layers, `num_hidden_layers` is {}",
                types.len(),
                self.llama.num_hidden_layers
            ));
        }
        if let Some(t) = types.iter().find(|t| *t != "full_attention" && *t != "sliding_attention") {
            return bad(format!("layer type `{t}` is not supported (full_attention, sliding_attention)"));
        }
        if types.iter().any(|t| t == "sliding_attention") && self.llama.sliding_window.is_none() {
            return bad("`layer_types` has sliding_attention layers but there is no `sliding_window` (or \
                        `use_sliding_window` is false)"
                .into());
        }
        Ok(())
    }
}

impl StackConfig for QwenConfig {
    fn from_raw(raw: &RawConfig) -> Result<Self> {
        let mut c: QwenConfig = raw.parse()?;
        let json = &raw.json;
        // transformers' dataclass defaults and __post_init__.
        if json.get("sliding_window").is_none() {
            c.llama.sliding_window = Some(4096);
        }
        if !c.use_sliding_window {
            c.llama.sliding_window = None;
        }
        if json.get("head_dim").is_none() && raw.model_type()? == "qwen3" {
            c.llama.head_dim = Some(128);
        }
        if c.layer_types.is_none() {
            let sliding = |i: i64| c.llama.sliding_window.is_some() && i >= c.max_window_layers;
            let types = (0..c.llama.num_hidden_layers)
                .map(|i| if sliding(i) { "sliding_attention" } else { "full_attention" }.to_string());
            c.layer_types = Some(types.collect());
        }
        c.validate(&raw.source)?;
        Ok(c)
    }
    fn llama(&self) -> &LlamaConfig {
        &self.llama
    }
    fn window(&self) -> Option<i64> {
        // One window for every layer that slides.
        self.layer_windows().into_iter().flatten().next()
    }
}

/// Qwen2's attention: Llama's, with biases on q, k and v and none on o, sliding where `layer_types` says so.
fn qwen2_attention(w: &mut Weights, path: &str, c: &QwenConfig, layer: usize) -> Result<LlamaAttention> {
    Ok(LlamaAttention::load(w, path, &c.llama, layer, "Qwen2Attention", (true, false))?
        .with_sliding(c.is_sliding(layer)))
}

decoder_stack! {
    /// `Qwen2ForCausalLM` (Qwen2, Qwen2.5): the decoder stack and the language-model head. Its attention modules
    /// are [`LlamaAttention`]s (printed `Qwen2Attention`), with the same inner points.
    root: Qwen2 = "Qwen2ForCausalLM", architecture "qwen2",
    model: Qwen2Model = "Qwen2Model",
    layer: Qwen2DecoderLayer = "Qwen2DecoderLayer",
    attention: LlamaAttention = qwen2_attention,
    mlp: "Qwen2MLP",
    config: QwenConfig,
}

fn gguf_config(f: &GgufFile) -> Result<serde_json::Value> {
    gguf_config_for(f, "qwen2", "Qwen2ForCausalLM")
}

inventory::submit! {
    super::Architecture {
        name: "qwen2",
        model_types: &["qwen2"],
        hf_class: "Qwen2ForCausalLM",
        build: super::build_boxed::<Qwen2>,
        gguf: Some(GgufSupport {
            architectures: &["qwen2"],
            config: gguf_config,
            tensor_name: gguf_tensor_name,
            fix_tensor: gguf_keep_tensor,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `config.json` of a 4-layer model with `fields` added, read as transformers would.
    fn read(model_type: &str, fields: serde_json::Value) -> Result<QwenConfig> {
        let mut j = json!({
            "model_type": model_type, "vocab_size": 10, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        });
        j.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
        QwenConfig::from_raw(&RawConfig { source: "config.json".into(), json: j })
    }

    #[test]
    fn a_qwen2_5_config_has_full_attention_everywhere() {
        // Qwen2.5-0.5B's settings: a window that use_sliding_window turns off.
        let c = read("qwen2", json!({"sliding_window": 32768, "use_sliding_window": false, "max_window_layers": 21}))
            .unwrap();
        assert_eq!(c.layer_windows(), [None; 4]);
        assert_eq!((c.window(), c.llama.sliding_window, c.llama.head_dim()), (None, None, 16));
    }

    #[test]
    fn use_sliding_window_slides_from_max_window_layers_on() {
        let c =
            read("qwen2", json!({"sliding_window": 8, "use_sliding_window": true, "max_window_layers": 0})).unwrap();
        assert_eq!((c.layer_windows(), c.window()), (vec![Some(8); 4], Some(8)));
        // transformers' default window when the key is absent.
        let c = read("qwen2", json!({"use_sliding_window": true, "max_window_layers": 0})).unwrap();
        assert_eq!(c.window(), Some(4096));
        let c =
            read("qwen2", json!({"sliding_window": 8, "use_sliding_window": true, "max_window_layers": 4})).unwrap();
        assert_eq!(c.window(), None);
    }

    #[test]
    fn a_window_on_some_layers_only_slides_those_layers() {
        let c =
            read("qwen2", json!({"sliding_window": 8, "use_sliding_window": true, "max_window_layers": 2})).unwrap();
        assert_eq!((c.layer_windows(), c.window()), (vec![None, None, Some(8), Some(8)], Some(8)));
        assert_eq!((0..4).map(|i| c.is_sliding(i)).collect::<Vec<_>>(), [false, false, true, true]);
        let types = ["full_attention", "sliding_attention", "full_attention", "full_attention"];
        let c = read("qwen2", json!({"sliding_window": 8, "use_sliding_window": true, "layer_types": types})).unwrap();
        assert_eq!(c.layer_windows(), [None, Some(8), None, None]);
    }

    #[test]
    fn a_sliding_layer_without_a_window_or_an_unknown_layer_type_is_refused() {
        let sliding = vec!["sliding_attention"; 4];
        let e = read("qwen2", json!({"layer_types": sliding})).unwrap_err().to_string();
        assert!(e.contains("no `sliding_window`"), "{e}");
        let chunked = vec!["chunked_attention"; 4];
        let e = read("qwen2", json!({"layer_types": chunked})).unwrap_err().to_string();
        assert!(e.contains("`chunked_attention`"), "{e}");
        let e = read("qwen2", json!({"layer_types": ["full_attention"]})).unwrap_err().to_string();
        assert!(e.contains("lists 1 layers, `num_hidden_layers` is 4"), "{e}");
    }

    #[test]
    fn a_qwen3_config_without_head_dim_has_128() {
        assert_eq!(read("qwen3", json!({})).unwrap().llama.head_dim(), 128);
        assert_eq!(read("qwen3", json!({"head_dim": 32})).unwrap().llama.head_dim(), 32);
    }
}
