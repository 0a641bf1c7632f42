//! BF16 × f32 dense products for the LM head (see [`crate::Bf16Matrix`]).
//!
//! BF16 is the top half of an f32, so widening is a 16-bit shift: exact, and cheap in SIMD.

use half::bf16;

use super::Isa;

/// `Σ_k w[k] · x[k]` with f32 accumulation, on the best path `isa` allows.
pub(crate) fn dot_bf16(isa: Isa, w: &[bf16], x: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the ISA was checked to be available by the caller.
        Isa::Avx512Vnni | Isa::Amx => unsafe { x86::dot_avx512(w, x) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if std::arch::is_x86_feature_detected!("fma") => unsafe { x86::dot_avx2(w, x) },
        _ => dot_scalar(w, x),
    }
}

/// The reference: sequential f32 accumulation.
pub(crate) fn dot_scalar(w: &[bf16], x: &[f32]) -> f32 {
    w.iter()
        .zip(x)
        .fold(0.0, |acc, (w, x)| acc + w.to_f32() * x)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::bf16;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_avx512(w: &[bf16], x: &[f32]) -> f32 {
        // Four independent accumulators hide the FMA latency, so the loop runs at load speed.
        let n = w.len() / 64 * 64;
        let mut acc = [_mm512_setzero_ps(); 4];
        let (wp, xp) = (w.as_ptr().cast::<u16>(), x.as_ptr());
        for k in (0..n).step_by(64) {
            for (i, a) in acc.iter_mut().enumerate() {
                let wi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(wp.add(k + 16 * i).cast()));
                let wf = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wi));
                *a = _mm512_fmadd_ps(wf, _mm512_loadu_ps(xp.add(k + 16 * i)), *a);
            }
        }
        let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_reduce_add_ps(sum) + super::dot_scalar(&w[n..], &x[n..])
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_avx2(w: &[bf16], x: &[f32]) -> f32 {
        let n = w.len() / 16 * 16;
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (wp, xp) = (w.as_ptr().cast::<u16>(), x.as_ptr());
        for k in (0..n).step_by(16) {
            let w0 = _mm256_cvtepu16_epi32(_mm_loadu_si128(wp.add(k).cast()));
            let w1 = _mm256_cvtepu16_epi32(_mm_loadu_si128(wp.add(k + 8).cast()));
            a0 = _mm256_fmadd_ps(
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w0)),
                _mm256_loadu_ps(xp.add(k)),
                a0,
            );
            a1 = _mm256_fmadd_ps(
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w1)),
                _mm256_loadu_ps(xp.add(k + 8)),
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
