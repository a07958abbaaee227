//! One set of names for every architecture: the standard view.
//!
//! Research code written once should run on every family. Inside `intervene!` over a
//! [`LanguageModel`](crate::LanguageModel), `model` has the Hugging Face names of its architecture
//! (`model.model.layers[5].mlp`, `model.transformer.h[5].mlp`, `model.gpt_neox.layers[5].mlp`) and, beside them,
//! the same names for every architecture:
//!
//! - `model.embed`: the token embedding;
//! - `model.layers[i]`: decoder layer `i` (`.input` is the residual stream before it, `.output` after it), with
//!   `.attn` (inner points `.query`, `.key`, `.probs`, `.head_output`) and `.mlp`;
//! - `model.final_norm`: the norm after the last layer; `model.unembed`: the unembedding;
//! - `model.output`: the logits.
//!
//! The README's "One set of names for every architecture" lists what they stand for in each family.
//!
//! Each standard name is another handle on the same module, so a standard read equals the Hugging Face-named read
//! node for node, and paths are checked at compile time as ever: `model.layers[0].atn` fails to compile under
//! `atn`. A function generic over the architecture, `fn f<M: CausalLm>(model: &LanguageModel<M>)`, can only use
//! the standard names (the architecture's own are unknown to it); so can code over an
//! [`AutoModel`](super::AutoModel), whose architecture is known only at run time.
//!
//! An architecture states where its standard names point with [`CausalLm::standard_names`](super::CausalLm).

use crate::handle::{Envoy, HookPoint, InnerPoint, InputsPoint, ModuleListEnvoy, Points};
use crate::nn::join_path;
use std::ops::Deref;
use tch::Tensor;

/// Where an architecture's standard names point: Hugging Face module paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandardNames {
    /// The token embedding (`"model.embed_tokens"`).
    pub embed: &'static str,
    /// The list of decoder layers (`"model.layers"`).
    pub layers: &'static str,
    /// A layer's attention, relative to the layer (`"self_attn"`).
    pub attention: &'static str,
    /// A layer's MLP, relative to the layer (`"mlp"`).
    pub mlp: &'static str,
    /// The norm after the last layer (`"model.norm"`).
    pub final_norm: &'static str,
    /// The unembedding (`"lm_head"`).
    pub unembed: &'static str,
    /// How many decoder layers the model has.
    pub n_layers: usize,
}

impl StandardNames {
    /// The names of the Llama layout (`model.embed_tokens`, `model.layers[i].{self_attn, mlp}`, `model.norm`,
    /// `lm_head`), which Mistral, Qwen and others share, for a model of `n_layers` layers.
    pub fn llama_layout(n_layers: usize) -> Self {
        StandardNames {
            embed: "model.embed_tokens",
            layers: "model.layers",
            attention: "self_attn",
            mlp: "mlp",
            final_norm: "model.norm",
            unembed: "lm_head",
            n_layers,
        }
    }

    /// The module path of layer `i` (`model.layers.3`).
    pub fn layer(&self, i: usize) -> String {
        join_path(self.layers, &i.to_string())
    }
}

/// A module reached by a standard name: its hook points, and a handle for ad-hoc calls (`model.final_norm(h)`)
/// and skips.
#[derive(Debug)]
pub struct StandardModule {
    /// Its output.
    pub output: HookPoint<Tensor>,
    /// Its first input.
    pub input: HookPoint<Tensor>,
    /// All its inputs.
    pub inputs: InputsPoint,
}

impl StandardModule {
    fn new(path: &str) -> Self {
        let p = Points::new(path);
        StandardModule { output: p.output(), input: p.input(), inputs: p.inputs() }
    }
}

impl Envoy for StandardModule {
    fn module_path(&self) -> &str {
        self.output.module()
    }
}

