//! Functions users add to the graph: `#[nnsight::function]` on an ordinary Rust `fn` over tensors and numbers
//! registers it here by its full name (`my_crate::steer::clamp_norm`), so that a graph can call it by name,
//! including a graph read from JSON or sent to a server compiled with the same functions. A graph that names a
//! function this program does not have is refused before anything runs ([`crate::Error::UnknownFunction`]).
//!
//! ```
//! use nnsight::prelude::*;
//! use tch::Tensor;
//!
//! /// Scales each row to at most `max` in L2 norm.
//! #[nnsight::function]
//! fn clamp_norm(x: &Tensor, max: f64) -> Tensor {
//!     let norm = x.norm_scalaropt_dim(2.0, [-1], true);
//!     x * (norm.clamp_min(max) / max).reciprocal()
//! }
//!
//! // Still an ordinary function on tensors...
//! let t = Tensor::from_slice(&[3.0f32, 4.0]).reshape([1, 2]);
//! assert!((clamp_norm(&t, 1.0).norm().double_value(&[]) - 1.0).abs() < 1e-6);
//! // ...and registered under its full name.
//! assert!(nnsight::function::lookup(clamp_norm::NAME).is_some());
//! ```
//!
//! Inside `intervene!`, `call!(clamp_norm(h, 10.0))` adds a call node whose value is the function's result.

use crate::graph::{Graph, Value};
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::OnceLock;
use tch::Tensor;

/// One argument as a registered function receives it.
#[derive(Debug)]
pub enum Arg<'a> {
    /// A tensor (a node's value).
    Tensor(&'a Tensor),
    /// A floating-point number.
    Float(f64),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
}

impl Arg<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Arg::Tensor(_) => "a tensor",
            Arg::Float(_) => "a float",
            Arg::Int(_) => "an integer",
            Arg::Bool(_) => "a bool",
        }
    }

    fn wrong(&self, function: &str, index: usize, expected: &str) -> Error {
        Error::Intervention {
            message: format!("argument {index} of function `{function}`: expected {expected}, found {}", self.kind()),
        }
    }

    /// The tensor, or an error naming the function and argument.
    pub fn tensor(&self, function: &str, index: usize) -> Result<&Tensor> {
        match self {
            Arg::Tensor(t) => Ok(t),
            other => Err(other.wrong(function, index, "a tensor")),
        }
    }

    /// The number as `f64` (integers convert).
    pub fn float(&self, function: &str, index: usize) -> Result<f64> {
        match self {
            Arg::Float(x) => Ok(*x),
            Arg::Int(i) => Ok(*i as f64),
            other => Err(other.wrong(function, index, "a number")),
        }
    }

    /// The integer.
    pub fn int(&self, function: &str, index: usize) -> Result<i64> {
        match self {
            Arg::Int(i) => Ok(*i),
            other => Err(other.wrong(function, index, "an integer")),
        }
    }

    /// The boolean.
    pub fn bool(&self, function: &str, index: usize) -> Result<bool> {
        match self {
            Arg::Bool(b) => Ok(*b),
            other => Err(other.wrong(function, index, "a bool")),
        }
    }
}

/// A registered function: its full name and the adapter that calls it on graph values.
#[derive(Debug)]
pub struct Function {
    /// Full path of the Rust function (`my_crate::steer::clamp_norm`).
    pub name: &'static str,
    /// Number of parameters.
    pub arity: usize,
    /// Calls the function on its arguments.
    pub call: fn(&[Arg<'_>]) -> Result<Tensor>,
}

inventory::collect!(Function);

fn table() -> &'static HashMap<&'static str, &'static Function> {
    static TABLE: OnceLock<HashMap<&'static str, &'static Function>> = OnceLock::new();
    TABLE.get_or_init(|| inventory::iter::<Function>.into_iter().map(|f| (f.name, f)).collect())
}

/// The function registered under `name`, if this program has one.
pub fn lookup(name: &str) -> Option<&'static Function> {
    table().get(name).copied()
}

/// Names of every registered function, sorted.
pub fn names() -> Vec<String> {
    let mut v: Vec<String> = table().keys().map(|k| k.to_string()).collect();
    v.sort();
    v
}

/// Runs the function `name` on `args`. A panic inside the function (tch's non-`f_` methods panic on bad shapes)
/// becomes an error naming the function; the program goes on.
pub(crate) fn call(name: &str, args: &[Arg<'_>]) -> Result<Value> {
    let f = lookup(name).ok_or_else(|| Error::UnknownFunction { name: name.to_string(), known: names() })?;
    if args.len() != f.arity {
        return Err(Error::Intervention {
            message: format!("function `{name}` takes {} argument(s), the graph gives {}", f.arity, args.len()),
        });
    }
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (f.call)(args)));
    match out {
        Ok(r) => r.map(Value::Tensor),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            Err(Error::Intervention { message: format!("function `{name}` failed: {what}") })
        }
    }
}

