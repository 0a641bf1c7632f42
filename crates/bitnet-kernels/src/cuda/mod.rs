//! The CUDA path (feature `cuda`): [`crate::BitLinearOp`], [`crate::Bf16LinearOp`],
//! [`crate::RmsNormOp`] and [`crate::Relu2MulOp`] on candle CUDA tensors.
//!
//! The kernels live in `kernels/bitnet.cu`, compiled to PTX by `build.rs` and loaded once per
//! device through candle's [`CudaDevice::get_or_load_custom_func`]. A BitLinear runs two launches:
//!
//! 1. per-token absmax int8 quantization (`bitnet_quant*`): int8 values padded to the weight's
//!    block size, per-token scale `s` and per-token `Σq`;
//! 2. the ternary product with the epilogue fused: a dp4a GEMV, one warp per group of four rows,
//!    for up to [`GEMV_MAX_TOKENS`] tokens per pass (up to [`AUTO_GEMV_MAX_TOKENS`] tokens), or a
//!    tiled GEMM (int8 tensor-core `mma`, or dp4a) for more tokens.
//!
//! Weights are uploaded on first use in the CPU kernel layout (src/layout.rs), which is already
//! dp4a-friendly, and cached inside the op per device, so model code does not change: moving
//! the input tensor to a CUDA device is enough. Integer sums are exact and the epilogue is the
//! same sequence of IEEE f32 operations as on the CPU, so outputs match the CPU path bit for bit
//! (tests/cuda.rs).
//!
//! [`linears_shared`] is the fused form the model uses: the input (a residual sum or the gated
//! activation) is formed, normalized and quantized once for up to three weights; for one token
//! that happens inside the GEMV launch itself (`bitnet_gemv_fused*`: each block quantizes the
//! row into shared memory), so a decoded BitLinear is one launch. The functions here also expose
//! each stage separately for tests and benchmarks. Decoding adds [`attention`] (single-token
//! attention against an f32 KV cache, appending the token's keys and values in the same launch),
//! [`greedy`] (the argmax and the next embedding lookup on the GPU), [`sample`] (a token drawn
//! at a temperature, with top-k, top-p and min-p, on the GPU), [`penalty`] (the repetition
//! penalty before either) and [`Graph`] (one launch for a recorded step).

pub mod attention;
mod graph;
pub mod greedy;
pub mod penalty;
pub mod sample;

pub use graph::Graph;

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, DeviceId, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor,
};
use half::bf16;

use crate::act::LinearInput;
use crate::error::KernelError;
use crate::op::{BitLinearOp, ScaleConvention};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/bitnet.ptx"));
const MODULE: &str = "bitnet-kernels";

/// Tokens per GEMV pass (each pass reads the whole weight).
pub const GEMV_MAX_TOKENS: usize = 8;

/// [`Kernel::Auto`] runs GEMV passes up to this many tokens and the tensor-core GEMM beyond.
/// Measured on an H200 (docs/CUDA.md), 2560→6912: GEMV 25 µs vs GEMM 33 µs at 16 tokens,
/// 48 µs vs 37 µs at 32.
pub const AUTO_GEMV_MAX_TOKENS: usize = 16;

/// Which ternary product kernel to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// GEMV passes for up to [`AUTO_GEMV_MAX_TOKENS`] tokens, tensor-core GEMM beyond.
    Auto,
    /// dp4a GEMV, in passes of up to [`GEMV_MAX_TOKENS`] tokens (each pass reads the weights).
    Gemv,
    /// Tiled GEMM (64 rows × 64 tokens) with dp4a.
    GemmDp4a,
    /// Tiled GEMM (64 rows × 64 tokens) with int8 `mma.sync` tensor-core instructions (sm_80+).
    GemmMma,
}

/// A per-device copy of a host buffer, uploaded on first use (weights of an op).
pub(crate) struct DeviceCache<T> {
    slots: Mutex<Vec<(DeviceId, Arc<CudaSlice<T>>)>>,
}

impl<T> Default for DeviceCache<T> {
    fn default() -> Self {
        Self {
            slots: Mutex::new(Vec::new()),
        }
    }
}

impl<T> std::fmt::Debug for DeviceCache<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.slots.lock().map_or(0, |s| s.len());
        write!(f, "DeviceCache({n} devices)")
    }
}

impl<T: DeviceRepr + Copy + 'static> DeviceCache<T> {
    /// The copy of `host` on `dev`, uploading it (padded to at least one element) if needed.
    pub(crate) fn get_or_upload(
        &self,
        dev: &CudaDevice,
        host: &[T],
        pad: T,
    ) -> Result<Arc<CudaSlice<T>>> {
        let mut slots = self
            .slots
            .lock()
            .map_err(|_| candle_core::Error::Msg("bitnet cuda weight cache poisoned".into()))?;
        if let Some((_, s)) = slots.iter().find(|(id, _)| *id == dev.id()) {
            return Ok(s.clone());
        }
        let slice = if host.is_empty() {
            dev.clone_htod(&[pad][..])?
        } else {
            dev.clone_htod(host)?
        };
        let slice = Arc::new(slice);
        slots.push((dev.id(), slice.clone()));
        Ok(slice)
    }
}

fn func(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(name, MODULE, PTX)?
        .into_cuda_function())
}

fn cfg(grid: (usize, usize), threads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads of every kernel that reduces a row (quantization, RMSNorm, the fused GEMV; the same
/// constant in kernels/bitnet.cu): the f32 sum of squares is summed per thread over the elements
/// `t, t + ROW_THREADS, …`, so one thread count keeps all of them bit-identical to each other.
const ROW_THREADS: usize = 1024;

fn i32_arg(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("bitnet cuda: {v} exceeds i32")))
}

