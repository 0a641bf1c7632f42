//! [`Q4Matrix`] and [`Q4LinearOp`]: a 4-bit LM head (`--head q4`), about a quarter of the bytes
//! of BF16.
//!
//! Decoding reads the whole head for every token (2B-4T: 657 MB in BF16, 329 MB as int8 rows),
//! so on a bandwidth-bound CPU its size sets a floor under the time per token. Here it is
//! 4.25 bits per weight (2B-4T: 174 MB), and the product runs on int8 dot-product instructions,
//! so that it stays cheaper than the read even with only a few cores.
//!
//! **Weights.** Each row is cut into blocks of [`Q4_BLOCK`] = 64 columns (the last one padded
//! with zeros) with one f16 scale `s` per block and codes `q ∈ [−8, 7]`, `w ≈ q·s`. f16 rather
//! than bf16: its 11-bit significand keeps the scale's rounding (< 0.05%) far below a 4-bit
//! step; 0.25 bit per weight rather than f32's 0.5; and it widens exactly to f32 in one
//! instruction (`vcvtph2ps`). The scale is chosen per block among `m / d` for
//! `d ∈ {−8, −7.5, −8.5, −7, −9}`, where `m` is the block's value of largest magnitude, keeping
//! the one with the smallest squared error (`d = −8`, llama.cpp's Q4_0 rule, maps `m` exactly
//! to −8; on the shipped model's head the search lowers the relative squared error from 0.75% to
//! 0.69%). Codes are stored as nibbles: byte `j` (0..32) of a block holds column `j` in its low
//! nibble and column `j + 32` in its high nibble, as `q + 8`, so one 32-byte load yields the 64
//! consecutive codes with a shift and a mask, lined up with a plain load of the activations.
//! Rows are interleaved in groups of four, block by block (`[r0 b0][r1 b0][r2 b0][r3 b0][r0 b1]…`,
//! as [`crate::TernaryWeight`] does, for the same prefetching reason), and the kernels compute
//! a group at a time; the scales of a group follow row by row.
//!
//! **Activations.** Each token is quantized once per product to int8 in blocks of 64 columns,
//! with one f32 scale per block (`absmax / 127`, round half to even). Blockwise scales matter:
//! one absmax per token, as BitLinear uses, lets the final hidden state's outliers flatten every
//! other value to a few steps, which is why [`crate::I8Matrix`] keeps f32 activations.
//!
//! **Arithmetic.** A row's product is `Σ_b s_w,b · s_x,b · Σ_k q_k · x_k`. The integer sum of a
//! block is kept as 16 i32 lanes of four consecutive columns each, which is what both
//! `vpdpbusd` (AVX-512 VNNI) and `vpmaddubsw` + `vpmaddwd` (AVX2, two 32-byte halves) produce;
//! the unsigned codes `q + 8` go in the u8 operand, and each token's precomputed lane sums
//! `−8·Σx` seed the accumulator, so `Σ (q+8)·x − 8·Σx = Σ q·x` exactly. Each lane is converted
//! to f32 and accumulated with one fused multiply-add by the block's combined scale, block after
//! block; the 16 lanes are then summed in a fixed pairwise order. The scalar reference does the
//! same operations in the same order, so every instruction set gives bit-identical results
//! (tested). NEON uses the scalar path (correct, not tuned). The CUDA kernel
//! (`bitnet_q4_gemv_*` in kernels/bitnet.cu, feature `cuda`) follows the same order too and
//! matches bit for bit (tests/cuda.rs).
//!
//! **Cost** (2B-4T head, one token, AMD EPYC with AVX-512 VNNI, 2026-11-27): 4.7 ms on two
//! threads (37 GB/s of weights, at the DRAM stream rate), 7.4 ms on one; in L2 one core computes
//! ~27 GB/s worth (AVX2: ~23), so a single thread is close to compute-bound, two are not.
//! Quantizing it at load takes ~0.6 s on two threads. Accuracy: see `--head` in
//! docs/BENCHMARKS.md; on small random models most of the perplexity change comes from a tied
//! embedding quantized along with the head, not from the head itself.

