//! Reading `.safetensors` files, single or sharded (`model.safetensors.index.json`).

use crate::progress::Progress;
use crate::{Error, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// The tch dtype of a safetensors dtype, if tch has it.
pub(crate) fn kind_of_dtype(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn kind_of(path: &Path, name: &str, dtype: Dtype) -> Result<Kind> {
    kind_of_dtype(dtype)
        .ok_or_else(|| Error::format(path, format!("tensor `{name}` has dtype {dtype:?}, which is not supported")))
}

/// Reads every tensor of one `.safetensors` file onto the CPU, in its stored dtype.
pub fn read_file(path: &Path, progress: &mut Progress) -> Result<BTreeMap<String, Tensor>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and dropped before this function returns; tensors are copied out of it.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let st = SafeTensors::deserialize(&map).map_err(|e| Error::format(path, format!("not a safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(path, &name, view.dtype())?;
        // `deserialize` checked that the data fills the shape; with a zero among the dims the others are
        // unbounded, and each must still be an i64.
        let shape: Vec<i64> =
            view.shape().iter().map(|&d| i64::try_from(d)).collect::<Result<_, _>>().map_err(|_| {
                Error::format(path, format!("tensor `{name}` has shape {:?}, beyond i64", view.shape()))
            })?;
        let t = Tensor::f_from_data_size(view.data(), &shape, kind).map_err(|e| {
            Error::format(path, format!("tensor `{name}`: {}", crate::error::clean_torch_message(&e.to_string())))
        })?;
        progress.advance(view.data().len() as u64);
        out.insert(name, t);
    }
    Ok(out)
}

/// The safetensors files of a Hugging Face folder: `model.safetensors`, or the shards an index names.
pub fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Err(Error::FileNotFound {
            path: single,
            what: "weights: expected model.safetensors or model.safetensors.index.json".into(),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(&index, format!("invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::format(&index, "no `weight_map` object"))?;
    let names: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    let files: Vec<PathBuf> = names.into_iter().map(|n| dir.join(n)).collect();
    for f in &files {
        if !f.exists() {
            return Err(Error::FileNotFound { path: f.clone(), what: format!("shard named by {}", index.display()) });
        }
    }
    Ok(files)
}

/// Reads all tensors of a Hugging Face folder's safetensors files.
pub fn read_dir(dir: &Path, progress_label: &str, show_progress: bool) -> Result<BTreeMap<String, Tensor>> {
    let files = files_in(dir)?;
    let total: u64 = files.iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum();
    let mut progress = if show_progress { Progress::new(progress_label, total) } else { Progress::hidden() };
    let mut all = BTreeMap::new();
    for f in &files {
        all.extend(read_file(f, &mut progress)?);
    }
    progress.finish();
    Ok(all)
}
