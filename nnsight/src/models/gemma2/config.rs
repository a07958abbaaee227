//! The configuration of Gemma 2 and Gemma 3 (text): `config.json` as transformers' `Gemma2Config` and
//! `Gemma3TextConfig` read it, their defaults and derived fields included (`layer_types` from the window pattern,
//! Gemma 3's per-layer-type rotary settings from `rope_parameters` or the older `rope_theta`,
//! `rope_local_base_freq` and `rope_scaling`).

use crate::models::rope::RopeScaling;
use crate::models::RawConfig;
use crate::nn::ActivationFn;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Which of the two families a [`GemmaConfig`] describes (their defaults differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GemmaFamily {
    /// Gemma 2 (`model_type` `gemma2`).
    Gemma2,
    /// Gemma 3, the text model (`model_type` `gemma3_text`).
    Gemma3,
}

/// A Gemma 2 or Gemma 3 (text) `config.json`, with transformers' defaults filled in where a key is absent
/// (`head_dim` 256, `query_pre_attn_scalar` 256, `sliding_window` 4096, a tied head, and Gemma 2's soft caps 50
/// and 30) and the derived fields resolved by [`GemmaConfig::from_raw`]. `attention_dropout` is ignored: this
/// runtime does inference.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GemmaConfig {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Width of the residual stream.
    pub hidden_size: i64,
    /// Width of the MLP.
    pub intermediate_size: i64,
    /// Number of decoder layers.
    pub num_hidden_layers: i64,
    /// Number of query heads.
    pub num_attention_heads: i64,
    /// Number of key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    /// Width of one head (256 when absent, as transformers' default; not `hidden_size / heads`).
    #[serde(default)]
    pub head_dim: Option<i64>,
    /// Activation of the MLP's gate (`gelu_pytorch_tanh`); older files name it `hidden_act`.
    #[serde(default)]
    pub hidden_activation: Option<String>,
    /// The older name of the activation.
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Attention scores are scaled by `query_pre_attn_scalar^-0.5` (not `head_dim^-0.5`).
    #[serde(default = "default_scalar")]
    pub query_pre_attn_scalar: f64,
    /// Keys each sliding-window layer attends to (itself included).
    #[serde(default)]
    pub sliding_window: Option<i64>,
    /// Each layer's attention, `sliding_attention` or `full_attention` (derived from the pattern when absent).
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Gemma 3's older setting: every `sliding_window_pattern`-th layer is global (6 by default).
    #[serde(default)]
    pub sliding_window_pattern: Option<i64>,
    /// Gemma 2: attention scores become `tanh(s / cap) * cap` before the mask. Gemma 3 reads it but, as
    /// transformers' Gemma 3, never applies it.
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    /// The logits become `tanh(l / cap) * cap` (the root's output; `lm_head`'s output is before the cap).
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    /// Base of the rotary frequencies (older files; Gemma 3: of the global layers).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Rotary scaling (older files; Gemma 3: of the global layers).
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Gemma 3's older setting: the rotary base of the sliding layers.
    #[serde(default)]
    pub rope_local_base_freq: Option<f64>,
    /// Rotary settings as transformers 5 writes them: one set (Gemma 2), or one per layer type (Gemma 3:
    /// `full_attention`, `sliding_attention`).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Biases on the q, k, v and o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Attention without a causal mask (embedding models); refused.
    #[serde(default)]
    pub use_bidirectional_attention: Option<bool>,
    /// Longest context the model was trained for.
    #[serde(default)]
    pub max_position_embeddings: Option<i64>,
    /// Beginning-of-sequence token id.
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    /// End-of-sequence token id(s).
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    /// Padding token id.
    #[serde(default)]
    pub pad_token_id: Option<serde_json::Value>,
    /// The family (set by [`GemmaConfig::from_raw`]).
    #[serde(skip, default = "default_family")]
    pub family: GemmaFamily,
    /// The rotary settings of the global layers, `rope_theta` filled in (set by [`GemmaConfig::from_raw`]).
    #[serde(skip)]
    pub rope_global: RopeScaling,
    /// The rotary settings of the sliding layers (Gemma 2: the global ones).
    #[serde(skip)]
    pub rope_local: RopeScaling,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_scalar() -> f64 {
    256.0
}
fn default_true() -> bool {
    true
}
fn default_family() -> GemmaFamily {
    GemmaFamily::Gemma2
}

impl GemmaConfig {
    /// Reads `raw` as transformers' config class of `family` does, then refuses what this runtime does not
    /// compute (errors name `raw.source`).
    pub fn from_raw(raw: &RawConfig, family: GemmaFamily) -> Result<Self> {
        let mut c: GemmaConfig = raw.parse()?;
        let has = |k: &str| raw.json.get(k).is_some();
        c.family = family;
        if !has("head_dim") {
            c.head_dim = Some(256);
        }
        if !has("sliding_window") {
            c.sliding_window = Some(4096);
        }
        if family == GemmaFamily::Gemma2 {
            c.attn_logit_softcapping =
                if has("attn_logit_softcapping") { c.attn_logit_softcapping } else { Some(50.0) };
            c.final_logit_softcapping =
                if has("final_logit_softcapping") { c.final_logit_softcapping } else { Some(30.0) };
        }
        if c.layer_types.is_none() {
            let pattern = match family {
                GemmaFamily::Gemma2 => 2,
                GemmaFamily::Gemma3 => c.sliding_window_pattern.unwrap_or(6),
            };
            if pattern <= 0 {
                return Err(Error::config(
                    &raw.source,
                    format!("`sliding_window_pattern` must be positive, not {pattern}"),
                ));
            }
            let kind = |i: i64| if (i + 1) % pattern != 0 { "sliding_attention" } else { "full_attention" };
            c.layer_types = Some((0..c.num_hidden_layers).map(|i| kind(i).to_string()).collect());
        }
        (c.rope_global, c.rope_local) = c.ropes(&raw.source)?;
        c.validate(&raw.source)?;
        Ok(c)
    }

    /// The global and local rotary settings, as transformers' configs standardize them.
    fn ropes(&self, source: &std::path::Path) -> Result<(RopeScaling, RopeScaling)> {
        let parse = |v: &serde_json::Value, what: &str| -> Result<RopeScaling> {
            serde_json::from_value(v.clone()).map_err(|e| Error::config(source, format!("`{what}`: {e}")))
        };
        let params = self.rope_parameters.as_ref().filter(|v| !v.is_null());
        let per_type = params.filter(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some());
        match self.family {
            GemmaFamily::Gemma2 => {
                let mut r = match (&self.rope_scaling, params) {
                    (Some(s), _) => s.clone(),
                    (None, Some(p)) if per_type.is_none() => parse(p, "rope_parameters")?,
                    _ => RopeScaling::default(),
                };
                r.rope_theta = r.rope_theta.or(self.rope_theta).or(Some(10000.0));
                Ok((r.clone(), r))
            }
            GemmaFamily::Gemma3 => {
                let part = |name: &str| -> Result<RopeScaling> {
                    match per_type.and_then(|p| p.get(name)).filter(|v| !v.is_null()) {
                        Some(v) => parse(v, &format!("rope_parameters.{name}")),
                        None => Ok(RopeScaling::default()),
                    }
                };
                let mut global = part("full_attention")?;
                if let Some(s) = &self.rope_scaling {
                    // transformers updates the global settings with `rope_scaling`.
                    global = RopeScaling { rope_theta: s.rope_theta.or(global.rope_theta), ..s.clone() };
                }
                global.rope_theta = global.rope_theta.or(self.rope_theta).or(Some(1_000_000.0));
                let mut local = part("sliding_attention")?;
                local.rope_theta = local.rope_theta.or(self.rope_local_base_freq).or(Some(10000.0));
                Ok((global, local))
            }
        }
    }

    /// Number of key/value heads.
    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one head.
    pub fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(256)
    }

    /// The MLP gate's activation name.
    pub fn activation_name(&self) -> &str {
        self.hidden_activation.as_deref().or(self.hidden_act.as_deref()).unwrap_or("gelu_pytorch_tanh")
    }

    /// Whether layer `layer` attends within the sliding window.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.layer_types.as_ref().and_then(|t| t.get(layer)).is_some_and(|t| t == "sliding_attention")
    }

    /// The window of the sliding layers, if any layer slides.
    pub fn window(&self) -> Option<i64> {
        let any = (0..self.num_hidden_layers as usize).any(|i| self.is_sliding(i));
        self.sliding_window.filter(|_| any)
    }

    /// The soft cap of the attention scores this family applies: Gemma 2's `attn_logit_softcapping`; none for
    /// Gemma 3, whose transformers implementation never applies it.
    pub fn attention_softcap(&self) -> Option<f64> {
        match self.family {
            GemmaFamily::Gemma2 => self.attn_logit_softcapping,
            GemmaFamily::Gemma3 => None,
        }
    }

    fn validate(&self, source: &std::path::Path) -> Result<()> {
        let bad = |m: String| Err(Error::config(source, m));
        if ActivationFn::from_hf(self.activation_name()).is_none() {
            let name = self.activation_name();
            return bad(format!("hidden_activation `{name}` is not supported ({})", ActivationFn::HF_NAMES));
        }
        crate::models::check_sizes(
            source,
            [
                self.vocab_size,
                self.hidden_size,
                self.intermediate_size,
                self.num_hidden_layers,
                self.num_attention_heads,
                self.kv_heads(),
                self.head_dim(),
            ],
        )?;
        for (name, v) in [
            ("query_pre_attn_scalar", Some(self.query_pre_attn_scalar)),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ] {
            if v.is_some_and(|v| !(v > 0.0 && v.is_finite())) {
                return bad(format!("`{name}` must be a positive number, found {}", v.unwrap_or_default()));
            }
        }
        if self.use_bidirectional_attention == Some(true) {
            return bad("`use_bidirectional_attention` (an embedding model's attention) is not supported".into());
        }
        let types = self.layer_types.as_deref().unwrap_or_default();
        if types.len() as i64 != self.num_hidden_layers {
            return bad(format!(
                "`layer_types` lists {} layers, `num_hidden_layers` is {}",
                types.len(),
                self.num_hidden_layers
            ));
        }
        if let Some(t) = types.iter().find(|t| *t != "full_attention" && *t != "sliding_attention") {
            return bad(format!("layer type `{t}` is not supported (full_attention, sliding_attention)"));
        }
        let sliding = types.iter().any(|t| t == "sliding_attention");
        if sliding && self.sliding_window.is_none_or(|w| w <= 0) {
            return bad(format!(
                "`layer_types` has sliding_attention layers but `sliding_window` is {:?}",
                self.sliding_window
            ));
        }
        self.rope_global.validate(source)?;
        self.rope_local.validate(source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `config.json` of a 12-layer model with `fields` added, read as transformers would for `family`.
    fn read(family: GemmaFamily, fields: serde_json::Value) -> Result<GemmaConfig> {
        let mut j = json!({
            "vocab_size": 10, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 12,
            "num_attention_heads": 4, "num_key_value_heads": 2,
        });
        j.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
        GemmaConfig::from_raw(&RawConfig { source: "config.json".into(), json: j }, family)
    }

    fn sliding(c: &GemmaConfig) -> Vec<bool> {
        (0..c.num_hidden_layers as usize).map(|i| c.is_sliding(i)).collect()
    }

    #[test]
    fn a_bare_gemma2_config_has_transformers_defaults() {
        let c = read(GemmaFamily::Gemma2, json!({})).unwrap();
        assert_eq!((c.head_dim(), c.query_pre_attn_scalar, c.window()), (256, 256.0, Some(4096)));
        assert_eq!((c.attention_softcap(), c.final_logit_softcapping), (Some(50.0), Some(30.0)));
        assert_eq!(
            (c.activation_name(), c.tie_word_embeddings, c.rope_global.rope_theta),
            ("gelu_pytorch_tanh", true, Some(10000.0))
        );
        // Every second layer is global.
        assert_eq!(sliding(&c), (0..12).map(|i| i % 2 == 0).collect::<Vec<_>>());
        // Explicit nulls turn the caps off.
        let c = read(GemmaFamily::Gemma2, json!({"attn_logit_softcapping": null, "final_logit_softcapping": null}))
            .unwrap();
        assert_eq!((c.attention_softcap(), c.final_logit_softcapping), (None, None));
    }

    #[test]
    fn an_older_gemma3_config_takes_its_pattern_and_rotary_bases_from_the_old_keys() {
        let old = json!({
            "sliding_window_pattern": 3, "rope_theta": 500000.0, "rope_local_base_freq": 5000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "attn_logit_softcapping": 50.0,
        });
        let c = read(GemmaFamily::Gemma3, old).unwrap();
        assert_eq!(sliding(&c), (0..12).map(|i| (i + 1) % 3 != 0).collect::<Vec<_>>());
        let g = &c.rope_global;
        assert_eq!((g.rope_type.as_deref(), g.factor, g.rope_theta), (Some("linear"), Some(8.0), Some(500000.0)));
        assert_eq!((c.rope_local.rope_type.as_deref(), c.rope_local.rope_theta), (None, Some(5000.0)));
        assert_eq!((c.attention_softcap(), c.final_logit_softcapping), (None, None));
        // Defaults: five local layers to a global one, bases 1e6 and 1e4.
        let c = read(GemmaFamily::Gemma3, json!({})).unwrap();
        assert_eq!(sliding(&c), (0..12).map(|i| (i + 1) % 6 != 0).collect::<Vec<_>>());
        assert_eq!((c.rope_global.rope_theta, c.rope_local.rope_theta), (Some(1e6), Some(1e4)));
    }

    #[test]
    fn bad_settings_are_refused_naming_them() {
        let e = |f: serde_json::Value| read(GemmaFamily::Gemma3, f).unwrap_err().to_string();
        assert!(e(json!({"sliding_window_pattern": 0})).contains("`sliding_window_pattern` must be positive"));
        assert!(e(json!({"sliding_window": null})).contains("`sliding_window` is None"));
        assert!(e(json!({"layer_types": vec!["chunked_attention"; 12]})).contains("`chunked_attention`"));
        assert!(e(json!({"num_key_value_heads": 3})).contains("not a multiple"));
        assert!(e(json!({"query_pre_attn_scalar": -1.0})).contains("`query_pre_attn_scalar` must be a positive"));
        assert!(e(json!({"rope_parameters": {"full_attention": {"rope_type": 3}}}))
            .contains("rope_parameters.full_attention"));
    }
}
