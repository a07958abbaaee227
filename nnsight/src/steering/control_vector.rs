//! llama.cpp control vectors: the GGUF files `llama-cli --control-vector FILE` (or `--control-vector-scaled FILE
//! STRENGTH`) reads, written by llama.cpp's `cvector-generator` and by repeng's `ControlVector.export_gguf`.
//!
//! The format, as those programs write and read it (llama.cpp `common/common.cpp`
//! `common_control_vector_load_one`, `src/llama-adapter.cpp` `llama_adapter_cvec`,
//! `tools/cvector-generator/cvector-generator.cpp` `export_gguf`; repeng `repeng/extract.py` `export_gguf`):
//!
//! | what | value |
//! |---|---|
//! | `general.architecture` | `"controlvector"` (string) |
//! | `controlvector.model_hint` | the model's family, e.g. `"llama"` (string; nothing checks it) |
//! | `controlvector.layer_count` | the number of directions (cvector-generator: i32, repeng: u32; nothing reads it) |
//! | tensor `direction.N` | F32, one dimension of the model's hidden size, for `N` ≥ 1 |
//!
//! **Which layer**: llama.cpp adds `direction.N` (times the strength) to the output of decoder layer `N`,
//! counted from 0, after its residual additions (`cur = build_cvec(cur, il)` just before `cb(cur, "l_out",
//! il)` in each model's graph, `llama_adapter_cvec::apply_to`): that is our `model.layers[N].output`. Layer 0 is
//! never steered: `direction.0` makes llama.cpp refuse the whole file ("invalid (zero) direction tensor layer
//! index"), and so [`SteeringVector::write_control_vector`] refuses to write one. A `direction.N` with `N` at or
//! beyond the model's layer count is silently ignored by llama.cpp; here it is an error when the vector is
//! applied. Non-F32 or multi-dimensional directions, or directions of unequal sizes, make llama.cpp skip the file;
//! here they are errors when it is read. repeng writes `direction.N` from `hidden_states[N + 1]`, the output of
//! layer `N`, and adds it there: the same convention. (llama.cpp's own `cvector-generator` writes the direction it
//! measured at the output of layer `N - 1` as `direction.N`, which llama.cpp then adds at layer `N`.)

use std::collections::BTreeMap;
use std::path::Path;

use super::SteeringVector;
use crate::load::gguf::{GgufFile, GgufWriter, MetaValue};
use crate::{Error, Result};
use tch::Kind;

/// `general.architecture` of a control vector.
const ARCHITECTURE: &str = "controlvector";

impl SteeringVector {
    /// Reads a llama.cpp control vector (see [the format](crate::steering::control_vector)): each `direction.N`
    /// becomes the direction of layer `N`. Whether it fits a model (layers, hidden size) is checked when it is
    /// applied.
    ///
    /// # Errors
    /// [`Error::FileNotFound`], or [`Error::Format`] naming the file when it is not GGUF, not a control vector
    /// (`general.architecture` is another model's), or holds a tensor that is not a valid `direction.N` (another
    /// name, `N` = 0, not F32, not one-dimensional, a size unlike the others), or none.
    pub fn read_control_vector(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = GgufFile::open(path)?;
        let bad = |message: String| Error::format(path, message);
        if let Some(arch) = file.get("general.architecture") {
            if arch.as_str() != Some(ARCHITECTURE) {
                return Err(bad(format!(
                    "not a control vector: general.architecture is {}, a control vector's is \"{ARCHITECTURE}\" \
                     (a model file is loaded with LanguageModel::load)",
                    match arch.as_str() {
                        Some(s) => format!("{s:?}"),
                        None => format!("a {}", arch.type_name()),
                    }
                )));
            }
        }
        let model_hint = file.get("controlvector.model_hint").and_then(MetaValue::as_str).unwrap_or("").to_string();
        if file.tensors.is_empty() {
            return Err(bad("a control vector with no direction tensors (direction.1, direction.2, ...)".into()));
        }
        let mut directions = BTreeMap::new();
        for info in &file.tensors {
            let layer = info
                .name
                .strip_prefix("direction.")
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| bad(format!("tensor `{}` is not a control vector's direction.N", info.name)))?;
            if layer == 0 {
                return Err(bad(
                    "direction.0: llama.cpp never steers layer 0 and refuses a file holding it".to_string()
                ));
            }
            if info.ggml_type != 0 || info.dims.len() != 1 {
                return Err(bad(format!(
                    "`{}` is {} of shape {:?}; a direction is F32 of one dimension (the hidden size), as llama.cpp \
                     reads it",
                    info.name,
                    info.type_name(),
                    info.shape()
                )));
            }
            let direction = file.load_tensor(info, Kind::Float)?;
            if let Some((first, d)) = directions.first_key_value() {
                let d: &tch::Tensor = d;
                if d.size() != direction.size() {
                    return Err(bad(format!(
                        "`{}` has {} values but direction.{first} has {}: every direction has the hidden size",
                        info.name,
                        direction.size()[0],
                        d.size()[0]
                    )));
                }
            }
            directions.insert(layer, direction);
        }
        let mut vector = SteeringVector::new(model_hint, directions)?;
        vector.source = Some(path.to_path_buf());
        Ok(vector)
    }

    /// Writes the vector as a llama.cpp control vector (see [the format](crate::steering::control_vector)):
    /// `direction.N` for each layer `N` in order, F32, with `general.architecture = "controlvector"`,
    /// `controlvector.model_hint` and `controlvector.layer_count` (i32, the number of directions, as
    /// `cvector-generator` writes it). Use it with `llama-cli -m MODEL.gguf --control-vector-scaled FILE STRENGTH`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the vector steers layer 0 (llama.cpp refuses such a file: [`Self::select`] the
    /// others); [`Error::Io`] when the file cannot be written.
    pub fn write_control_vector(&self, path: impl AsRef<Path>) -> Result<()> {
        if self.directions.contains_key(&0) {
            return Err(Error::InvalidInput {
                message: format!(
                    "control vector {}: it steers layer 0, which llama.cpp never steers and refuses in a file \
                     (direction.0); keep the others with `.select(1..)`",
                    path.as_ref().display()
                ),
            });
        }
        let mut writer = GgufWriter::new();
        writer
            .metadata("general.architecture", MetaValue::String(ARCHITECTURE.into()))
            .metadata("controlvector.model_hint", MetaValue::String(self.model_hint.clone()))
            .metadata("controlvector.layer_count", MetaValue::I32(self.directions.len() as i32));
        for (layer, direction) in &self.directions {
            let values = Vec::<f32>::try_from(direction).map_err(|e| Error::torch("steering vector", e))?;
            writer.tensor_f32(format!("direction.{layer}"), &[values.len()], values)?;
        }
        writer.write(path)
    }
}
