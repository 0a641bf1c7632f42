//! The 4-bit head (`Q4Matrix`, `Q4LinearOp`): every instruction set bit-identical to the scalar
//! reference on random and ragged shapes, the product against an f64 reference of the
//! dequantized matrix, the quantization error bounds, and the error paths.

mod common;

use std::sync::Arc;

use bitnet_kernels::cpu::Isa;
use bitnet_kernels::{Bf16Matrix, KernelError, Q4LinearOp, Q4Matrix, Q4_BLOCK};
use candle_core::{DType, Device, Tensor};
use half::bf16;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::random_acts;

/// Weights spread over a few orders of magnitude between rows, with occasional outliers and
/// all-zero stretches, so that blocks get very different scales.
fn random_weights(rng: &mut StdRng, rows: usize, cols: usize) -> Vec<bf16> {
    (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            let row_scale = [0.02f32, 0.1, 1.0, 3e-4][r % 4];
            let v: f32 = rng.random_range(-1.0..1.0);
            let v = if c % 53 == 7 { v * 8.0 } else { v };
            let v = if r % 7 == 3 && c < 70 { 0.0 } else { v };
            bf16::from_f32(v * row_scale)
        })
        .collect()
}

fn matmul(m: &Q4Matrix, isa: Isa, x: &[f32], tokens: usize) -> Vec<f32> {
    let mut out = vec![0f32; m.rows() * tokens];
    m.matmul(isa, x, &mut out);
    out
}

