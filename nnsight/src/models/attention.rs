//! The attention pieces every architecture shares: the inputs of a cached forward ([`CachedInput`]), the padding,
//! causal and sliding-window masks, the KV-cache append, and the explicit attention that exposes the inner points
//! (`query`, `key`, `probs`, `head_output`) when something reads them.

use super::batch::Batch;
use crate::nn::Ctx;
use crate::{Error, Result};
use tch::{Kind, Tensor};

/// The inputs of one cached forward (see [`CausalLm::run_cached`](super::CausalLm::run_cached)): `q` new tokens per row after `past` cached
/// positions.
#[derive(Debug)]
pub struct CachedInput {
    /// The new tokens `[batch, q]` (i64): the left-padded prompt for the prefill, then one token per row.
    pub input_ids: Tensor,
    /// `[batch, past + q]` (i64): 1 for the real tokens among the cached and the new positions, 0 for padding
    /// (left padding of the prompt, pad tokens fed to rows that stopped).
    pub attention_mask: Tensor,
    /// `[batch, q]` (i64): the position of each new token, counted over its row's real tokens only.
    pub position_ids: Tensor,
    /// Whether `attention_mask` has any 0.
    pub padded: bool,
    /// Compute the logits of the last position only (see [`ForwardState::last_logits_only`](crate::nn::ForwardState::last_logits_only)).
    pub last_logits_only: bool,
}

impl CachedInput {
    /// The prefill of `batch`: all its tokens, nothing cached yet.
    pub fn prefill(batch: &Batch, last_logits_only: bool) -> Self {
        CachedInput {
            input_ids: batch.input_ids.shallow_clone(),
            attention_mask: batch.attention_mask.shallow_clone(),
            position_ids: batch.position_ids.shallow_clone(),
            padded: batch.padded,
            last_logits_only,
        }
    }

    /// A forward of every token so far, `input_ids` `[batch, past + q]`, in place of the decode step `step` over
    /// a cache that is dropped (see [`CausalLm::recompute_cache_at`](super::CausalLm::recompute_cache_at)): the
    /// step's mask, positions counting each row's real tokens (0 on padding, as in a [`Batch`]), the logits of the
    /// last position.
    pub fn whole_sequence(input_ids: Tensor, step: &CachedInput) -> Result<Self> {
        let mask = &step.attention_mask;
        let position_ids = mask
            .f_cumsum(1, Kind::Int64)
            .and_then(|c| c.f_sub_scalar(1))
            .and_then(|c| c.f_mul(mask))
            .map_err(|e| Error::torch("attention_mask", e))?;
        Ok(CachedInput {
            input_ids,
            attention_mask: mask.shallow_clone(),
            position_ids,
            padded: step.padded,
            last_logits_only: true,
        })
    }
}

