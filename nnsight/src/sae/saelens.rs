//! SAELens's folder format: `cfg.json` and `sae_weights.safetensors` (`W_enc [d_in, d_sae]`, `b_enc [d_sae]`,
//! `W_dec [d_sae, d_in]`, `b_dec [d_in]`, and `threshold [d_sae]` for JumpReLU), as `SAE.load_from_disk` reads and
//! `SAE.save_model` writes them.
//!
//! Read: both forms of `cfg.json`. SAELens 6 writes `architecture` (`standard`, `jumprelu`, `topk` with a
//! top-level `k`) and puts `hook_name` and `model_name` under `metadata`; earlier versions wrote them at the top
//! level (`hook_name`, once `hook_point`), with the activation as `activation_fn_str` (or `activation_fn`) and a
//! TopK's `k` in `activation_fn_kwargs`. Refused with an error naming the field: other architectures (`gated`,
//! `batchtopk`, transcoders), `normalize_activations` other than `none` (its scaling factor is not in the folder),
//! `reshape_activations: hook_z`, `finetuning_scaling_factor`, `rescale_acts_by_decoder_norm`, activation
//! functions other than ReLU and TopK, a `scaling_factor` tensor that is not all ones.
//!
//! Written: SAELens 6's `cfg.json` (`metadata.sae_lens_version` "6.0.0", so that SAELens reads it as such) and the
//! weights in float32.

use super::{Activation, Sae, Site};
use crate::progress::Progress;
use crate::{Error, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// The config file of an SAELens folder.
pub const CFG_FILE: &str = "cfg.json";
/// The weights file of an SAELens folder.
pub const WEIGHTS_FILE: &str = "sae_weights.safetensors";

/// The settings read from `cfg.json`.
struct Cfg {
    d_in: i64,
    d_sae: i64,
    activation: Activation,
    apply_b_dec_to_input: bool,
    hook_name: String,
    model_name: String,
}

fn parse_cfg(path: &Path, cfg: &Value) -> Result<Cfg> {
    let bad = |message: String| Error::config(path, message);
    let meta = cfg.get("metadata").or_else(|| cfg.get("meta"));
    let field = |name: &str| cfg.get(name).filter(|v| !v.is_null()).or_else(|| meta.and_then(|m| m.get(name)));
    let int = |name: &str| -> Result<i64> {
        field(name)
            .ok_or_else(|| bad(format!("field `{name}` is missing")))?
            .as_i64()
            .filter(|&n| n > 0)
            .ok_or_else(|| bad(format!("field `{name}` must be a positive integer, found {}", cfg[name])))
    };
    let text = |name: &str| field(name).and_then(Value::as_str).map(str::to_string);
    let (d_in, d_sae) = (int("d_in")?, int("d_sae")?);

    let architecture = text("architecture").unwrap_or_else(|| "standard".into());
    let activation_fn = text("activation_fn_str").or_else(|| text("activation_fn")).unwrap_or_else(|| "relu".into());
    let k_of = || -> Result<i64> {
        let k = field("k").or_else(|| field("activation_fn_kwargs").and_then(|kw| kw.get("k")));
        k.and_then(Value::as_i64).filter(|&k| k > 0 && k <= d_sae).ok_or_else(|| {
            bad(format!(
                "a topk SAE needs `k` (or `activation_fn_kwargs.k`) between 1 and d_sae = {d_sae}, found {}",
                k.map_or("none".to_string(), Value::to_string)
            ))
        })
    };
    let activation = match (architecture.as_str(), activation_fn.as_str()) {
        ("topk", _) | ("standard", "topk") => Activation::TopK { k: k_of()? },
        ("standard", "relu") => Activation::Relu,
        ("jumprelu", "relu") => Activation::JumpRelu,
        ("standard" | "jumprelu", other) => {
            return Err(bad(format!("activation function `{other}` is not supported (supported: relu, topk)")))
        }
        (other, _) => {
            return Err(bad(format!("architecture `{other}` is not supported (supported: standard, jumprelu, topk)")))
        }
    };
    let apply_b_dec_to_input = match field("apply_b_dec_to_input") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(bad(format!("field `apply_b_dec_to_input` must be true or false, found {v}"))),
    };
    match field("normalize_activations") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::String(s)) if s == "none" => {}
        Some(v) => {
            return Err(bad(format!(
                "normalize_activations {v} is not supported (only \"none\": fold the scaling into the weights first, \
                 as SAELens's fold_activation_norm_scaling_factor does)"
            )))
        }
    }
    match field("reshape_activations") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "none" => {}
        Some(v) => return Err(bad(format!("reshape_activations {v} is not supported (only \"none\")"))),
    }
    for flag in ["finetuning_scaling_factor", "rescale_acts_by_decoder_norm"] {
        if field(flag).and_then(Value::as_bool) == Some(true) {
            return Err(bad(format!("`{flag}: true` is not supported")));
        }
    }
    let hook_name = text("hook_name").or_else(|| text("hook_point")).unwrap_or_default();
    let model_name = text("model_name").unwrap_or_default();
    Ok(Cfg { d_in, d_sae, activation, apply_b_dec_to_input, hook_name, model_name })
}

