//! The BitNet b1.58 decoder: a Llama-shaped transformer whose linear layers are ternary.
//!
//! BitNet b1.58 ([Ma et al., 2024, arXiv 2402.17764](https://arxiv.org/abs/2402.17764)) keeps
//! the Llama block — pre-norm RMSNorm, rotary attention with grouped-query heads, gated MLP —
//! and replaces every linear layer inside the blocks with a [`BitLinear`]: weights −1/0/+1 with
//! one scale per matrix, activations quantized per token to int8. Embeddings, norms and the LM
//! head stay in floating point. microsoft/bitnet-b1.58-2B-4T
//! ([technical report, arXiv 2504.12285](https://arxiv.org/abs/2504.12285)) adds two changes,
//! selected here by [`Family::BitNet`]:
//!
//! - **ReLU²** instead of SiLU in the gated MLP: `down(relu(gate(x))² · up(x))`;
//! - **SubLN sub-norms** (`attn_sub_norm`, `ffn_sub_norm`): an extra RMSNorm on the *input* of
//!   `o_proj` and of `down_proj`. These are the SubLN of Magneto/BitNet (Wang et al., 2023):
//!   the attention output and the MLP's hidden product have no norm in front of them, so their
//!   scale drifts; re-normalizing them gives the per-token int8 absmax quantization of those
//!   BitLinear inputs a well-scaled distribution, which is what keeps low-bit training stable.
//!   At inference they are just two more RMSNorms that must sit exactly there.
//!
//! Numerics follow transformers' `BitNetForCausalLM` / `LlamaForCausalLM` with the bitnet
//! quantizer (eager attention), the reference the tests compare against:
//!
//! - RMSNorm normalizes in f32, casts to the model dtype, *then* multiplies by the weight;
//! - RoPE is the half-split "rotate_half" form, cos/sin computed in f32 and cast to the model
//!   dtype;
//! - attention scores, softmax and the weighted sum are computed in f32 (transformers does the
//!   softmax in f32; for bf16 models doing the two matmuls in f32 too only removes rounding);
//! - the LM head is a float matmul computed in f32, returning f32 logits; its weight stays in
//!   BF16 when that is lossless (a BF16 checkpoint) and decoding uses a BF16×f32 GEMV for it.
//!
//! The model runs in f32 or bf16. f16 is refused: ReLU² of BitNet activations overflows it.

use std::collections::HashSet;
use std::path::Path;

use bitnet_kernels::{Bf16Matrix, LinearInput, RmsNormOp};
use candle_core::{DType, Device, Module, Tensor};
use half::bf16;

use crate::bitlinear::{self, BitLinear, Stored};
use crate::cache::{Cache, LayerCache};
use crate::config::{config_path, Config, Family, QuantizationMode};
use crate::error::{Error, Result};
use crate::head::{Embedding, HeadFormat, LmHead, Table};
use crate::weights::Weights;

#[cfg(feature = "cuda")]
mod decode;
#[cfg(feature = "cuda")]
pub(crate) use decode::DevicePick;

/// Default number of prompt tokens processed per forward step on the CPU (see
/// [`ForCausalLM::set_prefill_chunk`]).
///
/// The ternary GEMM is as efficient at 128 tokens as at 512 (it works in blocks of 16), while
/// attention computes the full `chunk × context` score matrix, masked or not: chunks of 128
/// skip most of the masked half. On the 2B-4T shapes (2 CPU threads) pp512 ran ~10% faster
/// than with one 512-token step.
pub const DEFAULT_PREFILL_CHUNK: usize = 128;

/// The default on a GPU, where each step pays a fixed launch overhead of several ms.
pub const DEFAULT_PREFILL_CHUNK_GPU: usize = 512;

/// Tracks which checkpoint tensors the model used, to report the ones it did not.
struct Loader<'a> {
    weights: &'a Weights,
    config: &'a Config,
    dtype: DType,
    device: &'a Device,
    used: HashSet<String>,
    warnings: Vec<String>,
    /// Linears stored differently from what `quantization_mode` says (reported once, at the end).
    off_mode: Vec<String>,
    head: HeadFormat,
}

