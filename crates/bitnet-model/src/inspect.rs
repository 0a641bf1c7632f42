//! [`inspect`]: a summary of a model directory without building the model (`bitnet inspect`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::config::{config_path, Config, Family, QuantizationMode, ScaleConvention};
use crate::error::Result;
use crate::weights::Weights;

/// Tensors of one kind: the same name with the layer index replaced by `*`, dtype and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorGroup {
    /// Name pattern, e.g. `model.layers.*.mlp.up_proj.weight`.
    pub kind: String,
    /// Dtype on disk, e.g. `U8`.
    pub dtype: String,
    /// Shape on disk.
    pub shape: Vec<usize>,
    /// How many tensors share this kind, dtype and shape.
    pub count: usize,
}

/// What [`inspect`] found.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// The model directory.
    pub dir: PathBuf,
    /// The parsed config (family, quantization mode, scale convention, sizes).
    pub config: Config,
    /// Weight files and their sizes in bytes.
    pub files: Vec<(PathBuf, u64)>,
    /// Tensors grouped by kind, in name order.
    pub tensor_groups: Vec<TensorGroup>,
    /// Logical parameter count: a packed U8 byte holds four ternary weights.
    pub parameters: u64,
    /// Tensor bytes on disk per dtype.
    pub bytes_by_dtype: BTreeMap<String, u64>,
    /// Problems found (missing or all-zero tensors, format disagreeing with the config).
    pub warnings: Vec<String>,
}

/// Reads `dir/config.json` and the headers of its weights, and checks the ternary tensors.
pub fn inspect(dir: &Path) -> Result<ModelInfo> {
    let config = Config::from_file(&config_path(dir))?;
    let weights = Weights::open(dir)?;
    let mut groups: Vec<TensorGroup> = Vec::new();
    let mut bytes_by_dtype = BTreeMap::new();
    let mut parameters = 0u64;
    let mut warnings: Vec<String> = config.unrecognized_keys_warning().into_iter().collect();
    for t in weights.tensors() {
        if t.name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        let dtype = format!("{:?}", t.dtype);
        *bytes_by_dtype.entry(dtype.clone()).or_insert(0) += t.data.len() as u64;
        let per_elem = if t.dtype == Dtype::U8 { 4 } else { 1 };
        parameters += (t.elem_count() * per_elem) as u64;
        let kind = layer_pattern(t.name);
        match groups
            .iter_mut()
            .find(|g| g.kind == kind && g.dtype == dtype && g.shape == t.shape)
        {
            Some(g) => g.count += 1,
            None => groups.push(TensorGroup {
                kind,
                dtype: dtype.clone(),
                shape: t.shape.to_vec(),
                count: 1,
            }),
        }
        if is_linear(t.name) {
            let mode = config.quantization_mode;
            let all_zero = if t.dtype == Dtype::U8 {
                if mode == QuantizationMode::Online {
                    warnings.push(format!("{} is packed but the config says online", t.name));
                }
                t.data.iter().all(|&b| b == 0x55)
            } else {
                if mode == QuantizationMode::Offline {
                    warnings.push(format!("{} is {dtype} but the config says offline", t.name));
                }
                t.data.iter().all(|&b| b == 0)
            };
            if all_zero {
                warnings.push(format!(
                    "{}: every ternary weight is zero (broken checkpoint? re-download a \
                     known-good revision)",
                    t.name
                ));
            }
        }
    }
    for name in required_tensors(&config) {
        if !weights.contains(&name) {
            warnings.push(format!("{name} is missing; the model will not load"));
        }
    }
    let files = weights
        .files()
        .into_iter()
        .map(|p| {
            let len = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            (p.to_path_buf(), len)
        })
        .collect();
    Ok(ModelInfo {
        dir: dir.to_path_buf(),
        config,
        files,
        tensor_groups: groups,
        parameters,
        bytes_by_dtype,
        warnings,
    })
}

/// `model.layers.17.mlp.up_proj.weight` → `model.layers.*.mlp.up_proj.weight`.
fn layer_pattern(name: &str) -> String {
    name.split('.')
        .scan(false, |after_layers, part| {
            let out = if *after_layers && part.bytes().all(|b| b.is_ascii_digit()) {
                "*"
            } else {
                part
            };
            *after_layers = part == "layers";
            Some(out)
        })
        .collect::<Vec<_>>()
        .join(".")
}

const LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

fn is_linear(name: &str) -> bool {
    name.starts_with("model.layers.")
        && LINEARS
            .iter()
            .any(|l| name.ends_with(&format!(".{l}.weight")))
}

/// Names the model needs (scales of packed weights are checked at load).
fn required_tensors(c: &Config) -> Vec<String> {
    let mut names = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".into(),
    ];
    if !c.tie_word_embeddings {
        names.push("lm_head.weight".into());
    }
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        names.push(format!("{p}.input_layernorm.weight"));
        names.push(format!("{p}.post_attention_layernorm.weight"));
        names.extend(LINEARS.iter().map(|l| format!("{p}.{l}.weight")));
        if c.family == Family::BitNet {
            names.push(format!("{p}.self_attn.attn_sub_norm.weight"));
            names.push(format!("{p}.mlp.ffn_sub_norm.weight"));
        }
    }
    names
}

fn gb(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

impl fmt::Display for ModelInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(f, "model:        {}", self.dir.display())?;
        let family = match c.family {
            Family::BitNet => "bitnet (ReLU² MLP, SubLN sub-norms)",
            Family::Llama => "llama (SiLU-gated MLP)",
        };
        writeln!(f, "family:       {family}")?;
        let quant = match (c.quantization_mode, c.scale_convention) {
            (QuantizationMode::Online, _) => {
                "online (float weights, ternarized at load; scale multiplies)"
            }
            (QuantizationMode::Offline, ScaleConvention::Multiply) => {
                "offline (packed U8 + weight_scale, multiplied: autobitlinear)"
            }
            (QuantizationMode::Offline, ScaleConvention::Divide) => {
                "offline (packed U8 + weight_scale, divided: legacy bitlinear)"
            }
        };
        writeln!(f, "quantization: {quant}")?;
        writeln!(
            f,
            "shape:        {} layers, hidden {}, intermediate {}, {} heads ({} kv, head_dim {}), \
             vocab {}, context {}, rope_theta {}",
            c.num_hidden_layers,
            c.hidden_size,
            c.intermediate_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.vocab_size,
            c.max_position_embeddings,
            c.rope_theta
        )?;
        let head = if c.tie_word_embeddings {
            "tied to model.embed_tokens.weight"
        } else {
            "lm_head.weight (untied)"
        };
        writeln!(f, "LM head:      {head}")?;
        let p = self.parameters as f64;
        if p >= 1e9 {
            writeln!(f, "parameters:   {:.2} B", p / 1e9)?;
        } else {
            writeln!(f, "parameters:   {:.2} M", p / 1e6)?;
        }
        let total: u64 = self.files.iter().map(|(_, n)| n).sum();
        let by: Vec<String> = self
            .bytes_by_dtype
            .iter()
            .map(|(d, n)| format!("{d} {}", gb(*n)))
            .collect();
        writeln!(
            f,
            "on disk:      {} in {} file(s): {}",
            gb(total),
            self.files.len(),
            by.join(", ")
        )?;
        writeln!(f, "tensors:")?;
        let width = self
            .tensor_groups
            .iter()
            .map(|g| g.kind.len())
            .max()
            .unwrap_or(0);
        for g in &self.tensor_groups {
            writeln!(
                f,
                "  {:width$}  {:>4} {:?} ×{}",
                g.kind, g.dtype, g.shape, g.count
            )?;
        }
        if self.warnings.is_empty() {
            writeln!(f, "warnings:     none")?;
        } else {
            writeln!(f, "warnings:")?;
            for w in &self.warnings {
                writeln!(f, "  - {w}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert_eq!(
            layer_pattern("model.layers.17.mlp.up_proj.weight"),
            "model.layers.*.mlp.up_proj.weight"
        );
        assert_eq!(layer_pattern("model.norm.weight"), "model.norm.weight");
        assert!(is_linear("model.layers.3.self_attn.o_proj.weight"));
        assert!(!is_linear("model.layers.3.self_attn.o_proj.weight_scale"));
    }
}
