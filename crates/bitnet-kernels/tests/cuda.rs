//! The CUDA path against the CPU path (run on a GPU machine: see docs/CUDA.md).
//!
//! BitLinear: both paths compute the same exact integer sums and the same f32 epilogue, so the
//! outputs must be equal bit for bit (checked on every kernel, f32 and bf16, both scale
//! conventions, ragged shapes, 1..=20 and 128 tokens). The BF16 head differs only in f32
//! summation order: within 1e-5 of Σ|w·x| per element. The 4-bit head follows the CPU's order
//! exactly and must be equal bit for bit.
#![cfg(feature = "cuda")]

use std::sync::{Arc, OnceLock};

use bitnet_kernels::cuda::{self, Kernel};
use bitnet_kernels::quant::QuantizedActivations;
use bitnet_kernels::{
    Bf16LinearOp, Bf16Matrix, BitLinearOp, LinearInput, Q4LinearOp, Q4Matrix, RmsNormOp,
    ScaleConvention, TernaryWeight,
};
use candle_core::{DType, Device, IndexOp, Tensor};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn gpu() -> &'static Device {
    static DEV: OnceLock<Device> = OnceLock::new();
    DEV.get_or_init(|| {
        let dev = Device::new_cuda(0).expect("a CUDA device");
        eprintln!(
            "CUDA device: {}",
            cuda::device_name(dev.as_cuda_device().expect("cuda"))
        );
        dev
    })
}

fn random_ternary(rng: &mut StdRng, n: usize) -> Vec<i8> {
    (0..n).map(|_| rng.random_range(-1i8..=1)).collect()
}

/// Activations with outliers, an all-zero token, a token of exact ties (absmax 127 → s = 1),
/// and a NaN, so that every branch of the quantizer is exercised.
fn random_acts(rng: &mut StdRng, tokens: usize, k: usize) -> Vec<f32> {
    let mut x: Vec<f32> = (0..tokens * k)
        .map(|i| {
            let v: f32 = rng.random_range(-1.0..1.0);
            if i % 97 == 0 {
                v * 20.0
            } else {
                v
            }
        })
        .collect();
    if tokens >= 3 && k >= 2 {
        x[k..2 * k].fill(0.0);
        let ties = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -127.0];
        for (i, v) in x[2 * k..3 * k].iter_mut().enumerate() {
            *v = ties[i % ties.len()];
        }
    }
    if tokens >= 4 && k >= 3 {
        x[3 * k + 2] = f32::NAN;
    }
    x
}

fn ulps(a: f32, b: f32) -> u32 {
    if a == b || (a.is_nan() && b.is_nan()) {
        return 0;
    }
    let key = |v: f32| {
        let i = v.to_bits() as i32;
        if i < 0 {
            i32::MIN - i
        } else {
            i
        }
    };
    key(a).abs_diff(key(b))
}

/// Ragged shapes: `in` not a multiple of 256 (and some that are), `out` not a multiple of 4 or 64.
const SHAPES: [(usize, usize); 9] = [
    (1, 1),
    (5, 255),
    (37, 257),
    (64, 256),
    (70, 700),
    (129, 1000),
    (200, 2560),
    (96, 6912),
    (640, 2560),
];

