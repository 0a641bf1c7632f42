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
//!
//! The first step after (re)allocation runs eagerly (which also loads kernels and uploads
//! weights, as recording requires) and is then recorded. If recording fails (an op that
//! synchronizes with the host, e.g. a CPU-side LM head), decoding stays eager.

use bitnet_kernels::cuda::attention::{self, Rope, MAX_HEAD_DIM};
use bitnet_kernels::cuda::{copy_from_host, Graph};
use candle_core::{DType, Device, Module, Tensor, TensorId};

use super::{project, Attention, ForCausalLM, Model, RmsNorm, RotaryEmbedding, Stream};
use crate::cache::Cache;
use crate::head::LmHead;

/// The fixed tensors of the decode step and its recording (empty in a clone).
#[derive(Debug, Default)]
pub(crate) struct DecodeGraph {
    io: Option<StepIo>,
    recorded: Option<(Vec<TensorId>, Graph)>,
    /// Why recording failed, if it did (decoding then stays eager).
    failed: Option<String>,
}

impl Clone for DecodeGraph {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// Inputs and output of one recorded step.
#[derive(Debug)]
struct StepIo {
    /// The embedded token, `[1, 1, hidden]` in the model dtype.
    x: Tensor,
    /// Its position, `[1]` u32.
    pos: Tensor,
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

/// One decode step from `io.x` at `io.pos` into `io.logits`: what is recorded and replayed.
fn step(model: &Model, head: &LmHead, cache: &Cache, io: &StepIo) -> candle_core::Result<()> {
    let buffers = cache.buffers()?;
    let mut x = Stream::new(io.x.clone());
    for (layer, kv) in model.layers.iter().zip(buffers) {
        x = layer.forward(&x, |attn, stream, norm| {
            attn.decode(stream, norm, &model.rotary, &io.pos, kv)
        })?;
    }
    let hidden = model.norm.forward(&x.sum()?)?;
    let h = hidden.dim(2)?;
    let logits = head.forward(&hidden.reshape((1, h))?)?;
    io.logits.slice_set(&logits, 0, 0)
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
        let max = self.max_context();
        let dev = self.device().clone();
        let c = &self.config;
        let dims = (1, c.num_key_value_heads, c.head_dim);
        let (hidden, vocab) = (c.hidden_size, c.vocab_size);
        self.cache.reserve(dims, offset + 1, max, &dev)?;
        // The lookup reads the host id (the table lives on the host unless it is F32).
        let x = self
            .model
            .embed_tokens
            .forward(&Tensor::new(&[id], &Device::Cpu)?)?
            .reshape((1, 1, hidden))?;
        let dtype = self.model.dtype;
        let graph = &mut self.decode_graph;
        let io = match &mut graph.io {
            Some(io) => io,
            io @ None => io.insert(StepIo {
                x: Tensor::zeros((1, 1, hidden), dtype, &dev)?,
                pos: Tensor::zeros(1, DType::U32, &dev)?,
                logits: Tensor::zeros((1, vocab), DType::F32, &dev)?,
            }),
        };
        io.x.slice_set(&x, 0, 0)?;
        let position = u32::try_from(offset)
            .map_err(|_| candle_core::Error::Msg(format!("position {offset} exceeds u32")))?;
        copy_from_host(&io.pos, &Tensor::new(&[position], &Device::Cpu)?)?;
        let ids_now = self.cache.buffer_ids();
        match &graph.recorded {
            Some((ids, g)) if self.cuda_graphs && *ids == ids_now => g.launch()?,
            _ => {
                graph.recorded = None;
                step(&self.model, &self.lm_head, &self.cache, io)?;
                if self.cuda_graphs && graph.failed.is_none() {
                    let cuda = dev.as_cuda_device()?;
                    let (model, head, cache) = (&self.model, &self.lm_head, &self.cache);
                    match Graph::capture(cuda, || step(model, head, cache, io)) {
                        Ok(g) => graph.recorded = Some((ids_now, g)),
                        Err(e) => graph.failed = Some(e.to_string()),
                    }
                }
            }
        }
        self.cache.advance_layers(1);
        io.logits.copy()
    }
}

impl DecodeGraph {
    /// Why recording failed, if it did.
    pub(super) fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }
}
