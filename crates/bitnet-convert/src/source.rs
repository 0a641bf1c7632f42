//! Opening a Hugging Face checkpoint directory: config, single-file or sharded safetensors,
//! model family, and which tensors are the ternary linears.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{ConvertError, Result};
use crate::st::{self, StFile, TensorInfo};
use crate::util::{natural_key, read_json};

/// The projections quantized to ternary, as `(module, projection)`.
pub const LINEARS: [(&str, &str); 7] = [
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
];

/// Model family, from `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `model_type: bitnet` (microsoft/bitnet-b1.58-2B-4T layout; sub-norms, relu²).
    BitNet,
    /// `model_type: llama` with ternary-trained weights (1bitLLM, HF1BitLLM, Falcon3 1.58-bit).
    Llama,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::BitNet => "bitnet",
            Family::Llama => "llama",
        })
    }
}

/// Whether `name` is the weight of one of the decoder layers' ternary linears
/// (`model.layers.N.{self_attn,mlp}.X_proj.weight`).
pub fn is_linear_weight(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return false;
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return false;
    };
    layer.parse::<usize>().is_ok()
        && LINEARS
            .iter()
            .any(|(m, p)| rest == format!("{m}.{p}.weight"))
}

/// Tensors a converter drops: rotary `inv_freq` buffers some old checkpoints saved.
pub fn is_ignored(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

/// One tensor of a checkpoint: where it lives and its header entry.
#[derive(Debug, Clone)]
pub struct SourceTensor {
    pub file: usize,
    pub info: TensorInfo,
}

/// An opened checkpoint directory.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub config: serde_json::Value,
    pub files: Vec<StFile>,
    /// All tensors, in natural order (embedding, layers by number, the rest).
    pub tensors: Vec<SourceTensor>,
    by_name: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens `dir`: reads `config.json` and every safetensors header, checking that the index
    /// (if any) and the files agree. Reads no tensor data.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ConvertError::NotADirectory(dir.to_path_buf()));
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(ConvertError::MissingConfig(dir.to_path_buf()));
        }
        let config = read_json(&config_path)?;
        if !config.is_object() {
            return Err(ConvertError::Json {
                path: config_path,
                msg: "config.json is not a JSON object".into(),
            });
        }
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut files = Vec::new();
        let mut tensors = Vec::new();
        let mut by_name = HashMap::new();
        if index_path.is_file() {
            let index = read_json(&index_path)?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ConvertError::Json {
                    path: index_path.clone(),
                    msg: "no \"weight_map\" object".into(),
                })?;
            let mut file_ids: HashMap<String, usize> = HashMap::new();
            let mut wanted: Vec<(String, String)> = Vec::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| ConvertError::Json {
                    path: index_path.clone(),
                    msg: format!("weight_map entry {name} is not a file name"),
                })?;
                if !file_ids.contains_key(file) {
                    let path = dir.join(file);
                    if !path.is_file() {
                        return Err(ConvertError::MissingTensor {
                            where_: index_path.display().to_string(),
                            name: name.clone(),
                            hint: format!(
                                ": the index maps it to {file}, which does not exist (incomplete download?)"
                            ),
                        });
                    }
                    file_ids.insert(file.to_string(), files.len());
                    files.push(StFile::open(&path)?);
                }
                wanted.push((name.clone(), file.to_string()));
            }
            for (name, file) in wanted {
                let id = file_ids[&file];
                let info = files[id].get(&name).cloned().ok_or_else(|| {
                    ConvertError::MissingTensor {
                        where_: index_path.display().to_string(),
                        name: name.clone(),
                        hint: format!(
                            ": the index maps it to {file}, which does not contain it (mismatched or incomplete download?)"
                        ),
                    }
                })?;
                by_name.insert(name, tensors.len());
                tensors.push(SourceTensor { file: id, info });
            }
        } else if single.is_file() {
            let f = StFile::open(&single)?;
            for info in &f.tensors {
                by_name.insert(info.name.clone(), tensors.len());
                tensors.push(SourceTensor {
                    file: 0,
                    info: info.clone(),
                });
            }
            files.push(f);
        } else {
            let hint = if dir.join("pytorch_model.bin").exists()
                || dir.join("pytorch_model.bin.index.json").exists()
            {
                "; only safetensors checkpoints are supported: convert the PyTorch .bin files with \
                 transformers (model.save_pretrained(dir, safe_serialization=True)) first"
            } else {
                ""
            };
            return Err(ConvertError::MissingWeights {
                dir: dir.to_path_buf(),
                hint: hint.to_string(),
            });
        }
        tensors.sort_by_cached_key(|t| natural_key(&t.info.name));
        by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.info.name.clone(), i))
            .collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            config_path,
            config,
            files,
            tensors,
            by_name,
        })
    }

    pub fn get(&self, name: &str) -> Option<&SourceTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    pub fn file_of(&self, t: &SourceTensor) -> &StFile {
        &self.files[t.file]
    }

    /// Reads all of a float tensor as f32.
    pub fn read_f32(&self, t: &SourceTensor) -> Result<Vec<f32>> {
        self.file_of(t).read_all_f32(&t.info)
    }

    pub fn model_type(&self) -> Option<&str> {
        self.config.get("model_type").and_then(|v| v.as_str())
    }

    /// `config.json`'s `quantization_config.<key>` as a string.
    pub fn quant_str(&self, key: &str) -> Option<&str> {
        self.config
            .get("quantization_config")
            .and_then(|q| q.get(key))
            .and_then(|v| v.as_str())
    }

    pub fn family(&self) -> Result<Family> {
        match self.model_type() {
            Some("bitnet") => Ok(Family::BitNet),
            Some("llama") => Ok(Family::Llama),
            other => Err(ConvertError::UnknownModelType {
                path: self.config_path.clone(),
                model_type: other.unwrap_or("<missing>").to_string(),
            }),
        }
    }

    pub fn config_usize(&self, key: &str) -> Result<usize> {
        self.config
            .get(key)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| ConvertError::Json {
                path: self.config_path.clone(),
                msg: format!("missing or non-integer \"{key}\""),
            })
    }

    /// Why this checkpoint looks packed already, if it does.
    pub fn packed_reason(&self) -> Option<String> {
        for t in &self.tensors {
            if is_linear_weight(&t.info.name) && t.info.dtype == "U8" {
                return Some(format!("tensor {} is U8 {:?}", t.info.name, t.info.shape));
            }
            if t.info.name.ends_with(".weight_scale") {
                return Some(format!("it has the scale tensor {}", t.info.name));
            }
        }
        if self.quant_str("quantization_mode") == Some("offline") {
            return Some(format!(
                "{} says quantization_mode \"offline\"",
                self.config_path.display()
            ));
        }
        None
    }

    /// Whether a `llama` checkpoint shows signs of ternary training.
    pub fn looks_ternary_llama(&self) -> bool {
        let bitnet_quant = self.quant_str("quant_method") == Some("bitnet");
        let bitnet_arch = self
            .config
            .get("architectures")
            .and_then(|a| a.as_array())
            .is_some_and(|a| {
                a.iter().any(|s| {
                    s.as_str()
                        .is_some_and(|s| s.to_lowercase().contains("bitnet"))
                })
            });
        let sub_norms = self.tensors.iter().any(|t| {
            t.info.name.contains("inner_attn_ln") || t.info.name.contains("ffn_layernorm")
        });
        bitnet_quant || bitnet_arch || sub_norms || self.config.get("weight_bits").is_some()
    }

    /// Checks that this is a full-precision checkpoint the converter can handle: known family,
    /// not packed, float tensors, every layer's seven linears present with `out % 4 == 0`.
    pub fn validate_full_precision(&self, allow_plain_llama: bool) -> Result<Family> {
        let family = self.family()?;
        if let Some(reason) = self.packed_reason() {
            return Err(ConvertError::AlreadyPacked { reason });
        }
        if family == Family::Llama && !allow_plain_llama && !self.looks_ternary_llama() {
            return Err(ConvertError::PlainLlama {
                path: self.config_path.clone(),
            });
        }
        for t in &self.tensors {
            if is_ignored(&t.info.name) {
                continue;
            }
            if !st::is_float(&t.info.dtype) {
                return Err(ConvertError::NonFloat {
                    path: self.file_of(t).path.clone(),
                    name: t.info.name.clone(),
                    dtype: t.info.dtype.clone(),
                });
            }
            if is_linear_weight(&t.info.name) {
                let shape = &t.info.shape;
                let msg = if shape.len() != 2 {
                    Some("a linear weight must be 2-D [out, in]".to_string())
                } else if shape[0] % 4 != 0 {
                    Some(format!(
                        "out = {} is not a multiple of 4, which the packed [out/4, in] format requires; \
                         this model cannot be packed",
                        shape[0]
                    ))
                } else {
                    None
                };
                if let Some(msg) = msg {
                    return Err(ConvertError::BadShape {
                        path: self.file_of(t).path.clone(),
                        name: t.info.name.clone(),
                        shape: shape.clone(),
                        msg,
                    });
                }
            }
        }
        let layers = self.config_usize("num_hidden_layers")?;
        for l in 0..layers {
            for (m, p) in LINEARS {
                let name = format!("model.layers.{l}.{m}.{p}.weight");
                if self.get(&name).is_none() {
                    return Err(ConvertError::MissingTensor {
                        where_: self.dir.display().to_string(),
                        name,
                        hint: format!(
                            " (config.json says num_hidden_layers = {layers}); the checkpoint is incomplete"
                        ),
                    });
                }
            }
        }
        if self.get("model.embed_tokens.weight").is_none() {
            return Err(ConvertError::MissingTensor {
                where_: self.dir.display().to_string(),
                name: "model.embed_tokens.weight".into(),
                hint: "; the checkpoint is incomplete".into(),
            });
        }
        Ok(family)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_names() {
        assert!(is_linear_weight("model.layers.0.self_attn.q_proj.weight"));
        assert!(is_linear_weight("model.layers.29.mlp.down_proj.weight"));
        assert!(!is_linear_weight(
            "model.layers.0.mlp.down_proj.weight_scale"
        ));
        assert!(!is_linear_weight("model.layers.0.mlp.ffn_sub_norm.weight"));
        assert!(!is_linear_weight("model.layers.x.mlp.up_proj.weight"));
        assert!(!is_linear_weight("lm_head.weight"));
        assert!(!is_linear_weight("model.layers.0.self_attn.q_proj.bias"));
    }
}
