//! Decoding one token on a CUDA device: single-token attention kernels and a CUDA graph.
//!
//! At batch 1 the 2B-4T decode step through the general path is ~750 candle ops. Each is
//! dispatched from the host (allocation, launch: ~10 µs), so the host, not the GPU, set the pace:
//! 8.3 ms per token with ~3.4 ms of kernels. This path changes two things:
//!
//! - attention uses the kernel crate's single-token op (`cuda::attention`): RoPE, the cache
//!   write and attention in one launch per layer instead of ~15 ops;
//! - the step (all layers, final norm, LM head) is recorded once as a CUDA graph and replayed
//!   with one launch per token. A recording replays fixed pointers and shapes, so the step
//!   reads its inputs from fixed tensors (the embedded token, its position) and writes the
//!   logits into a fixed tensor; the position-dependent kernels read the position from device
//!   memory. The recording writes into the KV buffers, so it is redone when they are regrown
//!   or dropped.
//! - the step ends with the next token picked on the device: the argmax (`cuda::greedy`) or,
//!   at a temperature, a draw with top-k, top-p and min-p (`cuda::sample`), after a repetition
//!   penalty if there is one (`cuda::penalty`, which keeps the recent tokens on the device).
//!   Its input is a `[token, position]` state in device memory that the step advances, and the
//!   embedding row is looked up there too (BF16 tables). Decoding
//!   ([`ForCausalLM::decode_on_cuda`]) then queues step `n + 1` before reading step `n`'s token
//!   (four bytes instead of the 513 KB of logits), so the GPU does not wait for the host
//!   between steps.
//!
//! The first step after (re)allocation runs eagerly (which also loads kernels and uploads
//! weights, as recording requires) and is then recorded. If recording fails (an op that
//! synchronizes with the host, e.g. a CPU-side LM head), decoding stays eager.

use bitnet_kernels::cuda::attention::{self, Rope, MAX_HEAD_DIM};
use bitnet_kernels::cuda::greedy::{self, TokenReadback, NAN_TOKEN};
use bitnet_kernels::cuda::penalty::DevicePenalty;
use bitnet_kernels::cuda::sample::{DeviceSampler, DrawParams};
use bitnet_kernels::cuda::{copy_from_host, Graph};
use candle_core::{DType, Device, Module, Tensor, TensorId};

use super::{project, Attention, ForCausalLM, Model, RmsNorm, RotaryEmbedding, Stream};
use crate::cache::Cache;
use crate::head::LmHead;

/// The fixed tensors of the decode step and its recording (empty in a clone).
#[derive(Debug, Default)]
pub(crate) struct DecodeGraph {
    io: Option<StepIo>,
    /// The recording, the KV buffers it wrote and how it picks the token.
    recorded: Option<(Vec<TensorId>, Pick, Graph)>,
    /// Why recording failed, if it did (decoding then stays eager).
    failed: Option<String>,
    /// Where decoding on the device reads each token.
    readback: Option<TokenReadback>,
    /// The draw of the last sampled decoding, kept for its recording.
    sampler: Option<DeviceSampler>,
    /// The repetition penalty of the last decoding that had one, kept for its recording.
    penalty: Option<DevicePenalty>,
}

/// What decoding on the device picks each token with (the host sampler's parameters): a draw,
/// else the argmax, after a repetition penalty (factor, window in tokens) if there is one.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct DevicePick {
    pub draw: Option<DrawParams>,
    pub penalty: Option<(f32, usize)>,
}

/// How a step picks its token, as far as its recording depends on it: the decode graph's
/// penalty first or not; its sampler's draw (with the top-k passes or not) or the argmax.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Pick {
    penalty: bool,
    draw: Option<bool>,
}

