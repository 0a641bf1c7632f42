//! BitNet b1.58 models for candle, numerically matching Hugging Face transformers.
//!
//! - [`config`]: `config.json` → [`Config`] (family, quantization mode, scale convention);
//! - [`weights`]: memory-mapped safetensors with named, checked lookups;
//! - [`bitlinear`]: [`BitLinear`], the ternary linear layer as a candle `Module`;
//! - [`model`]: the decoder and [`ForCausalLM`], the type to load and run;
//! - [`cache`]: the KV cache behind incremental decoding;
//! - [`generation`]: sampling, stop conditions, UTF-8-safe streaming and the decode loop;
//! - [`chat`]: tokenizer loading and chat prompts from the checkpoint's Jinja template;
//! - [`perplexity`](mod@perplexity): per-token NLL over windows;
//! - [`inspect`](mod@inspect): a summary of a checkpoint for `bitnet inspect`.
//!
//! Loading never prints: non-fatal problems (an all-zero ternary tensor, unused tensors) are
//! returned by [`ForCausalLM::warnings`] / [`ModelInfo::warnings`] for the caller to show.

pub mod bitlinear;
pub mod cache;
pub mod chat;
pub mod config;
pub mod error;
pub mod generation;
mod head;
pub mod inspect;
pub mod model;
pub mod perplexity;
pub mod weights;

pub use bitlinear::BitLinear;
pub use cache::Cache;
pub use config::{Config, Family, QuantizationMode, ScaleConvention};
pub use error::{Error, Result};
pub use head::HeadFormat;
pub use inspect::{inspect, ModelInfo, TensorGroup};
pub use model::ForCausalLM;
pub use perplexity::perplexity;
pub use weights::Weights;
