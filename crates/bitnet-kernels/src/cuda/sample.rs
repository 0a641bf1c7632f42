//! Sampling on the device: the next token drawn at a temperature, with top-k, top-p and min-p,
//! into a decode step's `[token, position]` state (see [`super::greedy`]), so a recorded step
//! samples without reading its logits back.
//!
//! The filters are the host sampler's (transformers' order; ranks by logit, then id): top-k keeps
//! the `top_k` best ranks, top-p the smallest prefix of those whose probability (renormalized
//! over them) reaches `top_p`, min-p the tokens at least `min_p` times as likely as the best.
//! The distribution is computed without sorting: each token's softmax numerator is held in 2^S
//! fixed point (`S = 62 − ⌈log₂ n⌉`, so any sum of them is an exact u64), each cut is found by
//! three histogram passes over the logits' order keys (11, 11 and 10 bits; by count for top-k,
//! by mass for top-p), and the draw walks the kept tokens in id order. Every sum is
//! an integer, so the token depends on nothing but the logits, the parameters and the position:
//! a CPU twin that sorts (tests/cuda.rs) picks the same token. Tokens with a weight below 2^−S of
//! the best (about e^−31 at 128k logits) are never drawn, where the host's f64 softmax could.
//!
//! The random number is splitmix64 of the seed and the state's position, so a recorded step
//! replays a new draw each time and a seed reproduces a run.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, Layout, Result, Tensor};

use super::greedy::pick_args;
use super::{cfg, func, i32_arg};

/// `sizeof(SampleWork)` in kernels/bitnet.cu: the scratch before the per-token weights.
const SAMPLE_WORK_BYTES: usize = 28728;
/// Logits per block of the sampling kernels (`SAMPLE_CHUNK`).
const SAMPLE_CHUNK: usize = 1024;
/// Most blocks the draw's last block can scan (`SAMPLE_MAX_BLOCKS`).
const SAMPLE_MAX_BLOCKS: usize = 1024;
/// Threads per block (`SAMPLE_THREADS`).
const SAMPLE_THREADS: usize = 256;

/// What [`DeviceSampler`] draws with: the host sampler's parameters at a temperature above 0
/// (a repetition penalty is applied to the logits before, by [`super::penalty`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DrawParams {
    /// Softmax temperature, > 0.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 (or at least the vocabulary) is off.
    pub top_k: u32,
    /// Top-p mass in (0, 1]; 1 is off.
    pub top_p: f32,
    /// Min-p in [0, 1); 0 is off.
    pub min_p: f32,
    /// Seed of the per-position random numbers.
    pub seed: u64,
}

impl DrawParams {
    /// The parameter words the kernels read (kernels/bitnet.cu, `load_params`).
    fn words(&self) -> Result<[u32; 6]> {
        let t = self.temperature;
        if !(t.is_finite() && t > 0.0) {
            candle_core::bail!("device sampling: temperature {t} must be finite and > 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            candle_core::bail!("device sampling: top_p {} must be in (0, 1]", self.top_p);
        }
        if !(0.0..1.0).contains(&self.min_p) {
            candle_core::bail!("device sampling: min_p {} must be in [0, 1)", self.min_p);
        }
        let seed = self.seed;
        Ok([
            t.to_bits(),
            self.top_p.to_bits(),
            self.min_p.to_bits(),
            self.top_k,
            seed as u32,
            (seed >> 32) as u32,
        ])
    }
}

/// The parameters and scratch of device sampling over `vocab` logits (see the module docs).
#[derive(Debug)]
pub struct DeviceSampler {
    params: CudaSlice<u32>,
    work: CudaSlice<u32>,
    vocab: usize,
    /// Whether the parameters cut by top-k (else its three passes are not launched).
    top_k: bool,
}

impl DeviceSampler {
    /// A sampler for `vocab` logits on the CUDA device `device`, drawing with `draw`.
    pub fn new(device: &candle_core::Device, vocab: usize, draw: &DrawParams) -> Result<Self> {
        if vocab == 0 || vocab > SAMPLE_CHUNK * SAMPLE_MAX_BLOCKS {
            candle_core::bail!(
                "device sampling: {vocab} logits (1..={} supported)",
                SAMPLE_CHUNK * SAMPLE_MAX_BLOCKS
            );
        }
        let dev = device.as_cuda_device()?;
        let stream = dev.cuda_stream();
        let params = stream.clone_htod(&draw.words()?).w()?;
        let work = stream
            .alloc_zeros::<u32>(SAMPLE_WORK_BYTES / 4 + 2 * vocab)
            .w()?;
        Ok(Self {
            params,
            work,
            vocab,
            top_k: top_k_cuts(draw, vocab),
        })
    }

