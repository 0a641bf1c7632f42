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

mod dense;
#[cfg(target_arch = "aarch64")]
mod neon;
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
    /// aarch64 NEON (`smull` + `sadalp`).
    Neon,
}

impl Isa {
    /// The best instruction set this CPU supports (detected once).
    ///
    /// `BITNET_ISA=scalar|avx2|avx512vnni|neon` overrides it, for benchmarks and debugging;
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

/// Exact ternary products: `out[o · tokens + t] = Σ_k W[o,k] · q[t,k]` (note the
/// output-row-major order, which lets threads own contiguous slices of `out`).
///
/// Splits output rows across the current rayon pool. One token takes the GEMV tiles, more take
/// the GEMM tiles, which reuse each decoded weight vector for several tokens.
///
/// # Panics
/// If `isa` is not supported by this CPU (use [`Isa::available`]), or if the shapes disagree:
/// both are programming errors, which [`crate::BitLinearOp`] rules out before calling.
pub fn ternary_matmul(isa: Isa, w: &TernaryWeight, acts: &QuantizedActivations, out: &mut [i32]) {
    assert!(
        Isa::available().contains(&isa),
        "{isa:?} is not supported by this CPU"
    );
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
    // A few chunks per thread balance the load; chunks are multiples of 4 rows (the tile height).
    let chunks = rayon::current_num_threads() * 4;
    let chunk_rows = rows.div_ceil(chunks).next_multiple_of(4).max(16);
    out.par_chunks_mut(chunk_rows * tokens)
        .enumerate()
        .for_each(|(i, out)| {
            let r0 = i * chunk_rows;
            let run = match (isa, tokens) {
                (Isa::Scalar, _) => rows_tiled::<scalar::Scalar, 1, 1>,
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2, 1) => rows_tiled::<x86::Avx2, 4, 1>,
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2, _) => rows_tiled::<x86::Avx2, 2, 2>,
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx512Vnni, 1) => rows_tiled::<x86::Avx512Vnni, 4, 1>,
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx512Vnni, _) => rows_tiled::<x86::Avx512Vnni, 4, 4>,
                #[cfg(target_arch = "aarch64")]
                (Isa::Neon, 1) => rows_tiled::<neon::Neon, 4, 1>,
                #[cfg(target_arch = "aarch64")]
                (Isa::Neon, _) => rows_tiled::<neon::Neon, 2, 2>,
                #[allow(unreachable_patterns)]
                _ => unreachable!("{isa:?} was checked to be available"),
            };
            run(w, r0, acts, out);
        });
}

/// Tokens per cache block in the GEMM path: the quantized block stays in L1/L2 while the
/// chunk's weight rows stream past it.
const TOKEN_BLOCK: usize = 16;

/// Computes rows `r0 .. r0 + out.len() / tokens` with `R × T` tiles, falling back to 1-high /
/// 1-wide tiles at ragged edges.
fn rows_tiled<K: Tile, const R: usize, const T: usize>(
    w: &TernaryWeight,
    r0: usize,
    acts: &QuantizedActivations,
    out: &mut [i32],
) {
    let tokens = acts.tokens();
    let rows = out.len() / tokens;
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
                            out[(r + i) * tokens + t + j] = acc[i * tt + j] - sums[t + j];
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
