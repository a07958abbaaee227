//! The graph under construction while an `intervene!` block runs: nodes, the current invoke, and the checks
//! that can be made before the model runs (list bounds, forward order).

use super::proxy::Proxy;
use crate::graph::{display, Graph, NodeId, Op, Point};
use crate::{Error, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

/// The order in which a model's hook points fire in one forward pass: for each module, the position of its input
/// event and of its output event. Recorded once per model by a forward pass on one token.
#[derive(Debug, Clone, Default)]
pub struct CallOrder {
    events: HashMap<String, (u32, u32)>,
}

impl CallOrder {
    /// Builds the order from the sequence of events of one forward pass.
    pub fn from_events(events: &[(String, Point)]) -> Self {
        let mut map: HashMap<String, (u32, u32)> = HashMap::new();
        for (i, (module, point)) in events.iter().enumerate() {
            let e = map.entry(module.clone()).or_insert((u32::MAX, u32::MAX));
            match point {
                Point::Input if e.0 == u32::MAX => e.0 = i as u32,
                Point::Output if e.1 == u32::MAX => e.1 = i as u32,
                _ => {}
            }
        }
        CallOrder { events: map }
    }

    /// Position of `module`'s `point` event, if the module runs in a forward pass.
    pub fn position(&self, module: &str, point: Point) -> Option<u32> {
        self.events.get(module).map(|&(i, o)| if point == Point::Input { i } else { o })
    }

    /// Number of modules that run.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether no module runs.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[derive(Debug)]
pub(crate) struct Builder {
    pub(crate) graph: Graph,
    pub(crate) invoke: u32,
    pub(crate) n_invokes: u32,
    last_event: Vec<Option<(u32, String)>>,
    pub(crate) error: Option<Error>,
    pub(crate) order: Option<Arc<CallOrder>>,
}

/// The graph being built, shared by every proxy of one block.
#[derive(Debug)]
pub struct GraphCell {
    pub(crate) inner: RefCell<Builder>,
}

impl GraphCell {
    pub(crate) fn new(order: Option<Arc<CallOrder>>) -> Self {
        GraphCell {
            inner: RefCell::new(Builder {
                graph: Graph::default(),
                invoke: 0,
                n_invokes: 0,
                last_event: Vec::new(),
                error: None,
                order,
            }),
        }
    }

    /// Appends a node to the current invoke.
    pub(crate) fn push(&self, op: Op) -> NodeId {
        let mut b = self.inner.borrow_mut();
        let invoke = b.invoke;
        b.graph.push(op, invoke)
    }

    /// Keeps the first error found while building (reported when the graph runs).
    pub(crate) fn record_error(&self, e: Error) {
        let mut b = self.inner.borrow_mut();
        if b.error.is_none() {
            b.error = Some(e);
        }
    }

    /// Starts a new invoke; returns its index.
    pub(crate) fn begin_invoke(&self) -> u32 {
        let mut b = self.inner.borrow_mut();
        let i = b.n_invokes;
        b.n_invokes += 1;
        b.invoke = i;
        b.last_event.push(None);
        i
    }

    /// Checks that `module`'s `point` runs after everything the current invoke used so far.
    fn check_order(&self, module: &str, point: Point, what: &str) -> Result<()> {
        let mut b = self.inner.borrow_mut();
        let Some(order) = b.order.clone() else { return Ok(()) };
        let Some(pos) = order.position(module, point) else {
            return Err(Error::NeverReached {
                node: format!("{what} of `{}`", display(module)),
                reason: "this module does not run in the model's forward pass".into(),
            });
        };
        let desc = format!("`{}` {}", display(module), if point == Point::Input { "input" } else { "output" });
        let inv = b.invoke as usize;
        if b.last_event.len() <= inv {
            b.last_event.resize(inv + 1, None);
        }
        if let Some((last, last_desc)) = &b.last_event[inv] {
            if pos < *last {
                return Err(Error::OutOfOrder { later: last_desc.clone(), earlier: desc });
            }
        }
        b.last_event[inv] = Some((pos, desc));
        Ok(())
    }

    /// A read of `module`'s input or output (this invoke's rows).
    pub fn read<T>(&self, module: &str, point: Point) -> Result<Proxy<'_, T>> {
        self.check_order(module, point, "read")?;
        Ok(Proxy::new(self.push(Op::Read { module: module.into(), point, call: 0 }), self))
    }

    /// A read of all of `module`'s inputs.
    pub fn read_inputs<T>(&self, module: &str) -> Result<Proxy<'_, T>> {
        self.check_order(module, Point::Input, "read")?;
        Ok(Proxy::new(self.push(Op::ReadInputs { module: module.into(), call: 0 }), self))
    }

    /// A write of `value` to `module`'s input or output (this invoke's rows), or to a slice of it.
    pub fn write(
        &self,
        module: &str,
        point: Point,
        value: NodeId,
        index: Option<Vec<crate::graph::IndexItem>>,
    ) -> Result<()> {
        self.check_order(module, point, "write")?;
        self.push(Op::Write { module: module.into(), point, call: 0, value, index });
        Ok(())
    }

    /// A skip of `module` with `value` as this invoke's rows of its output.
    pub fn skip(&self, module: &str, value: NodeId) -> Result<()> {
        self.check_order(module, Point::Input, "skip")?;
        self.push(Op::Skip { module: module.into(), call: 0, value });
        Ok(())
    }

    /// An ad-hoc call of `module` on `input`, outside the forward pass.
    pub fn apply(&self, module: &str, input: NodeId) -> Proxy<'_, tch::Tensor> {
        Proxy::new(self.push(Op::Apply { module: module.into(), input }), self)
    }

    /// The current invoke's latest hook event so far (for branches, which each start from the same point).
    pub(crate) fn order_mark(&self) -> Option<(u32, String)> {
        let b = self.inner.borrow();
        b.last_event.get(b.invoke as usize).cloned().flatten()
    }

    /// Sets the current invoke's latest hook event (`None`: nothing yet).
    pub(crate) fn set_order_mark(&self, mark: Option<(u32, String)>) {
        let mut b = self.inner.borrow_mut();
        let inv = b.invoke as usize;
        if b.last_event.len() <= inv {
            b.last_event.resize(inv + 1, None);
        }
        b.last_event[inv] = mark;
    }

    /// Closes the branch of the guard node `guard`: it covers every node added since the guard.
    pub(crate) fn end_guard(&self, guard: NodeId) {
        let mut b = self.inner.borrow_mut();
        let end = b.graph.nodes.len() as NodeId;
        if let Some(Op::Guard { end: e, .. }) = b.graph.nodes.get_mut(guard as usize).map(|n| &mut n.op) {
            *e = end;
        }
    }

    /// The graph built so far.
    pub fn graph(&self) -> Graph {
        self.inner.borrow().graph.clone()
    }

    /// Number of nodes so far.
    pub fn len(&self) -> usize {
        self.inner.borrow().graph.nodes.len()
    }

    /// Whether no node was added.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
