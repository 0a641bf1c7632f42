//! The Hugging Face "bitnet" packed layout and per-tensor weight quantization.
//!
//! A ternary `W` of shape `[out, in]` is stored as U8 `[out/4, in]`: bit pair `k` (bits `2k..2k+1`,
//! `k = 0` least significant) of packed element `[r, c]` holds `W[r + k·out/4, c]`, i.e. four
//! contiguous row *blocks*, not four interleaved rows. Codes 0/1/2 mean −1/0/+1; code 3 is invalid.
//! This is the layout of transformers' `integrations/bitnet.py` and of microsoft/bitnet-b1.58-2B-4T.

use crate::error::{KernelError, Result};
use crate::quant::round_ties_even_small;

/// Packs a row-major ternary `[out, in]` matrix (values −1/0/+1) into HF layout `[out/4, in]`.
pub fn pack_ternary(ternary: &[i8], out: usize, inp: usize) -> Result<Vec<u8>> {
    check_len("ternary weight", ternary.len(), out, inp)?;
    if !out.is_multiple_of(4) {
        return Err(KernelError::RowsNotMultipleOfFour { out });
    }
    let block = out / 4;
    let mut packed = vec![0u8; block * inp];
    for (idx, &v) in ternary.iter().enumerate() {
        let (row, col) = (idx / inp, idx % inp);
        if !(-1..=1).contains(&v) {
            return Err(KernelError::NotTernary { row, col, value: v });
        }
        let (k, r) = (row / block, row % block);
        packed[r * inp + col] |= ((v + 1) as u8) << (2 * k);
    }
    Ok(packed)
}

/// Unpacks HF layout `[out/4, in]` into a row-major ternary `[out, in]` matrix.
///
/// Fails on the invalid code 3, naming its position.
pub fn unpack_ternary(packed: &[u8], out: usize, inp: usize) -> Result<Vec<i8>> {
    if !out.is_multiple_of(4) {
        return Err(KernelError::RowsNotMultipleOfFour { out });
    }
    let block = out / 4;
    check_len("packed weight", packed.len(), block, inp)?;
    let mut ternary = vec![0i8; out * inp];
    for (idx, &byte) in packed.iter().enumerate() {
        let (r, col) = (idx / inp, idx % inp);
        for k in 0..4 {
            let code = (byte >> (2 * k)) & 3;
            if code == 3 {
                return Err(KernelError::InvalidCode {
                    row: r,
                    col,
                    bit: 2 * k,
                });
            }
            ternary[(r + k * block) * inp + col] = code as i8 - 1;
        }
    }
    Ok(ternary)
}

/// Per-tensor absmean ternary quantization, exactly as transformers' online `WeightQuant`:
/// `s = 1 / max(mean|W|, 1e-5)` in f32, `T = clamp(round(W·s), −1, 1)` with ties to even.
///
/// Returns `T` and the scale `1/s` by which `T` must be **multiplied** to approximate `W`
/// (the `weight_scale` of an `autobitlinear` checkpoint).
pub fn quantize_absmean(weights: &[f32]) -> (Vec<i8>, f32) {
    // Accumulate in f64 so the mean does not depend on summation order at f32 precision.
    let sum: f64 = weights.iter().map(|w| w.abs() as f64).sum();
    let mean = if weights.is_empty() {
        0.0
    } else {
        (sum / weights.len() as f64) as f32
    };
    let s = 1.0f32 / mean.max(1e-5);
    let ternary = weights
        .iter()
        // Clamping to ±2 first changes no result and keeps the fast rounding in range.
        .map(|&w| round_ties_even_small((w * s).clamp(-2.0, 2.0)).clamp(-1.0, 1.0) as i8)
        .collect();
    (ternary, 1.0 / s)
}

pub(crate) fn check_len(what: &'static str, got: usize, rows: usize, cols: usize) -> Result<()> {
    let expected = rows * cols;
    if got != expected {
        return Err(KernelError::LengthMismatch {
            what,
            got,
            expected,
            shape: [rows, cols],
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of REFERENCE.md: byte 0x92 = 10 01 00 10 at [r, c] with out/4 = 640.
    #[test]
    fn worked_example_0x92() {
        let (out, inp) = (2560, 3);
        let mut packed = vec![0x55u8; out / 4 * inp]; // 0x55 = four zeros
        packed[7 * inp + 1] = 0x92;
        let t = unpack_ternary(&packed, out, inp).unwrap();
        assert_eq!(t[7 * inp + 1], 1);
        assert_eq!(t[(7 + 640) * inp + 1], -1);
        assert_eq!(t[(7 + 1280) * inp + 1], 0);
        assert_eq!(t[(7 + 1920) * inp + 1], 1);
        assert_eq!(t.iter().filter(|&&v| v != 0).count(), 3);
        assert_eq!(pack_ternary(&t, out, inp).unwrap(), packed);
    }

    #[test]
    fn rejects_code_three_and_bad_shapes() {
        let err = unpack_ternary(&[0b1100_0101], 4, 1).unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::InvalidCode {
                    row: 0,
                    col: 0,
                    bit: 6
                }
            ),
            "{err}"
        );
        assert!(matches!(
            pack_ternary(&[0; 6], 6, 1),
            Err(KernelError::RowsNotMultipleOfFour { out: 6 })
        ));
        assert!(matches!(
            unpack_ternary(&[0; 3], 8, 1),
            Err(KernelError::LengthMismatch { .. })
        ));
        assert!(matches!(
            pack_ternary(&[0, 2, 0, 0], 4, 1),
            Err(KernelError::NotTernary {
                row: 1,
                col: 0,
                value: 2
            })
        ));
    }

    #[test]
    fn absmean_matches_reference_rounding() {
        // mean|W| = 1, so W·s = W: 0.5 rounds to 0 and 1.5 to 2 (→ clamped 1) under ties-to-even.
        let (t, scale) = quantize_absmean(&[0.5, -0.5, 1.5, -1.5, 0.0, 2.0]);
        assert_eq!(scale, 1.0);
        assert_eq!(t, vec![0, 0, 1, -1, 0, 1]);
        let (t, scale) = quantize_absmean(&[0.0; 4]);
        assert_eq!(t, vec![0; 4]);
        assert_eq!(scale, 1e-5);
    }
}
