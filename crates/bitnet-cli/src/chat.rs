//! `bitnet chat`: a multi-turn conversation that keeps the KV cache between turns.
//!
//! Each turn renders the whole conversation with the chat template and encodes it; the tokens
//! that already sit in the KV cache (the longest common prefix with what was fed before) are
//! not recomputed, only the rest is fed. Re-encoding a reply can tokenize it differently from
//! how it was generated; then the cache is rewound to the common prefix, never misused.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{Context, Result};
use bitnet_model::chat::{ChatTemplate, Message};
use bitnet_model::generation::{generate, GenerateOptions, StopReason};
use bitnet_model::ForCausalLM;
use candle_core::{Device, Tensor};

use crate::generate::Timings;
use crate::runtime::{self, RuntimeArgs};
use crate::sampling::{self, SamplingArgs};
use crate::source::SourceArgs;
use crate::util;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// System message that starts the conversation (kept across /reset).
    #[arg(long, value_name = "TEXT", value_parser = crate::util::text_arg())]
    pub system: Option<String>,

    /// Most tokens per reply (fewer if the end-of-turn token or the context end comes first).
    #[arg(long, short = 'n', default_value_t = 512, value_name = "N")]
    pub max_tokens: usize,

    /// Print prompt/generation speed after every reply (on stderr).
    #[arg(long)]
    pub verbose: bool,

    /// Recompute the whole conversation every turn (testing aid: must give the same replies).
    #[arg(long, hide = true)]
    pub no_cache_reuse: bool,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    #[command(flatten)]
    pub source: SourceArgs,

    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

const HELP: &str = "commands: /reset (forget the conversation), /exit (or end of input) quits";

/// The conversation and what the KV cache holds.
struct Session {
    system: Option<String>,
    messages: Vec<Message>,
    /// Exactly the tokens in the model's KV cache, in order.
    cached: Vec<u32>,
}

impl Session {
    fn reset(&mut self, model: &mut ForCausalLM) {
        self.messages.clear();
        if let Some(s) = &self.system {
            self.messages.push(Message::new("system", s.as_str()));
        }
        model.clear_cache();
        self.cached.clear();
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    args.sampling.sampler(&serde_json::Value::Null)?; // bad flags fail before loading
    let runtime::Loaded {
        mut model,
        tokenizer,
        source,
        ..
    } = runtime::load(&args.source, &args.runtime)?;
    let template = ChatTemplate::from_dir(&source.dir)?;
    let generation_config = sampling::generation_config(&source.dir)?;
    let (mut sampler, seed) = args.sampling.sampler(&generation_config)?;
    args.sampling.apply_to(&mut model);
    let stop_tokens = if args.sampling.ignore_eos {
        Vec::new()
    } else {
        sampling::stop_tokens(&generation_config, &model, &tokenizer)
    };
    let context = model.max_context();
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("{HELP}; context {context} tokens, seed {seed}");
    }
    let mut session = Session {
        system: args.system.clone(),
        messages: Vec::new(),
        cached: Vec::new(),
    };
    session.reset(&mut model);

    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let mut line = Vec::new();
    loop {
        if interactive {
            write!(stdout, "> ")
                .and_then(|_| stdout.flush())
                .context("writing to standard output")?;
        }
        line.clear();
        if stdin
            .read_until(b'\n', &mut line)
            .context("reading standard input")?
            == 0
        {
            break;
        }
        let text = match util::utf8(std::mem::take(&mut line), "input line") {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e:#}");
                continue;
            }
        };
        let text = text.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                session.reset(&mut model);
                eprintln!("(conversation reset)");
                continue;
            }
            "/help" => {
                eprintln!("{HELP}");
                continue;
            }
            _ => {}
        }
        session.messages.push(Message::new("user", text));
        let mut ids = render(&template, &tokenizer, &session.messages)?;
        if ids.len() >= context {
            // Keep only the system message and this turn.
            let user = session.messages.pop();
            session.reset(&mut model);
            session.messages.extend(user);
            ids = render(&template, &tokenizer, &session.messages)?;
            if ids.len() >= context {
                eprintln!(
                    "error: this message is {} tokens with the template, the model's context is \
                     {context}; shorten it",
                    ids.len()
                );
                session.messages.pop();
                continue;
            }
            eprintln!("(the context of {context} tokens is full: earlier turns were dropped)");
        }
        if args.no_cache_reuse {
            model.clear_cache();
            session.cached.clear();
        }
        let reused = rewind(&mut model, &mut session.cached, &ids)?;
        let options = GenerateOptions {
            max_tokens: args.max_tokens,
            stop_tokens: stop_tokens.clone(),
            stop_strings: args.sampling.stop.clone(),
        };
        let mut write_error = None;
        let generated = generate(
            &mut model,
            &tokenizer,
            &ids[reused..],
            &mut sampler,
            &options,
            |t| {
                if write_error.is_none() {
                    if let Err(e) = stdout.write_all(t.as_bytes()).and_then(|_| stdout.flush()) {
                        write_error = Some(e);
                    }
                }
            },
        );
        let generated = match generated {
            Ok(g) => g,
            Err(e) => {
                // Whatever the model did is unknown: start over rather than mislead.
                session.reset(&mut model);
                return Err(e).context("generating a reply");
            }
        };
        if let Some(e) = write_error {
            return Err(e).context("writing to standard output");
        }
        writeln!(stdout).context("writing to standard output")?;
        // The cache now holds the prompt and the replies' tokens, except the last sampled one.
        let mut fed = ids.clone();
        fed.extend(&generated.tokens);
        fed.truncate(model.cached_tokens());
        session.cached = fed;
        session
            .messages
            .push(Message::new("assistant", generated.text.as_str()));
        if args.verbose {
            let t = Timings::new(0.0, ids.len() - reused, &generated);
            eprintln!(
                "[{} prompt tokens ({} from cache), {:.1} tok/s; {} tokens, {:.1} tok/s; stopped by {}]",
                ids.len(),
                reused,
                t.prefill_tok_s.unwrap_or(0.0),
                generated.tokens.len(),
                t.decode_tok_s.unwrap_or(0.0),
                crate::generate::describe(&generated.stop)
            );
        }
        if generated.stop == StopReason::ContextFull {
            session.reset(&mut model);
            eprintln!("(the context of {context} tokens is full: conversation reset)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The conversation's tokens, ending where the assistant's reply begins.
fn render(
    template: &ChatTemplate,
    tokenizer: &tokenizers::Tokenizer,
    messages: &[Message],
) -> Result<Vec<u32>> {
    let text = template.render(messages, true)?;
    runtime::encode(tokenizer, &text, false)
}

/// Rewinds the KV cache to the longest prefix it shares with `ids` (leaving at least one token
/// to feed) and returns that prefix's length.
fn rewind(model: &mut ForCausalLM, cached: &mut Vec<u32>, ids: &[u32]) -> Result<usize> {
    let common = cached
        .iter()
        .zip(ids)
        .take_while(|(a, b)| a == b)
        .count()
        .min(ids.len().saturating_sub(1));
    if common < cached.len() {
        if common == 0 {
            model.clear_cache();
        } else {
            // ForCausalLM rewinds its cache when given a smaller offset: re-feed the last kept
            // token at its own position so the cache ends exactly at `common`.
            let last = Tensor::new(&ids[common - 1..common], &Device::Cpu)?.unsqueeze(0)?;
            model.forward(&last, common - 1)?;
        }
        cached.truncate(common);
    }
    debug_assert_eq!(model.cached_tokens(), cached.len());
    Ok(common)
}
