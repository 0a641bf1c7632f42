//! [`RmsNormOp`]: RMSNorm as one CPU pass, in transformers' operation order.
//!
//! Composed from candle tensor ops, an RMSNorm is eight passes over the activations, each
//! allocating its result and each dispatched through candle's own spinning thread pool, which
//! competes with the rayon pool the ternary kernels run on. On a 2-core machine that made the
//! norms a visible share of prefill. This op does one pass per token on the rayon pool with the
//! same rounding points as transformers' `LlamaRMSNorm` (which BitNet's norms are):
//! `h = x·(1/√(mean(x²) + ε))` in f32, cast to the input dtype, then `weight·h` in that dtype.
//! With the `cuda` feature the same op runs as one kernel per call on CUDA tensors, where the
//! eight candle ops were eight launches.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::error::KernelError;

/// `RMSNorm(x) = weight · x / √(mean(x²) + ε)` over the last dimension (f32 or bf16; CPU, and
/// CUDA with the `cuda` feature).
#[derive(Clone, Copy, Debug)]
pub struct RmsNormOp {
    eps: f32,
}

impl RmsNormOp {
    /// A norm with the checkpoint's `rms_norm_eps`.
    pub fn new(eps: f64) -> Self {
        Self { eps: eps as f32 }
    }

    /// Normalizes `x` (`[..., h]`) with `weight` (`[h]`, same dtype as `x`).
    pub fn forward(&self, x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op2_no_bwd(weight, self)
    }

    /// One token's row. `T` is the activation dtype: the normalized value is rounded to it
    /// before the weight multiply, and the product rounded again, as in transformers.
    fn row<T: Copy + Into<f32>>(&self, x: &[T], w: &[T], y: &mut [T], cast: impl Fn(f32) -> T) {
        // Eight partial sums vectorize; the order differs from torch's anyway (both are f32
        // sums of the same squares).
        let mut partial = [0f32; 8];
        let chunks = x.chunks_exact(8);
        let tail: f32 = chunks
            .remainder()
            .iter()
            .map(|&v| v.into() * v.into())
            .sum();
        for c in chunks {
            for (p, &v) in partial.iter_mut().zip(c) {
                *p += v.into() * v.into();
            }
        }
        let mean = (partial.iter().sum::<f32>() + tail) / x.len() as f32;
        let inv = 1.0 / (mean + self.eps).sqrt();
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
            *y = cast(w.into() * cast(x.into() * inv).into());
        }
    }

    fn run<T>(&self, x: &[T], w: &[T], cast: impl Fn(f32) -> T + Sync) -> Vec<T>
    where
        T: Copy + Into<f32> + Send + Sync,
    {
        let h = w.len().max(1);
        let mut y = vec![cast(0.0); x.len()];
        y.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .with_min_len(4)
            .for_each(|(y, x)| self.row(x, w, y, &cast));
        y
    }
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let msg = |m: String| candle_core::Error::Msg(format!("rms-norm: {m}"));
        let (x0, x1) = xl
            .contiguous_offsets()
            .ok_or_else(|| msg("input must be contiguous".into()))?;
        let (w0, w1) = wl
            .contiguous_offsets()
            .ok_or_else(|| msg("weight must be contiguous".into()))?;
        let h = xl.shape().dims().last().copied().unwrap_or(0);
        if wl.shape().dims() != [h] {
            return Err(msg(format!(
                "weight shape {:?} does not match hidden size {h}",
                wl.shape().dims()
            )));
        }
        let y = match (xs, ws) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                CpuStorage::F32(self.run(&x[x0..x1], &w[w0..w1], |v| v))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => {
                CpuStorage::BF16(self.run(&x[x0..x1], &w[w0..w1], bf16::from_f32))
            }
            (CpuStorage::F32(_) | CpuStorage::BF16(_), w) => {
                return Err(msg(format!(
                    "weight dtype {} differs from the input's",
                    w.dtype().as_str()
                )))
            }
            (other, _) => return Err(KernelError::UnsupportedDType(other.dtype().as_str()).into()),
        };
        Ok((y, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::rms_norm_fwd(self.eps, xs, xl, ws, wl)
    }
}
