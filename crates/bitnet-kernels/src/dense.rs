//! [`Bf16Matrix`] and [`Bf16LinearOp`]: the LM head, a plain (non-ternary) matrix kept in BF16.
//!
//! BitNet's head is the tied embedding (2B-4T: 128256 × 2560, 657 MB in BF16), read in full for
//! every generated token. candle's CPU matmul has no BF16 path, so the alternative would be an
//! f32 copy: twice the memory and twice the bytes per token. Here products are computed from
//! the BF16 values (widened exactly to f32) with f32 accumulation, which is what transformers
//! computes in f32 mode after upcasting the BF16 checkpoint.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::cpu::{dot_bf16, Isa};
use crate::error::KernelError;
use crate::pack::check_len;

/// A row-major BF16 matrix `[rows, cols]`.
#[derive(Clone)]
pub struct Bf16Matrix {
    rows: usize,
    cols: usize,
    data: Vec<bf16>,
}

impl std::fmt::Debug for Bf16Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bf16Matrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

impl Bf16Matrix {
    /// Wraps row-major BF16 values.
    pub fn new(data: Vec<bf16>, rows: usize, cols: usize) -> crate::Result<Self> {
        check_len("bf16 matrix", data.len(), rows, cols)?;
        Ok(Self { rows, cols, data })
    }

    /// Rows (output features of the product).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `i` (e.g. one token's embedding when the matrix is a tied embedding table).
    pub fn row(&self, i: usize) -> Option<&[bf16]> {
        self.data.get(i * self.cols..(i + 1) * self.cols)
    }

    /// Bytes held.
    pub fn storage_bytes(&self) -> usize {
        self.data.len() * 2
    }

    /// `out[r · tokens + t] = Σ_k W[r,k] · x[t,k]` in f32 (`x` is `tokens × cols`), split across
    /// the current rayon pool. Sums run in a fixed order per instruction set, so results are
    /// deterministic but differ from [`Isa::Scalar`] by float rounding only.
    ///
    /// # Panics
    /// If `isa` is unavailable or the buffers do not match the shapes (programming errors).
    pub fn matmul(&self, isa: Isa, x: &[f32], out: &mut [f32]) {
        let c = self.cols;
        row_parallel(isa, self.rows, c, x, out, |r, xt| {
            dot_bf16(isa, &self.data[r * c..(r + 1) * c], xt)
        });
    }
}

/// The driver shared by the head matrices: checks the shapes, then fills
/// `out[r · tokens + t] = dot(r, x_t)` for every row and token (`x` is `tokens × cols`), in
/// chunks of [`CHUNK_ROWS`] rows across the current rayon pool.
///
/// # Panics
/// If `isa` is unavailable or the buffers do not match the shapes (programming errors).
pub(crate) fn row_parallel(
    isa: Isa,
    rows: usize,
    cols: usize,
    x: &[f32],
    out: &mut [f32],
    dot: impl Fn(usize, &[f32]) -> f32 + Sync,
) {
    let tokens = check_head_shapes(isa, rows, cols, x, out);
    row_chunks(rows, tokens, out, |r0, out| {
        for (i, o) in out.chunks_exact_mut(tokens).enumerate() {
            for (t, o) in o.iter_mut().enumerate() {
                *o = dot(r0 + i, &x[t * cols..(t + 1) * cols]);
            }
        }
    });
}

/// Rows per task of [`row_chunks`] (a multiple of the q4 head's 4-row groups).
pub(crate) const CHUNK_ROWS: usize = 64;

/// Checks a head product's arguments (`x` is `tokens × cols`, `out` is `[rows, tokens]`) and
/// returns the token count.
///
/// # Panics
/// If `isa` is unavailable or the buffers do not match the shapes (programming errors).
pub(crate) fn check_head_shapes(
    isa: Isa,
    rows: usize,
    cols: usize,
    x: &[f32],
    out: &[f32],
) -> usize {
    assert!(
        Isa::available().contains(&isa),
        "{isa:?} is not supported by this CPU"
    );
    let tokens = x.len().checked_div(cols).unwrap_or(0);
    assert_eq!(
        x.len(),
        tokens * cols,
        "input does not match the matrix width"
    );
    assert_eq!(
        out.len(),
        rows * tokens,
        "output does not match [rows, tokens]"
    );
    tokens
}

/// Splits an output-row-major `[rows, tokens]` buffer into chunks of [`CHUNK_ROWS`] rows and
/// calls `chunk(first_row, rows_of_out)` for each across the current rayon pool.
pub(crate) fn row_chunks(
    rows: usize,
    tokens: usize,
    out: &mut [f32],
    chunk: impl Fn(usize, &mut [f32]) + Sync,
) {
    debug_assert_eq!(out.len(), rows * tokens);
    if tokens == 0 || rows == 0 {
        return;
    }
    out.par_chunks_mut(CHUNK_ROWS * tokens)
        .enumerate()
        .for_each(|(i, out)| chunk(i * CHUNK_ROWS, out));
}

/// `y = x · Wᵀ` for a [`Bf16Matrix`] `W`: input `[..., cols]` f32 or bf16, output `[..., rows]` f32.
#[derive(Clone, Debug)]
pub struct Bf16LinearOp {
    weight: Arc<Bf16Matrix>,
    /// The weight's GPU copies, uploaded on first use (shared by clones of the op).
    #[cfg(feature = "cuda")]
    gpu: Arc<crate::cuda::DeviceCache<bf16>>,
}

