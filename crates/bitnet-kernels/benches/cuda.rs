//! CUDA kernels at the BitNet b1.58 2B-4T shapes (feature `cuda`; run on a GPU machine, see
//! docs/CUDA.md): each kernel's median time, the weight bandwidth it achieves against a
//! device-to-device copy measured in the same run, and candle's BF16 matmul (cuBLAS) on the
//! same shapes. Prints a markdown table naming the GPU.
//!
//! Timing: CUDA events around groups of `REPS` calls on candle's stream, after a warm-up that
//! also uploads every weight copy; median over `SAMPLES` groups. Each call uses the next of
//! enough weight copies to exceed the L2 cache several times over, so weights come from HBM, as
//! in a forward pass. Times include each call's launch and allocation overhead (no CUDA graphs).

use std::sync::Arc;

use bitnet_kernels::cuda::{self, Kernel};
use bitnet_kernels::{
    Bf16LinearOp, Bf16Matrix, BitLinearOp, LinearInput, Q4LinearOp, Q4Matrix, ScaleConvention,
    TernaryWeight, Q4_BLOCK,
};
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::{DType, Device, Result, Tensor};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// (in, out) of the 2B-4T linears: q/o_proj, k/v_proj, gate/up_proj, down_proj.
const SHAPES: [(usize, usize); 4] = [(2560, 2560), (2560, 640), (2560, 6912), (6912, 2560)];
const BATCHES: [usize; 2] = [1, 128];
/// Bytes of weights cycled through per measurement (H100/H200 L2: 50/60 MB).
const WORKING_SET: usize = 256 << 20;
const REPS: usize = 20;
const SAMPLES: usize = 15;