/// The GPU's name and compute capability, e.g. `"NVIDIA H100 80GB HBM3 (sm_90)"`.
pub fn device_name(dev: &CudaDevice) -> String {
    let ctx = dev.cuda_stream().context().clone();
    let name = ctx.name().unwrap_or_else(|_| "unknown CUDA device".into());
    match ctx.compute_capability() {
        Ok((major, minor)) => format!("{name} (sm_{major}{minor})"),
        Err(_) => name,
    }
}

/// Output dims of a linear with `k` inputs and `n` outputs, or the error the CPU path gives.
fn linear_dims(layout: &Layout, k: usize, n: usize) -> Result<(Vec<usize>, usize)> {
    let mut dims = layout.shape().dims().to_vec();
    match dims.last_mut() {
        Some(last) if *last == k => *last = n,
        last => {
            let got = last.map_or(0, |l| *l);
            return Err(KernelError::InputFeatures { got, expected: k }.into());
        }
    }
    let tokens = dims[..dims.len() - 1].iter().product();
    Ok((dims, tokens))
}

fn contiguous(layout: &Layout, what: &str) -> Result<(usize, usize)> {
    layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))
}

/// Quantized activations on a GPU: `tokens × padded_len` int8 (stored as u8), per-token scale
/// and per-token sum of the quantized values.
pub struct QuantizedActs {
    /// One allocation (a decode step makes many; in a CUDA graph each is a node): the int8
    /// values `[tokens, k_pad]`, then `tokens` f32 scales, then `tokens` i32 sums.
    buf: CudaSlice<u8>,
    tokens: usize,
    k_pad: usize,
    dev: CudaDevice,
}

impl QuantizedActs {
    /// Bytes of one allocation holding `tokens` rows of `k_pad` values, their scales and sums
    /// (`k_pad` is a multiple of 256, so the scales are aligned).
    fn bytes(tokens: usize, k_pad: usize) -> usize {
        tokens * (k_pad + 8)
    }

    /// The values from token `t0` on.
    fn q(&self, t0: usize) -> CudaView<'_, u8> {
        self.buf.slice(t0 * self.k_pad..self.tokens * self.k_pad)
    }

    /// The scales from token `t0` on.
    fn scales(&self, t0: usize) -> Result<CudaView<'_, f32>> {
        let start = self.tokens * self.k_pad + 4 * t0;
        let n = self.tokens - t0;
        // SAFETY: any 4 bytes are a valid f32; `start` is 4-byte aligned (k_pad % 256 == 0).
        unsafe { self.buf.slice(start..start + 4 * n).transmute::<f32>(n) }
            .ok_or_else(|| candle_core::Error::Msg("bitnet cuda: scales out of range".into()))
    }

    /// The sums of quantized values from token `t0` on.
    fn sums(&self, t0: usize) -> Result<CudaView<'_, i32>> {
        let start = self.tokens * (self.k_pad + 4) + 4 * t0;
        let n = self.tokens - t0;
        // SAFETY: any 4 bytes are a valid i32; `start` is 4-byte aligned.
        unsafe { self.buf.slice(start..start + 4 * n).transmute::<i32>(n) }
            .ok_or_else(|| candle_core::Error::Msg("bitnet cuda: sums out of range".into()))
    }

    /// Number of tokens.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Copies values, scales and sums back to the host (for tests).
    pub fn to_host(&self) -> Result<(Vec<i8>, Vec<f32>, Vec<i32>)> {
        let q = self.dev.clone_dtoh(&self.q(0))?;
        let s = self.dev.clone_dtoh(&self.scales(0)?)?;
        let sums = self.dev.clone_dtoh(&self.sums(0)?)?;
        Ok((q.into_iter().map(|v| v as i8).collect(), s, sums))
    }
}

/// RMSNorm weight `[k]` (same dtype as the activations) and epsilon, applied before
/// quantizing (see [`linears_shared`]).
type Norm<'a> = (&'a CudaStorage, &'a Layout, f32);

/// How the quantizer combines its two operands (`INPUT_*` in kernels/bitnet.cu).
const INPUT_PLAIN: i32 = 0;
const INPUT_ADD: i32 = 1;
const INPUT_RELU2_MUL: i32 = 2;

/// Kernel (a): quantizes a contiguous `[..., k]` f32/bf16 CUDA storage `x` — or `x + r`, or
/// `relu(x)²·r`, with `second = (r, layout, INPUT_*)` — into `k_pad ≥ k` columns, after an
/// RMSNorm when `norm` is given (the norm's output rounded as it would be stored). With
/// `INPUT_ADD` the sum is returned as well.
fn quantize_storage(
    x: &CudaStorage,
    xl: &Layout,
    second: Option<(&CudaStorage, &Layout, i32)>,
    norm: Option<Norm<'_>>,
    k: usize,
    k_pad: usize,
) -> Result<(QuantizedActs, Option<CudaStorage>)> {
    match x.dtype() {
        DType::F32 => quantize_typed::<f32>(x, xl, second, norm, k, k_pad, "f32"),
        DType::BF16 => quantize_typed::<bf16>(x, xl, second, norm, k, k_pad, "bf16"),
        other => Err(KernelError::UnsupportedDType(other.as_str()).into()),
    }
}

/// The row input of kernel (a) and of the fused GEMV (`RowInput`, the norm weight) as kernel
/// arguments, checked against each other.
struct RowArgs<'a, T> {
    x: CudaView<'a, T>,
    /// The second operand; the input again (unread) with `INPUT_PLAIN`.
    r: CudaView<'a, T>,
    mode: i32,
    /// The norm weight; the input again (unread) without a norm.
    w: CudaView<'a, T>,
    has_norm: i32,
    eps: f32,
    tokens: usize,
}