/// Checks a graph before it runs: its structure ([`Graph::validate`]) and that every function it calls is
/// registered in this program ([`Error::UnknownFunction`] naming it and listing those registered).
pub fn validate(graph: &Graph) -> Result<()> {
    graph.validate()?;
    for node in &graph.nodes {
        if let crate::graph::Op::Call { function, .. } = &node.op {
            if lookup(function).is_none() {
                return Err(Error::UnknownFunction { name: function.clone(), known: names() });
            }
        }
    }
    Ok(())
}

// Reading a graph checks it against this program's functions; the graph layer itself knows no registry.
impl Graph {
    /// A graph from JSON, validated: its structure, and that every function it calls is registered in this
    /// program ([`validate`]).
    pub fn from_json(text: &str) -> Result<Self> {
        let g = Graph::from_json_unchecked(text)?;
        validate(&g)?;
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{CallArg, Constant, Op};

    /// Doubles its argument (registered for these tests).
    #[crate::function]
    fn double_it(x: &Tensor) -> Tensor {
        x * 2
    }

    /// A constant and a call of `function` on it.
    fn calling(function: &str) -> Graph {
        let mut g = Graph::default();
        let c = g.push(Op::Const { value: Constant::Scalar(1.0) }, 0);
        g.push(Op::Call { function: function.to_string(), args: vec![CallArg::Node(c), CallArg::Float(2.0)] }, 0);
        g
    }

    #[test]
    fn a_call_of_a_registered_function_passes() {
        assert!(lookup(double_it::NAME).is_some());
        assert!(names().contains(&double_it::NAME.to_string()));
        validate(&calling(double_it::NAME)).unwrap();
    }

    #[test]
    fn a_call_of_an_unregistered_function_is_refused_naming_it() {
        match validate(&calling("no_such_crate::missing")) {
            Err(e @ Error::UnknownFunction { .. }) => {
                let Error::UnknownFunction { name, known } = &e else { unreachable!() };
                assert_eq!(name, "no_such_crate::missing");
                assert!(known.contains(&double_it::NAME.to_string()), "{known:?}");
                let text = e.to_string();
                assert!(text.starts_with("unknown function `no_such_crate::missing`"), "{text}");
                assert!(text.contains(double_it::NAME), "{text}");
            }
            other => panic!("expected UnknownFunction, got {other:?}"),
        }
        // Only a full name counts: the bare name of a registered function is not it.
        assert!(
            matches!(validate(&calling("double_it")), Err(Error::UnknownFunction { name, .. }) if name == "double_it")
        );
    }

    #[test]
    fn structure_is_checked_before_functions() {
        let mut g = calling("no_such_crate::missing");
        // The call now refers to itself: an invalid graph, whatever the function.
        g.nodes[1].op = Op::Call { function: "no_such_crate::missing".into(), args: vec![CallArg::Node(1)] };
        assert!(matches!(validate(&g), Err(Error::InvalidGraph { .. })));
    }

    #[test]
    fn from_json_checks_functions_and_from_json_unchecked_does_not() {
        let text = calling("no_such_crate::missing").to_json();
        assert!(Graph::from_json_unchecked(&text).is_ok());
        assert!(
            matches!(Graph::from_json(&text), Err(Error::UnknownFunction { name, .. }) if name == "no_such_crate::missing")
        );
        assert_eq!(Graph::from_json(&calling(double_it::NAME).to_json()).unwrap(), calling(double_it::NAME));
    }

    #[test]
    fn a_registered_function_runs_and_its_arity_is_checked() {
        let x = Tensor::from_slice(&[1.0f32, -2.0]);
        let out = call(double_it::NAME, &[Arg::Tensor(&x)]).unwrap();
        assert_eq!(Vec::<f32>::try_from(out.tensor().unwrap()).unwrap(), vec![2.0, -4.0]);
        let err = call(double_it::NAME, &[Arg::Tensor(&x), Arg::Float(1.0)]).unwrap_err();
        assert!(err.to_string().contains("takes 1 argument(s), the graph gives 2"), "{err}");
        let err = call(double_it::NAME, &[Arg::Float(1.0)]).unwrap_err();
        assert!(err.to_string().contains("argument 0 of function"), "{err}");
    }
}
