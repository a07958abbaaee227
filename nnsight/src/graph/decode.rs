//! How an [`Op`] is read (deserialized): by its `op` tag, a tensor op as a [`TensorOp`], any other through
//! `Tagged`, serde's derive of `Op`'s other variants; a tag neither knows is an error naming it.
//!
//! Serialization needs no such care: `Op::Tensor` is `#[serde(untagged)]`, so a tensor op writes its own tag and
//! fields. Reading it back through an untagged variant would lose serde's message for a malformed op ("data did
//! not match any variant"), hence this dispatch on the tag.

use super::{CallArg, Constant, IndexItem, NodeId, Op, Point, TensorOp};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use strum::VariantNames;

/// The variants of [`Op`] other than [`Op::Tensor`], with the same fields: serde derives their reading into `Op`
/// itself (`remote`), so a field that changes in `Op` fails to compile here, and an `Op` variant missing here
/// fails the round trip of every node kind (`tests/graph_control.rs`).
#[derive(Deserialize, strum::VariantNames)]
#[serde(remote = "Op", tag = "op", rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
enum Tagged {
    Read { module: String, point: Point, call: u32 },
    ReadInputs { module: String, call: u32 },
    Generated,
    Write { module: String, point: Point, call: u32, value: NodeId, index: Option<Vec<IndexItem>> },
    Skip { module: String, call: u32, value: NodeId },
    Apply { module: String, input: NodeId },
    Cache { modules: Option<Vec<String>>, inputs: bool, device: Option<String> },
    Const { value: Constant },
    Save { value: NodeId },
    Log { a: NodeId, label: String },
    Send { a: NodeId, label: String },
    Stop,
    Guard { cond: NodeId, end: NodeId },
    Choose { cond: NodeId, a: NodeId, b: NodeId },
    Call { function: String, args: Vec<CallArg> },
    Backward { a: NodeId },
    Grad { a: NodeId, backward: NodeId },
    ParamGrad { module: String, param: String, backward: NodeId },
    GradWrite { a: NodeId, value: NodeId, backward: NodeId },
}

/// The tag of every op, the other ops' then the tensor ops' (what an unknown tag's error lists).
pub(super) fn op_names() -> &'static [&'static str] {
    static NAMES: std::sync::LazyLock<Vec<&'static str>> =
        std::sync::LazyLock::new(|| Tagged::VARIANTS.iter().chain(TensorOp::VARIANTS).copied().collect());
    &NAMES
}

impl<'de> Deserialize<'de> for Op {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        let read = match value.get("op").and_then(|tag| tag.as_str()) {
            Some(tag) if TensorOp::VARIANTS.contains(&tag) => TensorOp::deserialize(value).map(Op::Tensor),
            Some(tag) if !Tagged::VARIANTS.contains(&tag) => {
                return Err(D::Error::unknown_variant(tag, op_names()));
            }
            // Another op, or no tag, or a tag that is no name (serde's error says which).
            _ => Tagged::deserialize(value),
        };
        read.map_err(D::Error::custom)
    }
}
