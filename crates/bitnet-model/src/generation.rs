//! Text generation: sampling, stop conditions, UTF-8-safe streaming, and the decode loop.
//!
//! Sampling follows transformers' `generate` order: repetition penalty, temperature, top-k,
//! top-p, min-p. Temperature 0 is greedy (argmax, first index on ties, as `torch.argmax`).

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::model::ForCausalLM;

/// How to pick each next token. [`Default`] is greedy.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`None` or 0: off).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p` (`None` or 1: off).
    pub top_p: Option<f32>,
    /// Drop tokens less likely than `min_p` × the most likely one (`None` or 0: off).
    pub min_p: Option<f32>,
    /// CTRL-style repetition penalty (transformers' `repetition_penalty`): logits of tokens
    /// already seen are divided by it when positive and multiplied when negative. 1 is off.
    pub repeat_penalty: f32,
    /// How many of the most recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the sampling RNG, so runs are reproducible.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 299_792_458,
        }
    }
}

impl SamplingParams {
    /// Checks every value, naming the CLI flag of the first bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &'static str, value: String, reason: &str| {
            Err(Error::InvalidArgument {
                name,
                value,
                reason: reason.into(),
            })
        };
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(
                "--temperature",
                self.temperature.to_string(),
                "must be a finite number ≥ 0 (0 = greedy)",
            );
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad("--top-p", p.to_string(), "must be in (0, 1] (1 = off)");
            }
        }
        if let Some(p) = self.min_p {
            if !(0.0..1.0).contains(&p) {
                return bad("--min-p", p.to_string(), "must be in [0, 1) (0 = off)");
            }
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return bad(
                "--repeat-penalty",
                self.repeat_penalty.to_string(),
                "must be a finite number > 0 (1 = off)",
            );
        }
        Ok(())
    }
}

/// Picks tokens from logits according to [`SamplingParams`].
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler; fails if the parameters are invalid.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Self { params, rng })
    }

    /// These parameters for decoding on the GPU: the draw at a temperature above 0 (else the
    /// argmax), after the repetition penalty unless it is 1.
    #[cfg(feature = "cuda")]
    fn device_pick(&self) -> crate::model::DevicePick {
        let p = &self.params;
        let draw = (p.temperature > 0.0).then(|| bitnet_kernels::cuda::sample::DrawParams {
            temperature: p.temperature,
            // Beyond u32 it exceeds every vocabulary: off, as the host treats it.
            top_k: p.top_k.map_or(0, |k| u32::try_from(k).unwrap_or(0)),
            top_p: p.top_p.unwrap_or(1.0),
            min_p: p.min_p.unwrap_or(0.0),
            seed: p.seed,
        });
        let penalty = (p.repeat_penalty != 1.0).then_some((p.repeat_penalty, p.repeat_last_n));
        crate::model::DevicePick { draw, penalty }
    }

    /// The next token given one position's logits and the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        let p = &self.params;
        if logits.is_empty() {
            return Err(candle_core::Error::Msg("no logits to sample from".into()).into());
        }
        let mut logits = logits.to_vec();
        if p.repeat_penalty != 1.0 {
            let recent = &history[history.len().saturating_sub(p.repeat_last_n)..];
            let mut seen = std::collections::HashSet::new();
            for &t in recent {
                if let Some(l) = logits.get_mut(t as usize).filter(|_| seen.insert(t)) {
                    *l = if *l < 0.0 {
                        *l * p.repeat_penalty
                    } else {
                        *l / p.repeat_penalty
                    };
                }
            }
        }
        check_nan(&logits)?;
        if p.temperature == 0.0 {
            return Ok(argmax(&logits));
        }
        let t = p.temperature;
        let mut ranking = Ranking::new(&logits);
        let max = logits[ranking.get(0)] / t;
        let weight = |i: usize| ((logits[i] / t - max) as f64).exp();
        // top-k keeps a prefix of the ranking; without it every token is a candidate, and the
        // normalizer is summed in id order so that nothing beyond what the filters and the
        // draw walk through needs sorting.
        let candidates = p
            .top_k
            .filter(|&k| k > 0)
            .map_or(logits.len(), |k| k.min(logits.len()));
        // (Computed in parallel, summed in id order: the same total on any thread count.)
        let all: Option<Vec<f64>> = (candidates == logits.len())
            .then(|| (0..logits.len()).into_par_iter().map(weight).collect());
        let weights = |i: usize| all.as_ref().map_or_else(|| weight(i), |all| all[i]);
        let total: f64 = match &all {
            Some(all) => all.iter().sum(),
            None => (0..candidates).map(|r| weights(ranking.get(r))).sum(),
        };
        let prob = |ranking: &mut Ranking, r: usize| weights(ranking.get(r)) / total;
        // top-p keeps ranks up to the first whose cumulative probability reaches p; min-p then
        // drops every rank less likely than min_p × the best. Probabilities fall with rank,
        // so one walk finds both cuts, and the kept mass is the cumulative sum where it stops
        // (the same additions in the same order as summing the kept ranks afterwards).
        let top_p = p.top_p.filter(|&v| v < 1.0).map(f64::from);
        let min_p = p.min_p.filter(|&v| v > 0.0).map(f64::from);
        let (mut keep, mut kept) = (candidates, None);
        if top_p.is_some() || min_p.is_some() {
            let threshold = min_p.map(|m| prob(&mut ranking, 0) * m);
            let mut cumulative = 0.0;
            for r in 0..candidates {
                let q = prob(&mut ranking, r);
                if threshold.is_some_and(|t| q < t) {
                    (keep, kept) = (r, Some(cumulative));
                    break;
                }
                cumulative += q;
                if top_p.is_some_and(|p| cumulative >= p) {
                    (keep, kept) = (r + 1, Some(cumulative));
                    break;
                }
            }
        }
        let kept: f64 = match (kept, &all) {
            (Some(kept), _) => kept,
            (None, Some(all)) => all.iter().map(|w| w / total).sum(),
            (None, None) => (0..keep).map(|r| prob(&mut ranking, r)).sum(),
        };
        let mut r = self.rng.random::<f64>() * kept;
        for i in 0..keep {
            r -= prob(&mut ranking, i);
            if r <= 0.0 {
                return Ok(ranking.get(i) as u32);
            }
        }
        Ok(ranking.get(keep - 1) as u32)
    }
}

