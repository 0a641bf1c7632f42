//! [`Config`]: the model hyper-parameters, read from a Hugging Face `config.json`.
//!
//! Two families of ternary checkpoints exist on the Hub and they differ in more than names
//! (REFERENCE.md, "Models a user will bring"):
//!
//! - `model_type: "bitnet"` (microsoft/bitnet-b1.58-2B-4T): ReLU² MLP, the SubLN sub-norms
//!   `attn_sub_norm` / `ffn_sub_norm`, `weight_scale` **multiplied** (`linear_class: autobitlinear`);
//! - `model_type: "llama"` with `quantization_config.quant_method: "bitnet"` (HF1BitLLM, Falcon3
//!   1.58-bit): a plain Llama block with SiLU-gated MLP and no sub-norms, `weight_scale`
//!   **divided** unless `linear_class: autobitlinear`.
//!
//! The config is read as a JSON object and each key is extracted by hand rather than derived, so
//! that an error can name the key and its value. Keys that would change the computation and are
//! not implemented (`rope_scaling`, a non-default `rope_parameters.rope_type`, biases,
//! `use_rms_norm`) are rejected. HF configs also carry many keys that do not affect inference
//! (`initializer_range`, `use_cache`, `transformers_version`, …); those are accepted. A key that
//! is neither (a newer transformers option, a typo) does not stop loading, since rejecting it
//! would break on every transformers release, but it is listed in
//! [`Config::unrecognized_keys`] and the model reports it as a warning.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

pub use bitnet_kernels::ScaleConvention;

/// The architecture family, which decides the MLP activation and the sub-norms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `model_type: "bitnet"`: ReLU² MLP, `attn_sub_norm` before `o_proj` and `ffn_sub_norm`
    /// before `down_proj`.
    BitNet,
    /// `model_type: "llama"` with BitNet quantization: SiLU-gated MLP; sub-norms only if the
    /// checkpoint has them (1bitLLM's `inner_attn_ln` / `ffn_layernorm`).
    Llama,
}

impl Family {
    /// The `hidden_act` this family computes.
    pub fn hidden_act(self) -> &'static str {
        match self {
            Family::BitNet => "relu2",
            Family::Llama => "silu",
        }
    }

    /// The family's `model_type` in `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::BitNet => "bitnet",
            Family::Llama => "llama",
        }
    }
}

/// How the ternary weights are stored on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantizationMode {
    /// Packed U8 `[out/4, in]` plus a `weight_scale` per linear (`quantization_mode: offline`).
    Offline,
    /// Float master weights, quantized to ternary once at load (`quantization_mode: online`,
    /// e.g. microsoft/bitnet-b1.58-2B-4T-bf16).
    Online,
}

/// Model hyper-parameters, validated. Built by [`Config::from_file`] or [`Config::from_json`].
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Architecture family.
    pub family: Family,
    /// How the linear weights are stored.
    pub quantization_mode: QuantizationMode,
    /// How a stored `weight_scale` applies (unused for [`QuantizationMode::Online`], whose scale
    /// is computed at load and always multiplied).
    pub scale_convention: ScaleConvention,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Longest sequence the model was trained for; the RoPE table covers this many positions.
    pub max_position_embeddings: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Whether the LM head reuses `model.embed_tokens.weight` (else `lm_head.weight`).
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token, if given.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token(s); `eos_token_id` may be a number or a list.
    pub eos_token_ids: Vec<u32>,
    /// Keys of the file that this crate neither reads nor knows to be irrelevant to inference:
    /// top-level ones sorted, then `quantization_config.key` ones sorted.
    pub unrecognized_keys: Vec<String>,
}

/// The file name errors show when the config did not come from a file.
const DEFAULT_NAME: &str = "config.json";

impl Config {
    /// Reads and validates `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates the text of a `config.json`; errors name the file `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        Self::parse(text, Path::new(DEFAULT_NAME))
    }

    fn parse(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let Value::Object(obj) = value else {
            return Err(Error::config(
                path,
                "(top level)",
                short(&value),
                "config.json must be a JSON object",
            ));
        };
        Keys {
            obj: &obj,
            path,
            prefix: "",
        }
        .build()
    }

    /// Query heads per key/value head.
    pub fn num_key_value_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// The warning a loader shows for [`Config::unrecognized_keys`], if there are any.
    pub fn unrecognized_keys_warning(&self) -> Option<String> {
        (!self.unrecognized_keys.is_empty()).then(|| {
            format!(
                "config.json has key(s) this implementation does not know: {}; if one of them \
                 changes the computation, outputs will differ from transformers",
                self.unrecognized_keys.join(", ")
            )
        })
    }
}

