//! The intervention graph: what an `intervene!` block builds and the interleaver runs alongside a forward pass.
//!
//! A graph is a list of [`Node`]s in the order the block created them. Each node belongs to an invoke (a group of
//! batch rows) and holds one [`Op`]: a read or write of a module's input or output, a constant, a tensor operation,
//! a save. Nodes refer to earlier nodes by [`NodeId`]. The whole graph is plain data (serde), so it can be written
//! out as JSON and sent to a server that runs only the ops it knows: no closures, no user code.
//!
//! The ops are grouped by kind: hooks, values and control, and gradients are [`Op`]'s own variants, which the
//! interleaver handles where it meets them; the pure tensor operations are [`TensorOp`]s (`tensor_op.rs`), each
//! evaluated, evaluated on shapes alone and checked for growth side by side in `interleave::tensor_ops`.

mod append;
mod decode;
mod tensor_op;
pub(crate) mod value;

#[cfg(test)]
mod tests;

pub use tensor_op::{BinaryOp, ReduceOp, TensorOp, UnaryOp};
pub use value::{Constant, IndexItem, TensorData, Value};

use serde::{Deserialize, Serialize};

thread_local! {
    /// Graphs run on this thread while a [`capture_graphs`] is active.
    static CAPTURED: std::cell::RefCell<Option<Vec<Graph>>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f`, collecting a copy of every graph that traces run meanwhile on this thread (to look at what an
/// `intervene!` block built, write it out as JSON, or send it elsewhere).
pub fn capture_graphs<T>(f: impl FnOnce() -> T) -> (T, Vec<Graph>) {
    let outer = CAPTURED.with(|c| c.borrow_mut().replace(Vec::new()));
    let out = f();
    let graphs = CAPTURED.with(|c| std::mem::replace(&mut *c.borrow_mut(), outer)).unwrap_or_default();
    (out, graphs)
}

/// Hands `graph` to an active [`capture_graphs`] (nothing otherwise).
pub(crate) fn note_run(graph: &Graph) {
    CAPTURED.with(|c| {
        if let Some(list) = c.borrow_mut().as_mut() {
            list.push(graph.clone());
        }
    });
}

/// Index of a node in its graph.
pub type NodeId = u32;

/// Which hook point of a module a node reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Point {
    /// The module's (first) input, before it runs.
    Input,
    /// The module's output, after it ran.
    Output,
}

/// One operation of the graph, grouped by kind: hooks (reads and writes of a module's inputs and outputs,
/// calls of a module, caches), values and control (constants, saves, conditions, registered functions), gradients,
/// and the pure tensor operations ([`TensorOp`], one variant here). Operands are earlier nodes (`a`, `b`, `xs`,
/// ...); each variant's doc says what it computes, and its field names follow PyTorch's arguments.
///
/// In JSON a node is an object tagged by `op` (`{"op": "read", "module": "layers.0", ...}`), a tensor op like any
/// other (`{"op": "cat", "xs": [1], "dim": 0}`, no wrapper); reading one that names no op known here is an error
/// naming it.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    // Hooks: what a node reads or changes of a module's run, or asks of a module.
    /// Read a module's input or output (this invoke's rows) at its `call`-th call.
    Read { module: String, point: Point, call: u32 },
    /// Read all inputs of a module (a tuple).
    ReadInputs { module: String, call: u32 },
    /// The token ids a generation produced (`model.generated()` in a generation block), `[rows, len]` (this
    /// invoke's rows), right-padded with -1: known only once the generation has ended, so the nodes that use it
    /// run then.
    Generated,
    /// Replace a module's input or output (this invoke's rows) by `value`; with `index`, only that slice.
    Write { module: String, point: Point, call: u32, value: NodeId, index: Option<Vec<IndexItem>> },
    /// Do not run `module` at its `call`-th call: this invoke's rows of its output are `value` (every invoke must
    /// skip it, or none).
    Skip { module: String, call: u32, value: NodeId },
    /// Run a module on `input` outside the forward pass (an ad-hoc call, no hooks).
    Apply { module: String, input: NodeId },
    /// Record, from here on, the outputs (and with `inputs`, the inputs) of every module (or of `modules`), after
    /// interventions, this invoke's rows, moved to `device` if given; the value is the whole record at the end.
    Cache { modules: Option<Vec<String>>, inputs: bool, device: Option<String> },

    // Values and control: constants, what leaves the run, and what decides which nodes run.
    /// A constant.
    Const { value: Constant },
    /// Keep the value of `value` for after the run.
    Save { value: NodeId },
    /// Print `label: value` when the value is computed (to standard error locally).
    Log { a: NodeId, label: String },
    /// Send the value to whoever runs the graph as soon as it is computed (`send!(value)`): a server streams it
    /// to its client before the job ends; locally it goes to [`crate::interleave::capture_sent`], or is printed
    /// like `log!` when nothing captures it.
    Send { a: NodeId, label: String },
    /// End this invoke's part of the forward pass here; once every invoke has stopped or finished, the rest of
    /// the model does not run.
    Stop,
    /// A condition: when `cond` (one value; nonzero is true) is false, this invoke skips the nodes after this one
    /// up to (not including) node `end`: the branch of an `if cond!(..)` in the block. Nested branches lie inside.
    Guard { cond: NodeId, end: NodeId },
    /// `a` when `cond` holds, else `b` (only the chosen one need have been computed): the value of an
    /// `if cond!(c) { a } else { b }`.
    Choose { cond: NodeId, a: NodeId, b: NodeId },
    /// A function registered with `#[nnsight::function]`, by its full name (`my_crate::clamp_norm`).
    Call { function: String, args: Vec<CallArg> },

    // Gradients: a backward pass and what it computes or changes.
    /// Backpropagate from `a` (one value): computes the gradients that the [`Op::Grad`] nodes naming this node
    /// read.
    Backward { a: NodeId },
    /// The gradient of the loss of `backward` with respect to `a`, a read of a module's input or output (this
    /// invoke's rows).
    Grad { a: NodeId, backward: NodeId },
    /// The gradient of the loss of `backward` with respect to the parameter `param` of `module` (the parameter
    /// takes part in autograd for this run only).
    ParamGrad { module: String, param: String, backward: NodeId },
    /// During `backward`, the gradient flowing back through `a` (a read of a module's input or output) becomes
    /// `value`, computed from it (`h.grad = h.grad * 2.0`): every gradient upstream of `a` changes accordingly.
    GradWrite { a: NodeId, value: NodeId, backward: NodeId },

    // Tensor operations: a result computed from the operands' values alone.
    /// A pure tensor operation (see [`TensorOp`]). Its JSON is the tensor op's own, tag and fields, with no
    /// wrapper.
    #[serde(untagged)]
    Tensor(TensorOp),
}