impl Loader<'_> {
    fn float(&mut self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let t = self
            .weights
            .get(name)?
            .to_tensor(shape, dtype, self.device)?;
        self.used.insert(name.to_string());
        self.weights.release(name);
        Ok(t)
    }

    /// A large float matrix (embedding, LM head): BF16 when that loses nothing (BF16 on disk)
    /// or when the model runs in BF16 anyway (transformers rounds it too), else F32.
    fn table(&mut self, name: &str, shape: &[usize], is_head: bool) -> Result<Table> {
        let t = self.weights.get(name)?;
        let table = if is_head && self.head != HeadFormat::Exact {
            // Quantize straight from the mapped BF16 bytes when possible, so no full-precision
            // copy of the head (2B-4T: 657 MB) ever exists next to the quantized one.
            // SAFETY: every bit pattern is a valid bf16; the checkpoint is little-endian, as
            // every machine this runs on.
            let (pre, mapped, post) = unsafe { t.data.align_to::<bf16>() };
            let copied: Vec<bf16>;
            let values = if t.dtype == safetensors::Dtype::BF16
                && t.shape == shape
                && pre.is_empty()
                && post.is_empty()
                && cfg!(target_endian = "little")
            {
                mapped
            } else {
                copied = t
                    .to_f32_vec(shape)?
                    .into_iter()
                    .map(bf16::from_f32)
                    .collect();
                &copied
            };
            self.head
                .table(values, shape[0], shape[1])
                .map_err(|e| t.bad(e.to_string()))?
        } else if self.dtype == DType::BF16 || t.dtype == safetensors::Dtype::BF16 {
            let values: Vec<bf16> = if t.dtype == safetensors::Dtype::BF16 && t.shape == shape {
                // Piece by piece, releasing each piece's mapped pages once copied: the 2B-4T
                // table is 657 MB, and mapped + copied at once it set the load's peak RSS.
                const PIECE: usize = 32 << 20;
                let mut v = Vec::with_capacity(t.data.len() / 2);
                for (i, piece) in t.data.chunks(PIECE).enumerate() {
                    v.extend(
                        piece
                            .chunks_exact(2)
                            .map(|b| bf16::from_le_bytes([b[0], b[1]])),
                    );
                    self.weights
                        .release_part(name, i * PIECE..i * PIECE + piece.len());
                }
                v
            } else {
                t.to_f32_vec(shape)?
                    .into_iter()
                    .map(bf16::from_f32)
                    .collect()
            };
            let m =
                Bf16Matrix::new(values, shape[0], shape[1]).map_err(|e| t.bad(e.to_string()))?;
            Table::bf16(m)
        } else {
            Table::F32(t.to_tensor(shape, DType::F32, self.device)?)
        };
        self.used.insert(name.to_string());
        self.weights.release(name);
        Ok(table)
    }

    fn norm(&mut self, name: &str, size: usize) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: self.float(name, &[size], self.dtype)?,
            eps: self.config.rms_norm_eps,
        })
    }

    /// A sub-norm under whichever of `names` the checkpoint has, or `None` if it has none.
    fn optional_norm(&mut self, names: &[String], size: usize) -> Result<Option<RmsNorm>> {
        match names.iter().find(|n| self.weights.contains(n)) {
            Some(n) => Ok(Some(self.norm(n, size)?)),
            None => Ok(None),
        }
    }

    fn linear(&mut self, name: &str, out: usize, inp: usize) -> Result<BitLinear> {
        let (layer, stored) = bitlinear::load(
            self.weights,
            name,
            out,
            inp,
            self.config.scale_convention,
            self.dtype,
        )?;
        self.used.insert(name.to_string());
        let expected = match self.config.quantization_mode {
            QuantizationMode::Offline => Stored::Packed,
            QuantizationMode::Online => Stored::Float,
        };
        if stored != expected {
            self.off_mode.push(name.to_string());
        }
        if stored == Stored::Packed {
            self.used.insert(format!("{name}_scale"));
        }
        self.weights.release(name);
        if layer.is_all_zero() {
            self.warnings.push(format!(
                "{name}: every ternary weight is zero, so this layer outputs zeros; the \
                 checkpoint is probably broken (some Hub revisions of the 2B-4T repos are \
                 reported to be): re-download a known-good revision"
            ));
        }
        Ok(layer)
    }
}

/// Root-mean-square norm, in transformers' order: normalize in f32, cast, multiply by weight.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // transformers' LlamaRMSNorm op for op: h = x·rsqrt(mean(x²) + eps) in f32, cast, then
        // weight·h. (candle's fused rms_norm rounds differently; on these models a last-bit
        // difference can flip an int8 activation rounding downstream, so the order matters.)
        // The kernel crate's op does exactly that in one pass (CPU) or one launch (CUDA).
        RmsNormOp::new(self.eps).forward(x, &self.weight)
    }
}

