//! Sampling flags shared by `generate` and `chat`, and the stop tokens of a checkpoint.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result};
use bitnet_model::generation::{Sampler, SamplingParams};
use bitnet_model::ForCausalLM;
use serde_json::Value;
use tokenizers::Tokenizer;

/// `--temperature` without a flag or generation_config.json value.
pub const DEFAULT_TEMPERATURE: f32 = 0.8;
/// `--top-p` without a flag or generation_config.json value.
pub const DEFAULT_TOP_P: f32 = 0.95;

/// How each next token is chosen (transformers' order: repetition penalty, temperature,
/// top-k, top-p, min-p).
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Sampling")]
pub struct SamplingArgs {
    /// Softmax temperature: lower is more deterministic, 0 is greedy (always the most likely
    /// token, ignoring the other sampling flags). [default: the model's generation_config.json
    /// (0 if it says do_sample: false), else 0.8]
    #[arg(long, value_name = "T")]
    pub temperature: Option<f32>,

    /// Sample only among the K most likely tokens. [default: generation_config.json, else off]
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,

    /// Nucleus sampling: keep the smallest set of most likely tokens whose probabilities sum to
    /// at least P, in (0, 1]; 1 turns it off. [default: generation_config.json, else 0.95]
    #[arg(long, value_name = "P")]
    pub top_p: Option<f32>,

    /// Drop tokens less likely than P × the most likely one, in [0, 1). [default: off]
    #[arg(long, value_name = "P")]
    pub min_p: Option<f32>,

    /// Seed of the sampler, for reproducible output. On CUDA the draw runs on the GPU from its
    /// own random numbers: reproducible there, but not the CPU's tokens for the same seed
    /// (--host-sampler gives those). [default: a random seed, printed]
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,

    /// Repetition penalty (transformers' repetition_penalty): logits of tokens among the last
    /// --repeat-last-n are divided by R (multiplied if negative); 1 is off.
    /// [default: generation_config.json, else 1]
    #[arg(long, value_name = "R")]
    pub repeat_penalty: Option<f32>,

    /// How many recent tokens the repetition penalty looks at.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub repeat_last_n: usize,

    /// Stop when this text is generated (repeatable); the output ends before it.
    #[arg(long, value_name = "STR", value_parser = crate::util::text_arg())]
    pub stop: Vec<String>,

    /// Do not stop at end-of-sequence / end-of-turn tokens (keep going until --max-tokens).
    #[arg(long)]
    pub ignore_eos: bool,

    /// CUDA: pick every token on the host from its logits, read back each step, as on the CPU
    /// (slower: the GPU waits for the host between steps). By default the pick, the penalty
    /// and the draw run on the GPU. For comparing the two; no effect on the CPU.
    #[arg(long)]
    pub host_sampler: bool,
}

impl SamplingArgs {
    /// The sampler: flags first, then the model's `generation_config.json` (as transformers'
    /// `generate` uses it), then this CLI's defaults. Fails (naming the flag) on a bad value.
    pub fn sampler(&self, generation_config: &Value) -> Result<(Sampler, u64)> {
        let seed = self.seed.unwrap_or_else(random_seed);
        let number = |key: &str| generation_config[key].as_f64().map(|v| v as f32);
        let greedy_default = generation_config["do_sample"] == Value::Bool(false);
        let params = SamplingParams {
            temperature: self
                .temperature
                .or(if greedy_default {
                    Some(0.0)
                } else {
                    number("temperature")
                })
                .unwrap_or(DEFAULT_TEMPERATURE),
            top_k: self
                .top_k
                .or(generation_config["top_k"].as_u64().map(|k| k as usize)),
            top_p: Some(self.top_p.or(number("top_p")).unwrap_or(DEFAULT_TOP_P)),
            min_p: self.min_p.or(number("min_p")),
            repeat_penalty: self
                .repeat_penalty
                .or(number("repetition_penalty"))
                .unwrap_or(1.0),
            repeat_last_n: self.repeat_last_n,
            seed,
        };
        Ok((Sampler::new(params)?, seed))
    }

    /// Where `model` picks tokens (--host-sampler).
    pub fn apply_to(&self, model: &mut ForCausalLM) {
        model.set_device_sampling(!self.host_sampler);
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

/// The model directory's `generation_config.json`, or `Null` when it has none.
pub fn generation_config(dir: &Path) -> Result<Value> {
    let path = dir.join("generation_config.json");
    if !path.is_file() {
        return Ok(Value::Null);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// Token ids that end generation: the config's eos ids, `<|eot_id|>` if the vocabulary has it,
/// and generation_config.json's eos ids.
pub fn stop_tokens(
    generation_config: &Value,
    model: &ForCausalLM,
    tokenizer: &Tokenizer,
) -> Vec<u32> {
    let mut ids: BTreeSet<u32> = model.config().eos_token_ids.iter().copied().collect();
    if let Some(eot) = tokenizer.token_to_id("<|eot_id|>") {
        ids.insert(eot);
    }
    match &generation_config["eos_token_id"] {
        Value::Number(n) => ids.extend(n.as_u64().map(|n| n as u32)),
        Value::Array(list) => ids.extend(list.iter().filter_map(Value::as_u64).map(|n| n as u32)),
        _ => {}
    }
    ids.into_iter().collect()
}