impl Clone for DecodeGraph {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// Inputs and output of one recorded step.
#[derive(Debug)]
struct StepIo {
    /// `[token, position]` u32: the step's input, replaced by the next token and position.
    state: Tensor,
    /// The embedded token, `[1, 1, hidden]` in the model dtype, written by the host when the
    /// embedding is not looked up on the device.
    x: Tensor,
    /// The step's logits, `[1, vocab]` f32.
    logits: Tensor,
}

impl Attention {
    /// Attention of `norm(x)` for one token at position `pos` (device tensor), appending to the
    /// `k`/`v` cache buffers; `x` is formed from `stream` and returned with the output.
    fn decode(
        &self,
        stream: &Stream,
        norm: &RmsNorm,
        rope: &RotaryEmbedding,
        pos: &Tensor,
        (k_cache, v_cache): (&Tensor, &Tensor),
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let rope = Rope {
            cos: &rope.cos,
            sin: &rope.sin,
        };
        let qkv = [&self.q_proj, &self.k_proj, &self.v_proj];
        let (sum, [q, k, v]) = project(stream.input(), Some(norm), qkv)?;
        let x = stream.resolve(sum)?;
        let new_kv = Some((&k, &v));
        let out =
            attention::decode_attention(&q, new_kv, k_cache, v_cache, pos, rope, self.num_heads)?;
        Ok((x, self.output(&out)?))
    }
}

/// One decode step from `io.state` into `io.logits` and the next state (after `penalty`, the
/// argmax, or a draw by `sampler`): what is recorded and replayed.
fn step(
    model: &Model,
    head: &LmHead,
    cache: &Cache,
    io: &StepIo,
    (penalty, sampler): (Option<&DevicePenalty>, Option<&DeviceSampler>),
) -> candle_core::Result<()> {
    let buffers = cache.buffers()?;
    let embed = &model.embed_tokens;
    let x = if embed.looks_up_on_device() {
        embed.forward_on_device(&io.state)?.reshape(io.x.shape())?
    } else {
        io.x.clone()
    };
    let pos = io.state.narrow(0, 1, 1)?;
    let mut x = Stream::new(x);
    for (layer, kv) in model.layers.iter().zip(buffers) {
        x = layer.forward(&x, |attn, stream, norm| {
            attn.decode(stream, norm, &model.rotary, &pos, kv)
        })?;
    }
    let hidden = model.norm.forward(&x.sum()?)?;
    let h = hidden.dim(2)?;
    let logits = head.forward(&hidden.reshape((1, h))?)?;
    io.logits.slice_set(&logits, 0, 0)?;
    if let Some(p) = penalty {
        p.apply(&io.logits, &io.state)?;
    }
    match sampler {
        Some(s) => s.next(&io.state, &io.logits),
        None => greedy::greedy_next(&io.state, &io.logits),
    }
}

/// `offset` as a device position.
fn position(offset: usize) -> candle_core::Result<u32> {
    u32::try_from(offset)
        .map_err(|_| candle_core::Error::Msg(format!("position {offset} exceeds u32")))
}

impl ForCausalLM {
    /// True when [`ForCausalLM::decode_cuda`] handles a `[batch, t]` step.
    pub(super) fn decodes_on_cuda(&self, batch: usize, t: usize) -> bool {
        let hd = self.config.head_dim;
        batch == 1
            && t == 1
            && self.device().is_cuda()
            && hd.is_multiple_of(2)
            && hd <= MAX_HEAD_DIM
    }

    /// Logits `[1, vocab]` for token `id` at `offset` (cache already rewound).
    pub(super) fn decode_cuda(&mut self, id: u32, offset: usize) -> candle_core::Result<Tensor> {
        let r = self.decode_cuda_inner(id, offset);
        if r.is_err() {
            // As in `hidden`: a failed step may have written some layers only.
            self.cache.clear();
        }
        r
    }

    fn decode_cuda_inner(&mut self, id: u32, offset: usize) -> candle_core::Result<Tensor> {
        let state = [id, position(offset)?];
        let embed = &self.model.embed_tokens;
        let x = if embed.looks_up_on_device() {
            None
        } else {
            // The table lives on the host (or is F32): look the row up there.
            Some(embed.forward(&Tensor::new(&[id], &Device::Cpu)?)?)
        };
        let io = self.step_io()?;
        if let Some(x) = x {
            io.x.slice_set(&x.reshape(io.x.shape())?, 0, 0)?;
        }
        copy_from_host(&io.state, &Tensor::new(&state, &Device::Cpu)?)?;
        self.run_step(offset, Pick::default())?;
        self.step_io()?.logits.copy()
    }

