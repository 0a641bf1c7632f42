//! Converting full-precision BitNet b1.58 checkpoints into packed offline checkpoints, checking
//! packed checkpoints against their sources, and writing synthetic models.
//!
//! - [`convert()`]: a Hugging Face checkpoint directory with full-precision linears
//!   (`model_type: bitnet` BF16 master weights as in microsoft/bitnet-b1.58-2B-4T-bf16, or a
//!   ternary-trained `llama` such as 1bitLLM/bitnet_b1_58-*; BF16/F16/F32, single-file or
//!   sharded) → a packed checkpoint that transformers and this project load: U8 `[out/4, in]`
//!   linears with BF16 `weight_scale`, everything else BF16,
//!   `quantization_config = {bitnet, autobitlinear, offline}`.
//! - [`check()`]: per-tensor comparison of a packed checkpoint with its source.
//! - [`synth::synth`]: deterministic random checkpoints with real shapes (2B-4T, tiny, custom).
//!
//! Everything streams tensor by tensor (positioned reads of the inputs; safetensors output
//! written with a precomputed header, see [`st`]), so memory stays near the largest single
//! linear layer, not the model. Outputs are built in a temporary directory next to the target
//! and renamed into place only when complete.

mod check;
mod convert;
mod error;
pub mod progress;
mod source;
pub mod st;
pub mod synth;
mod util;

pub use check::{check, CheckReport, CheckRow, ScaleConvention};
pub use convert::{convert, output_config, ConvertOptions, LoadCheck, Report, DEFAULT_SHARD_SIZE};
pub use error::{ConvertError, Result};
pub use progress::Progress;
pub use source::{is_linear_weight, Checkpoint, Family, LINEARS};
pub use util::parse_size;