struct Row {
    shape: String,
    batch: usize,
    what: String,
    us: f64,
    /// Bytes of weights read per call.
    weight_bytes: usize,
    /// Multiply-adds per call.
    macs: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median microseconds per call of `f(i)` (`i` counts calls, to rotate through copies).
fn time_us(
    stream: &Arc<CudaStream>,
    warmup: usize,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<f64> {
    for i in 0..warmup.max(REPS) {
        f(i)?;
    }
    stream.synchronize().map_err(candle_core::Error::wrap)?;
    let mut times = Vec::with_capacity(SAMPLES);
    let mut i = 0;
    for _ in 0..SAMPLES {
        let ev = |s: &Arc<CudaStream>| s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
        let start = ev(stream).map_err(candle_core::Error::wrap)?;
        for _ in 0..REPS {
            f(i)?;
            i += 1;
        }
        let end = ev(stream).map_err(candle_core::Error::wrap)?;
        let ms = start.elapsed_ms(&end).map_err(candle_core::Error::wrap)?;
        times.push(ms as f64 * 1e3 / REPS as f64);
    }
    Ok(median(times))
}

fn main() -> Result<()> {
    let device = Device::new_cuda(0)?;
    let dev = device.as_cuda_device()?.clone();
    let stream = dev.cuda_stream();
    let gpu = cuda::device_name(&dev);
    let mut rng = StdRng::seed_from_u64(1);
    let mut rows: Vec<Row> = Vec::new();

    // Device-to-device copy: the achievable HBM bandwidth (bytes read + bytes written).
    let copy_bytes = 1usize << 30;
    let src = dev.alloc_zeros::<u8>(copy_bytes)?;
    let mut dst = dev.alloc_zeros::<u8>(copy_bytes)?;
    let copy_us = time_us(&stream, 3, |_| dev.memcpy_dtod(&src, &mut dst))?;
    let copy_gbs = 2.0 * copy_bytes as f64 / copy_us / 1e3;
    drop((src, dst));

    for &(inp, out) in &SHAPES {
        let shape = format!("{inp}→{out}");
        let t: Vec<i8> = (0..out * inp).map(|_| rng.random_range(-1i8..=1)).collect();
        let w = Arc::new(TernaryWeight::from_ternary(&t, out, inp).expect("valid ternary"));
        let wbytes = w.storage_bytes();
        let copies = (WORKING_SET / wbytes).max(2);
        // Each op holds its own GPU copy of the weight (uploaded during the warm-up).
        let ops: Vec<BitLinearOp> = (0..copies)
            .map(|_| BitLinearOp::new(w.clone(), 0.5, ScaleConvention::Multiply))
            .collect();
        let bf_copies = (WORKING_SET / (out * inp * 2)).max(2);
        let dense: Vec<Tensor> = (0..bf_copies)
            .map(|_| Tensor::randn(0f32, 1.0, (out, inp), &device)?.to_dtype(DType::BF16))
            .collect::<Result<_>>()?;
        let k_pad = w.padded_in_features();
        for &batch in &BATCHES {
            let x = Tensor::randn(0f32, 1.0, (batch, inp), &device)?;
            let xb = x.to_dtype(DType::BF16)?;
            let mut push = |what: String, us: f64, weight_bytes: usize| {
                rows.push(Row {
                    shape: shape.clone(),
                    batch,
                    what,
                    us,
                    weight_bytes,
                    // Quantization alone does no multiply-adds.
                    macs: if weight_bytes > 0 {
                        batch * inp * out
                    } else {
                        0
                    },
                })
            };
            let us = time_us(&stream, 0, |_| cuda::quantize(&x, k_pad).map(drop))?;
            push("quantize (a)".into(), us, 0);
            let acts = cuda::quantize(&x, k_pad)?;
            let kernels: &[Kernel] = if batch <= cuda::GEMV_MAX_TOKENS {
                &[Kernel::Gemv]
            } else {
                &[Kernel::Gemv, Kernel::GemmDp4a, Kernel::GemmMma]
            };
            for &kernel in kernels {
                let us = time_us(&stream, copies, |i| {
                    cuda::bitlinear_quantized(&ops[i % copies], &acts, kernel, DType::F32).map(drop)
                })?;
                push(format!("product {kernel:?} (b-d)"), us, wbytes);
            }
            let us = time_us(&stream, copies, |i| ops[i % copies].forward(&x).map(drop))?;
            push("BitLinearOp f32 (a+product)".into(), us, wbytes);
            let us = time_us(&stream, bf_copies, |i| {
                xb.matmul(&dense[i % bf_copies].t()?).map(drop)
            })?;
            push("candle bf16 matmul (cuBLAS)".into(), us, out * inp * 2);
        }
        // GEMV passes vs GEMM around the switch point, on the widest shape only.
        if (inp, out) == (2560, 6912) {
            for batch in [8usize, 16, 32, 64] {
                let x = Tensor::randn(0f32, 1.0, (batch, inp), &device)?;
                let acts = cuda::quantize(&x, k_pad)?;
                for kernel in [Kernel::Gemv, Kernel::GemmDp4a, Kernel::GemmMma] {
                    let us = time_us(&stream, copies, |i| {
                        cuda::bitlinear_quantized(&ops[i % copies], &acts, kernel, DType::F32)
                            .map(drop)
                    })?;
                    rows.push(Row {
                        shape: shape.clone(),
                        batch,
                        what: format!("product {kernel:?} (b-d)"),
                        us,
                        weight_bytes: wbytes,
                        macs: batch * inp * out,
                    });
                }
            }
        }
    }

    // Decode-time fusion (one token, bf16 activations as in the model): RMSNorm + quantization
    // in one launch shared by q/k/v (one 3-matrix GEMV) or gate/up, against the separate ops.
    let norm_w = Tensor::ones(2560, DType::BF16, &device)?;
    let x = Tensor::randn(0f32, 1.0, (1, 2560), &device)?.to_dtype(DType::BF16)?;
    for (name, outs) in [
        ("q/k/v", vec![2560usize, 640, 640]),
        ("gate/up", vec![6912, 6912]),
    ] {
        let layer_bytes: usize = outs.iter().map(|&o| o * 2560 / 4).sum();
        let copies = (WORKING_SET / layer_bytes).max(2);
        let groups: Vec<Vec<BitLinearOp>> = (0..copies)
            .map(|_| {
                outs.iter()
                    .map(|&o| {
                        let t: Vec<i8> =
                            (0..o * 2560).map(|_| rng.random_range(-1i8..=1)).collect();
                        let w = TernaryWeight::from_ternary(&t, o, 2560).expect("valid ternary");
                        BitLinearOp::new(Arc::new(w), 0.5, ScaleConvention::Multiply)
                    })
                    .collect()
            })
            .collect();
        let weight_bytes: usize = groups[0].iter().map(|o| o.weight().storage_bytes()).sum();
        let macs = outs.iter().sum::<usize>() * 2560;
        let norm = bitnet_kernels::RmsNormOp::new(1e-5);
        let us = time_us(&stream, copies, |i| {
            let ops: Vec<&BitLinearOp> = groups[i % copies].iter().collect();
            cuda::linears_shared(LinearInput::Plain(&x), Some((&norm_w, 1e-5)), &ops).map(drop)
        })?;
        let shape = format!("2560→{name}");
        rows.push(Row {
            shape: shape.clone(),
            batch: 1,
            what: "linears_shared: one launch (norm, quantization and GEMV)".into(),
            us,
            weight_bytes,
            macs,
        });
        let us = time_us(&stream, copies, |i| {
            let h = norm.forward(&x, &norm_w)?;
            groups[i % copies]
                .iter()
                .try_for_each(|op| op.forward(&h).map(drop))
        })?;
        rows.push(Row {
            shape,
            batch: 1,
            what: "RmsNormOp, then each BitLinearOp".into(),
            us,
            weight_bytes,
            macs,
        });
    }

    // The LM head: BF16 128256 × 2560 (657 MB, far over L2: one copy suffices).
    let (vocab, hidden) = (128_256usize, 2560usize);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<bf16> = (0..vocab * hidden)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            bf16::from_f32((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        })
        .collect();
    let q4 = Q4LinearOp::new(Arc::new(
        Q4Matrix::quantize(&data, vocab, hidden).expect("shape"),
    ));
    let q4_bytes = vocab * hidden / 2 + vocab * hidden.div_ceil(Q4_BLOCK) * 2;
    let head = Bf16LinearOp::new(Arc::new(
        Bf16Matrix::new(data, vocab, hidden).expect("shape"),
    ));
    let head_dense = Tensor::randn(0f32, 1.0, (vocab, hidden), &device)?.to_dtype(DType::BF16)?;
    for batch in [1usize, 8, 128] {
        let x = Tensor::randn(0f32, 1.0, (batch, hidden), &device)?;
        let us = time_us(&stream, 2, |_| head.forward(&x).map(drop))?;
        let shape = format!("{hidden}→{vocab} head");
        let bytes = vocab * hidden * 2;
        rows.push(Row {
            shape: shape.clone(),
            batch,
            what: "Bf16LinearOp (e), f32 x".into(),
            us,
            weight_bytes: bytes * batch.div_ceil(cuda::GEMV_MAX_TOKENS),
            macs: batch * vocab * hidden,
        });
        if batch <= 8 {
            // One launch per token: the 4-bit head is a decode-only format.
            let us = time_us(&stream, 2, |_| q4.forward(&x).map(drop))?;
            rows.push(Row {
                shape: shape.clone(),
                batch,
                what: "Q4LinearOp (`--head q4`), f32 x".into(),
                us,
                weight_bytes: q4_bytes * batch,
                macs: batch * vocab * hidden,
            });
        }
        let xb = x.to_dtype(DType::BF16)?;
        let us = time_us(&stream, 2, |_| xb.matmul(&head_dense.t()?).map(drop))?;
        rows.push(Row {
            shape,
            batch,
            what: "candle bf16 matmul (cuBLAS)".into(),
            us,
            weight_bytes: bytes,
            macs: batch * vocab * hidden,
        });
    }

    println!("\n## CUDA kernels on {gpu}\n");
    println!(
        "Device-to-device copy: {copy_gbs:.0} GB/s (1 GiB, read + write). Times: median µs per \
         call over {SAMPLES}×{REPS} calls, weights rotated through ≥ 256 MB.\n"
    );
    println!("| shape (in→out) | tokens | kernel | µs | weight GB/s | % of copy | TOP/s |");
    println!("|---|---:|---|---:|---:|---:|---:|");
    for r in &rows {
        let (gbs, pct) = if r.weight_bytes > 0 {
            let g = r.weight_bytes as f64 / r.us / 1e3;
            (format!("{g:.0}"), format!("{:.0}%", 100.0 * g / copy_gbs))
        } else {
            ("–".into(), "–".into())
        };
        let tops = match r.macs {
            0 => "–".to_string(),
            m => format!("{:.1}", 2.0 * m as f64 / r.us / 1e6),
        };
        println!(
            "| {} | {} | {} | {:.1} | {} | {} | {} |",
            r.shape, r.batch, r.what, r.us, gbs, pct, tops
        );
    }
    Ok(())
}