/// A tensor's values (any dtype, any device) as host f32, flattened.
fn host_f32(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn token_counts() -> Vec<usize> {
    let mut t: Vec<usize> = (1..=20).collect();
    t.push(128);
    t
}

#[test]
fn quantization_matches_cpu() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(11);
    for &(k, tokens) in &[
        (1usize, 1usize),
        (255, 7),
        (256, 4),
        (700, 20),
        (2560, 128),
        (6912, 3),
    ] {
        let k_pad = k.div_ceil(256) * 256;
        let x = random_acts(&mut rng, tokens, k);
        let mut cpu = QuantizedActivations::default();
        cpu.quantize(&x, tokens, k, k_pad);
        for dtype in [DType::F32, DType::BF16] {
            let xt = Tensor::from_slice(&x, (tokens, k), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let mut reference = cpu.clone();
            if dtype == DType::BF16 {
                let xb = host_f32(&xt);
                reference.quantize(&xb, tokens, k, k_pad);
            }
            let acts = cuda::quantize(&xt.to_device(dev).unwrap(), k_pad).unwrap();
            let (q, s, sums) = acts.to_host().unwrap();
            assert_eq!(
                q,
                reference.values(),
                "values, k={k} tokens={tokens} {dtype:?}"
            );
            let s_bits: Vec<u32> = s.iter().map(|v| v.to_bits()).collect();
            let r_bits: Vec<u32> = reference.scales().iter().map(|v| v.to_bits()).collect();
            assert_eq!(s_bits, r_bits, "scales, k={k} tokens={tokens} {dtype:?}");
            let expected: Vec<i32> = reference
                .values()
                .chunks(k_pad)
                .map(|r| r.iter().map(|&v| v as i32).sum())
                .collect();
            assert_eq!(sums, expected, "sums, k={k} tokens={tokens} {dtype:?}");
        }
    }
}

#[test]
fn bitlinear_kernels_match_cpu_bit_exact() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(7);
    let mut checked = 0usize;
    let mut inexact = 0usize;
    // Failures are collected, not raised at once, so that one run reports every broken kernel.
    let mut failures: Vec<String> = Vec::new();
    for (si, &(out, inp)) in SHAPES.iter().enumerate() {
        let w = Arc::new(
            TernaryWeight::from_ternary(&random_ternary(&mut rng, out * inp), out, inp).unwrap(),
        );
        let convention = if si % 2 == 0 {
            ScaleConvention::Multiply
        } else {
            ScaleConvention::Divide
        };
        let op = BitLinearOp::new(w, rng.random_range(0.3..3.0), convention);
        for tokens in token_counts() {
            // Large shapes: a subset of token counts, to keep the CPU reference quick.
            if out * inp > 200_000 && !matches!(tokens, 1 | 3 | 8 | 9 | 17 | 128) {
                continue;
            }
            let x = random_acts(&mut rng, tokens, inp);
            for dtype in [DType::F32, DType::BF16] {
                let xc = Tensor::from_slice(&x, (tokens, inp), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let expected = host_f32(&op.forward(&xc).unwrap());
                let xg = xc.to_device(dev).unwrap();
                for kernel in [
                    Kernel::Auto,
                    Kernel::Gemv,
                    Kernel::GemmDp4a,
                    Kernel::GemmMma,
                ] {
                    let y = if kernel == Kernel::Auto {
                        op.forward(&xg)
                    } else {
                        cuda::bitlinear_with(&op, &xg, kernel)
                    };
                    let case = format!("{kernel:?} {dtype:?} out={out} in={inp} tokens={tokens}");
                    let y = match y {
                        Ok(y) if y.dims() == [tokens, out] && y.dtype() == dtype => y,
                        Ok(y) => {
                            failures.push(format!("{case}: got {:?} {:?}", y.dims(), y.dtype()));
                            continue;
                        }
                        Err(e) => {
                            failures.push(format!("{case}: {e}"));
                            continue;
                        }
                    };
                    let got = host_f32(&y);
                    let worst = got
                        .iter()
                        .zip(&expected)
                        .map(|(&a, &b)| ulps(a, b))
                        .max()
                        .unwrap_or(0);
                    inexact += got
                        .iter()
                        .zip(&expected)
                        .filter(|(a, b)| ulps(**a, **b) > 0)
                        .count();
                    checked += got.len();
                    if worst > 1 {
                        let bad = got
                            .iter()
                            .zip(&expected)
                            .position(|(a, b)| ulps(*a, *b) > 1);
                        let bad = bad.unwrap_or(0);
                        failures.push(format!(
                            "{case}: {worst} ulps; first at [{}, {}]: {} vs {}",
                            bad / out,
                            bad % out,
                            got[bad],
                            expected[bad]
                        ));
                    }
                }
            }
        }
    }
    eprintln!("bitlinear: {checked} outputs checked, {inexact} not bit-identical");
    for f in failures.iter().take(40) {
        eprintln!("FAIL {f}");
    }
    assert!(failures.is_empty(), "{} failing cases", failures.len());
}

#[test]
fn bitlinear_handles_offsets_batches_and_reuse() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(3);
    let (out, inp) = (100, 300);
    let w = Arc::new(
        TernaryWeight::from_ternary(&random_ternary(&mut rng, out * inp), out, inp).unwrap(),
    );
    let op = BitLinearOp::new(w, 0.7, ScaleConvention::Multiply);
    let x = Tensor::from_vec(random_acts(&mut rng, 2 * 5, inp), (2, 5, inp), &Device::Cpu).unwrap();
    // A 3-D batch, and the last position only (a contiguous view with a non-zero offset).
    let last_cpu = x.i((.., 4..5, ..)).unwrap().contiguous().unwrap();
    let xg = x.to_device(dev).unwrap();
    let last_gpu = xg.i((1.., 4.., ..)).unwrap();
    for _ in 0..2 {
        let (a, b) = (op.forward(&x).unwrap(), op.forward(&xg).unwrap());
        assert_eq!(b.dims(), &[2, 5, out]);
        let (a, b): (Vec<f32>, Vec<f32>) = (
            a.flatten_all().unwrap().to_vec1().unwrap(),
            b.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(a, b);
        let a = op.forward(&last_cpu.i(1..).unwrap()).unwrap();
        let b = op.clone().forward(&last_gpu).unwrap();
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
    // Wrong width and dtype are errors, not crashes.
    assert!(op
        .forward(&Tensor::zeros((1, inp + 1), DType::F32, dev).unwrap())
        .is_err());
    assert!(op
        .forward(&Tensor::zeros((1, inp), DType::F64, dev).unwrap())
        .is_err());
}

/// LM-head shapes: ragged rows and columns, then one large `(rows, cols)`.
fn head_shapes(rows: usize, cols: usize) -> [(usize, usize); 6] {
    [
        (1, 1),
        (37, 255),
        (130, 256),
        (513, 2560),
        (64, 1001),
        (rows, cols),
    ]
}

/// `n` BF16 values uniform in [-1, 1).
fn random_bf16(rng: &mut StdRng, n: usize) -> Vec<bf16> {
    (0..n)
        .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
        .collect()
}

#[test]
fn bf16_head_matches_cpu() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(5);
    for (rows, cols) in head_shapes(1000, 6912) {
        let data = random_bf16(&mut rng, rows * cols);
        let wf: Vec<f32> = data.iter().map(|v| v.to_f32()).collect();
        let op = Bf16LinearOp::new(Arc::new(Bf16Matrix::new(data, rows, cols).unwrap()));
        for tokens in token_counts() {
            if rows * cols > 1_000_000 && !matches!(tokens, 1 | 9 | 128) {
                continue;
            }
            let x = random_acts(&mut rng, tokens, cols)
                .into_iter()
                .map(|v| if v.is_nan() { 0.25 } else { v })
                .collect::<Vec<f32>>();
            for dtype in [DType::F32, DType::BF16] {
                let xc = Tensor::from_slice(&x, (tokens, cols), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let xf = host_f32(&xc);
                let expected: Vec<f32> = op
                    .forward(&xc)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let y = op.forward(&xc.to_device(dev).unwrap()).unwrap();
                assert_eq!(y.dims(), &[tokens, rows]);
                assert_eq!(y.dtype(), DType::F32);
                let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
                let mut worst = 0f64;
                for t in 0..tokens {
                    for r in 0..rows {
                        let mag: f64 = (0..cols)
                            .map(|c| (wf[r * cols + c] as f64 * xf[t * cols + c] as f64).abs())
                            .sum();
                        let d = (got[t * rows + r] as f64 - expected[t * rows + r] as f64).abs();
                        worst = worst.max(d / mag.max(1e-30));
                    }
                }
                assert!(
                    worst <= 1e-5,
                    "rows={rows} cols={cols} tokens={tokens} {dtype:?}: relative error {worst:e}"
                );
            }
        }
    }
}

#[test]
fn q4_head_matches_cpu_bit_exact() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(9);
    // Ragged rows (groups of 4) and columns (blocks of 64), an all-zero weight block, and the
    // 2B-4T hidden size with more rows than the grid covers in one stride.
    for (rows, cols) in head_shapes(70_001, 2560) {
        let mut data = random_bf16(&mut rng, rows * cols);
        data[..cols.min(64)].fill(bf16::ZERO);
        let op = Q4LinearOp::new(Arc::new(Q4Matrix::quantize(&data, rows, cols).unwrap()));
        for tokens in [1, 2, 5, 9] {
            let x = random_acts(&mut rng, tokens, cols);
            for dtype in [DType::F32, DType::BF16] {
                let xc = Tensor::from_slice(&x, (tokens, cols), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let expected = host_f32(&op.forward(&xc).unwrap());
                let y = op.forward(&xc.to_device(dev).unwrap()).unwrap();
                assert_eq!(y.dims(), &[tokens, rows]);
                assert_eq!(y.dtype(), DType::F32);
                let got = host_f32(&y);
                let bad = (0..got.len()).find(|&i| ulps(got[i], expected[i]) != 0);
                if let Some(i) = bad {
                    panic!(
                        "rows={rows} cols={cols} tokens={tokens} {dtype:?}: element {i} is {} on \
                         the GPU, {} on the CPU",
                        got[i], expected[i]
                    );
                }
            }
        }
    }
}

/// Small shapes through every kernel, for `compute-sanitizer` (memcheck / racecheck) runs.
/// RMSNorm on the GPU against the CPU op: f32 sums of squares in another order, so within
/// 1e-5 relative (f32), or up to two bf16 steps (bf16: the normalized value and the product
/// are each rounded, and either may land on the other side of a boundary).
#[test]
fn rms_norm_matches_cpu() {
    let mut rng = StdRng::seed_from_u64(5);
    for &(tokens, h) in &[(1usize, 2560usize), (7, 301), (128, 6912), (3, 64)] {
        let x: Vec<f32> = (0..tokens * h)
            .map(|_| rng.random_range(-4.0..4.0))
            .collect();
        let w: Vec<f32> = (0..h).map(|_| rng.random_range(0.5..1.5)).collect();
        let x = Tensor::from_vec(x, (tokens, h), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(w, h, &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let (x, w) = (x.to_dtype(dtype).unwrap(), w.to_dtype(dtype).unwrap());
            let op = bitnet_kernels::RmsNormOp::new(1e-5);
            let cpu = op.forward(&x, &w).unwrap();
            let gpu_out = op
                .forward(&x.to_device(gpu()).unwrap(), &w.to_device(gpu()).unwrap())
                .unwrap();
            assert_eq!(gpu_out.dtype(), dtype);
            for (i, (a, b)) in host_f32(&gpu_out).iter().zip(host_f32(&cpu)).enumerate() {
                // f32: the mean of squares may differ in its last bits (summation order).
                let ok = if dtype == DType::F32 {
                    (a - b).abs() <= 1e-5 * b.abs().max(1e-3)
                } else {
                    ulps(*a, b) <= 2 << 16
                };
                assert!(ok, "{dtype:?} {tokens}x{h} [{i}]: {a} vs {b}");
            }
        }
    }
}

#[test]
fn sanitizer_smoke() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(9);
    let (out, inp) = (37, 257);
    let t = random_ternary(&mut rng, out * inp);
    let op = BitLinearOp::new(
        Arc::new(TernaryWeight::from_ternary(&t, out, inp).unwrap()),
        1.5,
        ScaleConvention::Multiply,
    );
    for tokens in [1, 9, 70] {
        let x = Tensor::from_vec(
            random_acts(&mut rng, tokens, inp),
            (tokens, inp),
            &Device::Cpu,
        )
        .unwrap();
        let expected: Vec<f32> = op
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let xg = x.to_device(dev).unwrap();
        for kernel in [Kernel::Gemv, Kernel::GemmDp4a, Kernel::GemmMma] {
            let y = cuda::bitlinear_with(&op, &xg, kernel).unwrap();
            let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got, expected, "{kernel:?} tokens={tokens}");
        }
    }
    let data: Vec<bf16> = (0..out * inp)
        .map(|i| bf16::from_f32(i as f32 * 1e-3))
        .collect();
    let q4 = Q4LinearOp::new(Arc::new(Q4Matrix::quantize(&data, out, inp).unwrap()));
    let head = Bf16LinearOp::new(Arc::new(Bf16Matrix::new(data, out, inp).unwrap()));
    let x = Tensor::ones((9, inp), DType::F32, dev).unwrap();
    assert_eq!(head.forward(&x).unwrap().dims(), &[9, out]);
    assert_eq!(q4.forward(&x).unwrap().dims(), &[9, out]);
}

/// RoPE tables `[n, hd/2]` as transformers builds them (θ = 10000).
fn rope_tables(n: usize, hd: usize) -> (Vec<f32>, Vec<f32>) {
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / hd as f32))
        .collect();
    let angles = || (0..n).flat_map(|p| inv.iter().map(move |f| p as f32 * f));
    (
        angles().map(f32::cos).collect(),
        angles().map(f32::sin).collect(),
    )
}