/// Token ids best first: logit descending, then id ascending (a stable sort's order), sorted
/// lazily. Each id is one `u64` key that sorts in that order, so no comparison looks anything
/// up, and only as long a prefix is ordered as the filters and the draw walk (growing 8× at a
/// time). Sorting all 128,256 ids by an indexed comparison took 7–8 ms per sampled token
/// (benches/sampler.rs); a small top-p set, as an LM's peaked logits give, needs one selection
/// pass.
struct Ranking {
    keys: Vec<u64>,
    /// `keys[..sorted]` is final; every key after it ranks below all of them.
    sorted: usize,
}

impl Ranking {
    fn new(logits: &[f32]) -> Self {
        let key = |(id, l): (usize, &f32)| {
            // `f32::total_cmp`'s order as an unsigned integer, inverted for "largest first".
            let bits = l.to_bits();
            let ascending = if bits >> 31 == 1 {
                !bits
            } else {
                bits | 1 << 31
            };
            (u64::from(!ascending) << 32) | id as u64
        };
        Self {
            keys: logits.iter().enumerate().map(key).collect(),
            sorted: 0,
        }
    }

    /// The id at rank `r` (0 = best); `r` must be below the number of logits.
    fn get(&mut self, r: usize) -> usize {
        if r >= self.sorted {
            let end = (r + 1).max(8 * self.sorted).max(64);
            if end > self.keys.len() / 8 {
                // Past an eighth of the ids, further selection passes (each over all the ids
                // left) would cost about as much as sorting them all.
                radix_sort(&mut self.keys);
                self.sorted = self.keys.len();
            } else {
                let rest = &mut self.keys[self.sorted..];
                rest.select_nth_unstable(end - self.sorted - 1);
                rest[..end - self.sorted].sort_unstable();
                self.sorted = end;
            }
        }
        self.keys[r] as u32 as usize
    }
}

/// Sorts ranking keys (logit order above, id below) ascending: put back in id order by the id
/// in their low half, then a stable least-significant-digit radix sort on the high half, a
/// byte per pass, skipping bytes all keys share.
fn radix_sort(keys: &mut Vec<u64>) {
    let mut other = vec![0; keys.len()];
    for &k in keys.iter() {
        other[k as u32 as usize] = k;
    }
    std::mem::swap(keys, &mut other);
    for shift in (32..64).step_by(8) {
        let digit = |k: u64| (k >> shift) as usize & 0xff;
        let mut start = [0usize; 256];
        keys.iter().for_each(|&k| start[digit(k)] += 1);
        if start.contains(&keys.len()) {
            continue;
        }
        let mut next = 0;
        for s in start.iter_mut() {
            (*s, next) = (next, next + *s);
        }
        for &k in keys.iter() {
            other[start[digit(k)]] = k;
            start[digit(k)] += 1;
        }
        std::mem::swap(keys, &mut other);
    }
}

