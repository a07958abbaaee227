//! Where the default model is: SmolLM2-135M-Instruct as a Q4_1 GGUF, which `scripts/setup.sh` (run by `make demo`
//! and `make test`) puts in the cache folder and links into the repository's `models/`.

use crate::error::{Error, Result};
use std::path::PathBuf;

/// The default model's file name.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The cache folder of the set-up: `NNSIGHT_CACHE`, else `$XDG_CACHE_HOME/nnsight-rs`, else
/// `~/.cache/nnsight-rs` (the same rule as `scripts/setup.sh`).
pub fn cache_dir() -> Option<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    nonempty("NNSIGHT_CACHE")
        .or_else(|| nonempty("XDG_CACHE_HOME").map(|c| c.join("nnsight-rs")))
        .or_else(|| nonempty("HOME").map(|h| h.join(".cache/nnsight-rs")))
}

/// The places looked in for the default model, in order: `NNSIGHT_MODEL` when set, the set-up's cache folder
/// (`<cache>/models/`), and the `models/` folder of the nnsight repository this crate was built from.
pub fn default_model_candidates() -> Vec<PathBuf> {
    let mut places = Vec::new();
    if let Some(p) = std::env::var_os("NNSIGHT_MODEL").filter(|v| !v.is_empty()) {
        places.push(PathBuf::from(p));
    }
    if let Some(cache) = cache_dir() {
        places.push(cache.join("models").join(DEFAULT_MODEL_FILE));
    }
    places.push(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models")).join(DEFAULT_MODEL_FILE));
    places
}

/// The path of the default model (SmolLM2-135M-Instruct, Q4_1 GGUF), found without a path typed in, from any
/// crate: see [`default_model_candidates`] for where it looks.
///
/// ```no_run
/// use nnsight::prelude::*;
/// # fn main() -> nnsight::Result<()> {
/// let model = LanguageModel::<Llama>::load(nnsight::default_model()?)?;
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// [`Error::FileNotFound`] naming every place looked in and the command that fetches the model.
pub fn default_model() -> Result<PathBuf> {
    let places = default_model_candidates();
    if let Some(found) = places.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let looked = places.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    Err(Error::FileNotFound {
        path: PathBuf::from(DEFAULT_MODEL_FILE),
        what: format!(
            "the default model; looked in {looked}. Fetch it with `scripts/setup.sh model` (or `make demo`) in the \
             nnsight repository, or set NNSIGHT_MODEL to a model file"
        ),
    })
}