/// The dtype's lowest finite value, the additive mask of a disallowed key.
fn lowest(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.3895313892515355e38,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// The additive attention mask `[batch, 1, q, past + q]` of a cached forward: new query `i` (at cache position
/// `past + i`) may attend key `j` when `j <= past + i`, the key is real (`attention_mask`), and, with a sliding
/// `window` (Mistral), `past + i - j < window`. `None` when plain attention is exact: no padding, no window that
/// cuts, and either a single query (a decode step sees every key) or nothing cached (`is_causal` applies).
pub fn cached_attention_mask(input: &CachedInput, kind: Kind, window: Option<i64>) -> Result<Option<Tensor>> {
    let mask = &input.attention_mask;
    let (b, k) = (mask.size()[0], mask.size()[1]);
    let q = input.input_ids.size()[1];
    let past = k - q;
    let f = |e| Error::torch("attention_mask", e);
    if past < 0 {
        return Err(Error::InvalidInput {
            message: format!("the attention mask covers {k} positions, fewer than the {q} new tokens"),
        });
    }
    let window = window.filter(|&w| w > 0 && w < k);
    if !input.padded && window.is_none() && (q == 1 || past == 0) {
        return Ok(None);
    }
    let device = mask.device();
    let rows = Tensor::f_arange_start(past, k, (Kind::Int64, device)).map_err(f)?.f_view([q, 1]).map_err(f)?;
    let cols = Tensor::f_arange(k, (Kind::Int64, device)).map_err(f)?.f_view([1, k]).map_err(f)?;
    let mut allowed = cols.f_le_tensor(&rows).map_err(f)?;
    if let Some(w) = window {
        let first = rows.f_sub_scalar(w).map_err(f)?;
        allowed = allowed.f_logical_and(&cols.f_gt_tensor(&first).map_err(f)?).map_err(f)?;
    }
    let keys = mask.f_ne(0).map_err(f)?.f_view([b, 1, 1, k]).map_err(f)?;
    let allowed = keys.f_logical_and(&allowed.f_view([1, 1, q, k]).map_err(f)?).map_err(f)?;
    let zeros = Tensor::f_zeros([1], (kind, device)).map_err(f)?;
    let full = Tensor::f_full([1], lowest(kind), (kind, device)).map_err(f)?;
    Ok(Some(zeros.f_where_self(&allowed, &full).map_err(f)?))
}

/// Appends an attention layer's new keys and values to the forward state's cache, if there is one, and returns
/// the keys and values to attend over (all of them so far; the new ones when nothing is cached).
pub(crate) fn append_kv(cx: &mut Ctx<'_>, path: &str, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
    use crate::error::TchResultExt;
    match cx.state.kv.as_mut() {
        Some(kv) => kv.append(layer, &k, &v).at(path),
        None => Ok((k, v)),
    }
}

/// The hidden states the head runs on: the last position only when the forward state asks for it.
pub(crate) fn head_positions(cx: &Ctx<'_>, path: &str, h: Tensor) -> Result<Tensor> {
    use crate::error::TchResultExt;
    if cx.state.last_logits_only && h.size()[1] > 1 {
        h.f_narrow(1, -1, 1).at(path)
    } else {
        Ok(h)
    }
}

/// The additive attention mask `[batch, 1, seq, seq]` (0 where a query may attend, the dtype's lowest value where
/// not) for a left-padded batch, or for a sliding window of `window` keys (Mistral); `None` when neither applies and
/// a plain causal pass is exact.
pub fn causal_padding_mask(batch: &Batch, kind: Kind, window: Option<i64>) -> Result<Option<Tensor>> {
    let mask = &batch.attention_mask;
    let (b, s) = (mask.size()[0], mask.size()[1]);
    let window = window.filter(|&w| w > 0 && w < s);
    if !batch.padded && window.is_none() {
        return Ok(None);
    }
    let f = |e| Error::torch("attention_mask", e);
    // Made on the mask's device; a scan's meta mask: made on the CPU, then meta.
    let device = crate::meta::creation_device(mask);
    let ones = Tensor::f_ones([s, s], (Kind::Bool, device)).map_err(f)?;
    let mut allowed_2d = ones.f_tril(0).map_err(f)?;
    if let Some(w) = window {
        // A query at q sees keys k with q - k < w.
        allowed_2d = allowed_2d.f_logical_and(&ones.f_triu(-(w - 1)).map_err(f)?).map_err(f)?;
    }
    let allowed_2d = crate::meta::to_device_like(&allowed_2d, mask).map_err(f)?;
    let keys = mask.f_ne(0).map_err(f)?.f_view([b, 1, 1, s]).map_err(f)?;
    let allowed = keys.f_logical_and(&allowed_2d.f_view([1, 1, s, s]).map_err(f)?).map_err(f)?;
    let lowest = match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.3895313892515355e38,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    };
    let zeros = crate::meta::to_device_like(&Tensor::f_zeros([1], (kind, device)).map_err(f)?, mask).map_err(f)?;
    let full =
        crate::meta::to_device_like(&Tensor::f_full([1], lowest, (kind, device)).map_err(f)?, mask).map_err(f)?;
    Ok(Some(zeros.f_where_self(&allowed, &full).map_err(f)?))
}

/// The inner points of the attention modules (Llama's `self_attn`, GPT-2's `attn`), in forward order.
pub(crate) const ATTENTION_POINTS: [&str; 4] = ["query", "key", "probs", "head_output"];

