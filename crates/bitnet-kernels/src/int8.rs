//! [`I8Matrix`] and [`I8LinearOp`]: an int8 LM head (`--head q8`), half the bytes of BF16.
//!
//! Decoding reads the whole head for every token (2B-4T: 657 MB in BF16, more than all ternary
//! weights at 2 bits), so its format bounds decode speed on a bandwidth-limited CPU. Here each
//! row is quantized symmetrically to int8 with one f32 scale (`max|w| / 127`); activations stay
//! f32 (`y = scale_row · Σ q·x`, f32 accumulation). Quantizing the activations too (one absmax
//! per token, as BitLinear does) was tried first and lost far more accuracy: the final hidden
//! state has outliers that flatten every other value to a few int8 steps. This approximates the
//! BF16 head; `bitnet perplexity --head q8` measures the cost (docs/BENCHMARKS.md).

use half::bf16;
use rayon::prelude::*;

use crate::cpu::Isa;
use crate::dense::{row_parallel, HeadLinearOp, HeadMatrix};
use crate::quant::round_ties_even_small;

/// A row-major int8 matrix with one scale per row.
#[derive(Clone)]
pub struct I8Matrix {
    rows: usize,
    cols: usize,
    data: Vec<i8>,
    scales: Vec<f32>,
}

impl std::fmt::Debug for I8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8Matrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

impl I8Matrix {
    /// Quantizes each row of a BF16 `[rows, cols]` matrix: `w ≈ q · max|w_row| / 127`.
    pub fn quantize(data: &[bf16], rows: usize, cols: usize) -> crate::Result<Self> {
        crate::pack::check_len("int8 head source", data.len(), rows, cols)?;
        let mut q = vec![0i8; rows * cols];
        let mut scales = vec![0f32; rows];
        q.par_chunks_mut(cols.max(1))
            .zip(scales.par_iter_mut())
            .enumerate()
            .for_each(|(r, (qr, scale))| {
                let src = &data[r * cols..(r + 1) * cols];
                let absmax = src.iter().fold(0f32, |m, v| m.max(v.to_f32().abs()));
                *scale = absmax / 127.0;
                let inv = if absmax > 0.0 { 127.0 / absmax } else { 0.0 };
                for (qi, v) in qr.iter_mut().zip(src) {
                    *qi = round_ties_even_small((v.to_f32() * inv).clamp(-127.0, 127.0)) as i8;
                }
            });
        Ok(Self {
            rows,
            cols,
            data: q,
            scales,
        })
    }

    /// Rows (vocabulary size for a head).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (hidden size).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held (values and scales).
    pub fn storage_bytes(&self) -> usize {
        self.data.len() + 4 * self.rows
    }

    /// Row `i` dequantized (`q · scale`), e.g. for a tied embedding lookup.
    pub fn row_f32(&self, i: usize) -> Option<Vec<f32>> {
        let q = self.data.get(i * self.cols..(i + 1) * self.cols)?;
        let s = self.scales[i];
        Some(q.iter().map(|&v| v as f32 * s).collect())
    }

    /// `out[r · tokens + t] = scale_r · Σ_k q[r,k] · x[t,k]` in f32 (`x` is `tokens × cols`),
    /// split across the current rayon pool. Instruction sets differ only in f32 summation order.
    ///
    /// # Panics
    /// If `isa` is unavailable or the buffers do not match the shapes (programming errors).
    pub fn matmul(&self, isa: Isa, x: &[f32], out: &mut [f32]) {
        let c = self.cols;
        row_parallel(isa, self.rows, c, x, out, |r, xt| {
            self.scales[r] * dot(isa, &self.data[r * c..(r + 1) * c], xt)
        });
    }
}

fn dot(isa: Isa, w: &[i8], x: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the ISA was checked by the caller.
        Isa::Avx512Vnni | Isa::Amx => unsafe { x86::dot_avx512(w, x) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if std::arch::is_x86_feature_detected!("fma") => unsafe { x86::dot_avx2(w, x) },
        _ => dot_scalar(w, x),
    }
}

/// The reference: sequential f32 accumulation.
fn dot_scalar(w: &[i8], x: &[f32]) -> f32 {
    w.iter()
        .zip(x)
        .fold(0.0, |acc, (&w, &x)| acc + w as f32 * x)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_avx512(w: &[i8], x: &[f32]) -> f32 {
        let n = w.len() / 64 * 64;
        let mut acc = [_mm512_setzero_ps(); 4];
        for k in (0..n).step_by(64) {
            for (i, a) in acc.iter_mut().enumerate() {
                let wi = _mm512_cvtepi8_epi32(_mm_loadu_si128(w.as_ptr().add(k + 16 * i).cast()));
                *a = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(wi),
                    _mm512_loadu_ps(x.as_ptr().add(k + 16 * i)),
                    *a,
                );
            }
        }
        let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_reduce_add_ps(sum) + super::dot_scalar(&w[n..], &x[n..])
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_avx2(w: &[i8], x: &[f32]) -> f32 {
        let n = w.len() / 16 * 16;
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for k in (0..n).step_by(16) {
            let w0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(w.as_ptr().add(k).cast()));
            let w1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(w.as_ptr().add(k + 8).cast()));
            a0 = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(w0),
                _mm256_loadu_ps(x.as_ptr().add(k)),
                a0,
            );
            a1 = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(w1),
                _mm256_loadu_ps(x.as_ptr().add(k + 8)),
                a1,
            );
        }
        let s = _mm256_add_ps(a0, a1);
        let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s) + super::dot_scalar(&w[n..], &x[n..])
    }
}

/// `y = x · Wᵀ` for an [`I8Matrix`] `W`: input `[..., cols]` f32 or bf16, output `[..., rows]` f32.
pub type I8LinearOp = HeadLinearOp<I8Matrix>;

impl HeadMatrix for I8Matrix {
    const OP_NAME: &'static str = "int8-linear";

    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn matmul(&self, isa: Isa, x: &[f32], out: &mut [f32]) {
        I8Matrix::matmul(self, isa, x, out)
    }
}