/// Every available instruction set against the scalar reference, bit for bit.
fn assert_isas_agree(rows: usize, cols: usize, tokens: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let w = random_weights(&mut rng, rows, cols);
    let x = random_acts(&mut rng, tokens * cols);
    let m = Q4Matrix::quantize(&w, rows, cols).unwrap();
    let reference = matmul(&m, Isa::Scalar, &x, tokens);
    for isa in Isa::available() {
        let got = matmul(&m, isa, &x, tokens);
        for (i, (a, b)) in got.iter().zip(&reference).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{isa:?} {rows}x{cols}, {tokens} tokens, [{}, {}]: {a} vs {b}",
                i / tokens,
                i % tokens
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn q4_simd_matches_scalar_bit_exact(
        rows in 1usize..80,
        cols in 1usize..1200,
        tokens in 1usize..4,
        seed in any::<u64>(),
    ) {
        assert_isas_agree(rows, cols, tokens, seed);
    }
}

#[test]
fn q4_simd_matches_scalar_at_model_shapes() {
    // 2B-4T's width (40 blocks: two full groups of 16 scales and a partial one), the fixtures'
    // (96: a ragged block; 128), the shipped model's (256), and more rows than one chunk.
    for (rows, cols, tokens) in [(67, 2560, 1), (130, 96, 5), (509, 128, 2), (300, 256, 3)] {
        assert_isas_agree(rows, cols, tokens, (rows * cols) as u64);
    }
}

/// The product equals the f64 product of the dequantized weights with the activations, up to
/// the activation quantization: each value moves by at most half a step of its block,
/// `absmax_block / 254`.
#[test]
fn q4_matches_f64_reference_of_dequantized_weights() {
    let mut rng = StdRng::seed_from_u64(5);
    for (rows, cols, tokens) in [(67, 2560, 1), (21, 77, 3), (130, 1000, 2), (9, 64, 1)] {
        let w = random_weights(&mut rng, rows, cols);
        let x = random_acts(&mut rng, tokens * cols);
        let m = Q4Matrix::quantize(&w, rows, cols).unwrap();
        let deq: Vec<Vec<f32>> = (0..rows).map(|r| m.row_f32(r).unwrap()).collect();
        for isa in Isa::available() {
            let out = matmul(&m, isa, &x, tokens);
            for (r, wr) in deq.iter().enumerate() {
                for t in 0..tokens {
                    let xt = &x[t * cols..(t + 1) * cols];
                    let want: f64 = wr.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let mut bound = 0f64;
                    for (wb, xb) in wr.chunks(Q4_BLOCK).zip(xt.chunks(Q4_BLOCK)) {
                        let step = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 254.0;
                        let mass: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                        let abs: f64 = wb
                            .iter()
                            .zip(xb)
                            .map(|(&a, &b)| (a as f64 * b as f64).abs())
                            .sum();
                        bound += step * mass * (1.0 + 1e-6) + abs * 1e-6;
                    }
                    let got = out[r * tokens + t] as f64;
                    assert!(
                        (got - want).abs() <= bound + 1e-30,
                        "{isa:?} {rows}x{cols} [{r},{t}]: {got} vs {want} (bound {bound})"
                    );
                }
            }
        }
    }
}

/// Quantization: every weight within 2/9 of its block's largest magnitude (the worst candidate
/// scale, `m / −9`, clamps the opposite extreme from 9 to 7 steps), each block's squared error
/// at most that of the plain `m / −8` rule (one of the candidates), and exactly representable
/// blocks reproduced exactly.
#[test]
fn q4_quantization_error_is_bounded() {
    let mut rng = StdRng::seed_from_u64(9);
    let (rows, cols) = (37, 300);
    let w = random_weights(&mut rng, rows, cols);
    let m = Q4Matrix::quantize(&w, rows, cols).unwrap();
    let (mut err2, mut norm2) = (0f64, 0f64);
    for r in 0..rows {
        let deq = m.row_f32(r).unwrap();
        assert_eq!(deq.len(), cols);
        let src: Vec<f32> = w[r * cols..(r + 1) * cols]
            .iter()
            .map(|v| v.to_f32())
            .collect();
        for (sb, db) in src.chunks(Q4_BLOCK).zip(deq.chunks(Q4_BLOCK)) {
            // The value of largest magnitude (the positive one on a tie, as the quantizer).
            let (hi, lo) = sb
                .iter()
                .fold((0f32, 0f32), |(h, l), &v| (h.max(v), l.min(v)));
            let mx = if -lo > hi { lo } else { hi };
            let block_err: f64 = sb
                .iter()
                .zip(db)
                .map(|(&a, &b)| ((a - b) as f64).powi(2))
                .sum();
            for (&a, &b) in sb.iter().zip(db) {
                assert!(
                    (a - b).abs() <= mx.abs() * (2.0 / 9.0) * 1.001,
                    "row {r}: {a} → {b} (block max {mx})"
                );
            }
            // The Q4_0 rule with the f16-rounded scale, as the quantizer computes it.
            let s = half::f16::from_f32(mx / -8.0).to_f32();
            if s != 0.0 {
                let q40: f64 = sb
                    .iter()
                    .map(|&v| {
                        let q = (v * (1.0 / s)).clamp(-8.0, 7.0).round_ties_even();
                        ((v - q * s) as f64).powi(2)
                    })
                    .sum();
                assert!(block_err <= q40 * (1.0 + 1e-5) + 1e-30, "row {r}");
            }
            err2 += block_err;
            norm2 += sb.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
        }
    }
    // Outliers (8× in most blocks) coarsen the step of their blocks.
    assert!(
        err2 / norm2 < 0.05,
        "relative squared error {}",
        err2 / norm2
    );
    // Uniform values: a step of about max/7.5 leaves ~0.6% relative squared error.
    let uniform: Vec<bf16> = (0..64 * 256)
        .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
        .collect();
    let m = Q4Matrix::quantize(&uniform, 64, 256).unwrap();
    let (mut err2, mut norm2) = (0f64, 0f64);
    for r in 0..64 {
        for (a, b) in uniform[r * 256..(r + 1) * 256]
            .iter()
            .zip(m.row_f32(r).unwrap())
        {
            err2 += ((a.to_f32() - b) as f64).powi(2);
            norm2 += (a.to_f32() as f64).powi(2);
        }
    }
    assert!(
        err2 / norm2 < 0.008,
        "relative squared error {}",
        err2 / norm2
    );

    // q·2⁻⁵ with q in −8..7 and a −8 in every block: the −8 candidate is exact.
    let exact: Vec<bf16> = (0..3 * 130)
        .map(|i| {
            let q = if i % Q4_BLOCK == 5 {
                -8
            } else {
                (i * 7 % 16) as i32 - 8
            };
            bf16::from_f32(q as f32 / 32.0)
        })
        .collect();
    let m = Q4Matrix::quantize(&exact, 3, 130).unwrap();
    for r in 0..3 {
        let got = m.row_f32(r).unwrap();
        let want: Vec<f32> = exact[r * 130..(r + 1) * 130]
            .iter()
            .map(|v| v.to_f32())
            .collect();
        assert_eq!(got, want, "row {r}");
    }
}

/// Zero weights, zero activations and non-finite inputs give defined outputs, no panics.
#[test]
fn q4_degenerate_values() {
    let (rows, cols) = (6, 100);
    let zeros = vec![bf16::ZERO; rows * cols];
    let m = Q4Matrix::quantize(&zeros, rows, cols).unwrap();
    for isa in Isa::available() {
        let out = matmul(&m, isa, &vec![1.0; 2 * cols], 2);
        assert!(out.iter().all(|&v| v == 0.0), "{isa:?}");
    }
    let mut rng = StdRng::seed_from_u64(2);
    let mut w = random_weights(&mut rng, rows, cols);
    w[3] = bf16::NAN;
    w[150] = bf16::INFINITY;
    w[250] = bf16::from_f32(1e38);
    let m = Q4Matrix::quantize(&w, rows, cols).unwrap();
    let x = vec![0.0; cols];
    for isa in Isa::available() {
        let out = matmul(&m, isa, &x, 1);
        assert_eq!(out.len(), rows, "{isa:?}");
    }
}

#[test]
fn q4_rejects_bad_shapes_and_accepts_empty() {
    let bad = Q4Matrix::quantize(&[bf16::ONE; 10], 3, 4);
    assert!(
        matches!(
            bad,
            Err(KernelError::LengthMismatch {
                got: 10,
                expected: 12,
                ..
            })
        ),
        "{bad:?}"
    );
    assert!(Q4Matrix::quantize(&[], usize::MAX, 2).is_err());

    let no_rows = Q4Matrix::quantize(&[], 0, 5).unwrap();
    assert_eq!((no_rows.rows(), no_rows.cols()), (0, 5));
    assert_eq!(no_rows.row_f32(0), None);
    let mut out = [];
    no_rows.matmul(Isa::detect(), &[1.0; 10], &mut out);

    let no_cols = Q4Matrix::quantize(&[], 3, 0).unwrap();
    assert_eq!(no_cols.row_f32(2), Some(vec![]));
    assert_eq!(no_cols.row_f32(3), None);
    no_cols.matmul(Isa::detect(), &[], &mut out);

    let m = Arc::new(Q4Matrix::quantize(&[bf16::ONE; 12], 3, 4).unwrap());
    let op = Q4LinearOp::new(m);
    let x = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
    assert!(op.forward(&x).is_err());
    let x = Tensor::zeros((2, 4), DType::U32, &Device::Cpu).unwrap();
    assert!(op.forward(&x).is_err());
}

/// The op: shape `[..., rows]`, token-major, equal to the direct product for f32 and bf16 inputs
/// (bf16 widened first), and close to the exact BF16 head in RMS.
#[test]
fn q4_op_matches_matmul_and_approximates_bf16() {
    let mut rng = StdRng::seed_from_u64(17);
    for (rows, cols, tokens) in [(67, 2560, 1), (5, 77, 3), (130, 1000, 2)] {
        let w: Vec<bf16> = (0..rows * cols)
            .map(|_| bf16::from_f32(rng.random_range(-0.1..0.1)))
            .collect();
        let x = random_acts(&mut rng, tokens * cols);
        let m = Arc::new(Q4Matrix::quantize(&w, rows, cols).unwrap());
        let direct = matmul(&m, Isa::detect(), &x, tokens);
        let op = Q4LinearOp::new(m.clone());
        let xt = Tensor::from_vec(x.clone(), (1, tokens, cols), &Device::Cpu).unwrap();
        let y = op.forward(&xt).unwrap();
        assert_eq!(y.dims(), [1, tokens, rows]);
        let y = y.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        for t in 0..tokens {
            for r in 0..rows {
                assert_eq!(y[t][r], direct[r * tokens + t]);
            }
        }
        let xb = xt.to_dtype(DType::BF16).unwrap();
        let yb = op.forward(&xb).unwrap().squeeze(0).unwrap();
        let widened: Vec<f32> = xb
            .flatten_all()
            .unwrap()
            .to_vec1::<bf16>()
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let want = matmul(&m, Isa::detect(), &widened, tokens);
        let yb = yb.to_vec2::<f32>().unwrap();
        for t in 0..tokens {
            for r in 0..rows {
                assert_eq!(yb[t][r], want[r * tokens + t]);
            }
        }

        let mut exact = vec![0f32; rows * tokens];
        Bf16Matrix::new(w, rows, cols)
            .unwrap()
            .matmul(Isa::Scalar, &x, &mut exact);
        // 4-bit weights (~0.6% relative squared error for uniform values) dominate: the logits'
        // RMS error is ~8% of their RMS.
        let (mut e2, mut n2) = (0f64, 0f64);
        for t in 0..tokens {
            for r in 0..rows {
                let (a, b) = (y[t][r] as f64, exact[r * tokens + t] as f64);
                e2 += (a - b).powi(2);
                n2 += b * b;
            }
        }
        assert!(
            (e2 / n2).sqrt() < 0.12,
            "{rows}x{cols}: relative RMS error {}",
            (e2 / n2).sqrt()
        );
    }
}
