//! The key/value cache of cached decoding: one (keys, values) slot per attention layer, filled forward by forward.

use tch::{TchError, Tensor};

/// The keys and values every attention layer computed in earlier forwards of a generation, so that a decode step
/// runs the model on its new tokens only.
///
/// Each slot holds a buffer `[batch, kv_heads, capacity, head_dim]` (allocated by the layer's first append, grown
/// when a forward needs more room) of which the first [`KvCache::past_len`] positions are filled. During a forward,
/// attention layer `i` calls [`KvCache::append`] with its new keys and values (after rotary embedding, before
/// groups of query heads share them) and attends over what it returns; after the forward the driver calls
/// [`KvCache::advance`]. The positions of the cache are the columns of the attention mask: left padding, and the
/// pad tokens fed to rows that stopped, stay in the cache and are masked.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    past: i64,
    capacity: i64,
}

impl KvCache {
    /// An empty cache of `layers` slots whose buffers are allocated for `capacity` positions (the prompt length
    /// plus the new tokens of a generation; a forward that needs more grows them).
    pub fn new(layers: usize, capacity: i64) -> Self {
        KvCache { layers: (0..layers).map(|_| None).collect(), past: 0, capacity }
    }

    /// Number of slots (attention layers).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Positions cached by the forwards before the current one.
    pub fn past_len(&self) -> i64 {
        self.past
    }

    /// Stores the new keys and values `[batch, kv_heads, q, head_dim]` of `layer` after the past positions and
    /// returns every key and value so far, `[batch, kv_heads, past + q, head_dim]` (views of the cache: read them
    /// within this forward).
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor), TchError> {
        let n = self.layers.len();
        let past = self.past;
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| TchError::Kind(format!("the KV cache has {n} layer slots; layer {layer} has none")))?;
        let (b, h, q, d) = k.size4()?;
        let need = past + q;
        let fits = |buf: &Tensor| {
            let s = buf.size();
            s[0] == b && s[1] == h && s[3] == d && s[2] >= need && buf.kind() == k.kind() && buf.device() == k.device()
        };
        match slot {
            Some((bk, bv)) if fits(bk) && fits(bv) => {}
            Some((bk, bv)) => {
                // Grow: a new buffer of twice the room, the past copied over.
                if bk.size()[..2] != [b, h] || bk.size()[3] != d {
                    return Err(TchError::Shape(format!(
                        "layer {layer}: cached keys {:?} do not continue with new keys {:?}",
                        bk.size(),
                        k.size()
                    )));
                }
                let cap = need.max(2 * bk.size()[2]);
                let grow = |old: &Tensor| -> Result<Tensor, TchError> {
                    let new = Tensor::f_empty([b, h, cap, d], (k.kind(), k.device()))?;
                    new.f_narrow(2, 0, past)?.f_copy_(&old.f_narrow(2, 0, past)?)?;
                    Ok(new)
                };
                *slot = Some((grow(bk)?, grow(bv)?));
            }
            None if past > 0 => {
                return Err(TchError::Kind(format!(
                    "layer {layer} has no cached keys although {past} positions are cached"
                )));
            }
            None => {
                let cap = need.max(self.capacity);
                let empty = || Tensor::f_empty([b, h, cap, d], (k.kind(), k.device()));
                *slot = Some((empty()?, empty()?));
            }
        }
        let (bk, bv) = slot.as_mut().expect("filled above");
        bk.f_narrow(2, past, q)?.f_copy_(k)?;
        bv.f_narrow(2, past, q)?.f_copy_(v)?;
        Ok((bk.f_narrow(2, 0, need)?, bv.f_narrow(2, 0, need)?))
    }

    /// Ends a forward that appended `q` positions to every layer: they become past.
    pub fn advance(&mut self, q: i64) {
        self.past += q;
    }

    /// The cached keys and values of `layer`, `[batch, kv_heads, past_len, head_dim]`, if it has any.
    pub fn get(&self, layer: usize) -> Option<(Tensor, Tensor)> {
        let (k, v) = self.layers.get(layer)?.as_ref()?;
        Some((k.narrow(2, 0, self.past), v.narrow(2, 0, self.past)))
    }
}
