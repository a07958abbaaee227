//! The wire format between client and server, versioned ([`PROTOCOL_VERSION`]).
//!
//! A request and a result are each one safetensors file: the tensors (a graph's tensor constants, a result's
//! saved tensors) are its tensors, and the rest is JSON in its metadata under the key `nnsight`. A graph's
//! constants travel without their bytes in the JSON; each is the tensor named `c<node>`.
//!
//! Decoding is defensive: a server decodes bytes from anyone. Anything malformed is an
//! [`crate::Error::Protocol`] naming what is wrong (a wrong version names both versions, an
//! unknown op names it), never a panic.

use crate::graph::{Constant, NodeId, Op, TensorData, Value};
use crate::interleave::Finished;
use crate::{Error, Result};

pub use crate::exec::Job;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The version of the wire format. A request of another version is refused with an error naming both.
/// Version 3 added session jobs ([`Job::Session`]).
pub const PROTOCOL_VERSION: u32 = 3;

/// The metadata key holding the JSON part.
const KEY: &str = "nnsight";

/// A request: a job on one of the server's models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The client's protocol version.
    pub protocol: u32,
    /// The model's name on the server.
    pub model: String,
    /// What to run.
    pub job: Job,
}

/// A saved value as a result carries it (tensors by name in the file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum WireValue {
    Tensor { key: String },
    Scalar { value: f64 },
    Tuple { items: Vec<WireValue> },
    Map { entries: Vec<(String, WireValue)> },
}

/// The JSON part of a result.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireResult {
    protocol: u32,
    values: Vec<(NodeId, WireValue)>,
    unreached: Vec<NodeId>,
}

fn protocol(message: impl Into<String>) -> Error {
    Error::Protocol { message: message.into() }
}

/// The bytes of a request.
pub fn encode_request(request: &Request) -> Result<Vec<u8>> {
    let mut request = request.clone();
    let mut tensors: Vec<(String, TensorData)> = Vec::new();
    for (g, graph) in request.job.graphs_mut().enumerate() {
        for (i, node) in graph.nodes.iter_mut().enumerate() {
            if let Op::Const { value: Constant::Tensor(d) } = &mut node.op {
                let data = std::mem::take(&mut d.data);
                tensors.push((format!("g{g}.c{i}"), TensorData { kind: d.kind.clone(), shape: d.shape.clone(), data }));
            }
        }
    }
    let json = serde_json::to_string(&request).map_err(|e| protocol(format!("cannot encode the request: {e}")))?;
    write_file(&tensors, json)
}

/// Reads a request: its version first (another version is an error naming both), then the rest, then the
/// constants' bytes, each checked against its dtype and shape.
pub fn decode_request(bytes: &[u8]) -> Result<Request> {
    let (json, file) = read_file(bytes)?;
    let value: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| protocol(format!("the request's JSON is malformed: {e}")))?;
    match value.get("protocol").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(Error::ProtocolVersion { server: PROTOCOL_VERSION, client: v.min(u64::from(u32::MAX)) as u32 })
        }
        None => return Err(protocol("the request names no protocol version")),
    }
    let mut request: Request = serde_json::from_value(value)
        .map_err(|e| protocol(format!("the request is not one this server knows: {e}")))?;
    for (g, graph) in request.job.graphs_mut().enumerate() {
        for (i, node) in graph.nodes.iter_mut().enumerate() {
            if let Op::Const { value: Constant::Tensor(d) } = &mut node.op {
                let name = format!("g{g}.c{i}");
                let t = file.tensor(&name).map_err(|_| protocol(format!("constant `{name}` is missing")))?;
                check_view(&name, &t, d)?;
                d.data = t.data().to_vec();
            }
        }
    }
    if let Job::Session { blocks } = &request.job {
        crate::exec::session::validate(blocks)?;
    }
    Ok(request)
}

/// The bytes of a finished run's saved values.
pub fn encode_result(finished: &Finished) -> Result<Vec<u8>> {
    let mut tensors = Vec::new();
    let mut values = Vec::new();
    let mut ids: Vec<&NodeId> = finished.values.keys().collect();
    ids.sort();
    for id in ids {
        values.push((*id, wire_value(&finished.values[id], &mut tensors)?));
    }
    let mut unreached: Vec<NodeId> = finished.unreached.iter().copied().collect();
    unreached.sort();
    let json = serde_json::to_string(&WireResult { protocol: PROTOCOL_VERSION, values, unreached })
        .map_err(|e| protocol(format!("cannot encode the result: {e}")))?;
    write_file(&tensors, json)
}

/// Reads a result.
pub fn decode_result(bytes: &[u8]) -> Result<Finished> {
    let (json, file) = read_file(bytes)?;
    let wire: WireResult =
        serde_json::from_str(&json).map_err(|e| protocol(format!("the result is malformed: {e}")))?;
    if wire.protocol != PROTOCOL_VERSION {
        return Err(Error::ProtocolVersion { server: wire.protocol, client: PROTOCOL_VERSION });
    }
    let mut values = HashMap::new();
    for (id, v) in wire.values {
        values.insert(id, from_wire(v, &file)?);
    }
    Ok(Finished { values, unreached: wire.unreached.into_iter().collect() })
}