fn row_args<'a, T: CudaDType + DeviceRepr>(
    x: &'a CudaStorage,
    xl: &Layout,
    second: Option<(&'a CudaStorage, &Layout, i32)>,
    norm: Option<Norm<'a>>,
    k: usize,
) -> Result<RowArgs<'a, T>> {
    let (start, end) = contiguous(xl, "bitlinear")?;
    let tokens = (end - start).checked_div(k).unwrap_or_else(|| {
        let dims = xl.shape().dims();
        dims[..dims.len().saturating_sub(1)].iter().product()
    });
    let xs = x.as_cuda_slice::<T>()?.slice(start..end);
    let (r, mode) = match second {
        Some((r, rl, mode)) => {
            let (r0, r1) = contiguous(rl, "bitlinear second input")?;
            if rl.shape() != xl.shape() || r.dtype() != x.dtype() {
                candle_core::bail!(
                    "bitlinear: inputs {:?} {} and {:?} {} differ",
                    xl.dims(),
                    x.dtype().as_str(),
                    rl.dims(),
                    r.dtype().as_str()
                );
            }
            (r.as_cuda_slice::<T>()?.slice(r0..r1), mode)
        }
        // The kernel reads no second operand: pass the input in its place.
        None => (x.as_cuda_slice::<T>()?.slice(start..end), INPUT_PLAIN),
    };
    let (w, has_norm, eps) = match norm {
        Some((w, wl, eps)) => {
            let (w0, w1) = contiguous(wl, "rms-norm weight")?;
            if w1 - w0 != k || w.dtype() != x.dtype() {
                candle_core::bail!(
                    "rms-norm: weight {:?} {} for activations [.., {k}] {}",
                    wl.dims(),
                    w.dtype().as_str(),
                    x.dtype().as_str()
                );
            }
            (w.as_cuda_slice::<T>()?.slice(w0..w1), 1i32, eps)
        }
        None => (x.as_cuda_slice::<T>()?.slice(start..end), 0, 0.0),
    };
    Ok(RowArgs {
        x: xs,
        r,
        mode,
        w,
        has_norm,
        eps,
        tokens,
    })
}

/// A new buffer for the residual sum `x + r` of `row` (`INPUT_ADD`), else `None`.
fn sum_buffer<T: DeviceRepr>(
    dev: &CudaDevice,
    row: &RowArgs<'_, T>,
    k: usize,
) -> Result<Option<CudaSlice<T>>> {
    if row.mode != INPUT_ADD {
        return Ok(None);
    }
    // SAFETY: the kernel writes every element of the sum.
    Ok(Some(unsafe { dev.alloc::<T>((row.tokens * k).max(1))? }))
}

fn quantize_typed<T: CudaDType + DeviceRepr>(
    x: &CudaStorage,
    xl: &Layout,
    second: Option<(&CudaStorage, &Layout, i32)>,
    norm: Option<Norm<'_>>,
    k: usize,
    k_pad: usize,
    suffix: &str,
) -> Result<(QuantizedActs, Option<CudaStorage>)> {
    let dev = x.device().clone();
    let row = row_args::<T>(x, xl, second, norm, k)?;
    let tokens = row.tokens;
    // SAFETY: every element the consumers read is written by the kernel below.
    let mut buf = unsafe { dev.alloc::<u8>(QuantizedActs::bytes(tokens, k_pad).max(1))? };
    let mut sum = sum_buffer(&dev, &row, k)?;
    if tokens > 0 {
        let (ki, kpi) = (i32_arg(k)?, i32_arg(k_pad)?);
        let f = func(&dev, &format!("bitnet_quant{}_{suffix}", row_regs(k)))?;
        let stream = dev.cuda_stream();
        let (mut q, mut rest) = buf.split_at_mut(tokens * k_pad);
        let (mut scales, mut sums) = rest.split_at_mut(4 * tokens);
        let null = 0u64;
        let mut b = stream.launch_builder(&f);
        b.arg(&row.x).arg(&row.r).arg(&row.mode);
        match sum.as_mut() {
            Some(sum) => b.arg(sum),
            None => b.arg(&null),
        };
        b.arg(&row.w).arg(&row.has_norm).arg(&row.eps);
        b.arg(&mut q).arg(&mut scales).arg(&mut sums);
        b.arg(&ki).arg(&kpi);
        // SAFETY: argument types and sizes match the kernel's signature; the sum pointer is
        // written only with INPUT_ADD, when it is allocated.
        unsafe { b.launch(cfg((tokens, 1), ROW_THREADS)) }.w()?;
    }
    let acts = QuantizedActs {
        buf,
        tokens,
        k_pad,
        dev: dev.clone(),
    };
    Ok((acts, sum.map(|s| T::wrap_cuda_slice(s, dev))))
}

/// Copies the host tensor `src` into the CUDA tensor `dst` in place (same dtype — u32, f32 or
/// bf16 — and element count, both contiguous): one upload, no kernel and no allocation, so a
/// recorded [`Graph`] reading `dst` sees the new values.
pub fn copy_from_host(dst: &Tensor, src: &Tensor) -> Result<()> {
    dst.inplace_op1(&Upload { src })
}

struct Upload<'a> {
    src: &'a Tensor,
}

impl candle_core::InplaceOp1 for Upload<'_> {
    fn name(&self) -> &'static str {
        "copy-from-host"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("copy_from_host: the destination must be on a CUDA device")
    }

    fn cuda_fwd(&self, dst: &mut CudaStorage, layout: &Layout) -> Result<()> {
        let (d0, d1) = contiguous(layout, "copy_from_host destination")?;
        let (guard, sl) = self.src.storage_and_layout();
        let Storage::Cpu(src) = &*guard else {
            candle_core::bail!("copy_from_host: the source must be on the CPU");
        };
        let (s0, s1) = contiguous(sl, "copy_from_host source")?;
        if s1 - s0 != d1 - d0 {
            candle_core::bail!("copy_from_host: {} values into {}", s1 - s0, d1 - d0);
        }
        let stream = dst.device().cuda_stream();
        match (src, dst.dtype()) {
            (CpuStorage::U32(v), DType::U32) => {
                let mut d = dst.as_cuda_slice_mut::<u32>()?.slice_mut(d0..d1);
                stream.memcpy_htod(&v[s0..s1], &mut d)
            }
            (CpuStorage::F32(v), DType::F32) => {
                let mut d = dst.as_cuda_slice_mut::<f32>()?.slice_mut(d0..d1);
                stream.memcpy_htod(&v[s0..s1], &mut d)
            }
            (CpuStorage::BF16(v), DType::BF16) => {
                let mut d = dst.as_cuda_slice_mut::<bf16>()?.slice_mut(d0..d1);
                stream.memcpy_htod(&v[s0..s1], &mut d)
            }
            (s, d) => {
                candle_core::bail!("copy_from_host: {} into {}", s.dtype().as_str(), d.as_str())
            }
        }
        .w()
    }
}

