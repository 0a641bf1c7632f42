//! CPU ternary × int8 matrix products, with the instruction set chosen at run time.
//!
//! Every instruction set implements one micro-kernel, `Tile`: the raw sums `Σ code·q` of an
//! `R × T` tile (R weight rows, T tokens) over whole blocks, where `code = w + 1 ∈ {0,1,2}`.
//! Using the unsigned code directly suits the u8×i8 instructions (`vpdpbusd`, `vpmaddubsw`);
//! the driver subtracts each token's `Σq` to get the ternary dot product. All accumulation is
//! exact in i32 (other engines' i16 accumulators overflowed: REFERENCE.md, known traps), so
//! every instruction set gives bit-identical results to [`Isa::Scalar`].

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::layout::{TernaryWeight, BLOCK, ROW_GROUP};
use crate::quant::QuantizedActivations;

pub(crate) use dense::dot_bf16;
pub use quant::quantize_activations;

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx;
mod dense;
#[cfg(target_arch = "aarch64")]
mod neon;
mod quant;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

/// An instruction set the CPU kernels can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust; the reference every other path is tested against.
    Scalar,
    /// x86-64 AVX2 (`vpmaddubsw`, 16-bit partial sums flushed to i32 every block).
    Avx2,
    /// x86-64 AVX-512 with VNNI (`vpdpbusd`).
    Avx512Vnni,
    /// AVX-512 VNNI plus AMX-INT8 tiles (`tdpbusd`) for products of many tokens (Linux only:
    /// the kernel must grant the tile state). Everything else runs the AVX-512 VNNI code.
    Amx,
    /// aarch64 NEON (`smull` + `sadalp`).
    Neon,
}

impl Isa {
    /// The best instruction set this CPU supports (detected once).
    ///
    /// `BITNET_ISA=scalar|avx2|avx512vnni|amx|neon` overrides it, for benchmarks and debugging;
    /// an unsupported or unknown value falls back to detection.
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let wanted = std::env::var("BITNET_ISA").ok();
            let available = Isa::available();
            wanted
                .and_then(|w| available.iter().copied().find(|isa| isa.name() == w))
                .unwrap_or(available[available.len() - 1])
        })
    }

    /// All instruction sets usable on this CPU, worst to best; always starts with `Scalar`.
    pub fn available() -> Vec<Isa> {
        Isa::detected().to_vec()
    }

    /// Whether this CPU can run `self` (no allocation: kernels check it on every call).
    pub fn is_available(self) -> bool {
        Isa::detected().contains(&self)
    }

    fn detected() -> &'static [Isa] {
        static ISAS: OnceLock<Vec<Isa>> = OnceLock::new();
        ISAS.get_or_init(Isa::probe)
    }

    fn probe() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut isas = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                isas.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
            {
                isas.push(Isa::Avx512Vnni);
                #[cfg(target_os = "linux")]
                if amx::cpu_has_amx_int8() && amx::request_tile_state() {
                    isas.push(Isa::Amx);
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        isas.push(Isa::Neon);
        isas
    }

    /// Lower-case name, as accepted by `BITNET_ISA`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Amx => "amx",
            Isa::Neon => "neon",
        }
    }
}

/// An `R × T` micro-kernel. Returns `Σ code·q` over `nb` blocks for each (row, token).
///
/// Block `b` of row `r` is the 64 bytes at `w + r·64 + b·bs` (the layout interleaves rows of a
/// group, so `bs` is the group's block stride); token `t`'s values start at `q + t·qs`.
///
/// # Safety
/// `w` and `q` must be valid for those reads, `R` must not cross a row group, and the caller
/// must have checked that the CPU supports the implementation's instruction set.
pub(crate) trait Tile {
    unsafe fn tile<const R: usize, const T: usize>(
        w: *const u8,
        bs: usize,
        q: *const i8,
        qs: usize,
        nb: usize,
    ) -> [[i32; T]; R];
}