#[cfg(feature = "cuda")]
use std::sync::Arc;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::cpu::Isa;
use crate::dense::{check_head_shapes, row_chunks, HeadLinearOp, HeadMatrix, CHUNK_ROWS};
use crate::error::KernelError;
use crate::quant::round_ties_even_small;

/// Columns per quantization block (one weight scale and one activation scale each).
pub const Q4_BLOCK: usize = 64;
/// Bytes of codes per block.
const BLOCK_BYTES: usize = Q4_BLOCK / 2;
/// Rows interleaved block by block; the kernels compute one group at a time.
const GROUP: usize = 4;
/// i32 lanes per block, four consecutive columns each.
const LANES: usize = 16;
/// Scales stored past the end of the weight and activation scale arrays, so that the SIMD paths
/// may load 16 at a time from any block (the extra values are never used).
const SCALE_PAD: usize = 16;
/// Divisors tried for each block's scale `m / d` (module docs); the first wins ties.
const DIVISORS: [f32; 5] = [-8.0, -7.5, -8.5, -7.0, -9.0];
/// A byte of two zero codes (`0 + 8` in both nibbles).
const ZERO_BYTE: u8 = 0x88;

const _: () = assert!(CHUNK_ROWS.is_multiple_of(GROUP));

/// A `[rows, cols]` matrix of 4-bit codes with one f16 scale per row block of 64 columns
/// (layout in the module docs).
#[derive(Clone)]
pub struct Q4Matrix {
    rows: usize,
    cols: usize,
    /// Blocks per row.
    nb: usize,
    /// `groups × nb × GROUP × BLOCK_BYTES`: block `b` of row `4g + r` at `((g·nb + b)·4 + r)·32`.
    codes: Vec<u8>,
    /// `groups × GROUP × nb` (+ [`SCALE_PAD`]): scale `b` of row `i` at `i·nb + b`.
    scales: Vec<f16>,
    /// GPU copies of `codes` and `scales`, uploaded on first use (shared by clones).
    #[cfg(feature = "cuda")]
    gpu: Arc<(crate::cuda::DeviceCache<u8>, crate::cuda::DeviceCache<f16>)>,
}

impl std::fmt::Debug for Q4Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q4Matrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

impl Q4Matrix {
    /// Quantizes a row-major BF16 `[rows, cols]` matrix (module docs). An empty matrix (no rows
    /// or no columns) is valid; a length that does not match the shape is an error.
    pub fn quantize(data: &[bf16], rows: usize, cols: usize) -> crate::Result<Self> {
        if rows.checked_mul(cols).is_none() {
            return Err(KernelError::LengthMismatch {
                what: "4-bit head source",
                got: data.len(),
                expected: usize::MAX,
                shape: [rows, cols],
            });
        }
        crate::pack::check_len("4-bit head source", data.len(), rows, cols)?;
        let nb = cols.div_ceil(Q4_BLOCK);
        let groups = rows.div_ceil(GROUP);
        let mut codes = vec![ZERO_BYTE; groups * GROUP * nb * BLOCK_BYTES];
        let mut scales = vec![f16::ZERO; groups * GROUP * nb + SCALE_PAD];
        if nb > 0 {
            codes
                .par_chunks_mut(GROUP * nb * BLOCK_BYTES)
                .zip(scales.par_chunks_mut(GROUP * nb))
                .enumerate()
                .for_each(|(g, (codes, scales))| {
                    let group = Group {
                        data,
                        rows,
                        cols,
                        nb,
                        g,
                    };
                    #[cfg(target_arch = "x86_64")]
                    if std::arch::is_x86_feature_detected!("avx2") {
                        // SAFETY: AVX2 is available.
                        return unsafe { group.quantize_avx2(codes, scales) };
                    }
                    group.quantize(codes, scales)
                });
        }
        Ok(Self {
            rows,
            cols,
            nb,
            codes,
            scales,
            #[cfg(feature = "cuda")]
            gpu: Arc::default(),
        })
    }