/// Kernel (a) on a tensor: quantizes `x` (`[..., k]`, f32 or bf16, on a CUDA device) into rows
/// of `k_pad ≥ k` int8 values.
pub fn quantize(x: &Tensor, k_pad: usize) -> Result<QuantizedActs> {
    let x = x.contiguous()?;
    let k = x.dims().last().copied().unwrap_or(0);
    if k_pad < k {
        candle_core::bail!("bitnet cuda: padded length {k_pad} < {k}");
    }
    let (storage, layout) = x.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => Ok(quantize_storage(s, layout, None, None, k, k_pad)?.0),
        _ => candle_core::bail!("bitnet cuda: quantize needs a CUDA tensor"),
    }
}

/// `ops` (BitLinears with the same input size) applied to `RMSNorm(input)` — or to the input
/// when `norm` is `None` — with **one** launch forming the input (`x`, a residual sum `x + r`,
/// or the gated `relu(x)²·r`), normalizing and quantizing it for all of them, then one GEMV
/// launch per three weights (or one GEMM each). For one token the forming, norm and
/// quantization run inside each GEMV launch instead: one launch per three weights in all. Equal, bit for bit, to the separate ops
/// (candle's add, [`crate::Relu2MulOp`], [`crate::RmsNormOp`], then each
/// [`BitLinearOp::forward`]): the quantizer sees exactly the values those would store.
///
/// This is the decode-time fusion: q/k/v share the input norm, gate/up the post-attention norm
/// (and the residual add before it), `down_proj` reads the gated activation through its
/// sub-norm. `norm` is `(weight [k], eps)`. Returns the residual sum for [`LinearInput::Add`].
pub fn linears_shared(
    input: LinearInput<'_>,
    norm: Option<(&Tensor, f64)>,
    ops: &[&BitLinearOp],
) -> Result<(Option<Tensor>, Vec<Tensor>)> {
    let Some(first) = ops.first() else {
        return Ok((input.materialize()?.1, Vec::new()));
    };
    let w = first.weight();
    let (k, k_pad) = (w.in_features(), w.padded_in_features());
    if let Some(op) = ops.iter().find(|o| o.weight().in_features() != k) {
        candle_core::bail!(
            "linears_shared: input sizes differ ({k} and {})",
            op.weight().in_features()
        );
    }
    let (x, second) = match input {
        LinearInput::Plain(x) => (x.contiguous()?, None),
        LinearInput::Add(x, r) => (x.contiguous()?, Some((r.contiguous()?, INPUT_ADD))),
        LinearInput::Relu2Mul(g, u) => (g.contiguous()?, Some((u.contiguous()?, INPUT_RELU2_MUL))),
    };
    let (dims, _) = linear_dims(x.layout(), k, 0)?;
    let dtype = x.dtype();
    let cuda = |t: &Tensor, what: &str| -> Result<()> {
        if !t.device().is_cuda() {
            candle_core::bail!("linears_shared: {what} must be on the GPU");
        }
        Ok(())
    };
    cuda(&x, "the input")?;
    let tokens: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    let (ys, sum) = {
        let (xs, xl) = x.storage_and_layout();
        let second_guard = second
            .as_ref()
            .map(|(r, mode)| (r.storage_and_layout(), *mode));
        let weight_guard = norm.map(|(w, eps)| (w.storage_and_layout(), eps));
        let second = match &second_guard {
            Some(((s, l), mode)) => match &**s {
                Storage::Cuda(s) => Some((s, *l, *mode)),
                _ => candle_core::bail!("linears_shared: the second input must be on the GPU"),
            },
            None => None,
        };
        let norm = match &weight_guard {
            Some(((s, l), eps)) => match &**s {
                Storage::Cuda(s) => Some((s, *l, *eps as f32)),
                _ => candle_core::bail!("linears_shared: the norm weight must be on the GPU"),
            },
            None => None,
        };
        let Storage::Cuda(xs) = &*xs else {
            candle_core::bail!("linears_shared needs a CUDA tensor");
        };
        if tokens == 1 {
            match dtype {
                DType::F32 => fused_products::<f32>(xs, xl, second, norm, k, k_pad, ops, "f32")?,
                DType::BF16 => fused_products::<bf16>(xs, xl, second, norm, k, k_pad, ops, "bf16")?,
                other => return Err(KernelError::UnsupportedDType(other.as_str()).into()),
            }
        } else {
            let (acts, sum) = quantize_storage(xs, xl, second, norm, k, k_pad)?;
            (bitlinears_quantized(ops, &acts, Kernel::Auto, dtype)?, sum)
        }
    };
    let sum = sum.map(|s| {
        Tensor::from_storage(
            Storage::Cuda(s),
            x.shape().clone(),
            candle_core::op::BackpropOp::none(),
            false,
        )
    });
    let outs = ops
        .iter()
        .zip(ys)
        .map(|(op, y)| {
            let mut out = dims.clone();
            if let Some(last) = out.last_mut() {
                *last = op.weight().out_features();
            }
            Tensor::from_storage(
                Storage::Cuda(y),
                out,
                candle_core::op::BackpropOp::none(),
                false,
            )
        })
        .collect();
    Ok((sum, outs))
}

