//! Kernel correctness: packing round trips, every SIMD path against the scalar reference
//! (bit-exact, on random and ragged shapes), and BitLinear against an f64 naive reference.

mod common;

use std::sync::Arc;

use bitnet_kernels::cpu::{quantize_activations, ternary_matmul, Isa};
use bitnet_kernels::pack::{pack_ternary, unpack_ternary};
use bitnet_kernels::quant::{quantize_row, QuantizedActivations};
use bitnet_kernels::{
    BitLinearOp, KernelError, Relu2MulOp, RmsNormOp, ScaleConvention, TernaryWeight,
};
use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::random_acts;

fn random_ternary(rng: &mut StdRng, n: usize) -> Vec<i8> {
    (0..n).map(|_| rng.random_range(-1i8..=1)).collect()
}

/// `Σ_k T[o,k]·q[t,k]` straight from the unpacked matrix, in the kernels' output order.
fn naive_matmul(t: &[i8], out: usize, inp: usize, acts: &QuantizedActivations) -> Vec<i32> {
    let (tokens, kp) = (acts.tokens(), acts.padded_len());
    let mut y = vec![0i32; out * tokens];
    for o in 0..out {
        for tok in 0..tokens {
            let q = &acts.values()[tok * kp..][..inp];
            y[tok * out + o] = (0..inp).map(|k| t[o * inp + k] as i32 * q[k] as i32).sum();
        }
    }
    y
}