    /// Rows (vocabulary size for a head).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (hidden size).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held (codes and scales, padding included).
    pub fn storage_bytes(&self) -> usize {
        self.codes.len() + 2 * self.scales.len()
    }

    /// The 32 code bytes of block `b` of row `row`.
    fn block(&self, row: usize, b: usize) -> &[u8] {
        let (g, lane) = (row / GROUP, row % GROUP);
        &self.codes[((g * self.nb + b) * GROUP + lane) * BLOCK_BYTES..][..BLOCK_BYTES]
    }

    /// Row `i` dequantized (`q · s` per block), e.g. for a tied embedding lookup.
    pub fn row_f32(&self, i: usize) -> Option<Vec<f32>> {
        if i >= self.rows {
            return None;
        }
        let mut v = Vec::with_capacity(self.cols);
        for b in 0..self.nb {
            let (w, s) = (self.block(i, b), self.scales[i * self.nb + b].to_f32());
            let n = Q4_BLOCK.min(self.cols - b * Q4_BLOCK);
            v.extend((0..n).map(|k| code(w, k) as f32 * s));
        }
        Some(v)
    }

    /// `out[r · tokens + t] ≈ Σ_k W[r,k] · x[t,k]` in f32 (`x` is `tokens × cols`), with `x`
    /// quantized to int8 in blocks of 64 (module docs), split across the current rayon pool.
    /// Every instruction set gives bit-identical results.
    ///
    /// # Panics
    /// If `isa` is unavailable or the buffers do not match the shapes (programming errors).
    pub fn matmul(&self, isa: Isa, x: &[f32], out: &mut [f32]) {
        let tokens = check_head_shapes(isa, self.rows, self.cols, x, out);
        if tokens == 0 || self.rows == 0 {
            return;
        }
        let acts = Acts::quantize(x, tokens, self.cols, self.nb);
        let kernel = Kernel::for_isa(isa);
        row_chunks(self.rows, tokens, out, |r0, out| {
            let n = out.len() / tokens;
            for t in 0..tokens {
                for i in (0..n).step_by(GROUP) {
                    let y = kernel.tile(self, (r0 + i) / GROUP, &acts, t);
                    for (k, v) in y.iter().take(n - i).enumerate() {
                        out[(i + k) * tokens + t] = *v;
                    }
                }
            }
        });
    }
}

/// One group of rows to quantize (the unit of parallel work in [`Q4Matrix::quantize`]).
struct Group<'a> {
    data: &'a [bf16],
    rows: usize,
    cols: usize,
    nb: usize,
    g: usize,
}

impl Group<'_> {
    /// Fills the group's codes and scales (the same arithmetic in every build below).
    #[inline(always)]
    fn quantize(&self, codes: &mut [u8], scales: &mut [f16]) {
        let Self {
            data,
            rows,
            cols,
            nb,
            g,
        } = *self;
        for lane in 0..GROUP.min(rows - g * GROUP) {
            let row = g * GROUP + lane;
            let src = &data[row * cols..(row + 1) * cols];
            for (b, (chunk, scale)) in src
                .chunks(Q4_BLOCK)
                .zip(&mut scales[lane * nb..(lane + 1) * nb])
                .enumerate()
            {
                let mut w = [0f32; Q4_BLOCK];
                for (wi, v) in w.iter_mut().zip(chunk) {
                    *wi = v.to_f32();
                }
                let (s, q) = quantize_block(&w);
                *scale = s;
                let dst = &mut codes[(b * GROUP + lane) * BLOCK_BYTES..][..BLOCK_BYTES];
                for (j, byte) in dst.iter_mut().enumerate() {
                    *byte = q[j] | (q[j + BLOCK_BYTES] << 4);
                }
            }
        }
    }

    /// [`Group::quantize`] compiled for AVX2, which vectorizes the block search 8 wide (load
    /// time: 20% less than baseline x86-64 code, ~0.6 s for 2B-4T's head on two threads).
    ///
    /// # Safety
    /// AVX2 must be available.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn quantize_avx2(&self, codes: &mut [u8], scales: &mut [f16]) {
        self.quantize(codes, scales)
    }
}