/// One token through [`products`] with the quantization fused into the GEMV: `(outputs, sum)`.
#[allow(clippy::too_many_arguments)]
fn fused_products<T: CudaDType + DeviceRepr>(
    x: &CudaStorage,
    xl: &Layout,
    second: Option<(&CudaStorage, &Layout, i32)>,
    norm: Option<Norm<'_>>,
    k: usize,
    k_pad: usize,
    ops: &[&BitLinearOp],
    suffix: &str,
) -> Result<(Vec<CudaStorage>, Option<CudaStorage>)> {
    let dev = x.device().clone();
    let row = row_args::<T>(x, xl, second, norm, k)?;
    let mut sum = sum_buffer(&dev, &row, k)?;
    let acts = Acts::Row {
        row,
        k,
        k_pad,
        dev: dev.clone(),
        sum: sum.as_mut(),
    };
    let ys = products::<T>(ops, acts, Kernel::Gemv, suffix)?;
    Ok((ys, sum.map(|s| T::wrap_cuda_slice(s, dev))))
}

/// Kernels (b)–(d): the ternary product of `op`'s weight with quantized activations and the
/// epilogue, into a new `[tokens, out]` buffer of `dtype` (f32 or bf16).
pub fn bitlinear_quantized(
    op: &BitLinearOp,
    acts: &QuantizedActs,
    kernel: Kernel,
    dtype: DType,
) -> Result<CudaStorage> {
    let mut ys = bitlinears_quantized(&[op], acts, kernel, dtype)?;
    ys.pop()
        .ok_or_else(|| candle_core::Error::Msg("bitnet cuda: no product".into()))
}

/// [`bitlinear_quantized`] for several weights with the same input; the GEMV serves up to three
/// of them per launch.
fn bitlinears_quantized(
    ops: &[&BitLinearOp],
    acts: &QuantizedActs,
    kernel: Kernel,
    dtype: DType,
) -> Result<Vec<CudaStorage>> {
    match dtype {
        DType::F32 => products::<f32>(ops, Acts::Quantized(acts), kernel, "f32"),
        DType::BF16 => products::<bf16>(ops, Acts::Quantized(acts), kernel, "bf16"),
        other => Err(KernelError::UnsupportedDType(other.as_str()).into()),
    }
}

/// Matrices per GEMV launch (`gemv_ternary` in kernels/bitnet.cu).
const GEMV_MATRICES: usize = 3;

/// Where a product's activations come from. (Built once per call and moved into [`products`]:
/// the variants' size difference costs nothing.)
#[allow(clippy::large_enum_variant)]
enum Acts<'a, T> {
    /// Quantized beforehand by kernel (a).
    Quantized(&'a QuantizedActs),
    /// One token's row input, formed, normalized and quantized inside every block of the GEMV
    /// (`bitnet_gemv_fused*`); with `INPUT_ADD` the first launch stores the sum into `sum`.
    Row {
        row: RowArgs<'a, T>,
        k: usize,
        k_pad: usize,
        dev: CudaDevice,
        sum: Option<&'a mut CudaSlice<T>>,
    },
}

/// Values per thread held in registers (`REGS` of `quantize_row` in kernels/bitnet.cu, for the
/// quantizer and the fused GEMV) over `k` inputs: enough for the row, in steps of 4 (unused
/// registers cost occupancy), up to 12 (12288 inputs; beyond, the rest is re-read: more would
/// spill under the 64 registers a 1024-thread block leaves each thread).
fn row_regs(k: usize) -> usize {
    k.div_ceil(ROW_THREADS).next_multiple_of(4).clamp(4, 12)
}

/// Warps per group of 4 rows in the fused GEMV (`S` of `gemv_fused`, split-K): the largest power
/// of two up to 8 that keeps the grid of [`ROW_THREADS`]-thread blocks within one block per SM,
/// so each SM forms the row once and the blocks' 32 warps share the weights' latency. At the
/// 2B-4T shapes on 132 SMs (H100 SXM, H200) that is 4 for q/k/v, o and down, 1 for gate/up.
fn split_warps(groups: usize, sms: usize) -> usize {
    let warps = ROW_THREADS / 32;
    let mut s = 1;
    while s < 8 && (groups * s * 2).div_ceil(warps) <= sms {
        s *= 2;
    }
    s
}

/// The GPU's streaming multiprocessors.
fn sm_count(dev: &CudaDevice) -> Result<usize> {
    let n = dev
        .cuda_stream()
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    Ok(usize::try_from(n).unwrap_or(1).max(1))
}