impl Sae {
    /// Reads an SAE from an SAELens folder (`cfg.json` + `sae_weights.safetensors`; see the [module docs](self) for
    /// what is read and what is refused). The weights become float32.
    ///
    /// # Errors
    /// [`Error::FileNotFound`] for a missing file; [`Error::Config`] naming `cfg.json` and the field for a bad or
    /// unsupported setting; [`Error::MissingTensors`] / [`Error::UnexpectedTensors`] naming the weights file;
    /// [`Error::ShapeMismatch`] when a tensor's shape disagrees with `d_in` and `d_sae`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::FileNotFound {
                path: dir.to_path_buf(),
                what: "an SAELens folder (cfg.json and sae_weights.safetensors)".into(),
            });
        }
        let cfg_path = dir.join(CFG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let json: Value =
            serde_json::from_str(&text).map_err(|e| Error::config(&cfg_path, format!("not valid JSON: {e}")))?;
        let cfg = parse_cfg(&cfg_path, &json)?;

        let weights_path = dir.join(WEIGHTS_FILE);
        let mut tensors = crate::load::safetensors::read_file(&weights_path, &mut Progress::hidden())?;
        let mut take = |name: &str| tensors.remove(name);
        let threshold = match take("threshold") {
            Some(t) => Some(t),
            None => take("log_threshold").map(|t| t.to_kind(Kind::Float).exp()),
        };
        let mut required = BTreeMap::new();
        let mut missing = Vec::new();
        for name in ["W_enc", "b_enc", "W_dec", "b_dec"] {
            match take(name) {
                Some(t) => {
                    required.insert(name, t);
                }
                None => missing.push(name.to_string()),
            }
        }
        if cfg.activation == Activation::JumpRelu && threshold.is_none() {
            missing.push("threshold".into());
        }
        if !missing.is_empty() {
            return Err(Error::MissingTensors { path: weights_path, names: missing });
        }
        if let Some(s) = take("scaling_factor") {
            let ones = s.ones_like();
            if !s.to_kind(Kind::Float).allclose(&ones.to_kind(Kind::Float), 0.0, 0.0, false) {
                return Err(Error::format(
                    &weights_path,
                    "a `scaling_factor` tensor other than all ones (SAELens's finetuning scaling) is not supported",
                ));
            }
        }
        if !tensors.is_empty() {
            return Err(Error::UnexpectedTensors { path: weights_path, names: tensors.into_keys().collect() });
        }
        let float = |t: &Tensor| t.to_kind(Kind::Float).contiguous();
        let sae = Sae {
            w_enc: float(&required["W_enc"]),
            b_enc: float(&required["b_enc"]),
            w_dec: float(&required["W_dec"]),
            b_dec: float(&required["b_dec"]),
            threshold: if cfg.activation == Activation::JumpRelu { threshold.as_ref().map(float) } else { None },
            activation: cfg.activation,
            apply_b_dec_to_input: cfg.apply_b_dec_to_input,
            hook_name: cfg.hook_name,
            model_name: cfg.model_name,
            source: Some(dir.to_path_buf()),
        };
        if threshold.is_some() && cfg.activation != Activation::JumpRelu {
            return Err(Error::UnexpectedTensors { path: weights_path, names: vec!["threshold".into()] });
        }
        sae.check_shapes(cfg.d_in, cfg.d_sae, |message| Error::config(&cfg_path, message))?;
        Ok(sae)
    }

    /// Writes the SAE as an SAELens folder (SAELens 6's `cfg.json` and float32 weights), making the folder if need
    /// be.
    ///
    /// # Errors
    /// [`Error::Write`] naming the file that could not be written.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::Write { path: dir.to_path_buf(), source: e })?;
        let hook_layer = match self.site() {
            Some(Site::Output(l) | Site::Input(l)) => json!(l),
            None => Value::Null,
        };
        let mut cfg = json!({
            "architecture": self.activation.architecture(),
            "d_in": self.d_in(),
            "d_sae": self.d_sae(),
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {
                "model_name": self.model_name,
                "hook_name": self.hook_name,
                "hook_layer": hook_layer,
                "hook_head_index": null,
                "prepend_bos": false,
                "sae_lens_version": "6.0.0",
                "sae_lens_training_version": "6.0.0",
            },
        });
        if let Activation::TopK { k } = self.activation {
            cfg["k"] = json!(k);
        }
        let cfg_path = dir.join(CFG_FILE);
        let text = serde_json::to_string_pretty(&cfg).expect("a JSON value serializes");
        std::fs::write(&cfg_path, text).map_err(|e| Error::Write { path: cfg_path, source: e })?;

        let mut tensors: Vec<(&str, Tensor)> = vec![
            ("W_enc", self.w_enc.to_kind(Kind::Float).contiguous()),
            ("b_enc", self.b_enc.to_kind(Kind::Float).contiguous()),
            ("W_dec", self.w_dec.to_kind(Kind::Float).contiguous()),
            ("b_dec", self.b_dec.to_kind(Kind::Float).contiguous()),
        ];
        if let Some(t) = &self.threshold {
            tensors.push(("threshold", t.to_kind(Kind::Float).contiguous()));
        }
        let weights_path = dir.join(WEIGHTS_FILE);
        Tensor::write_safetensors(&tensors, &weights_path)
            .map_err(|e| Error::Write { path: weights_path, source: std::io::Error::other(e.to_string()) })
    }
}
