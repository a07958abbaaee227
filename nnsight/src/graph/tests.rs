//! `Graph::validate` and `Graph::from_json_unchecked` on hand-built graphs: structure only (whether the functions
//! a graph calls exist is `function::validate`'s, tested in `function.rs`).

use super::*;
use crate::Error;

fn read(module: &str) -> Op {
    Op::Read { module: module.to_string(), point: Point::Output, call: 0 }
}

/// The message of an `InvalidGraph` error (a panic naming anything else).
fn invalid(r: crate::Result<()>) -> String {
    match r {
        Err(Error::InvalidGraph { message }) => message,
        Err(other) => panic!("expected InvalidGraph, got {other}"),
        Ok(()) => panic!("expected InvalidGraph, the graph passed"),
    }
}

/// A read, a number, a condition on it guarding a write, a save: every reference backwards, the branch ending at
/// the end of the graph.
fn well_formed() -> Graph {
    let mut g = Graph::default();
    let h = g.push(read("layer1"), 0);
    let sum = g.push(TensorOp::Reduce { kind: ReduceOp::Sum, a: h, dims: vec![], keepdim: false }.into(), 0);
    let cond =
        g.push(TensorOp::BinaryScalar { kind: BinaryOp::Gt, a: sum, scalar: 0.0, scalar_first: false }.into(), 0);
    let guard = g.push(Op::Guard { cond, end: 0 }, 0);
    let zero = g.push(TensorOp::Unary { kind: UnaryOp::ZerosLike, a: h }.into(), 0);
    g.push(Op::Write { module: "layer1".into(), point: Point::Output, call: 0, value: zero, index: None }, 0);
    let out = g.push(read(""), 0);
    g.push(Op::Save { value: out }, 0);
    // The branch runs to the end of the graph (`end == len` is allowed).
    let len = g.nodes.len() as NodeId;
    g.nodes[guard as usize].op = Op::Guard { cond, end: len };
    g
}

#[test]
fn a_well_formed_graph_passes_and_survives_json() {
    let g = well_formed();
    g.validate().unwrap();
    let back = Graph::from_json_unchecked(&g.to_json()).unwrap();
    assert_eq!(back, g);
    Graph::default().validate().unwrap();
}

#[test]
fn a_node_referring_to_itself_is_refused_naming_it() {
    let mut g = Graph::default();
    g.push(read("layer1"), 0);
    g.push(TensorOp::Unary { kind: UnaryOp::Neg, a: 1 }.into(), 0);
    let m = invalid(g.validate());
    assert_eq!(m, "node 1 (neg) refers to node 1, which does not come before it");
}

#[test]
fn a_node_referring_to_a_later_node_is_refused_naming_it() {
    let mut g = Graph::default();
    let h = g.push(read("layer1"), 0);
    g.push(TensorOp::Binary { kind: BinaryOp::Add, a: h, b: 3 }.into(), 0);
    g.push(Op::Save { value: h }, 0);
    g.push(Op::Const { value: Constant::Scalar(1.0) }, 0);
    let m = invalid(g.validate());
    assert_eq!(m, "node 1 (add) refers to node 3, which does not come before it");

    // A write's value, and a reference past the end of the graph, likewise.
    let mut g = Graph::default();
    g.push(Op::Write { module: "layer2".into(), point: Point::Input, call: 0, value: 7, index: None }, 0);
    let m = invalid(g.validate());
    assert!(m.starts_with("node 0 (write of `model.layer2` input (call 0)) refers to node 7"), "{m}");
}

#[test]
fn a_guard_ending_at_or_before_itself_or_past_the_graph_is_refused() {
    let build = |end: NodeId| {
        let mut g = Graph::default();
        let c = g.push(Op::Const { value: Constant::Scalar(1.0) }, 0);
        g.push(Op::Guard { cond: c, end }, 0); // node 1
        g.push(Op::Stop, 0);
        g
    };
    // 2 and 3 (= the number of nodes) are inside; 0, 1 and 4 are not.
    build(2).validate().unwrap();
    build(3).validate().unwrap();
    for end in [0, 1, 4, NodeId::MAX] {
        let m = invalid(build(end).validate());
        assert_eq!(m, format!("node 1 (guard) ends its branch at node {end}, outside nodes 2..=3"));
    }
}

