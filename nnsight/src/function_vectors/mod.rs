//! Function vectors (Todd et al., "Function Vectors in Large Language Models", ICLR 2024; the "function vectors"
//! tutorial of Python nnsight), written once over the [standard names](crate::models::standard) so they run on
//! every architecture.
//!
//! A task shown in context ("hot: cold\nbig: small\n...\nfast:") is carried, at the prompt's last token, by the
//! outputs of a few attention heads. The recipe:
//!
//! 1. **Mean head activations** ([`mean_head_activations`]): each head's output before the attention's output
//!    projection (`model.layers[l].attn.head_output`) at the last token, averaged over in-context prompts:
//!    `[layers, heads, head_dim]`. [`head_outputs`] takes them through the output projection, each head through
//!    its own columns (`o_proj`'s `W[:, h·d..(h+1)·d] · mean`, without the projection's bias): `[layers, heads,
//!    hidden]`, vectors of the residual stream. [`mean_head_outputs`] gives both.
//! 2. **Causal indirect effects** ([`causal_indirect_effects`]): each head's mean activation patched, at the last
//!    token, into prompts whose in-context labels are shuffled (the task is no longer shown, only the format); the
//!    effect is the rise of the probability of the correct answer's first token, averaged over the prompts:
//!    `[layer, head]` as a [`Labelled`]. It is a sweep: one trace with an invoke per head and prompt, which the
//!    runtime batches (see [`crate::exec::batching`]: passes of at most 64 rows, the layers before a pass's first
//!    patched layer run once per prompt, the head on the last position only).
//! 3. **The function vector** ([`FunctionVector::from_heads`]): the sum of the top heads' mean outputs
//!    ([`top_heads`] ranks them by effect).
//! 4. **Adding it** to the residual stream after one decoder layer (`model.layers[l].output`) at the last position
//!    of a zero-shot prompt ([`FunctionVector::edit`] as a persistent edit, [`FunctionVector::next_tokens`] to read
//!    the top next token of prompts with it, [`FunctionVector::layer_sweep`] for every layer at once; by hand, add
//!    [`FunctionVector::addition`] in any `intervene!` block).
//!
//! Prompts of unequal length run left-padded in one batch, so every prompt's last token is the batch's last
//! position.

use crate::envoy::Edited;
use crate::language_model::LanguageModel;
use crate::models::CausalLm;
use crate::patching::{Axis, Labelled};
use crate::{intervene, Error, Result};
use tch::{Device, IndexOp, Kind, Tensor};

/// Each head's mean activation over in-context prompts, before and after the output projection: what
/// [`mean_head_outputs`] gives.
#[derive(Debug)]
pub struct HeadMeans {
    /// Before the output projection (`attn.head_output` at the last token): `[layers, heads, head_dim]`, float32
    /// on the CPU.
    pub activations: Tensor,
    /// Through the output projection, each head through its own columns: `[layers, heads, hidden]`, float32 on
    /// the CPU.
    pub outputs: Tensor,
}

/// The mean over `prompts` of each head's output before the attention's output projection
/// (`model.layers[l].attn.head_output`) at the prompt's last token: `[layers, heads, head_dim]`, float32 on the
/// CPU. The prompts run as the invokes of one trace.
///
/// # Errors
/// [`Error::InvalidInput`] when there is no prompt or a prompt has no tokens; errors of the trace.
pub fn mean_head_activations<M: CausalLm>(model: &LanguageModel<M>, prompts: &[impl AsRef<str>]) -> Result<Tensor> {
    let encoded = encode_all(model, prompts, "mean_head_activations")?;
    let n_layers = model.standard_names().n_layers;
    intervene!(model.trace() {
        let mut acts = Vec::new();
        for ids in &encoded {
            invoke(ids.clone()) {
                for l in 0..n_layers {
                    acts.push(model.layers[l].attn.head_output.output.i((0, -1)).save()); // [heads, head_dim]
                }
            }
        }
    });
    let acts: Vec<Tensor> = acts.iter().map(cpu_float).collect();
    let (heads, head_dim) = (acts[0].size()[0], acts[0].size()[1]);
    let stacked = Tensor::stack(&acts, 0).view([encoded.len() as i64, n_layers as i64, heads, head_dim]);
    Ok(stacked.mean_dim(0, false, Kind::Float))
}

