//! `bitnet bench`: llama-bench-like throughput of prompt processing and generation.

use std::process::ExitCode;
use std::time::Instant;

use std::fmt::Write as _;

use anyhow::{bail, Context, Result};
use bitnet_model::generation::{self, Sampler, SamplingParams};
use bitnet_model::{ForCausalLM, Weights};
use candle_core::{Device, Tensor};

use crate::runtime::{self, RuntimeArgs};
use crate::sampling::{DEFAULT_TEMPERATURE, DEFAULT_TOP_P};
use crate::source::SourceArgs;
use crate::util;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Prompt-processing test ppN: one forward pass over N random prompt tokens (0 skips it).
    #[arg(long, short = 'p', default_value_t = 128, value_name = "N")]
    pub prompt_len: usize,

    /// Generation test tgN: N single-token forward passes from an empty cache, each copying its
    /// logits to the host (0 skips it). "tgN sampled" decodes as `generate` does at its
    /// defaults (temperature 0.8, top-p 0.95): on CUDA the draw runs on the GPU, elsewhere the
    /// host sampler picks from each step's logits. On CUDA "tgN greedy" decodes as `generate
    /// --temperature 0` does, with the argmax on the GPU.
    #[arg(long, short = 'n', default_value_t = 64, value_name = "N")]
    pub gen: usize,

    /// Timed runs of each test (after one untimed warm-up run); the table shows the median ±
    /// half the range.
    #[arg(long, short = 'r', default_value_t = 3, value_name = "R")]
    pub repetitions: usize,

    /// Seed of the random prompt tokens.
    #[arg(long, default_value_t = 42, value_name = "S")]
    pub seed: u64,

    /// CUDA: launch every kernel of a decode step from the host instead of replaying the step
    /// recorded as a CUDA graph (to measure what the graph saves).
    #[arg(long)]
    pub no_cuda_graph: bool,

    #[command(flatten)]
    pub source: SourceArgs,

    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn run(args: Args) -> Result<ExitCode> {
    if args.repetitions == 0 {
        bail!("--repetitions 0: must be at least 1");
    }
    let runtime::Loaded {
        mut model,
        source,
        load_s,
        threads,
        ..
    } = runtime::load(&args.source, &args.runtime)?;
    let head = &args.runtime.head;
    model.set_cuda_graphs(!args.no_cuda_graph);
    let max = model.max_context();
    if args.prompt_len > max {
        bail!(
            "--prompt-len {}: longer than the model's context of {max} tokens",
            args.prompt_len
        );
    }
    if args.gen > max {
        bail!(
            "--gen {}: longer than the model's context of {max} tokens",
            args.gen
        );
    }
    let (disk_bytes, params) = size(&source.dir)?;
    let vocab = model.config().vocab_size as u64;
    let mut rng = SplitMix(args.seed);
    let mut random_tokens =
        |n: usize| -> Vec<u32> { (0..n).map(|_| (rng.next() % vocab) as u32).collect() };

    let backend = if model.device().is_cpu() {
        format!("cpu {:?} {}", model.dtype(), runtime::isa())
    } else {
        format!("cuda {:?}", model.dtype())
    }
    .to_lowercase();
    let mut rows = Vec::new();
    if args.prompt_len > 0 {
        let tokens = random_tokens(args.prompt_len);
        let rates = repeat(args.repetitions, || {
            let start = Instant::now();
            prefill(&mut model, &tokens)?;
            Ok(tokens.len() as f64 / start.elapsed().as_secs_f64())
        })?;
        rows.push((format!("pp{}", args.prompt_len), rates));
    }
    if args.gen > 0 {
        let tokens = random_tokens(args.gen);
        let rates = repeat(args.repetitions, || {
            let start = Instant::now();
            decode(&mut model, &tokens)?;
            Ok(args.gen as f64 / start.elapsed().as_secs_f64())
        })?;
        rows.push((format!("tg{}", args.gen), rates));
        // What `generate` runs at its default sampling settings, and on CUDA at temperature 0
        // (where the argmax stays on the GPU).
        let sampled = SamplingParams {
            temperature: DEFAULT_TEMPERATURE,
            top_p: Some(DEFAULT_TOP_P),
            seed: args.seed,
            ..SamplingParams::default()
        };
        let mut runs = vec![("sampled", sampled)];
        if model.device().is_cuda() {
            runs.push(("greedy", SamplingParams::default()));
        }
        for (name, params) in runs {
            let rates = repeat(args.repetitions, || {
                let mut sampler = Sampler::new(params.clone())?;
                let start = Instant::now();
                model.clear_cache();
                generation::decode(&mut model, &mut sampler, &tokens[..1], 0, args.gen, |_| {
                    Ok(true)
                })?;
                Ok(args.gen as f64 / start.elapsed().as_secs_f64())
            })?;
            rows.push((format!("tg{} {name}", args.gen), rates));
        }
    }

    let mut out = String::new();
    writeln!(
        out,
        "| model | size | params | backend | head | threads | test | t/s | eff. GB/s |"
    )?;
    writeln!(
        out,
        "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |"
    )?;
    let per_token = model.bytes_per_token() as f64;
    for (test, rates) in rows {
        let (median, spread) = median_spread(rates);
        // Decoding reads every weight once per token; prefill reads them once per step.
        let gbs = if test.starts_with("tg") {
            format!("{:.1}", per_token * median / 1e9)
        } else {
            "–".into()
        };
        writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} ± {:.2} | {} |",
            source.name,
            util::human_bytes(disk_bytes),
            util::human_count(params),
            backend,
            head,
            threads,
            test,
            median,
            spread,
            gbs
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "weights read per generated token: {}",
        util::human_bytes(per_token as u64)
    )?;
    writeln!(out)?;
    writeln!(out, "model load time: {load_s:.3} s")?;
    if model.device().is_cuda() && args.gen > 0 {
        let graph = match (args.no_cuda_graph, model.cuda_graph_error()) {
            (true, _) => "off (--no-cuda-graph)".to_string(),
            (false, Some(e)) => format!("off (recording failed: {e})"),
            (false, None) => "on".to_string(),
        };
        writeln!(out, "decode steps as a CUDA graph: {graph}")?;
    }
    writeln!(
        out,
        "peak RSS (VmHWM): {}",
        peak_rss().map_or("unknown (no /proc/self/status)".into(), util::human_bytes)
    )?;
    util::emit(&out)?;
    Ok(ExitCode::SUCCESS)
}