#[test]
fn a_guard_on_a_later_condition_is_refused() {
    let mut g = Graph::default();
    g.push(Op::Guard { cond: 1, end: 2 }, 0);
    g.push(Op::Const { value: Constant::Scalar(1.0) }, 0);
    let m = invalid(g.validate());
    assert_eq!(m, "node 0 (guard) refers to node 1, which does not come before it");
}

#[test]
fn malformed_json_is_an_invalid_graph() {
    for text in [
        "",
        "not json",
        "[1, 2]",
        r#"{"nodes": 3}"#,
        r#"{"nodes": [{"op": "no_such_op", "invoke": 0}]}"#,
        r#"{"nodes": [{"op": "read", "module": "layer1", "point": "sideways", "call": 0, "invoke": 0}]}"#,
        r#"{"nodes": [{"op": "save", "value": 0}]}"#,
    ] {
        match Graph::from_json_unchecked(text) {
            Err(Error::InvalidGraph { message }) => assert!(message.starts_with("not a graph: "), "{text}: {message}"),
            other => panic!("{text}: expected InvalidGraph, got {other:?}"),
        }
    }
    // Well-formed JSON of a graph whose structure is wrong: refused by `validate`, naming the node.
    let text = r#"{"nodes": [{"op": "save", "value": 0, "invoke": 0}]}"#;
    match Graph::from_json_unchecked(text) {
        Err(Error::InvalidGraph { message }) => {
            assert_eq!(message, "node 0 (save) refers to node 0, which does not come before it")
        }
        other => panic!("expected InvalidGraph, got {other:?}"),
    }
    let text = r#"{"nodes": [{"op": "read", "module": "layer1", "point": "output", "call": 0, "invoke": 0},
                             {"op": "save", "value": 0, "invoke": 0}]}"#;
    let g = Graph::from_json_unchecked(text).unwrap();
    assert_eq!(g.nodes[0].op, read("layer1"));
}

#[test]
fn a_gradient_write_must_name_an_earlier_read_and_a_backward() {
    use crate::graph::Point;
    let read = |g: &mut Graph| g.push(Op::Read { module: "layer1".into(), point: Point::Output, call: 0 }, 0);
    // Well formed: read, value, the write, then the backward of a loss.
    let mut g = Graph::default();
    let r = read(&mut g);
    let v = g.push(TensorOp::Unary { kind: crate::graph::UnaryOp::Neg, a: r }.into(), 0);
    g.push(Op::GradWrite { a: r, value: v, backward: 3 }, 0);
    g.push(Op::Backward { a: v }, 0);
    assert!(g.validate().is_ok());
    // Its `a` must be a read that comes before it.
    let mut bad = g.clone();
    bad.nodes[2].op = Op::GradWrite { a: 1, value: v, backward: 3 };
    let e = bad.validate().unwrap_err();
    assert!(
        e.to_string().contains("node 2 (gradient write) writes the gradient of node 1, which is not a read"),
        "{e}"
    );
    // Its `backward` must be a backward node of the graph.
    for backward in [1, 9] {
        let mut bad = g.clone();
        bad.nodes[2].op = Op::GradWrite { a: r, value: v, backward };
        let e = bad.validate().unwrap_err();
        assert!(e.to_string().contains(&format!("belongs to node {backward}, which is not a backward")), "{e}");
    }
}