impl From<TensorOp> for Op {
    fn from(op: TensorOp) -> Self {
        Op::Tensor(op)
    }
}

/// One argument of a [`Op::Call`]: a node's value or a number written into the graph.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallArg {
    /// The value of a node (a tensor).
    Node(NodeId),
    /// A floating-point number.
    Float(f64),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
}

impl Op {
    /// The nodes this op reads.
    pub fn inputs(&self) -> Vec<NodeId> {
        use Op::*;
        match self {
            Read { .. } | ReadInputs { .. } | Generated | Const { .. } | Stop | Cache { .. } => vec![],
            Write { value, .. } | Skip { value, .. } => vec![*value],
            Apply { input, .. } => vec![*input],
            Save { value } => vec![*value],
            Log { a, .. } | Send { a, .. } => vec![*a],
            Guard { cond, .. } => vec![*cond],
            Choose { cond, a, b } => vec![*cond, *a, *b],
            Call { args, .. } => args
                .iter()
                .filter_map(|a| match a {
                    CallArg::Node(n) => Some(*n),
                    _ => None,
                })
                .collect(),
            Backward { a } => vec![*a],
            Grad { a, backward } => vec![*a, *backward],
            ParamGrad { backward, .. } => vec![*backward],
            GradWrite { value, .. } => vec![*value],
            Tensor(op) => op.inputs(),
        }
    }

    /// The module hook point this op waits for, if any: (module, point, call).
    pub fn hook_point(&self) -> Option<(&str, Point, u32)> {
        match self {
            Op::Read { module, point, call } | Op::Write { module, point, call, .. } => Some((module, *point, *call)),
            Op::ReadInputs { module, call } | Op::Skip { module, call, .. } => Some((module, Point::Input, *call)),
            _ => None,
        }
    }