/// Rotary position embedding tables (half-split "rotate_half" form), `[max_positions, head_dim/2]`.
#[derive(Clone, Debug)]
pub struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    /// Tables for `config.max_position_embeddings` positions in `dtype`.
    ///
    /// Computed as transformers does, in f32: `inv_freq = 1 / θ^(2i/d)`, `angle = pos · inv_freq`.
    pub fn new(config: &Config, dtype: DType, device: &Device) -> candle_core::Result<Self> {
        let d = config.head_dim;
        let theta = config.rope_theta as f32;
        let inv_freq: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32))
            .collect();
        let n = config.max_position_embeddings;
        let mut cos = Vec::with_capacity(n * d / 2);
        let mut sin = Vec::with_capacity(n * d / 2);
        for pos in 0..n {
            for &f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let table = |v: Vec<f32>| Tensor::from_vec(v, (n, d / 2), device)?.to_dtype(dtype);
        Ok(Self {
            cos: table(cos)?,
            sin: table(sin)?,
        })
    }

    /// Rotates `q` and `k` (`[batch, heads, t, head_dim]`) for positions `offset..offset + t`.
    pub fn apply(
        &self,
        q: &Tensor,
        k: &Tensor,
        offset: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let t = q.dim(2)?;
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        Ok((
            candle_nn::rotary_emb::rope(&q.contiguous()?, &cos, &sin)?,
            candle_nn::rotary_emb::rope(&k.contiguous()?, &cos, &sin)?,
        ))
    }
}

/// Causal self-attention with grouped-query heads and ternary projections.
#[derive(Clone, Debug)]
pub struct Attention {
    q_proj: BitLinear,
    k_proj: BitLinear,
    v_proj: BitLinear,
    o_proj: BitLinear,
    /// SubLN before `o_proj` (`attn_sub_norm`; 1bitLLM: `inner_attn_ln`). See the module docs.
    sub_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(l: &mut Loader<'_>, prefix: &str) -> Result<Self> {
        let c = l.config;
        let (h, nh, nkv, hd) = (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        );
        let p = |n: &str| format!("{prefix}.self_attn.{n}");
        let sub_norm = match c.family {
            Family::BitNet => Some(l.norm(&p("attn_sub_norm.weight"), h)?),
            Family::Llama => l.optional_norm(&[p("inner_attn_ln.weight")], h)?,
        };
        Ok(Self {
            q_proj: l.linear(&p("q_proj.weight"), nh * hd, h)?,
            k_proj: l.linear(&p("k_proj.weight"), nkv * hd, h)?,
            v_proj: l.linear(&p("v_proj.weight"), nkv * hd, h)?,
            o_proj: l.linear(&p("o_proj.weight"), h, nh * hd)?,
            sub_norm,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        })
    }