/// Code `k` (0..64) of a block's 32 bytes, as the signed value `q`.
#[inline(always)]
fn code(w: &[u8], k: usize) -> i8 {
    let c = if k < BLOCK_BYTES {
        w[k] & 15
    } else {
        w[k - BLOCK_BYTES] >> 4
    };
    c as i8 - 8
}

/// The scale and codes `q + 8` of one block (module docs): among the candidate scales, the one
/// with the smallest squared error; an all-zero block (or one every candidate fails on, e.g.
/// NaN) gets scale 0. Scales are clamped to f16's range, so absurdly large weights saturate.
///
/// Written to vectorize: eight-lane partial maxima and error sums, and codes read from the
/// rounding's bit pattern rather than by float-to-int casts (which stay scalar).
#[inline(always)]
fn quantize_block(w: &[f32; Q4_BLOCK]) -> (f16, [u8; Q4_BLOCK]) {
    let (mut hi, mut lo) = ([0f32; 8], [0f32; 8]);
    for c in w.chunks_exact(8) {
        for ((h, l), &v) in hi.iter_mut().zip(&mut lo).zip(c) {
            *h = h.max(v);
            *l = l.min(v);
        }
    }
    let (hi, lo) = (
        hi.iter().fold(0f32, |a, &v| a.max(v)),
        lo.iter().fold(0f32, |a, &v| a.min(v)),
    );
    // The value of largest magnitude, with its sign (the positive one on a tie).
    let m = if -lo > hi { lo } else { hi };
    let mut best = (f16::ZERO, [8u8; Q4_BLOCK]);
    if m == 0.0 {
        return best;
    }
    let mut best_err = block_err(w, &[0.0; Q4_BLOCK], 0.0);
    for d in DIVISORS {
        let s = f16::from_f32((m / d).clamp(-f16::MAX.to_f32(), f16::MAX.to_f32()));
        let sf = s.to_f32();
        if sf == 0.0 {
            continue;
        }
        let inv = 1.0 / sf;
        let mut q = [0f32; Q4_BLOCK];
        for (qi, &v) in q.iter_mut().zip(w) {
            *qi = round_ties_even_small((v * inv).clamp(-8.0, 7.0));
        }
        let err = block_err(w, &q, sf);
        if err < best_err {
            best_err = err;
            best.0 = s;
            for (b, &c) in best.1.iter_mut().zip(&q) {
                // `c + 1.5·2²³` holds the integer `c` in its low mantissa bits (two's complement
                // modulo 2⁸ in the low byte), exactly as in `round_ties_even_small`.
                *b = ((c + ROUND_MAGIC).to_bits() as u8).wrapping_add(8) & 15;
            }
        }
    }
    best
}

/// `1.5·2²³`: adding it to a float of magnitude below 2²² rounds to an integer (to even) and
/// leaves that integer in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `Σ (w_k − q_k·s)²` in eight interleaved partial sums.
#[inline(always)]
fn block_err(w: &[f32; Q4_BLOCK], q: &[f32; Q4_BLOCK], s: f32) -> f32 {
    let mut acc = [0f32; 8];
    for (wc, qc) in w.chunks_exact(8).zip(q.chunks_exact(8)) {
        for ((a, &v), &c) in acc.iter_mut().zip(wc).zip(qc) {
            let e = v - c * s;
            *a += e * e;
        }
    }
    acc.iter().sum()
}

