//! `LanguageModel<M>`: a tokenizer and a model on a device, loaded from a Hugging Face folder or a GGUF file.

use crate::exec::edits::with_edits;

use crate::envoy::CallOrder;
use crate::exec::EditList;
use crate::load::gguf::GgufFile;
use crate::load::tokenizer::{self, SpecialTokens};
use crate::load::{safetensors, Weights};
pub use crate::models::batch::{Batch, Input};
pub use generate::Generator;

mod continuous;
mod generate;
mod hosted;
pub use hosted::SharedModel;
mod targets;
use crate::models::{self, Architecture, AutoModel, CausalLm, RawConfig};
use crate::nn::{Ctx, Hook, ModuleTree};
use crate::progress::Progress;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;

/// Options of [`LanguageModel::load_with`].
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Floating-point dtype of the parameters (default `Kind::Float`); quantized GGUF tensors are dequantized to it.
    pub kind: Kind,
    /// Device the model is placed on (default CPU).
    pub device: Device,
    /// Show loading progress on standard error (default true; `NNSIGHT_QUIET=1` also silences it).
    pub progress: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { kind: Kind::Float, device: Device::Cpu, progress: true }
    }
}

impl LoadOptions {
    /// These options with parameters of dtype `kind`.
    pub fn kind(mut self, kind: Kind) -> Self {
        self.kind = kind;
        self
    }
    /// These options with the model on `device`.
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }
    /// These options with progress shown or not.
    pub fn progress(mut self, show: bool) -> Self {
        self.progress = show;
        self
    }
}

/// A tokenizer and a causal language model on a device.
///
/// `M` is the architecture ([`crate::models::llama::Llama`], [`crate::models::gpt2::Gpt2`]), or [`AutoModel`] for
/// whichever the checkpoint holds.
pub struct LanguageModel<M: CausalLm = AutoModel> {
    model: M,
    envoy: OnceLock<crate::models::StandardEnvoy<M::Envoy>>,
    order: OnceLock<Arc<CallOrder>>,
    /// The configuration the model was built from (its meta twin is built from it again).
    config: RawConfig,
    /// The model again with meta parameters, for scans (built on the first scan).
    meta_twin: OnceLock<M>,
    tokenizer: Tokenizer,
    special: SpecialTokens,
    device: Device,
    source: PathBuf,
    /// In-place edits (`intervene!(model.edit_in_place() { .. })`), applied before every run.
    edits: EditList,
    /// The server this handle is connected to ([`LanguageModel::connect`]): its parameters are meta tensors and
    /// every block runs there.
    remote: Option<crate::remote::Remote>,
    /// How traces batch their invokes ([`LanguageModel::set_batching`]).
    batching: std::sync::RwLock<crate::exec::Batching>,
}