fn products<T: DeviceRepr + CudaDType>(
    ops: &[&BitLinearOp],
    acts: Acts<'_, T>,
    kernel: Kernel,
    suffix: &str,
) -> Result<Vec<CudaStorage>> {
    let (dev, tokens, k_pad, quantized, mut fused) = match acts {
        Acts::Quantized(a) => (a.dev.clone(), a.tokens, a.k_pad, Some(a), None),
        Acts::Row {
            row,
            k,
            k_pad,
            dev,
            sum,
        } => (
            dev,
            row.tokens,
            k_pad,
            None,
            Some((row, i32_arg(k)?, k, sum)),
        ),
    };
    let dev = &dev;
    let mut weights = Vec::with_capacity(ops.len());
    let mut ys = Vec::with_capacity(ops.len());
    for op in ops {
        let w = op.weight();
        if k_pad != w.padded_in_features() {
            candle_core::bail!(
                "bitnet cuda: activations padded to {k_pad}, weight to {}",
                w.padded_in_features()
            );
        }
        weights.push(op.cuda_weights().get_or_upload(dev, w.as_bytes(), 0x55)?);
        // SAFETY: the kernels write every `[tokens, out]` element.
        ys.push(unsafe { dev.alloc::<T>((tokens * w.out_features()).max(1))? });
    }
    let divide = match ops.first() {
        Some(op) => op.scale().1 == ScaleConvention::Divide,
        None => false,
    };
    if ops
        .iter()
        .any(|op| (op.scale().1 == ScaleConvention::Divide) != divide)
    {
        candle_core::bail!("bitnet cuda: weights with different scale conventions");
    }
    let divide = i32::from(divide);
    let nbi = i32_arg(k_pad / crate::BLOCK)?;
    let kernel = match (&fused, kernel) {
        (Some(_), _) => {
            if tokens != 1 {
                candle_core::bail!("bitnet cuda: the fused GEMV takes one token, not {tokens}");
            }
            Kernel::Gemv
        }
        (_, Kernel::Auto) if tokens <= AUTO_GEMV_MAX_TOKENS => Kernel::Gemv,
        (_, Kernel::Auto) => Kernel::GemmMma,
        (_, k) => k,
    };
    if tokens > 0 {
        let stream = dev.cuda_stream();
        match kernel {
            Kernel::Gemv => {
                let idx: Vec<usize> = (0..ops.len()).collect();
                let sms = match fused {
                    Some(_) => sm_count(dev)?,
                    None => 0,
                };
                for t0 in (0..tokens).step_by(GEMV_MAX_TOKENS) {
                    let nt = GEMV_MAX_TOKENS.min(tokens - t0);
                    for (ci, chunk) in idx.chunks(GEMV_MATRICES).enumerate() {
                        let rows: Vec<i32> = chunk
                            .iter()
                            .map(|&i| i32_arg(ops[i].weight().out_features()))
                            .collect::<Result<_>>()?;
                        let mut views: Vec<_> = ys
                            .iter_mut()
                            .enumerate()
                            .filter(|(i, _)| chunk.contains(i))
                            .map(|(i, y)| y.slice_mut(t0 * ops[i].weight().out_features()..))
                            .collect();
                        let groups: usize = chunk
                            .iter()
                            .map(|&i| ops[i].weight().out_features().div_ceil(4))
                            .sum();
                        if groups == 0 {
                            continue;
                        }
                        // Groups per block, threads per block, dynamic shared memory.
                        let (f, per_block, threads, smem) = match &fused {
                            None => (func(dev, &format!("bitnet_gemv{nt}_{suffix}"))?, 4, 128, 0),
                            Some((_, _, k, _)) => {
                                let s = split_warps(groups, sms);
                                let name =
                                    format!("bitnet_gemv_fused{}s{s}_{suffix}", row_regs(*k));
                                (func(dev, &name)?, ROW_THREADS / 32 / s, ROW_THREADS, k_pad)
                            }
                        };
                        let scales: Vec<f32> = chunk.iter().map(|&i| ops[i].scale().0).collect();
                        let acts = match quantized {
                            Some(a) => Some((a.q(t0), a.scales(t0)?, a.sums(t0)?)),
                            None => None,
                        };
                        let mut b = stream.launch_builder(&f);
                        let mut views = views.iter_mut();
                        // Unused slots get null pointers and no rows.
                        let (null, none, one) = (0u64, 0i32, 1f32);
                        for slot in 0..GEMV_MATRICES {
                            match (chunk.get(slot), views.next()) {
                                (Some(&i), Some(y)) => {
                                    b.arg(&*weights[i])
                                        .arg(y)
                                        .arg(&rows[slot])
                                        .arg(&scales[slot]);
                                }
                                _ => {
                                    b.arg(&null).arg(&null).arg(&none).arg(&one);
                                }
                            }
                        }
                        match (&acts, &mut fused) {
                            (Some((q, s, sums)), _) => {
                                b.arg(q).arg(s).arg(sums);
                            }
                            (None, Some((row, ki, _, sum))) => {
                                b.arg(&row.x).arg(&row.r).arg(&row.mode);
                                // The first launch stores the residual sum.
                                match sum.as_deref_mut() {
                                    Some(sum) if ci == 0 => b.arg(sum),
                                    _ => b.arg(&null),
                                };
                                b.arg(&row.w).arg(&row.has_norm).arg(&row.eps).arg(&*ki);
                            }
                            (None, None) => unreachable!("one of the two"),
                        }
                        b.arg(&nbi).arg(&divide);
                        let mut config = cfg((groups.div_ceil(per_block), 1), threads);
                        config.shared_mem_bytes = smem as u32;
                        // SAFETY: argument types and sizes match the kernel's signature; a
                        // slot with 0 rows is never written; the fused kernel's shared memory
                        // holds the k_pad quantized values.
                        unsafe { b.launch(config) }.w()?;
                    }
                }
            }
            Kernel::GemmDp4a | Kernel::GemmMma => {
                let Some(acts) = quantized else {
                    unreachable!("row inputs take the GEMV");
                };
                let (name, threads) = match kernel {
                    Kernel::GemmDp4a => ("dp4a", 256),
                    _ => ("mma", 128),
                };
                let f = func(dev, &format!("bitnet_gemm_{name}_{suffix}"))?;
                let ti = i32_arg(tokens)?;
                for ((op, wbuf), y) in ops.iter().zip(&weights).zip(&mut ys) {
                    let n = op.weight().out_features();
                    let (ni, scale) = (i32_arg(n)?, op.scale().0);
                    let mut b = stream.launch_builder(&f);
                    let (q, s, sums) = (acts.q(0), acts.scales(0)?, acts.sums(0)?);
                    b.arg(&**wbuf).arg(&q).arg(&s).arg(&sums).arg(y);
                    b.arg(&ni).arg(&nbi).arg(&ti).arg(&scale).arg(&divide);
                    let grid = (n.div_ceil(4).div_ceil(16), tokens.div_ceil(64));
                    // SAFETY: argument types and sizes match the kernel's signature.
                    unsafe { b.launch(cfg(grid, threads)) }.w()?;
                }
            }
            Kernel::Auto => unreachable!("resolved above"),
        }
    }
    Ok(ys
        .into_iter()
        .map(|y| CudaStorage::wrap_cuda_slice(y, dev.clone()))
        .collect())
}