/// NaN logits have no argmax or distribution: an error rather than an arbitrary token.
fn check_nan(logits: &[f32]) -> Result<()> {
    if logits.iter().any(|l| l.is_nan()) {
        return Err(candle_core::Error::Msg("the model produced NaN logits".into()).into());
    }
    Ok(())
}

/// Index of the largest logit (the first one on ties).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Incremental detokenization that never emits half a UTF-8 character.
///
/// Byte-level BPE tokens can end in the middle of a multi-byte character; decoding such a
/// prefix yields U+FFFD. The stream holds text back until the decoded tail is complete, then
/// emits only the new part (decoding a window of tokens, since decoders may depend on context).
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    tokens: Vec<u32>,
    prev: usize,
    current: usize,
}

impl<'a> TextStream<'a> {
    /// An empty stream.
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
            tokens: Vec::new(),
            prev: 0,
            current: 0,
        }
    }

    fn decode(&self, tokens: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(tokens, true)
            .map_err(|e| Error::Tokenizer {
                path: "tokenizer".into(),
                reason: e.to_string(),
            })
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, token: u32) -> Result<Option<String>> {
        let before = self.decode(&self.tokens[self.prev..self.current])?;
        self.tokens.push(token);
        let after = self.decode(&self.tokens[self.prev..])?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            let new = after.get(before.len()..).unwrap_or(&after).to_string();
            self.prev = self.current;
            self.current = self.tokens.len();
            Ok(Some(new))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still held back (an incomplete character decodes as U+FFFD).
    pub fn finish(&mut self) -> Result<String> {
        let before = self.decode(&self.tokens[self.prev..self.current])?;
        let after = self.decode(&self.tokens[self.prev..])?;
        self.prev = self.tokens.len();
        self.current = self.tokens.len();
        Ok(after.get(before.len()..).unwrap_or("").to_string())
    }
}

/// Why generation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token (eos, `<|eot_id|>`) was sampled; it is not part of the output.
    Token(u32),
    /// A stop string appeared; the output ends before it.
    String(String),
    /// `max_tokens` were generated.
    MaxTokens,
    /// The model's context window is full.
    ContextFull,
}

/// What to generate and when to stop.
#[derive(Clone, Debug, Default)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Tokens that end generation (e.g. eos and `<|eot_id|>`).
    pub stop_tokens: Vec<u32>,
    /// Strings that end generation; the text is cut before them.
    pub stop_strings: Vec<String>,
}

/// The result of [`generate`].
#[derive(Clone, Debug)]
pub struct Generated {
    /// Generated token ids (without a final stop token).
    pub tokens: Vec<u32>,
    /// Their text, cut before a stop string.
    pub text: String,
    /// Time to process the prompt and produce the first logits.
    pub prefill: Duration,
    /// Time for all later tokens.
    pub decode: Duration,
    /// Why it stopped.
    pub stop: StopReason,
}

