//! BitLinear vs candle's f32 matmul at the BitNet b1.58 2B-4T shapes, the 2B-4T LM head in each
//! `--head` format (BF16, int8, 4-bit), plus this machine's streaming read bandwidth, measured
//! in the same run.
//!
//! `cargo bench -p bitnet-kernels` runs everything through criterion, then prints one table
//! built from criterion's medians. Every iteration uses a different copy of the weights, cycling
//! through more than the last-level cache holds, so the numbers are for weights streamed from
//! DRAM, as in a real forward pass. `BITNET_BENCH_QUICK=1` shortens the measurement.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bitnet_kernels::cpu::Isa;
use bitnet_kernels::{Bf16Matrix, BitLinearOp, I8Matrix, Q4Matrix, ScaleConvention, TernaryWeight};
use candle_core::{Device, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// (in, out) of the 2B-4T linears: q/o_proj, k/v_proj, gate/up_proj, down_proj.
const SHAPES: [(usize, usize); 4] = [(2560, 2560), (2560, 640), (2560, 6912), (6912, 2560)];
const BATCHES: [usize; 2] = [1, 128];
const THREADS: [usize; 2] = [1, 2];
/// Bytes of weights to cycle through per benchmark: well above any LLC on the test machines.
const WORKING_SET: usize = 384 << 20;
/// The 2B-4T LM head (the tied embedding): vocabulary × hidden. Each format is larger than any
/// LLC (174 MB at 4 bits), so one copy streams from DRAM.
const HEAD: (usize, usize) = (128256, 2560);
const HEADS: [&str; 3] = ["bf16", "q8", "q4"];

fn main() {
    let quick = std::env::var_os("BITNET_BENCH_QUICK").is_some();
    let out_dir = criterion_dir();
    let mut c = Criterion::default()
        .output_directory(&out_dir)
        .sample_size(if quick { 10 } else { 20 })
        .warm_up_time(Duration::from_millis(if quick { 200 } else { 500 }))
        .measurement_time(Duration::from_millis(if quick { 600 } else { 2000 }))
        .configure_from_args();
    let mut rng = StdRng::seed_from_u64(1);

    bench_stream(&mut c);
    let head_bytes = bench_heads(&mut c, &mut rng);
    for &(inp, out) in &SHAPES {
        let copies = (WORKING_SET / (out * inp / 4)).max(2);
        let weights: Vec<Arc<TernaryWeight>> = (0..copies)
            .map(|_| {
                let t: Vec<i8> = (0..out * inp).map(|_| rng.random_range(-1i8..=1)).collect();
                Arc::new(TernaryWeight::from_ternary(&t, out, inp).expect("valid ternary"))
            })
            .collect();
        let ops: Vec<BitLinearOp> = weights
            .iter()
            .map(|w| BitLinearOp::new(w.clone(), 0.5, ScaleConvention::Multiply))
            .collect();
        let f32_copies = (WORKING_SET / (out * inp * 4)).max(2);
        let dense: Vec<Tensor> = (0..f32_copies)
            .map(|i| {
                Tensor::randn(0f32, 1.0, (out, inp), &Device::Cpu)
                    .expect("randn")
                    .affine(1.0, i as f64)
                    .expect("affine")
            })
            .collect();
        for &batch in &BATCHES {
            let x = Tensor::randn(0f32, 1.0, (batch, inp), &Device::Cpu).expect("randn");
            for &threads in &THREADS {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("pool");
                // candle's CPU matmul sizes its gemm parallelism from RAYON_NUM_THREADS.
                std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
                let mut g = c.benchmark_group(format!("{inp}x{out}_b{batch}_t{threads}"));
                g.throughput(Throughput::Elements((inp * out * batch) as u64));
                let mut i = 0;
                g.bench_function(BenchmarkId::from_parameter("bitlinear"), |b| {
                    in_pool(&pool, b, || {
                        i = (i + 1) % ops.len();
                        ops[i].forward(&x).expect("bitlinear")
                    })
                });
                let mut i = 0;
                g.bench_function(BenchmarkId::from_parameter("candle_f32"), |b| {
                    in_pool(&pool, b, || {
                        i = (i + 1) % dense.len();
                        x.matmul(&dense[i].t().expect("t")).expect("matmul")
                    })
                });
                g.finish();
            }
        }
    }
    c.final_summary();
    print_table(&out_dir, &head_bytes);
}

/// One token through the LM head in each format (the GEMV of every decoding step); returns
/// each format's bytes.
fn bench_heads(c: &mut Criterion, rng: &mut StdRng) -> [usize; 3] {
    let (rows, cols) = HEAD;
    let w: Vec<half::bf16> = (0..rows * cols)
        .map(|_| half::bf16::from_f32(rng.random_range(-0.05..0.05)))
        .collect();
    let q8 = I8Matrix::quantize(&w, rows, cols).expect("int8 head");
    let q4 = Q4Matrix::quantize(&w, rows, cols).expect("4-bit head");
    let bf16 = Bf16Matrix::new(w, rows, cols).expect("bf16 head");
    let bytes = [bf16.storage_bytes(), q8.storage_bytes(), q4.storage_bytes()];
    let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut out = vec![0f32; rows];
    let isa = Isa::detect();
    for &threads in &THREADS {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        let mut g = c.benchmark_group(format!("head_t{threads}"));
        g.throughput(Throughput::Elements((rows * cols) as u64));
        for name in HEADS {
            g.bench_function(BenchmarkId::from_parameter(name), |b| {
                in_pool(&pool, b, || match name {
                    "bf16" => bf16.matmul(isa, &x, &mut out),
                    "q8" => q8.matmul(isa, &x, &mut out),
                    _ => q4.matmul(isa, &x, &mut out),
                })
            });
        }
        g.finish();
    }
    bytes
}

/// Streaming read bandwidth: sum a buffer far larger than the caches, split across threads.
fn bench_stream(c: &mut Criterion) {
    let buf: Vec<u64> = (0..(1usize << 30) / 8).map(|i| i as u64).collect();
    for &threads in &THREADS {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        let mut g = c.benchmark_group(format!("stream_t{threads}"));
        g.throughput(Throughput::Bytes((buf.len() * 8) as u64));
        g.bench_function(BenchmarkId::from_parameter("read"), |b| {
            in_pool(&pool, b, || {
                use rayon::prelude::*;
                buf.par_chunks(buf.len() / threads)
                    .map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
                    .reduce(|| 0, u64::wrapping_add)
            })
        });
        g.finish();
    }
}

/// Times `f` with the whole measurement loop running on one of `pool`'s workers. Entering the
/// pool once per call from the benchmark's own thread instead (a job injected, a worker woken,
/// the caller parked until it is done) cost 15–70 µs per call on the 2 vCPU Xeon VM, several
/// times the kernel itself for the small shapes, while the model does not pay it (decode
/// speed is the same with the CLI's work moved onto a pool worker; docs/BENCHMARKS.md).
fn in_pool<R: Send>(
    pool: &rayon::ThreadPool,
    b: &mut criterion::Bencher<'_>,
    f: impl FnMut() -> R + Send,
) {
    pool.install(|| b.iter(f))
}

fn criterion_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("criterion")
}

