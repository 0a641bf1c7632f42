//! Per-token int8 activation quantization in SIMD, bit-identical to [`crate::quant::quantize_row`].
//!
//! The portable version compiles to scalar conversions and byte stores on baseline x86-64 and
//! took ~4% of prefill. These compute the same f32 products and the same clamp, and round
//! with the hardware conversion, whose default mode is ties-to-even like PyTorch's `round`.
//! NaN is treated as the portable code does (and the CUDA kernel): ignored by the absmax,
//! quantized to 0.

use super::Isa;
use crate::quant::quantize_row as quantize_scalar;

/// Quantizes one token `x` into `q` (same length) on `isa`; returns the scale `s` and `Σq`.
///
/// # Panics
/// If the lengths differ or `isa` is not available on this CPU (programming errors).
pub fn quantize_activations(isa: Isa, x: &[f32], q: &mut [i8]) -> (f32, i32) {
    assert_eq!(
        x.len(),
        q.len(),
        "quantize_activations: buffer lengths differ"
    );
    assert!(isa.is_available(), "{isa:?} is not supported by this CPU");
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the ISA and the lengths are asserted above.
        Isa::Avx512Vnni | Isa::Amx => unsafe { x86::quantize_avx512(x, q) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::quantize_avx2(x, q) },
        _ => {
            let s = quantize_scalar(x, q);
            (s, q.iter().map(|&v| v as i32).sum())
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::quantize_scalar;

    /// `127 / max(absmax, 1e-5)`, the scale of [`crate::quant::quantize_row`].
    fn scale(absmax: f32) -> f32 {
        127.0 / absmax.max(1e-5)
    }

    /// The scalar path for the last `x.len() % width` values, given the row's scale.
    fn tail(x: &[f32], q: &mut [i8], s: f32) -> i32 {
        let mut sum = 0;
        for (qi, &xi) in q.iter_mut().zip(x) {
            *qi = crate::quant::round_ties_even_small((xi * s).clamp(-128.0, 127.0)) as i8;
            sum += *qi as i32;
        }
        sum
    }

    fn absmax_tail(m: f32, x: &[f32]) -> f32 {
        x.iter().fold(m, |m, v| m.max(v.abs()))
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize_avx512(x: &[f32], q: &mut [i8]) -> (f32, i32) {
        let main = x.len() / 16 * 16;
        let (xp, qp) = (x.as_ptr(), q.as_mut_ptr());
        let mut m = _mm512_setzero_ps();
        for i in (0..main).step_by(16) {
            // `max_ps` returns its second operand when either is NaN: a NaN input leaves `m`.
            m = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(xp.add(i))), m);
        }
        let s = scale(absmax_tail(_mm512_reduce_max_ps(m), &x[main..]));
        let (sv, lo, hi) = (
            _mm512_set1_ps(s),
            _mm512_set1_ps(-128.0),
            _mm512_set1_ps(127.0),
        );
        let mut sum = _mm512_setzero_si512();
        for i in (0..main).step_by(16) {
            let v = _mm512_mul_ps(_mm512_loadu_ps(xp.add(i)), sv);
            let v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v), v); // NaN → 0
            let v = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, lo), hi));
            sum = _mm512_add_epi32(sum, v);
            _mm_storeu_si128(qp.add(i).cast(), _mm512_cvtsepi32_epi8(v));
        }
        let total = _mm512_reduce_add_epi32(sum) + tail(&x[main..], &mut q[main..], s);
        (s, total)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_avx2(x: &[f32], q: &mut [i8]) -> (f32, i32) {
        let main = x.len() / 32 * 32;
        if main == 0 {
            let s = quantize_scalar(x, q);
            return (s, q.iter().map(|&v| v as i32).sum());
        }
        let (xp, qp) = (x.as_ptr(), q.as_mut_ptr());
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
        let mut m = _mm256_setzero_ps();
        for i in (0..main).step_by(8) {
            // `max_ps` returns its second operand when either is NaN: a NaN input leaves `m`.
            m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(xp.add(i)), abs_mask), m);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        let s = scale(absmax_tail(absmax_tail(0.0, &lanes), &x[main..]));
        let (sv, lo, hi) = (
            _mm256_set1_ps(s),
            _mm256_set1_ps(-128.0),
            _mm256_set1_ps(127.0),
        );
        let ones = _mm256_set1_epi16(1);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let mut sum = _mm256_setzero_si256();
        for i in (0..main).step_by(32) {
            let [a, b, c, d] = std::array::from_fn(|j| {
                let v = _mm256_mul_ps(_mm256_loadu_ps(xp.add(i + 8 * j)), sv);
                let v = _mm256_and_ps(v, _mm256_cmp_ps::<_CMP_ORD_Q>(v, v)); // NaN → 0
                _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi))
            });
            // Values are already within i8, so the saturating packs are exact; they interleave
            // 128-bit lanes, which the permute undoes.
            let (ab, cd) = (_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_add_epi16(ab, cd), ones));
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
            _mm256_storeu_si256(qp.add(i).cast(), bytes);
        }
        let mut parts = [0i32; 8];
        _mm256_storeu_si256(parts.as_mut_ptr().cast(), sum);
        let total = parts.iter().sum::<i32>() + tail(&x[main..], &mut q[main..], s);
        (s, total)
    }
}