    /// The step's fixed tensors, allocated on first use.
    fn step_io(&mut self) -> candle_core::Result<&StepIo> {
        let dev = self.device().clone();
        let c = &self.config;
        let (hidden, vocab, dtype) = (c.hidden_size, c.vocab_size, self.model.dtype);
        match &mut self.decode_graph.io {
            Some(io) => Ok(io),
            io @ None => Ok(io.insert(StepIo {
                state: Tensor::zeros(2, DType::U32, &dev)?,
                x: Tensor::zeros((1, 1, hidden), dtype, &dev)?,
                logits: Tensor::zeros((1, vocab), DType::F32, &dev)?,
            })),
        }
    }

    /// Queues the step at `offset` from the state already on the device, ending with `pick`
    /// (through the sampler and penalty set up by [`ForCausalLM::decode_on_cuda`]): replays
    /// the recording, or runs the step eagerly and records it when the KV buffers or the pick
    /// are new.
    fn run_step(&mut self, offset: usize, pick: Pick) -> candle_core::Result<()> {
        let max = self.max_context();
        let dev = self.device().clone();
        let c = &self.config;
        let dims = (1, c.num_key_value_heads, c.head_dim);
        self.cache.reserve(dims, offset + 1, max, &dev)?;
        self.step_io()?;
        let DecodeGraph {
            io,
            recorded,
            failed,
            sampler,
            penalty,
            ..
        } = &mut self.decode_graph;
        let Some(io) = io else {
            candle_core::bail!("decode step tensors missing");
        };
        let sampler = match (pick.draw, sampler) {
            (None, _) => None,
            (Some(top_k), Some(s)) if s.uses_top_k() == top_k => Some(&*s),
            (Some(_), _) => candle_core::bail!("decode step: the device sampler is not set up"),
        };
        let penalty = match (pick.penalty, penalty) {
            (false, _) => None,
            (true, Some(p)) => Some(&*p),
            (true, None) => candle_core::bail!("decode step: the device penalty is not set up"),
        };
        let pickers = (penalty, sampler);
        let ids_now = self.cache.buffer_ids();
        match recorded {
            Some((ids, p, g)) if self.cuda_graphs && *ids == ids_now && *p == pick => g.launch()?,
            _ => {
                *recorded = None;
                step(&self.model, &self.lm_head, &self.cache, io, pickers)?;
                if self.cuda_graphs && failed.is_none() {
                    let cuda = dev.as_cuda_device()?;
                    let (model, head, cache) = (&self.model, &self.lm_head, &self.cache);
                    match Graph::capture(cuda, || step(model, head, cache, io, pickers)) {
                        Ok(g) => *recorded = Some((ids_now, pick, g)),
                        Err(e) => *failed = Some(e.to_string()),
                    }
                }
            }
        }
        self.cache.advance_layers(1);
        Ok(())
    }

    /// True when [`ForCausalLM::decode_on_cuda`] runs on the device: a CUDA decode step whose
    /// embedding rows are looked up there, unless turned off
    /// ([`ForCausalLM::set_device_sampling`]).
    pub(crate) fn picks_on_cuda(&self) -> bool {
        self.device_sampling
            && self.decodes_on_cuda(1, 1)
            && self.model.embed_tokens.looks_up_on_device()
    }

    /// Decoding on the device (see the module docs and `generation::decode`, which checks the
    /// context and whose contract this keeps): feeds the last of `history` (the tokens so far)
    /// at `offset`, then each next token picked by `pick`, until `on_token` returns false or
    /// `max_tokens` were produced; returns how many were.
    pub(crate) fn decode_on_cuda<E: From<candle_core::Error>>(
        &mut self,
        history: &[u32],
        offset: usize,
        max_tokens: usize,
        pick: &DevicePick,
        mut on_token: impl FnMut(u32) -> Result<bool, E>,
    ) -> Result<usize, E> {
        if max_tokens == 0 {
            return Ok(0);
        }
        let r = self.device_steps(history, offset, max_tokens, pick, &mut on_token);
        if matches!(r, Err(Fail::Model(_))) {
            // As in `decode_cuda`: a failed step may have written some layers only.
            self.cache.clear();
        }
        r.map_err(|e| match e {
            Fail::Model(e) => E::from(e),
            Fail::Caller(e) => e,
        })
    }