/// Feeds `prompt` to the model after the `model.cached_tokens()` positions already in its KV
/// cache (0 for a fresh prompt; more to continue a chat), then samples until a stop condition.
/// `on_text` receives the text as it becomes complete (never half a character, never part of a
/// stop string).
pub fn generate(
    model: &mut ForCausalLM,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    sampler: &mut Sampler,
    options: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<Generated> {
    let offset = model.cached_tokens();
    let context = model.max_context();
    if prompt.is_empty() {
        return Err(Error::InvalidArgument {
            name: "--prompt",
            value: "\"\"".into(),
            reason: "encodes to no tokens; give some text".into(),
        });
    }
    if offset + prompt.len() > context {
        return Err(Error::InvalidArgument {
            name: "--prompt",
            value: format!(
                "{} tokens (+{offset} already in the conversation)",
                prompt.len()
            ),
            reason: format!("longer than the model's context of {context} tokens; shorten it"),
        });
    }
    // Ids stay on the host: the model checks them there anyway, and on a GPU a decode step
    // uploads only the embedded row.
    let device = Device::Cpu;
    let mut out = Output {
        history: prompt.to_vec(),
        stream: TextStream::new(tokenizer),
        pending: String::new(),
        generated: Generated {
            tokens: Vec::new(),
            text: String::new(),
            prefill: Duration::ZERO,
            decode: Duration::ZERO,
            stop: StopReason::MaxTokens,
        },
        options,
        on_text: &mut on_text,
    };
    let start = Instant::now();
    let mut input = Tensor::new(prompt, &device)?.unsqueeze(0)?;
    let mut position = offset;
    for step in 0..options.max_tokens {
        if position + input.dim(1)? > context {
            out.generated.stop = StopReason::ContextFull;
            break;
        }
        if step > 0 {
            // The rest through the loop that keeps a GPU busy (see `decode`).
            let wanted = options.max_tokens - step;
            let budget = wanted.min(context - position);
            let mut stopped = false;
            let history = out.history.clone();
            decode(model, sampler, &history, position, budget, |t| {
                stopped = !out.accept(t)?;
                Ok(!stopped)
            })?;
            if !stopped && budget < wanted {
                out.generated.stop = StopReason::ContextFull;
            }
            break;
        }
        let logits = model
            .forward(&input, position)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        position += input.dim(1)?;
        let token = sampler.sample(&logits, &out.history)?;
        if step == 0 {
            out.generated.prefill = start.elapsed();
        }
        if !out.accept(token)? {
            break;
        }
        input = Tensor::new(&[token], &device)?.unsqueeze(0)?;
    }
    let mut generated = out.finish()?;
    generated.decode = start.elapsed().saturating_sub(generated.prefill);
    Ok(generated)
}

/// Decodes from the last of `history` (the tokens so far, which a repetition penalty looks at),
/// fed at position `offset`: each next token is picked by `sampler` and passed to `on_token`
/// until it returns false or `max_tokens` were produced. Returns how many were. The KV cache
/// then holds `offset + produced` positions (the last token is not fed), as after the same
/// steps through [`ForCausalLM::forward`].
///
/// On a CUDA model with a BF16 embedding the pick runs on the GPU — the argmax, or a draw at a
/// temperature with top-k, top-p and min-p (`bitnet_kernels::cuda::sample`), after the
/// repetition penalty (`bitnet_kernels::cuda::penalty`) — and each step is queued before the
/// previous token is read (docs/CUDA.md). The greedy tokens are the host's; drawn tokens follow
/// the host sampler's distribution from the device's own random numbers (seeded by the
/// sampler's seed and the position). Elsewhere (and after
/// [`ForCausalLM::set_device_sampling`]`(false)`) each step is a [`ForCausalLM::forward`] and
/// [`Sampler::sample`] on the host.
pub fn decode(
    model: &mut ForCausalLM,
    sampler: &mut Sampler,
    history: &[u32],
    offset: usize,
    max_tokens: usize,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<usize> {
    let Some(&token) = history.last() else {
        return Err(Error::InvalidArgument {
            name: "history",
            value: "[]".into(),
            reason: "decoding starts from the last token so far; give at least one".into(),
        });
    };
    let context = model.max_context();
    if offset + max_tokens > context {
        return Err(Error::InvalidArgument {
            name: "max_tokens",
            value: format!("{max_tokens} (from position {offset})"),
            reason: format!("exceeds the model's context of {context} tokens"),
        });
    }
    #[cfg(feature = "cuda")]
    if model.picks_on_cuda() {
        let pick = sampler.device_pick();
        return model.decode_on_cuda(history, offset, max_tokens, &pick, on_token);
    }
    let mut history = history.to_vec();
    let mut token = token;
    for i in 0..max_tokens {
        let ids = Tensor::new(&[[token]], &Device::Cpu)?;
        let logits = model
            .forward(&ids, offset + i)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        token = sampler.sample(&logits, &history)?;
        history.push(token);
        if !on_token(token)? {
            return Ok(i + 1);
        }
    }
    Ok(max_tokens)
}

/// What [`generate`] has produced so far, and where its text goes.
struct Output<'a, F> {
    /// Prompt and generated tokens (for the repetition penalty).
    history: Vec<u32>,
    stream: TextStream<'a>,
    /// Text not yet passed on: it could be the start of a stop string.
    pending: String,
    generated: Generated,
    options: &'a GenerateOptions,
    on_text: F,
}

impl<F: FnMut(&str)> Output<'_, F> {
    /// Takes `token` unless it stops generation; false (with `generated.stop` set) if it does.
    fn accept(&mut self, token: u32) -> Result<bool> {
        if self.options.stop_tokens.contains(&token) {
            self.generated.stop = StopReason::Token(token);
            return Ok(false);
        }
        self.history.push(token);
        self.generated.tokens.push(token);
        if let Some(text) = self.stream.push(token)? {
            self.pending.push_str(&text);
        }
        let stops = &self.options.stop_strings;
        let out = &mut self.generated.text;
        match emit_until_stop(&mut self.pending, out, stops, &mut self.on_text) {
            Some(stop) => {
                self.generated.stop = StopReason::String(stop);
                Ok(false)
            }
            None => Ok(true),
        }
    }

    /// Passes on the text still held back (none after a stop string: it is dropped).
    fn finish(mut self) -> Result<Generated> {
        if !matches!(self.generated.stop, StopReason::String(_)) {
            self.pending.push_str(&self.stream.finish()?);
            (self.on_text)(&self.pending);
            self.generated.text.push_str(&self.pending);
        }
        Ok(self.generated)
    }
}