/// `BitLinearOp::cuda_fwd`: quantize, then the product chosen by `kernel`.
pub(crate) fn bitlinear_fwd(
    op: &BitLinearOp,
    storage: &CudaStorage,
    layout: &Layout,
    kernel: Kernel,
) -> Result<(CudaStorage, Shape)> {
    let w = op.weight();
    let (dims, _) = linear_dims(layout, w.in_features(), w.out_features())?;
    let dtype = storage.dtype();
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return Err(KernelError::UnsupportedDType(dtype.as_str()).into());
    }
    let (k, k_pad) = (w.in_features(), w.padded_in_features());
    let (acts, _) = quantize_storage(storage, layout, None, None, k, k_pad)?;
    let y = bitlinear_quantized(op, &acts, kernel, dtype)?;
    Ok((y, Shape::from(dims)))
}

struct WithKernel<'a> {
    op: &'a BitLinearOp,
    kernel: Kernel,
}

impl CustomOp1 for WithKernel<'_> {
    fn name(&self) -> &'static str {
        "bitlinear-cuda"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("bitnet cuda: bitlinear_with needs a CUDA tensor")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        bitlinear_fwd(self.op, storage, layout, self.kernel)
    }
}

/// [`BitLinearOp::forward`] on a CUDA tensor with a chosen product kernel (tests, benchmarks).
pub fn bitlinear_with(op: &BitLinearOp, x: &Tensor, kernel: Kernel) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&WithKernel { op, kernel })
}

/// Expands `$launch!(x, suffix)` for the f32 or bf16 input slice of `$storage` (`suffix` names
/// the kernel variant); any other dtype returns an error. The LM-head launchers take either.
macro_rules! float_input {
    ($storage:expr, $launch:ident) => {
        match &$storage.slice {
            CudaStorageSlice::F32(x) => $launch!(x, "f32"),
            CudaStorageSlice::BF16(x) => $launch!(x, "bf16"),
            _ => return Err(KernelError::UnsupportedDType($storage.dtype().as_str()).into()),
        }
    };
}

/// `Bf16LinearOp::cuda_fwd`: `y = x · Wᵀ` with BF16 `W` (`[rows, cols]`, uploaded once into
/// `cache`), f32 or bf16 `x`, f32 accumulation and output. One warp per row; each launch
/// handles up to [`GEMV_MAX_TOKENS`] tokens, so `t` tokens read the weight `⌈t/8⌉` times.
pub(crate) fn bf16_linear_fwd(
    weight: &[bf16],
    rows: usize,
    cols: usize,
    cache: &DeviceCache<bf16>,
    storage: &CudaStorage,
    layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (dims, tokens) = linear_dims(layout, cols, rows)?;
    let (start, _) = contiguous(layout, "bf16-linear")?;
    let dev = storage.device();
    let wbuf = cache.get_or_upload(dev, weight, bf16::ZERO)?;
    let wbuf: &CudaSlice<bf16> = &wbuf;
    // SAFETY: the kernel writes every `[tokens, rows]` element.
    let mut y = unsafe { dev.alloc::<f32>((tokens * rows).max(1))? };
    if tokens > 0 && rows > 0 {
        let (ri, ci) = (i32_arg(rows)?, i32_arg(cols)?);
        // 16-byte loads need 8-element-aligned rows (candle's buffers are 256-byte aligned).
        let vec = i32::from(cols.is_multiple_of(8) && start.is_multiple_of(8));
        for t0 in (0..tokens).step_by(GEMV_MAX_TOKENS) {
            let nt = GEMV_MAX_TOKENS.min(tokens - t0);
            let mut yv = y.slice_mut(t0 * rows..);
            let x0 = start + t0 * cols;
            macro_rules! run {
                ($x:expr, $name:literal) => {{
                    let x = $x.slice(x0..);
                    let f = func(dev, &format!("bitnet_dense{nt}_{}", $name))?;
                    let stream = dev.cuda_stream();
                    let mut b = stream.launch_builder(&f);
                    b.arg(wbuf).arg(&x).arg(&mut yv).arg(&ri).arg(&ci).arg(&vec);
                    // SAFETY: argument types and sizes match the kernel's signature.
                    unsafe { b.launch(cfg((rows.div_ceil(4), 1), 128)) }.w()?;
                }};
            }
            float_input!(storage, run);
        }
    }
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        Shape::from(dims),
    ))
}

/// The weights of a 4-bit head on the device (`crate::Q4Matrix`'s buffers, uploaded as-is).
pub(crate) struct Q4Buffers<'a> {
    pub codes: &'a CudaSlice<u8>,
    pub scales: &'a CudaSlice<half::f16>,
    pub rows: usize,
    pub cols: usize,
    /// 64-column blocks per row.
    pub nb: usize,
}

/// Blocks of `bitnet_q4_gemv_*`: enough to fill the GPU; each strides over rows, eight per warp,
/// quantizing the token once.
const Q4_MAX_BLOCKS: usize = 1024;
/// Threads per block of `bitnet_q4_gemv_*` (its `__launch_bounds__`): 8 warps of 8 rows each.
const Q4_THREADS: usize = 256;

