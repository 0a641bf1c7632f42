//! Sampling flags shared by `generate` and `chat`, and the stop tokens of a checkpoint.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result};
use bitnet_model::generation::{Sampler, SamplingParams};
use bitnet_model::ForCausalLM;
use serde_json::Value;
use tokenizers::Tokenizer;

/// How each next token is chosen (transformers' order: repetition penalty, temperature,
/// top-k, top-p, min-p).
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Sampling")]
pub struct SamplingArgs {
    /// Softmax temperature: lower is more deterministic, 0 is greedy (always the most likely
    /// token, ignoring the other sampling flags).
    #[arg(long, default_value_t = 0.8, value_name = "T")]
    pub temperature: f32,

    /// Sample only among the K most likely tokens. [default: off]
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,

    /// Nucleus sampling: keep the smallest set of most likely tokens whose probabilities sum to
    /// at least P, in (0, 1]; 1 turns it off.
    #[arg(long, default_value_t = 0.95, value_name = "P")]
    pub top_p: f32,

    /// Drop tokens less likely than P × the most likely one, in [0, 1). [default: off]
    #[arg(long, value_name = "P")]
    pub min_p: Option<f32>,

    /// Seed of the sampler, for reproducible output. [default: a random seed, printed]
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,

    /// Repetition penalty (transformers' repetition_penalty): logits of tokens among the last
    /// --repeat-last-n are divided by R (multiplied if negative); 1 is off.
    #[arg(long, default_value_t = 1.0, value_name = "R")]
    pub repeat_penalty: f32,

    /// How many recent tokens the repetition penalty looks at.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub repeat_last_n: usize,

    /// Stop when this text is generated (repeatable); the output ends before it.
    #[arg(long, value_name = "STR")]
    pub stop: Vec<String>,

    /// Do not stop at end-of-sequence / end-of-turn tokens (keep going until --max-tokens).
    #[arg(long)]
    pub ignore_eos: bool,
}

impl SamplingArgs {
    /// The sampler; fails (naming the flag) on an out-of-range value.
    pub fn sampler(&self) -> Result<(Sampler, u64)> {
        let seed = self.seed.unwrap_or_else(random_seed);
        let params = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: Some(self.top_p),
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed,
        };
        Ok((Sampler::new(params)?, seed))
    }
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() >> 1
}

/// Token ids that end generation: the config's eos ids, `<|eot_id|>` if the vocabulary has it,
/// and generation_config.json's eos ids.
pub fn stop_tokens(dir: &Path, model: &ForCausalLM, tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    let mut ids: BTreeSet<u32> = model.config().eos_token_ids.iter().copied().collect();
    if let Some(eot) = tokenizer.token_to_id("<|eot_id|>") {
        ids.insert(eot);
    }
    let path = dir.join("generation_config.json");
    if path.is_file() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        match &value["eos_token_id"] {
            Value::Number(n) => ids.extend(n.as_u64().map(|n| n as u32)),
            Value::Array(list) => {
                ids.extend(list.iter().filter_map(Value::as_u64).map(|n| n as u32))
            }
            _ => {}
        }
    }
    Ok(ids.into_iter().collect())
}
