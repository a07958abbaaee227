//! Modules over `tch` tensors, built so that every submodule call goes through one place: [`Ctx::call`].
//!
//! A module is a struct of parameters and submodules that knows its dotted path (`model.layers.5.mlp`, equal to
//! the Hugging Face state-dict prefix). Its parent calls it with `cx.call(&self.mlp, &x)`, never `forward`
//! directly, so that a [`Hook`] installed on the [`Ctx`] sees (and may replace) the input and the output of every
//! module call, in forward order.

mod kv;
mod layers;
mod linear_path;
mod tree;

pub use kv::KvCache;
pub use layers::{gelu_fast, gelu_new, Activation, ActivationFn, Conv1D, Embedding, LayerNorm, Linear, RmsNorm};
pub use tree::{named_parameters, ModuleList, ModuleTree};

/// The kernels of [`Linear`] on the CPU: float32 linear layers that want no gradient run through oneDNN's matmul
/// (`mkldnn::_linear_pointwise`, what PyTorch's compiler uses) or `at::linear` (MKL's `sgemm`, as PyTorch eager),
/// whichever was faster on this machine for the call's shape class (timed once per class and process, then fixed).
/// Results of the two differ by float32 rounding only (a few ulps). Forwards that need gradients, other devices
/// and other dtypes use `at::linear`. `NNSIGHT_LINEAR=auto|onednn|aten` (or `NNSIGHT_NO_ONEDNN`, which means
/// `aten`) and [`set_process_linear_mode`](fast_linear::set_process_linear_mode) set the mode for the process,
/// [`set_linear_mode`](fast_linear::set_linear_mode) for the calling thread; [`linear_path_for`](fast_linear::linear_path_for)
/// and [`linear_choices`](fast_linear::linear_choices) tell which kernel a shape takes.
pub mod fast_linear {
    pub use super::linear_path::{
        linear_choices, linear_mode, linear_path_for, linear_with, onednn_linear_in_use, process_linear_mode,
        set_linear_mode, set_onednn_linear, set_process_linear_mode, LinearChoice, LinearKey, LinearMode, LinearPath,
        RowsBucket,
    };
}

use crate::Result;
use tch::Tensor;

/// A node of a model's module tree: its path, type, submodules and parameters.
pub trait Module {
    /// The module's dotted path in its model, e.g. `model.layers.0.self_attn.q_proj` (empty for the root).
    fn path(&self) -> &str;

    /// A short type name, as PyTorch prints it (`Linear`, `LlamaDecoderLayer`).
    fn kind(&self) -> &'static str;

    /// Calls `f` on each direct submodule with its attribute name (`q_proj`, or `0` in a list).
    fn children<'a>(&'a self, f: &mut dyn FnMut(&str, &'a dyn Module)) {
        let _ = f;
    }

    /// Calls `f` on each parameter held directly by this module, with its name (`weight`, `bias`).
    fn parameters(&self, f: &mut dyn FnMut(&str, &Tensor)) {
        let _ = f;
    }

    /// Extra text printed after the type name in the module tree (`576 -> 1536, bias=false`).
    fn describe(&self) -> String {
        String::new()
    }

    /// This module as something that computes, if it does (module lists do not).
    fn as_forward(&self) -> Option<&dyn Forward> {
        None
    }
}

/// A module that computes: a forward from one tensor (the hidden state) to one tensor.
///
/// Side inputs that are not hook points (attention masks, rotary tables) travel in [`Ctx::state`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` has no forward pass",
    label = "a traceable module must implement `nnsight::nn::Forward`"
)]
pub trait Forward: Module {
    /// The module's own computation. Callers use [`Ctx::call`], which runs the hooks around it.
    fn forward(&self, cx: &mut Ctx<'_>, x: &Tensor) -> Result<Tensor>;
}

/// What sees every module call of a forward pass: may read, replace or reject inputs and outputs.
///
/// The intervention runtime installs one of these; a plain forward installs none.
pub trait Hook {
    /// Called before `module` runs, with its input; returns the input the module receives.
    fn input(&mut self, module: &str, x: Tensor) -> Result<Tensor>;
    /// Called after `module` ran, with its output; returns the output the caller receives.
    fn output(&mut self, module: &str, y: Tensor) -> Result<Tensor>;

    /// Called between [`Hook::input`] and the module's forward: a value to use as the module's output instead of
    /// running it (a skip), or `None` to run it.
    fn skip(&mut self, module: &str, x: &Tensor) -> Result<Option<Tensor>> {
        let _ = (module, x);
        Ok(None)
    }

    /// Whether the hook wants any of `module`'s inner points `names` (named values inside its forward, such as an
    /// attention's `probs`). A module computes them, on a slower explicit path, only when this says yes; the
    /// answer must be cheap when nothing is wanted (it is asked on every call of such a module).
    fn wants_points(&mut self, module: &str, names: &[&str]) -> bool {
        let _ = (module, names);
        false
    }

