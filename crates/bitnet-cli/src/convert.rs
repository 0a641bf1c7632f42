//! `bitnet convert`: the same as `cargo xtask convert`, through the `bitnet-convert` library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};
use bitnet_convert::{check, convert, parse_size, progress, ConvertOptions};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Full-precision checkpoint directory (config.json + model.safetensors or a sharded
    /// index): BF16/F16/F32 master weights of a `bitnet` model (e.g.
    /// microsoft/bitnet-b1.58-2B-4T-bf16) or of a ternary-trained `llama`.
    pub input: PathBuf,

    /// Output directory for the packed checkpoint (with --check: the packed checkpoint to
    /// compare with <INPUT>).
    pub output: PathBuf,

    /// Replace an existing output (only once the new one is complete and verified).
    #[arg(long)]
    pub force: bool,

    /// Compare the packed checkpoint <OUTPUT> with its full-precision source <INPUT> instead of
    /// converting; fails if any ternary value differs.
    #[arg(long)]
    pub check: bool,

    /// Largest output shard, e.g. 2GB, 500MB, 1GiB.
    #[arg(long, default_value = "2GB", value_name = "SIZE", value_parser = crate::util::text_arg())]
    pub shard_size: String,

    /// Skip re-reading and comparing the output, and loading it with the model code.
    #[arg(long)]
    pub no_verify: bool,

    /// Accept a llama checkpoint that shows no sign of ternary training.
    #[arg(long)]
    pub allow_plain_llama: bool,
}

/// Loads a new checkpoint with this project's model code before it is moved into place.
fn loads(dir: &Path) -> std::result::Result<(), String> {
    bitnet_model::ForCausalLM::load(dir, candle_core::DType::F32, &candle_core::Device::Cpu)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

pub fn run(args: Args) -> Result<ExitCode> {
    if args.check {
        let report = check(&args.output, &args.input, &mut progress::stderr())?;
        crate::util::emit(&report.table())?;
        if !report.ok() {
            bail!(
                "{} does not match {}: {} tensor(s) differ (see the table)",
                args.output.display(),
                args.input.display(),
                report.failures().len()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let command_line = std::iter::once("bitnet".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let mut opts = ConvertOptions::new(&args.input, &args.output);
    opts.force = args.force;
    opts.shard_size = parse_size(&args.shard_size)
        .map_err(|e| anyhow::anyhow!("--shard-size {}: {e}", args.shard_size))?;
    opts.verify = !args.no_verify;
    opts.allow_plain_llama = args.allow_plain_llama;
    opts.command = Some(command_line);
    if !args.no_verify {
        opts.load_check = Some(loads);
    }
    let r = convert(&opts, &mut progress::stderr())?;
    eprintln!(
        "wrote {} ({} family): {} tensors, {} ternary, {:.1} MB in {} file(s) from {:.1} MB in \
         {:.1} s{}{}",
        r.output.display(),
        r.family,
        r.tensors,
        r.linears,
        r.bytes_written as f64 / 1e6,
        r.files.len(),
        r.bytes_read as f64 / 1e6,
        r.seconds,
        if r.verified { ", verified" } else { "" },
        if r.load_checked {
            ", loads in bitnet-model"
        } else {
            ""
        }
    );
    if !r.dropped.is_empty() {
        eprintln!("dropped: {}", r.dropped.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}