/// One tensor as a safetensors file (a value the graph sends early travels this way).
pub fn encode_tensor(t: &tch::Tensor) -> Result<Vec<u8>> {
    write_file(&[("t".to_string(), TensorData::from_tensor(t)?)], String::from("{}"))
}

/// The tensor of [`encode_tensor`]'s bytes.
pub fn decode_tensor(bytes: &[u8]) -> Result<tch::Tensor> {
    let (_, file) = read_file(bytes)?;
    let view = file.tensor("t").map_err(|_| protocol("no tensor `t`"))?;
    view_tensor("t", &view)
}

fn wire_value(v: &Value, tensors: &mut Vec<(String, TensorData)>) -> Result<WireValue> {
    Ok(match v {
        Value::Tensor(t) => {
            let key = format!("v{}", tensors.len());
            tensors.push((key.clone(), TensorData::from_tensor(t)?));
            WireValue::Tensor { key }
        }
        Value::Scalar(s) => WireValue::Scalar { value: *s },
        Value::Tuple(items) => {
            WireValue::Tuple { items: items.iter().map(|i| wire_value(i, tensors)).collect::<Result<_>>()? }
        }
        Value::Map(entries) => WireValue::Map {
            entries: entries.iter().map(|(k, v)| Ok((k.clone(), wire_value(v, tensors)?))).collect::<Result<_>>()?,
        },
    })
}

fn from_wire(v: WireValue, file: &SafeTensors<'_>) -> Result<Value> {
    Ok(match v {
        WireValue::Tensor { key } => {
            let view = file.tensor(&key).map_err(|_| protocol(format!("saved tensor `{key}` is missing")))?;
            Value::Tensor(view_tensor(&key, &view)?)
        }
        WireValue::Scalar { value } => Value::Scalar(value),
        WireValue::Tuple { items } => {
            Value::Tuple(items.into_iter().map(|i| from_wire(i, file)).collect::<Result<_>>()?)
        }
        WireValue::Map { entries } => {
            Value::Map(entries.into_iter().map(|(k, v)| Ok((k, from_wire(v, file)?))).collect::<Result<_>>()?)
        }
    })
}

/// A safetensors file of `tensors` with `json` in its metadata.
fn write_file(tensors: &[(String, TensorData)], json: String) -> Result<Vec<u8>> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, d) in tensors {
        let dtype = dtype_of(&d.kind)?;
        let shape: Vec<usize> = d.shape.iter().map(|&s| s as usize).collect();
        let view = safetensors::tensor::TensorView::new(dtype, shape, &d.data)
            .map_err(|e| protocol(format!("tensor `{name}`: {e}")))?;
        views.push((name.clone(), view));
    }
    let meta = HashMap::from([(KEY.to_string(), json)]);
    safetensors::tensor::serialize(views, Some(meta)).map_err(|e| protocol(format!("cannot write tensors: {e}")))
}

/// The JSON part and the tensors of a safetensors file.
fn read_file(bytes: &[u8]) -> Result<(String, SafeTensors<'_>)> {
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| protocol(format!("not a safetensors file: {e}")))?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(KEY))
        .cloned()
        .ok_or_else(|| protocol(format!("the file has no `{KEY}` metadata")))?;
    let file = SafeTensors::deserialize(bytes).map_err(|e| protocol(format!("not a safetensors file: {e}")))?;
    Ok((json, file))
}

fn check_view(name: &str, view: &safetensors::tensor::TensorView<'_>, d: &TensorData) -> Result<()> {
    let shape: Vec<i64> = view.shape().iter().map(|&s| s as i64).collect();
    if dtype_of(&d.kind)? != view.dtype() || shape != d.shape {
        return Err(protocol(format!(
            "constant `{name}` is {:?} {:?} in the file but {} {:?} in the graph",
            view.dtype(),
            shape,
            d.kind,
            d.shape
        )));
    }
    Ok(())
}

fn view_tensor(name: &str, view: &safetensors::tensor::TensorView<'_>) -> Result<tch::Tensor> {
    let kind = crate::load::safetensors::kind_of_dtype(view.dtype())
        .ok_or_else(|| protocol(format!("tensor `{name}` has an unsupported dtype")))?;
    let shape: Vec<i64> = view.shape().iter().map(|&s| s as i64).collect();
    tch::Tensor::f_from_data_size(view.data(), &shape, kind).map_err(|e| protocol(format!("tensor `{name}`: {e}")))
}

fn dtype_of(kind: &str) -> Result<Dtype> {
    Ok(match kind {
        "Float" => Dtype::F32,
        "Double" => Dtype::F64,
        "Half" => Dtype::F16,
        "BFloat16" => Dtype::BF16,
        "Int64" => Dtype::I64,
        "Int" => Dtype::I32,
        "Int16" => Dtype::I16,
        "Int8" => Dtype::I8,
        "Uint8" => Dtype::U8,
        "Bool" => Dtype::BOOL,
        other => return Err(protocol(format!("tensors of dtype `{other}` cannot travel"))),
    })
}