/// Each head's activation (`[layers, heads, head_dim]`, e.g. from [`mean_head_activations`]) through the
/// attention's output projection, each head through its own columns and without the projection's bias:
/// `[layers, heads, hidden]`, float32 on the CPU. Computed by the model itself, so it works for every projection
/// (a `Linear`, GPT-2's `Conv1D`): one trace of a one-token input with an invoke per head, which writes the head's
/// activation alone into `attn.head_output` at every layer and reads `attn.output`, less the output of an invoke
/// that writes zeros (the bias, where the projection has one).
///
/// # Errors
/// [`Error::InvalidInput`] when `activations` is not `[layers, heads, head_dim]` of this model.
pub fn head_outputs<M: CausalLm>(model: &LanguageModel<M>, activations: &Tensor) -> Result<Tensor> {
    let (n_layers, heads, head_dim) = head_shape(model)?;
    if activations.size() != [n_layers as i64, heads, head_dim] {
        return Err(Error::InvalidInput {
            message: format!(
                "function vectors: head_outputs expects activations of shape [layers, heads, head_dim] = \
                 [{n_layers}, {heads}, {head_dim}] for this model, but was given {:?}",
                activations.size()
            ),
        });
    }
    let (kind, device) = model_kind_device(model)?;
    let acts = activations.to_kind(kind).to_device(device);
    // written[h][l]: [1, heads, head_dim] with only head h set (h == heads: all zero).
    let written: Vec<Vec<Tensor>> = (0..=heads)
        .map(|h| {
            (0..n_layers)
                .map(|l| {
                    let x = Tensor::zeros([1, heads, head_dim], (kind, device));
                    if h < heads {
                        x.i((0, h)).copy_(&acts.i((l as i64, h)));
                    }
                    x
                })
                .collect()
        })
        .collect();
    intervene!(model.trace() {
        let mut outs = Vec::new();
        for per_layer in &written {
            invoke(vec![0_i64]) {
                for (l, written) in per_layer.iter().enumerate() {
                    model.layers[l].attn.head_output.output[(.., -1)] = written;
                    outs.push(model.layers[l].attn.output.i((0, -1)).save()); // [hidden]
                }
            }
        }
    });
    let outs: Vec<Tensor> = outs.iter().map(cpu_float).collect();
    let hidden = outs[0].size()[0];
    let all = Tensor::stack(&outs, 0).view([heads + 1, n_layers as i64, hidden]);
    let bias = all.i(heads);
    Ok((all.i(..heads) - bias).transpose(0, 1).contiguous())
}

/// [`mean_head_activations`] over `prompts` and their [`head_outputs`].
///
/// # Errors
/// Those of the two.
pub fn mean_head_outputs<M: CausalLm>(model: &LanguageModel<M>, prompts: &[impl AsRef<str>]) -> Result<HeadMeans> {
    let activations = mean_head_activations(model, prompts)?;
    let outputs = head_outputs(model, &activations)?;
    Ok(HeadMeans { activations, outputs })
}

/// The probability of `answers[i]` (a token id) as the next token of `prompts[i]`, for each prompt, in one trace.
///
/// # Errors
/// [`Error::InvalidInput`] when the lengths differ, there is no prompt or a prompt has no tokens.
pub fn answer_probabilities<M: CausalLm>(
    model: &LanguageModel<M>,
    prompts: &[impl AsRef<str>],
    answers: &[i64],
) -> Result<Vec<f64>> {
    let encoded = encode_with_answers(model, prompts, answers, "answer_probabilities")?;
    intervene!(model.trace() {
        let mut probs = Vec::new();
        for (ids, &answer) in encoded.iter().zip(answers) {
            invoke(ids.clone()) {
                probs.push(model.output.i((0, -1)).softmax(-1).i(answer).save());
            }
        }
    });
    Ok(probs.iter().map(|p| p.double_value(&[])).collect())
}

