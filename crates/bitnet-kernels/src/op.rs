//! [`BitLinearOp`]: the ternary linear layer as a candle `CustomOp1`.

use std::cell::Cell;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::cpu::{ternary_matmul, Isa};
use crate::error::KernelError;
use crate::layout::TernaryWeight;
use crate::quant::QuantizedActivations;

/// How a checkpoint's `weight_scale` relates to the ternary weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleConvention {
    /// `W ≈ T · weight_scale` (transformers' `AutoBitLinear`, `linear_class: autobitlinear`,
    /// microsoft/bitnet-b1.58-2B-4T): `y = (q·Tᵀ) / s · weight_scale`.
    Multiply,
    /// `W ≈ T / weight_scale` (transformers' legacy `BitLinear`, Llama-type ternary checkpoints):
    /// `y = (q·Tᵀ) / (s · weight_scale)`.
    Divide,
}

/// `y = BitLinear(x)`: per-token absmax int8 quantization of `x`, an exact integer product with
/// the ternary weight, then rescaling — arXiv 2402.17764 §2, matching transformers' numerics.
///
/// Input `[..., in]` in f32 or bf16 (never f16: BitNet activations overflow it); output
/// `[..., out]` in the input dtype. With the `cuda` feature the op also runs on CUDA tensors
/// (`cuda_fwd`, see `crate::cuda`), uploading the weight on first use, so `Tensor::apply_op1`
/// picks the device transparently.
#[derive(Clone, Debug)]
pub struct BitLinearOp {
    weight: Arc<TernaryWeight>,
    scale: f32,
    convention: ScaleConvention,
    /// The weight's GPU copies, uploaded on first use (shared by clones of the op).
    #[cfg(feature = "cuda")]
    gpu: Arc<crate::cuda::DeviceCache<u8>>,
}

impl BitLinearOp {
    /// A BitLinear over `weight` with the checkpoint's `weight_scale` and its convention.
    pub fn new(weight: Arc<TernaryWeight>, scale: f32, convention: ScaleConvention) -> Self {
        Self {
            weight,
            scale,
            convention,
            #[cfg(feature = "cuda")]
            gpu: Arc::default(),
        }
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_weights(&self) -> &crate::cuda::DeviceCache<u8> {
        &self.gpu
    }

    /// The ternary weight.
    pub fn weight(&self) -> &TernaryWeight {
        &self.weight
    }

    /// The `weight_scale` and how it applies.
    pub fn scale(&self) -> (f32, ScaleConvention) {
        (self.scale, self.convention)
    }

    /// Applies the layer to `x` (`[..., in]`).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let got = x.dims().last().copied().unwrap_or(0);
        if got != self.weight.in_features() {
            return Err(KernelError::InputFeatures {
                got,
                expected: self.weight.in_features(),
            }
            .into());
        }
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    /// The factor turning token `t`'s integer dot products into outputs.
    fn rescale(&self, s: f32) -> f32 {
        match self.convention {
            ScaleConvention::Multiply => self.scale / s,
            ScaleConvention::Divide => 1.0 / (s * self.scale),
        }
    }

    fn run<T>(&self, x: &[T], out: impl Fn(f32) -> T + Sync) -> Vec<T>
    where
        T: Copy + Into<f32> + Send + Sync + 'static,
    {
        thread_local! {
            // Reused between calls so that decoding a token allocates only its output. Taken
            // out while in use: a rayon worker waiting inside this call may run another layer's
            // call (e.g. a second model's forward pass) on the same thread.
            static SCRATCH: Cell<(QuantizedActivations, Vec<i32>)> = Cell::default();
        }
        let (k, n) = (self.weight.in_features(), self.weight.out_features());
        let tokens = x.len().checked_div(k).unwrap_or(0);
        let (mut acts, mut acc) = SCRATCH.take();
        acts.quantize(x, tokens, k, self.weight.padded_in_features());
        acc.resize(n * tokens, 0);
        ternary_matmul(Isa::detect(), &self.weight, &acts, &mut acc);
        let mut y = vec![out(0.0); n * tokens];
        let rescale = |((y, acc), &s): ((&mut [T], &[i32]), &f32)| {
            let f = self.rescale(s);
            for (y, &a) in y.iter_mut().zip(acc) {
                *y = out(a as f32 * f);
            }
        };
        let (n1, scales) = (n.max(1), acts.scales());
        if tokens > 1 {
            let rows = y.par_chunks_mut(n1).zip(acc.par_chunks(n1));
            rows.zip(scales).for_each(rescale);
        } else {
            let rows = y.chunks_mut(n1).zip(acc.chunks(n1));
            rows.zip(scales).for_each(rescale);
        }
        SCRATCH.set((acts, acc));
        y
    }
}

impl CustomOp1 for BitLinearOp {
    fn name(&self) -> &'static str {
        "bitlinear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("bitlinear: input must be contiguous".into()))?;
        let mut dims = layout.shape().dims().to_vec();
        match dims.last_mut() {
            Some(last) if *last == self.weight.in_features() => *last = self.weight.out_features(),
            last => {
                let got = last.map_or(0, |l| *l);
                return Err(KernelError::InputFeatures {
                    got,
                    expected: self.weight.in_features(),
                }
                .into());
            }
        }
        let y = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(self.run(&x[start..end], |v| v)),
            CpuStorage::BF16(x) => CpuStorage::BF16(self.run(&x[start..end], bf16::from_f32)),
            other => return Err(KernelError::UnsupportedDType(other.dtype().as_str()).into()),
        };
        Ok((y, Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::bitlinear_fwd(self, storage, layout, crate::cuda::Kernel::Auto)
    }
}