/// One warm-up run, then `n` timed ones.
fn repeat(n: usize, mut f: impl FnMut() -> Result<f64>) -> Result<Vec<f64>> {
    f()?;
    (0..n).map(|_| f()).collect()
}

fn prefill(model: &mut ForCausalLM, tokens: &[u32]) -> Result<()> {
    model.clear_cache();
    let ids = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
    model.forward(&ids, 0)?;
    Ok(())
}

/// Decodes the `tokens` from an empty cache, one forward pass each, copying each step's logits
/// to the host (so that a GPU also finishes every step inside the timing).
fn decode(model: &mut ForCausalLM, tokens: &[u32]) -> Result<()> {
    model.clear_cache();
    for (i, &t) in tokens.iter().enumerate() {
        let ids = Tensor::new(&[t], &Device::Cpu)?.unsqueeze(0)?;
        model.forward(&ids, i)?.flatten_all()?.to_vec1::<f32>()?;
    }
    Ok(())
}

/// Median and half the range.
fn median_spread(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, (v[n - 1] - v[0]) / 2.0)
}

/// Bytes of the weight files and the logical parameter count (a packed U8 byte holds four
/// ternary weights).
fn size(dir: &std::path::Path) -> Result<(u64, u64)> {
    let weights =
        Weights::open(dir).with_context(|| format!("reading the weights of {}", dir.display()))?;
    let mut bytes = 0;
    for f in weights.files() {
        bytes += std::fs::metadata(f)
            .with_context(|| format!("cannot stat {}", f.display()))?
            .len();
    }
    let params = weights
        .tensors()
        .iter()
        .filter(|t| !t.name.ends_with("rotary_emb.inv_freq"))
        .map(|t| {
            let per = if format!("{:?}", t.dtype) == "U8" {
                4
            } else {
                1
            };
            (t.elem_count() * per) as u64
        })
        .sum();
    Ok((bytes, params))
}

/// Peak resident set size, from `VmHWM` in /proc/self/status.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A tiny deterministic generator for the random prompt (SplitMix64).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}