/// How an attention layer turns queries and keys into scores: the scale of q·kᵀ, an optional soft cap
/// (Gemma 2's `attn_logit_softcapping`: `tanh(s / cap) * cap`, before the mask), and whether it takes the mask of the
/// sliding-window layers ([`ForwardState::mask`](crate::nn::ForwardState::mask)). A bare `f64` is a scale with
/// neither.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Scoring {
    /// Factor of q·kᵀ.
    pub scale: f64,
    /// Soft cap of the scaled scores, if any.
    pub softcap: Option<f64>,
    /// The layer attends within the sliding window.
    pub sliding: bool,
}

impl From<f64> for Scoring {
    fn from(scale: f64) -> Self {
        Scoring { scale, softcap: None, sliding: false }
    }
}

/// Attention computed step by step, for when something reads or writes the inner points of the attention module
/// at `path`, or when the scores are soft-capped (which the fused attention cannot do): `query`
/// `[batch, heads, q, head_dim]` and `key` `[batch, kv_heads, q, head_dim]` (this forward's positions only) go
/// through [`Ctx::point`] first; in a cached forward the key as returned and `v` are then appended to the KV cache
/// (slot `layer`), so that a write persists into later steps, and the attention runs over every cached key
/// (k = past + q); the scores q·kᵀ·`scale` (soft-capped if `scoring` says so) plus the mask (the forward state's for
/// the layer's kind, else the causal mask when q > 1, aligned so that the last query sees every key) are softmaxed
/// in float32 and brought back to the dtype, giving `probs` `[batch, heads, q, k]`; key and value heads are
/// repeated for grouped-query attention; `probs`·v transposed gives `head_output` `[batch, q, heads, head_dim]`.
/// Each value goes on as the hook returns it. Returns `[batch, q, heads * head_dim]`, what
/// `scaled_dot_product_attention` gives up to float rounding.
pub(crate) fn explicit_attention(
    cx: &mut Ctx<'_>,
    path: &str,
    layer: usize,
    q: Tensor,
    k: Tensor,
    v: &Tensor,
    scoring: impl Into<Scoring>,
) -> Result<Tensor> {
    use crate::error::TchResultExt;
    let p = path;
    let Scoring { scale, softcap, sliding } = scoring.into();
    let mask = cx.state.mask(sliding).map(Tensor::shallow_clone);
    let q = cx.point(p, "query", q)?;
    let k = cx.point(p, "key", k)?;
    let (k, v) = append_kv(cx, p, layer, k, v.shallow_clone())?;
    let (b, heads, s, hd) = q.size4().at(p)?;
    let kv_heads = k.size()[1];
    let repeat = |t: Tensor| match heads / kv_heads.max(1) {
        n if n > 1 => t.f_repeat_interleave_self_int(n, 1, None::<i64>).at(p),
        _ => Ok(t),
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    let mut scores = q.f_matmul(&k.f_transpose(-2, -1).at(p)?).at(p)?.f_mul_scalar(scale).at(p)?;
    if let Some(cap) = softcap {
        // transformers' order: s / cap, tanh, * cap.
        scores = scores.f_div_scalar(cap).at(p)?.f_tanh().at(p)?.f_mul_scalar(cap).at(p)?;
    }
    let scores = match mask {
        Some(m) => scores.f_add(&m).at(p)?,
        None if s > 1 => {
            let keys = k.size()[2];
            let above = Tensor::f_ones([s, keys], (Kind::Bool, crate::meta::creation_device(&q))).at(p)?;
            let above = crate::meta::to_device_like(&above.f_triu(keys - s + 1).at(p)?, &q).at(p)?;
            scores.f_masked_fill(&above, f64::NEG_INFINITY).at(p)?
        }
        None => scores,
    };
    let probs = scores.f_softmax(-1, Kind::Float).at(p)?.f_to_kind(q.kind()).at(p)?;
    let probs = cx.point(p, "probs", probs)?;
    let out = probs.f_matmul(&v).at(p)?.f_transpose(1, 2).at(p)?;
    let out = cx.point(p, "head_output", out)?;
    out.f_reshape([b, s, heads * hd]).at(p)
}
