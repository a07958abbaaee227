//! The registry of architectures: each file of `models/` submits an [`Architecture`] through `inventory`, found by
//! a checkpoint's `model_type` (config.json) or `general.architecture` (GGUF); and reading `config.json`.

use super::{CausalLm, DynCausalLm, RawConfig};
use crate::load::gguf::GgufFile;
use crate::load::Weights;
use crate::{Error, Result};
use std::path::Path;
use tch::Tensor;

/// How an architecture reads GGUF files.
pub struct GgufSupport {
    /// `general.architecture` values it reads (`"llama"`).
    pub architectures: &'static [&'static str],
    /// Builds a Hugging Face `config.json` equivalent from the metadata.
    pub config: fn(&GgufFile) -> Result<serde_json::Value>,
    /// Maps a llama.cpp tensor name to its Hugging Face name (`None`: not a known tensor).
    pub tensor_name: fn(&str) -> Option<String>,
    /// Undoes converter-side changes to a tensor (e.g. Llama's q/k row permutation), given its Hugging Face
    /// name and the config.
    pub fix_tensor: fn(&str, Tensor, &serde_json::Value) -> Result<Tensor>,
}

/// A registered architecture.
pub struct Architecture {
    /// Registry name (`"llama"`).
    pub name: &'static str,
    /// `model_type` values of config.json that select it (`["llama", "mistral"]`).
    pub model_types: &'static [&'static str],
    /// The Hugging Face class it mirrors (`"LlamaForCausalLM"`).
    pub hf_class: &'static str,
    /// Builds the model behind a trait object.
    pub build: fn(&RawConfig, &mut Weights) -> Result<Box<dyn DynCausalLm>>,
    /// GGUF support, if any.
    pub gguf: Option<GgufSupport>,
}

inventory::collect!(Architecture);

/// All registered architectures.
pub fn architectures() -> impl Iterator<Item = &'static Architecture> {
    inventory::iter::<Architecture>.into_iter()
}

fn supported_list() -> String {
    let mut names: Vec<String> =
        architectures().map(|a| format!("{} (model_type {})", a.name, a.model_types.join("/"))).collect();
    names.sort();
    names.join(", ")
}

/// The entry whose `model_types` contain `model_type`.
pub fn by_model_type(model_type: &str) -> Result<&'static Architecture> {
    architectures()
        .find(|a| a.model_types.contains(&model_type))
        .ok_or_else(|| Error::UnsupportedArchitecture { found: model_type.to_string(), supported: supported_list() })
}

/// The entry that reads GGUF files of `general.architecture = arch`.
pub fn by_gguf_architecture(arch: &str) -> Result<&'static Architecture> {
    architectures().find(|a| a.gguf.as_ref().is_some_and(|g| g.architectures.contains(&arch))).ok_or_else(|| {
        let mut gguf: Vec<&str> =
            architectures().filter_map(|a| a.gguf.as_ref()).flat_map(|g| g.architectures.iter().copied()).collect();
        gguf.sort();
        Error::UnsupportedArchitecture {
            found: arch.to_string(),
            supported: format!("{} (GGUF: {})", supported_list(), gguf.join(", ")),
        }
    })
}

/// Builds a boxed model of type `M` (the `build` function of a registry entry).
pub fn build_boxed<M: CausalLm>(config: &RawConfig, weights: &mut Weights) -> Result<Box<dyn DynCausalLm>> {
    Ok(Box::new(M::from_config(config, weights)?))
}

/// The vocabulary size a GGUF file states: `{arch}.vocab_size`, else the length of `tokenizer.ggml.tokens`.
pub(crate) fn gguf_vocab_size(f: &GgufFile) -> Result<u64> {
    let a = f.architecture()?;
    match f.get_u64(&format!("{a}.vocab_size")) {
        Ok(v) => Ok(v),
        Err(_) => f
            .get("tokenizer.ggml.tokens")
            .and_then(|t| t.as_array())
            .map(|t| t.len() as u64)
            .ok_or_else(|| Error::config(&f.path, format!("neither {a}.vocab_size nor tokenizer.ggml.tokens"))),
    }
}

/// Copies the special token ids of a GGUF file's tokenizer metadata into a `config.json` equivalent `c`
/// A llama.cpp tensor name as its Hugging Face name: the pair of `whole` that names it (`token_embd.weight`), else
/// `blk.N.PART.SUFFIX` as `{layers}.N.{hf}.SUFFIX` for the pair `(PART, hf)` of `parts`; `None` for any other name.
pub(crate) fn gguf_tensor_name_in(
    name: &str,
    whole: &[(&str, &str)],
    layers: &str,
    parts: &[(&str, &str)],
) -> Option<String> {
    if let Some((_, hf)) = whole.iter().find(|(gguf, _)| *gguf == name) {
        return Some(hf.to_string());
    }
    let (idx, rest) = name.strip_prefix("blk.")?.split_once('.')?;
    let idx: usize = idx.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let (_, hf) = parts.iter().find(|(gguf, _)| *gguf == part)?;
    Some(format!("{layers}.{idx}.{hf}.{suffix}"))
}

/// (`bos_token_id`, `eos_token_id`, `pad_token_id`).
pub(crate) fn gguf_special_token_ids(f: &GgufFile, c: &mut serde_json::Value) {
    for (gguf_key, hf) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if let Ok(v) = f.get_u64(gguf_key) {
            c[hf] = v.into();
        }
    }
}

/// The values of the one-dimensional float tensor `name` of a GGUF file (rope factors), read in float32; `None`
/// when the file has no such tensor, an error naming it when it is not `[len]`.
pub(crate) fn gguf_factors(f: &GgufFile, name: &str, len: u64, what: &str) -> Result<Option<Vec<f64>>> {
    let Some(info) = f.tensors.iter().find(|t| t.name == name) else { return Ok(None) };
    if info.dims != [len] {
        return Err(Error::config(
            &f.path,
            format!("GGUF tensor `{name}` should hold {len} values ({what}), found shape {:?}", info.shape()),
        ));
    }
    let t = f.load_tensor(info, tch::Kind::Float)?;
    let values = Vec::<f32>::try_from(&t).map_err(|e| Error::torch(name, e))?;
    Ok(Some(values.into_iter().map(f64::from).collect()))
}

/// The `partial_rotary_factor` (or `rotary_pct`) that gives back `rotary` rotated values of a `head_dim`-wide head
/// under transformers' truncation, `int(head_dim * factor)`.
pub(crate) fn gguf_rotary_fraction(rotary: u64, head_dim: u64) -> f64 {
    let fraction = rotary as f64 / head_dim as f64;
    if (head_dim as f64 * fraction) as u64 == rotary {
        fraction
    } else {
        (rotary as f64 + 0.5) / head_dim as f64
    }
}

/// The norm epsilon under `key`: GGUF keeps it as a float32, config.json had the decimal it rounds (1e-5, not
/// 9.99999974e-6).
pub(crate) fn gguf_eps(f: &GgufFile, key: &str) -> Result<f64> {
    let eps = f.get_f64(key)?;
    Ok((eps as f32).to_string().parse::<f64>().unwrap_or(eps))
}

/// Reads `config.json` in `dir`.
pub fn read_config(dir: &Path) -> Result<RawConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let json = serde_json::from_str(&text).map_err(|e| Error::format(&path, format!("invalid JSON: {e}")))?;
    Ok(RawConfig { source: path, json })
}
