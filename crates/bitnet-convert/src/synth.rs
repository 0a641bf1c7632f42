//! Deterministic random checkpoints with real shapes and names, for tests and benchmarks.
//!
//! [`synth`] writes a directory that loads like a real BitNet checkpoint: `config.json`
//! (`model_type: bitnet`), `model.safetensors` (streamed; sharded above the shard size),
//! a byte-level BPE `tokenizer.json` whose size matches `vocab_size` with
//! `<|begin_of_text|>` / `<|end_of_text|>` / `<|eot_id|>` at the config's ids, and the
//! usual tokenizer/generation side files. The weights are random but tame: embeddings
//! ~N(0, 0.02²), norm weights 1, ternary codes uniform over −1/0/+1 with `weight_scale`
//! uniform in [0.02, 0.05] — a forward pass stays finite.
//!
//! Packed by default (U8 `[out/4, in]` + BF16 `weight_scale`, `quantization_mode: offline`);
//! with [`SynthOptions::float`], BF16 master weights instead (`quantization_mode: online`),
//! i.e. a source for the converter.

use std::path::PathBuf;
use std::time::Instant;

use half::bf16;
use serde_json::json;

use crate::error::{ConvertError, Result};
use crate::progress::Progress;
use crate::source::LINEARS;
use crate::st::{self, plan_shards, PlannedTensor, StWriter};
use crate::util::{write_json, OutputDir};

/// SplitMix64: tiny, fast, and plenty random for weights.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Approximately standard normal (Irwin–Hall sum of four 16-bit uniforms; |z| ≤ 3.5).
    #[inline]
    pub fn next_normal(&mut self) -> f32 {
        let r = self.next_u64();
        let s = (r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48);
        (s as f32 - 131_070.0) * (1.0 / 37_837.2)
    }
}

/// Model shape of a synthetic checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub max_positions: usize,
    /// `rope_theta` (an integer here; written as a float).
    pub rope_theta: u64,
    pub tied: bool,
}

impl SynthConfig {
    /// microsoft/bitnet-b1.58-2B-4T's shape (~1.2 GB packed).
    pub fn preset_2b4t() -> Self {
        Self {
            hidden: 2560,
            layers: 30,
            heads: 20,
            kv_heads: 5,
            intermediate: 6912,
            vocab: 128_256,
            max_positions: 4096,
            rope_theta: 500_000,
            tied: true,
        }
    }

    /// A tiny model for fast tests (~0.6 MB packed).
    pub fn preset_tiny() -> Self {
        Self {
            hidden: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 352,
            vocab: 512,
            max_positions: 256,
            rope_theta: 500_000,
            tied: true,
        }
    }

    /// `"2b4t"` or `"tiny"`.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "2b4t" | "2B-4T" | "2b-4t" => Some(Self::preset_2b4t()),
            "tiny" => Some(Self::preset_tiny()),
            _ => None,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads.max(1)
    }

    /// Number of special tokens at the top of the vocabulary (256 as in Llama 3, 16 for tiny
    /// vocabularies).
    pub fn n_special(&self) -> usize {
        if self.vocab >= 1024 {
            256
        } else {
            16
        }
    }

    /// `<|begin_of_text|>`: the first special token (128000 for a 128256 vocabulary).
    pub fn bos(&self) -> usize {
        self.vocab - self.n_special()
    }

    /// `<|end_of_text|>`.
    pub fn eos(&self) -> usize {
        self.bos() + 1
    }

    /// `<|eot_id|>` (128009 for a 128256 vocabulary).
    pub fn eot(&self) -> usize {
        self.bos() + 9
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ConvertError::InvalidOptions(m));
        if self.hidden == 0 || self.layers == 0 || self.heads == 0 || self.kv_heads == 0 {
            return bad("hidden, layers, heads and kv-heads must be positive".into());
        }
        if self.hidden % self.heads != 0 {
            return bad(format!(
                "hidden {} is not divisible by heads {}",
                self.hidden, self.heads
            ));
        }
        if self.heads % self.kv_heads != 0 {
            return bad(format!(
                "heads {} is not divisible by kv-heads {}",
                self.heads, self.kv_heads
            ));
        }
        let kv = self.kv_heads * self.head_dim();
        for (what, n) in [
            ("hidden", self.hidden),
            ("intermediate", self.intermediate),
            ("kv-heads × head_dim", kv),
        ] {
            if n == 0 || n % 4 != 0 {
                return bad(format!(
                    "{what} = {n} must be a positive multiple of 4 (packed layout)"
                ));
            }
        }
        if self.vocab < 256 + 16 {
            return bad(format!(
                "vocab {} is too small: 256 byte tokens + 16 special tokens at least",
                self.vocab
            ));
        }
        Ok(())
    }

    /// The `config.json` of a checkpoint of this shape.
    pub fn config_json(&self, float: bool) -> serde_json::Value {
        json!({
            "architectures": ["BitNetForCausalLM"],
            "model_type": "bitnet",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos(),
            "eos_token_id": self.eos(),
            "hidden_act": "relu2",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": self.max_positions,
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim(),
            "rms_norm_eps": 1e-5,
            "rope_theta": self.rope_theta as f64,
            "rope_scaling": null,
            "tie_word_embeddings": self.tied,
            "torch_dtype": "bfloat16",
            "use_cache": true,
            "vocab_size": self.vocab,
            "quantization_config": {
                "quant_method": "bitnet",
                "linear_class": "autobitlinear",
                "quantization_mode": if float { "online" } else { "offline" },
            },
        })
    }

    /// `[out, in]` of each linear, by projection name.
    fn linear_shape(&self, proj: &str) -> [usize; 2] {
        let (h, i, q, kv) = (
            self.hidden,
            self.intermediate,
            self.heads * self.head_dim(),
            self.kv_heads * self.head_dim(),
        );
        match proj {
            "q_proj" => [q, h],
            "k_proj" | "v_proj" => [kv, h],
            "o_proj" => [h, q],
            "gate_proj" | "up_proj" => [i, h],
            _ => [h, i], // down_proj
        }
    }
}