/// Top-level keys that are read, or that transformers writes and that do not change inference.
const KNOWN_KEYS: &[&str] = &[
    // read by `Keys::build`
    "model_type",
    "quantization_config",
    "hidden_act",
    "rope_scaling",
    "rope_parameters",
    "rope_theta",
    "attention_bias",
    "mlp_bias",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "intermediate_size",
    "num_hidden_layers",
    "vocab_size",
    "max_position_embeddings",
    "tie_word_embeddings",
    "architectures",
    "weight_bits",
    // training, bookkeeping and PretrainedConfig defaults
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "auto_map",
    "initializer_range",
    "use_cache",
    "pad_token_id",
    "attention_dropout",
    "pretraining_tp",
    "input_bits",
    "id2label",
    "label2id",
    "is_encoder_decoder",
    "chunk_size_feed_forward",
    "output_attentions",
    "output_hidden_states",
    "problem_type",
    "return_dict",
];

/// `quantization_config` keys of transformers' `BitNetQuantConfig`.
const KNOWN_QUANT_KEYS: &[&str] = &[
    "quant_method",
    "linear_class",
    "quantization_mode",
    "use_rms_norm",
    "rms_norm_eps",
    "modules_to_not_convert",
];

/// Typed access to the keys of one JSON object, producing errors that name the key.
struct Keys<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
    /// `"quantization_config."` for nested keys, so errors show the full key.
    prefix: &'static str,
}

