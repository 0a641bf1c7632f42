//! Single-token attention for decoding on CUDA: append a key/value row to an f32 cache (keys
//! rotated with RoPE on the way in), then attend with one query token over grouped-query heads.
//!
//! Both read the position from a one-element u32 **device** tensor instead of taking it as a
//! launch argument, so that a recorded CUDA graph ([`super::Graph`]) stays valid at every step:
//! the caller writes the next position into that tensor and replays. [`decode_attention`] can
//! append the token's keys and values itself, so one launch replaces the ~15 candle ops of one
//! layer's decode attention (RoPE, casts, cache writes, two matmuls, scale, softmax,
//! transposes). Attention is computed in f32, with an online softmax over splits of
//! [`ATT_KEYS`] keys, merged by the last block of each head to finish (flash-decoding).
//!
//! A position at or beyond the cache capacity (or the RoPE tables) writes nothing and yields
//! NaN outputs: the kernels never index out of bounds, but the caller must keep the buffers
//! large enough.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp3, DType, InplaceOp3, Layout, Result, Shape, Storage, Tensor,
};
use half::bf16;

use super::{cfg, contiguous, func, i32_arg};
use crate::error::KernelError;

/// Keys per block of the partial attention pass (`ATT_KEYS` in kernels/bitnet.cu).
pub const ATT_KEYS: usize = 32;

/// Warps per block of the attention launch (`ATT_WARPS` in kernels/bitnet.cu).
const ATT_WARPS: usize = 8;

/// Largest supported head dimension (`ATT_MAX_HD` in kernels/bitnet.cu).
pub const MAX_HEAD_DIM: usize = 256;

/// RoPE tables `[positions, head_dim/2]` (half-split form) in the activation dtype, on the GPU.
#[derive(Clone, Copy, Debug)]
pub struct Rope<'a> {
    /// `cos(pos · θ_i)`.
    pub cos: &'a Tensor,
    /// `sin(pos · θ_i)`.
    pub sin: &'a Tensor,
}

/// Checks a whole contiguous f32 cache buffer `[1, heads, capacity, head_dim]`; returns
/// `(heads, capacity, head_dim)`.
fn cache_dims(l: &Layout, what: &str) -> Result<(usize, usize, usize)> {
    let d = l.shape().dims();
    let (h, cap, hd) = match *d {
        [1, h, cap, hd] => (h, cap, hd),
        _ => {
            candle_core::bail!("{what}: expected a [1, heads, capacity, head_dim] cache, got {d:?}")
        }
    };
    if l.contiguous_offsets() != Some((0, h * cap * hd)) {
        candle_core::bail!("{what}: the cache must be a whole contiguous buffer");
    }
    if hd == 0 || !hd.is_multiple_of(2) || hd > MAX_HEAD_DIM {
        candle_core::bail!("{what}: head_dim {hd} must be even and at most {MAX_HEAD_DIM}");
    }
    Ok((h, cap, hd))
}

fn position<'a>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, u32>> {
    let (a, b) = contiguous(l, "position")?;
    if s.dtype() != DType::U32 || b - a != 1 {
        candle_core::bail!("position: expected a one-element u32 tensor");
    }
    Ok(s.as_cuda_slice::<u32>()?.slice(a..b))
}

/// Runs `f` with the RoPE tables' storages, checked to be `[n, half]` in `dtype`.
fn with_rope<R>(
    rope: Rope<'_>,
    dtype: DType,
    half: usize,
    f: impl FnOnce((&CudaStorage, usize), (&CudaStorage, usize), usize) -> Result<R>,
) -> Result<R> {
    let (cs, cl) = rope.cos.storage_and_layout();
    let (ss, sl) = rope.sin.storage_and_layout();
    let (Storage::Cuda(c), Storage::Cuda(s)) = (&*cs, &*ss) else {
        candle_core::bail!("rope: the tables must be on the CUDA device");
    };
    let (c0, _) = contiguous(cl, "rope cos")?;
    let (s0, _) = contiguous(sl, "rope sin")?;
    let ok = c.dtype() == dtype
        && s.dtype() == dtype
        && cl.dims() == sl.dims()
        && cl.dims().len() == 2
        && cl.dims()[1] == half;
    if !ok {
        candle_core::bail!(
            "rope: tables must be [positions, {half}] {}, got cos {:?} {} and sin {:?} {}",
            dtype.as_str(),
            cl.dims(),
            c.dtype().as_str(),
            sl.dims(),
            s.dtype().as_str()
        );
    }
    f((c, c0), (s, s0), cl.dims()[0])
}

struct KvAppend<'a> {
    rope: Option<Rope<'a>>,
}