#[test]
fn a_tensor_op_is_written_and_read_as_before_the_grouping() {
    // `Op::Tensor` adds no wrapper: the wire format is the tensor op's own tag and fields, next to `invoke`.
    let node = Node { op: TensorOp::Cat { xs: vec![1], dim: 0 }.into(), invoke: 0 };
    let text = serde_json::to_string(&node).unwrap();
    assert_eq!(text, r#"{"op":"cat","xs":[1],"dim":0,"invoke":0}"#);
    assert_eq!(serde_json::from_str::<Node>(&text).unwrap(), node);
    let op = Op::Read { module: "layer1".into(), point: Point::Output, call: 2 };
    let text = serde_json::to_string(&Node { op: op.clone(), invoke: 1 }).unwrap();
    assert_eq!(text, r#"{"op":"read","module":"layer1","point":"output","call":2,"invoke":1}"#);
    assert_eq!(serde_json::from_str::<Op>(r#"{"op":"read","module":"layer1","point":"output","call":2}"#).unwrap(), op);
    // An op read on its own (not flattened into a node) likewise.
    let op: Op = serde_json::from_str(r#"{"op":"unary","kind":"neg","a":3}"#).unwrap();
    assert_eq!(op, TensorOp::Unary { kind: UnaryOp::Neg, a: 3 }.into());
}

/// The tags serde knows for a type read by its internally tagged derive: those its error on an unknown tag lists.
fn serde_tags(error: impl std::fmt::Display) -> Vec<String> {
    let message = error.to_string();
    let list = message.split("expected one of ").nth(1).unwrap_or_else(|| panic!("no list of tags: {message}"));
    let list = list.split(" at line ").next().unwrap_or(list);
    list.split(", ").map(|t| t.trim_matches('`').to_string()).collect()
}

#[test]
fn the_tags_dispatched_on_are_serdes() {
    use strum::VariantNames;
    // strum's names of the tensor ops (what `Op`'s reading dispatches on) are serde's tags, in order.
    let err = serde_json::from_str::<TensorOp>(r#"{"op": "?"}"#).unwrap_err();
    assert_eq!(serde_tags(err), TensorOp::VARIANTS);
    // An unknown tag lists every op, the others' then the tensor ops', each once.
    let err = serde_json::from_str::<Op>(r#"{"op": "?"}"#).unwrap_err();
    let tags = serde_tags(&err);
    assert_eq!(tags, decode::op_names());
    assert!(decode::op_names().ends_with(TensorOp::VARIANTS) && tags.contains(&"read".to_string()), "{err}");
    let unique: std::collections::BTreeSet<&String> = tags.iter().collect();
    assert_eq!(unique.len(), tags.len(), "{tags:?}");
    // Every tag reads as its own kind of op: a missing field is the error, not an unknown op.
    for tag in decode::op_names() {
        let err = serde_json::from_str::<Op>(&format!(r#"{{"op": "{tag}", "zzz": 0}}"#)).err();
        let message = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(!message.contains("unknown variant"), "{tag}: {message}");
    }
}

#[test]
fn a_malformed_op_says_what_is_wrong() {
    let message = |text: &str| serde_json::from_str::<Op>(text).unwrap_err().to_string();
    // Unknown, named.
    let m = message(r#"{"op": "frobnicate", "a": 0}"#);
    assert!(m.starts_with("unknown variant `frobnicate`, expected one of `read`, "), "{m}");
    assert!(m.contains("`cat`") && m.contains("`grad_write`"), "{m}");
    // A tensor op and another op, each with what is wrong with it.
    assert!(message(r#"{"op": "cat", "dim": 0}"#).starts_with("missing field `xs`"));
    assert!(message(r#"{"op": "unary", "kind": "twice", "a": 0}"#).starts_with("unknown variant `twice`"));
    assert!(message(r#"{"op": "read", "module": "m", "point": "sideways", "call": 0}"#)
        .starts_with("unknown variant `sideways`, expected `input` or `output`"));
    assert!(message(r#"{"op": "save"}"#).starts_with("missing field `value`"));
    // No tag, or not a name.
    assert!(message(r#"{"value": 0}"#).starts_with("missing field `op`"));
    assert!(!message(r#"{"op": 3}"#).is_empty());
}