/// The tokens of one product, quantized once (module docs).
struct Acts {
    nb: usize,
    /// `tokens × nb × 64` int8 values.
    q: Vec<i8>,
    /// `tokens × nb × 16`: `−8 · Σ` of each lane's four values (for the SIMD kernels, which
    /// multiply the unsigned codes `q + 8`; the scalar reference uses the signed codes).
    #[cfg(target_arch = "x86_64")]
    corr: Vec<i32>,
    /// `tokens × nb` (+ [`SCALE_PAD`]) dequantization scales `absmax / 127`.
    scales: Vec<f32>,
}

impl Acts {
    fn quantize(x: &[f32], tokens: usize, cols: usize, nb: usize) -> Self {
        let mut q = vec![0i8; tokens * nb * Q4_BLOCK];
        #[cfg(target_arch = "x86_64")]
        let mut corr = vec![0i32; tokens * nb * LANES];
        let mut scales = vec![0f32; tokens * nb + SCALE_PAD];
        for t in 0..tokens {
            let row = &x[t * cols..(t + 1) * cols];
            for (b, chunk) in row.chunks(Q4_BLOCK).enumerate() {
                let i = t * nb + b;
                let absmax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
                let (scale, inv) = if absmax > 0.0 {
                    (absmax / 127.0, 127.0 / absmax)
                } else {
                    (0.0, 0.0)
                };
                scales[i] = scale;
                let qb = &mut q[i * Q4_BLOCK..(i + 1) * Q4_BLOCK];
                for (qi, &v) in qb.iter_mut().zip(chunk) {
                    *qi = round_ties_even_small((v * inv).clamp(-127.0, 127.0)) as i8;
                }
                #[cfg(target_arch = "x86_64")]
                for (c, lane) in corr[i * LANES..(i + 1) * LANES]
                    .iter_mut()
                    .zip(qb.chunks_exact(4))
                {
                    *c = -8 * lane.iter().map(|&v| v as i32).sum::<i32>();
                }
            }
        }
        Self {
            nb,
            q,
            #[cfg(target_arch = "x86_64")]
            corr,
            scales,
        }
    }
}

/// Sums 16 lanes pairwise (`l + 8`, then `+ 4`, `+ 2`, `+ 1`): the order every path uses.
#[inline(always)]
fn reduce16(mut v: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            v[i] += v[i + w];
        }
        w /= 2;
    }
    v[0]
}

/// The implementation chosen for an [`Isa`].
#[derive(Clone, Copy)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    /// `isa` must be available (checked by the caller).
    fn for_isa(isa: Isa) -> Self {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni | Isa::Amx => Kernel::Avx512,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2
                if std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c") =>
            {
                Kernel::Avx2
            }
            // NEON (and AVX2 without FMA/F16C, which no known CPU lacks) take the reference.
            _ => Kernel::Scalar,
        }
    }

    /// The products of group `g`'s four rows with token `t`.
    #[inline(always)]
    fn tile(self, m: &Q4Matrix, g: usize, a: &Acts, t: usize) -> [f32; GROUP] {
        debug_assert_eq!(m.nb, a.nb);
        debug_assert!(g * GROUP < m.rows && t * a.nb <= a.scales.len() - SCALE_PAD);
        #[cfg(target_arch = "x86_64")]
        let p = Ptrs {
            w: m.codes[g * m.nb * GROUP * BLOCK_BYTES..].as_ptr(),
            sw: m.scales[g * GROUP * m.nb..].as_ptr(),
            nb: m.nb,
            qx: a.q[t * a.nb * Q4_BLOCK..].as_ptr(),
            corr: a.corr[t * a.nb * LANES..].as_ptr(),
            sx: a.scales[t * a.nb..].as_ptr(),
        };
        match self {
            Kernel::Scalar => tile_scalar(m, g, a, t),
            // SAFETY: `Kernel::for_isa` chose these only where the CPU has the features; the
            // pointers cover group `g` and token `t` (see `Ptrs`).
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::tile_avx2(p) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { x86::tile_avx512(p) },
        }
    }
}