impl KvAppend<'_> {
    #[allow(clippy::too_many_arguments)]
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        cache: &mut CudaStorage,
        cl: &Layout,
        x: &CudaStorage,
        xl: &Layout,
        pos: &CudaStorage,
        pl: &Layout,
        suffix: &str,
    ) -> Result<()> {
        let (heads, cap, hd) = cache_dims(cl, "kv_append")?;
        let (x0, x1) = contiguous(xl, "kv_append input")?;
        if x1 - x0 != heads * hd {
            candle_core::bail!(
                "kv_append: the input has {} values, a cache row {}",
                x1 - x0,
                heads * hd
            );
        }
        let dev = x.device().clone();
        let p = position(pos, pl)?;
        let xs = x.as_cuda_slice::<T>()?.slice(x0..x1);
        let c = cache.as_cuda_slice_mut::<f32>()?;
        let f = func(&dev, &format!("bitnet_kv_append_{suffix}"))?;
        let (hdi, capi) = (i32_arg(hd)?, i32_arg(cap)?);
        let launch =
            |cos: &CudaView<'_, T>, sin: &CudaView<'_, T>, limit: usize, c| -> Result<()> {
                let (li, ri) = (i32_arg(limit.min(cap))?, i32::from(self.rope.is_some()));
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                b.arg(&xs).arg(cos).arg(sin).arg(c).arg(&p);
                b.arg(&hdi).arg(&capi).arg(&li).arg(&ri);
                // SAFETY: argument types and sizes match the kernel's signature; the kernel writes
                // only row *pos < limit ≤ capacity of each head.
                unsafe { b.launch(cfg((heads, 1), 64)) }.w()?;
                Ok(())
            };
        match self.rope {
            Some(rope) => with_rope(rope, x.dtype(), hd / 2, |(cs, c0), (ss, s0), n| {
                let cos = cs.as_cuda_slice::<T>()?.slice(c0..);
                let sin = ss.as_cuda_slice::<T>()?.slice(s0..);
                launch(&cos, &sin, n, c)
            }),
            // Unrotated (values): the tables are not read; pass the input in their place.
            None => launch(&xs, &xs, cap, c),
        }
    }
}

impl InplaceOp3 for KvAppend<'_> {
    fn name(&self) -> &'static str {
        "kv-append"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        candle_core::bail!("kv_append runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        cache: &mut CudaStorage,
        cl: &Layout,
        x: &CudaStorage,
        xl: &Layout,
        pos: &CudaStorage,
        pl: &Layout,
    ) -> Result<()> {
        if cache.dtype() != DType::F32 {
            candle_core::bail!("kv_append: the cache must be f32");
        }
        match x.dtype() {
            DType::F32 => self.run::<f32>(cache, cl, x, xl, pos, pl, "f32"),
            DType::BF16 => self.run::<bf16>(cache, cl, x, xl, pos, pl, "bf16"),
            other => Err(KernelError::UnsupportedDType(other.as_str()).into()),
        }
    }
}

/// Writes one token's keys or values `x` (`[..., heads · head_dim]`, f32 or bf16) into row
/// `pos` of `cache` (`[1, heads, capacity, head_dim]`, f32), rotating them first when `rope` is
/// given (keys). `pos` is a one-element u32 tensor on the device.
pub fn kv_append(cache: &Tensor, x: &Tensor, pos: &Tensor, rope: Option<Rope<'_>>) -> Result<()> {
    cache.inplace_op3(&x.contiguous()?, pos, &KvAppend { rope })
}

struct DecodeAttention<'a> {
    new_kv: Option<(&'a Tensor, &'a Tensor)>,
    pos: &'a Tensor,
    rope: Rope<'a>,
    num_heads: usize,
}