/// Rotates one head `x` (`[hd]`) at position `p`, half-split form, in f64.
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], p: usize) -> Vec<f64> {
    let half = x.len() / 2;
    let (c, s) = (&cos[p * half..], &sin[p * half..]);
    let mut y = vec![0f64; x.len()];
    for i in 0..half {
        let (a, b) = (x[i] as f64, x[i + half] as f64);
        y[i] = a * c[i] as f64 - b * s[i] as f64;
        y[i + half] = b * c[i] as f64 + a * s[i] as f64;
    }
    y
}

/// kv_append + decode_attention against an f64 reference: GQA groupings, head dims 32/64/128,
/// positions on both sides of split boundaries, f32 and bf16 inputs. The f32 path differs from
/// the reference only in summation order. decode_attention appending the row itself equals
/// kv_append followed by decode_attention bit for bit.
#[test]
fn decode_attention_matches_reference() {
    use cuda::attention::{self, Rope};
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(11);
    for &(nh, nkv, hd, cap) in &[
        (4, 2, 32, 64),
        (20, 5, 128, 256),
        (6, 6, 64, 192),
        (8, 1, 64, 70),
    ] {
        let (cos, sin) = rope_tables(cap, hd);
        for pos in [0usize, 1, 63, 64, 65, cap - 1]
            .into_iter()
            .filter(|&p| p < cap)
        {
            for dtype in [DType::F32, DType::BF16] {
                // Cache rows 0..pos hold earlier (already rotated) keys and values.
                let rows = nkv * cap * hd;
                let kc: Vec<f32> = (0..rows).map(|_| rng.random_range(-1.0..1.0)).collect();
                let vc: Vec<f32> = (0..rows).map(|_| rng.random_range(-1.0..1.0)).collect();
                let round = |v: Vec<f32>| -> Vec<f32> {
                    v.into_iter()
                        .map(|x| {
                            if dtype == DType::BF16 {
                                bf16::from_f32(x).to_f32()
                            } else {
                                x
                            }
                        })
                        .collect()
                };
                let q = round((0..nh * hd).map(|_| rng.random_range(-2.0..2.0)).collect());
                let k = round((0..nkv * hd).map(|_| rng.random_range(-2.0..2.0)).collect());
                let v = round((0..nkv * hd).map(|_| rng.random_range(-1.0..1.0)).collect());
                let (cos_t, sin_t) = (round(cos.clone()), round(sin.clone()));
                let to_gpu = |v: &[f32], shape: &[usize]| {
                    Tensor::from_slice(v, shape, &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                        .to_device(dev)
                        .unwrap()
                };
                let cache = |v: &[f32]| {
                    Tensor::from_slice(v, (1, nkv, cap, hd), &Device::Cpu)
                        .unwrap()
                        .to_device(dev)
                        .unwrap()
                };
                let (kg, vg) = (cache(&kc), cache(&vc));
                let (cg, sg) = (
                    to_gpu(&cos_t, &[cap, hd / 2]),
                    to_gpu(&sin_t, &[cap, hd / 2]),
                );
                let rope = Rope { cos: &cg, sin: &sg };
                let p = Tensor::new(&[pos as u32], dev).unwrap();
                let (qg, kn, vn) = (
                    to_gpu(&q, &[1, 1, nh * hd]),
                    to_gpu(&k, &[1, 1, nkv * hd]),
                    to_gpu(&v, &[1, 1, nkv * hd]),
                );
                attention::kv_append(&kg, &kn, &p, Some(rope)).unwrap();
                attention::kv_append(&vg, &vn, &p, None).unwrap();
                let out = attention::decode_attention(&qg, None, &kg, &vg, &p, rope, nh).unwrap();
                // Appending inside the attention launch gives the same bits and caches.
                let (kf, vf) = (cache(&kc), cache(&vc));
                let fused =
                    attention::decode_attention(&qg, Some((&kn, &vn)), &kf, &vf, &p, rope, nh)
                        .unwrap();
                let bits = |t: &Tensor| -> Vec<u32> {
                    host_f32(t).into_iter().map(f32::to_bits).collect()
                };
                assert_eq!(bits(&fused), bits(&out), "appending in the launch: output");
                assert_eq!(bits(&kf), bits(&kg), "appending in the launch: keys");
                assert_eq!(bits(&vf), bits(&vg), "appending in the launch: values");
                assert_eq!(out.dims(), &[1, 1, nh * hd]);
                assert_eq!(out.dtype(), dtype);
                let got = host_f32(&out);
                let kgot: Vec<f32> = kg.flatten_all().unwrap().to_vec1().unwrap();
                let vgot: Vec<f32> = vg.flatten_all().unwrap().to_vec1().unwrap();

                let tol = if dtype == DType::F32 { 2e-5 } else { 2e-2 };
                let mut keys = kc.clone();
                for h in 0..nkv {
                    let kr = rotate(&k[h * hd..(h + 1) * hd], &cos_t, &sin_t, pos);
                    let row = (h * cap + pos) * hd;
                    for d in 0..hd {
                        keys[row + d] = kr[d] as f32;
                        assert!((kgot[row + d] as f64 - kr[d]).abs() <= tol, "key {h},{d}");
                        assert_eq!(vgot[row + d], v[h * hd + d], "value {h},{d}");
                    }
                }
                // Only row `pos` changed.
                for (i, (&a, &b)) in kgot.iter().zip(&kc).enumerate() {
                    if (i / hd) % cap != pos {
                        assert_eq!(a, b, "untouched key {i}");
                    }
                }
                for h in 0..nh {
                    let kvh = h / (nh / nkv);
                    let qr = rotate(&q[h * hd..(h + 1) * hd], &cos_t, &sin_t, pos);
                    let scores: Vec<f64> = (0..=pos)
                        .map(|j| {
                            let row = (kvh * cap + j) * hd;
                            let dot: f64 = (0..hd).map(|d| qr[d] * keys[row + d] as f64).sum();
                            dot / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..hd {
                        let want: f64 = (0..=pos)
                            .map(|j| e[j] / z * vgot[(kvh * cap + j) * hd + d] as f64)
                            .sum();
                        let g = got[h * hd + d] as f64;
                        assert!(
                            (g - want).abs() <= tol * (1.0 + want.abs()),
                            "nh={nh} nkv={nkv} hd={hd} pos={pos} {dtype:?} head {h} dim {d}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

/// A recorded graph replays the same kernels with whatever the device-side position holds.
#[test]
fn graph_replays_with_new_positions() {
    use cuda::attention::{self, Rope};
    let dev = gpu();
    let (nh, nkv, hd, cap) = (4, 2, 32, 128);
    let (cos, sin) = rope_tables(cap, hd);
    let cg = Tensor::from_slice(&cos, (cap, hd / 2), dev).unwrap();
    let sg = Tensor::from_slice(&sin, (cap, hd / 2), dev).unwrap();
    let rope = Rope { cos: &cg, sin: &sg };
    let mut rng = StdRng::seed_from_u64(5);
    let tokens: Vec<(Vec<f32>, Vec<f32>)> = (0..10)
        .map(|_| {
            let r = |n: usize, rng: &mut StdRng| {
                (0..n)
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect::<Vec<_>>()
            };
            (r(nh * hd, &mut rng), r(nkv * hd, &mut rng))
        })
        .collect();
    // Eager: every step launched directly.
    let run = |graph: bool| -> Vec<f32> {
        let kc = Tensor::zeros((1, nkv, cap, hd), DType::F32, dev).unwrap();
        let vc = Tensor::zeros((1, nkv, cap, hd), DType::F32, dev).unwrap();
        let q = Tensor::zeros((1, nh * hd), DType::F32, dev).unwrap();
        let kv = Tensor::zeros((1, nkv * hd), DType::F32, dev).unwrap();
        let pos = Tensor::zeros(1, DType::U32, dev).unwrap();
        let out = Tensor::zeros((1, nh * hd), DType::F32, dev).unwrap();
        let step = || -> candle_core::Result<()> {
            let o = attention::decode_attention(&q, Some((&kv, &kv)), &kc, &vc, &pos, rope, nh)?;
            out.slice_set(&o, 0, 0)
        };
        let mut recorded = None;
        let mut outs = Vec::new();
        for (i, (qv, kvv)) in tokens.iter().enumerate() {
            q.slice_set(&Tensor::from_slice(qv, (1, nh * hd), dev).unwrap(), 0, 0)
                .unwrap();
            kv.slice_set(&Tensor::from_slice(kvv, (1, nkv * hd), dev).unwrap(), 0, 0)
                .unwrap();
            pos.slice_set(&Tensor::new(&[i as u32], dev).unwrap(), 0, 0)
                .unwrap();
            match &recorded {
                Some(g) if graph => cuda::Graph::launch(g).unwrap(),
                _ => {
                    step().unwrap();
                    if graph {
                        let cuda = dev.as_cuda_device().unwrap();
                        recorded = Some(cuda::Graph::capture(cuda, step).unwrap());
                    }
                }
            }
            outs.extend(out.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        outs
    };
    assert_eq!(run(true), run(false));
}

#[test]
fn relu2_mul_matches_cpu() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(4);
    for n in [1usize, 6912, 100_003] {
        let g: Vec<f32> = (0..n).map(|_| rng.random_range(-4.0..4.0)).collect();
        let u: Vec<f32> = (0..n).map(|_| rng.random_range(-4.0..4.0)).collect();
        for dtype in [DType::F32, DType::BF16] {
            let t = |v: &[f32]| {
                Tensor::from_slice(v, n, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let (g, u) = (t(&g), t(&u));
            let cpu = bitnet_kernels::Relu2MulOp.forward(&g, &u).unwrap();
            let gpu = bitnet_kernels::Relu2MulOp
                .forward(&g.to_device(dev).unwrap(), &u.to_device(dev).unwrap())
                .unwrap();
            assert_eq!(host_f32(&gpu), host_f32(&cpu), "n={n} {dtype:?}");
        }
    }
}

/// One fused launch (input: x, x + r or relu(x)²·r; then the norm; then quantization) shared by
/// several BitLinears equals, bit for bit, the separate ops followed by each BitLinear; four
/// weights take two multi-matrix GEMV launches; the residual sum equals candle's add. One token
/// takes the GEMV with the quantizer inside (4, 8 and 12 values per thread in registers; 13000
/// inputs also leave part of the row outside them; the 2B-4T q/k/v and gate/up shapes and one
/// between them give 8, 4, 2 and 1 warps per group on 132 SMs: H100 SXM, H200), more tokens the
/// quantization kernel.
#[test]
fn linears_shared_matches_separate_ops() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(21);
    let small: &[usize] = &[64, 20, 132, 8];
    for &(inp, tokens, outs) in &[
        (96usize, 1usize, small),
        (700, 1, small),
        (2560, 1, small),
        (2560, 1, &[2560, 640, 640]),
        (2560, 1, &[4000, 2800]),
        (2560, 1, &[6912, 6912]),
        (6912, 1, small),
        (9000, 1, small),
        (13000, 1, small),
        (2560, 37, small),
        (6912, 3, small),
        (300, 20, small),
    ] {
        let ops: Vec<BitLinearOp> = outs
            .iter()
            .map(|&out| {
                let w = TernaryWeight::from_ternary(&random_ternary(&mut rng, out * inp), out, inp)
                    .unwrap();
                BitLinearOp::new(
                    Arc::new(w),
                    rng.random_range(0.5..2.0),
                    ScaleConvention::Multiply,
                )
            })
            .collect();
        let refs: Vec<&BitLinearOp> = ops.iter().collect();
        let x = random_acts(&mut rng, tokens, inp);
        let r: Vec<f32> = (0..tokens * inp)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let nw: Vec<f32> = (0..inp).map(|_| rng.random_range(0.5..1.5)).collect();
        for dtype in [DType::F32, DType::BF16] {
            let t = |v: &[f32], shape: &[usize]| {
                Tensor::from_slice(v, shape, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .to_device(dev)
                    .unwrap()
            };
            let (xg, wg) = (t(&x, &[1, tokens, inp]), t(&nw, &[inp]));
            let rg = t(&r, &[1, tokens, inp]);
            let inputs = [
                LinearInput::Plain(&xg),
                LinearInput::Add(&xg, &rg),
                LinearInput::Relu2Mul(&xg, &rg),
            ];
            for input in inputs {
                let (formed, want_sum) = input.materialize().unwrap();
                let normed = RmsNormOp::new(1e-5).forward(&formed, &wg).unwrap();
                for (norm, separate) in [(Some((&wg, 1e-5)), &normed), (None, &formed)] {
                    let (sum, got) = cuda::linears_shared(input, norm, &refs).unwrap();
                    // One to three weights: a single launch.
                    let (sum1, got1) = cuda::linears_shared(input, norm, &refs[..1]).unwrap();
                    let case = format!(
                        "inp={inp} tokens={tokens} {dtype:?} {input:?} norm={}",
                        norm.is_some()
                    );
                    match (&sum, &want_sum) {
                        // NaN inputs (one token has one) give NaN sums on both sides.
                        (Some(s), Some(w)) => assert!(
                            host_f32(s)
                                .iter()
                                .zip(host_f32(w))
                                .all(|(a, b)| *a == b || (a.is_nan() && b.is_nan())),
                            "sum {case}"
                        ),
                        (None, None) => {}
                        _ => panic!("residual sum presence differs: {case}"),
                    }
                    if let (Some(a), Some(b)) = (&sum, &sum1) {
                        assert!(
                            host_f32(a)
                                .iter()
                                .zip(host_f32(b))
                                .all(|(a, b)| *a == b || (a.is_nan() && b.is_nan())),
                            "sum of one launch: {case}"
                        );
                    }
                    for (op, y) in ops.iter().zip(got).chain(ops.iter().zip(got1)) {
                        let want = op.forward(separate).unwrap();
                        assert_eq!(y.dims(), want.dims());
                        assert_eq!(host_f32(&y), host_f32(&want), "{case}");
                    }
                }
            }
        }
    }
}

/// The host sampler's greedy pick: the first index of the largest logit.
fn first_argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn greedy_next_and_embed_row_match_the_host() {
    use cuda::greedy::{self, TokenReadback, NAN_TOKEN};
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(11);
    let mut readback = TokenReadback::new(dev).unwrap();
    for n in [1, 3, 1023, 1024, 1025, 4097, 128_256] {
        let mut cases: Vec<Vec<f32>> = vec![(0..n).map(|_| rng.random_range(-8.0..8.0)).collect()];
        // Ties (the first wins), -0 against +0 (equal), all equal, the maximum last.
        let mut tied: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
        if n > 2 {
            tied[n - 1] = 6.0;
        }
        cases.push(tied);
        let mut zeros = vec![-1.0f32; n];
        zeros[n / 2] = -0.0;
        zeros[n - 1] = 0.0;
        cases.push(zeros);
        cases.push(vec![f32::NEG_INFINITY; n]);
        let mut last = vec![0.5f32; n];
        last[n - 1] = 0.75;
        cases.push(last);
        for (c, x) in cases.iter().enumerate() {
            let logits = Tensor::from_slice(x, (1, n), dev).unwrap();
            let state = Tensor::new(&[7u32, 41], dev).unwrap();
            greedy::greedy_next(&state, &logits).unwrap();
            readback.queue(&state).unwrap();
            let want = first_argmax(x);
            assert_eq!(readback.wait().unwrap(), want, "n {n} case {c}");
            assert_eq!(
                state.to_vec1::<u32>().unwrap(),
                [want, 42],
                "n {n} case {c}"
            );
        }
        let mut nan: Vec<f32> = (0..n).map(|i| i as f32).collect();
        nan[rng.random_range(0..n)] = f32::NAN;
        let state = Tensor::new(&[0u32, 0], dev).unwrap();
        greedy::greedy_next(&state, &Tensor::from_slice(&nan, n, dev).unwrap()).unwrap();
        assert_eq!(state.to_vec1::<u32>().unwrap(), [NAN_TOKEN, 1], "n {n} NaN");
    }
    // A state that is a view at an offset (as a position read by attention is).
    let buf = Tensor::new(&[9u32, 9, 3, 5], dev).unwrap();
    let state = buf.narrow(0, 2, 2).unwrap();
    let x = Tensor::new(&[1f32, 4.0, 2.0], dev).unwrap();
    greedy::greedy_next(&state, &x).unwrap();
    assert_eq!(buf.to_vec1::<u32>().unwrap(), [9, 9, 1, 6]);
    assert!(greedy::greedy_next(&buf, &x).is_err(), "four-element state");

    // Rows of a ragged table, f32 and bf16, and zeros for the NaN marker.
    let (rows, cols) = (37, 300);
    let values = random_bf16(&mut rng, rows * cols);
    let op = Bf16LinearOp::new(Arc::new(
        Bf16Matrix::new(values.clone(), rows, cols).unwrap(),
    ));
    // The same rows from a table that lives on the device (`embed_row_of`), here a view at an
    // offset of a larger tensor.
    let mut padded = random_bf16(&mut rng, cols);
    padded.extend_from_slice(&values);
    let on_device = Tensor::from_vec(padded, (rows + 1, cols), dev)
        .unwrap()
        .narrow(0, 1, rows)
        .unwrap();
    for id in [0u32, 5, 36, NAN_TOKEN, 37] {
        let state = Tensor::new(&[id, 0], dev).unwrap();
        let f = op.embed_row(&state, DType::F32).unwrap();
        let b = op.embed_row(&state, DType::BF16).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let of = greedy::embed_row_of(&on_device, &state, dtype).unwrap();
            let by_op = op.embed_row(&state, dtype).unwrap();
            let bits = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
            assert_eq!(
                bits(&of).to_vec1::<f32>().unwrap(),
                bits(&by_op).to_vec1::<f32>().unwrap(),
                "embed_row_of, id {id}, {dtype:?}"
            );
        }
        assert_eq!(f.dims(), [1, cols]);
        let want: Vec<bf16> = match values.chunks(cols).nth(id as usize) {
            Some(row) => row.to_vec(),
            None => vec![bf16::ZERO; cols],
        };
        let wf: Vec<f32> = want.iter().map(|v| v.to_f32()).collect();
        assert_eq!(
            f.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            wf,
            "id {id}"
        );
        assert_eq!(
            b.flatten_all().unwrap().to_vec1::<bf16>().unwrap(),
            want,
            "id {id}"
        );
    }
    let state = Tensor::new(&[1u32, 0], dev).unwrap();
    let f32_table = on_device.to_dtype(DType::F32).unwrap();
    assert!(greedy::embed_row_of(&f32_table, &state, DType::F32).is_err());
    let host_table = on_device.to_device(&Device::Cpu).unwrap();
    assert!(greedy::embed_row_of(&host_table, &state, DType::F32).is_err());
    assert!(greedy::embed_row_of(&on_device, &state, DType::F16).is_err());
}

/// The device sampler's CPU twin: the same fixed-point weights (every f64 step as the kernel
/// rounds it), but the top-k and top-p cuts by sorting the ranks and walking them, as the host
/// sampler does.
mod draw_twin {
    use bitnet_kernels::cuda::greedy::NAN_TOKEN;
    use bitnet_kernels::cuda::sample::DrawParams;

    pub fn order_key(v: f32) -> u32 {
        let u = v.to_bits();
        if u >> 31 == 1 {
            !u
        } else {
            u | 1 << 31
        }
    }

    fn fixed_exp(x: f64, s: i32) -> u64 {
        if x.is_nan() || x < -44.0 {
            return 0;
        }
        let k = (x * std::f64::consts::LOG2_E).round_ties_even();
        let r = (-k).mul_add(6.931_471_803_691_238e-1, x);
        let r = (-k).mul_add(1.908_214_929_270_587_7e-10, r);
        let c = [
            2.087_675_698_786_81e-9,
            2.505_210_838_544_172e-8,
            2.755_731_922_398_589e-7,
            2.755_731_922_398_589_3e-6,
            2.480_158_730_158_73e-5,
            1.984_126_984_126_984e-4,
            1.388_888_888_888_889e-3,
            8.333_333_333_333_333e-3,
            4.166_666_666_666_666_4e-2,
            1.666_666_666_666_666_6e-1,
            0.5,
            1.0,
            1.0,
        ];
        let p = c
            .iter()
            .fold(1.605_904_383_682_161_3e-10_f64, |p, &c| p.mul_add(r, c));
        let e = k as i64 + i64::from(s);
        (p * f64::from_bits(((1023 + e) as u64) << 52)).round_ties_even() as u64
    }

    fn splitmix(seed: u64, position: u32) -> f64 {
        let mut z =
            seed.wrapping_add((u64::from(position) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 * (-53f64).exp2()
    }

    /// The kept tokens' weights (0 if dropped), or None if a logit is NaN.
    pub fn kept(logits: &[f32], p: &DrawParams) -> Option<Vec<u64>> {
        if logits.iter().any(|l| l.is_nan()) {
            return None;
        }
        let n = logits.len();
        let s = 62
            - if n > 1 {
                32 - (n as u32 - 1).leading_zeros() as i32
            } else {
                0
            };
        let maxord = logits.iter().map(|&l| order_key(l)).max()?;
        let max = logits[logits.iter().position(|&l| order_key(l) == maxord)?];
        let t = p.temperature;
        let mut w: Vec<u64> = logits
            .iter()
            .map(|&l| {
                if order_key(l) == maxord {
                    1 << s
                } else {
                    fixed_exp(f64::from(l / t - max / t), s)
                }
            })
            .collect();
        let mut ranks: Vec<usize> = (0..n).collect();
        ranks.sort_by_key(|&i| (std::cmp::Reverse(order_key(logits[i])), i));
        let k = p.top_k as usize;
        let candidates = if k > 0 && k < n { k } else { n };
        let mut keep = candidates;
        if p.top_p < 1.0 {
            let total: u64 = ranks[..candidates].iter().map(|&i| w[i]).sum();
            let target = (f64::from(p.top_p) * total as f64).ceil() as u64;
            let mut cumulative = 0;
            for (r, &i) in ranks[..candidates].iter().enumerate() {
                cumulative += w[i];
                if cumulative >= target {
                    keep = r + 1;
                    break;
                }
            }
        }
        for &i in &ranks[keep..] {
            w[i] = 0;
        }
        let wmin = f64::from(p.min_p) * (1u64 << s) as f64;
        for w in w.iter_mut() {
            if (*w as f64) < wmin {
                *w = 0;
            }
        }
        Some(w)
    }

    pub fn draw(logits: &[f32], p: &DrawParams, position: u32) -> u32 {
        let Some(w) = kept(logits, p) else {
            return NAN_TOKEN;
        };
        let total: u64 = w.iter().sum();
        let r = ((splitmix(p.seed, position) * total as f64) as u64).min(total - 1);
        let mut c = 0;
        for (i, &w) in w.iter().enumerate() {
            if c <= r && r < c + w {
                return i as u32;
            }
            c += w;
        }
        unreachable!("r < total")
    }
}

fn sampler_cases(rng: &mut StdRng, n: usize) -> Vec<Vec<f32>> {
    let normal = |rng: &mut StdRng, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (a, b): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
                scale * (-2.0 * a.ln()).sqrt() * (std::f32::consts::TAU * b).cos()
            })
            .collect()
    };
    let mut cases = vec![normal(rng, 3.0), normal(rng, 0.2)];
    // BF16-valued logits (as a BF16 model's head gives): many exact ties.
    cases.push(
        normal(rng, 4.0)
            .into_iter()
            .map(|v| bf16::from_f32(v).to_f32())
            .collect(),
    );
    // Ties at every level, -0 against +0, -inf, a peaked row.
    cases.push((0..n).map(|i| (i % 7) as f32).collect());
    let mut special = normal(rng, 1.0);
    for (i, v) in special.iter_mut().enumerate() {
        match i % 5 {
            0 => *v = f32::NEG_INFINITY,
            1 => *v = if i % 2 == 0 { -0.0 } else { 0.0 },
            _ => {}
        }
    }
    cases.push(special);
    let mut peaked = normal(rng, 1.0);
    peaked[n / 3] = 40.0;
    cases.push(peaked);
    let mut inf = normal(rng, 1.0);
    inf[n - 1] = f32::INFINITY;
    cases.push(inf);
    cases
}

#[test]
fn device_sampler_matches_its_twin() {
    use cuda::greedy::NAN_TOKEN;
    use cuda::sample::{DeviceSampler, DrawParams};
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(23);
    // (temperature, top-k, top-p, min-p); top-k n - 1 and n + 5 are set per size below.
    let params = [
        (0.8, 0, 0.95, 0.0),
        (1.0, 0, 1.0, 0.0),
        (0.3, 0, 0.5, 0.0),
        (2.0, 0, 0.1, 0.0),
        (1.0, 0, 1e-6, 0.0),
        (0.7, 0, 1.0, 0.05),
        (1.5, 0, 0.9, 0.5),
        (1.0, 1, 1.0, 0.0),
        (0.8, 40, 0.95, 0.0),
        (2.0, 40, 1.0, 0.0),
        (1.0, 3, 1.0, 0.3),
        (1.2, u32::MAX, 0.9, 0.0),
        (1.2, u32::MAX - 1, 1.0, 0.0),
    ];
    let mut checked = 0;
    for n in [1, 2, 3, 255, 1024, 1025, 4097, 50_000, 128_256] {
        let first = DrawParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 1,
        };
        let mut sampler = DeviceSampler::new(dev, n, &first).unwrap();
        for (c, x) in sampler_cases(&mut rng, n).iter().enumerate() {
            let logits = Tensor::from_slice(x, (1, n), dev).unwrap();
            for &(temperature, top_k, top_p, min_p) in &params {
                // The two largest top-k values stand for n + 5 (off) and n - 1.
                let top_k = match top_k {
                    u32::MAX => n as u32 + 5,
                    k if k == u32::MAX - 1 => n.saturating_sub(1) as u32,
                    k => k,
                };
                let p = DrawParams {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    seed: rng.random(),
                };
                sampler.set_params(&p).unwrap();
                for position in [0u32, 1, 77, rng.random_range(0..1 << 20)] {
                    let state = Tensor::new(&[7u32, position], dev).unwrap();
                    sampler.next(&state, &logits).unwrap();
                    let want = draw_twin::draw(x, &p, position);
                    assert_ne!(want, NAN_TOKEN);
                    assert_eq!(
                        state.to_vec1::<u32>().unwrap(),
                        [want, position + 1],
                        "n {n} case {c} T {temperature} top-k {top_k} top-p {top_p} min-p {min_p} at {position}"
                    );
                    checked += 1;
                }
            }
        }
        // NaN is reported, and the scratch is clean for the next draw.
        sampler.set_params(&first).unwrap();
        let mut nan = sampler_cases(&mut rng, n).swap_remove(0);
        nan[n / 2] = f32::NAN;
        let state = Tensor::new(&[0u32, 5], dev).unwrap();
        sampler
            .next(&state, &Tensor::from_slice(&nan, n, dev).unwrap())
            .unwrap();
        assert_eq!(state.to_vec1::<u32>().unwrap(), [NAN_TOKEN, 6], "n {n} NaN");
        nan[n / 2] = 0.25;
        sampler
            .next(&state, &Tensor::from_slice(&nan, n, dev).unwrap())
            .unwrap();
        assert_eq!(
            state.to_vec1::<u32>().unwrap()[0],
            draw_twin::draw(&nan, &first, 6)
        );
    }
    eprintln!("{checked} draws equal to the twin");
    // Wrong sizes and dtypes are errors.
    let sampler = DeviceSampler::new(
        dev,
        10,
        &DrawParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
        },
    )
    .unwrap();
    let state = Tensor::new(&[0u32, 0], dev).unwrap();
    assert!(sampler
        .next(&state, &Tensor::zeros(11, DType::F32, dev).unwrap())
        .is_err());
    assert!(sampler
        .next(&state, &Tensor::zeros(10, DType::BF16, dev).unwrap())
        .is_err());
    let bad = DrawParams {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed: 0,
    };
    assert!(DeviceSampler::new(dev, 10, &bad).is_err());
}

#[test]
fn device_sampler_replays_in_a_graph_and_follows_the_distribution() {
    use cuda::greedy::TokenReadback;
    use cuda::sample::{DeviceSampler, DrawParams};
    let dev = gpu();
    // Eight tokens: top-k 4 keeps 2, 1.5, 1 and 0.5; top-p 0.85 of their mass keeps the first
    // three (0.898 of it; over all eight it would keep four).
    let x = [2.0f32, 0.5, 1.0, -1.0, 1.5, -3.0, 0.0, -0.5];
    let p = DrawParams {
        temperature: 1.0,
        top_k: 4,
        top_p: 0.85,
        min_p: 0.0,
        seed: 99,
    };
    let sampler = DeviceSampler::new(dev, x.len(), &p).unwrap();
    let logits = Tensor::from_slice(&x, x.len(), dev).unwrap();
    let state = Tensor::new(&[0u32, 0], dev).unwrap();
    let cuda = dev.as_cuda_device().unwrap();
    let graph = cuda::Graph::capture(cuda, || sampler.next(&state, &logits)).unwrap();
    let mut readback = TokenReadback::new(dev).unwrap();
    let draws = 20_000;
    let mut counts = [0usize; 8];
    for position in 0..draws {
        graph.launch().unwrap();
        readback.queue(&state).unwrap();
        let token = readback.wait().unwrap();
        assert_eq!(
            token,
            draw_twin::draw(&x, &p, position),
            "replay at {position}"
        );
        counts[token as usize] += 1;
    }
    assert_eq!(state.to_vec1::<u32>().unwrap()[1], draws);
    // Against the softmax over the kept set in f64 (the host sampler's distribution).
    let e: Vec<f64> = x.iter().map(|&l| f64::from(l - 2.0).exp()).collect();
    let mut ranked: Vec<usize> = (0..8).collect();
    ranked.sort_by(|&a, &b| x[b].total_cmp(&x[a]));
    ranked.truncate(4);
    let total: f64 = ranked.iter().map(|&i| e[i]).sum();
    let mut cumulative = 0.0;
    let mut keep = [false; 8];
    for &i in &ranked {
        keep[i] = true;
        cumulative += e[i] / total;
        if cumulative >= 0.85 {
            break;
        }
    }
    assert_eq!(keep.iter().filter(|&&k| k).count(), 3);
    let kept: f64 = (0..8).filter(|&i| keep[i]).map(|i| e[i]).sum();
    for i in 0..8 {
        let want = if keep[i] { e[i] / kept } else { 0.0 };
        let got = counts[i] as f64 / f64::from(draws);
        let sigma = (want * (1.0 - want) / f64::from(draws)).sqrt();
        assert!(
            (got - want).abs() <= 5.0 * sigma + 1e-12,
            "token {i}: {got:.4} drawn, {want:.4} expected ({counts:?})"
        );
    }
}

/// The host sampler's repetition penalty (bitnet-model's `Sampler::sample`): each distinct id
/// among `recent` once, ids past the logits skipped.
fn penalize_on_host(x: &mut [f32], recent: &[u32], penalty: f32) {
    let mut seen = std::collections::HashSet::new();
    for &t in recent {
        if let Some(l) = x.get_mut(t as usize).filter(|_| seen.insert(t)) {
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// Random ids for a penalty's history: mostly a few repeated ones, some of all `n`, some past
/// the logits (and the NaN marker).
fn penalty_ids(rng: &mut StdRng, n: usize, count: usize) -> Vec<u32> {
    (0..count)
        .map(|_| match rng.random_range(0..10) {
            0..=5 => rng.random_range(0..n.min(6)) as u32,
            6..=8 => rng.random_range(0..n) as u32,
            _ if rng.random_bool(0.5) => cuda::greedy::NAN_TOKEN,
            _ => (n + rng.random_range(0..3)) as u32,
        })
        .collect()
}

#[test]
fn device_penalty_matches_the_host() {
    use cuda::penalty::DevicePenalty;
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(23);
    let mut checked = 0;
    for (n, capacity) in [(1, 1), (7, 5), (1000, 64), (4099, 3000), (128_256, 4096)] {
        let mut penalty = DevicePenalty::new(dev, n, capacity).unwrap();
        let windows = [1, 3.min(capacity), capacity];
        for (case, &window) in windows.iter().enumerate() {
            let factor = if case % 2 == 0 { 1.3f32 } else { 0.7 };
            for before_len in [0, 2, window + 5] {
                let mut history = penalty_ids(&mut rng, n, before_len);
                penalty.start(factor, window, &history).unwrap();
                let steps = (window + 3).min(40);
                for step in 0..steps {
                    let token = penalty_ids(&mut rng, n, 1)[0];
                    history.push(token);
                    let mut x: Vec<f32> = (0..n).map(|_| rng.random_range(-8.0..8.0)).collect();
                    x[rng.random_range(0..n)] = -0.0;
                    x[rng.random_range(0..n)] = 0.0;
                    let logits = Tensor::from_slice(&x, (1, n), dev).unwrap();
                    let state = Tensor::new(&[token, step as u32], dev).unwrap();
                    penalty.apply(&logits, &state).unwrap();
                    let recent = &history[history.len().saturating_sub(window)..];
                    penalize_on_host(&mut x, recent, factor);
                    let got = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got),
                        bits(&x),
                        "n {n} window {window} before {before_len} step {step}"
                    );
                    assert_eq!(state.to_vec1::<u32>().unwrap(), [token, step as u32]);
                    checked += 1;
                }
            }
        }
        // Bad windows, factors and logits are errors, not launches.
        assert!(penalty.start(1.3, 0, &[]).is_err());
        assert!(penalty.start(1.3, capacity + 1, &[]).is_err());
        assert!(penalty.start(f32::NAN, 1, &[]).is_err());
        assert!(penalty.start(0.0, 1, &[]).is_err());
        let state = Tensor::new(&[0u32, 0], dev).unwrap();
        let short = Tensor::zeros(n + 1, DType::F32, dev).unwrap();
        assert!(penalty.apply(&short, &state).is_err());
        let wrong = Tensor::zeros(n, DType::BF16, dev).unwrap();
        assert!(penalty.apply(&wrong, &state).is_err());
    }
    assert!(checked > 200, "{checked} applications");
    assert!(DevicePenalty::new(dev, 0, 4).is_err());
    assert!(DevicePenalty::new(dev, 4, 0).is_err());
}

#[test]
fn device_penalty_replays_in_a_graph_with_the_argmax() {
    use cuda::greedy::{self, TokenReadback};
    use cuda::penalty::DevicePenalty;
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(29);
    // The same logits every step: only the penalty over the last `window` picks moves the
    // argmax, so the picks cycle through the best few ids.
    let (n, window, factor) = (1000, 6, 4.0f32);
    let base: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
    let before = penalty_ids(&mut rng, n, 9);
    let source = Tensor::from_slice(&base, (1, n), dev).unwrap();
    let logits = Tensor::zeros((1, n), DType::F32, dev).unwrap();
    let first = before[before.len() - 1];
    let state = Tensor::new(&[first, 0], dev).unwrap();
    let mut penalty = DevicePenalty::new(dev, n, 64).unwrap();
    penalty
        .start(factor, window, &before[..before.len() - 1])
        .unwrap();
    let step = || {
        logits.slice_set(&source, 0, 0)?;
        penalty.apply(&logits, &state)?;
        greedy::greedy_next(&state, &logits)
    };
    let cuda = dev.as_cuda_device().unwrap();
    let graph = cuda::Graph::capture(cuda, step).unwrap();
    let mut readback = TokenReadback::new(dev).unwrap();
    let mut history = before.clone();
    let mut distinct = std::collections::HashSet::new();
    for position in 0..50 {
        graph.launch().unwrap();
        readback.queue(&state).unwrap();
        let mut x = base.clone();
        penalize_on_host(&mut x, &history[history.len() - window..], factor);
        let want = first_argmax(&x);
        assert_eq!(readback.wait().unwrap(), want, "replay {position}");
        history.push(want);
        distinct.insert(want);
    }
    assert!(distinct.len() > window, "the picks cycle: {distinct:?}");
    assert_eq!(state.to_vec1::<u32>().unwrap()[1], 50);
}
