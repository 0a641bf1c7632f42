//! `bitnet inspect`: what a checkpoint is, without building the model.

use std::process::ExitCode;

use std::fmt::Write as _;

use anyhow::{Context, Result};

use crate::runtime;
use crate::source::SourceArgs;
use crate::util;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub source: SourceArgs,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let source = args.source.resolve()?;
    let info = bitnet_model::inspect(&source.dir)
        .with_context(|| format!("inspecting {}", source.dir.display()))?;
    let mut out = String::new();
    write!(out, "{info}")?;
    match runtime::load_tokenizer(&source.dir) {
        Ok(tokenizer) => {
            let special = |name: &str| match tokenizer.token_to_id(name) {
                Some(id) => format!("{name} = {id}"),
                None => format!("{name} absent"),
            };
            writeln!(
                out,
                "tokenizer:    {} tokens; {}, {}, {}",
                tokenizer.get_vocab_size(true),
                special("<|begin_of_text|>"),
                special("<|end_of_text|>"),
                special("<|eot_id|>")
            )?;
        }
        Err(e) => writeln!(out, "tokenizer:    unusable: {e:#}")?,
    }
    let has_template = std::fs::read_to_string(source.dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| !v["chat_template"].is_null());
    let template = if has_template {
        "from tokenizer_config.json"
    } else {
        "none in tokenizer_config.json (the 2B-4T format is used)"
    };
    writeln!(out, "chat template: {template}")?;
    writeln!(out, "CPU kernel:   {}", runtime::isa())?;
    util::emit(&out)?;
    Ok(ExitCode::SUCCESS)
}
