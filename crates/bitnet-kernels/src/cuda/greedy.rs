//! Greedy decoding on the device: the token pick and the next step's embedding lookup.
//!
//! A decode step that copies its logits to the host (513 KB for the 2B-4T vocabulary), picks
//! the token there and uploads the next embedded row leaves the GPU idle between steps. With
//! the argmax and the lookup on the GPU, a recorded step ([`super::Graph`]) reads its input
//! from a two-element u32 **state** tensor `[token, position]` and leaves the next one there,
//! so the host can queue step `n + 1` before it has read step `n`'s token (four bytes).
//!
//! [`TokenReadback`] is that read: a pinned host word the stream copies the token into, waited
//! on by an event, so reading step `n` does not wait for step `n + 1`.
//!
//! [`greedy_next`] is the host sampler's greedy choice exactly: the first index of the largest
//! logit (`torch.argmax`), with NaN reported ([`NAN_TOKEN`]) instead of picked.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, CudaSlice, CudaView, CudaViewMut, PinnedHostSlice, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, DType, Layout, Result, Shape, Tensor};
use half::bf16;

use super::{cfg, contiguous, func, i32_arg, DeviceCache};
use crate::error::KernelError;

/// The token [`greedy_next`] writes when a logit is NaN (never a valid id).
pub const NAN_TOKEN: u32 = u32::MAX;

/// Threads of `bitnet_greedy_next` (`GREEDY_THREADS` in kernels/bitnet.cu).
const GREEDY_THREADS: usize = 1024;

/// One launch: `state[0]` ← the argmax of `logits` (f32, one row `[1, vocab]` or `[vocab]`, on
/// the state's device; the first index on ties, [`NAN_TOKEN`] if any logit is NaN) and
/// `state[1]` += 1. `state` is a contiguous two-element u32 tensor `[token, position]`.
pub fn greedy_next(state: &Tensor, logits: &Tensor) -> Result<()> {
    state.inplace_op2(&logits.contiguous()?, &GreedyNext)
}

struct GreedyNext;

/// The `[token, position]` pair of a state tensor.
pub(crate) fn state_range(l: &Layout, what: &str) -> Result<(usize, usize)> {
    let (a, b) = contiguous(l, what)?;
    if b - a != 2 {
        candle_core::bail!("{what}: expected a two-element [token, position] tensor");
    }
    Ok((a, b))
}

/// Runs `f` on the storage of a u32 `[token, position]` state tensor on a CUDA device and a
/// view of its two words; `what` names the caller in errors.
fn with_state<R>(
    state: &Tensor,
    what: &str,
    f: impl FnOnce(&CudaStorage, CudaView<'_, u32>) -> Result<R>,
) -> Result<R> {
    let (guard, sl) = state.storage_and_layout();
    let candle_core::Storage::Cuda(ss) = &*guard else {
        candle_core::bail!("{what}: the state must be on a CUDA device");
    };
    if ss.dtype() != DType::U32 {
        candle_core::bail!("{what}: the state must be u32");
    }
    let (s0, s1) = state_range(sl, what)?;
    f(ss, ss.as_cuda_slice::<u32>()?.slice(s0..s1))
}

/// The arguments of an op that picks the next token into a state: the state's two words and
/// the (non-empty, contiguous) f32 logits; `what` names the op in errors.
pub(crate) fn pick_args<'a>(
    what: &str,
    state: &'a mut CudaStorage,
    sl: &Layout,
    logits: &'a CudaStorage,
    ll: &Layout,
) -> Result<(CudaViewMut<'a, u32>, CudaView<'a, f32>)> {
    if state.dtype() != DType::U32 || logits.dtype() != DType::F32 {
        candle_core::bail!(
            "{what}: expected a u32 state and f32 logits, got {} and {}",
            state.dtype().as_str(),
            logits.dtype().as_str()
        );
    }
    let (s0, s1) = state_range(sl, &format!("{what} state"))?;
    let (l0, l1) = contiguous(ll, &format!("{what} logits"))?;
    if l1 == l0 {
        candle_core::bail!("{what}: no logits");
    }
    let x = logits.as_cuda_slice::<f32>()?.slice(l0..l1);
    let st = state.as_cuda_slice_mut::<u32>()?.slice_mut(s0..s1);
    Ok((st, x))
}

impl candle_core::InplaceOp2 for GreedyNext {
    fn name(&self) -> &'static str {
        "greedy-next"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("greedy_next runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        state: &mut CudaStorage,
        sl: &Layout,
        logits: &CudaStorage,
        ll: &Layout,
    ) -> Result<()> {
        let (mut st, x) = pick_args("greedy_next", state, sl, logits, ll)?;
        let dev = logits.device().clone();
        let n = i32_arg(x.len())?;
        let f = func(&dev, "bitnet_greedy_next")?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&n).arg(&mut st);
        // SAFETY: argument types match the kernel; it reads n logits and writes the state.
        unsafe { b.launch(cfg((1, 1), GREEDY_THREADS)) }.w()?;
        Ok(())
    }
}