/// Each head's causal indirect effect: its mean activation (`activations`, `[layers, heads, head_dim]`, e.g. from
/// [`mean_head_activations`]) written into `attn.head_output` at the last token of each of `prompts` (in-context
/// prompts whose labels are shuffled), and the rise of the probability of the correct answer `answers[i]` (the
/// token id of the answer's first token) over the unpatched prompt, averaged over the prompts: `[layer, head]`.
/// One trace with an invoke per head and prompt, in layer order (see the [module docs](self)).
///
/// # Errors
/// [`Error::InvalidInput`] when the lengths differ, there is no prompt, a prompt has no tokens, or `activations`
/// is not `[layers, heads, head_dim]` of this model; errors of the traces.
pub fn causal_indirect_effects<M: CausalLm>(
    model: &LanguageModel<M>,
    activations: &Tensor,
    prompts: &[impl AsRef<str>],
    answers: &[i64],
) -> Result<Labelled> {
    let encoded = encode_with_answers(model, prompts, answers, "causal_indirect_effects")?;
    let (n_layers, heads, head_dim) = head_shape(model)?;
    if activations.size() != [n_layers as i64, heads, head_dim] {
        return Err(Error::InvalidInput {
            message: format!(
                "function vectors: causal_indirect_effects expects activations of shape [layers, heads, head_dim] \
                 = [{n_layers}, {heads}, {head_dim}] for this model, but was given {:?}",
                activations.size()
            ),
        });
    }
    let baseline = answer_probabilities(model, prompts, answers)?;
    let (kind, device) = model_kind_device(model)?;
    let acts = activations.to_kind(kind).to_device(device);
    intervene!(model.trace() {
        let mut probs = Vec::new();
        for l in 0..n_layers {
            for h in 0..heads {
                let mean = acts.i((l as i64, h)).unsqueeze(0); // [1, head_dim]
                for (ids, &answer) in encoded.iter().zip(answers) {
                    invoke(ids.clone()) {
                        model.layers[l].attn.head_output.output[(.., -1, h)] = &mean;
                        probs.push(model.output.i((0, -1)).softmax(-1).i(answer).save());
                    }
                }
            }
        }
    });
    let n = encoded.len();
    let effects: Vec<f64> = probs
        .chunks(n)
        .map(|cell| cell.iter().zip(&baseline).map(|(p, b)| p.double_value(&[]) - b).sum::<f64>() / n as f64)
        .collect();
    let values = Tensor::from_slice(&effects).view([n_layers as i64, heads]);
    Ok(Labelled { values, axes: vec![number_axis("layer", n_layers), number_axis("head", heads as usize)] })
}

/// The `k` heads of a `[layer, head]` grid (e.g. [`causal_indirect_effects`]) with the largest values, largest
/// first, as `(layer, head)`.
pub fn top_heads(grid: &Labelled, k: usize) -> Vec<(usize, usize)> {
    let values = grid.values.to_kind(Kind::Double).to_device(Device::Cpu);
    let (rows, cols) = (values.size()[0], values.size().get(1).copied().unwrap_or(1));
    let mut cells: Vec<(usize, usize, f64)> = (0..rows)
        .flat_map(|r| (0..cols).map(move |c| (r as usize, c as usize)))
        .map(|(r, c)| (r, c, values.double_value(&[r as i64, c as i64])))
        .collect();
    cells.sort_by(|a, b| b.2.total_cmp(&a.2));
    cells.into_iter().take(k).map(|(r, c, _)| (r, c)).collect()
}

/// A function vector: the sum of some heads' mean outputs (see the [module docs](self)).
#[derive(Debug)]
pub struct FunctionVector {
    /// The vector, `[hidden]`, float32 on the CPU.
    pub vector: Tensor,
    /// The heads summed, as `(layer, head)`.
    pub heads: Vec<(usize, usize)>,
}

