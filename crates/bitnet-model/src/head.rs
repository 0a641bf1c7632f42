//! [`LmHead`]: the float output projection `hidden → vocab` logits, in f32.
//!
//! The head is the largest tensor of a small BitNet (2B-4T: 128256 × 2560, the tied embedding)
//! and during decoding it is read once per token, so its storage decides the decode speed.
//! A BF16 checkpoint's head is kept in BF16 (half the bytes of f32, and exact: f32 holds every
//! bf16 value) and multiplied by a small BF16×f32 GEMV with f32 accumulation; candle's own BF16
//! matmul would widen the whole matrix to f32 on every call. Many rows at once (perplexity,
//! `forward_all`) go through candle's f32 matmul a block of vocabulary rows at a time.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

/// Rows (tokens) up to which the GEMV path is used; beyond, a blocked f32 matmul is faster.
const GEMV_MAX_ROWS: usize = 8;
/// Vocabulary rows widened to f32 at a time on the matmul path (`BLOCK × hidden × 4` bytes).
const MATMUL_BLOCK: usize = 8192;
/// Vocabulary rows per parallel task of the GEMV.
const GEMV_TASK_ROWS: usize = 64;

/// The LM head weight `[vocab, hidden]`, BF16 or F32.
#[derive(Clone, Debug)]
pub(crate) struct LmHead {
    weight: Tensor,
}

impl LmHead {
    pub(crate) fn new(weight: Tensor) -> Self {
        Self { weight }
    }

    /// `x` `[m, hidden]` (any float dtype) → logits `[m, vocab]` in f32.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let m = x.dim(0)?;
        match self.weight.dtype() {
            DType::F32 => x.matmul(&self.weight.t()?),
            DType::BF16 if self.weight.device().is_cpu() && m <= GEMV_MAX_ROWS => {
                x.apply_op2_no_bwd(&self.weight, &Bf16Gemv)
            }
            _ => {
                let vocab = self.weight.dim(0)?;
                let mut blocks = Vec::with_capacity(vocab.div_ceil(MATMUL_BLOCK));
                for start in (0..vocab).step_by(MATMUL_BLOCK) {
                    let n = MATMUL_BLOCK.min(vocab - start);
                    let w = self.weight.narrow(0, start, n)?.to_dtype(DType::F32)?;
                    blocks.push(x.matmul(&w.t()?)?);
                }
                Tensor::cat(&blocks, 1)
            }
        }
    }
}

/// `y[i, r] = Σ_k x[i, k] · w[r, k]` for f32 `x` `[m, k]` and BF16 `w` `[n, k]`, f32 out.
struct Bf16Gemv;

impl CustomOp2 for Bf16Gemv {
    fn name(&self) -> &'static str {
        "bf16-gemv"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::BF16(w)) = (xs, ws) else {
            candle_core::bail!(
                "bf16-gemv: expected f32 x bf16, got {:?} x {:?}",
                xs.dtype(),
                ws.dtype()
            );
        };
        let ((x0, x1), (w0, w1)) = match (xl.contiguous_offsets(), wl.contiguous_offsets()) {
            (Some(a), Some(b)) => (a, b),
            _ => candle_core::bail!("bf16-gemv: inputs must be contiguous"),
        };
        let (m, k) = xl.shape().dims2()?;
        let (n, k2) = wl.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("bf16-gemv: x has {k} features, the head {k2}");
        }
        let (x, w) = (&x[x0..x1], &w[w0..w1]);
        // Computed row-major over the vocabulary ([n, m]) so each weight row is read once,
        // then transposed to [m, n] (m is tiny).
        let mut yt = vec![0f32; n * m];
        if k > 0 && m > 0 {
            let avx2 = has_avx2_fma();
            yt.par_chunks_mut(GEMV_TASK_ROWS * m)
                .zip(w.par_chunks(GEMV_TASK_ROWS * k))
                .for_each(|(out, rows)| {
                    for (o, row) in out.chunks_mut(m).zip(rows.chunks_exact(k)) {
                        for (oi, xi) in o.iter_mut().zip(x.chunks_exact(k)) {
                            *oi = dot(xi, row, avx2);
                        }
                    }
                });
        }
        let y = if m == 1 {
            yt
        } else {
            let mut y = vec![0f32; m * n];
            for (r, row) in yt.chunks_exact(m).enumerate() {
                for (i, &v) in row.iter().enumerate() {
                    y[i * n + r] = v;
                }
            }
            y
        };
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2_fma() -> bool {
    false
}

fn dot(x: &[f32], w: &[bf16], avx2: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the CPU supports AVX2 and FMA (checked by the caller via has_avx2_fma).
        return unsafe { dot_avx2(x, w) };
    }
    let _ = avx2;
    dot_portable(x, w)
}

/// The same loop compiled with AVX2 + FMA enabled, so it vectorizes 8 lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(x: &[f32], w: &[bf16]) -> f32 {
    dot_portable(x, w)
}

/// Dot product with 32 independent partial sums (enough to hide add latency once vectorized).
#[inline(always)]
fn dot_portable(x: &[f32], w: &[bf16]) -> f32 {
    const LANES: usize = 32;
    let mut acc = [0f32; LANES];
    let (xc, xt) = x.split_at(x.len() / LANES * LANES);
    let (wc, wt) = w.split_at(xc.len());
    for (xs, ws) in xc.chunks_exact(LANES).zip(wc.chunks_exact(LANES)) {
        for j in 0..LANES {
            // bf16 → f32 is exact: the bf16 bits are the top half of the f32.
            acc[j] += xs[j] * f32::from_bits((ws[j].to_bits() as u32) << 16);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (&a, &b) in xt.iter().zip(wt) {
        sum += a * b.to_f32();
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gemv_and_blocked_matmul_match_f32_matmul() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (1000, 77), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let exact = LmHead::new(w.to_dtype(DType::F32).unwrap());
        let head = LmHead::new(w);
        for m in [1, 3, GEMV_MAX_ROWS + 5] {
            let x = Tensor::randn(0f32, 1.0, (m, 77), &dev).unwrap();
            let a = head.forward(&x).unwrap();
            let b = exact.forward(&x).unwrap();
            assert_eq!(a.dims(), [m, 1000]);
            let d: f32 = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(d < 1e-4, "m = {m}: {d}");
        }
    }
}