impl Bf16LinearOp {
    /// The product with `weight`.
    pub fn new(weight: Arc<Bf16Matrix>) -> Self {
        Self {
            weight,
            #[cfg(feature = "cuda")]
            gpu: Arc::default(),
        }
    }

    /// Applies the product to `x` (`[..., cols]`); the result is f32.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    /// The matrix.
    pub fn weight(&self) -> &Arc<Bf16Matrix> {
        &self.weight
    }

    /// Row `state[0]` as `[1, cols]` in `dtype` (f32 or bf16), looked up on the GPU that holds
    /// `state` (a `[token, position]` u32 tensor, see [`crate::cuda::greedy`]) from the same
    /// device copy the products use: a tied embedding is uploaded once.
    #[cfg(feature = "cuda")]
    pub fn embed_row(
        &self,
        state: &Tensor,
        dtype: candle_core::DType,
    ) -> candle_core::Result<Tensor> {
        let w = &self.weight;
        crate::cuda::greedy::embed_row(&w.data, (w.rows, w.cols), &self.gpu, state, dtype)
    }
}

impl CustomOp1 for Bf16LinearOp {
    fn name(&self) -> &'static str {
        "bf16-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &self.weight;
        float_head_cpu_fwd(self.name(), w.rows, w.cols, storage, layout, |x, out| {
            w.matmul(Isa::detect(), x, out)
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let w = &self.weight;
        crate::cuda::bf16_linear_fwd(&w.data, w.rows, w.cols, &self.gpu, storage, layout)
    }
}

/// A quantized LM-head matrix multiplied on the CPU ([`crate::I8Matrix`], [`crate::Q4Matrix`]).
pub trait HeadMatrix: std::fmt::Debug + Send + Sync + 'static {
    /// The op's name in candle errors.
    const OP_NAME: &'static str;
    /// Rows (vocabulary size).
    fn rows(&self) -> usize;
    /// Columns (hidden size).
    fn cols(&self) -> usize;
    /// `out[r · tokens + t] ≈ Σ_k W[r,k] · x[t,k]` (`x` is `tokens × cols`).
    fn matmul(&self, isa: Isa, x: &[f32], out: &mut [f32]);

    /// The op on a CUDA device: `[..., cols]` → `[..., rows]` f32. By default the format has no
    /// GPU kernel and this fails.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _storage: &candle_core::CudaStorage,
        _layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Err(candle_core::Error::Msg(format!(
            "{}: this head format runs on the CPU only",
            Self::OP_NAME
        )))
    }
}

/// `y ≈ x · Wᵀ` for a [`HeadMatrix`] `W`: input `[..., cols]` f32 or bf16, output `[..., rows]`
/// f32. [`crate::I8LinearOp`] (CPU only) and [`crate::Q4LinearOp`] (CPU and CUDA) are this op.
#[derive(Debug)]
pub struct HeadLinearOp<M> {
    weight: Arc<M>,
}

impl<M> Clone for HeadLinearOp<M> {
    fn clone(&self) -> Self {
        Self {
            weight: self.weight.clone(),
        }
    }
}

impl<M: HeadMatrix> HeadLinearOp<M> {
    /// The product with `weight`.
    pub fn new(weight: Arc<M>) -> Self {
        Self { weight }
    }

    /// Applies the product to `x` (`[..., cols]`); the result is f32.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }
}

impl<M: HeadMatrix> CustomOp1 for HeadLinearOp<M> {
    fn name(&self) -> &'static str {
        M::OP_NAME
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &self.weight;
        float_head_cpu_fwd(M::OP_NAME, w.rows(), w.cols(), storage, layout, |x, out| {
            w.matmul(Isa::detect(), x, out)
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.weight.cuda_fwd(storage, layout)
    }
}

/// The `cpu_fwd` shared by the LM-head ops ([`Bf16LinearOp`], [`HeadLinearOp`]): checks the input, widens it to f32, runs `matmul`
/// (output-row-major `[rows, tokens]`) and returns `[..., rows]` f32.
pub(crate) fn float_head_cpu_fwd(
    name: &str,
    rows: usize,
    cols: usize,
    storage: &CpuStorage,
    layout: &Layout,
    matmul: impl Fn(&[f32], &mut [f32]),
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{name}: input must be contiguous")))?;
    let mut dims = layout.shape().dims().to_vec();
    match dims.last_mut() {
        Some(last) if *last == cols => *last = rows,
        last => {
            let got = last.map_or(0, |l| *l);
            return Err(KernelError::InputFeatures {
                got,
                expected: cols,
            }
            .into());
        }
    }
    let x: std::borrow::Cow<[f32]> = match storage {
        CpuStorage::F32(x) => x[start..end].into(),
        CpuStorage::BF16(x) => x[start..end]
            .iter()
            .map(|v| v.to_f32())
            .collect::<Vec<_>>()
            .into(),
        other => return Err(KernelError::UnsupportedDType(other.dtype().as_str()).into()),
    };
    let tokens = x.len() / cols.max(1);
    let mut acc = vec![0f32; rows * tokens];
    matmul(&x, &mut acc);
    let y = if tokens == 1 {
        acc
    } else {
        let mut y = vec![0f32; acc.len()];
        for (r, row) in acc.chunks_exact(tokens).enumerate() {
            for (t, v) in row.iter().enumerate() {
                y[t * rows + r] = *v;
            }
        }
        y
    };
    Ok((CpuStorage::F32(y), Shape::from(dims)))
}