/// `Q4LinearOp::cuda_fwd`: `bitnet_q4_gemv_*` once per token, `[..., cols]` f32 or bf16 →
/// `[..., rows]` f32, bit-identical to the CPU op.
pub(crate) fn q4_linear_fwd(
    w: Q4Buffers<'_>,
    storage: &CudaStorage,
    layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (dims, tokens) = linear_dims(layout, w.cols, w.rows)?;
    let (start, _) = contiguous(layout, "q4-linear")?;
    let dev = storage.device();
    // SAFETY: the kernel writes every `[tokens, rows]` element.
    let mut y = unsafe { dev.alloc::<f32>((tokens * w.rows).max(1))? };
    if tokens > 0 && w.rows > 0 && w.nb > 0 {
        let (ri, ci, nbi) = (i32_arg(w.rows)?, i32_arg(w.cols)?, i32_arg(w.nb)?);
        let blocks = w.rows.div_ceil(Q4_THREADS / 4).min(Q4_MAX_BLOCKS);
        // q (64 B), lane corrections (16 × i32) and the scale (f32) of every block, plus 16
        // bytes: the block loop unrolled by 4 loads the scales as one 16-byte vector, also in
        // its remainder (compute-sanitizer saw it read up to 12 bytes past nb scales).
        let shared = u32::try_from(w.nb * (64 + 64 + 4) + 16)
            .map_err(|_| candle_core::Error::Msg("q4-linear: row too long".into()))?;
        for t in 0..tokens {
            let mut yv = y.slice_mut(t * w.rows..);
            macro_rules! run {
                ($x:expr, $name:literal) => {{
                    let x = $x.slice(start + t * w.cols..);
                    let f = func(dev, concat!("bitnet_q4_gemv_", $name))?;
                    let stream = dev.cuda_stream();
                    let mut b = stream.launch_builder(&f);
                    b.arg(w.codes).arg(w.scales).arg(&x).arg(&mut yv);
                    b.arg(&ri).arg(&ci).arg(&nbi);
                    let mut c = cfg((blocks, 1), Q4_THREADS);
                    c.shared_mem_bytes = shared;
                    // SAFETY: argument types and sizes match the kernel's signature; the
                    // buffers hold `Q4Matrix`'s padded layout (groups of 4 rows, nb blocks).
                    unsafe { b.launch(c) }.w()?;
                }};
            }
            float_input!(storage, run);
        }
    }
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        Shape::from(dims),
    ))
}

/// `RmsNormOp::cuda_fwd`: one block per token (`bitnet_rms_norm_*`), same dtype in and out.
pub(crate) fn rms_norm_fwd(
    eps: f32,
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (x0, x1) = contiguous(xl, "rms-norm")?;
    let (w0, w1) = contiguous(wl, "rms-norm weight")?;
    let h = xl.shape().dims().last().copied().unwrap_or(0);
    if w1 - w0 != h {
        candle_core::bail!(
            "rms-norm: weight has {} values for hidden size {h}",
            w1 - w0
        );
    }
    let rows = (x1 - x0).checked_div(h).unwrap_or(0);
    let dev = x.device().clone();
    macro_rules! run {
        ($x:expr, $w:expr, $t:ty, $name:literal) => {{
            // SAFETY: the kernel writes every element.
            let mut y = unsafe { dev.alloc::<$t>((x1 - x0).max(1))? };
            if rows > 0 {
                let (xs, ws) = ($x.slice(x0..x1), $w.slice(w0..w1));
                let f = func(&dev, $name)?;
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                let hi = i32_arg(h)?;
                b.arg(&xs).arg(&ws).arg(&mut y).arg(&hi).arg(&eps);
                // SAFETY: argument types and sizes match the kernel's signature.
                unsafe { b.launch(cfg((rows, 1), ROW_THREADS)) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        }};
    }
    let y = match (&x.slice, &w.slice) {
        (CudaStorageSlice::F32(xs), CudaStorageSlice::F32(ws)) => {
            run!(xs, ws, f32, "bitnet_rms_norm_f32")
        }
        (CudaStorageSlice::BF16(xs), CudaStorageSlice::BF16(ws)) => {
            run!(xs, ws, bf16, "bitnet_rms_norm_bf16")
        }
        _ => candle_core::bail!(
            "rms-norm: input {} and weight {} must both be f32 or both bf16",
            x.dtype().as_str(),
            w.dtype().as_str()
        ),
    };
    Ok((y, xl.shape().clone()))
}

/// `Relu2MulOp::cuda_fwd` on the contiguous ranges `go` of `g` and `uo` of `u`.
pub(crate) fn relu2_mul_fwd(
    g: &CudaStorage,
    (g0, g1): (usize, usize),
    u: &CudaStorage,
    (u0, _): (usize, usize),
) -> Result<CudaStorage> {
    let n = g1 - g0;
    let dev = g.device().clone();
    let ni = i32_arg(n)?;
    let blocks = n.div_ceil(256).clamp(1, 4096);
    macro_rules! run {
        ($g:expr, $u:expr, $t:ty, $name:literal) => {{
            // SAFETY: the kernel writes every element.
            let mut y = unsafe { dev.alloc::<$t>(n.max(1))? };
            if n > 0 {
                let (gs, us) = ($g.slice(g0..g1), $u.slice(u0..u0 + n));
                let f = func(&dev, $name)?;
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                b.arg(&gs).arg(&us).arg(&mut y).arg(&ni);
                // SAFETY: argument types and sizes match the kernel's signature.
                unsafe { b.launch(cfg((blocks, 1), 256)) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        }};
    }
    Ok(match (&g.slice, &u.slice) {
        (CudaStorageSlice::F32(gs), CudaStorageSlice::F32(us)) => {
            run!(gs, us, f32, "bitnet_relu2_mul_f32")
        }
        (CudaStorageSlice::BF16(gs), CudaStorageSlice::BF16(us)) => {
            run!(gs, us, bf16, "bitnet_relu2_mul_bf16")
        }
        _ => candle_core::bail!(
            "relu2-mul: gate {} and up {} must both be f32 or both bf16",
            g.dtype().as_str(),
            u.dtype().as_str()
        ),
    })
}