    /// The layer input `x` (`[b, t, hidden]`, before `norm`, the layer's input norm, and formed
    /// from `stream`) and the attention output, for positions `offset..offset + t`; `mask`:
    /// `[t, offset + t]` additive causal mask (None when `t == 1`).
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        stream: &Stream,
        norm: &RmsNorm,
        rope: &RotaryEmbedding,
        offset: usize,
        mask: Option<&Tensor>,
        cache: &mut LayerCache,
        max_context: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let qkv = [&self.q_proj, &self.k_proj, &self.v_proj];
        let (sum, [q, k, v]) = project(stream.input(), Some(norm), qkv)?;
        let x = stream.resolve(sum)?;
        let (b, t, _) = x.dims3()?;
        let heads = |y: Tensor, n: usize| y.reshape((b, t, n, hd))?.transpose(1, 2);
        let (q, k, v) = (heads(q, nh)?, heads(k, nkv)?, heads(v, nkv)?);
        let (q, k) = rope.apply(&q, &k, offset)?;
        let f32 = |y: &Tensor| y.to_dtype(DType::F32);
        let (k, v) = cache.append(&f32(&k)?, &f32(&v)?, max_context)?;
        let total = k.dim(2)?;
        // Grouped-query attention without copying K/V per query head: query heads h·rep..(h+1)·rep
        // share kv head h, so fold them into the row dimension: [b, nkv, rep·t, hd].
        let rep = nh / nkv;
        let q = f32(&q)?.reshape((b, nkv, rep * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let scores = match mask {
            Some(m) => scores
                .reshape((b, nkv, rep, t, total))?
                .broadcast_add(m)?
                .reshape((b, nkv, rep * t, total))?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs
            .matmul(&v)?
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?
            .to_dtype(x.dtype())?;
        Ok((x, self.output(&out)?))
    }

    /// `o_proj(attn_sub_norm(out))` of the heads' concatenated output `[b, t, heads · head_dim]`.
    fn output(&self, out: &Tensor) -> candle_core::Result<Tensor> {
        let (_, [y]) = project(
            LinearInput::Plain(out),
            self.sub_norm.as_ref(),
            [&self.o_proj],
        )?;
        Ok(y)
    }
}

/// Gated MLP with ternary projections: ReLU² + `ffn_sub_norm` (BitNet) or SiLU (Llama).
#[derive(Clone, Debug)]
pub struct Mlp {
    gate_proj: BitLinear,
    up_proj: BitLinear,
    down_proj: BitLinear,
    family: Family,
    /// SubLN before `down_proj` (`ffn_sub_norm`; 1bitLLM: `ffn_layernorm`). See the module docs.
    sub_norm: Option<RmsNorm>,
}

impl Mlp {
    fn load(l: &mut Loader<'_>, prefix: &str) -> Result<Self> {
        let (h, i) = (l.config.hidden_size, l.config.intermediate_size);
        let p = |n: &str| format!("{prefix}.mlp.{n}");
        let sub_norm = match l.config.family {
            Family::BitNet => Some(l.norm(&p("ffn_sub_norm.weight"), i)?),
            Family::Llama => l.optional_norm(&[p("ffn_layernorm.weight")], i)?,
        };
        Ok(Self {
            gate_proj: l.linear(&p("gate_proj.weight"), i, h)?,
            up_proj: l.linear(&p("up_proj.weight"), i, h)?,
            down_proj: l.linear(&p("down_proj.weight"), h, i)?,
            family: l.config.family,
            sub_norm,
        })
    }
}

impl Mlp {
    /// `gate_proj` and `up_proj` of `norm(input)`, and the residual sum when `input` is one.
    fn gate_up(
        &self,
        input: LinearInput<'_>,
        norm: &RmsNorm,
    ) -> candle_core::Result<(Option<Tensor>, [Tensor; 2])> {
        project(input, Some(norm), [&self.gate_proj, &self.up_proj])
    }

    /// `down_proj(ffn_sub_norm(act(gate) · up))`.
    fn down(&self, gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
        let sub_norm = self.sub_norm.as_ref();
        let (_, [y]) = match self.family {
            Family::BitNet => {
                project(LinearInput::Relu2Mul(gate, up), sub_norm, [&self.down_proj])?
            }
            Family::Llama => {
                let h = (candle_nn::ops::silu(gate)? * up)?;
                project(LinearInput::Plain(&h), sub_norm, [&self.down_proj])?
            }
        };
        Ok(y)
    }
}

/// `linears` applied to `norm(input)` (or to the input), and the residual sum when `input` is
/// one. On a GPU one launch forms the input, normalizes and quantizes it for all of them (the
/// kernel crate's `cuda::linears_shared`, bit-identical to the separate ops); elsewhere the
/// separate ops run, then each layer quantizes for itself.
fn project<const N: usize>(
    input: LinearInput<'_>,
    norm: Option<&RmsNorm>,
    linears: [&BitLinear; N],
) -> candle_core::Result<(Option<Tensor>, [Tensor; N])> {
    #[cfg(feature = "cuda")]
    let (sum, ys) = if input_device(input).is_cuda() {
        let ops = linears.map(|l| l.op());
        bitnet_kernels::cuda::linears_shared(input, norm.map(|n| (&n.weight, n.eps)), &ops)?
    } else {
        project_separately(input, norm, &linears)?
    };
    #[cfg(not(feature = "cuda"))]
    let (sum, ys) = project_separately(input, norm, &linears)?;
    let ys = ys.try_into().map_err(|v: Vec<Tensor>| {
        candle_core::Error::Msg(format!("expected {N} projections, got {}", v.len()))
    })?;
    Ok((sum, ys))
}

#[cfg(feature = "cuda")]
fn input_device(input: LinearInput<'_>) -> &Device {
    match input {
        LinearInput::Plain(x) | LinearInput::Add(x, _) | LinearInput::Relu2Mul(x, _) => x.device(),
    }
}

fn project_separately(
    input: LinearInput<'_>,
    norm: Option<&RmsNorm>,
    linears: &[&BitLinear],
) -> candle_core::Result<(Option<Tensor>, Vec<Tensor>)> {
    let (x, sum) = input.materialize()?;
    let h = match norm {
        Some(n) => n.forward(&x)?,
        None => x,
    };
    let ys = linears
        .iter()
        .map(|l| l.forward(&h))
        .collect::<candle_core::Result<_>>()?;
    Ok((sum, ys))
}

/// One pre-norm transformer block.
#[derive(Clone, Debug)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    /// `x + attn(norm(x))`, then `+ mlp(norm(·))`, with `x` formed from `stream`; the last add
    /// is left to the next layer (see [`Stream`]). `attend(attention, stream, input_layernorm)`
    /// is the attention sub-block, norm included, up to and including `o_proj`, returning `x`
    /// and its output.
    fn forward(
        &self,
        stream: &Stream,
        attend: impl FnOnce(&Attention, &Stream, &RmsNorm) -> candle_core::Result<(Tensor, Tensor)>,
    ) -> candle_core::Result<Stream> {
        let (x, h) = attend(&self.self_attn, stream, &self.input_layernorm)?;
        let norm = &self.post_attention_layernorm;
        let (sum, [gate, up]) = self.mlp.gate_up(LinearInput::Add(&x, &h), norm)?;
        let Some(x) = sum else {
            candle_core::bail!("the residual sum is missing");
        };
        Ok(Stream {
            pending: Some(self.mlp.down(&gate, &up)?),
            x,
        })
    }

    fn load(l: &mut Loader<'_>, index: usize) -> Result<Self> {
        let prefix = format!("model.layers.{index}");
        let h = l.config.hidden_size;
        Ok(Self {
            input_layernorm: l.norm(&format!("{prefix}.input_layernorm.weight"), h)?,
            self_attn: Attention::load(l, &prefix)?,
            post_attention_layernorm: l
                .norm(&format!("{prefix}.post_attention_layernorm.weight"), h)?,
            mlp: Mlp::load(l, &prefix)?,
        })
    }
}

/// The decoder stack: embedding, layers, final norm (everything but the LM head).
#[derive(Clone, Debug)]
pub struct Model {
    /// Token embedding `[vocab, hidden]` (BF16 or F32, see `Loader::table`); rows are cast to
    /// the model dtype after lookup.
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    rotary: RotaryEmbedding,
    dtype: DType,
}

impl Model {
    /// Hidden states after the final norm, `[b, t, hidden]`, for `ids` (`[b, t]`) at positions
    /// `offset..offset + t`, appending to `cache`.
    fn forward(
        &self,
        ids: &Tensor,
        offset: usize,
        cache: &mut Cache,
        max_context: usize,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let mut x = Stream::new(self.embed_tokens.forward(ids)?.reshape((b, t, ()))?);
        let mask = causal_mask(t, offset, ids.device())?;
        for (i, layer) in self.layers.iter().enumerate() {
            let Some(lc) = cache.layer(i) else {
                candle_core::bail!("KV cache has no slot for layer {i}");
            };
            x = layer.forward(&x, |attn, stream, norm| {
                attn.forward(
                    stream,
                    norm,
                    &self.rotary,
                    offset,
                    mask.as_ref(),
                    lc,
                    max_context,
                )
            })?;
        }
        cache.advance(t);
        self.norm.forward(&x.sum()?)
    }
}

/// The residual stream between layers: `x`, or `x + pending` not yet added. A layer ends with
/// `x + mlp(·)`; leaving that add to the next layer's first projection lets a GPU fuse it into
/// the launch that normalizes and quantizes (`LinearInput::Add`), one launch fewer per layer.
/// On the CPU the add runs as it did, one op later: the values are the same.
struct Stream {
    x: Tensor,
    pending: Option<Tensor>,
}

impl Stream {
    fn new(x: Tensor) -> Self {
        Self { x, pending: None }
    }

