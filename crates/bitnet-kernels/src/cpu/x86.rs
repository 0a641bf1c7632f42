//! x86-64 micro-kernels: AVX2 and AVX-512 VNNI.
//!
//! Both shift-and-mask the packed bytes into unsigned codes 0..2 and multiply them with the
//! signed int8 activations (u8 × i8 is exactly what `vpmaddubsw` / `vpdpbusd` take); the
//! AVX-512 one-token tile masks without shifting (see [`gemv_avx512`]).

use std::arch::x86_64::*;

use super::Tile;
use crate::layout::{BLOCK, BLOCK_BYTES};

pub(crate) struct Avx2;
/// `PREFETCH`: one-token tiles prefetch their weights [`PREFETCH_DISTANCE`] bytes ahead into L1
/// and [`L2_PREFETCH_DISTANCE`] bytes ahead into L2.
pub(crate) struct Avx512Vnni<const PREFETCH: bool>;

/// How far ahead a prefetching GEMV tile asks for its weight stream into L1: on the Intel Xeon
/// VM (AMX, 2 vCPUs) a 2 KiB lead made batch-1 GEMV 25–30% faster and 2B-4T decode 10–14%; with
/// the shift-free one-token tile, 1.5 KiB beat 2 KiB by another 5–20% (docs/BENCHMARKS.md). On
/// the AMD Zen 4 VM software prefetch slowed it (20 → 15 GB/s), so [`prefetch_helps`] enables
/// it on Intel CPUs only.
const PREFETCH_DISTANCE: usize = 1536;
/// The same stream's lead into L2, so that the L1 prefetches above find their lines there: on
/// top of them, 2-thread GEMV 10–20% faster and decode 5–9% (1 and 2 threads). An L2 prefetch
/// alone was faster in the kernel bench but slower in the model (docs/BENCHMARKS.md).
const L2_PREFETCH_DISTANCE: usize = 4096;

/// Whether this CPU's GEMV tiles should prefetch (Intel: yes; others: their hardware
/// prefetchers already follow the sequential layout).
pub(crate) fn prefetch_helps() -> bool {
    static INTEL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *INTEL.get_or_init(|| {
        let id = __cpuid(0);
        [id.ebx, id.edx, id.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .eq(*b"GenuineIntel")
    })
}

impl Tile for Avx2 {
    unsafe fn tile<const R: usize, const T: usize>(
        w: *const u8,
        bs: usize,
        q: *const i8,
        qs: usize,
        nb: usize,
    ) -> [[i32; T]; R] {
        // SAFETY: forwarded from the trait contract (AVX2 checked by `Isa::available`).
        unsafe { tile_avx2::<R, T>(w, bs, q, qs, nb) }
    }
}

impl<const PREFETCH: bool> Tile for Avx512Vnni<PREFETCH> {
    unsafe fn tile<const R: usize, const T: usize>(
        w: *const u8,
        bs: usize,
        q: *const i8,
        qs: usize,
        nb: usize,
    ) -> [[i32; T]; R] {
        // SAFETY: forwarded from the trait contract (AVX-512 VNNI checked by `Isa::available`).
        unsafe {
            if T == 1 {
                let sums = gemv_avx512::<R, PREFETCH>(w, bs, q, nb);
                std::array::from_fn(|r| [sums[r]; T])
            } else {
                tile_avx512::<R, T>(w, bs, q, qs, nb)
            }
        }
    }
}

#[target_feature(enable = "avx2")]
unsafe fn tile_avx2<const R: usize, const T: usize>(
    w: *const u8,
    bs: usize,
    q: *const i8,
    qs: usize,
    nb: usize,
) -> [[i32; T]; R] {
    let mask = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_si256(); T]; R];
    for b in 0..nb {
        // `vpmaddubsw` pairs are at most 2·2·128 = 512 in magnitude; eight of them per block
        // stay far below i16's range, so widen to i32 once per block.
        let mut acc16 = [[_mm256_setzero_si256(); T]; R];
        for half in 0..2 {
            let mut wv = [_mm256_setzero_si256(); R];
            for (r, wr) in wv.iter_mut().enumerate() {
                *wr = _mm256_loadu_si256(w.add(r * BLOCK_BYTES + b * bs + half * 32).cast());
            }
            for k in 0..4 {
                let mut qv = [_mm256_setzero_si256(); T];
                for (t, qt) in qv.iter_mut().enumerate() {
                    *qt = _mm256_loadu_si256(
                        q.add(t * qs + b * BLOCK + k * BLOCK_BYTES + half * 32)
                            .cast(),
                    );
                }
                for r in 0..R {
                    let codes = _mm256_and_si256(wv[r], mask);
                    wv[r] = _mm256_srli_epi16::<2>(wv[r]);
                    for t in 0..T {
                        acc16[r][t] =
                            _mm256_add_epi16(acc16[r][t], _mm256_maddubs_epi16(codes, qv[t]));
                    }
                }
            }
        }
        for r in 0..R {
            for t in 0..T {
                acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(acc16[r][t], ones));
            }
        }
    }
    let mut sums = [[0i32; T]; R];
    for r in 0..R {
        for t in 0..T {
            sums[r][t] = hsum_avx2(acc[r][t]);
        }
    }
    sums
}

