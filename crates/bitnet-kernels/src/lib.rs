//! Ternary ("1.58-bit") BitLinear kernels for candle.
//!
//! BitNet b1.58 ([arXiv 2402.17764](https://arxiv.org/abs/2402.17764)) stores every linear
//! weight as −1/0/+1 plus one scale and quantizes activations to int8 per token, so a linear
//! layer is an exact integer product followed by one multiply per output. This crate knows
//! nothing of models; it provides:
//!
//! - [`pack`]: the Hugging Face packed U8 layout (`[out/4, in]`) and absmean weight quantization;
//! - [`quant`]: per-token absmax int8 activation quantization (ties-to-even, as PyTorch);
//! - [`TernaryWeight`]: the kernel layout, repacked once at load time;
//! - [`cpu`]: scalar, AVX2, AVX-512 VNNI, AMX-INT8 and NEON products, chosen at run time;
//! - [`BitLinearOp`]: the layer as a candle `CustomOp1` (CPU now, CUDA through the same op);
//! - [`Bf16LinearOp`]: the BF16 LM head with f32 accumulation (candle's CPU matmul has no BF16);
//! - [`RmsNormOp`]: RMSNorm in one CPU pass, with transformers' rounding points;
//! - [`Relu2MulOp`]: the 2B-4T gated activation `relu(gate)² · up` in one pass;
//! - [`I8LinearOp`]: an int8-weight LM head (per-row scales), half the bytes of BF16;
//! - [`Q4LinearOp`]: a 4-bit LM head (f16 scale per 64 columns, int8 activations), about a
//!   quarter of the bytes of BF16, on the int8 dot-product instructions;
//! - `cuda` (feature `cuda`): both ops on CUDA tensors, with the kernels exposed for tests.

mod act;
mod dense;
mod error;
mod int8;
mod layout;
mod norm;
mod op;
mod q4;

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod pack;
pub mod quant;

pub use act::{LinearInput, Relu2MulOp};
pub use dense::{Bf16LinearOp, Bf16Matrix, HeadLinearOp, HeadMatrix};
pub use error::{KernelError, Result};
pub use int8::{I8LinearOp, I8Matrix};
pub use layout::{TernaryWeight, BLOCK};
pub use norm::RmsNormOp;
pub use op::{BitLinearOp, ScaleConvention};
pub use q4::{Q4LinearOp, Q4Matrix, Q4_BLOCK};
