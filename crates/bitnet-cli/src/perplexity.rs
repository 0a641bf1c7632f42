//! `bitnet perplexity`: per-token negative log-likelihood of a text file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use std::fmt::Write as _;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::runtime::{self, RuntimeArgs};
use crate::source::SourceArgs;
use crate::util;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// UTF-8 text file to score; tokenized like transformers' `tokenizer(text)` (with BOS).
    #[arg(long, short = 'f', value_name = "FILE")]
    pub file: PathBuf,

    /// Tokens per window: the text is cut into non-overlapping windows of C tokens, each
    /// scored from an empty cache (its first token is context only). [default: the whole text
    /// if it fits the model's context, else windows of the model's context]
    #[arg(long, short = 'c', value_name = "C")]
    pub context: Option<usize>,

    /// Score only the first N tokens of the text.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,

    /// Print one JSON object {tokens, scored, context, windows, mean_nll, ppl, seconds, nll}
    /// where nll lists every scored token's NLL (natural log), in order.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub source: SourceArgs,

    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let text = util::read_text_file("--file", &args.file)?;
    if args.limit == Some(0) {
        bail!("--limit 0: must be at least 2 tokens");
    }
    let mut loaded = runtime::load(&args.source, &args.runtime)?;
    let mut ids = runtime::encode(&loaded.tokenizer, &text, true)?;
    if let Some(n) = args.limit {
        ids.truncate(n);
    }
    if ids.len() < 2 {
        bail!(
            "{}: only {} token(s) to score; perplexity needs at least 2",
            args.file.display(),
            ids.len()
        );
    }
    let max = loaded.model.max_context();
    let context = match args.context {
        Some(c) if c < 2 || c > max => {
            bail!("--context {c}: must be between 2 and the model's context of {max} tokens")
        }
        Some(c) => c,
        None => ids.len().min(max),
    };
    let start = Instant::now();
    let nll = bitnet_model::perplexity(&mut loaded.model, &ids, context)
        .with_context(|| format!("scoring {}", args.file.display()))?;
    let seconds = start.elapsed().as_secs_f64();
    if nll.is_empty() {
        bail!("{}: nothing to score", args.file.display());
    }
    let mean = nll.iter().map(|&x| x as f64).sum::<f64>() / nll.len() as f64;
    let ppl = mean.exp();
    let windows = ids.len().div_ceil(context);
    let tok_s = util::rate(nll.len(), seconds);
    let mut out = String::new();
    if args.json {
        let json = json!({
            "file": args.file.display().to_string(),
            "tokens": ids.len(),
            "scored": nll.len(),
            "context": context,
            "windows": windows,
            "mean_nll": mean,
            "ppl": util::json_f64(Some(ppl)),
            "seconds": seconds,
            "tok_s": util::json_f64(tok_s),
            "nll": nll,
        });
        writeln!(out, "{json}")?;
    } else {
        writeln!(out, "file:       {}", args.file.display())?;
        writeln!(
            out,
            "tokens:     {} ({} scored in {} window(s) of up to {} tokens)",
            ids.len(),
            nll.len(),
            windows,
            context
        )?;
        writeln!(out, "mean NLL:   {mean:.6} nats/token")?;
        writeln!(out, "perplexity: {ppl:.4}")?;
        writeln!(
            out,
            "time:       {:.3} s ({:.1} tok/s)",
            seconds,
            tok_s.unwrap_or(0.0)
        )?;
    }
    util::emit(&out)?;
    Ok(ExitCode::SUCCESS)
}