impl<M: CausalLm> LanguageModel<M> {
    /// Loads a Hugging Face folder (`config.json`, safetensors, `tokenizer.json`) or a `.gguf` file, in float32 on
    /// the CPU, showing progress.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_with(path, LoadOptions::default())
    }

    /// Loads with the given dtype, device and progress display.
    pub fn load_with(path: impl AsRef<Path>, options: LoadOptions) -> Result<Self> {
        crate::ffi::keep_torch_cuda();
        let path = path.as_ref();
        if !path.exists() {
            return Err(Error::FileNotFound {
                path: path.to_path_buf(),
                what: "model: a Hugging Face folder or a .gguf file".into(),
            });
        }
        if path.is_dir() {
            Self::load_hf_dir(path, &options)
        } else {
            Self::load_gguf(path, &options)
        }
    }

    fn check_arch(path: &Path, arch: &Architecture) -> Result<()> {
        if M::accepts(arch) {
            Ok(())
        } else {
            Err(Error::WrongArchitecture {
                path: path.to_path_buf(),
                expected: M::ARCHITECTURE.to_string(),
                found: arch.name.to_string(),
            })
        }
    }

    fn load_hf_dir(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let config = models::read_config(dir)?;
        let arch = models::by_model_type(config.model_type()?)?;
        Self::check_arch(dir, arch)?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = tokenizer::tokenizer_from_file(&tok_path)?;
        let label = format!("loading {}", dir.display());
        let tensors = safetensors::read_dir(dir, &label, options.progress)?;
        let mut weights = Weights::new(dir, tensors, options.kind, options.device);
        let model = M::from_config(&config, &mut weights)?;
        weights.finish()?;
        let special = special_from_config(&config.json);
        Ok(Self::assemble(model, config, tokenizer, special, options.device, dir))
    }

    fn load_gguf(path: &Path, options: &LoadOptions) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let arch = models::by_gguf_architecture(file.architecture()?)?;
        Self::check_arch(path, arch)?;
        let gguf = arch.gguf.as_ref().expect("entry found by its GGUF support");
        let json = (gguf.config)(&file)?;
        let config = RawConfig { source: path.to_path_buf(), json };
        let tokenizer = tokenizer::tokenizer_from_gguf(&file)?;
        let special = tokenizer::special_tokens_from_gguf(&file);

        let total: u64 = file.tensors.iter().map(|t| file.tensor_bytes(t) as u64).sum();
        let mut progress = if options.progress {
            Progress::new(&format!("loading {}", path.display()), total)
        } else {
            Progress::hidden()
        };
        let mut tensors = BTreeMap::new();
        let mut unknown = Vec::new();
        for info in &file.tensors {
            let Some(name) = (gguf.tensor_name)(&info.name) else {
                unknown.push(info.name.clone());
                continue;
            };
            let t = file.load_tensor(info, options.kind)?;
            let t = (gguf.fix_tensor)(&name, t, &config.json)?;
            progress.advance(file.tensor_bytes(info) as u64);
            tensors.insert(name, t);
        }
        progress.finish();
        if !unknown.is_empty() {
            return Err(Error::UnexpectedTensors { path: path.to_path_buf(), names: unknown });
        }
        let mut weights = Weights::new(path, tensors, options.kind, options.device);
        let model = M::from_config(&config, &mut weights)?;
        weights.finish()?;
        Ok(Self::assemble(model, config, tokenizer, special, options.device, path))
    }

    fn assemble(
        mut model: M,
        config: RawConfig,
        tokenizer: Tokenizer,
        special: SpecialTokens,
        device: Device,
        source: &Path,
    ) -> Self {
        model.set_path("");
        LanguageModel {
            model,
            envoy: OnceLock::new(),
            order: OnceLock::new(),
            config,
            meta_twin: OnceLock::new(),
            tokenizer,
            special,
            device,
            source: source.to_path_buf(),
            edits: EditList::new(),
            remote: None,
            batching: Default::default(),
        }
    }

    /// A handle of the model `remote` names, built from what the server describes (configuration, tokenizer,
    /// parameter shapes) without its weights: the parameters are meta tensors, so a laptop can hold a model it
    /// could not load. Every block on it (`trace`, `generate`, `session`) runs on the server; a scan runs here, on
    /// shapes; [`LanguageModel::forward`] asks the server for the logits.
    pub fn connect(remote: &crate::remote::Remote) -> Result<Self> {
        let info = remote.model_info()?;
        let source = PathBuf::from(format!("{}/{}", remote.url(), remote.model()));
        let config = RawConfig { source: source.clone(), json: info.config };
        let arch = models::by_model_type(config.model_type()?)?;
        Self::check_arch(&source, arch)?;
        let tokenizer: Tokenizer = info
            .tokenizer
            .parse()
            .map_err(|e| Error::Tokenizer { message: format!("the server's tokenizer cannot be read: {e}") })?;
        let mut tensors = BTreeMap::new();
        let mut kind = Kind::Float;
        for (name, shape, dtype) in &info.parameters {
            let k = crate::graph::value::kind_from_name(dtype)?;
            if matches!(k, Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double) {
                kind = k;
            }
            let t = crate::meta::empty(shape, k).map_err(|e| Error::torch(name.as_str(), e))?;
            tensors.insert(name.clone(), t);
        }
        let mut weights = Weights::meta(&source, tensors, kind);
        let model = M::from_config(&config, &mut weights)?;
        weights.finish()?;
        let mut lm = Self::assemble(model, config, tokenizer, info.special, Device::Cpu, &source);
        lm.remote = Some(remote.clone());
        Ok(lm)
    }

    /// The logits of `rows` from the server, with `edits` applied there: a graph that saves the root's output.
    pub(crate) fn remote_logits(
        remote: &crate::remote::Remote,
        rows: Vec<Vec<i64>>,
        edits: Vec<crate::graph::Graph>,
    ) -> Result<Tensor> {
        let (graph, read) = crate::graph::Graph::saving_read("", crate::graph::Point::Output);
        let job = crate::remote::Job::Trace { graph, inputs: vec![Some(Input::Ids(rows))], edits };
        let mut done = remote.run(job)?;
        let value =
            done.values.remove(&read).ok_or_else(|| Error::Remote { message: "the server sent no logits".into() })?;
        value.tensor().map(Tensor::shallow_clone)
    }

    /// The server this handle is connected to, if it is one ([`LanguageModel::connect`]).
    pub fn server(&self) -> Option<&crate::remote::Remote> {
        self.remote.as_ref()
    }

    /// Moves the model to `device` (parameters keep their dtype).
    pub fn to(mut self, device: Device) -> Result<Self> {
        let kind = self.model.dtype();
        self.model.to_device(device, kind)?;
        self.device = device;
        Ok(self)
    }

    /// The model.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// Where the standard names point in this model, and its number of layers (`n_layers`): what generic code
    /// needs outside a block (see [`crate::models::standard`]).
    pub fn standard_names(&self) -> crate::models::StandardNames {
        self.model.standard_names()
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// BOS, EOS and padding ids.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// The device the model is on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The configuration as read (`config.json`, or its equivalent built from GGUF metadata).
    pub fn config_json(&self) -> &serde_json::Value {
        &self.config.json
    }

    /// The checkpoint the model was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The meta twin of the model (built on the first call, then kept): the same architecture built from the same
    /// configuration through the same constructor, every parameter a meta tensor of the real one's name, shape and
    /// dtype (no storage, so it costs no memory). The real model is not touched. Scans run on it.
    pub fn meta_model(&self) -> Result<&M> {
        if let Some(twin) = self.meta_twin.get() {
            return Ok(twin);
        }
        let label = |name: &str| format!("meta twin: {name}");
        let mut tensors = std::collections::BTreeMap::new();
        for (name, t) in crate::nn::named_parameters(&self.model) {
            let meta = crate::meta::to_meta(&t).map_err(|e| Error::torch(label(&name), e))?;
            tensors.insert(name, meta);
        }
        let mut weights = Weights::meta(&self.source, tensors, self.model.dtype());
        let mut twin = M::from_config(&self.config, &mut weights)?;
        weights.finish()?;
        twin.set_path("");
        Ok(self.meta_twin.get_or_init(|| twin))
    }

    /// A handle on the parameter `name` (dotted, as in [`LanguageModel::tree`]: `model.layers.3.mlp.up_proj.weight`),
    /// sharing its storage: make it require grad and give it to an optimizer to train it (see the README's
    /// Training section); a step on it changes the model.
    pub fn parameter(&self, name: &str) -> Result<Tensor> {
        let all = crate::nn::named_parameters(&self.model);
        if let Some((_, t)) = all.iter().find(|(n, _)| n == name) {
            return Ok(t.shallow_clone());
        }
        let near: Vec<&str> = all
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| n.rsplit('.').next() == name.rsplit('.').next())
            .take(4)
            .collect();
        Err(Error::InvalidInput {
            message: format!(
                "the model has no parameter `{name}` (e.g. {}; `model.tree()` lists them all)",
                if near.is_empty() {
                    all.iter().take(3).map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
                } else {
                    near.join(", ")
                }
            ),
        })
    }

    /// The module tree (paths, types and parameter shapes), printable with `{}` like `print(model)` in PyTorch.
    pub fn tree(&self) -> ModuleTree<'_> {
        ModuleTree(&self.model)
    }

    /// Token ids of `text` (with whatever special tokens the tokenizer adds).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self.tokenizer.encode(text, true).map_err(|e| Error::Tokenizer { message: e.to_string() })?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// The tokens of `text`, each decoded on its own (as TransformerLens's `to_str_tokens`): labels for a
    /// picture's positions. Joined, they give `text` back (for text the tokenizer does not normalize).
    pub fn str_tokens(&self, text: &str) -> Result<Vec<String>> {
        self.encode(text)?.iter().map(|&id| self.decode(&[id])).collect()
    }

    /// The text of token ids.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids
            .iter()
            .map(|&i| {
                u32::try_from(i).map_err(|_| Error::InvalidInput { message: format!("token id {i} is negative") })
            })
            .collect::<Result<_>>()?;
        self.tokenizer.decode(&ids, false).map_err(|e| Error::Tokenizer { message: e.to_string() })
    }

    /// Token rows of an input, each checked against the vocabulary.
    pub(crate) fn rows_of(&self, input: Input) -> Result<Vec<Vec<i64>>> {
        let rows = match input {
            Input::Text(t) => vec![self.encode(&t)?],
            Input::Texts(ts) => ts.iter().map(|t| self.encode(t)).collect::<Result<_>>()?,
            Input::Ids(rows) => rows,
        };
        let vocab = self.model.vocab_size();
        for (r, row) in rows.iter().enumerate() {
            if let Some(&bad) = row.iter().find(|&&i| i < 0 || i >= vocab) {
                return Err(Error::InvalidInput {
                    message: format!("token id {bad} in row {r} is outside the vocabulary (0..{vocab})"),
                });
            }
        }
        Ok(rows)
    }

    /// Tokenizes and left-pads `input` into a batch on the model's device.
    pub fn batch(&self, input: impl Into<Input>) -> Result<Batch> {
        let rows = self.rows_of(input.into())?;
        let pad = self.special.pad.or(self.special.eos).unwrap_or(0) as i64;
        Batch::from_rows(&rows, pad, self.device)
    }

    /// A forward pass: logits `[batch, seq, vocab]`. Rows of unequal length are left-padded; each row's logits at
    /// its real positions equal those of its solo run.
    pub fn forward(&self, input: impl Into<Input>) -> Result<Tensor> {
        let batch = self.batch(input)?;
        self.forward_batch(&batch)
    }

    /// A forward pass over a prepared batch.
    pub fn forward_batch(&self, batch: &Batch) -> Result<Tensor> {
        if let Some(remote) = &self.remote {
            let rows: Vec<Vec<i64>> = (0..batch.lengths.len())
                .map(|r| {
                    let row = batch.input_ids.get(r as i64);
                    let real = batch.lengths[r] as i64;
                    let ids = row.narrow(0, row.size()[0] - real, real);
                    Vec::<i64>::try_from(&ids).map_err(|e| Error::torch("forward", e))
                })
                .collect::<Result<_>>()?;
            return Self::remote_logits(remote, rows, targets::wire(&self.edits.snapshot()));
        }
        let _guard = tch::no_grad_guard();
        with_edits(&self.edits, &self.model, false, None, |hook| match hook {
            Some(h) => self.model.run(&mut Ctx::with_hook(h), batch),
            None => self.model.run(&mut Ctx::new(), batch),
        })
    }

    /// A forward pass in which `hook` sees (and may replace) every module's input and output.
    pub fn forward_with_hook(&self, batch: &Batch, hook: &mut dyn Hook) -> Result<Tensor> {
        if let Some(r) = &self.remote {
            return Err(Error::InvalidInput {
                message: format!("a local hook cannot run on a handle connected to {} (its weights are there): use an `intervene!` block", r.url()),
            });
        }
        let _guard = tch::no_grad_guard();
        with_edits(&self.edits, &self.model, false, Some(hook), |h| {
            self.model.run(&mut Ctx::with_hook(h.expect("a hook was given")), batch)
        })
    }

    /// Removes the model's in-place edits (`intervene!(model.edit_in_place() { .. })`): its outputs are again
    /// exactly those of the unedited model.
    pub fn clear_edits(&self) {
        self.edits.clear();
    }

    /// How many in-place edits the model applies.
    pub fn edit_count(&self) -> usize {
        self.edits.len()
    }

    /// How traces of this model batch their invokes from now on: at most so many rows a forward pass (64 by
    /// default; more invokes run as several passes, with the results of one batch), and whether invokes on the
    /// same input share the layers before the first one any of them touches (on by default). See
    /// [`Batching`](crate::exec::Batching). A server uses its own model's setting.
    pub fn set_batching(&self, batching: crate::exec::Batching) {
        *self.batching.write().unwrap_or_else(|p| p.into_inner()) = batching;
    }

    /// How traces of this model batch their invokes (see [`LanguageModel::set_batching`]).
    pub fn batching(&self) -> crate::exec::Batching {
        *self.batching.read().unwrap_or_else(|p| p.into_inner())
    }
}

fn special_from_config(json: &serde_json::Value) -> SpecialTokens {
    let id = |key: &str| {
        let v = json.get(key)?;
        let v = v.as_array().and_then(|a| a.first()).unwrap_or(v);
        v.as_u64().and_then(|i| u32::try_from(i).ok())
    };
    SpecialTokens { bos: id("bos_token_id"), eos: id("eos_token_id"), pad: id("pad_token_id"), add_bos: false }
}