/// Exact ternary products: `out[t · out_features + o] = Σ_k W[o,k] · q[t,k]`, token-major like
/// the layer's output tensor, so the caller rescales contiguous rows.
///
/// Splits output rows across the current rayon pool (each task writes its own column range of
/// every token's row). One token takes the GEMV tiles, more take
/// the GEMM tiles, which reuse each decoded weight vector for several tokens.
///
/// # Panics
/// If `isa` is not supported by this CPU (use [`Isa::available`]), or if the shapes disagree:
/// both are programming errors, which [`crate::BitLinearOp`] rules out before calling.
pub fn ternary_matmul(isa: Isa, w: &TernaryWeight, acts: &QuantizedActivations, out: &mut [i32]) {
    assert!(isa.is_available(), "{isa:?} is not supported by this CPU");
    let (rows, tokens) = (w.out_features(), acts.tokens());
    assert_eq!(
        acts.padded_len(),
        w.padded_in_features(),
        "activation and weight padding differ"
    );
    assert_eq!(
        out.len(),
        rows * tokens,
        "output buffer does not match [out_features, tokens]"
    );
    if rows == 0 || tokens == 0 {
        return;
    }
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    let amx_acts =
        (isa == Isa::Amx && tokens >= AMX_MIN_TOKENS && acts.padded_len() > 0).then(|| {
            let mut packed = AMX_ACTS.take();
            amx::pack_activations(acts, &mut packed);
            packed
        });
    // A few chunks per thread balance the load; chunks are multiples of the tile height (4
    // rows, or an AMX panel).
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    let height = if amx_acts.is_some() {
        amx::PANEL_ROWS
    } else {
        4
    };
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    let height = 4;
    let chunks = rayon::current_num_threads() * 4;
    let chunk_rows = rows.div_ceil(chunks).next_multiple_of(height).max(16);
    let out = OutPtr(out.as_mut_ptr());
    (0..rows.div_ceil(chunk_rows))
        .into_par_iter()
        .for_each(|i| {
            let r0 = i * chunk_rows;
            let n = chunk_rows.min(rows - r0);
            // SAFETY: `out` holds `rows × tokens` values (asserted above) and task `i` writes
            // only columns `r0 .. r0 + n` of each token's row, which no other task touches.
            let out = unsafe { ChunkOut::new(&out, r0, n, tokens, rows) };
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            if let Some(packed) = &amx_acts {
                // SAFETY: `Isa::Amx` is available (asserted above), so AVX-512 BW, AMX-INT8
                // and the tile state are; `packed` comes from these activations, whose padded
                // length is the weight's (asserted) and non-zero; `r0` is a multiple of 32.
                unsafe { amx::rows(w, r0, acts, packed, out) };
                return;
            }
            let run = match (isa, tokens) {
                (Isa::Scalar, _) => rows_tiled::<scalar::Scalar, 1, 1>,
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2, 1) => rows_tiled::<x86::Avx2, 4, 1>,
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2, _) => rows_tiled::<x86::Avx2, 2, 2>,
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx512Vnni | Isa::Amx, 1) if x86::prefetch_helps() => {
                    rows_tiled::<x86::Avx512Vnni<true>, 4, 1>
                }
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx512Vnni | Isa::Amx, 1) => rows_tiled::<x86::Avx512Vnni<false>, 4, 1>,
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx512Vnni | Isa::Amx, _) => rows_tiled::<x86::Avx512Vnni<false>, 4, 4>,
                #[cfg(target_arch = "aarch64")]
                (Isa::Neon, 1) => rows_tiled::<neon::Neon, 4, 1>,
                #[cfg(target_arch = "aarch64")]
                (Isa::Neon, _) => rows_tiled::<neon::Neon, 2, 2>,
                #[allow(unreachable_patterns)]
                _ => unreachable!("{isa:?} was checked to be available"),
            };
            run(w, r0, acts, out);
        });
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if let Some(packed) = amx_acts {
        AMX_ACTS.set(packed);
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
thread_local! {
    /// The AMX-packed activations, reused between products. Taken out while in use: a rayon
    /// worker waiting inside one product may run another on the same thread.
    static AMX_ACTS: std::cell::Cell<Vec<i8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Fewest tokens for which [`Isa::Amx`] uses tiles (16 tokens wide): below it, the AVX-512
/// VNNI tiles waste no work on padding and win.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
const AMX_MIN_TOKENS: usize = 8;

/// The output buffer, shared by the tasks of [`ternary_matmul`].
struct OutPtr(*mut i32);

// SAFETY: tasks write disjoint elements (see `ChunkOut`).
unsafe impl Sync for OutPtr {}

/// Columns `r0 .. r0 + rows` of every token's row of a token-major `[tokens, stride]` output.
struct ChunkOut {
    base: *mut i32,
    rows: usize,
    tokens: usize,
    stride: usize,
}

impl ChunkOut {
    /// # Safety
    /// The buffer must hold `tokens × stride` values with `r0 + rows ≤ stride`, and no one else
    /// may access these columns while this lives.
    unsafe fn new(out: &OutPtr, r0: usize, rows: usize, tokens: usize, stride: usize) -> Self {
        Self {
            // SAFETY: `r0 < stride`, within the buffer.
            base: unsafe { out.0.add(r0) },
            rows,
            tokens,
            stride,
        }
    }

    /// Rows `r .. r + len` (chunk-relative) of token `t`, which are contiguous.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[inline(always)]
    fn span(&mut self, r: usize, t: usize, len: usize) -> *mut i32 {
        assert!(r + len <= self.rows && t < self.tokens);
        // SAFETY: within the chunk's columns of token `t`'s row (constructor contract).
        unsafe { self.base.add(t * self.stride + r) }
    }

    /// Writes row `r` (chunk-relative) of token `t`.
    #[inline(always)]
    fn set(&mut self, r: usize, t: usize, v: i32) {
        assert!(r < self.rows && t < self.tokens);
        // SAFETY: `r` is within the chunk and `t` a token of the buffer (constructor contract).
        unsafe { *self.base.add(t * self.stride + r) = v };
    }
}

/// Tokens per cache block in the GEMM path: the quantized block stays in L1/L2 while the
/// chunk's weight rows stream past it.
const TOKEN_BLOCK: usize = 16;

/// Computes rows `r0 .. r0 + out.rows` with `R × T` tiles, falling back to 1-high /
/// 1-wide tiles at ragged edges.
fn rows_tiled<K: Tile, const R: usize, const T: usize>(
    w: &TernaryWeight,
    r0: usize,
    acts: &QuantizedActivations,
    mut out: ChunkOut,
) {
    let tokens = acts.tokens();
    let rows = out.rows;
    let nb = w.blocks_per_row();
    debug_assert_eq!(acts.padded_len(), nb * BLOCK);
    debug_assert!(r0.is_multiple_of(ROW_GROUP) && ROW_GROUP.is_multiple_of(R));
    let bs = TernaryWeight::block_stride();
    let (q0, qs, sums) = (acts.values().as_ptr(), acts.padded_len(), acts.sums());
    for tb in (0..tokens).step_by(TOKEN_BLOCK) {
        let tb_end = (tb + TOKEN_BLOCK).min(tokens);
        let mut r = 0;
        while r < rows {
            let full_r = rows - r >= R;
            let mut t = tb;
            while t < tb_end {
                let full_t = tb_end - t >= T;
                // SAFETY: rows r..r+R (or r+1) lie within this chunk of the weight and one group, tokens
                // t..t+T (or t+1) within the activations; the ISA was checked by the caller.
                let mut emit = |acc: &[i32], rr: usize, tt: usize| {
                    for i in 0..rr {
                        for j in 0..tt {
                            out.set(r + i, t + j, acc[i * tt + j] - sums[t + j]);
                        }
                    }
                };
                unsafe {
                    let (w, q) = (w.row_ptr(r0 + r), q0.add(t * qs));
                    match (full_r, full_t) {
                        (true, true) => {
                            emit(K::tile::<R, T>(w, bs, q, qs, nb).as_flattened(), R, T)
                        }
                        (true, false) => {
                            emit(K::tile::<R, 1>(w, bs, q, qs, nb).as_flattened(), R, 1)
                        }
                        (false, true) => {
                            emit(K::tile::<1, T>(w, bs, q, qs, nb).as_flattened(), 1, T)
                        }
                        (false, false) => {
                            emit(K::tile::<1, 1>(w, bs, q, qs, nb).as_flattened(), 1, 1)
                        }
                    }
                }
                t += if full_t { T } else { 1 };
            }
            r += if full_r { R } else { 1 };
        }
    }
}