impl FunctionVector {
    /// The sum of `outputs[layer, head]` over `heads` (`outputs` is `[layers, heads, hidden]`, e.g.
    /// [`HeadMeans::outputs`]).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when `heads` is empty or `outputs` is not three-dimensional;
    /// [`Error::IndexOutOfRange`] for a layer or head beyond `outputs`.
    pub fn from_heads(outputs: &Tensor, heads: &[(usize, usize)]) -> Result<Self> {
        let size = outputs.size();
        if size.len() != 3 || heads.is_empty() {
            return Err(Error::InvalidInput {
                message: format!(
                    "function vectors: from_heads expects head outputs of shape [layers, heads, hidden] and at least \
                     one head, but was given shape {size:?} and {} heads",
                    heads.len()
                ),
            });
        }
        for &(l, h) in heads {
            for (index, len, dim) in [(l, size[0], 0), (h, size[1], 1)] {
                if index as i64 >= len {
                    return Err(Error::IndexOutOfRange {
                        module: "the head outputs given to `FunctionVector::from_heads` ([layers, heads, hidden])"
                            .into(),
                        index: index as i64,
                        len: len as usize,
                        dim: Some(dim),
                    });
                }
            }
        }
        let outputs = cpu_float(outputs);
        let parts: Vec<Tensor> = heads.iter().map(|&(l, h)| outputs.i((l as i64, h as i64))).collect();
        let vector = Tensor::stack(&parts, 0).sum_dim_intlist(0, false, Kind::Float);
        Ok(FunctionVector { vector, heads: heads.to_vec() })
    }

    /// `strength * vector` in the model's dtype and on its device, to add to `model.layers[layer].output` at the
    /// last position (`[hidden]`, it broadcasts over rows):
    ///
    /// ```no_run
    /// # use nnsight::prelude::*;
    /// # use nnsight::function_vectors::FunctionVector;
    /// # fn f(model: &LanguageModel<Llama>, fv: &FunctionVector) -> nnsight::Result<()> {
    /// let add = fv.addition(model, 1.0)?;
    /// intervene!(model.trace("fast:") {
    ///     model.layers[6].output[(.., -1)] += &add;
    ///     let next = model.output.i((0, -1)).argmax(-1, false).save();
    /// });
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the vector's size is not the model's hidden size.
    pub fn addition<M: CausalLm>(&self, model: &LanguageModel<M>, strength: f64) -> Result<Tensor> {
        let (kind, device) = model_kind_device(model)?;
        let hidden = model_hidden(model)?;
        if self.vector.size() != [hidden] {
            return Err(Error::InvalidInput {
                message: format!(
                    "function vectors: the vector has shape {:?}, but this model's hidden size is {hidden}",
                    self.vector.size()
                ),
            });
        }
        Ok((&self.vector * strength).to_kind(kind).to_device(device))
    }

    /// An edited model that adds `strength * vector` to `model.layers[layer].output` at the last position of
    /// every row in every later forward pass of it (in a generation, at each step's new token).
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for a layer beyond the model; those of [`addition`](Self::addition).
    pub fn edit<'m, M: CausalLm>(
        &self,
        model: &'m LanguageModel<M>,
        layer: usize,
        strength: f64,
    ) -> Result<Edited<'m, LanguageModel<M>>> {
        check_layer(model, layer)?;
        let add = self.addition(model, strength)?;
        let edited = intervene!(model.edit() {
            model.layers[layer].output[(.., -1)] += &add;
        });
        Ok(edited)
    }

    /// The top next token of each prompt with `strength * vector` added to `model.layers[layer].output` at the
    /// last position (strength 0: the plain model), in one trace.
    ///
    /// # Errors
    /// As [`layer_sweep`](Self::layer_sweep).
    pub fn next_tokens<M: CausalLm>(
        &self,
        model: &LanguageModel<M>,
        prompts: &[impl AsRef<str>],
        layer: usize,
        strength: f64,
    ) -> Result<Vec<i64>> {
        Ok(self.layer_sweep(model, prompts, &[layer], strength)?.remove(0))
    }

    /// [`next_tokens`](Self::next_tokens) at each of `layers`, in one trace (an invoke per layer and prompt):
    /// `[layers][prompts]`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when there is no prompt or a prompt has no tokens; [`Error::IndexOutOfRange`] for
    /// a layer beyond the model; those of [`addition`](Self::addition).
    pub fn layer_sweep<M: CausalLm>(
        &self,
        model: &LanguageModel<M>,
        prompts: &[impl AsRef<str>],
        layers: &[usize],
        strength: f64,
    ) -> Result<Vec<Vec<i64>>> {
        let encoded = encode_all(model, prompts, "FunctionVector::layer_sweep")?;
        for &l in layers {
            check_layer(model, l)?;
        }
        let add = self.addition(model, strength)?;
        intervene!(model.trace() {
            let mut next = Vec::new();
            for &l in layers {
                for ids in &encoded {
                    invoke(ids.clone()) {
                        model.layers[l].output[(.., -1)] += &add;
                        next.push(model.output.i((0, -1)).argmax(-1, false).save());
                    }
                }
            }
        });
        Ok(next.chunks(encoded.len()).map(|row| row.iter().map(|t| t.int64_value(&[])).collect()).collect())
    }
}