    /// The stream as a projection's input.
    fn input(&self) -> LinearInput<'_> {
        match &self.pending {
            Some(p) => LinearInput::Add(&self.x, p),
            None => LinearInput::Plain(&self.x),
        }
    }

    /// The stream's value, given the residual sum a projection of [`Stream::input`] returned.
    fn resolve(&self, sum: Option<Tensor>) -> candle_core::Result<Tensor> {
        match (&self.pending, sum) {
            (None, _) => Ok(self.x.clone()),
            (Some(_), Some(sum)) => Ok(sum),
            (Some(_), None) => candle_core::bail!("the residual sum is missing"),
        }
    }

    /// The stream's value, adding what is pending.
    fn sum(&self) -> candle_core::Result<Tensor> {
        match &self.pending {
            Some(p) => &self.x + p,
            None => Ok(self.x.clone()),
        }
    }
}

/// Additive mask `[t, offset + t]`: 0 where key `j` ≤ query position `offset + i`, −∞ after.
fn causal_mask(t: usize, offset: usize, device: &Device) -> candle_core::Result<Option<Tensor>> {
    if t <= 1 {
        return Ok(None);
    }
    let total = offset + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (t, total), device).map(Some)
}

/// Checked token ids `[batch, t]`, on the host.
struct Ids {
    host: Vec<u32>,
    dims: (usize, usize),
}

impl Ids {
    fn to_device(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.host, self.dims, device)
    }
}

/// A BitNet b1.58 causal language model with its KV cache: the type to load and run.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use bitnet_model::ForCausalLM;
/// use candle_core::{DType, Device, Tensor};
///
/// let dev = Device::Cpu;
/// let mut model = ForCausalLM::load("bitnet-b1.58-2B-4T".as_ref(), DType::BF16, &dev)?;
/// for w in model.warnings() {
///     eprintln!("warning: {w}");
/// }
/// let prompt = Tensor::new(&[[128000u32, 9906, 11]], &dev)?;
/// let logits = model.forward(&prompt, 0)?; // [1, vocab], f32
/// let next = logits.argmax(1)?.to_vec1::<u32>()?[0];
/// let logits = model.forward(&Tensor::new(&[[next]], &dev)?, 3)?; // continues from the cache
/// # Ok(()) }
/// ```
///
/// Cloning is cheap (weights are shared) and gives a model with an **empty** KV cache, e.g. to
/// serve several conversations from one loaded checkpoint.
#[derive(Clone, Debug)]
pub struct ForCausalLM {
    model: Model,
    /// LM head (the embedding itself when tied), computed in f32.
    lm_head: LmHead,
    cache: Cache,
    config: Config,
    warnings: Vec<String>,
    prefill_chunk: usize,
    /// Record CUDA decode steps as a graph (see `model/decode.rs`).
    cuda_graphs: bool,
    /// Pick tokens on the GPU when decoding there (see `model/decode.rs`).
    device_sampling: bool,
    #[cfg(feature = "cuda")]
    decode_graph: decode::DecodeGraph,
}

