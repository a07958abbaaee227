//! What an invoke does at a hook point: reads of its own rows, writes (whole or through an index) and skips, and
//! ad-hoc calls of a module outside the forward pass.

use super::{display, eval, find, tensor_ops, Interleaver};
use crate::graph::{IndexItem, NodeId, Op, Point, Value};
use crate::{Error, Result};
use tch::Tensor;

impl Interleaver<'_> {
    pub(super) fn hook_node(&mut self, id: NodeId, inv: usize, y: &mut Tensor) -> Result<Option<Value>> {
        let op = &self.graph.nodes[id as usize].op;
        match op {
            Op::Read { .. } if self.grad_reads.contains(&id) => {
                // A gradient will be taken with respect to this value: it must be in the autograd graph. The first
                // such value of a pass becomes a leaf that requires grad; what the model computes from it follows.
                if !y.requires_grad() {
                    *y = y.detach().set_requires_grad(true);
                }
                self.grad_sources.insert(id, y.shallow_clone());
                Ok(Some(Value::Tensor(self.my_rows(inv, y)?)))
            }
            Op::Read { .. } => Ok(Some(Value::Tensor(self.my_rows(inv, y)?))),
            Op::ReadInputs { .. } => Ok(Some(Value::Tuple(vec![Value::Tensor(self.my_rows(inv, y)?)]))),
            Op::Skip { module, value, .. } => {
                let v = match self.values[*value as usize].as_ref().expect("checked") {
                    Value::Tensor(t) => t.shallow_clone(),
                    other => {
                        return Err(Error::Intervention {
                            message: format!(
                            "node {id} (skip of `{}`): the value must be a tensor with the invoke's rows, found a {}",
                            display(module),
                            other.kind_name()
                        ),
                        })
                    }
                };
                self.skips.push((inv, v, id));
                Ok(None)
            }
            Op::Write { module, point, value, index, .. } => {
                let target =
                    format!("`{}` {}", display(module), if *point == Point::Input { "input" } else { "output" });
                // A number fills what it is written to, as a tensor of no dimensions does.
                let v = match self.values[*value as usize].as_ref().expect("checked") {
                    Value::Tensor(t) => t.shallow_clone(),
                    Value::Scalar(s) => Tensor::from(*s),
                    other => {
                        return Err(Error::Intervention {
                            message: format!(
                                "node {id} (write of {target}): expected a tensor or a number, found a {}",
                                other.kind_name()
                            ),
                        })
                    }
                };
                *y = self.write(inv, y, &v, index.as_deref(), &target)?;
                Ok(None)
            }
            _ => unreachable!("hook_node on a node without hook point"),
        }
    }

    pub(super) fn write(
        &self,
        inv: usize,
        y: &Tensor,
        v: &Tensor,
        index: Option<&[IndexItem]>,
        target: &str,
    ) -> Result<Tensor> {
        let f = |e| Error::torch(target.to_string(), e);
        let mine = self.my_rows(inv, y)?;
        let v = crate::meta::to_device_like(v, y).map_err(f)?.f_to_kind(y.kind()).map_err(f)?;
        let new_rows = match index {
            // A single number fills the whole value; a tensor must have its shape.
            None if v.dim() == 0 => v.f_expand(mine.size(), false).and_then(|e| e.f_contiguous()).map_err(f)?,
            None => {
                if v.size() != mine.size() {
                    return Err(Error::WriteShape { target: target.into(), expected: mine.size(), given: v.size() });
                }
                v
            }
            Some(items) => {
                let copy = tensor_ops::copy(&mine).map_err(f)?;
                let mut slot = tensor_ops::index(&copy, items).map_err(|e| eval::placed(e, || target.to_string()))?;
                let (want, given) = (slot.size(), v.size());
                if v.f_broadcast_to(want.as_slice()).is_err() {
                    return Err(Error::WriteShape {
                        target: format!("{target}[{}]", tensor_ops::index_text(items)),
                        expected: want,
                        given,
                    });
                }
                slot.f_copy_(&v).map_err(f)?;
                copy
            }
        };
        let (start, len) = self.rows[inv];
        if start == 0 && len == self.batch {
            Ok(new_rows)
        } else {
            y.f_slice_scatter(&new_rows, 0, start, start + len, 1).map_err(f)
        }
    }

    pub(super) fn apply(&self, module: &str, x: &Value) -> Result<Value> {
        let m = find(self.root, module)
            .ok_or_else(|| Error::Intervention { message: format!("no module `{}` to call", display(module)) })?;
        let fwd = m.as_forward().ok_or_else(|| Error::Intervention {
            message: format!("`{}` ({}) cannot be called", display(module), m.kind()),
        })?;
        let mut cx = crate::nn::Ctx::new();
        Ok(Value::Tensor(fwd.forward(&mut cx, x.tensor()?)?))
    }
}

impl Interleaver<'_> {
    /// The output replacing `module`'s forward when every invoke skips it: each invoke's value in its rows.
    pub(super) fn take_skip(&mut self, module: &str, x: &Tensor) -> Result<Option<Tensor>> {
        if self.skips.is_empty() {
            return Ok(None);
        }
        let skips = std::mem::take(&mut self.skips);
        let n = self.active.len();
        let missing: Vec<usize> = self.active.clone().filter(|i| !skips.iter().any(|s| s.0 == *i)).collect();
        if !missing.is_empty() {
            return Err(Error::Intervention {
                message: format!(
                    "partial skip of `{}`: invoke(s) {:?} skip it but invoke(s) {:?} do not; every invoke must give a value, or none",
                    display(module),
                    skips.iter().map(|s| s.0).collect::<Vec<_>>(),
                    missing
                ),
            });
        }
        let f = |e| Error::torch(module.to_string(), e);
        if let [(inv, v, _)] = skips.as_slice() {
            let (start, len) = self.rows[*inv];
            if start == 0 && len == self.batch {
                self.check_skip(module, v, x)?;
                return Ok(Some(crate::meta::to_device_like(v, x).map_err(f)?));
            }
        }
        // Several invokes: each value fills its rows, in row order (rows do not overlap).
        let mut parts: Vec<(i64, Tensor)> = Vec::new();
        for (inv, v, _) in &skips {
            let (start, len) = self.rows[*inv];
            if len == self.batch && n > 1 {
                return Err(Error::Intervention {
                    message: format!(
                        "skip of `{}`: invoke {inv} sees the whole batch, so its value cannot be combined with the other invokes' values",
                        display(module)
                    ),
                });
            }
            if v.size().first() != Some(&len) {
                return Err(Error::BatchRows {
                    target: format!("skip of `{}` (invoke {inv})", display(module)),
                    rows: len,
                    given: v.size(),
                });
            }
            parts.push((start, crate::meta::to_device_like(v, x).map_err(f)?));
        }
        parts.sort_by_key(|p| p.0);
        let tensors: Vec<Tensor> = parts.into_iter().map(|p| p.1).collect();
        Tensor::f_cat(&tensors, 0).map(Some).map_err(|e| Error::Intervention {
            message: format!(
                "skip of `{}`: the invokes' values do not fit together: {}",
                display(module),
                crate::error::clean_torch_message(&e.to_string())
            ),
        })
    }

    /// A single skip value must have the batch's rows.
    pub(super) fn check_skip(&self, module: &str, v: &Tensor, x: &Tensor) -> Result<()> {
        if v.size().first() != x.size().first() {
            return Err(Error::BatchRows {
                target: format!("skip of `{}`", display(module)),
                rows: x.size().first().copied().unwrap_or(0),
                given: v.size(),
            });
        }
        Ok(())
    }
}