impl Keys<'_> {
    fn err(&self, key: &str, value: impl std::fmt::Display, reason: impl Into<String>) -> Error {
        Error::config(self.path, format!("{}{key}", self.prefix), value, reason)
    }

    /// The key's value, treating JSON `null` as absent (HF writes `"rope_scaling": null`).
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.err(key, short(v), "expected a non-negative integer")),
        }
    }

    fn positive(&self, key: &str) -> Result<usize> {
        match self.usize(key)? {
            None => Err(self.err(key, "(missing)", "required key is absent")),
            Some(0) => Err(self.err(key, 0, "must be at least 1")),
            Some(n) => Ok(n),
        }
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| self.err(key, short(v), "expected a finite number")),
        }
    }

    fn f64(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.f64_opt(key)?.unwrap_or(default))
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, short(v), "expected true or false")),
        }
    }

    fn str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(key, short(v), "expected a string")),
        }
    }

    /// A token id or a list of them (`eos_token_id` is either).
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        let bad = |v: &Value| self.err(key, short(v), "expected a token id or a list of them");
        let one = |v: &Value| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad(v))
        };
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(one).collect(),
            Some(v) => Ok(vec![one(v)?]),
        }
    }

    fn build(&self) -> Result<Config> {
        let model_type = self.str("model_type")?;
        let quant = match self.get("quantization_config") {
            None => None,
            Some(Value::Object(q)) => Some(Keys {
                obj: q,
                path: self.path,
                prefix: "quantization_config.",
            }),
            Some(v) => {
                return Err(self.err("quantization_config", short(v), "expected an object"));
            }
        };
        let family =
            match model_type {
                Some("bitnet") => Family::BitNet,
                Some("llama") => Family::Llama,
                Some(other) => return Err(self.err(
                    "model_type",
                    format!("{other:?}"),
                    "unsupported model type; expected \"bitnet\" (microsoft/bitnet-b1.58-2B-4T) \
                     or \"llama\" with quantization_config.quant_method \"bitnet\"",
                )),
                None => {
                    return Err(self.err(
                        "model_type",
                        "(missing)",
                        "required key is absent; expected \"bitnet\" or \"llama\"",
                    ))
                }
            };

        let (quantization_mode, scale_convention) =
            match &quant {
                Some(q) => q.quantization()?,
                // Float master weights without a quantization_config: the BitNet architecture
                // always quantizes, so treat it as online.
                None if family == Family::BitNet => {
                    (QuantizationMode::Online, ScaleConvention::Multiply)
                }
                // 1bitLLM/bitnet_b1_58-* (remote code): Llama model_type, F16 latent weights,
                // recognizable only by its architecture name.
                None if self.is_1bitllm() => (QuantizationMode::Online, ScaleConvention::Multiply),
                None => return Err(self.err(
                    "quantization_config",
                    "(missing)",
                    "a \"llama\" config without quantization_config.quant_method \"bitnet\" is a \
                     plain (non-ternary) Llama checkpoint, which this crate does not run",
                )),
            };

        let act = self.str("hidden_act")?.unwrap_or(family.hidden_act());
        if act != family.hidden_act() {
            return Err(self.err(
                "hidden_act",
                format!("{act:?}"),
                format!(
                    "model_type {:?} uses {:?}; a different activation is not supported",
                    family.model_type(),
                    family.hidden_act()
                ),
            ));
        }
        if let Some(v) = self.get("rope_scaling") {
            return Err(self.err(
                "rope_scaling",
                short(v),
                "RoPE scaling is not supported (only plain RoPE with rope_theta); \
                 remove the key or set it to null if the checkpoint does not need it",
            ));
        }
        for key in ["attention_bias", "mlp_bias"] {
            if self.bool(key, false)? {
                return Err(self.err(key, true, "linear biases are not supported"));
            }
        }

        let hidden_size = self.positive("hidden_size")?;
        let num_attention_heads = self.positive("num_attention_heads")?;
        let num_key_value_heads = match self.usize("num_key_value_heads")? {
            None => num_attention_heads,
            Some(0) => return Err(self.err("num_key_value_heads", 0, "must be at least 1")),
            Some(n) => n,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(self.err(
                "num_key_value_heads",
                num_key_value_heads,
                format!(
                    "must divide num_attention_heads ({num_attention_heads}) for grouped-query \
                     attention"
                ),
            ));
        }
        let head_dim = match self.usize("head_dim")? {
            Some(d) => {
                if d * num_attention_heads != hidden_size {
                    return Err(self.err(
                        "head_dim",
                        d,
                        format!(
                            "head_dim × num_attention_heads ({num_attention_heads}) must equal \
                             hidden_size ({hidden_size})"
                        ),
                    ));
                }
                d
            }
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(self.err(
                        "num_attention_heads",
                        num_attention_heads,
                        format!("must divide hidden_size ({hidden_size}) to give the head_dim"),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(self.err(
                "head_dim",
                head_dim,
                "must be even: rotary embeddings rotate pairs of features",
            ));
        }

        let rms_norm_eps = self.f64("rms_norm_eps", 1e-5)?;
        if rms_norm_eps <= 0.0 {
            return Err(self.err("rms_norm_eps", rms_norm_eps, "must be positive"));
        }
        let rope_theta = self.rope_theta()?;
        if rope_theta <= 1.0 {
            return Err(self.err("rope_theta", rope_theta, "must be greater than 1"));
        }
        let bos = self.token_ids("bos_token_id")?;
        if bos.len() > 1 {
            return Err(self.err("bos_token_id", format!("{bos:?}"), "expected one token id"));
        }
        Ok(Config {
            family,
            quantization_mode,
            scale_convention,
            hidden_size,
            intermediate_size: self.positive("intermediate_size")?,
            num_hidden_layers: self.positive("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: self.positive("vocab_size")?,
            max_position_embeddings: self.positive("max_position_embeddings")?,
            rms_norm_eps,
            rope_theta,
            // transformers' own default is false; the 2B-4T config says true. Always read it.
            tie_word_embeddings: self.bool("tie_word_embeddings", false)?,
            bos_token_id: bos.first().copied(),
            eos_token_ids: self.token_ids("eos_token_id")?,
            unrecognized_keys: self.unrecognized(),
        })
    }

    /// The RoPE base: transformers 5 writes `rope_parameters: {rope_type, rope_theta}` (and no
    /// top-level `rope_theta`); older configs, the 2B-4T one among them, the top-level key.
    fn rope_theta(&self) -> Result<f64> {
        let top = self.f64_opt("rope_theta")?;
        let nested = match self.get("rope_parameters") {
            None => None,
            Some(Value::Object(p)) => {
                let keys = Keys {
                    obj: p,
                    path: self.path,
                    prefix: "rope_parameters.",
                };
                let kind = keys.str("rope_type")?.unwrap_or("default");
                if kind != "default" {
                    return Err(keys.err(
                        "rope_type",
                        format!("{kind:?}"),
                        "only \"default\" RoPE (no scaling) is supported",
                    ));
                }
                if let Some((k, v)) = p.iter().find(|(k, v)| {
                    !v.is_null() && !matches!(k.as_str(), "rope_type" | "rope_theta")
                }) {
                    return Err(keys.err(
                        k,
                        short(v),
                        "not supported: default RoPE takes only rope_theta",
                    ));
                }
                keys.f64_opt("rope_theta")?
            }
            Some(v) => return Err(self.err("rope_parameters", short(v), "expected an object")),
        };
        match (top, nested) {
            (Some(a), Some(b)) if a != b => Err(self.err(
                "rope_theta",
                a,
                format!("contradicts rope_parameters.rope_theta ({b}); keep one of them"),
            )),
            (Some(theta), _) | (None, Some(theta)) => Ok(theta),
            (None, None) => Ok(10_000.0),
        }
    }

    /// Keys outside [`KNOWN_KEYS`], and `quantization_config` keys outside [`KNOWN_QUANT_KEYS`].
    fn unrecognized(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .obj
            .keys()
            .filter(|k| !KNOWN_KEYS.contains(&k.as_str()))
            .cloned()
            .collect();
        if let Some(Value::Object(q)) = self.get("quantization_config") {
            keys.extend(
                q.keys()
                    .filter(|k| !KNOWN_QUANT_KEYS.contains(&k.as_str()))
                    .map(|k| format!("quantization_config.{k}")),
            );
        }
        keys
    }

    /// True for the 1bitLLM remote-code checkpoints: `architectures: ["BitnetForCausalLM"]`
    /// (their config also carries `weight_bits`, which no plain Llama has).
    fn is_1bitllm(&self) -> bool {
        let arch = match self.get("architectures") {
            Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some("BitnetForCausalLM")),
            _ => false,
        };
        arch || self.get("weight_bits").is_some()
    }

    /// Reads `quantization_config` (self is that object).
    fn quantization(&self) -> Result<(QuantizationMode, ScaleConvention)> {
        match self.str("quant_method")? {
            Some("bitnet") => {}
            Some(other) => {
                return Err(self.err(
                    "quant_method",
                    format!("{other:?}"),
                    "only \"bitnet\" (ternary) quantization is supported",
                ))
            }
            None => return Err(self.err("quant_method", "(missing)", "expected \"bitnet\"")),
        }
        // transformers' BitNetQuantConfig defaults: linear_class "bitlinear", mode "offline".
        let convention = match self.str("linear_class")?.unwrap_or("bitlinear") {
            "autobitlinear" => ScaleConvention::Multiply,
            "bitlinear" => ScaleConvention::Divide,
            other => {
                return Err(self.err(
                    "linear_class",
                    format!("{other:?}"),
                    "expected \"autobitlinear\" (weight_scale multiplies) or \"bitlinear\" \
                     (weight_scale divides)",
                ))
            }
        };
        let mode = match self.str("quantization_mode")?.unwrap_or("offline") {
            "offline" => QuantizationMode::Offline,
            "online" if convention == ScaleConvention::Multiply => QuantizationMode::Online,
            "online" => {
                return Err(self.err(
                    "quantization_mode",
                    "\"online\"",
                    "online quantization needs linear_class \"autobitlinear\" \
                     (transformers' legacy BitLinear only holds packed weights)",
                ))
            }
            other => {
                return Err(self.err(
                    "quantization_mode",
                    format!("{other:?}"),
                    "expected \"offline\" (packed U8 weights + weight_scale) or \"online\" \
                     (float weights quantized at load)",
                ))
            }
        };
        if self.bool("use_rms_norm", false)? {
            return Err(self.err(
                "use_rms_norm",
                true,
                "an RMSNorm inside every BitLinear is not supported",
            ));
        }
        if let Some(v) = self.get("modules_to_not_convert") {
            let only_head = v
                .as_array()
                .is_some_and(|a| a.iter().all(|m| m.as_str() == Some("lm_head")));
            if !only_head {
                return Err(self.err(
                    "modules_to_not_convert",
                    short(v),
                    "only lm_head may stay in floating point; other unquantized linears are \
                     not supported",
                ));
            }
        }
        Ok((mode, convention))
    }
}

/// A JSON value for an error message, cut to a readable length.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s
    }
}