impl ForCausalLM {
    /// Loads `dir/config.json` and the weights of `dir` to run in `dtype` (F32 or BF16) on
    /// `device`. Problems that do not prevent running (an all-zero ternary tensor, unused
    /// tensors) are collected in [`ForCausalLM::warnings`]; the library never prints.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_head(dir, dtype, device, HeadFormat::Exact)
    }

    /// Like [`ForCausalLM::load`], storing the LM head (and a tied embedding) as `head`.
    pub fn load_with_head(
        dir: &Path,
        dtype: DType,
        device: &Device,
        head: HeadFormat,
    ) -> Result<Self> {
        let config = Config::from_file(&config_path(dir))?;
        let weights = Weights::open(dir)?;
        Self::build(config, &weights, dtype, device, head)
    }

    /// Builds the model from an already parsed config and opened weights.
    pub fn from_weights(
        config: Config,
        weights: &Weights,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::build(config, weights, dtype, device, HeadFormat::Exact)
    }

    fn build(
        config: Config,
        weights: &Weights,
        dtype: DType,
        device: &Device,
        head: HeadFormat,
    ) -> Result<Self> {
        match dtype {
            DType::F32 | DType::BF16 => {}
            DType::F16 => {
                return Err(Error::UnsupportedDType {
                    dtype,
                    reason:
                        "BitNet activations (ReLU² in particular) overflow f16; use bf16 or f32",
                })
            }
            _ => {
                return Err(Error::UnsupportedDType {
                    dtype,
                    reason: "the model computes in bf16 or f32",
                })
            }
        }
        let mut l = Loader {
            weights,
            config: &config,
            dtype,
            device,
            used: HashSet::new(),
            warnings: Vec::new(),
            off_mode: Vec::new(),
            head,
        };
        let (vocab, h) = (config.vocab_size, config.hidden_size);
        let embed_name = "model.embed_tokens.weight";
        let (embed_tokens, lm_head) = if config.tie_word_embeddings {
            let e = l.table(embed_name, &[vocab, h], true)?;
            (e.clone(), e)
        } else {
            let e = l.table(embed_name, &[vocab, h], false)?;
            if !weights.contains("lm_head.weight") {
                return Err(Error::MissingTensor {
                    name: "lm_head.weight".into(),
                    path: weights
                        .files()
                        .first()
                        .map(|p| p.to_path_buf())
                        .unwrap_or_default(),
                    hint: "; config.json has tie_word_embeddings false (or absent, which means \
                           false): set it to true if the LM head shares the embedding"
                        .into(),
                });
            }
            (e, l.table("lm_head.weight", &[vocab, h], true)?)
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::load(&mut l, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = l.norm("model.norm.weight", h)?;
        let mut unused: Vec<&str> = weights
            .tensors()
            .into_iter()
            .map(|t| t.name)
            .filter(|n| !l.used.contains(*n) && !n.ends_with("rotary_emb.inv_freq"))
            .collect();
        unused.sort_unstable();
        let mut warnings = l.warnings;
        warnings.extend(config.unrecognized_keys_warning());
        if let Some(first) = l.off_mode.first() {
            let (found, did) = match config.quantization_mode {
                QuantizationMode::Online => ("packed", "used their weight_scale"),
                QuantizationMode::Offline => ("float", "quantized them at load (absmean)"),
            };
            warnings.push(format!(
                "{} linear weight(s) are {found} although config.json says quantization_mode \
                 {:?} (first: {first}); {did}",
                l.off_mode.len(),
                match config.quantization_mode {
                    QuantizationMode::Online => "online",
                    QuantizationMode::Offline => "offline",
                }
            ));
        }
        if !unused.is_empty() {
            let shown: Vec<&str> = unused.iter().take(8).copied().collect();
            warnings.push(format!(
                "{} tensor(s) in the checkpoint are not used by a {} model: {}{}",
                unused.len(),
                config.family.model_type(),
                shown.join(", "),
                if unused.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            ));
        }
        // A quantized tied head keeps the embedding exact: lookups read the checkpoint's rows
        // from the map (on the CPU, where the quantized heads run).
        let exact_rows = (config.tie_word_embeddings && head != HeadFormat::Exact)
            .then(|| weights.mapped_rows(embed_name, vocab, h))
            .flatten();
        let model = Model {
            embed_tokens: Embedding::new(embed_tokens, exact_rows, dtype, device)?,
            layers,
            norm,
            rotary: RotaryEmbedding::new(&config, dtype, device)?,
            dtype,
        };
        Ok(Self {
            model,
            lm_head: LmHead::new(lm_head),
            cache: Cache::new(config.num_hidden_layers),
            config,
            warnings,
            prefill_chunk: if device.is_cpu() {
                DEFAULT_PREFILL_CHUNK
            } else {
                DEFAULT_PREFILL_CHUNK_GPU
            },
            cuda_graphs: true,
            device_sampling: true,
            #[cfg(feature = "cuda")]
            decode_graph: Default::default(),
        })
    }

    /// Logits of the **last** position, `[batch, vocab]` in f32 on the model's device, for
    /// `input_ids` (`[batch, seq]`, u32, on any device: a CPU tensor saves a GPU model two
    /// copies per step) at positions `seqlen_offset..seqlen_offset + seq`. Rows of a batch are
    /// independent sequences of equal length (there is no padding mask).
    ///
    /// The KV cache must hold exactly the first `seqlen_offset` positions of these sequences:
    /// pass 0 for a new prompt (the cache is reset), then the number of tokens processed so far.
    /// A smaller offset rewinds the cache to that point. Long inputs are processed in chunks of
    /// [`ForCausalLM::set_prefill_chunk`] tokens so memory stays bounded.
    pub fn forward(
        &mut self,
        input_ids: &Tensor,
        seqlen_offset: usize,
    ) -> candle_core::Result<Tensor> {
        if self.off_pool() {
            // `scope` runs its body on a pool worker when called from outside the pool.
            return rayon::scope(|_| self.forward(input_ids, seqlen_offset));
        }
        let (ids, t) = self.prepare(input_ids, seqlen_offset)?;
        #[cfg(feature = "cuda")]
        if self.decodes_on_cuda(ids.dims.0, t) {
            return self.decode_cuda(ids.host[0], seqlen_offset);
        }
        let ids = ids.to_device(self.device())?;
        let mut last = None;
        for start in (0..t).step_by(self.prefill_chunk) {
            let n = self.prefill_chunk.min(t - start);
            last = Some(self.hidden(&ids.narrow(1, start, n)?, seqlen_offset + start)?);
        }
        let Some(hidden) = last else {
            candle_core::bail!("forward needs at least one token");
        };
        let n = hidden.dim(1)?;
        self.head(&hidden.narrow(1, n - 1, 1)?)?.squeeze(1)
    }

    /// Logits of **every** position, `[batch, seq, vocab]` in f32 (for perplexity); same
    /// cache rules as [`ForCausalLM::forward`].
    pub fn forward_all(
        &mut self,
        input_ids: &Tensor,
        seqlen_offset: usize,
    ) -> candle_core::Result<Tensor> {
        if self.off_pool() {
            return rayon::scope(|_| self.forward_all(input_ids, seqlen_offset));
        }
        let (ids, t) = self.prepare(input_ids, seqlen_offset)?;
        let ids = ids.to_device(self.device())?;
        let mut chunks = Vec::new();
        for start in (0..t).step_by(self.prefill_chunk) {
            let n = self.prefill_chunk.min(t - start);
            let hidden = self.hidden(&ids.narrow(1, start, n)?, seqlen_offset + start)?;
            chunks.push(self.head(&hidden)?);
        }
        Tensor::cat(&chunks, 1)
    }

    /// True when a CPU forward pass is called from outside the rayon pool.
    ///
    /// Every CPU kernel forks onto that pool. Called from a plain thread, each fork parks the
    /// caller and wakes the workers: two or three context switches per op, ~210 ops per decoded
    /// token. Run on a worker, the whole pass forks in place, and between ops the other workers
    /// are usually still spinning rather than asleep.
    fn off_pool(&self) -> bool {
        self.device().is_cpu() && rayon::current_thread_index().is_none()
    }

    /// Checks the ids and positions, and rewinds the cache to `offset`.
    fn prepare(&mut self, input_ids: &Tensor, offset: usize) -> candle_core::Result<(Ids, usize)> {
        let dims @ (_, t) = input_ids.dims2()?;
        if t == 0 {
            candle_core::bail!("forward needs at least one token");
        }
        let max = self.max_context();
        if offset + t > max {
            candle_core::bail!(
                "positions {offset}..{} exceed the model's context of {max} tokens \
                 (max_position_embeddings)",
                offset + t
            );
        }
        let ids = match input_ids.dtype() {
            DType::U32 => input_ids.clone(),
            DType::I64 | DType::U8 => input_ids.to_dtype(DType::U32)?,
            other => candle_core::bail!("input_ids must be u32 token ids, got {other:?}"),
        };
        // Checked on the host (an out-of-range id would read past the embedding table), so ids
        // may come from either device; a GPU decode step needs only these host values.
        let host = ids.flatten_all()?.to_vec1::<u32>()?;
        let vocab = self.config.vocab_size as u32;
        if let Some(&bad) = host.iter().find(|&&id| id >= vocab) {
            candle_core::bail!("token id {bad} is out of range for a vocabulary of {vocab}");
        }
        self.cache.seek(offset)?;
        if t > self.prefill_chunk {
            // Chunk by chunk, the cache would regrow at each doubling and leave the smaller
            // buffers behind in the allocator (pp512: ~70 MB of peak RSS); one reservation for
            // the whole input avoids that.
            let c = &self.config;
            let kv = (dims.0, c.num_key_value_heads, c.head_dim);
            let device = self.device().clone();
            self.cache.reserve(kv, offset + t, max, &device)?;
        }
        Ok((Ids { host, dims }, t))
    }

    fn hidden(&mut self, ids: &Tensor, offset: usize) -> candle_core::Result<Tensor> {
        let max = self.max_context();
        let r = self.model.forward(ids, offset, &mut self.cache, max);
        if r.is_err() {
            // A failed step leaves layers at different lengths: start over rather than mislead.
            self.cache.clear();
        }
        r
    }

    /// `[b, t, hidden]` → f32 logits `[b, t, vocab]`.
    fn head(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        self.lm_head
            .forward(&hidden.reshape((b * t, h))?)?
            .reshape((b, t, ()))
    }

    /// Weight bytes one decoded token reads: every ternary matrix and the LM head (the
    /// embedding row it also reads is negligible). Decoding is bound by this over the memory
    /// bandwidth, so `bytes_per_token × tokens/s` is the effective bandwidth `bitnet bench` shows.
    pub fn bytes_per_token(&self) -> u64 {
        let ternary: usize = self
            .model
            .layers
            .iter()
            .flat_map(|l| {
                let (a, m) = (&l.self_attn, &l.mlp);
                [
                    &a.q_proj,
                    &a.k_proj,
                    &a.v_proj,
                    &a.o_proj,
                    &m.gate_proj,
                    &m.up_proj,
                    &m.down_proj,
                ]
            })
            .map(|p| p.op().weight().storage_bytes())
            .sum();
        (ternary + self.lm_head.storage_bytes()) as u64
    }

    /// Forgets the KV cache (start of a new, unrelated sequence).
    pub fn clear_cache(&mut self) {
        self.cache.clear();
    }

    /// Number of positions in the KV cache (the `seqlen_offset` that continues it).
    pub fn cached_tokens(&self) -> usize {
        self.cache.len()
    }

    /// Sets how many prompt tokens one step processes (default [`DEFAULT_PREFILL_CHUNK`], or
    /// [`DEFAULT_PREFILL_CHUNK_GPU`] on a GPU);
    /// attention memory grows with chunk × context. Values below 1 are treated as 1.
    pub fn set_prefill_chunk(&mut self, tokens: usize) {
        self.prefill_chunk = tokens.max(1);
    }

    /// Whether single-token steps on a CUDA device are recorded once as a CUDA graph and
    /// replayed (default: on). Off, they run the same kernels launched one by one, which is
    /// slower at batch 1 (for comparisons). No effect on other devices.
    pub fn set_cuda_graphs(&mut self, enabled: bool) {
        self.cuda_graphs = enabled;
    }

    /// Whether [`generation::decode`](crate::generation::decode) picks each token on a CUDA
    /// device (default: on): the argmax or the draw, and the repetition penalty, run inside
    /// the decode step, which reads back four bytes instead of the logits. Off, every step's
    /// logits go to the host sampler, as on the CPU (for comparisons). No effect elsewhere.
    pub fn set_device_sampling(&mut self, enabled: bool) {
        self.device_sampling = enabled;
    }

    /// Why single-token CUDA steps could not be recorded as a CUDA graph (they then run
    /// eagerly), if that happened.
    pub fn cuda_graph_error(&self) -> Option<&str> {
        #[cfg(feature = "cuda")]
        return self.decode_graph.failure();
        #[cfg(not(feature = "cuda"))]
        None
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Problems found while loading that did not stop it, one sentence each.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Longest sequence (prompt + generated tokens) the model accepts.
    pub fn max_context(&self) -> usize {
        self.config.max_position_embeddings
    }

    /// The compute dtype of the hidden states (F32 or BF16).
    pub fn dtype(&self) -> DType {
        self.model.dtype
    }

    /// The device holding the weights (input ids must live there too).
    pub fn device(&self) -> &Device {
        self.model.embed_tokens.device()
    }

    /// Tokens per prefill step.
    pub(crate) fn prefill_chunk(&self) -> usize {
        self.prefill_chunk
    }
}
