//! Gradients inside a run: `.backward()` of a loss the graph computed, the `.grad` reads it feeds, gradient writes
//! (tensor hooks that replace a gradient as it flows back), and parameters made trainable for one run.

use super::{eval, find, Interleaver};
use crate::graph::{display, NodeId, Op, Value};
use crate::{Error, Result};
use tch::Tensor;

/// A gradient write installed for one backward: its hook, the read it writes, its node, and the gradient it wrote.
pub(super) struct GradientWrite {
    hook: crate::autograd::HookHandle,
    read: NodeId,
    node: NodeId,
    written: std::sync::Arc<std::sync::Mutex<Option<Tensor>>>,
    /// What went wrong computing the new gradient, if something did (reported after the backward).
    failed: std::sync::Arc<std::sync::Mutex<Option<Error>>>,
}

impl Interleaver<'_> {
    /// `loss.backward()` (node `id`, loss node `loss`, invoke `inv`): the gradients of the loss with respect to
    /// every read a `Grad` node of this backward names, each cut to the invoke's rows.
    pub(super) fn backward(&mut self, id: NodeId, loss: NodeId, inv: usize) -> Result<()> {
        let l = self.values[loss as usize].as_ref().expect("checked").tensor()?.shallow_clone();
        if l.numel() != 1 {
            return Err(Error::Intervention {
                message: format!(
                    "node {id}: `.backward()` needs a single value (e.g. `.sum()`), found shape {:?}",
                    l.size()
                ),
            });
        }
        // (Grad node, whole-batch source, whether to cut it to the invoke's rows).
        let mut wanted: Vec<(NodeId, Tensor, bool)> = Vec::new();
        for (g, n) in self.graph.nodes.iter().enumerate() {
            match &n.op {
                Op::Grad { a, backward } if *backward == id => {
                    let src = self.grad_sources.get(a).ok_or_else(|| Error::Intervention {
                        message: format!(
                            "node {g}: the gradient of node {a} ({}) is wanted, but that value was not read before the loss was computed",
                            self.graph.nodes[*a as usize].op.describe()
                        ),
                    })?;
                    wanted.push((g as NodeId, src.shallow_clone(), true));
                }
                Op::ParamGrad { module, param, backward } if *backward == id => {
                    let t = self.params.get(&(module.clone(), param.clone())).expect("made to require grad at start");
                    wanted.push((g as NodeId, t.shallow_clone(), false));
                }
                _ => {}
            }
        }
        let sources: Vec<Tensor> = wanted.iter().map(|w| w.1.shallow_clone()).collect();
        let trains = self.trains();
        if sources.is_empty() && !trains {
            return Ok(());
        }
        if !l.requires_grad() {
            return Err(Error::Intervention {
                message: format!(
                    "node {id}: the loss does not depend on any value whose gradient is read, nor on any tensor that requires grad"
                ),
            });
        }
        let hooks = self.gradient_writes(id, inv)?;
        let grads = if sources.is_empty() {
            Ok(Vec::new())
        } else {
            Tensor::f_run_backward(&[&l], &sources, true, false).map_err(|e| Error::Intervention {
                message: format!(
                    "node {id} (backward): {} (is every value whose gradient is read upstream of the loss in the forward pass?)",
                    crate::error::clean_torch_message(&e.to_string())
                ),
            })
        };
        // Training: `.grad` of every trainable leaf accumulates, as `loss.backward()` does in PyTorch (with the
        // gradient writes' hooks still on). The parameters made to require grad for a `.grad` read only get none.
        let accumulated = if trains && grads.is_ok() {
            let r = crate::ffi::backward(&l, true).map_err(|e| Error::Intervention {
                message: format!(
                    "node {id} (backward into trainable tensors): {}",
                    crate::error::clean_torch_message(&e.to_string())
                ),
            });
            for t in &self.params_to_reset {
                crate::ffi::reset_grad(t);
            }
            r
        } else {
            Ok(())
        };
        let mut hook_errors = Vec::new();
        let mut written: Vec<(NodeId, NodeId, Option<Tensor>)> = Vec::new();
        for h in hooks {
            hook_errors.extend(h.hook.take_errors());
            hook_errors.extend(h.failed.lock().unwrap_or_else(|p| p.into_inner()).take());
            h.hook.remove();
            let t = h.written.lock().unwrap_or_else(|p| p.into_inner()).take();
            written.push((h.read, h.node, t));
        }
        if let Some(e) = hook_errors.into_iter().next() {
            return Err(e);
        }
        let grads = grads?;
        accumulated?;
        for ((g, _, rows), grad) in wanted.into_iter().zip(grads) {
            // A gradient read after a write of it is the written one (autograd hands back the one before hooks).
            let after_write = match self.graph.nodes[g as usize].op {
                Op::Grad { a, .. } => written
                    .iter()
                    .rev()
                    .filter(|w| w.0 == a && w.1 < g)
                    .find_map(|w| w.2.as_ref())
                    .map(Tensor::shallow_clone),
                _ => None,
            };
            let grad = after_write.unwrap_or(grad);
            let mine = if rows { self.my_rows(inv, &grad)? } else { grad };
            self.grads.insert(g, mine);
        }
        Ok(())
    }

    /// The gradient writes of backward `id` (invoke `inv`) as tensor hooks on the values they name: each hook
    /// computes the write's value from the incoming gradient (the nodes after the backward that it depends on, run
    /// inside the hook) and hands it on upstream in the invoke's rows.
    pub(super) fn gradient_writes(&self, id: NodeId, inv: usize) -> Result<Vec<GradientWrite>> {
        let mut hooks = Vec::new();
        for (w, n) in self.graph.nodes.iter().enumerate() {
            let Op::GradWrite { a, value, backward } = n.op else { continue };
            if backward != id {
                continue;
            }
            // The nodes after the backward that `value` depends on, in order, and the earlier values they use.
            let mut chain = std::collections::BTreeSet::new();
            let mut stack = vec![value];
            let mut outside: Vec<(NodeId, Value)> = Vec::new();
            while let Some(j) = stack.pop() {
                if j <= id {
                    let v = self.values[j as usize].as_ref().ok_or_else(|| Error::Intervention {
                        message: format!("the gradient write to node {a} needs node {j}, which has no value"),
                    })?;
                    outside.push((j, v.shallow_clone()));
                    continue;
                }
                if !chain.insert(j) {
                    continue;
                }
                match &self.graph.nodes[j as usize].op {
                    Op::Grad { a: ga, backward: gb } if *ga == a && *gb == id => {}
                    op if op.hook_point().is_some() || matches!(op, Op::Grad { .. } | Op::ParamGrad { .. }) => {
                        return Err(Error::Intervention {
                            message: format!(
                                "the gradient write to node {a} depends on node {j} ({}), which is not known while the gradient flows back",
                                op.describe()
                            ),
                        });
                    }
                    op => stack.extend(op.inputs()),
                }
            }
            let ops: Vec<(NodeId, Op)> = chain.iter().map(|&j| (j, self.graph.nodes[j as usize].op.clone())).collect();
            let src = self.grad_sources.get(&a).expect("a read whose gradient is written").shallow_clone();
            let (start, len) = self.rows[inv];
            let whole = start == 0 && len == self.batch;
            let written = std::sync::Arc::new(std::sync::Mutex::new(None::<Tensor>));
            let keep = written.clone();
            let failed = std::sync::Arc::new(std::sync::Mutex::new(None::<Error>));
            let report = failed.clone();
            let hook = crate::autograd::register_hook(&src, move |g: &Tensor| {
                let mine = if whole { g.shallow_clone() } else { g.narrow(0, start, len) };
                let computed = (|| -> Result<Tensor> {
                    let mut vals: ahash::AHashMap<NodeId, Value> =
                        outside.iter().map(|(j, v)| (*j, v.shallow_clone())).collect();
                    for (j, op) in &ops {
                        let v = match op {
                            Op::Grad { .. } => Value::Tensor(mine.shallow_clone()),
                            op => {
                                let inputs: Vec<&Value> = op.inputs().iter().map(|k| &vals[k]).collect();
                                eval(op, &inputs).map_err(|e| Error::Intervention {
                                    message: format!(
                                        "the gradient write to node {a}: node {j} ({}): {e}",
                                        op.describe()
                                    ),
                                })?
                            }
                        };
                        vals.insert(*j, v);
                    }
                    let new = vals[&value].tensor()?.shallow_clone();
                    if new.size() != mine.size() {
                        return Err(Error::Intervention {
                            message: format!(
                                "the gradient write to node {a}: the new gradient has shape {:?}, the gradient it replaces {:?}",
                                new.size(),
                                mine.size()
                            ),
                        });
                    }
                    Ok(new)
                })();
                match computed {
                    Ok(new) => {
                        let new = new.to_kind(g.kind());
                        let full = if whole { new } else { g.slice_scatter(&new, 0, start, start + len, 1) };
                        *keep.lock().unwrap_or_else(|p| p.into_inner()) = Some(full.shallow_clone());
                        Some(full)
                    }
                    Err(e) => {
                        // The gradient flows on unchanged; the run reports the error once the backward is over.
                        report.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                        None
                    }
                }
            })?;
            hooks.push(GradientWrite { hook, read: a, node: w as NodeId, written, failed });
        }
        Ok(hooks)
    }

    /// Whether the graph takes gradients (the forward then runs with autograd on): it reads gradients, or it
    /// backpropagates into trainable tensors.
    pub fn wants_gradients(&self) -> bool {
        !self.grad_reads.is_empty()
            || self.graph.nodes.iter().any(|n| matches!(n.op, Op::ParamGrad { .. }))
            || (self.graph.nodes.iter().any(|n| matches!(n.op, Op::Backward { .. })) && self.trains())
    }

    /// Whether a backward trains something: the graph uses a tensor that requires grad, or some parameter of the
    /// model requires grad (other than those made to for a `.grad` read of this run).
    pub(super) fn trains(&self) -> bool {
        self.live.is_some()
            || crate::nn::named_parameters(self.root)
                .iter()
                .any(|(_, t)| t.requires_grad() && !self.params_to_reset.iter().any(|r| crate::ffi::same_tensor(r, t)))
    }

    /// Makes the parameters whose gradients the graph reads require grad for this run (they are put back when
    /// the interleaver is dropped). A parameter that does not exist is an error naming it.
    pub fn prepare_gradients(&mut self) -> Result<()> {
        for n in &self.graph.nodes {
            let Op::ParamGrad { module, param, .. } = &n.op else { continue };
            let key = (module.clone(), param.clone());
            if self.params.contains_key(&key) {
                continue;
            }
            let m = find(self.root, module)
                .ok_or_else(|| Error::Intervention { message: format!("no module `{}`", display(module)) })?;
            let mut found = None;
            m.parameters(&mut |name, t| {
                if name == param {
                    found = Some(t.shallow_clone());
                }
            });
            let t = found.ok_or_else(|| Error::Intervention {
                message: format!("`{}` has no parameter `{param}`", display(module)),
            })?;
            if t.requires_grad() {
                // Already trainable: leave it as it is (and as it will be).
                self.params.insert(key, t);
            } else {
                let _ = t.set_requires_grad(true);
                self.params_to_reset.push(t.shallow_clone());
                self.params.insert(key, t);
            }
        }
        Ok(())
    }
}