/// The `config.json` path of a model directory.
pub(crate) fn config_path(dir: &Path) -> PathBuf {
    dir.join(DEFAULT_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// microsoft/bitnet-b1.58-2B-4T's config.json (abridged only by key order).
    pub(crate) const BITNET_2B4T: &str = r#"{
      "architectures": ["BitNetForCausalLM"],
      "attention_bias": false, "attention_dropout": 0.0,
      "auto_map": {"AutoConfig": "configuration_bitnet.BitNetConfig"},
      "bos_token_id": 128000, "eos_token_id": 128001,
      "hidden_act": "relu2", "hidden_size": 2560, "initializer_range": 0.02,
      "intermediate_size": 6912, "max_position_embeddings": 4096,
      "model_type": "bitnet", "rms_norm_eps": 1e-05,
      "num_attention_heads": 20, "num_hidden_layers": 30, "num_key_value_heads": 5,
      "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
      "use_cache": true, "vocab_size": 128256,
      "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                              "quantization_mode": "offline"}
    }"#;

    const LLAMA_158: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
      "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
      "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256,
      "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
      "rope_scaling": null, "tie_word_embeddings": false, "eos_token_id": [128001, 128009],
      "quantization_config": {"modules_to_not_convert": null, "quant_method": "bitnet"}
    }"#;

    fn edit(base: &str, f: impl FnOnce(&mut Map<String, Value>)) -> String {
        let mut v: Value = serde_json::from_str(base).unwrap();
        f(v.as_object_mut().unwrap());
        v.to_string()
    }

    fn err_of(text: &str) -> String {
        Config::from_json(text).unwrap_err().to_string()
    }

    #[test]
    fn bitnet_2b4t() {
        let c = Config::from_json(BITNET_2B4T).unwrap();
        assert_eq!(c.family, Family::BitNet);
        assert_eq!(c.quantization_mode, QuantizationMode::Offline);
        assert_eq!(c.scale_convention, ScaleConvention::Multiply);
        assert_eq!((c.head_dim, c.num_key_value_groups()), (128, 4));
        assert!(c.tie_word_embeddings);
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(
            (c.bos_token_id, c.eos_token_ids.clone()),
            (Some(128000), vec![128001])
        );
        assert_eq!(c.max_position_embeddings, 4096);
    }

    #[test]
    fn bitnet_online_and_without_quantization_config() {
        let online = edit(BITNET_2B4T, |o| {
            o["quantization_config"]["quantization_mode"] = "online".into();
        });
        let c = Config::from_json(&online).unwrap();
        assert_eq!(c.quantization_mode, QuantizationMode::Online);
        let plain = edit(BITNET_2B4T, |o| {
            o.remove("quantization_config");
        });
        assert_eq!(
            Config::from_json(&plain).unwrap().quantization_mode,
            QuantizationMode::Online
        );
    }

    #[test]
    fn llama_family() {
        let c = Config::from_json(LLAMA_158).unwrap();
        assert_eq!(c.family, Family::Llama);
        assert_eq!(c.quantization_mode, QuantizationMode::Offline);
        assert_eq!(c.scale_convention, ScaleConvention::Divide);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![128001, 128009]);
        let auto = edit(LLAMA_158, |o| {
            o["quantization_config"]["linear_class"] = "autobitlinear".into();
        });
        assert_eq!(
            Config::from_json(&auto).unwrap().scale_convention,
            ScaleConvention::Multiply
        );
        // tie_word_embeddings absent: transformers' default (false).
        let untied = edit(BITNET_2B4T, |o| {
            o.remove("tie_word_embeddings");
        });
        assert!(!Config::from_json(&untied).unwrap().tie_word_embeddings);
    }

    #[test]
    fn onebitllm_remote_code_config_is_online_llama() {
        let c = edit(LLAMA_158, |o| {
            o.remove("quantization_config");
            o["architectures"] = serde_json::json!(["BitnetForCausalLM"]);
        });
        let c = Config::from_json(&c).unwrap();
        assert_eq!(
            (c.family, c.quantization_mode),
            (Family::Llama, QuantizationMode::Online)
        );
    }

    #[test]
    fn unknown_keys_load_and_are_listed() {
        assert_eq!(
            Config::from_json(BITNET_2B4T)
                .unwrap()
                .unrecognized_keys_warning(),
            None
        );
        let extra = edit(BITNET_2B4T, |o| {
            o.insert("some_future_key".into(), serde_json::json!({"a": [1, 2]}));
            o["quantization_config"]["new_option"] = 1.into();
        });
        let c = Config::from_json(&extra).unwrap();
        assert_eq!(
            c.unrecognized_keys,
            ["some_future_key", "quantization_config.new_option"]
        );
        let warning = c.unrecognized_keys_warning().unwrap();
        assert!(warning.contains("some_future_key, quantization_config.new_option"));
    }

    /// What transformers 5 `save_pretrained` writes instead of a top-level `rope_theta`.
    #[test]
    fn rope_parameters() {
        let v5 = edit(BITNET_2B4T, |o| {
            o.remove("rope_theta");
            o.insert(
                "rope_parameters".into(),
                serde_json::json!({"rope_theta": 250000.0, "rope_type": "default"}),
            );
        });
        assert_eq!(Config::from_json(&v5).unwrap().rope_theta, 250000.0);
        let both = edit(&v5, |o| {
            o.insert("rope_theta".into(), 250000.0.into());
        });
        assert_eq!(Config::from_json(&both).unwrap().rope_theta, 250000.0);

        let cases: Vec<(String, &[&str])> = vec![
            (
                edit(&v5, |o| {
                    o.insert("rope_theta".into(), 10000.0.into());
                }),
                &[
                    "`rope_theta`",
                    "contradicts rope_parameters.rope_theta (250000)",
                ],
            ),
            (
                edit(&v5, |o| o["rope_parameters"]["rope_type"] = "llama3".into()),
                &["`rope_parameters.rope_type`", "\"llama3\""],
            ),
            (
                edit(&v5, |o| o["rope_parameters"]["factor"] = 8.0.into()),
                &["`rope_parameters.factor`", "8.0"],
            ),
            (
                edit(&v5, |o| o["rope_parameters"] = 3.into()),
                &["`rope_parameters`", "expected an object"],
            ),
        ];
        for (text, needles) in cases {
            let e = err_of(&text);
            for n in needles {
                assert!(e.contains(n), "{e:?} lacks {n:?}");
            }
        }
    }

    #[test]
    fn errors_name_key_and_value() {
        let cases: Vec<(String, &[&str])> = vec![
            (
                edit(BITNET_2B4T, |o| o["model_type"] = "mistral".into()),
                &["`model_type`", "\"mistral\""],
            ),
            (
                edit(BITNET_2B4T, |o| o["hidden_act"] = "silu".into()),
                &["`hidden_act`", "\"silu\"", "relu2"],
            ),
            (
                edit(LLAMA_158, |o| o["hidden_act"] = "relu2".into()),
                &["`hidden_act`", "\"relu2\"", "silu"],
            ),
            (
                edit(LLAMA_158, |o| {
                    o["quantization_config"]["quant_method"] = "gptq".into()
                }),
                &["`quantization_config.quant_method`", "\"gptq\""],
            ),
            (
                edit(BITNET_2B4T, |o| {
                    o["quantization_config"]["linear_class"] = "fancy".into()
                }),
                &["`quantization_config.linear_class`", "\"fancy\""],
            ),
            (
                edit(BITNET_2B4T, |o| {
                    o["quantization_config"]["quantization_mode"] = "lazy".into()
                }),
                &["`quantization_config.quantization_mode`", "\"lazy\""],
            ),
            (
                edit(BITNET_2B4T, |o| {
                    o.insert(
                        "rope_scaling".into(),
                        serde_json::json!({"rope_type": "llama3", "factor": 8.0}),
                    );
                }),
                &["`rope_scaling`", "llama3", "not supported"],
            ),
            (
                edit(BITNET_2B4T, |o| o["num_attention_heads"] = 15.into()),
                &["`num_attention_heads` = 15", "2560"],
            ),
            (
                edit(BITNET_2B4T, |o| {
                    o.insert("head_dim".into(), 100.into());
                }),
                &["`head_dim` = 100"],
            ),
            (
                edit(BITNET_2B4T, |o| o["num_key_value_heads"] = 3.into()),
                &["`num_key_value_heads` = 3", "20"],
            ),
            (
                edit(LLAMA_158, |o| {
                    o.remove("quantization_config");
                }),
                &["`quantization_config`", "plain"],
            ),
            (
                edit(BITNET_2B4T, |o| o["hidden_size"] = "2560".into()),
                &["`hidden_size` = \"2560\"", "integer"],
            ),
            (
                edit(BITNET_2B4T, |o| {
                    o.remove("vocab_size");
                }),
                &["`vocab_size`", "missing"],
            ),
        ];
        for (text, needles) in cases {
            let msg = err_of(&text);
            assert!(msg.starts_with("config.json: "), "{msg}");
            for n in needles {
                assert!(msg.contains(n), "{msg:?} should contain {n:?}");
            }
        }
        assert!(err_of("{not json").starts_with("config.json: not a valid config"));
    }
}