/// The top next token of each prompt, unedited, in one trace.
///
/// # Errors
/// [`Error::InvalidInput`] when there is no prompt or a prompt has no tokens.
pub fn next_tokens<M: CausalLm>(model: &LanguageModel<M>, prompts: &[impl AsRef<str>]) -> Result<Vec<i64>> {
    let encoded = encode_all(model, prompts, "next_tokens")?;
    intervene!(model.trace() {
        let mut next = Vec::new();
        for ids in &encoded {
            invoke(ids.clone()) {
                next.push(model.output.i((0, -1)).argmax(-1, false).save());
            }
        }
    });
    Ok(next.iter().map(|t| t.int64_value(&[])).collect())
}

/// The token ids of every prompt; an error naming `what` when there is none or one is empty.
fn encode_all<M: CausalLm>(model: &LanguageModel<M>, prompts: &[impl AsRef<str>], what: &str) -> Result<Vec<Vec<i64>>> {
    if prompts.is_empty() {
        return Err(Error::InvalidInput { message: format!("function vectors: {what} needs at least one prompt") });
    }
    prompts
        .iter()
        .map(|p| {
            let ids = model.encode(p.as_ref())?;
            if ids.is_empty() {
                return Err(Error::InvalidInput {
                    message: format!("function vectors: {what}: the prompt {:?} has no tokens", p.as_ref()),
                });
            }
            Ok(ids)
        })
        .collect()
}

/// [`encode_all`], and a check that there is one answer per prompt.
fn encode_with_answers<M: CausalLm>(
    model: &LanguageModel<M>,
    prompts: &[impl AsRef<str>],
    answers: &[i64],
    what: &str,
) -> Result<Vec<Vec<i64>>> {
    if prompts.len() != answers.len() {
        return Err(Error::InvalidInput {
            message: format!(
                "function vectors: {what} needs one answer per prompt, but was given {} prompts and {} answers",
                prompts.len(),
                answers.len()
            ),
        });
    }
    encode_all(model, prompts, what)
}

/// `(layers, heads, head_dim)` of the model's attention, from a scan.
fn head_shape<M: CausalLm>(model: &LanguageModel<M>) -> Result<(usize, i64, i64)> {
    intervene!(model.scan(vec![0_i64]) {
        let shape = model.layers[0].attn.head_output.output.save();
    });
    let size = shape.size();
    Ok((model.standard_names().n_layers, size[2], size[3]))
}

/// The hidden size: the size of a layer's output, from a scan.
fn model_hidden<M: CausalLm>(model: &LanguageModel<M>) -> Result<i64> {
    intervene!(model.scan(vec![0_i64]) {
        let shape = model.layers[0].output.save();
    });
    Ok(*shape.size().last().unwrap_or(&0))
}

/// The dtype of the model's activations and its device.
fn model_kind_device<M: CausalLm>(model: &LanguageModel<M>) -> Result<(Kind, Device)> {
    intervene!(model.scan(vec![0_i64]) {
        let shape = model.layers[0].output.save();
    });
    Ok((shape.kind(), model.device()))
}

fn check_layer<M: CausalLm>(model: &LanguageModel<M>, layer: usize) -> Result<()> {
    let n_layers = model.standard_names().n_layers;
    if layer >= n_layers {
        return Err(Error::IndexOutOfRange {
            module: model.standard_names().layers.to_string(),
            index: layer as i64,
            len: n_layers,
            dim: None,
        });
    }
    Ok(())
}

fn cpu_float(t: &Tensor) -> Tensor {
    t.to_device(Device::Cpu).to_kind(Kind::Float)
}

fn number_axis(name: &'static str, n: usize) -> Axis {
    Axis { name, labels: (0..n).map(|i| i.to_string()).collect() }
}
