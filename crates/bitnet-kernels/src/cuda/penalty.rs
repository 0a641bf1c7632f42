//! The repetition penalty on the device, so that a recorded decode step ([`super::Graph`])
//! applies it before its argmax ([`super::greedy`]) or draw ([`super::sample`]) without
//! reading the logits back.
//!
//! It is the host sampler's (transformers' `repetition_penalty`, from the CTRL paper): each
//! distinct id among the last `window` tokens has its logit divided by the penalty when
//! non-negative and multiplied by it when negative, in f32, so the penalized logits are the
//! host's bit for bit (tests/cuda.rs). The tokens are a ring in device memory that every
//! application extends with the step's input token (`state[0]`); [`DevicePenalty::start`]
//! fills it from the tokens before that.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, DType, Layout, Result, Tensor};

use super::greedy::state_range;
use super::{cfg, contiguous, func, i32_arg};

/// Words before the ring in the history buffer (`bitnet_repeat_penalty`).
const HEADER: usize = 4;
/// Threads of `bitnet_repeat_penalty` (`PENALTY_THREADS`).
const PENALTY_THREADS: usize = 1024;

/// The history ring and scratch of the repetition penalty over `vocab` logits.
#[derive(Debug)]
pub struct DevicePenalty {
    /// `[penalty bits, window, epoch, count, ring[capacity]]`.
    hist: CudaSlice<u32>,
    /// Per id, the epoch of the last application that penalized it.
    seen: CudaSlice<u32>,
    capacity: usize,
    vocab: usize,
}

impl DevicePenalty {
    /// A penalty over `vocab` logits on the CUDA device `device`, for windows of up to
    /// `capacity` tokens (a model's context bounds every window it needs).
    pub fn new(device: &candle_core::Device, vocab: usize, capacity: usize) -> Result<Self> {
        if vocab == 0 || capacity == 0 {
            candle_core::bail!("device penalty: {vocab} logits, capacity {capacity}: need both");
        }
        i32_arg(vocab)?;
        u32::try_from(capacity)
            .map_err(|_| candle_core::Error::Msg(format!("device penalty: {capacity} tokens")))?;
        let stream = device.as_cuda_device()?.cuda_stream();
        let hist = stream.alloc_zeros::<u32>(HEADER + capacity).w()?;
        let seen = stream.alloc_zeros::<u32>(vocab).w()?;
        Ok(Self {
            hist,
            seen,
            capacity,
            vocab,
        })
    }

    /// Starts a decoding (in stream order): `penalty` (finite, > 0) over the last `window`
    /// tokens (1..=capacity), of which `before` are those before the first step's input token.
    pub fn start(&mut self, penalty: f32, window: usize, before: &[u32]) -> Result<()> {
        if !(penalty.is_finite() && penalty > 0.0) {
            candle_core::bail!("device penalty: {penalty} must be finite and > 0");
        }
        if window == 0 || window > self.capacity {
            candle_core::bail!(
                "device penalty: window {window} (1..={} supported)",
                self.capacity
            );
        }
        // The ring holds entry j at j % window, as if each had been appended in turn; the
        // newest `window` are all that can still count.
        let tail = &before[before.len().saturating_sub(window)..];
        let mut words = Vec::with_capacity(HEADER + tail.len());
        words.extend([penalty.to_bits(), window as u32, 0, tail.len() as u32]);
        words.extend_from_slice(tail);
        let stream = self.hist.stream().clone();
        stream
            .memcpy_htod(&words, &mut self.hist.slice_mut(0..words.len()))
            .w()?;
        stream.memset_zeros(&mut self.seen).w()
    }

    /// One launch: appends `state[0]` to the ring, then penalizes `logits` (f32 `[vocab]` or
    /// `[1, vocab]`, contiguous, on the state's device) in place.
    pub fn apply(&self, logits: &Tensor, state: &Tensor) -> Result<()> {
        logits.inplace_op2(state, &Penalize { penalty: self })
    }
}

struct Penalize<'a> {
    penalty: &'a DevicePenalty,
}

impl candle_core::InplaceOp2 for Penalize<'_> {
    fn name(&self) -> &'static str {
        "repeat-penalty"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("DevicePenalty runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        logits: &mut CudaStorage,
        ll: &Layout,
        state: &CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        if logits.dtype() != DType::F32 || state.dtype() != DType::U32 {
            candle_core::bail!(
                "DevicePenalty: expected f32 logits and a u32 state, got {} and {}",
                logits.dtype().as_str(),
                state.dtype().as_str()
            );
        }
        let p = self.penalty;
        let (l0, l1) = contiguous(ll, "DevicePenalty logits")?;
        if l1 - l0 != p.vocab {
            candle_core::bail!("DevicePenalty: {} logits, built for {}", l1 - l0, p.vocab);
        }
        let (s0, s1) = state_range(sl, "DevicePenalty state")?;
        let dev = state.device().clone();
        let st = state.as_cuda_slice::<u32>()?.slice(s0..s1);
        let mut x = logits.as_cuda_slice_mut::<f32>()?.slice_mut(l0..l1);
        let n = i32_arg(p.vocab)?;
        let f = func(&dev, "bitnet_repeat_penalty")?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&mut x).arg(&n).arg(&st).arg(&p.hist).arg(&p.seen);
        // SAFETY: argument types match the kernel; it changes at most n logits, reads the
        // state and writes only this penalty's buffers (the ring within its window).
        unsafe { b.launch(cfg((1, 1), PENALTY_THREADS)) }.w()?;
        Ok(())
    }
}