#[target_feature(enable = "avx2")]
fn hsum_avx2(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_avx512<const R: usize, const T: usize>(
    w: *const u8,
    bs: usize,
    q: *const i8,
    qs: usize,
    nb: usize,
) -> [[i32; T]; R] {
    let mask = _mm512_set1_epi8(3);
    let mut acc = [[_mm512_setzero_si512(); T]; R];
    for b in 0..nb {
        let mut wv = [_mm512_setzero_si512(); R];
        for (r, wr) in wv.iter_mut().enumerate() {
            *wr = _mm512_loadu_si512(w.add(r * BLOCK_BYTES + b * bs).cast());
        }
        for k in 0..4 {
            let mut qv = [_mm512_setzero_si512(); T];
            for (t, qt) in qv.iter_mut().enumerate() {
                *qt = _mm512_loadu_si512(q.add(t * qs + b * BLOCK + k * BLOCK_BYTES).cast());
            }
            for r in 0..R {
                let codes = _mm512_and_si512(wv[r], mask);
                wv[r] = _mm512_srli_epi16::<2>(wv[r]);
                for t in 0..T {
                    acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], codes, qv[t]);
                }
            }
        }
    }
    let mut sums = [[0i32; T]; R];
    for r in 0..R {
        for t in 0..T {
            sums[r][t] = _mm512_reduce_add_epi32(acc[r][t]);
        }
    }
    sums
}

/// The one-token tile: the codes of input group `k` are masked in place (`byte & 3 << 2k`, i.e.
/// `code · 4^k`, at most 128, still a valid unsigned operand) instead of shifted down, into an
/// accumulator of their own per `k`; each accumulator is an exact multiple of `4^k`, shifted back
/// once at the end. That drops the three shifts per weight vector of the GEMM tile. A lane of the
/// `k = 3` accumulator grows by at most 4·128·128 per block, the same bound (256·2·128 per block)
/// the row's final i32 sum has, so the shortcut narrows no input range.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn gemv_avx512<const R: usize, const PREFETCH: bool>(
    w: *const u8,
    bs: usize,
    q: *const i8,
    nb: usize,
) -> [i32; R] {
    let masks = [0x03, 0x0c, 0x30, 0xc0u8].map(|m| _mm512_set1_epi8(m as i8));
    let mut acc = [[_mm512_setzero_si512(); 4]; R];
    for b in 0..nb {
        if PREFETCH {
            // A hint only: addresses past the weights are not dereferenced.
            for r in 0..R {
                let at = w.wrapping_add(r * BLOCK_BYTES + b * bs);
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH_DISTANCE).cast());
                _mm_prefetch::<_MM_HINT_T2>(at.wrapping_add(L2_PREFETCH_DISTANCE).cast());
            }
        }
        let mut wv = [_mm512_setzero_si512(); R];
        for (r, wr) in wv.iter_mut().enumerate() {
            *wr = _mm512_loadu_si512(w.add(r * BLOCK_BYTES + b * bs).cast());
        }
        for k in 0..4 {
            let qv = _mm512_loadu_si512(q.add(b * BLOCK + k * BLOCK_BYTES).cast());
            for r in 0..R {
                let codes = _mm512_and_si512(wv[r], masks[k]);
                acc[r][k] = _mm512_dpbusd_epi32(acc[r][k], codes, qv);
            }
        }
    }
    std::array::from_fn(|r| {
        let [a0, a1, a2, a3] = acc[r];
        let a = _mm512_add_epi32(
            _mm512_add_epi32(a0, _mm512_srai_epi32::<2>(a1)),
            _mm512_add_epi32(_mm512_srai_epi32::<4>(a2), _mm512_srai_epi32::<6>(a3)),
        );
        _mm512_reduce_add_epi32(a)
    })
}
