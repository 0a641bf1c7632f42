//! `bitnet generate`: one prompt in, streamed text out.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bitnet_model::chat::{ChatTemplate, Message};
use bitnet_model::generation::{generate, GenerateOptions, Generated, StopReason};
use serde_json::json;

use crate::runtime::{self, RuntimeArgs};
use crate::sampling::{self, SamplingArgs};
use crate::source::SourceArgs;
use crate::util;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The prompt; `-` reads it from standard input (UTF-8). Raw mode encodes it as
    /// transformers' `tokenizer(prompt)` does (with BOS).
    #[arg(long, short = 'p', value_name = "TEXT", value_parser = util::text_arg())]
    pub prompt: String,

    /// Wrap the prompt in the model's chat template (a user message, plus --system) and
    /// answer as the assistant.
    #[arg(long)]
    pub chat: bool,

    /// System message for --chat.
    #[arg(long, requires = "chat", value_name = "TEXT", value_parser = util::text_arg())]
    pub system: Option<String>,

    /// Most tokens to generate (fewer if a stop token, a --stop string or the context end comes
    /// first).
    #[arg(long, short = 'n', default_value_t = 128, value_name = "N")]
    pub max_tokens: usize,

    /// Print one JSON object (prompt_tokens, tokens, text, stop_reason, timings) instead of
    /// streaming the text.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    #[command(flatten)]
    pub source: SourceArgs,

    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn run(args: Args) -> Result<ExitCode> {
    // Check everything cheap before loading the model: flags first (the model's
    // generation_config.json only fills in the ones not given).
    args.sampling.sampler(&serde_json::Value::Null)?;
    let prompt = if args.prompt == "-" {
        util::read_stdin("--prompt -")?
    } else {
        args.prompt.clone()
    };
    let runtime::Loaded {
        mut model,
        tokenizer,
        source,
        load_s,
        ..
    } = runtime::load(&args.source, &args.runtime)?;
    let generation_config = sampling::generation_config(&source.dir)?;
    let (mut sampler, seed) = args.sampling.sampler(&generation_config)?;
    args.sampling.apply_to(&mut model);

    let prompt_ids = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system.as_str()));
        }
        messages.push(Message::new("user", prompt.as_str()));
        let text = ChatTemplate::from_dir(&source.dir)?.render(&messages, true)?;
        // The template already holds BOS.
        runtime::encode(&tokenizer, &text, false)?
    } else {
        runtime::encode(&tokenizer, &prompt, true)?
    };
    let context = model.max_context();
    if prompt_ids.len() > context {
        bail!(
            "--prompt: {} tokens{}, longer than the model's context of {context} tokens \
             (max_position_embeddings); shorten it",
            prompt_ids.len(),
            if args.chat {
                " with the chat template"
            } else {
                ""
            }
        );
    }
    let stop_tokens = if args.sampling.ignore_eos {
        Vec::new()
    } else {
        sampling::stop_tokens(&generation_config, &model, &tokenizer)
    };
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        stop_tokens,
        stop_strings: args.sampling.stop.clone(),
    };

    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let stream = !args.json;
    let generated = generate(
        &mut model,
        &tokenizer,
        &prompt_ids,
        &mut sampler,
        &options,
        |text| {
            if stream && write_error.is_none() {
                if let Err(e) = stdout
                    .write_all(text.as_bytes())
                    .and_then(|_| stdout.flush())
                {
                    write_error = Some(e);
                }
            }
        },
    )?;
    if let Some(e) = write_error {
        return Err(e).context("writing to standard output");
    }

    let t = Timings::new(load_s, prompt_ids.len(), &generated);
    if args.json {
        let (reason, detail) = stop_reason(&generated.stop);
        let mut out = json!({
            "prompt_tokens": prompt_ids,
            "tokens": generated.tokens,
            "text": generated.text,
            "stop_reason": reason,
            "seed": seed,
            "timings": {
                "load_s": t.load_s,
                "prefill_s": t.prefill_s,
                "decode_s": t.decode_s,
                "prefill_tok_s": util::json_f64(t.prefill_tok_s),
                "decode_tok_s": util::json_f64(t.decode_tok_s),
            },
        });
        if let Some((key, value)) = detail {
            out[key] = value;
        }
        writeln!(stdout, "{out}").context("writing to standard output")?;
    } else {
        writeln!(stdout).context("writing to standard output")?;
        drop(stdout);
        eprintln!("seed {seed}, stopped by {}", describe(&generated.stop));
        t.print(prompt_ids.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// The `stop_reason` value and an optional detail key.
fn stop_reason(stop: &StopReason) -> (&'static str, Option<(&'static str, serde_json::Value)>) {
    match stop {
        StopReason::Token(id) => ("stop_token", Some(("stop_token", json!(id)))),
        StopReason::String(s) => ("stop_string", Some(("stop_string", json!(s)))),
        StopReason::MaxTokens => ("max_tokens", None),
        StopReason::ContextFull => ("context_full", None),
    }
}

pub fn describe(stop: &StopReason) -> String {
    match stop {
        StopReason::Token(id) => format!("stop token {id}"),
        StopReason::String(s) => format!("stop string {s:?}"),
        StopReason::MaxTokens => "--max-tokens".into(),
        StopReason::ContextFull => "the end of the model's context".into(),
    }
}

/// Prefill and decode timings of one [`generate`] call.
pub struct Timings {
    pub load_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Forward passes after the prefill (each produced one sampled token).
    pub decode_steps: usize,
    pub prefill_tok_s: Option<f64>,
    pub decode_tok_s: Option<f64>,
}

impl Timings {
    pub fn new(load_s: f64, prompt_len: usize, g: &Generated) -> Self {
        // Every sampled token, including a final stop token, came from one forward pass; the
        // first one from the prefill.
        let sampled = g.tokens.len() + usize::from(matches!(g.stop, StopReason::Token(_)));
        let decode_steps = sampled.saturating_sub(1);
        let secs = Duration::as_secs_f64;
        Self {
            load_s,
            prefill_s: secs(&g.prefill),
            decode_s: secs(&g.decode),
            decode_steps,
            prefill_tok_s: util::rate(prompt_len, secs(&g.prefill)),
            decode_tok_s: util::rate(decode_steps, secs(&g.decode)),
        }
    }

    /// llama.cpp-style summary on stderr.
    pub fn print(&self, prompt_len: usize) {
        let line = |name: &str, secs: f64, n: usize, unit: &str| {
            let ms = secs * 1e3;
            let per = if n > 0 { ms / n as f64 } else { 0.0 };
            let tps = util::rate(n, secs).unwrap_or(0.0);
            eprintln!(
                "{name:>16} = {ms:10.2} ms / {n:5} {unit:6} ({per:8.2} ms per token, {tps:9.2} tokens per second)"
            );
        };
        eprintln!("{:>16} = {:10.2} ms", "load time", self.load_s * 1e3);
        line("prompt eval time", self.prefill_s, prompt_len, "tokens");
        line("eval time", self.decode_s, self.decode_steps, "runs");
        eprintln!(
            "{:>16} = {:10.2} ms / {:5} tokens",
            "total time",
            (self.prefill_s + self.decode_s) * 1e3,
            prompt_len + self.decode_steps + 1
        );
    }
}
