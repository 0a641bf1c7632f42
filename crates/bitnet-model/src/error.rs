//! Errors of loading and running a model.
//!
//! Every message names the file, the tensor or the config key at fault and what was expected,
//! so that the CLI can print it as-is and the user knows what to fix.

use std::path::PathBuf;

/// Everything that can go wrong while reading a checkpoint or building the model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, mapped or read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// `config.json` (or a shard index) is not valid JSON or has a key of the wrong type.
    #[error("{path}: not a valid config: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error (it names the line, column and offending key).
        source: serde_json::Error,
    },

    /// A config key holds a value this crate does not support or that contradicts another key.
    #[error("{path}: `{key}` = {value}: {reason}")]
    Config {
        /// The config file (`config.json` when parsed from a string).
        path: PathBuf,
        /// The key, with its parent for nested keys (`quantization_config.linear_class`).
        key: String,
        /// The value found, as JSON.
        value: String,
        /// What is wrong and what is accepted.
        reason: String,
    },

    /// A safetensors file whose header or data does not parse.
    #[error("{path}: not a valid safetensors file (truncated?): {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },

    /// No weights file in the model directory.
    #[error(
        "{dir}: no model.safetensors or model.safetensors.index.json; \
         point at a Hugging Face model directory that holds the weights"
    )]
    NoWeights {
        /// The model directory.
        dir: PathBuf,
    },

    /// A tensor the model needs is absent from the checkpoint.
    #[error("{name} is missing from {path}{hint}")]
    MissingTensor {
        /// The tensor name, as in the checkpoint.
        name: String,
        /// The weights file or directory that was searched.
        path: PathBuf,
        /// Extra advice (starts with "; ") or empty.
        hint: String,
    },

    /// A tensor exists but has the wrong dtype or shape.
    #[error("{name} in {path}: expected {expected}, found {found}")]
    TensorMismatch {
        /// The tensor name.
        name: String,
        /// The file that holds it.
        path: PathBuf,
        /// What the config implies, e.g. `U8 [1728, 2560] (packed) or a float [6912, 2560]`.
        expected: String,
        /// What the file holds, e.g. `F16 [6912, 2561]`.
        found: String,
    },

    /// A tensor's values are invalid (e.g. the unused 2-bit code 3 in a packed weight).
    #[error("{name} in {path}: {reason}")]
    BadTensor {
        /// The tensor name.
        name: String,
        /// The file that holds it.
        path: PathBuf,
        /// What is wrong with the values.
        reason: String,
    },

    /// The requested compute dtype is not supported.
    #[error("cannot run in {dtype:?}: {reason}")]
    UnsupportedDType {
        /// The dtype asked for.
        dtype: candle_core::DType,
        /// Why, and what to use instead.
        reason: &'static str,
    },

    /// The tokenizer is missing or cannot be used.
    #[error("{path}: {reason}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// The chat template does not parse or render.
    #[error("{path}: chat_template: {reason}")]
    ChatTemplate {
        /// The `tokenizer_config.json` holding the template.
        path: PathBuf,
        /// minijinja's message.
        reason: String,
    },

    /// A generation setting or input is out of range; `name` is the CLI flag.
    #[error("{name} {value}: {reason}")]
    InvalidArgument {
        /// The flag (`--top-p`, `--prompt`, ...).
        name: &'static str,
        /// The value given.
        value: String,
        /// What is allowed.
        reason: String,
    },

    /// A candle operation failed (building or running the model).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A [`Error::Config`] for `key` holding `value`.
    pub(crate) fn config(
        path: impl Into<PathBuf>,
        key: impl Into<String>,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        Error::Config {
            path: path.into(),
            key: key.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}
