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

    /// The cache of `self`'s rows followed by `other`'s (a continuous batch taking in a generation whose prefill
    /// ran alone): the one with fewer past positions is left-padded with zeros to the other's (a caller pads the
    /// attention masks alike, with 0s, so the new positions are never attended to), with room for `room` more
    /// positions. Both must have filled every slot with keys of one layout.
    pub fn concat(&self, other: &KvCache, room: i64) -> Result<KvCache, TchError> {
        if self.layers.len() != other.layers.len() {
            return Err(TchError::Shape(format!(
                "cannot join a cache of {} layer slots with one of {}",
                self.layers.len(),
                other.layers.len()
            )));
        }
        let past = self.past.max(other.past);
        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in 0..self.layers.len() {
            let (Some((ka, va)), Some((kb, vb))) = (self.get(layer), other.get(layer)) else {
                return Err(TchError::Kind(format!("layer {layer} has no cached keys to join")));
            };
            let join = |a: &Tensor, b: &Tensor| -> Result<Tensor, TchError> {
                let (ba, h, _, d) = a.size4()?;
                let bb = b.size()[0];
                let buf = Tensor::f_zeros([ba + bb, h, past + room.max(0), d], (a.kind(), a.device()))?;
                buf.f_narrow(0, 0, ba)?.f_narrow(2, past - self.past, self.past)?.f_copy_(a)?;
                buf.f_narrow(0, ba, bb)?.f_narrow(2, past - other.past, other.past)?.f_copy_(b)?;
                Ok(buf)
            };
            layers.push(Some((join(&ka, &kb)?, join(&va, &vb)?)));
        }
        Ok(KvCache { layers, past, capacity: past + room.max(0) })
    }

    /// Keeps the rows `rows` (`[n]` i64 indices, in order) of every slot (a continuous batch letting go of the
    /// rows of a finished generation).
    pub fn keep_rows(&mut self, rows: &Tensor) -> Result<(), TchError> {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.f_index_select(0, rows)?;
            *v = v.f_index_select(0, rows)?;
        }
        Ok(())
    }

    /// Drops the first `n` past positions of every slot (columns no row attends to any more), keeping room for
    /// `room` more positions: a continuous batch whose oldest rows left trims what only they used.
    pub fn drop_front(&mut self, n: i64, room: i64) -> Result<(), TchError> {
        let n = n.clamp(0, self.past);
        let past = self.past - n;
        for (k, v) in self.layers.iter_mut().flatten() {
            for buf in [k, v] {
                let (b, h, _, d) = buf.size4()?;
                let new = Tensor::f_empty([b, h, past + room.max(0), d], (buf.kind(), buf.device()))?;
                new.f_narrow(2, 0, past)?.f_copy_(&buf.f_narrow(2, n, past)?)?;
                *buf = new;
            }
        }
        self.past = past;
        self.capacity = past + room.max(0);
        Ok(())
    }
}