/// What [`synth`] writes.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub output: PathBuf,
    pub config: SynthConfig,
    pub seed: u64,
    /// BF16 master weights (`quantization_mode: online`) instead of packed ternary ones.
    pub float: bool,
    pub force: bool,
    pub shard_size: u64,
}

impl SynthOptions {
    pub fn new(output: impl Into<PathBuf>, config: SynthConfig) -> Self {
        Self {
            output: output.into(),
            config,
            seed: 0,
            float: false,
            force: false,
            shard_size: crate::convert::DEFAULT_SHARD_SIZE,
        }
    }
}

/// What [`synth`] did.
#[derive(Debug, Clone)]
pub struct SynthReport {
    pub output: PathBuf,
    pub files: Vec<String>,
    pub tensors: usize,
    pub parameters: u64,
    pub bytes_written: u64,
    pub seconds: f64,
}

enum Fill {
    Normal(f32),
    Ones,
    Linear,
}

/// Writes a deterministic random checkpoint (same options and seed → same bytes).
pub fn synth(opts: &SynthOptions, progress: &mut dyn FnMut(&Progress<'_>)) -> Result<SynthReport> {
    let start = Instant::now();
    let c = &opts.config;
    c.validate()?;
    if opts.shard_size == 0 {
        return Err(ConvertError::InvalidOptions(
            "shard size must be positive".into(),
        ));
    }
    // The tensor list, in natural order, with how each is filled.
    let mut groups: Vec<(Vec<PlannedTensor>, Fill)> = Vec::new();
    let bf = |name: String, shape: Vec<usize>| PlannedTensor::new(name, "BF16", shape);
    groups.push((
        vec![bf(
            "model.embed_tokens.weight".into(),
            vec![c.vocab, c.hidden],
        )],
        Fill::Normal(0.02),
    ));
    for l in 0..c.layers {
        let p = format!("model.layers.{l}");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            groups.push((
                vec![bf(format!("{p}.{n}.weight"), vec![c.hidden])],
                Fill::Ones,
            ));
        }
        groups.push((
            vec![bf(
                format!("{p}.self_attn.attn_sub_norm.weight"),
                vec![c.hidden],
            )],
            Fill::Ones,
        ));
        groups.push((
            vec![bf(
                format!("{p}.mlp.ffn_sub_norm.weight"),
                vec![c.intermediate],
            )],
            Fill::Ones,
        ));
        for (m, proj) in LINEARS {
            let [out, inp] = c.linear_shape(proj);
            let name = format!("{p}.{m}.{proj}.weight");
            let g = if opts.float {
                vec![bf(name, vec![out, inp])]
            } else {
                vec![
                    PlannedTensor::new(name.clone(), "U8", vec![out / 4, inp]),
                    bf(format!("{name}_scale"), vec![1]),
                ]
            };
            groups.push((g, Fill::Linear));
        }
    }
    groups.push((
        vec![bf("model.norm.weight".into(), vec![c.hidden])],
        Fill::Ones,
    ));
    if !c.tied {
        groups.push((
            vec![bf("lm_head.weight".into(), vec![c.vocab, c.hidden])],
            Fill::Normal(0.02),
        ));
    }
    let total = groups.len();
    let mut fills = std::collections::HashMap::new();
    for (i, (g, f)) in groups.iter().enumerate() {
        fills.insert(g[0].name.clone(), (i, f));
    }
    let parameters: u64 = groups
        .iter()
        .map(|(g, f)| match f {
            Fill::Linear if !opts.float => g[0].nbytes() * 4,
            _ => g[0].shape.iter().product::<usize>() as u64,
        })
        .sum();
    let plan: Vec<Vec<PlannedTensor>> = groups.iter().map(|(g, _)| g.clone()).collect();
    let shards = plan_shards(plan, opts.shard_size);
    let bytes_written: u64 = shards.iter().flatten().map(PlannedTensor::nbytes).sum();

    let out = OutputDir::create(&opts.output, opts.force, None)?;
    let dir = out.tmp.clone();
    progress(&Progress::Phase("writing"));
    let (mut done, mut index) = (0u64, 0usize);
    let files = st::write_shards(&dir, shards, |p, w| {
        let Some(&(i, fill)) = fills.get(&p.name) else {
            return Ok(()); // a weight_scale, written with its weight
        };
        let mut rng =
            SplitMix64::new(opts.seed ^ (i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
        rng.next_u64();
        match fill {
            Fill::Normal(std) => write_normal(w, p, &mut rng, *std)?,
            Fill::Ones => {
                let one = bf16::ONE.to_le_bytes();
                let n = p.shape.iter().product::<usize>();
                w.write(&p.name, &one.repeat(n))?;
            }
            Fill::Linear => {
                let gamma = 0.02 + 0.03 * rng.next_f32();
                if opts.float {
                    // mean|N(0, σ²)| = σ·√(2/π), so σ = γ/0.7979 gives mean|W| ≈ γ.
                    write_normal(w, p, &mut rng, gamma / 0.797_884_6)?;
                } else {
                    write_codes(w, p, &mut rng)?;
                    w.write(
                        &format!("{}_scale", p.name),
                        &bf16::from_f32(gamma).to_le_bytes(),
                    )?;
                }
            }
        }
        index += 1;
        done += p.nbytes();
        progress(&Progress::Tensor {
            phase: "writing",
            index,
            total,
            name: &p.name,
            bytes: done,
            total_bytes: bytes_written,
            elapsed: start.elapsed(),
        });
        Ok(())
    })?;
    write_json(&dir.join("config.json"), &c.config_json(opts.float))?;
    write_tokenizer_files(&dir, c)?;
    let card = format!(
        "# Synthetic BitNet b1.58 checkpoint\n\nRandom weights (seed {}), for tests and benchmarks \
         only: it generates gibberish. Shape: hidden {}, {} layers, {} heads ({} KV), intermediate \
         {}, vocab {}. {}\n\nWritten by `cargo xtask synth` (bitnet-convert {}).\n",
        opts.seed,
        c.hidden,
        c.layers,
        c.heads,
        c.kv_heads,
        c.intermediate,
        c.vocab,
        if opts.float {
            "BF16 master weights (quantization_mode online)."
        } else {
            "Packed ternary linears (quantization_mode offline)."
        },
        env!("CARGO_PKG_VERSION")
    );
    std::fs::write(dir.join("README.md"), card).map_err(|source| ConvertError::Io {
        path: dir.join("README.md"),
        source,
    })?;
    out.commit()?;
    Ok(SynthReport {
        output: opts.output.clone(),
        files,
        tensors: total,
        parameters,
        bytes_written,
        seconds: start.elapsed().as_secs_f64(),
    })
}

const CHUNK: usize = 1 << 20;

fn write_normal(w: &mut StWriter, p: &PlannedTensor, rng: &mut SplitMix64, std: f32) -> Result<()> {
    let n: usize = p.shape.iter().product();
    let mut buf = Vec::with_capacity(CHUNK * 2);
    let mut left = n;
    while left > 0 {
        let len = left.min(CHUNK);
        buf.clear();
        for _ in 0..len {
            buf.extend_from_slice(&bf16::from_f32(rng.next_normal() * std).to_le_bytes());
        }
        w.write(&p.name, &buf)?;
        left -= len;
    }
    Ok(())
}

/// Random packed bytes: four codes 0/1/2 (−1/0/+1), each from 8 random bits.
fn write_codes(w: &mut StWriter, p: &PlannedTensor, rng: &mut SplitMix64) -> Result<()> {
    let n: usize = p.shape.iter().product();
    let mut buf = Vec::with_capacity(CHUNK);
    let mut left = n;
    let code = |b: u64| (((b & 0xFF) * 3) >> 8) as u8;
    while left > 0 {
        let len = left.min(CHUNK);
        buf.clear();
        while buf.len() < len {
            let r = rng.next_u64();
            for half in [r, r >> 32] {
                if buf.len() < len {
                    buf.push(
                        code(half)
                            | (code(half >> 8) << 2)
                            | (code(half >> 16) << 4)
                            | (code(half >> 24) << 6),
                    );
                }
            }
        }
        w.write(&p.name, &buf)?;
        left -= len;
    }
    Ok(())
}

/// GPT-2's byte → printable character table of byte-level BPE.
pub fn byte_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable = (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('?')
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('?')
        };
    }
    table
}