/// A layer's attention by its standard name: the module's hook points and the inner points every architecture's
/// attention has (shapes as documented on each architecture's attention: `query` `[batch, heads, seq, head_dim]`,
/// `key` `[batch, kv_heads, seq, head_dim]`, `probs` `[batch, heads, q, k]`, `head_output`
/// `[batch, seq, heads, head_dim]`).
#[derive(Debug)]
pub struct StandardAttention {
    /// Its output.
    pub output: HookPoint<Tensor>,
    /// Its first input (the normed residual stream).
    pub input: HookPoint<Tensor>,
    /// All its inputs.
    pub inputs: InputsPoint,
    /// The queries, after any norm and the rotary embedding.
    pub query: InnerPoint,
    /// The keys of this forward, after any norm and the rotary embedding.
    pub key: InnerPoint,
    /// The attention probabilities used.
    pub probs: InnerPoint,
    /// Each head's output, before the output projection.
    pub head_output: InnerPoint,
}

impl Envoy for StandardAttention {
    fn module_path(&self) -> &str {
        self.output.module()
    }
}

/// A decoder layer by its standard name: `.input` is the residual stream before it, `.output` after it.
#[derive(Debug)]
pub struct StandardLayer {
    /// The residual stream after this layer.
    pub output: HookPoint<Tensor>,
    /// The residual stream before this layer.
    pub input: HookPoint<Tensor>,
    /// All its inputs.
    pub inputs: InputsPoint,
    /// Its attention.
    pub attn: StandardAttention,
    /// Its MLP.
    pub mlp: StandardModule,
}

impl Envoy for StandardLayer {
    fn module_path(&self) -> &str {
        self.output.module()
    }
}

/// `model` inside `intervene!` over a [`LanguageModel`](crate::LanguageModel): the architecture's own envoy
/// (its Hugging Face names, reached through `Deref`) and the standard names beside it (see the [module
/// docs](self)).
#[derive(Debug)]
pub struct StandardEnvoy<E> {
    own: E,
    /// The logits.
    pub output: HookPoint<Tensor>,
    /// The input ids.
    pub input: HookPoint<Tensor>,
    /// All the root's inputs.
    pub inputs: InputsPoint,
    /// The token embedding.
    pub embed: StandardModule,
    /// The decoder layers.
    pub layers: ModuleListEnvoy<StandardLayer>,
    /// The norm after the last layer.
    pub final_norm: StandardModule,
    /// The unembedding: `unembed(final_norm(h))` are logits (before any final soft-capping).
    pub unembed: StandardModule,
}

impl<E> StandardEnvoy<E> {
    /// The standard view over `own`, the root envoy of a model whose modules `names` locates.
    pub fn new(own: E, names: &StandardNames) -> Self {
        let root = Points::new("");
        let layers = (0..names.n_layers)
            .map(|i| {
                let path = names.layer(i);
                let layer = Points::new(&path);
                let attn = join_path(&path, names.attention);
                let attn_points = Points::new(&attn);
                StandardLayer {
                    output: layer.output(),
                    input: layer.input(),
                    inputs: layer.inputs(),
                    attn: StandardAttention {
                        output: attn_points.output(),
                        input: attn_points.input(),
                        inputs: attn_points.inputs(),
                        query: InnerPoint::new(&attn, "query"),
                        key: InnerPoint::new(&attn, "key"),
                        probs: InnerPoint::new(&attn, "probs"),
                        head_output: InnerPoint::new(&attn, "head_output"),
                    },
                    mlp: StandardModule::new(&join_path(&path, names.mlp)),
                }
            })
            .collect();
        StandardEnvoy {
            own,
            output: root.output(),
            input: root.input(),
            inputs: root.inputs(),
            embed: StandardModule::new(names.embed),
            layers: ModuleListEnvoy::new(names.layers, layers),
            final_norm: StandardModule::new(names.final_norm),
            unembed: StandardModule::new(names.unembed),
        }
    }

    /// The architecture's own envoy (its Hugging Face names).
    pub fn own(&self) -> &E {
        &self.own
    }
}

impl<E> Deref for StandardEnvoy<E> {
    type Target = E;
    fn deref(&self) -> &E {
        &self.own
    }
}

impl<E> Envoy for StandardEnvoy<E> {
    fn module_path(&self) -> &str {
        ""
    }
}