    /// Called at the inner point `path` (`module.name`) with its value; returns the value the forward goes on
    /// with. By default an output event of `path`.
    fn point(&mut self, path: &str, t: Tensor) -> Result<Tensor> {
        self.output(path, t)
    }
}

/// Per-forward side inputs shared by the modules of one pass (not hook points).
#[derive(Debug, Default)]
pub struct ForwardState {
    /// Additive attention mask `[batch, 1, q, k]` (0 where allowed, a large negative value where not), or `None`
    /// for a plain causal pass without padding: the mask of the full-attention layers.
    pub attention_mask: Option<Tensor>,
    /// The mask of the sliding-window layers (Mistral's, Gemma's local layers, Qwen2's `sliding_attention` ones):
    /// `attention_mask` with the keys beyond the window masked too; `None` when it adds nothing to
    /// `attention_mask` (no window, or one that cuts nothing). See [`ForwardState::mask`].
    pub sliding_attention_mask: Option<Tensor>,
    /// Position ids `[batch, seq]`.
    pub position_ids: Option<Tensor>,
    /// Rotary tables `(cos, sin)`, each `[batch, seq, head_dim]`, for architectures that use them.
    pub rotary: Option<(Tensor, Tensor)>,
    /// The rotary tables of the sliding-window layers where their base differs from the others' (Gemma 3's
    /// `rope_local_base_freq`); `None`: they use `rotary`. See [`ForwardState::rotary_tables`].
    pub sliding_rotary: Option<(Tensor, Tensor)>,
    /// The key/value cache of a cached forward (generation): attention layers append their new keys and values
    /// and attend over all of them; `None` for a plain forward over the whole sequence.
    pub kv: Option<KvCache>,
    /// Run the language-model head on the last position only (logits `[batch, 1, vocab]`), as a decoding loop
    /// needs; false for the logits of every position.
    pub last_logits_only: bool,
}

impl ForwardState {
    /// The additive mask of an attention layer that slides (`sliding`) or attends to every earlier key: `None` for
    /// a plain causal pass.
    pub fn mask(&self, sliding: bool) -> Option<&Tensor> {
        match sliding {
            true => self.sliding_attention_mask.as_ref().or(self.attention_mask.as_ref()),
            false => self.attention_mask.as_ref(),
        }
    }

    /// The rotary tables of an attention layer that slides (`sliding`) or not.
    pub fn rotary_tables(&self, sliding: bool) -> Option<&(Tensor, Tensor)> {
        match sliding {
            true => self.sliding_rotary.as_ref().or(self.rotary.as_ref()),
            false => self.rotary.as_ref(),
        }
    }
}

/// The context of one forward pass: the hook (if any) and the shared side inputs.
#[derive(Default)]
pub struct Ctx<'h> {
    hook: Option<&'h mut dyn Hook>,
    /// Side inputs of this pass.
    pub state: ForwardState,
}

impl<'h> Ctx<'h> {
    /// A context without hooks: the modules run as plain code.
    pub fn new() -> Self {
        Ctx::default()
    }

    /// A context whose `hook` sees every module call.
    pub fn with_hook(hook: &'h mut dyn Hook) -> Self {
        Ctx { hook: Some(hook), state: ForwardState::default() }
    }

    /// Runs `module` on `x` with the hooks around it. Every submodule call of every model goes through here.
    #[inline]
    pub fn call<M: Forward + ?Sized>(&mut self, module: &M, x: &Tensor) -> Result<Tensor> {
        let (x, skipped) = match self.hook.as_deref_mut() {
            None => return module.forward(self, x),
            Some(hook) => {
                let x = hook.input(module.path(), x.shallow_clone())?;
                let skipped = hook.skip(module.path(), &x)?;
                (x, skipped)
            }
        };
        let y = match skipped {
            Some(y) => y,
            None => module.forward(self, &x)?,
        };
        match self.hook.as_deref_mut() {
            Some(hook) => hook.output(module.path(), y),
            None => Ok(y),
        }
    }

    /// Whether anything wants one of the inner points `names` of the module at `module` (false at once without a
    /// hook). A module with inner points checks this first and runs its fast path when nothing does.
    #[inline]
    pub fn wants_points(&mut self, module: &str, names: &[&str]) -> bool {
        match self.hook.as_deref_mut() {
            None => false,
            Some(hook) => hook.wants_points(module, names),
        }
    }

    /// The inner point `name` of the module at `module`, with value `t`: the hook sees it under the path
    /// `module.name` and may replace it; the forward goes on with what this returns.
    pub fn point(&mut self, module: &str, name: &str, t: Tensor) -> Result<Tensor> {
        match self.hook.as_deref_mut() {
            None => Ok(t),
            Some(hook) => hook.point(&join_path(module, name), t),
        }
    }
}

/// Joins a parent path and a child name with a dot (`""` + `model` = `model`).
pub fn join_path(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_string()
    } else {
        format!("{parent}.{child}")
    }
}