/// The special tokens of a vocabulary of this shape: `(id, content)`.
pub fn special_tokens(c: &SynthConfig) -> Vec<(usize, String)> {
    let mut reserved = 0;
    (c.bos()..c.vocab)
        .map(|id| {
            let content = match id - c.bos() {
                0 => "<|begin_of_text|>".to_string(),
                1 => "<|end_of_text|>".to_string(),
                9 => "<|eot_id|>".to_string(),
                _ => {
                    reserved += 1;
                    format!("<|reserved_special_token_{}|>", reserved - 1)
                }
            };
            (id, content)
        })
        .collect()
}

/// A byte-level BPE `tokenizer.json` with exactly `vocab` tokens: 256 byte tokens, filler
/// merges of lowercase letters (optionally after a space), and the special tokens on top.
pub fn tokenizer_json(c: &SynthConfig) -> serde_json::Value {
    let bytes = byte_to_unicode();
    let mut vocab = serde_json::Map::new();
    for (i, ch) in bytes.iter().enumerate() {
        vocab.insert(ch.to_string(), json!(i));
    }
    let fillers = c.bos() - 256;
    let letters: Vec<String> = "etaoinshrdlcumwfgypbvkjxqz"
        .chars()
        .map(|ch| ch.to_string())
        .collect();
    let space = bytes[b' ' as usize].to_string();
    let mut merges = Vec::with_capacity(fillers);
    // Level k tokens are level k-1 tokens followed by a letter; level 1 = letters and "Ġ".
    let mut prev: Vec<String> = std::iter::once(space).chain(letters.clone()).collect();
    'outer: while merges.len() < fillers {
        let mut next = Vec::new();
        for a in &prev {
            for b in &letters {
                if merges.len() == fillers {
                    break 'outer;
                }
                let tok = format!("{a}{b}");
                vocab.insert(tok.clone(), json!(256 + merges.len()));
                merges.push(json!([a, b]));
                next.push(tok);
            }
        }
        prev = next;
    }
    let added: Vec<serde_json::Value> = special_tokens(c)
        .into_iter()
        .map(|(id, content)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let bos = "<|begin_of_text|>";
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [c.bos()], "tokens": [bos]}}
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges
        }
    })
}

/// BitNet b1.58 2B-4T's chat template.
pub const CHAT_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}";

fn write_tokenizer_files(dir: &std::path::Path, c: &SynthConfig) -> Result<()> {
    write_json(&dir.join("tokenizer.json"), &tokenizer_json(c))?;
    let mut decoder = serde_json::Map::new();
    for (id, content) in special_tokens(c) {
        decoder.insert(
            id.to_string(),
            json!({"content": content, "lstrip": false, "normalized": false, "rstrip": false,
                   "single_word": false, "special": true}),
        );
    }
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "added_tokens_decoder": decoder,
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|end_of_text|>",
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": false,
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": c.max_positions,
            "tokenizer_class": "PreTrainedTokenizerFast"
        }),
    )?;
    let tok = |s: &str| json!({"content": s, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false});
    write_json(
        &dir.join("special_tokens_map.json"),
        &json!({"bos_token": tok("<|begin_of_text|>"), "eos_token": tok("<|end_of_text|>")}),
    )?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({"_from_model_config": true, "bos_token_id": c.bos(),
                "eos_token_id": [c.eos(), c.eot()], "max_length": c.max_positions}),
    )
}