/// `Bf16LinearOp::embed_row`: row `state[0]` of the BF16 table `[rows, cols]` (uploaded once
/// into `cache`, shared with the op's products) as a `[1, cols]` tensor of `dtype` (f32 or bf16),
/// read on the device. An id out of range (only [`NAN_TOKEN`] can be) gives zeros.
pub(crate) fn embed_row(
    table: &[bf16],
    dims: (usize, usize),
    cache: &DeviceCache<bf16>,
    state: &Tensor,
    dtype: DType,
) -> Result<Tensor> {
    with_state(state, "embed_row", |ss, st| {
        let wbuf = cache.get_or_upload(ss.device(), table, bf16::ZERO)?;
        let wbuf: &CudaSlice<bf16> = &wbuf;
        lookup(&wbuf.slice(..), dims, ss, st, dtype)
    })
}

/// Row `state[0]` of `table`, a contiguous BF16 `[rows, cols]` tensor on the state's device, as
/// a `[1, cols]` tensor of `dtype` (f32 or bf16); zeros for an id out of range, as
/// `Bf16LinearOp::embed_row` gives. For a table that lives on the device only (e.g. uploaded
/// straight from a memory map).
pub fn embed_row_of(table: &Tensor, state: &Tensor, dtype: DType) -> Result<Tensor> {
    let (rows, cols) = table.dims2()?;
    let (guard, tl) = table.storage_and_layout();
    let candle_core::Storage::Cuda(ts) = &*guard else {
        candle_core::bail!("embed_row_of: the table must be on a CUDA device");
    };
    if ts.dtype() != DType::BF16 {
        candle_core::bail!(
            "embed_row_of: the table must be bf16, not {}",
            ts.dtype().as_str()
        );
    }
    let (t0, t1) = contiguous(tl, "embed_row_of table")?;
    let view = ts.as_cuda_slice::<bf16>()?.slice(t0..t1);
    with_state(state, "embed_row_of", |ss, st| {
        if ss.device().id() != ts.device().id() {
            candle_core::bail!("embed_row_of: the table and the state are on different devices");
        }
        lookup(&view, (rows, cols), ss, st, dtype)
    })
}

/// The lookup kernel over a device table `w` `[rows, cols]`.
fn lookup(
    w: &CudaView<'_, bf16>,
    (rows, cols): (usize, usize),
    ss: &CudaStorage,
    st: CudaView<'_, u32>,
    dtype: DType,
) -> Result<Tensor> {
    let dev = ss.device().clone();
    let (ri, ci) = (i32_arg(rows)?, i32_arg(cols)?);
    let grid = (cols.div_ceil(256).max(1), 1);
    let stream = dev.cuda_stream();
    macro_rules! run {
        ($t:ty, $name:literal) => {{
            // SAFETY: the kernel writes every one of the `cols` elements.
            let mut out = unsafe { dev.alloc::<$t>(cols.max(1))? };
            let f = func(&dev, $name)?;
            let mut b = stream.launch_builder(&f);
            b.arg(w).arg(&st).arg(&mut out).arg(&ri).arg(&ci);
            // SAFETY: argument types match the kernel's signature; it reads row state[0] of
            // the rows x cols table only when that id is in range.
            unsafe { b.launch(cfg(grid, 256)) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match dtype {
        DType::F32 => run!(f32, "bitnet_embed_row_f32"),
        DType::BF16 => run!(bf16, "bitnet_embed_row_bf16"),
        other => return Err(KernelError::UnsupportedDType(other.as_str()).into()),
    };
    Ok(Tensor::from_storage(
        candle_core::Storage::Cuda(out),
        Shape::from((1, cols)),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

/// A pinned host word that receives a state's token in stream order (see the module docs).
#[derive(Debug)]
pub struct TokenReadback {
    host: PinnedHostSlice<u32>,
    /// Recorded behind each copy. The pinned slice's own event is recorded only when cudarc
    /// tracks several streams, which candle's single stream does not, so it cannot be relied
    /// on to wait for the copy.
    copied: CudaEvent,
}

impl TokenReadback {
    /// A readback for the CUDA device `device`.
    pub fn new(device: &candle_core::Device) -> Result<Self> {
        let ctx = device.as_cuda_device()?.cuda_stream().context().clone();
        // SAFETY: the word is written by `queue`'s copy before `wait` reads it. Flags 0: plain
        // page-locked memory (the default, write-combined, is slow for the host to read).
        let host = unsafe { ctx.alloc_pinned_with_flags(1, 0) }.w()?;
        let copied = ctx.new_event(None).w()?;
        Ok(Self { host, copied })
    }

    /// Queues the copy of `state[0]` behind the work queued so far on the state's device.
    pub fn queue(&mut self, state: &Tensor) -> Result<()> {
        with_state(state, "TokenReadback", |ss, st| {
            let stream = ss.device().cuda_stream();
            stream.memcpy_dtoh(&st.slice(0..1), &mut self.host).w()?;
            self.copied.record(&stream).w()
        })
    }

    /// Waits for the last queued copy (not for what was queued after it) and returns the token.
    pub fn wait(&self) -> Result<u32> {
        self.copied.synchronize().w()?;
        let v = self.host.as_slice().w()?;
        Ok(v.first().copied().unwrap_or(NAN_TOKEN))
    }
}
