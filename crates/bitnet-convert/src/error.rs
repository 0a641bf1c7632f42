use std::path::PathBuf;

/// Everything that can go wrong converting, checking or synthesizing a checkpoint.
///
/// Every variant names the file or tensor concerned and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// An I/O operation on `path` failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The input directory does not exist or is not a directory.
    #[error(
        "input {0} is not a directory; pass the checkpoint directory (the one holding config.json)"
    )]
    NotADirectory(PathBuf),
    /// No `config.json` in the checkpoint directory.
    #[error("{0}: no config.json; a Hugging Face checkpoint directory needs one (download it with the weights)")]
    MissingConfig(PathBuf),
    /// A JSON file could not be parsed or lacks a required field.
    #[error("{path}: {msg}")]
    Json { path: PathBuf, msg: String },
    /// No weights file in the checkpoint directory.
    #[error("{dir}: no model.safetensors or model.safetensors.index.json{hint}")]
    MissingWeights { dir: PathBuf, hint: String },
    /// A safetensors file is truncated or malformed.
    #[error("{path}: not a valid safetensors file: {reason}; the file is truncated or corrupt, download it again")]
    Corrupt { path: PathBuf, reason: String },
    /// `model_type` is not one this converter knows.
    #[error("{path}: unknown model_type {model_type:?}; supported: \"bitnet\" (BitNet b1.58) and \"llama\" (ternary-trained Llama, e.g. 1bitLLM/bitnet_b1_58-*)")]
    UnknownModelType { path: PathBuf, model_type: String },
    /// The input already holds packed ternary weights.
    #[error("input is already a packed checkpoint ({reason}); it needs no conversion: use it directly, or pass it as the packed side of --check")]
    AlreadyPacked { reason: String },
    /// A Llama checkpoint that shows no sign of ternary training.
    #[error("{path}: model_type \"llama\" without any sign of ternary (BitNet b1.58) training: no quantization_config with quant_method \"bitnet\", no BitNet architecture name, no sub-norm tensors. Quantizing an ordinary Llama to ternary destroys it; pass --allow-plain-llama if this really is a ternary-trained model")]
    PlainLlama { path: PathBuf },
    /// A tensor with an integer or otherwise unsupported dtype where a float was expected.
    #[error("{path}: tensor {name} has dtype {dtype}; expected a floating-point dtype (BF16, F16 or F32)")]
    NonFloat {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    /// A tensor with an unexpected shape.
    #[error("{path}: tensor {name} has shape {shape:?}: {msg}")]
    BadShape {
        path: PathBuf,
        name: String,
        shape: Vec<usize>,
        msg: String,
    },
    /// A tensor the checkpoint must have is absent.
    #[error("{where_}: tensor {name} is missing{hint}")]
    MissingTensor {
        where_: String,
        name: String,
        hint: String,
    },
    /// The output already exists and `force` was not given.
    #[error("output {0} already exists; pass --force to replace it (the old one is only replaced once the new checkpoint is complete and verified)")]
    OutputExists(PathBuf),
    /// The output would overwrite (or contain) the input.
    #[error("output {output} would overwrite the input {input}; choose another output directory")]
    OutputIsInput { output: PathBuf, input: PathBuf },
    /// Invalid options.
    #[error("{0}")]
    InvalidOptions(String),
    /// Verification of the freshly written output failed (a converter bug, or a disk problem).
    #[error("verification of the new checkpoint failed: {0}; the output was not written")]
    Verify(String),
    /// A packing / unpacking error from the kernel crate, with the tensor it concerns.
    #[error("tensor {name}: {source}")]
    Kernel {
        name: String,
        source: bitnet_kernels::KernelError,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, ConvertError>;

pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| ConvertError::Io {
            path: path.into(),
            source,
        })
    }
}
