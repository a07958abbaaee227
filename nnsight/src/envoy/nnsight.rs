//! [`NNsight`]: any `Traceable` module of your own as a trace target, on tensor inputs.

use super::Traceable;
use crate::exec::{OrderRecorder, Prepared, TraceTarget};
use crate::handle::builder::CallOrder;
use crate::nn::{Ctx, Forward, Hook};
use crate::{Error, Result};
use std::sync::{Arc, OnceLock};
use tch::Tensor;

/// Any `Traceable` module (a model of your own, built from `nnsight::nn` layers), traced on tensor inputs whose
/// first dimension is the batch.
pub struct NNsight<M: Traceable + Forward> {
    module: M,
    envoy: OnceLock<M::Envoy>,
    order: OnceLock<Arc<CallOrder>>,
    /// In-place edits, applied before every run.
    edits: crate::exec::EditList,
}

impl<M: Traceable + Forward> NNsight<M> {
    /// Wraps `module` as the root (path `""`): every submodule gets its dotted path.
    pub fn new(mut module: M) -> Self {
        crate::ffi::keep_torch_cuda();
        module.set_path("");
        NNsight { module, envoy: OnceLock::new(), order: OnceLock::new(), edits: crate::exec::EditList::new() }
    }

    /// The module.
    pub fn module(&self) -> &M {
        &self.module
    }

    /// A plain forward pass.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _g = tch::no_grad_guard();
        crate::exec::edits::with_edits(&self.edits, &self.module, false, None, |hook| match hook {
            Some(h) => Ctx::with_hook(h).call(&self.module, x),
            None => Ctx::new().call(&self.module, x),
        })
    }

    /// Removes the in-place edits: outputs are again exactly those of the unedited module.
    pub fn clear_edits(&self) {
        self.edits.clear();
    }

    /// The module tree, printable like `print(model)` in PyTorch.
    pub fn tree(&self) -> crate::nn::ModuleTree<'_> {
        crate::nn::ModuleTree(&self.module)
    }
}

impl<M: Traceable + Forward> TraceTarget for NNsight<M> {
    type Root = M;
    type Input = Tensor;
    type Prepared = Tensor;
    type View = M::Envoy;

    fn root(&self) -> &M {
        &self.module
    }
    fn view(&self) -> &M::Envoy {
        self.envoy.get_or_init(|| self.module.envoy())
    }
    fn call_order(&self, sample: Option<&Tensor>) -> Result<Option<Arc<CallOrder>>> {
        match (self.order.get(), sample) {
            (Some(o), _) => Ok(Some(o.clone())),
            (None, None) => Ok(None),
            (None, Some(x)) => Ok(OrderRecorder::record_once(&self.order, |hook| {
                Ctx::with_hook(hook).call(&self.module, x).map(|_| ())
            })),
        }
    }
    fn prepare(&self, inputs: &[Option<Tensor>]) -> Result<Prepared<Tensor>> {
        let given: Vec<&Tensor> = inputs.iter().flatten().collect();
        if given.is_empty() {
            return Err(Error::InvalidInput { message: "no invoke has an input".into() });
        }
        let batch = Tensor::f_cat(&given, 0).map_err(|e| Error::InvalidInput {
            message: format!(
                "the invokes' inputs cannot be batched along the first dimension: {}",
                crate::error::clean_torch_message(&e.to_string())
            ),
        })?;
        let total = batch.size()[0];
        let mut start = 0;
        let rows = inputs
            .iter()
            .map(|i| match i {
                Some(t) => {
                    let n = t.size()[0];
                    start += n;
                    (start - n, n)
                }
                None => (0, total),
            })
            .collect();
        Ok((batch, rows, total))
    }
    fn forward_hooked(&self, batch: &Tensor, hook: &mut dyn Hook) -> Result<()> {
        Ctx::with_hook(hook).call(&self.module, batch).map(|_| ())
    }
    fn edits(&self) -> Vec<Arc<crate::graph::Graph>> {
        self.edits.snapshot()
    }
}

impl<M: Traceable + Forward> super::Editable for NNsight<M> {
    fn edit_list(&self) -> &crate::exec::EditList {
        &self.edits
    }
}