/// Criterion's median estimate for one benchmark, in seconds.
fn median(dir: &Path, group: &str, id: &str) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join(group).join(id).join("new/estimates.json")).ok()?;
    let key = "\"median\":{\"confidence_interval\":";
    let rest = &text[text.find(key)?..];
    let p = rest.find("\"point_estimate\":")? + "\"point_estimate\":".len();
    let num: String = rest[p..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || ".eE+-".contains(*c))
        .collect();
    num.parse::<f64>().ok().map(|ns| ns * 1e-9)
}

fn print_table(dir: &Path, head_bytes: &[usize; 3]) {
    let isa = Isa::detect().name();
    let stream: Vec<Option<f64>> = THREADS
        .iter()
        .map(|t| {
            median(dir, &format!("stream_t{t}"), "read").map(|s| (1usize << 30) as f64 / s / 1e9)
        })
        .collect();
    println!("\nBitLinear ({isa}) vs candle f32 matmul — medians, weights streamed from DRAM");
    for (t, bw) in THREADS.iter().zip(&stream) {
        println!(
            "streaming read bandwidth, {t} thread(s): {}",
            bw.map_or("n/a".into(), |b| format!("{b:.1} GB/s"))
        );
    }
    println!(
        "\n| shape (in→out) | batch | threads | bitlinear | weight GB/s | % stream | GMAC/s | candle f32 | speedup |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &(inp, out) in &SHAPES {
        for &batch in &BATCHES {
            for (ti, &threads) in THREADS.iter().enumerate() {
                let group = format!("{inp}x{out}_b{batch}_t{threads}");
                let (Some(ours), Some(theirs)) = (
                    median(dir, &group, "bitlinear"),
                    median(dir, &group, "candle_f32"),
                ) else {
                    continue;
                };
                let bytes = (out * inp.next_multiple_of(bitnet_kernels::BLOCK) / 4) as f64;
                let gbs = bytes / ours / 1e9;
                let pct = stream[ti].map_or("n/a".into(), |s| format!("{:.0}%", 100.0 * gbs / s));
                println!(
                    "| {inp}→{out} | {batch} | {threads} | {:.3} ms | {gbs:.1} | {pct} | {:.1} | {:.3} ms | {:.1}× |",
                    ours * 1e3,
                    (inp * out * batch) as f64 / ours / 1e9,
                    theirs * 1e3,
                    theirs / ours
                );
            }
        }
    }
    let (rows, cols) = HEAD;
    println!("\nLM head {rows}×{cols}, one token ({isa}) — medians, weights streamed from DRAM");
    println!("\n| head | MB | threads | time | GB/s | % stream |");
    println!("|---|---|---|---|---|---|");
    for (name, bytes) in HEADS.iter().zip(head_bytes) {
        for (ti, &threads) in THREADS.iter().enumerate() {
            let Some(t) = median(dir, &format!("head_t{threads}"), name) else {
                continue;
            };
            let gbs = *bytes as f64 / t / 1e9;
            let pct = stream[ti].map_or("n/a".into(), |s| format!("{:.0}%", 100.0 * gbs / s));
            println!(
                "| {name} | {:.0} | {threads} | {:.2} ms | {gbs:.1} | {pct} |",
                *bytes as f64 / 1e6,
                t * 1e3
            );
        }
    }
}
