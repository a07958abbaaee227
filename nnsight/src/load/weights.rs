//! A checkpoint's tensors by Hugging Face state-dict name, taken one by one by a model's constructor with their
//! expected shapes; what is missing or left over is reported by name when the model is complete.

use crate::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Tensor names that checkpoints carry but no module owns (buffers Hugging Face recomputes; a GGUF file's rope
/// factors, `model.rotary_emb.*`, which its reader has put into the configuration).
fn is_ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
        || name.starts_with("model.rotary_emb.")
        || name.ends_with(".attn.bias") && !name.contains("c_attn")
        || name.ends_with(".attn.masked_bias")
}

/// The tensors of a checkpoint, keyed by Hugging Face state-dict name.
#[derive(Debug)]
pub struct Weights {
    source: PathBuf,
    tensors: BTreeMap<String, Tensor>,
    kind: Kind,
    device: Device,
    /// Tensors are meta and stay meta (a model's meta twin, for scans).
    meta: bool,
    missing: BTreeSet<String>,
}

impl Weights {
    /// Wraps loaded `tensors`; [`Weights::take`] converts each to `kind` on `device`.
    pub fn new(source: impl Into<PathBuf>, tensors: BTreeMap<String, Tensor>, kind: Kind, device: Device) -> Self {
        Weights { source: source.into(), tensors, kind, device, meta: false, missing: BTreeSet::new() }
    }

    /// Wraps meta `tensors` (shapes and dtypes only, see [`crate::meta`]): [`Weights::take`] keeps them meta and
    /// converts floating ones to `kind`; [`Weights::place`] makes what a constructor computes meta too.
    pub fn meta(source: impl Into<PathBuf>, tensors: BTreeMap<String, Tensor>, kind: Kind) -> Self {
        Weights { meta: true, ..Weights::new(source, tensors, kind, Device::Cpu) }
    }

    /// Whether the tensors are meta.
    pub fn is_meta(&self) -> bool {
        self.meta
    }

    /// A tensor that a constructor computed (e.g. rotary frequencies), placed where the parameters are: on their
    /// device, or meta.
    pub fn place(&self, name: &str, t: Tensor) -> Result<Tensor> {
        if self.meta {
            crate::meta::to_meta(&t).map_err(|e| Error::torch(name, e))
        } else {
            t.f_to_device(self.device).map_err(|e| Error::torch(name, e))
        }
    }

    /// The file or folder the tensors came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The dtype parameters are converted to.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The device parameters are moved to (the CPU for meta weights: see [`Weights::place`]).
    pub fn device(&self) -> Device {
        self.device
    }

    /// Whether a tensor of that name is present (and not yet taken).
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Takes the tensor `name`, checks its shape and converts it to the model's dtype and device.
    ///
    /// A missing tensor is recorded (all of them are reported together by [`Weights::finish`]) and an empty
    /// placeholder returned; a shape mismatch is an error at once.
    pub fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let Some(t) = self.tensors.remove(name) else {
            self.missing.insert(name.to_string());
            return Ok(Tensor::new());
        };
        if t.size() != shape {
            return Err(Error::ShapeMismatch { name: name.to_string(), expected: shape.to_vec(), found: t.size() });
        }
        let kind = if t.is_floating_point() { self.kind } else { t.kind() };
        if self.meta {
            return crate::meta::to_meta(&t).and_then(|t| t.f_to_kind(kind)).map_err(|e| Error::torch(name, e));
        }
        t.f_to_device(self.device).and_then(|t| t.f_to_kind(kind)).map_err(|e| Error::torch(name, e))
    }

    /// Takes `name` if present, without recording it as missing.
    pub fn take_optional(&mut self, name: &str, shape: &[i64]) -> Result<Option<Tensor>> {
        if self.tensors.contains_key(name) {
            self.take(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Ends loading: an error listing every missing tensor, else one listing every tensor nothing took.
    pub fn finish(self) -> Result<()> {
        if !self.missing.is_empty() {
            return Err(Error::MissingTensors { path: self.source, names: self.missing.into_iter().collect() });
        }
        let left: Vec<String> = self.tensors.into_keys().filter(|n| !is_ignorable(n)).collect();
        if !left.is_empty() {
            return Err(Error::UnexpectedTensors { path: self.source, names: left });
        }
        Ok(())
    }

    /// Names of the tensors not yet taken.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Renames every tensor with `f` (e.g. to add a missing `transformer.` prefix).
    pub fn rename(&mut self, f: impl Fn(&str) -> String) {
        let old = std::mem::take(&mut self.tensors);
        self.tensors = old.into_iter().map(|(k, v)| (f(&k), v)).collect();
    }

    /// Drops the tensors whose names `f` accepts: buffers an architecture knows a checkpoint may carry and does
    /// not use (GPT-NeoX's saved causal masks `attention.bias`), so that [`Weights::finish`] does not report them.
    pub fn discard(&mut self, f: impl Fn(&str) -> bool) {
        self.tensors.retain(|k, _| !f(k));
    }
}