impl DecodeAttention<'_> {
    #[allow(clippy::too_many_arguments)]
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
        suffix: &str,
    ) -> Result<(CudaStorage, Shape)> {
        let (nkv, cap, hd) = cache_dims(kl, "decode_attention keys")?;
        if cache_dims(vl, "decode_attention values")? != (nkv, cap, hd) {
            candle_core::bail!("decode_attention: key and value caches differ in shape");
        }
        let nh = self.num_heads;
        if nh == 0 || !nh.is_multiple_of(nkv) {
            candle_core::bail!("decode_attention: {nh} query heads for {nkv} kv heads");
        }
        let (q0, q1) = contiguous(ql, "decode_attention query")?;
        if q1 - q0 != nh * hd {
            candle_core::bail!(
                "decode_attention: the query has {} values, {nh} heads × {hd} expected",
                q1 - q0
            );
        }
        let dev = q.device().clone();
        let (pg, pl) = self.pos.storage_and_layout();
        let Storage::Cuda(ps) = &*pg else {
            candle_core::bail!("decode_attention: the position must be on the CUDA device");
        };
        let p = position(ps, pl)?;
        let qs = q.as_cuda_slice::<T>()?.slice(q0..q1);
        // This token's keys and values, `[nkv · hd]` each in the query's dtype.
        let new_kv = match self.new_kv {
            Some((kn, vn)) => {
                let (kn, vn) = (kn.contiguous()?, vn.contiguous()?);
                for t in [&kn, &vn] {
                    if t.dtype() != q.dtype() || t.elem_count() != nkv * hd {
                        candle_core::bail!(
                            "decode_attention: new keys/values must be {nkv} × {hd} {}, got {:?} {}",
                            q.dtype().as_str(),
                            t.dims(),
                            t.dtype().as_str()
                        );
                    }
                }
                Some((kn, vn))
            }
            None => None,
        };
        let guards = new_kv
            .as_ref()
            .map(|(kn, vn)| (kn.storage_and_layout(), vn.storage_and_layout()));
        let views = match &guards {
            Some(((ks, kl), (vs, vl))) => match (&**ks, &**vs) {
                (Storage::Cuda(ks), Storage::Cuda(vs)) => {
                    let (k0, k1) = contiguous(kl, "decode_attention new keys")?;
                    let (v0, v1) = contiguous(vl, "decode_attention new values")?;
                    Some((
                        ks.as_cuda_slice::<T>()?.slice(k0..k1),
                        vs.as_cuda_slice::<T>()?.slice(v0..v1),
                    ))
                }
                _ => candle_core::bail!("decode_attention: new keys/values must be on the GPU"),
            },
            None => None,
        };
        let (kc, vc) = (k.as_cuda_slice::<f32>()?, v.as_cuda_slice::<f32>()?);
        let splits = cap.div_ceil(ATT_KEYS);
        // SAFETY: the kernel writes every [head][split] record before the merge reads it, and
        // every output.
        let mut part = unsafe { dev.alloc::<f32>(nh * splits * (hd + 2))? };
        let mut y = unsafe { dev.alloc::<T>(nh * hd)? };
        let mut done = dev.alloc_zeros::<u32>(nh)?;
        let (nhi, nkvi, hdi, capi) = (i32_arg(nh)?, i32_arg(nkv)?, i32_arg(hd)?, i32_arg(cap)?);
        let scale = 1.0 / (hd as f32).sqrt();
        with_rope(self.rope, q.dtype(), hd / 2, |(cs, c0), (ss, s0), n| {
            let cos = cs.as_cuda_slice::<T>()?.slice(c0..);
            let sin = ss.as_cuda_slice::<T>()?.slice(s0..);
            let li = i32_arg(n.min(cap))?;
            let stream = dev.cuda_stream();
            let f = func(&dev, &format!("bitnet_attn_decode_{suffix}"))?;
            let null = 0u64;
            let mut b = stream.launch_builder(&f);
            b.arg(&qs);
            match &views {
                Some((kn, vn)) => b.arg(kn).arg(vn),
                None => b.arg(&null).arg(&null),
            };
            b.arg(&cos).arg(&sin).arg(kc).arg(vc).arg(&p);
            b.arg(&mut part).arg(&mut done).arg(&mut y);
            b.arg(&nhi)
                .arg(&nkvi)
                .arg(&hdi)
                .arg(&capi)
                .arg(&li)
                .arg(&scale);
            // 8 warps of 4 keys each: the per-key work of a warp is a serial chain (dot product,
            // shuffle reduction, online-softmax update), so short chains pay (H200, 2B-4T
            // decode: 64 keys × 4 warps 313 tok/s, 32 × 4 ~390, 32 × 8 ~435).
            // SAFETY: argument types and sizes match the kernel's signature; the kernel's
            // per-warp scratch holds 8 warps; with new keys/values it writes cache row *pos <
            // limit ≤ capacity of each kv head (the caches are updated in place, as by
            // `kv_append`).
            unsafe { b.launch(cfg((nh, splits), 32 * ATT_WARPS)) }.w()?;
            Ok(())
        })?;
        Ok((T::wrap_cuda_slice(y, dev), ql.shape().clone()))
    }
}

impl CustomOp3 for DecodeAttention<'_> {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("decode_attention runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match q.dtype() {
            DType::F32 => self.run::<f32>(q, ql, k, kl, v, vl, "f32"),
            DType::BF16 => self.run::<bf16>(q, ql, k, kl, v, vl, "bf16"),
            other => Err(KernelError::UnsupportedDType(other.as_str()).into()),
        }
    }
}

/// Attention of one query token `q` (`[..., num_heads · head_dim]`, f32 or bf16, rotated here
/// for position `pos`) over cache rows `0..=pos` of `k_cache`/`v_cache`
/// (`[1, kv_heads, capacity, head_dim]`, f32), with query head `h` reading kv head
/// `h / (num_heads / kv_heads)` and scores scaled by `1/√head_dim`. Returns `q`'s shape and dtype.
///
/// With `new_kv = Some((k, v))` (this token's keys and values, `[..., kv_heads · head_dim]` in
/// `q`'s dtype) row `pos` is first written as [`kv_append`] would (keys rotated) and attended to
/// in the same launch; with `None` the caches already hold it. One launch either way: the splits
/// are merged by the last block of each head.
pub fn decode_attention(
    q: &Tensor,
    new_kv: Option<(&Tensor, &Tensor)>,
    k_cache: &Tensor,
    v_cache: &Tensor,
    pos: &Tensor,
    rope: Rope<'_>,
    num_heads: usize,
) -> Result<Tensor> {
    let op = DecodeAttention {
        new_kv,
        pos,
        rope,
        num_heads,
    };
    q.contiguous()?.apply_op3_no_bwd(k_cache, v_cache, &op)
}
