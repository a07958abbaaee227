//! What a model runs on: an [`Input`] as users give it (texts or token ids), and a [`Batch`], its rows tokenized
//! and left-padded with the matching attention mask and position ids, as every architecture's forward takes it.

use crate::{Error, Result};
use tch::{Device, Tensor};

/// What a model is run on: one text, a batch of texts, or token ids (one row or several).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// One prompt.
    Text(String),
    /// Several prompts, left-padded to a common length.
    Texts(Vec<String>),
    /// Token ids, one `Vec` per row, left-padded to a common length.
    Ids(Vec<Vec<i64>>),
}

impl From<&str> for Input {
    fn from(s: &str) -> Self {
        Input::Text(s.to_string())
    }
}
impl From<String> for Input {
    fn from(s: String) -> Self {
        Input::Text(s)
    }
}
impl From<&String> for Input {
    fn from(s: &String) -> Self {
        Input::Text(s.clone())
    }
}
impl From<Vec<String>> for Input {
    fn from(v: Vec<String>) -> Self {
        Input::Texts(v)
    }
}
impl From<Vec<&str>> for Input {
    fn from(v: Vec<&str>) -> Self {
        Input::Texts(v.into_iter().map(String::from).collect())
    }
}
impl From<&[&str]> for Input {
    fn from(v: &[&str]) -> Self {
        Input::Texts(v.iter().map(|s| s.to_string()).collect())
    }
}
impl<const N: usize> From<[&str; N]> for Input {
    fn from(v: [&str; N]) -> Self {
        Input::Texts(v.iter().map(|s| s.to_string()).collect())
    }
}
impl From<Vec<i64>> for Input {
    fn from(v: Vec<i64>) -> Self {
        Input::Ids(vec![v])
    }
}
impl From<&[i64]> for Input {
    fn from(v: &[i64]) -> Self {
        Input::Ids(vec![v.to_vec()])
    }
}
impl From<Vec<Vec<i64>>> for Input {
    fn from(v: Vec<Vec<i64>>) -> Self {
        Input::Ids(v)
    }
}

/// A tokenized, left-padded batch on the model's device.
#[derive(Debug)]
pub struct Batch {
    /// Token ids `[batch, seq]` (i64), pad tokens on the left of shorter rows.
    pub input_ids: Tensor,
    /// `[batch, seq]` (i64): 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `[batch, seq]` (i64): positions counted from each row's first real token.
    pub position_ids: Tensor,
    /// Number of real tokens in each row.
    pub lengths: Vec<usize>,
    /// Whether any row is padded.
    pub padded: bool,
    /// Whether the head runs on the last position only (logits `[batch, 1, vocab]`): set by a trace whose code
    /// reads nothing of the logits but the last position (see [`crate::exec::batching`]).
    pub last_logits_only: bool,
}

impl Batch {
    /// Builds a left-padded batch from rows of ids.
    pub fn from_rows(rows: &[Vec<i64>], pad_id: i64, device: Device) -> Result<Self> {
        if rows.is_empty() {
            return Err(Error::InvalidInput { message: "empty batch: give at least one prompt".into() });
        }
        if let Some(i) = rows.iter().position(|r| r.is_empty()) {
            return Err(Error::InvalidInput { message: format!("row {i} of the batch has no tokens") });
        }
        let seq = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let b = rows.len();
        let mut ids = Vec::with_capacity(b * seq);
        let mut mask = Vec::with_capacity(b * seq);
        let mut pos = Vec::with_capacity(b * seq);
        for r in rows {
            let pad = seq - r.len();
            ids.extend(std::iter::repeat_n(pad_id, pad).chain(r.iter().copied()));
            mask.extend(std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1i64, r.len())));
            pos.extend(std::iter::repeat_n(0i64, pad).chain(0..r.len() as i64));
        }
        let f = |e| Error::torch("input", e);
        let shape = [b as i64, seq as i64];
        let mk = |v: &[i64]| Tensor::from_slice(v).f_reshape(shape).and_then(|t| t.f_to_device(device)).map_err(f);
        Ok(Batch {
            input_ids: mk(&ids)?,
            attention_mask: mk(&mask)?,
            position_ids: mk(&pos)?,
            lengths: rows.iter().map(|r| r.len()).collect(),
            padded: rows.iter().any(|r| r.len() != seq),
            last_logits_only: false,
        })
    }

    /// The distinct rows (equal ids and length), first appearance first, and for each row the index of its
    /// distinct row; `None` when every row differs.
    pub fn distinct_rows(&self) -> Result<Option<(Batch, Vec<i64>)>> {
        let b = self.lengths.len();
        if b < 2 {
            return Ok(None);
        }
        let f = |e| Error::torch("input", e);
        let ids = self.input_ids.f_to_device(Device::Cpu).map_err(f)?.f_contiguous().map_err(f)?;
        let flat = Vec::<i64>::try_from(ids.f_flatten(0, -1).map_err(f)?).map_err(f)?;
        let seq = flat.len() / b;
        let mut first: std::collections::HashMap<(&[i64], usize), i64> = std::collections::HashMap::new();
        let (mut keep, mut index) = (Vec::new(), Vec::with_capacity(b));
        for r in 0..b {
            let key = (&flat[r * seq..(r + 1) * seq], self.lengths[r]);
            let next = keep.len() as i64;
            let k = *first.entry(key).or_insert_with(|| {
                keep.push(r as i64);
                next
            });
            index.push(k);
        }
        if keep.len() == b {
            return Ok(None);
        }
        let rows = Tensor::from_slice(&keep).to_device(self.input_ids.device());
        let pick = |t: &Tensor| t.f_index_select(0, &rows).map_err(f);
        let lengths: Vec<usize> = keep.iter().map(|&r| self.lengths[r as usize]).collect();
        let distinct = Batch {
            input_ids: pick(&self.input_ids)?,
            attention_mask: pick(&self.attention_mask)?,
            position_ids: pick(&self.position_ids)?,
            padded: lengths.iter().any(|&l| l != seq),
            lengths,
            last_logits_only: self.last_logits_only,
        };
        Ok(Some((distinct, index)))
    }

    /// The same batch as meta tensors (shapes only), for a scan.
    pub fn to_meta(&self) -> Result<Self> {
        let m = |t: &Tensor, name: &str| crate::meta::to_meta(t).map_err(|e| Error::torch(name, e));
        Ok(Batch {
            input_ids: m(&self.input_ids, "input_ids")?,
            attention_mask: m(&self.attention_mask, "attention_mask")?,
            position_ids: m(&self.position_ids, "position_ids")?,
            lengths: self.lengths.clone(),
            padded: self.padded,
            last_logits_only: self.last_logits_only,
        })
    }
}
