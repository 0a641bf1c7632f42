//! `--device`, `--dtype`, `--threads`, and loading a model with its tokenizer.

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use bitnet_model::{ForCausalLM, HeadFormat};
use candle_core::{DType, Device};
use tokenizers::Tokenizer;

use crate::source::{ModelDir, SourceArgs};

/// How to run the model.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Runtime")]
pub struct RuntimeArgs {
    /// Device: cpu, or cuda (GPU 0; needs a build with CUDA support).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    pub device: String,

    /// Compute dtype: f32 (default on CPU; the configuration that matches transformers'
    /// float32 outputs) or bf16 (default on CUDA). f16 is refused: BitNet's ReLU² activations
    /// overflow it.
    #[arg(long, value_parser = parse_dtype, value_name = "f32|bf16")]
    pub dtype: Option<DType>,

    /// Worker threads for the matrix products (sets the rayon pool and RAYON_NUM_THREADS, which
    /// candle's CPU matmul reads). [default: all cores, or $RAYON_NUM_THREADS]
    #[arg(long, short = 't', value_name = "N")]
    pub threads: Option<usize>,

    /// LM head storage: exact (as in the checkpoint; matches transformers), q8 (int8 weights
    /// with per-row scales: half the head's bytes per generated token of BF16, so faster
    /// decoding on a memory-bound CPU, at a small perplexity cost) or q4 (4-bit weights with an
    /// f16 scale per 64 columns and int8 activations: about a quarter of BF16's bytes, faster
    /// still, at a small perplexity cost too). A tied embedding keeps the checkpoint's exact
    /// rows. Both quantize the head at load time; q4 runs on the CPU and on CUDA (identical
    /// logits), q8 on the CPU only.
    #[arg(long, default_value = "exact", value_parser = ["exact", "q8", "q4"])]
    pub head: String,
}

fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" | "half" => Err(
            "f16 is not supported: BitNet's ReLU² activations overflow f16's range (NaN from the \
             first layer); use bf16 for half-precision memory, or f32"
                .into(),
        ),
        _ => Err("expected f32 or bf16".into()),
    }
}

impl RuntimeArgs {
    /// Sizes the thread pool; call first, before any candle operation. Returns the thread count.
    pub fn init_threads(&self) -> Result<usize> {
        // candle runs its element-wise CPU ops on a second pool whose idle workers spin; on a
        // small machine they take cores from the rayon pool that every kernel of this project
        // uses (prefill ran up to 2× slower). Our kernels do the heavy work, so candle's own
        // pool gets no extra threads unless the user asks for them.
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        keep_freed_memory();
        if let Some(n) = self.threads {
            if n == 0 {
                bail!("--threads 0: must be at least 1");
            }
            // candle's CPU matmul (gemm) sizes its own parallelism from this variable.
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global()
                .with_context(|| format!("--threads {n}: cannot build the thread pool"))?;
        }
        Ok(rayon::current_num_threads())
    }

    /// The candle device.
    pub fn device(&self) -> Result<Device> {
        match self.device.as_str() {
            "cuda" => Device::new_cuda(0).map_err(|e| {
                if matches!(e, candle_core::Error::NotCompiledWithCudaSupport) {
                    anyhow!(
                        "--device cuda: this build has no CUDA support; rebuild with \
                         --features cuda (or use --device cpu)"
                    )
                } else {
                    anyhow!("--device cuda: cannot open CUDA device 0: {e}")
                }
            }),
            _ => Ok(Device::Cpu),
        }
    }

    /// The compute dtype: `--dtype`, else f32 on CPU and bf16 on a GPU.
    pub fn dtype(&self, device: &Device) -> DType {
        self.dtype.unwrap_or(if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        })
    }
}

/// A loaded model and what the commands report about it.
pub struct Loaded {
    pub model: ForCausalLM,
    pub tokenizer: Tokenizer,
    pub source: ModelDir,
    pub load_s: f64,
    pub threads: usize,
}

/// The kernel path the ternary products take, e.g. `avx512vnni`.
pub fn isa() -> &'static str {
    bitnet_kernels::cpu::Isa::detect().name()
}

/// Sets up threads, resolves `--model`, loads the weights and the tokenizer; prints the load
/// line and any model warnings to stderr.
pub fn load(source: &SourceArgs, runtime: &RuntimeArgs) -> Result<Loaded> {
    let threads = runtime.init_threads()?;
    let device = runtime.device()?;
    let dtype = runtime.dtype(&device);
    let dir = source.resolve()?;
    let start = Instant::now();
    let tokenizer = load_tokenizer(&dir.dir)?;
    let head = match runtime.head.as_str() {
        "q8" => HeadFormat::Q8,
        "q4" => HeadFormat::Q4,
        _ => HeadFormat::Exact,
    };
    if head == HeadFormat::Q8 && !device.is_cpu() {
        bail!("--head q8 runs on the CPU only; use --head exact or q4 with --device cuda");
    }
    let model = ForCausalLM::load_with_head(&dir.dir, dtype, &device, head)
        .with_context(|| format!("loading the model from {}", dir.dir.display()))?;
    let load_s = start.elapsed().as_secs_f64();
    for w in model.warnings() {
        eprintln!("warning: {w}");
    }
    let c = model.config();
    eprintln!(
        "loaded {} ({} layers, hidden {}, vocab {}, context {}) in {:.3} s: {} on {}, \
         kernel {}, {} threads",
        dir.name,
        c.num_hidden_layers,
        c.hidden_size,
        c.vocab_size,
        c.max_position_embeddings,
        load_s,
        format!("{dtype:?}").to_lowercase(),
        if device.is_cpu() { "cpu" } else { "cuda" },
        isa(),
        threads
    );
    Ok(Loaded {
        model,
        tokenizer,
        source: dir,
        load_s,
        threads,
    })
}

/// `dir/tokenizer.json`, with an error naming it.
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    bitnet_model::chat::load_tokenizer(dir).context("loading the tokenizer")
}

/// Encodes `text`; `special` adds the post-processor's tokens (BOS), as `tokenizer(text)` does.
pub fn encode(tokenizer: &Tokenizer, text: &str, special: bool) -> Result<Vec<u32>> {
    Ok(tokenizer
        .encode(text, special)
        .map_err(|e| anyhow!("cannot tokenize the input: {e}"))?
        .get_ids()
        .to_vec())
}

/// Keeps large freed blocks in the heap instead of returning them to the kernel.
///
/// Every candle op allocates its output; prefill's attention scores alone are tens of MB per
/// layer. glibc serves blocks above 128 KiB-32 MiB with fresh `mmap`s and trims the heap on
/// free, so each op paid page faults on memory it had just released: a third of pp512's time
/// on a 2-vCPU VM. With these thresholds the second use of a size is fault-free; peak RSS is
/// unchanged (the blocks are reused, not accumulated).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; it is called before any worker thread
    // exists. A refusal (0) leaves glibc's defaults, which are merely slower. Older glibc caps
    // the mmap threshold at 32 MiB, hence the second try.
    unsafe {
        if libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30) == 0 {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        }
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