/// Moves text from `pending` to `out` (and `on_text`), except a tail that could still become a
/// stop string. Returns the stop string if one appeared (text from it on is dropped).
fn emit_until_stop(
    pending: &mut String,
    out: &mut String,
    stops: &[String],
    on_text: &mut impl FnMut(&str),
) -> Option<String> {
    let found = stops
        .iter()
        .filter_map(|s| pending.find(s.as_str()).map(|at| (at, s)))
        .min_by_key(|(at, _)| *at);
    if let Some((at, stop)) = found {
        on_text(&pending[..at]);
        out.push_str(&pending[..at]);
        pending.clear();
        return Some(stop.clone());
    }
    // Hold back the longest suffix that is a prefix of some stop string.
    let hold = stops
        .iter()
        .flat_map(|s| {
            (1..s.len())
                .filter(|&n| s.is_char_boundary(n))
                .map(move |n| &s[..n])
        })
        .filter(|prefix| pending.ends_with(prefix))
        .map(str::len)
        .max()
        .unwrap_or(0);
    let cut = pending.len() - hold;
    if cut > 0 {
        on_text(&pending[..cut]);
        out.push_str(&pending[..cut]);
        pending.drain(..cut);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params).unwrap()
    }

    #[test]
    fn greedy_takes_first_max_and_penalty_applies() {
        let mut s = sampler(SamplingParams::default());
        assert_eq!(s.sample(&[1.0, 3.0, 3.0, -1.0], &[]).unwrap(), 1);
        let mut s = sampler(SamplingParams {
            repeat_penalty: 2.0,
            ..Default::default()
        });
        // Token 1 was seen: 3.0 / 2 = 1.5 falls below token 2's 2.0 ...
        assert_eq!(s.sample(&[1.0, 3.0, 2.0, -1.0], &[1]).unwrap(), 2);
        // ... and a negative logit is multiplied, pushing it further down.
        assert_eq!(s.sample(&[-1.0, -0.6, -3.0], &[0]).unwrap(), 1);
    }

    #[test]
    fn filters_restrict_the_candidates() {
        let logits = [5.0, 4.9, 0.0, -2.0, 4.8];
        for seed in 0..50 {
            let base = SamplingParams {
                temperature: 1.0,
                seed,
                ..Default::default()
            };
            let t = sampler(SamplingParams {
                top_k: Some(2),
                ..base.clone()
            })
            .sample(&logits, &[])
            .unwrap();
            assert!(t == 0 || t == 1, "top-k 2 gave {t}");
            let t = sampler(SamplingParams {
                top_p: Some(0.3),
                ..base.clone()
            })
            .sample(&logits, &[])
            .unwrap();
            assert_eq!(t, 0, "top-p 0.3 keeps only the best token");
            let t = sampler(SamplingParams {
                min_p: Some(0.5),
                ..base.clone()
            })
            .sample(&logits, &[])
            .unwrap();
            assert!([0, 1, 4].contains(&t), "min-p 0.5 gave {t}");
        }
    }

    /// The plain twin of [`Sampler::sample`] past the penalty: every candidate sorted, each
    /// filter a prefix of that order (the sampler's first version).
    fn sample_by_full_sort(p: &SamplingParams, logits: &[f32], rng: &mut StdRng) -> u32 {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if let Some(k) = p.top_k.filter(|&k| k > 0) {
            order.truncate(k);
        }
        let max = logits[order[0]] / p.temperature;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] / p.temperature - max) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if let Some(top_p) = p.top_p.filter(|&v| v < 1.0) {
            let mut cumulative = 0.0;
            let keep = probs.iter().position(|&q| {
                cumulative += q;
                cumulative >= top_p as f64
            });
            probs.truncate(keep.map_or(probs.len(), |i| i + 1));
        }
        if let Some(min_p) = p.min_p.filter(|&v| v > 0.0) {
            let threshold = probs[0] * min_p as f64;
            let keep = probs.iter().take_while(|&&q| q >= threshold).count();
            probs.truncate(keep.max(1));
        }
        let total: f64 = probs.iter().sum();
        let mut r = rng.random::<f64>() * total;
        for (i, q) in probs.iter().enumerate() {
            r -= q;
            if r <= 0.0 {
                return order[i] as u32;
            }
        }
        order[probs.len() - 1] as u32
    }

    #[test]
    fn lazy_ranking_samples_as_a_full_sort() {
        let mut gen = StdRng::seed_from_u64(7);
        let sizes = [1, 2, 3, 63, 64, 65, 257, 1000, 4099, 128_256];
        for (c, &n) in sizes.iter().enumerate() {
            // Peaked (an LM's shape), flat, and coarse logits (many exact ties, −0 and +0).
            for shape in 0..3 {
                let logits: Vec<f32> = (0..n)
                    .map(|i| match shape {
                        0 => (gen.random::<f32>() * 3.0).powi(3) - 4.0,
                        1 => gen.random::<f32>() - 0.5,
                        _ => ((gen.random::<f32>() * 4.0).floor() - 2.0) * [1.0, -1.0][i % 2],
                    })
                    .collect();
                for filters in 0..6 {
                    let params = SamplingParams {
                        temperature: [0.3, 0.8, 1.0, 2.5][(c + filters) % 4],
                        top_k: [None, Some(40), None, Some(n + 3), Some(1), None][filters],
                        top_p: [None, Some(0.9), Some(0.95), None, Some(0.5), Some(1.0)][filters],
                        min_p: [None, None, Some(0.05), Some(0.2), None, Some(0.01)][filters],
                        seed: (c * 100 + shape * 10 + filters) as u64,
                        ..Default::default()
                    };
                    let mut s = sampler(params.clone());
                    let mut twin = StdRng::seed_from_u64(params.seed);
                    for _ in 0..8 {
                        let want = sample_by_full_sort(&params, &logits, &mut twin);
                        assert_eq!(s.sample(&logits, &[]).unwrap(), want, "{n} {params:?}");
                    }
                }
            }
        }
        assert!(sampler(SamplingParams::default()).sample(&[], &[]).is_err());
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams {
            temperature: 0.9,
            seed: 5,
            ..Default::default()
        };
        let run = || {
            let mut s = sampler(params.clone());
            (0..20)
                .map(|_| s.sample(&logits, &[]).unwrap())
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 3);
    }

    #[test]
    fn invalid_values_name_the_flag() {
        let cases = [
            (
                SamplingParams {
                    temperature: -0.5,
                    ..Default::default()
                },
                "--temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "--temperature",
            ),
            (
                SamplingParams {
                    top_p: Some(0.0),
                    ..Default::default()
                },
                "--top-p",
            ),
            (
                SamplingParams {
                    top_p: Some(1.5),
                    ..Default::default()
                },
                "--top-p",
            ),
            (
                SamplingParams {
                    min_p: Some(1.0),
                    ..Default::default()
                },
                "--min-p",
            ),
            (
                SamplingParams {
                    repeat_penalty: 0.0,
                    ..Default::default()
                },
                "--repeat-penalty",
            ),
        ];
        for (params, flag) in cases {
            let err = Sampler::new(params).unwrap_err().to_string();
            assert!(err.starts_with(flag), "{err}");
        }
    }

    #[test]
    fn stop_strings_are_held_back_and_cut() {
        let stops = vec!["User:".to_string()];
        let mut out = String::new();
        let mut seen = String::new();
        let mut pending = "Hello Us".to_string();
        assert_eq!(
            emit_until_stop(&mut pending, &mut out, &stops, &mut |t| seen.push_str(t)),
            None
        );
        assert_eq!((out.as_str(), pending.as_str()), ("Hello ", "Us"));
        pending.push_str("er: more");
        let stop = emit_until_stop(&mut pending, &mut out, &stops, &mut |t| seen.push_str(t));
        assert_eq!(stop.as_deref(), Some("User:"));
        assert_eq!((out.as_str(), seen.as_str()), ("Hello ", "Hello "));
    }
}