/// One tile's inputs for the SIMD kernels.
///
/// `w`: the group's `nb × 4 × 32` code bytes; `sw`: its `4 × nb` scales, with at least 16
/// readable values after the start of every block's scale; `qx`, `corr`, `sx`: the token's
/// `nb × 64` values, `nb × 16` lane corrections and `nb` scales (also readable 16 past any
/// block), which [`Q4Matrix`] and [`Acts`] guarantee through [`SCALE_PAD`].
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Ptrs {
    w: *const u8,
    sw: *const f16,
    nb: usize,
    qx: *const i8,
    corr: *const i32,
    sx: *const f32,
}

/// The reference: per row, per block, 16 exact lane sums, each added to its f32 lane with one
/// fused multiply-add by the combined scale; then [`reduce16`].
fn tile_scalar(m: &Q4Matrix, g: usize, a: &Acts, t: usize) -> [f32; GROUP] {
    let nb = m.nb;
    let mut out = [0f32; GROUP];
    for (lane, o) in out.iter_mut().enumerate() {
        let row = g * GROUP + lane;
        let mut acc = [0f32; LANES];
        for b in 0..nb {
            let w = m.block(row, b);
            let x = &a.q[(t * nb + b) * Q4_BLOCK..][..Q4_BLOCK];
            let s = m.scales[row * nb + b].to_f32() * a.scales[t * nb + b];
            for (l, acc) in acc.iter_mut().enumerate() {
                let isum: i32 = (4 * l..4 * l + 4)
                    .map(|k| code(w, k) as i32 * x[k] as i32)
                    .sum();
                *acc = (isum as f32).mul_add(s, *acc);
            }
        }
        *o = reduce16(acc);
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{reduce16, Ptrs, BLOCK_BYTES, GROUP, LANES, Q4_BLOCK};

    /// One block per `vpdpbusd`: the 32 code bytes are broadcast to both halves of a register,
    /// the upper half shifted right by 4 (high nibbles), both masked to 0..15.
    ///
    /// # Safety
    /// AVX-512 F/BW/VNNI must be available; `p` as documented on [`Ptrs`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile_avx512(p: Ptrs) -> [f32; GROUP] {
        let nb = p.nb;
        let shift = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
        let mask = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); GROUP];
        let mut comb = [[0f32; 16]; GROUP];
        let mut g = 0;
        while g < nb {
            // SAFETY (all loads): within the tile's buffers (see `Ptrs`); scales may be read 16
            // past any block's.
            unsafe {
                let sx = _mm512_loadu_ps(p.sx.add(g));
                for (r, c) in comb.iter_mut().enumerate() {
                    let sw = _mm512_cvtph_ps(_mm256_loadu_si256(p.sw.add(r * nb + g).cast()));
                    _mm512_storeu_ps(c.as_mut_ptr(), _mm512_mul_ps(sw, sx));
                }
                for b in g..(g + 16).min(nb) {
                    let j = b - g;
                    let x = _mm512_loadu_si512(p.qx.add(b * Q4_BLOCK).cast());
                    let corr = _mm512_loadu_si512(p.corr.add(b * LANES).cast());
                    for (r, a) in acc.iter_mut().enumerate() {
                        let raw = _mm256_loadu_si256(p.w.add((b * GROUP + r) * BLOCK_BYTES).cast());
                        let codes = _mm512_and_si512(
                            _mm512_srlv_epi64(_mm512_broadcast_i64x4(raw), shift),
                            mask,
                        );
                        let sum = _mm512_dpbusd_epi32(corr, codes, x);
                        *a = _mm512_fmadd_ps(
                            _mm512_cvtepi32_ps(sum),
                            _mm512_set1_ps(comb[r][j]),
                            *a,
                        );
                    }
                }
            }
            g += 16;
        }
        let mut out = [0f32; GROUP];
        for (o, a) in out.iter_mut().zip(acc) {
            let mut lanes = [0f32; LANES];
            // SAFETY: 16 floats into a 16-float array.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), a) };
            *o = reduce16(lanes);
        }
        out
    }

    /// One block in two 32-byte halves (low nibbles = columns 0..32, high = 32..64), each by
    /// `vpmaddubsw` (pairs ≤ 2·15·127, no saturation) and `vpmaddwd` with ones.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `p` as documented on [`Ptrs`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_avx2(p: Ptrs) -> [f32; GROUP] {
        let nb = p.nb;
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); 2]; GROUP];
        let mut comb = [[0f32; 8]; GROUP];
        let mut g = 0;
        while g < nb {
            // SAFETY (all loads): as in `tile_avx512`.
            unsafe {
                let sx = _mm256_loadu_ps(p.sx.add(g));
                for (r, c) in comb.iter_mut().enumerate() {
                    let sw = _mm256_cvtph_ps(_mm_loadu_si128(p.sw.add(r * nb + g).cast()));
                    _mm256_storeu_ps(c.as_mut_ptr(), _mm256_mul_ps(sw, sx));
                }
                for b in g..(g + 8).min(nb) {
                    let j = b - g;
                    let x0 = _mm256_loadu_si256(p.qx.add(b * Q4_BLOCK).cast());
                    let x1 = _mm256_loadu_si256(p.qx.add(b * Q4_BLOCK + 32).cast());
                    let c0 = _mm256_loadu_si256(p.corr.add(b * LANES).cast());
                    let c1 = _mm256_loadu_si256(p.corr.add(b * LANES + 8).cast());
                    for (r, a) in acc.iter_mut().enumerate() {
                        let raw = _mm256_loadu_si256(p.w.add((b * GROUP + r) * BLOCK_BYTES).cast());
                        let lo = _mm256_and_si256(raw, mask);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask);
                        let s0 = _mm256_add_epi32(
                            _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), ones),
                            c0,
                        );
                        let s1 = _mm256_add_epi32(
                            _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1), ones),
                            c1,
                        );
                        let s = _mm256_set1_ps(comb[r][j]);
                        a[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), s, a[0]);
                        a[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), s, a[1]);
                    }
                }
            }
            g += 8;
        }
        let mut out = [0f32; GROUP];
        for (o, a) in out.iter_mut().zip(acc) {
            let mut lanes = [0f32; LANES];
            // SAFETY: 2 × 8 floats into a 16-float array.
            unsafe {
                _mm256_storeu_ps(lanes.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8), a[1]);
            }
            *o = reduce16(lanes);
        }
        out
    }
}

/// `y ≈ x · Wᵀ` for a [`Q4Matrix`] `W`: input `[..., cols]` f32 or bf16, output `[..., rows]` f32,
/// on the CPU or (feature `cuda`) a CUDA device, with bit-identical results.
pub type Q4LinearOp = HeadLinearOp<Q4Matrix>;

impl HeadMatrix for Q4Matrix {
    const OP_NAME: &'static str = "q4-linear";

    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn matmul(&self, isa: Isa, x: &[f32], out: &mut [f32]) {
        Q4Matrix::matmul(self, isa, x, out)
    }

    /// The same products on the GPU, bit-identical (`bitnet_q4_gemv_*` in kernels/bitnet.cu).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        let dev = storage.device();
        let codes = self.gpu.0.get_or_upload(dev, &self.codes, ZERO_BYTE)?;
        let scales = self.gpu.1.get_or_upload(dev, &self.scales, f16::ZERO)?;
        crate::cuda::q4_linear_fwd(
            crate::cuda::Q4Buffers {
                codes: &codes,
                scales: &scales,
                rows: self.rows,
                cols: self.cols,
                nb: self.nb,
            },
            storage,
            layout,
        )
    }
}
