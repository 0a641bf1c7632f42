//! `bitnet`: run BitNet b1.58 models with candle — generate, chat, perplexity, inspect, bench,
//! convert. A thin layer over `bitnet-model`, `bitnet-kernels` and `bitnet-convert`.

// Doc comments double as clap's --help text, where `<INPUT>`-style placeholders are meant
// literally, not as HTML.
#![allow(rustdoc::invalid_html_tags)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod chat;
mod convert;
mod generate;
mod inspect;
mod perplexity;
mod runtime;
mod sampling;
mod source;
mod util;

const EXAMPLES: &str = "\
Examples:
  # Continue a text with the model shipped in models/bitnet-kjv-tiny (the default --model)
  bitnet generate --prompt \"In the beginning\"

  # Greedy, machine-readable output
  bitnet generate --prompt \"In the beginning\" --temperature 0 --max-tokens 32 --json

  # A Hugging Face hub model through the chat template; --offline uses only the local cache
  bitnet generate --model microsoft/bitnet-b1.58-2B-4T --chat --prompt \"How are you?\"
  bitnet generate --model microsoft/bitnet-b1.58-2B-4T --offline --prompt \"The capital of France is\"

  # Interactive chat that keeps the KV cache between turns
  bitnet chat --system \"You are a helpful assistant.\"

  # Perplexity of a UTF-8 text file, in windows of 256 tokens
  bitnet perplexity --file train/heldout.txt --context 256

  # Describe a checkpoint; benchmark prompt processing and generation
  bitnet inspect --model tests/fixtures/bitnet-packed
  bitnet bench --prompt-len 128 --gen 64 --threads 4

  # Pack a full-precision checkpoint (e.g. microsoft/bitnet-b1.58-2B-4T-bf16) to U8 ternary
  bitnet convert path/to/bitnet-bf16 path/to/bitnet-packed

Environment:
  HF_HOME          Hugging Face cache root (hub models go to $HF_HOME/hub) [default: ~/.cache/huggingface]
  HF_HUB_OFFLINE   1 = resolve hub ids from the local cache only (same as --offline)
  HF_ENDPOINT      Hub mirror URL
  BITNET_ISA       force a kernel path: scalar, avx2, avx512vnni or neon (if the CPU has it)";

/// Run BitNet b1.58 ternary language models on the CPU with candle.
#[derive(Parser)]
#[command(name = "bitnet", version, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (raw, or through the chat template with --chat).
    Generate(generate::Args),
    /// Interactive multi-turn chat on stdin/stdout (/reset clears, /exit or EOF quits).
    Chat(chat::Args),
    /// Perplexity of a text file (per-token negative log-likelihood).
    Perplexity(perplexity::Args),
    /// Describe a checkpoint: family, quantization, shapes, sizes, warnings.
    Inspect(inspect::Args),
    /// Benchmark prompt processing (ppN) and token generation (tgN), llama-bench style.
    Bench(bench::Args),
    /// Convert a full-precision checkpoint to packed ternary U8 (or --check one).
    Convert(convert::Args),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version go to stdout with status 0; usage errors to stderr with 1.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Convert(args) => convert::run(args),
    };
    match result {
        Ok(code) => code,
        // The reader went away (`bitnet generate ... | head`): nothing left to say.
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
