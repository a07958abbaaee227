//! Values flowing through a graph at run time ([`Value`]) and the serializable forms of constants and indices.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// A value computed while a graph runs.
#[derive(Debug)]
pub enum Value {
    /// A tensor.
    Tensor(Tensor),
    /// Several values (a module's inputs, `topk`'s values and indices).
    Tuple(Vec<Value>),
    /// A number.
    Scalar(f64),
    /// Named values (a cache: dotted module path and point to tensor).
    Map(Vec<(String, Value)>),
}

impl Value {
    /// The tensor, or an error naming what was found instead.
    pub fn tensor(&self) -> Result<&Tensor> {
        match self {
            Value::Tensor(t) => Ok(t),
            other => Err(Error::Intervention { message: format!("expected a tensor, found {}", other.kind_name()) }),
        }
    }

    /// A cheap copy (tensors share storage).
    pub fn shallow_clone(&self) -> Value {
        match self {
            Value::Tensor(t) => Value::Tensor(t.shallow_clone()),
            Value::Tuple(v) => Value::Tuple(v.iter().map(Value::shallow_clone).collect()),
            Value::Scalar(s) => Value::Scalar(*s),
            Value::Map(m) => Value::Map(m.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect()),
        }
    }

    /// `tensor`, `tuple` or `scalar`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Value::Tensor(_) => "tensor",
            Value::Tuple(_) => "tuple",
            Value::Scalar(_) => "scalar",
            Value::Map(_) => "map",
        }
    }
}

/// A tensor's bytes, dtype and shape, as a graph carries constants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorData {
    /// tch `Kind` name (`Float`, `Int64`, ...).
    pub kind: String,
    /// Shape.
    pub shape: Vec<i64>,
    /// Little-endian element bytes, row-major.
    #[serde(with = "bytes_hex")]
    pub data: Vec<u8>,
}

impl TensorData {
    /// Copies a tensor (from any device) into plain bytes.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let f = |e| Error::torch("constant", e);
        let t = t.f_to_device(Device::Cpu).map_err(f)?.f_contiguous().map_err(f)?;
        let kind = t.kind();
        let numel = t.numel();
        let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel).map_err(f)?;
        Ok(TensorData { kind: kind_name(kind).to_string(), shape: t.size(), data })
    }

    /// The tensor on `device`.
    pub fn to_tensor(&self, device: Device) -> Result<Tensor> {
        let kind = kind_from_name(&self.kind)?;
        let f = |e| Error::torch("constant", e);
        Tensor::f_from_data_size(&self.data, &self.shape, kind).map_err(f)?.f_to_device(device).map_err(f)
    }
}

/// A constant of a graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Constant {
    /// A tensor.
    Tensor(TensorData),
    /// A number.
    Scalar(f64),
}

/// One item of a tch-style index (`t.i((.., -1, 2..5))`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IndexItem {
    /// One position (negative counts from the end); removes the dimension.
    Select(i64),
    /// A range `start..end` (either open); negative bounds count from the end.
    Slice {
        /// First position (inclusive).
        start: Option<i64>,
        /// Last position (exclusive).
        end: Option<i64>,
    },
    /// A new dimension of size 1.
    NewAxis,
}

/// The name tch gives a `Kind`.
pub fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Uint8 => "Uint8",
        Kind::Int8 => "Int8",
        Kind::Int16 => "Int16",
        Kind::Int => "Int",
        Kind::Int64 => "Int64",
        Kind::Half => "Half",
        Kind::Float => "Float",
        Kind::Double => "Double",
        Kind::Bool => "Bool",
        Kind::BFloat16 => "BFloat16",
        _ => "Unsupported",
    }
}

/// The `Kind` of a name from [`kind_name`].
pub fn kind_from_name(name: &str) -> Result<Kind> {
    Ok(match name {
        "Uint8" => Kind::Uint8,
        "Int8" => Kind::Int8,
        "Int16" => Kind::Int16,
        "Int" => Kind::Int,
        "Int64" => Kind::Int64,
        "Half" => Kind::Half,
        "Float" => Kind::Float,
        "Double" => Kind::Double,
        "Bool" => Kind::Bool,
        "BFloat16" => Kind::BFloat16,
        other => return Err(Error::InvalidGraph { message: format!("unknown dtype `{other}`") }),
    })
}

mod bytes_hex {
    //! Bytes as a hexadecimal string in JSON (compact enough for small constants; large tensors travel as
    //! safetensors in the remote protocol).
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            out.push_str(&format!("{b:02x}"));
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        if text.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd number of hex digits"));
        }
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// The name of a device in a graph (`cpu`, `cuda:0`, `mps`).
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
    }
}

/// The device of a name from [`device_name`].
pub fn device_from_name(name: &str) -> Result<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "mps" => Device::Mps,
        "vulkan" => Device::Vulkan,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
            Some(i) => Device::Cuda(i),
            None => return Err(Error::InvalidGraph { message: format!("unknown device `{other}`") }),
        },
    })
}