    /// Whether [`DeviceSampler::next`] runs the top-k passes: a recording of it is only valid
    /// for parameters that agree on this.
    pub fn uses_top_k(&self) -> bool {
        self.top_k
    }

    /// Replaces the parameters in place (in stream order: a recorded step that samples with
    /// this sampler uses them from its next launch on, if [`DeviceSampler::uses_top_k`] has not
    /// changed).
    pub fn set_params(&mut self, params: &DrawParams) -> Result<()> {
        let words = params.words()?;
        let stream = self.params.stream().clone();
        stream.memcpy_htod(&words, &mut self.params).w()?;
        self.top_k = top_k_cuts(params, self.vocab);
        Ok(())
    }

    /// Five launches, eight with top-k: `state[0]` ← a token drawn from `logits` (f32 `[vocab]` or `[1, vocab]`
    /// on the state's device; [`super::greedy::NAN_TOKEN`] if any logit is NaN), `state[1]` += 1.
    pub fn next(&self, state: &Tensor, logits: &Tensor) -> Result<()> {
        state.inplace_op2(&logits.contiguous()?, &SampleNext { sampler: self })
    }
}

/// `top_k_on` in kernels/bitnet.cu: whether top-k removes any of `vocab` tokens.
fn top_k_cuts(draw: &DrawParams, vocab: usize) -> bool {
    draw.top_k > 0 && (draw.top_k as usize) < vocab
}

struct SampleNext<'a> {
    sampler: &'a DeviceSampler,
}

impl candle_core::InplaceOp2 for SampleNext<'_> {
    fn name(&self) -> &'static str {
        "sample-next"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("DeviceSampler runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        state: &mut CudaStorage,
        sl: &Layout,
        logits: &CudaStorage,
        ll: &Layout,
    ) -> Result<()> {
        let (mut st, x) = pick_args("DeviceSampler", state, sl, logits, ll)?;
        let s = self.sampler;
        if x.len() != s.vocab {
            candle_core::bail!("DeviceSampler: {} logits, built for {}", x.len(), s.vocab);
        }
        let dev = logits.device().clone();
        let n = i32_arg(s.vocab)?;
        let grid = (s.vocab.div_ceil(SAMPLE_CHUNK), 1);
        let stream = dev.cuda_stream();
        let f = func(&dev, "bitnet_sample_max")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&n).arg(&s.work);
        // SAFETY (each launch): argument types match the kernel; it reads n logits and writes
        // only the sampler's scratch (sized for n) and the two-word state.
        unsafe { b.launch(cfg(grid, SAMPLE_THREADS)) }.w()?;
        let f = func(&dev, "bitnet_sample_hist")?;
        // Passes 0-2 find the top-k cut, 3-5 the top-p cut (4 and 5 return at once without
        // top-p; 3 also stores the weights).
        let first = if s.top_k { 0i32 } else { 3 };
        for pass in first..6 {
            let mut b = stream.launch_builder(&f);
            b.arg(&x).arg(&n).arg(&s.params).arg(&s.work).arg(&pass);
            unsafe { b.launch(cfg(grid, SAMPLE_THREADS)) }.w()?;
        }
        let f = func(&dev, "bitnet_sample_draw")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&n).arg(&s.params).arg(&s.work).arg(&mut st);
        unsafe { b.launch(cfg(grid, SAMPLE_THREADS)) }.w()?;
        Ok(())
    }
}
