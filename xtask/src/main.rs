//! `cargo xtask`: project chores. A thin command-line layer over `bitnet_convert`.
//!
//! ```text
//! cargo xtask convert <input> <output> [--force] [--shard-size 2GB] [--no-verify]
//! cargo xtask convert <source> <packed> --check
//! cargo xtask synth <output> [--preset tiny|2b4t] [--hidden N --layers N ...] [--seed N] [--float]
//! ```

// Doc comments double as clap's --help text, where `<INPUT>`-style placeholders are meant
// literally, not as HTML.
#![allow(rustdoc::invalid_html_tags)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use bitnet_convert::synth::{synth, SynthConfig, SynthOptions};
use bitnet_convert::{check, convert, parse_size, progress, ConvertOptions};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "BitNet project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Convert a full-precision BitNet / ternary Llama checkpoint to a packed offline one.
    Convert {
        /// Checkpoint directory (config.json + model.safetensors or a sharded index).
        input: PathBuf,
        /// Output directory (with --check: the packed checkpoint to compare with <input>).
        output: PathBuf,
        /// Replace an existing output (only once the new one is complete and verified).
        #[arg(long)]
        force: bool,
        /// Compare the packed checkpoint <output> with its full-precision source <input>
        /// instead of converting; exits 1 if any ternary value differs.
        #[arg(long)]
        check: bool,
        /// Largest output shard, e.g. 2GB, 500MB, 1GiB.
        #[arg(long, default_value = "2GB")]
        shard_size: String,
        /// Skip re-reading and comparing the output.
        #[arg(long)]
        no_verify: bool,
        /// Accept a llama checkpoint that shows no sign of ternary training.
        #[arg(long)]
        allow_plain_llama: bool,
        /// Skip loading the new checkpoint with bitnet-model (and one forward step) before it
        /// is moved into place.
        #[arg(long)]
        no_load_check: bool,
        /// How to name the source in the model card (default: the input path).
        #[arg(long)]
        source_name: Option<String>,
    },
    /// Write a deterministic random checkpoint with real shapes and names.
    Synth {
        /// Output directory.
        output: PathBuf,
        /// Model shape: tiny (hidden 128, 2 layers, vocab 512) or 2b4t (BitNet 2B-4T).
        #[arg(long, default_value = "tiny")]
        preset: String,
        #[arg(long)]
        hidden: Option<usize>,
        #[arg(long)]
        layers: Option<usize>,
        #[arg(long)]
        heads: Option<usize>,
        #[arg(long)]
        kv_heads: Option<usize>,
        #[arg(long)]
        intermediate: Option<usize>,
        #[arg(long)]
        vocab: Option<usize>,
        #[arg(long)]
        max_positions: Option<usize>,
        /// Write an untied lm_head.weight.
        #[arg(long)]
        untied: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// BF16 master weights (quantization_mode online) instead of packed ternary ones:
        /// a full-precision source for `convert`.
        #[arg(long)]
        float: bool,
        #[arg(long)]
        force: bool,
        #[arg(long, default_value = "2GB")]
        shard_size: String,
    },
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads a finished checkpoint with bitnet-model (BF16 on the CPU) and runs one token through
/// it, requiring finite logits.
fn load_check(dir: &Path) -> std::result::Result<(), String> {
    use candle_core::{DType, Device, Tensor};
    let mut model = bitnet_model::ForCausalLM::load(dir, DType::BF16, &Device::Cpu)
        .map_err(|e| format!("bitnet-model: {e}"))?;
    for w in model.warnings() {
        eprintln!("warning (bitnet-model): {w}");
    }
    let mut step = || -> candle_core::Result<Vec<f32>> {
        let ids = Tensor::new(&[[0u32]], &Device::Cpu)?;
        model.forward(&ids, 0)?.flatten_all()?.to_vec1::<f32>()
    };
    let logits = step().map_err(|e| format!("bitnet-model forward: {e}"))?;
    if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "bitnet-model forward gave a non-finite logit at {i}"
        ));
    }
    Ok(())
}

/// Quotes an argument for a POSIX shell when it needs it (for the model card's command line).
fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./=:,+@%".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

fn run() -> Result<ExitCode> {
    let command_line = std::iter::once("cargo xtask".to_string())
        .chain(std::env::args().skip(1).map(|a| shell_quote(&a)))
        .collect::<Vec<_>>()
        .join(" ");
    match Cli::parse().cmd {
        Cmd::Convert {
            input,
            output,
            force,
            check: check_only,
            shard_size,
            no_verify,
            allow_plain_llama,
            no_load_check,
            source_name,
        } => {
            if check_only {
                let report = check(&output, &input, &mut progress::stderr())?;
                print!("{}", report.table());
                return Ok(if report.ok() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
            let mut opts = ConvertOptions::new(&input, &output);
            opts.force = force;
            opts.shard_size = parse_size(&shard_size)?;
            opts.verify = !no_verify;
            opts.allow_plain_llama = allow_plain_llama;
            opts.command = Some(command_line);
            opts.source_name = source_name;
            if !no_load_check {
                opts.load_check = Some(load_check);
            }
            let r = convert(&opts, &mut progress::stderr())?;
            eprintln!(
                "wrote {} ({} family{}): {} tensors, {} ternary, {:.1} MB in {} file(s) from {:.1} MB in {:.1} s{}",
                r.output.display(),
                r.family,
                if r.load_checked {
                    ", loads in bitnet-model"
                } else {
                    ""
                },
                r.tensors,
                r.linears,
                r.bytes_written as f64 / 1e6,
                r.files.len(),
                r.bytes_read as f64 / 1e6,
                r.seconds,
                if r.verified { ", verified" } else { "" }
            );
            if !r.dropped.is_empty() {
                eprintln!("dropped: {}", r.dropped.join(", "));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Synth {
            output,
            preset,
            hidden,
            layers,
            heads,
            kv_heads,
            intermediate,
            vocab,
            max_positions,
            untied,
            seed,
            float,
            force,
            shard_size,
        } => {
            let Some(mut c) = SynthConfig::preset(&preset) else {
                bail!("unknown preset {preset:?}: use tiny or 2b4t");
            };
            let set = |slot: &mut usize, v: Option<usize>| {
                if let Some(v) = v {
                    *slot = v;
                }
            };
            set(&mut c.hidden, hidden);
            set(&mut c.layers, layers);
            set(&mut c.heads, heads);
            set(&mut c.kv_heads, kv_heads);
            set(&mut c.intermediate, intermediate);
            set(&mut c.vocab, vocab);
            set(&mut c.max_positions, max_positions);
            c.tied &= !untied;
            let mut opts = SynthOptions::new(&output, c);
            opts.seed = seed;
            opts.float = float;
            opts.force = force;
            opts.shard_size = parse_size(&shard_size)?;
            let r = synth(&opts, &mut progress::stderr())
                .with_context(|| format!("synth {}", output.display()))?;
            eprintln!(
                "wrote {}: {} tensors, {:.3} B parameters, {:.1} MB in {} file(s), {:.1} s",
                r.output.display(),
                r.tensors,
                r.parameters as f64 / 1e9,
                r.bytes_written as f64 / 1e6,
                r.files.len(),
                r.seconds
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
