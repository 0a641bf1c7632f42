//! Per-token absmax int8 activation quantization (BitNet b1.58, arXiv 2402.17764 §2).
//!
//! Matches transformers' `ActQuant` / `BitLinear.activation_quant` in f32:
//! `s = 127 / max(max|x|, 1e-5)`, `q = clamp(round(x·s), −128, 127)`. PyTorch's `round` is
//! ties-to-even, unlike `f32::round` (and candle's `Tensor::round`), which round ties away from zero.

/// Quantizes one token's activations into `q` (same length) and returns the scale `s`.
///
/// The caller divides integer results by `s` to get back to activation units. This is the
/// portable definition; [`QuantizedActivations`] runs the SIMD twin
/// ([`crate::cpu::quantize_activations`]), which is tested to be bit-identical.
#[inline]
pub fn quantize_row(x: &[f32], q: &mut [i8]) -> f32 {
    debug_assert_eq!(x.len(), q.len());
    let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let s = 127.0 / absmax.max(1e-5);
    for (qi, &xi) in q.iter_mut().zip(x) {
        *qi = round_ties_even_small((xi * s).clamp(-128.0, 127.0)) as i8;
    }
    s
}

/// Rounds half to even for `|v| ≤ 2²²`, with two additions.
///
/// `f32::round_ties_even` lowers to a libm `rintf` call on baseline x86-64 (no SSE4.1), which
/// made quantization a visible part of decoding and conversion. Adding and subtracting 1.5·2²³
/// pushes the fraction bits out of the mantissa, and IEEE addition rounds ties to even; the
/// compiler may not fold it away because float addition is not associative.
#[inline(always)]
pub(crate) fn round_ties_even_small(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    (v + MAGIC) - MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_round_to_even_and_absmax_maps_to_127() {
        // absmax 127 → s = 1, so values are rounded as-is.
        let x = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -127.0, 3.49];
        let mut q = [0i8; 8];
        let s = quantize_row(&x, &mut q);
        assert_eq!(s, 1.0);
        assert_eq!(q, [127, 0, 2, 2, 0, -2, -127, 3]);
    }

    #[test]
    fn fast_rounding_equals_ties_even() {
        let mut v = -130.0f32;
        while v <= 130.0 {
            assert_eq!(round_ties_even_small(v), v.round_ties_even(), "{v}");
            v += 0.125;
        }
        for v in [0.49999997f32, -0.49999997, 2.5000002, 126.5, -127.5, 1e-30] {
            assert_eq!(round_ties_even_small(v), v.round_ties_even(), "{v}");
        }
    }

    #[test]
    fn zero_row_uses_floor_scale() {
        let mut q = [1i8; 3];
        let s = quantize_row(&[0.0; 3], &mut q);
        assert_eq!(s, 127.0 / 1e-5);
        assert_eq!(q, [0; 3]);
    }
}

/// A batch of quantized tokens, padded to the weight's block size, with per-token scale and sum.
///
/// Buffers are reused across calls, so steady-state decoding does not allocate.
#[derive(Debug, Default, Clone)]
pub struct QuantizedActivations {
    tokens: usize,
    k_pad: usize,
    q: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<i32>,
}

impl QuantizedActivations {
    /// Quantizes `tokens` rows of `k` features (row-major `x`) into rows of `k_pad ≥ k` int8
    /// values; the padding is zero, so it contributes nothing to any dot product.
    pub fn quantize<T: Copy + Into<f32> + Sync + Send + 'static>(
        &mut self,
        x: &[T],
        tokens: usize,
        k: usize,
        k_pad: usize,
    ) {
        assert!(
            k_pad >= k && x.len() == tokens * k,
            "activation buffer does not match its shape"
        );
        self.tokens = tokens;
        self.k_pad = k_pad;
        self.q.clear();
        self.q.resize(tokens * k_pad, 0);
        self.scales.resize(tokens, 0.0);
        self.sums.resize(tokens, 0);
        let isa = crate::cpu::Isa::detect();
        let quantize_one = |(((xr, qr), s), sum): RowOut<'_, T>| {
            let row: Vec<f32>;
            let xf: &[f32] = match as_f32(xr) {
                Some(f) => f,
                None => {
                    row = xr.iter().map(|&v| v.into()).collect();
                    &row
                }
            };
            (*s, *sum) = crate::cpu::quantize_activations(isa, xf, &mut qr[..k]);
        };
        let (kc, kp) = (k.max(1), k_pad.max(1));
        if tokens > 1 {
            use rayon::prelude::*;
            x.par_chunks_exact(kc)
                .zip(self.q.par_chunks_exact_mut(kp))
                .zip(self.scales.par_iter_mut())
                .zip(self.sums.par_iter_mut())
                .for_each(quantize_one);
        } else {
            x.chunks_exact(kc)
                .zip(self.q.chunks_exact_mut(kp))
                .zip(self.scales.iter_mut())
                .zip(self.sums.iter_mut())
                .for_each(quantize_one);
        }
    }

    /// Number of quantized tokens.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Padded row length.
    pub fn padded_len(&self) -> usize {
        self.k_pad
    }

    /// Per-token scales `s` (divide an integer dot product by `s`).
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Per-token sums of the quantized values (the kernels use them to turn code sums into
    /// ternary dot products: `Σ(code−1)·q = Σcode·q − Σq`).
    pub(crate) fn sums(&self) -> &[i32] {
        &self.sums
    }

    /// The quantized values, `tokens × padded_len()` row-major.
    pub fn values(&self) -> &[i8] {
        &self.q
    }
}

/// One token's input row, its quantized row, scale and sum, as the zipped iterators yield them.
type RowOut<'a, T> = (((&'a [T], &'a mut [i8]), &'a mut f32), &'a mut i32);

/// Borrows `x` as f32 when it already is, avoiding a copy on the f32 path.
fn as_f32<T: 'static>(x: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32, checked just above.
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()) })
}