    /// A short description for error messages (`read model.layers.5 output`).
    pub fn describe(&self) -> String {
        match self {
            Op::Read { module, point, call } => {
                format!("read of `{}` {} (call {call})", display(module), point_name(*point))
            }
            Op::ReadInputs { module, call } => format!("read of `{}` inputs (call {call})", display(module)),
            Op::Generated => "`model.generated()`".to_string(),
            Op::Write { module, point, call, .. } => {
                format!("write of `{}` {} (call {call})", display(module), point_name(*point))
            }
            Op::Apply { module, .. } => format!("call of `{}`", display(module)),
            Op::Skip { module, call, .. } => format!("skip of `{}` (call {call})", display(module)),
            Op::Call { function, .. } => format!("call of function `{function}`"),
            other => {
                let json = serde_json::to_value(other).ok();
                let field = |k: &str| json.as_ref().and_then(|j| j.get(k)).and_then(|o| o.as_str());
                // The kind of a binary, unary or reduction op (`matmul`, `neg`, `mean`) says more than its group.
                let name = field("op").unwrap_or("op");
                match name {
                    "binary" | "binary_scalar" | "unary" | "reduce" => field("kind").unwrap_or(name).to_string(),
                    _ => name.to_string(),
                }
            }
        }
    }
}

/// A module path as users write it (`model.layers.5`; the root is `model`).
pub fn display(module: &str) -> String {
    if module.is_empty() {
        "model".to_string()
    } else {
        format!("model.{module}")
    }
}

fn point_name(p: Point) -> &'static str {
    match p {
        Point::Input => "input",
        Point::Output => "output",
    }
}

/// One node: an op and the invoke it belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// The operation.
    #[serde(flatten)]
    pub op: Op,
    /// The invoke (group of batch rows) whose code created it.
    pub invoke: u32,
}

/// An intervention graph: nodes in creation order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    /// The nodes; a node refers only to earlier ones.
    pub nodes: Vec<Node>,
}

impl Graph {
    /// Appends a node and returns its id.
    pub fn push(&mut self, op: Op, invoke: u32) -> NodeId {
        self.nodes.push(Node { op, invoke });
        (self.nodes.len() - 1) as NodeId
    }

    /// A graph of one invoke that reads `module`'s `point` (its first call) and saves it; returns the graph and
    /// the read's node (where the saved value is found).
    pub fn saving_read(module: &str, point: Point) -> (Graph, NodeId) {
        let mut g = Graph::default();
        let read = g.push(Op::Read { module: module.to_string(), point, call: 0 }, 0);
        g.push(Op::Save { value: read }, 0);
        (g, read)
    }

    /// Checks the graph's structure: every node refers only to earlier nodes (a graph read from JSON may not),
    /// and every branch ends after its condition and inside the graph. Whether the functions it calls exist in
    /// this program is `function::validate`'s to say (the registry is not data of the graph).
    pub fn validate(&self) -> crate::Result<()> {
        for (i, n) in self.nodes.iter().enumerate() {
            match &n.op {
                Op::Guard { end, .. } if (*end as usize) <= i || (*end as usize) > self.nodes.len() => {
                    return Err(crate::Error::InvalidGraph {
                        message: format!(
                            "node {i} (guard) ends its branch at node {end}, outside nodes {}..={}",
                            i + 1,
                            self.nodes.len()
                        ),
                    });
                }
                // A gradient write names the read it writes (before it) and the backward it belongs to (usually
                // after it), neither of which is an input.
                Op::GradWrite { a, backward, .. } => {
                    if *a as usize >= i || !matches!(self.nodes[*a as usize].op, Op::Read { .. }) {
                        return Err(crate::Error::InvalidGraph {
                            message: format!("node {i} (gradient write) writes the gradient of node {a}, which is not a read before it"),
                        });
                    }
                    if !matches!(self.nodes.get(*backward as usize).map(|b| &b.op), Some(Op::Backward { .. })) {
                        return Err(crate::Error::InvalidGraph {
                            message: format!(
                                "node {i} (gradient write) belongs to node {backward}, which is not a backward"
                            ),
                        });
                    }
                }
                _ => {}
            }
            if let Some(bad) = n.op.inputs().into_iter().find(|&j| j as usize >= i) {
                return Err(crate::Error::InvalidGraph {
                    message: format!(
                        "node {i} ({}) refers to node {bad}, which does not come before it",
                        n.op.describe()
                    ),
                });
            }
        }
        Ok(())
    }

    /// The graph as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("graphs serialize")
    }

    /// A graph from JSON, its structure validated ([`Graph::validate`]). [`Graph::from_json`] also checks its
    /// functions against this program's registry.
    pub fn from_json_unchecked(text: &str) -> crate::Result<Self> {
        let g: Graph = serde_json::from_str(text)
            .map_err(|e| crate::Error::InvalidGraph { message: format!("not a graph: {e}") })?;
        g.validate()?;
        Ok(g)
    }
}