    fn device_steps<E>(
        &mut self,
        history: &[u32],
        offset: usize,
        max_tokens: usize,
        pick: &DevicePick,
        on_token: &mut impl FnMut(u32) -> Result<bool, E>,
    ) -> Result<usize, Fail<E>> {
        let Some((&token, before)) = history.split_last() else {
            return Err(Fail::Model(candle_core::Error::Msg(
                "decoding needs the last token so far".into(),
            )));
        };
        // `prepare` checks the token and rewinds the cache; the caller checked that the last
        // step, at `offset + max_tokens - 1`, is inside the context.
        self.prepare(&Tensor::new(&[[token]], &Device::Cpu)?, offset)?;
        let state = [token, position(offset)?];
        copy_from_host(&self.step_io()?.state, &Tensor::new(&state, &Device::Cpu)?)?;
        let step_pick = self.set_up_pick(pick, before)?;
        let mut readback = match self.decode_graph.readback.take() {
            Some(r) => r,
            None => TokenReadback::new(self.device())?,
        };
        let r = self.pipeline(offset, max_tokens, step_pick, &mut readback, on_token);
        self.decode_graph.readback = Some(readback);
        r
    }

    /// Loads `pick`'s parameters (and `before`, the tokens before the first input, into the
    /// penalty's history) into the decode graph's sampler and penalty, made on first use.
    fn set_up_pick(&mut self, pick: &DevicePick, before: &[u32]) -> candle_core::Result<Pick> {
        let (device, vocab) = (self.device().clone(), self.config.vocab_size);
        // A window beyond the context holds the whole history, as the context-long one does.
        let capacity = self.max_context().max(1);
        let graph = &mut self.decode_graph;
        let draw = match &pick.draw {
            None => None,
            Some(draw) => {
                let s = match &mut graph.sampler {
                    Some(s) => {
                        s.set_params(draw)?;
                        s
                    }
                    s @ None => s.insert(DeviceSampler::new(&device, vocab, draw)?),
                };
                Some(s.uses_top_k())
            }
        };
        let penalty = match pick.penalty {
            Some((factor, window)) if factor != 1.0 && window > 0 => {
                let p = match &mut graph.penalty {
                    Some(p) => p,
                    p @ None => p.insert(DevicePenalty::new(&device, vocab, capacity)?),
                };
                p.start(factor, window.min(capacity), before)?;
                true
            }
            _ => false,
        };
        Ok(Pick { penalty, draw })
    }

    /// The loop of [`ForCausalLM::decode_on_cuda`] after its checks: the copy of token `i` is
    /// queued behind step `i - 1` and read after step `i` is queued.
    fn pipeline<E>(
        &mut self,
        offset: usize,
        max_tokens: usize,
        pick: Pick,
        readback: &mut TokenReadback,
        on_token: &mut impl FnMut(u32) -> Result<bool, E>,
    ) -> Result<usize, Fail<E>> {
        self.run_step(offset, pick)?;
        readback.queue(&self.step_io()?.state)?;
        let mut produced = 0;
        loop {
            produced += 1;
            let more = produced < max_tokens;
            if more {
                self.run_step(offset + produced, pick)?;
            }
            let token = readback.wait()?;
            if token == NAN_TOKEN {
                return Err(Fail::Model(candle_core::Error::Msg(
                    "the model produced NaN logits".into(),
                )));
            }
            let go = on_token(token).map_err(Fail::Caller)?;
            if !(go && more) {
                if more {
                    // The queued step fed this token; the contract leaves it out of the cache.
                    self.cache.seek(offset + produced)?;
                }
                return Ok(produced);
            }
            readback.queue(&self.step_io()?.state)?;
        }
    }
}

/// An error of the model or of the caller's callback (passed through unchanged).
enum Fail<E> {
    Model(candle_core::Error),
    Caller(E),
}

impl<E> From<candle_core::Error> for Fail<E> {
    fn from(e: candle_core::Error) -> Self {
        Fail::Model(e)
    }
}

impl DecodeGraph {
    /// Why recording failed, if it did.
    pub(super) fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }
}
