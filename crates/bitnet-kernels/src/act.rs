//! [`Relu2MulOp`]: BitNet b1.58 2B-4T's gated activation `relu(gate)² · up` in one pass, and
//! [`LinearInput`]: what a group of BitLinears reads before its norm (fused on a GPU).
//!
//! As three candle ops it is three passes over the MLP's widest activations (and at batch 1 on
//! a GPU, three launches per layer). The rounding points stay those of the three ops and of
//! transformers (`ACT2FN["relu2"]` then `* up` in the model dtype): the square is rounded to the
//! dtype, then the product.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::error::KernelError;

/// `relu(gate)² · up`, elementwise, f32 or bf16 (CPU, and CUDA with the `cuda` feature).
#[derive(Clone, Copy, Debug, Default)]
pub struct Relu2MulOp;

impl Relu2MulOp {
    /// `relu(gate)² · up` for two tensors of the same shape and dtype.
    pub fn forward(&self, gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
        gate.contiguous()?.apply_op2_no_bwd(&up.contiguous()?, self)
    }
}

fn run<T: Copy + Send + Sync>(g: &[T], u: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut y = Vec::with_capacity(g.len());
    g.par_iter()
        .zip(u)
        .with_min_len(4096)
        .map(|(&g, &u)| f(g, u))
        .collect_into_vec(&mut y);
    y
}

fn operands(gl: &Layout, ul: &Layout) -> candle_core::Result<((usize, usize), (usize, usize))> {
    if gl.shape() != ul.shape() {
        candle_core::bail!(
            "relu2-mul: gate {:?} and up {:?} differ in shape",
            gl.dims(),
            ul.dims()
        );
    }
    let c = |l: &Layout| {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("relu2-mul: inputs must be contiguous".into()))
    };
    Ok((c(gl)?, c(ul)?))
}

impl CustomOp2 for Relu2MulOp {
    fn name(&self) -> &'static str {
        "relu2-mul"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((g0, g1), (u0, u1)) = operands(gl, ul)?;
        let y = match (g, u) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => {
                CpuStorage::F32(run(&g[g0..g1], &u[u0..u1], |g, u| {
                    let r = g.max(0.0);
                    r * r * u
                }))
            }
            (CpuStorage::BF16(g), CpuStorage::BF16(u)) => {
                CpuStorage::BF16(run(&g[g0..g1], &u[u0..u1], |g, u| {
                    let r = g.to_f32().max(0.0);
                    bf16::from_f32(bf16::from_f32(r * r).to_f32() * u.to_f32())
                }))
            }
            _ => {
                return Err(KernelError::UnsupportedDType(g.dtype().as_str()).into());
            }
        };
        Ok((y, gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (go, uo) = operands(gl, ul)?;
        Ok((
            crate::cuda::relu2_mul_fwd(g, go, u, uo)?,
            gl.shape().clone(),
        ))
    }
}

/// What a group of BitLinears reads before their norm: a tensor, a residual sum, or the gated
/// activation. On a GPU `cuda::linears_shared` forms it inside the quantization launch;
/// [`LinearInput::materialize`] computes it with the separate ops (any device).
#[derive(Clone, Copy, Debug)]
pub enum LinearInput<'a> {
    /// `x` itself.
    Plain(&'a Tensor),
    /// `x + r`, a residual add (the sum is the new residual stream).
    Add(&'a Tensor, &'a Tensor),
    /// `relu(gate)² · up` ([`Relu2MulOp`]).
    Relu2Mul(&'a Tensor, &'a Tensor),
}

impl LinearInput<'_> {
    /// The input as a tensor, and the residual sum for [`LinearInput::Add`].
    pub fn materialize(&self) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        Ok(match *self {
            LinearInput::Plain(x) => (x.clone(), None),
            LinearInput::Add(x, r) => {
                let s = (x + r)?;
                (s.clone(), Some(s))
            }
            LinearInput::Relu2Mul(g, u) => (Relu2MulOp.forward(g, u)?, None),
        })
    }
}
