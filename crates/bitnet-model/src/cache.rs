//! [`Cache`]: the per-layer key/value cache of incremental decoding.
//!
//! Keys and values are written into a preallocated buffer `[batch, kv_heads, capacity, head_dim]`
//! that doubles when full, so appending a token copies only that token (a `Tensor::cat` per step
//! would copy the whole history every time). Attention reads a narrowed view of the buffer,
//! without copying.
//!
//! The cache holds f32 whatever the model dtype: attention is computed in f32 (see
//! [`crate::model`]), and bf16 keys and values are exactly representable in f32, so storing
//! them widened once is the same as widening the whole history at every step, minus the copies.

use candle_core::{DType, Device, Result, Tensor};

/// Smallest buffer allocated, in positions, so that short prompts do not regrow repeatedly.
const MIN_CAPACITY: usize = 64;

/// Keys and values of one layer.
#[derive(Debug, Default)]
pub(crate) struct LayerCache {
    /// `(k, v)` buffers `[batch, kv_heads, capacity, head_dim]`, allocated on first use.
    buffers: Option<(Tensor, Tensor)>,
    /// Positions filled.
    len: usize,
}

impl LayerCache {
    /// Makes room for `needed` positions in buffers `[batch, kv_heads, ·, head_dim]`,
    /// growing (doubling, keeping the first `len` positions) when full. `max` bounds the capacity.
    pub(crate) fn reserve(
        &mut self,
        (b, h, d): (usize, usize, usize),
        needed: usize,
        max: usize,
        device: &Device,
    ) -> Result<()> {
        let capacity = self.buffers.as_ref().map_or(0, |(kb, _)| kb.dims()[2]);
        let batch_changed = self
            .buffers
            .as_ref()
            .is_some_and(|(kb, _)| kb.dims()[0] != b);
        if batch_changed {
            if self.len > 0 {
                candle_core::bail!(
                    "the KV cache holds a batch of {}, got a batch of {b}; call clear_cache() \
                     before changing the batch size",
                    self.buffers.as_ref().map_or(0, |(kb, _)| kb.dims()[0])
                );
            }
            self.buffers = None;
        }
        if needed > capacity || batch_changed {
            let new_cap = needed
                .next_power_of_two()
                .clamp(MIN_CAPACITY, max.max(needed));
            let kb = Tensor::zeros((b, h, new_cap, d), DType::F32, device)?;
            let vb = Tensor::zeros((b, h, new_cap, d), DType::F32, device)?;
            if let Some((old_k, old_v)) = self.buffers.take() {
                if self.len > 0 {
                    kb.slice_set(&old_k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    vb.slice_set(&old_v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
            }
            self.buffers = Some((kb, vb));
        }
        Ok(())
    }

    /// Appends `k`, `v` (`[batch, kv_heads, t, head_dim]`, f32) and returns views of the whole
    /// history `[batch, kv_heads, len + t, head_dim]`. `max` bounds the capacity.
    pub(crate) fn append(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        max: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (b, h, t, d) = k.dims4()?;
        let needed = self.len + t;
        self.reserve((b, h, d), needed, max, k.device())?;
        let (kb, vb) = self.buffers()?;
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        let views = (kb.narrow(2, 0, needed)?, vb.narrow(2, 0, needed)?);
        self.len = needed;
        Ok(views)
    }

    /// The whole `(k, v)` buffers `[batch, kv_heads, capacity, head_dim]`.
    pub(crate) fn buffers(&self) -> Result<(&Tensor, &Tensor)> {
        match &self.buffers {
            Some((k, v)) => Ok((k, v)),
            None => candle_core::bail!("KV cache buffer missing: reserve() first"),
        }
    }
}

/// The key/value cache of all layers of one sequence batch.
#[derive(Debug, Default)]
pub struct Cache {
    layers: Vec<LayerCache>,
    len: usize,
}

/// A clone starts **empty**: the buffers are written in place, so sharing them between two
/// caches (what a derived `Clone` of candle tensors would do) would let one corrupt the other.
impl Clone for Cache {
    fn clone(&self) -> Self {
        Self::new(self.layers.len())
    }
}

impl Cache {
    /// An empty cache for `num_layers` layers (buffers are allocated on first use).
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| LayerCache::default()).collect(),
            len: 0,
        }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything (keeps no buffers, so memory is returned).
    pub fn clear(&mut self) {
        for l in &mut self.layers {
            *l = LayerCache::default();
        }
        self.len = 0;
    }

    /// Prepares to process tokens starting at `offset`: keeps positions `0..offset` (so a caller
    /// can rewind, e.g. to regenerate a reply) and refuses a gap.
    pub(crate) fn seek(&mut self, offset: usize) -> Result<()> {
        if offset > self.len {
            candle_core::bail!(
                "seqlen_offset {offset} is past the {} cached positions; pass the number of \
                 tokens already processed (or 0 after clear_cache())",
                self.len
            );
        }
        if offset == 0 {
            // Nothing to keep: also allows a new batch size.
            self.clear();
        }
        for l in &mut self.layers {
            l.len = offset;
        }
        self.len = offset;
        Ok(())
    }

    /// Records that `t` positions were appended to every layer.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// The cache of layer `i`.
    pub(crate) fn layer(&mut self, i: usize) -> Option<&mut LayerCache> {
        self.layers.get_mut(i)
    }

    /// Makes room for `needed` positions in every layer (see [`LayerCache::reserve`]).
    pub(crate) fn reserve(
        &mut self,
        dims: (usize, usize, usize),
        needed: usize,
        max: usize,
        device: &Device,
    ) -> Result<()> {
        self.layers
            .iter_mut()
            .try_for_each(|l| l.reserve(dims, needed, max, device))
    }

    /// The buffers of every layer, in order (after [`Cache::reserve`]).
    #[cfg(feature = "cuda")]
    pub(crate) fn buffers(&self) -> Result<Vec<(&Tensor, &Tensor)>> {
        self.layers.iter().map(LayerCache::buffers).collect()
    }

    /// Identifies the current buffers: a recording that wrote into them is stale once this
    /// changes (they were regrown or dropped).
    #[cfg(feature = "cuda")]
    pub(crate) fn buffer_ids(&self) -> Vec<candle_core::TensorId> {
        self.layers
            .iter()
            .filter_map(|l| l.buffers.as_ref())
            .flat_map(|(k, v)| [k.id(), v.id()])
            .collect()
    }

    /// Records that every layer's buffers received `t` more positions (written in place).
    #[cfg(feature = "cuda")]
    pub(crate) fn advance_layers(&mut self, t: usize) {
        for l in &mut self.layers {
            l.len += t;
        }
        self.len += t;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn append_grows_and_rewinds() {
        let dev = Device::Cpu;
        let mut c = LayerCache::default();
        let step = |i: usize| Tensor::full(i as f32, (1, 2, 1, 3), &dev).unwrap();
        for i in 0..100 {
            let (k, v) = c.append(&step(i), &step(i), 4096).unwrap();
            assert_eq!(k.dims(), [1, 2, i + 1, 3]);
            assert_eq!(v.dims(), [1, 2, i + 1, 3]);
        }
        let (k, _) = c.append(&step(100), &step(100), 4096).unwrap();
        let col: Vec<f32> = k
            .narrow(1, 1, 1)
            .unwrap()
            .narrow(3, 2, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(col, (0..=100).map(|i| i as f32).collect::<Vec<_>>());
        c.len = 10;
        let (k, _) = c.append(&step(7), &step(7), 4096).unwrap();
        assert_eq!(k.dims()[2], 11);
        let last: Vec<f32> = k
            .narrow(2, 10, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(last.iter().all(|&x| x == 7.0));
    }
}