/// Runs `ternary_matmul` on every available instruction set for a random `out × inp` matrix
/// and `tokens` random tokens, and compares each with the naive product, bit for bit.
fn every_isa_matches_naive(
    out: usize,
    inp: usize,
    tokens: usize,
    seed: u64,
) -> Result<(), TestCaseError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let t = random_ternary(&mut rng, out * inp);
    let w = TernaryWeight::from_ternary(&t, out, inp).unwrap();
    let mut acts = QuantizedActivations::default();
    acts.quantize(
        &random_acts(&mut rng, tokens * inp),
        tokens,
        inp,
        w.padded_in_features(),
    );
    let expected = naive_matmul(&t, out, inp, &acts);
    for isa in Isa::available() {
        let mut y = vec![0i32; out * tokens];
        ternary_matmul(isa, &w, &acts, &mut y);
        prop_assert_eq!(&y, &expected, "{:?}", isa);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn pack_unpack_round_trip(quarter in 1usize..24, inp in 1usize..70, seed in any::<u64>()) {
        let out = quarter * 4;
        let t = random_ternary(&mut StdRng::seed_from_u64(seed), out * inp);
        let packed = pack_ternary(&t, out, inp).unwrap();
        prop_assert_eq!(packed.len(), out / 4 * inp);
        prop_assert_eq!(unpack_ternary(&packed, out, inp).unwrap(), t.clone());
        // The kernel layout, built from either source, holds the same matrix.
        let from_packed = TernaryWeight::from_hf_packed(&packed, out, inp).unwrap();
        prop_assert_eq!(from_packed.to_ternary(), t.clone());
        prop_assert_eq!(TernaryWeight::from_ternary(&t, out, inp).unwrap().to_ternary(), t);
    }

    /// Every instruction set equals the scalar path and the naive product, bit for bit,
    /// on ragged shapes (inputs not a multiple of 256, rows not a multiple of the tile height)
    /// and token counts on both sides of the GEMV/GEMM switch and the token block.
    #[test]
    fn simd_matches_scalar_bit_exact(
        out in 1usize..70, inp in 1usize..700, tokens in 1usize..21, seed in any::<u64>()
    ) {
        every_isa_matches_naive(out, inp, tokens, seed)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Prefill-sized products, where `Isa::Amx` takes its tiles (8+ tokens): partial 32-row
    /// panels, chunk boundaries, a lone last group of 16 tokens and ragged inputs.
    #[test]
    fn many_token_products_match_scalar(
        out in 1usize..200, inp in 1usize..800, tokens in 8usize..70, seed in any::<u64>()
    ) {
        every_isa_matches_naive(out, inp, tokens, seed)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Every instruction set's activation quantization equals the portable definition bit for
    /// bit, on ragged lengths (below and across the SIMD widths) with outliers and exact ties.
    #[test]
    fn simd_quantization_matches_scalar(len in 0usize..200, seed in any::<u64>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut x = random_acts(&mut rng, len);
        // Values landing exactly on .5 after scaling exercise ties-to-even: with absmax 127
        // the scale is 1.
        for (i, v) in x.iter_mut().enumerate().filter(|(i, _)| i % 5 == 1) {
            *v = (i % 40) as f32 - 20.5;
        }
        if let Some(first) = x.first_mut() {
            *first = 127.0;
        }
        // NaN is ignored by the absmax and quantizes to 0 on every path (as on CUDA).
        if len > 3 && seed % 2 == 0 {
            x[len / 2] = f32::NAN;
        }
        let mut expected = vec![0i8; len];
        let s = quantize_row(&x, &mut expected);
        let sum: i32 = expected.iter().map(|&v| v as i32).sum();
        for isa in Isa::available() {
            let mut q = vec![0i8; len];
            prop_assert_eq!(quantize_activations(isa, &x, &mut q), (s, sum), "{:?}", isa);
            prop_assert_eq!(&q, &expected, "{:?}", isa);
        }
    }
}

/// Saturated activations (all ±128/127) against all-(+1) and all-(−1) rows at the 2B-4T
/// down_proj width: the largest sums any real layer can produce, which overflow i16.
#[test]
fn extreme_values_accumulate_exactly() {
    let (out, inp) = (8, 6912);
    let t: Vec<i8> = (0..out * inp)
        .map(|i| if (i / inp) % 2 == 0 { 1 } else { -1 })
        .collect();
    let w = TernaryWeight::from_ternary(&t, out, inp).unwrap();
    // 1 token takes the GEMV tiles, 2 the GEMM tiles, 24 the AMX tiles where present.
    for tokens in [1, 2, 24] {
        let x: Vec<f32> = (0..tokens * inp)
            .map(|i| if (i / inp) % 2 == 0 { -1.0 } else { 1.0 })
            .collect();
        let mut acts = QuantizedActivations::default();
        acts.quantize(&x, tokens, inp, w.padded_in_features());
        let expected = naive_matmul(&t, out, inp, &acts);
        assert_eq!(expected[0], -127 * inp as i32);
        for isa in Isa::available() {
            let mut y = vec![0i32; out * tokens];
            ternary_matmul(isa, &w, &acts, &mut y);
            assert_eq!(y, expected, "{isa:?}, {tokens} tokens");
        }
    }
}

/// BitLinear against an f64 evaluation of the reference formula, for both scale conventions,
/// both dtypes and a leading batch shape.
#[test]
fn bitlinear_matches_f64_reference() {
    let mut rng = StdRng::seed_from_u64(7);
    let (out, inp, tokens) = (36, 300, 5);
    let t = random_ternary(&mut rng, out * inp);
    let w = Arc::new(TernaryWeight::from_ternary(&t, out, inp).unwrap());
    let x = random_acts(&mut rng, tokens * inp);
    let xt = Tensor::from_vec(x.clone(), (1, tokens, inp), &Device::Cpu).unwrap();
    for convention in [ScaleConvention::Multiply, ScaleConvention::Divide] {
        let op = BitLinearOp::new(w.clone(), 0.37, convention);
        let y = op.forward(&xt).unwrap();
        assert_eq!(y.dims(), &[1, tokens, out]);
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y_bf16 = op.forward(&xt.to_dtype(DType::BF16).unwrap()).unwrap();
        assert_eq!(y_bf16.dtype(), DType::BF16);
        let y_bf16 = y_bf16
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // The bf16 path quantizes the bf16-rounded input and rounds its output to bf16.
        let x_bf16: Vec<f32> = x
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        for (xs, ys, rel) in [(&x, &y, 1e-5), (&x_bf16, &y_bf16, 1.0 / 128.0)] {
            for tok in 0..tokens {
                let mut q = vec![0i8; inp];
                let s = quantize_row(&xs[tok * inp..][..inp], &mut q) as f64;
                for o in 0..out {
                    let dot: f64 = (0..inp).map(|k| t[o * inp + k] as f64 * q[k] as f64).sum();
                    let want = match convention {
                        ScaleConvention::Multiply => dot / s * 0.37,
                        ScaleConvention::Divide => dot / (s * 0.37),
                    };
                    let got = ys[tok * out + o] as f64;
                    assert!(
                        (got - want).abs() <= rel * want.abs().max(1e-3),
                        "{convention:?} rel {rel} [{tok},{o}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn bitlinear_rejects_bad_inputs() {
    let w = Arc::new(TernaryWeight::from_ternary(&[1, 0, -1, 1, 0, 0, 1, 1], 4, 2).unwrap());
    let op = BitLinearOp::new(w, 1.0, ScaleConvention::Multiply);
    let wrong_width = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let err = op.forward(&wrong_width).unwrap_err().to_string();
    assert!(
        err.contains("3 features") && err.contains("expects 2"),
        "{err}"
    );
    let f16 = Tensor::zeros((2, 2), DType::F16, &Device::Cpu).unwrap();
    let err = op.forward(&f16).unwrap_err().to_string();
    assert!(err.contains("f32 and bf16") && err.contains("f16"), "{err}");
    // Non-contiguous input is accepted (made contiguous first).
    let xt = Tensor::arange(0f32, 8.0, &Device::Cpu)
        .unwrap()
        .reshape((2, 4))
        .unwrap();
    let strided = xt.narrow(1, 1, 2).unwrap();
    let y = op.forward(&strided).unwrap().to_vec2::<f32>().unwrap();
    let y_ref = op
        .forward(&strided.contiguous().unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(y, y_ref);
}

#[test]
fn layout_rejects_invalid_weights() {
    let err = TernaryWeight::from_hf_packed(&[0x55, 0x55, 0xD5], 4, 3).unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::InvalidCode {
                row: 0,
                col: 2,
                bit: 6
            }
        ),
        "{err}"
    );
    let err = TernaryWeight::from_ternary(&[0, 0, 3, 0], 2, 2).unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::NotTernary {
                row: 1,
                col: 0,
                value: 3
            }
        ),
        "{err}"
    );
    let err = TernaryWeight::from_hf_packed(&[0; 5], 4, 3).unwrap_err();
    assert!(err.to_string().contains("5 elements, expected 3"), "{err}");
    assert!(TernaryWeight::from_ternary(&[0; 8], 4, 2)
        .unwrap()
        .is_all_zero());
    assert!(
        !TernaryWeight::from_ternary(&[0, 0, 0, 0, 0, 0, 0, 1], 4, 2)
            .unwrap()
            .is_all_zero()
    );
}

/// The BF16 head product on every instruction set against an f64 reference, on ragged widths.
#[test]
fn bf16_matmul_matches_f64_reference() {
    use bitnet_kernels::{Bf16LinearOp, Bf16Matrix};
    let mut rng = StdRng::seed_from_u64(3);
    for (rows, cols, tokens) in [(67, 2560, 1), (5, 77, 3), (130, 1000, 4)] {
        let w: Vec<half::bf16> = (0..rows * cols)
            .map(|_| half::bf16::from_f32(rng.random_range(-0.1..0.1)))
            .collect();
        let x = random_acts(&mut rng, tokens * cols);
        let m = Bf16Matrix::new(w.clone(), rows, cols).unwrap();
        for isa in Isa::available() {
            let mut out = vec![0f32; rows * tokens];
            m.matmul(isa, &x, &mut out);
            for r in 0..rows {
                for t in 0..tokens {
                    let terms =
                        (0..cols).map(|k| w[r * cols + k].to_f64() * x[t * cols + k] as f64);
                    let (want, scale) = terms.fold((0.0, 0.0), |(s, a), v| (s + v, a + v.abs()));
                    let got = out[r * tokens + t] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * scale,
                        "{isa:?} [{r},{t}]: {got} vs {want}"
                    );
                }
            }
        }
        let op = Bf16LinearOp::new(std::sync::Arc::new(m));
        let y = op
            .forward(&Tensor::from_vec(x.clone(), (tokens, cols), &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(y.dims(), &[tokens, rows]);
        let y = y.to_vec2::<f32>().unwrap();
        let mut direct = vec![0f32; rows * tokens];
        Bf16Matrix::new(w, rows, cols)
            .unwrap()
            .matmul(Isa::detect(), &x, &mut direct);
        for t in 0..tokens {
            for r in 0..rows {
                assert_eq!(y[t][r], direct[r * tokens + t]);
            }
        }
    }
}

/// The int8 head: every instruction set against the scalar reference, and the op close to the
/// exact BF16 product (int8 weights: error ~ one quantization step per row).
#[test]
fn int8_head_matches_scalar_and_approximates_bf16() {
    use bitnet_kernels::{Bf16Matrix, I8LinearOp, I8Matrix};
    let mut rng = StdRng::seed_from_u64(11);
    for (rows, cols, tokens) in [(67, 2560, 1), (5, 77, 3), (130, 1000, 2)] {
        let w: Vec<half::bf16> = (0..rows * cols)
            .map(|_| half::bf16::from_f32(rng.random_range(-0.1..0.1)))
            .collect();
        let x = random_acts(&mut rng, tokens * cols);
        let q8 = I8Matrix::quantize(&w, rows, cols).unwrap();
        let mut reference = vec![0f32; rows * tokens];
        q8.matmul(Isa::Scalar, &x, &mut reference);
        let scale: Vec<f32> = (0..tokens)
            .map(|t| {
                x[t * cols..(t + 1) * cols]
                    .iter()
                    .map(|v| v.abs() * 0.1)
                    .sum()
            })
            .collect();
        for isa in Isa::available() {
            let mut out = vec![0f32; rows * tokens];
            q8.matmul(isa, &x, &mut out);
            for (i, (a, b)) in out.iter().zip(&reference).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * scale[i % tokens],
                    "{isa:?} {i}: {a} vs {b}"
                );
            }
        }
        let xt = Tensor::from_vec(x.clone(), (tokens, cols), &Device::Cpu).unwrap();
        let approx = I8LinearOp::new(std::sync::Arc::new(q8))
            .forward(&xt)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mut exact = vec![0f32; rows * tokens];
        Bf16Matrix::new(w.clone(), rows, cols)
            .unwrap()
            .matmul(Isa::Scalar, &x, &mut exact);
        for t in 0..tokens {
            for r in 0..rows {
                let (a, b) = (approx[t][r], exact[r * tokens + t]);
                // Each weight moves by at most half a step (0.1 / 127 / 2); errors add up at most
                // linearly in |x|.
                let bound = scale[t] * 10.0 / 254.0;
                assert!(
                    (a - b).abs() <= bound,
                    "[{t},{r}]: int8 {a} vs bf16 {b} (bound {bound})"
                );
            }
        }
    }
}

/// The one-pass RMSNorm against transformers' formula composed from candle ops (f32 sums in
/// another order, so within a few ulps), in f32 and bf16, on a ragged hidden size.
#[test]
fn rms_norm_matches_composed_reference() {
    let mut rng = StdRng::seed_from_u64(11);
    let (tokens, h, eps) = (7, 301, 1e-5);
    let x = Tensor::from_vec(
        random_acts(&mut rng, tokens * h),
        (1, tokens, h),
        &Device::Cpu,
    )
    .unwrap();
    let w: Vec<f32> = (0..h).map(|_| rng.random_range(0.5..1.5)).collect();
    let w = Tensor::from_vec(w, h, &Device::Cpu).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let (x, w) = (x.to_dtype(dtype).unwrap(), w.to_dtype(dtype).unwrap());
        let xf = x.to_dtype(DType::F32).unwrap();
        let inv = (xf.sqr().unwrap().mean_keepdim(2).unwrap() + eps)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        let reference = xf
            .broadcast_mul(&inv)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .broadcast_mul(&w)
            .unwrap();
        let got = RmsNormOp::new(eps).forward(&x, &w).unwrap();
        assert_eq!((got.dims(), got.dtype()), (reference.dims(), dtype));
        let flat = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let tol = if dtype == DType::F32 { 1e-6 } else { 8e-3 };
        for (i, (a, b)) in flat(&got).iter().zip(flat(&reference)).enumerate() {
            assert!(
                (a - b).abs() <= tol * b.abs().max(1.0),
                "{dtype:?} [{i}]: {a} vs {b}"
            );
        }
    }
    let bad = Tensor::zeros(h + 1, DType::F32, &Device::Cpu).unwrap();
    assert!(RmsNormOp::new(eps).forward(&x, &bad).is_err());
}

/// The fused gated activation rounds as transformers' `relu2` then `* up` do in the model
/// dtype: the square rounded to it, then the product (f32: no intermediate rounding to add).
#[test]
fn relu2_mul_matches_reference_rounding() {
    let mut rng = StdRng::seed_from_u64(3);
    for n in [1usize, 7, 6912, 10_001] {
        let g: Vec<f32> = (0..n).map(|_| rng.random_range(-4.0..4.0)).collect();
        let u: Vec<f32> = (0..n).map(|_| rng.random_range(-4.0..4.0)).collect();
        for dtype in [DType::F32, DType::BF16] {
            let round = |x: f32| match dtype {
                DType::BF16 => half::bf16::from_f32(x).to_f32(),
                _ => x,
            };
            let (g, u): (Vec<f32>, Vec<f32>) = (
                g.iter().map(|&x| round(x)).collect(),
                u.iter().map(|&x| round(x)).collect(),
            );
            let want: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(&g, &u)| {
                    let r = g.max(0.0);
                    round(round(r * r) * u)
                })
                .collect();
            let t = |v: &[f32]| {
                Tensor::from_slice(v, (1, n), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let got = Relu2MulOp.forward(&t(&g), &t(&u)).unwrap();
            assert_eq!(got.dtype(), dtype);
            let got: Vec<f32> = got
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let bad = got.iter().zip(&want).position(|(a, b)| a != b);
            assert!(bad.is_none(), "n={n} {dtype:?} first mismatch at {bad:?}");
        }
    }
    let (a, b) = (
        Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
        Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(Relu2MulOp.forward(&a, &b).is_err());
}
