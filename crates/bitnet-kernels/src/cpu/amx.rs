//! x86-64 AMX-INT8 GEMM for many tokens (prefill): `tdpbusd` on 16 × 16 i32 tiles.
//!
//! One `tdpbusd` multiplies a 16 × 64 u8 tile (A) by a 64 × 16 i8 tile (B) into a 16 × 16 i32
//! accumulator: 16 384 exact multiply-adds, 256× one 512-bit `vpdpbusd`, at a throughput of
//! one per 16 cycles on Sapphire Rapids and later. A holds unsigned weight codes `w + 1 ∈
//! {0,1,2}` (as in every other path, so the driver subtracts each token's `Σq`); B holds the
//! quantized activations "VNNI-packed": row `p` of a B tile is the inputs `4p .. 4p + 4` of
//! each of 16 tokens. Accumulation is i32 throughout, so results are bit-identical to
//! [`super::Isa::Scalar`].
//!
//! The 2-bit kernel layout is unpacked to one byte per code for a panel of [`PANEL_ROWS`]
//! rows (the A tiles of every K step, in L2), which is then reused by every pair of token
//! groups; the activations are repacked once per product. Rust's AMX intrinsics are not
//! stable, so the tile instructions are inline assembly; Linux must grant the process the
//! tile state first (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, done once by [`request_tile_state`]).

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;

use super::ChunkOut;
use crate::layout::{TernaryWeight, BLOCK, BLOCK_BYTES};
use crate::quant::QuantizedActivations;

/// Rows of one weight panel: two A tiles.
pub(crate) const PANEL_ROWS: usize = 2 * TILE;
/// Rows of an A tile, tokens of a B tile.
const TILE: usize = 16;
/// Bytes per tile row (64 u8 codes of A, 16 tokens × 4 inputs of B).
const TILE_BYTES: usize = 64;

/// Asks Linux for the AMX tile data state; true when granted (or already granted).
///
/// The permission is per process, so one request covers the rayon workers too.
pub(crate) fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments; it changes only this process's
    // permitted XSAVE features.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

/// Whether the CPU has AMX-TILE and AMX-INT8 (CPUID leaf 7, EDX bits 24 and 25).
pub(crate) fn cpu_has_amx_int8() -> bool {
    // Leaf 7 exists when the highest basic leaf is at least 7.
    __get_cpuid_max(0).0 >= 7 && (__cpuid_count(7, 0).edx >> 24) & 3 == 3
}

/// The activations as B tiles: for each group of 16 tokens, `k_pad / 4` rows of 64 bytes
/// (token `t`'s inputs `4p .. 4p + 4` at bytes `4t .. 4t + 4` of row `p`); missing tokens of
/// the last group are zero.
pub(crate) fn pack_activations(acts: &QuantizedActivations, packed: &mut Vec<i8>) {
    let (k, tokens) = (acts.padded_len(), acts.tokens());
    let groups = tokens.div_ceil(TILE);
    packed.clear();
    packed.resize(groups * k * TILE, 0);
    for (t, row) in acts.values().chunks_exact(k).enumerate() {
        let group = &mut packed[(t / TILE) * k * TILE..][..k * TILE];
        let lane = (t % TILE) * 4;
        for (p, quad) in row.chunks_exact(4).enumerate() {
            group[p * TILE_BYTES + lane..][..4].copy_from_slice(quad);
        }
    }
}

thread_local! {
    /// Each worker's unpacked weight panel (grown once, reused by every product).
    static PANEL: RefCell<Vec<Block64>> = const { RefCell::new(Vec::new()) };
}

/// 64 aligned bytes, the unit of the panel buffer (tile rows start on cache lines).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block64([u8; 64]);

/// Computes rows `r0 .. r0 + out.rows` for every token from the packed activations `b`.
///
/// # Safety
/// The CPU must support AVX-512 BW and AMX-INT8 with the tile state granted
/// ([`request_tile_state`]); `b` must come from [`pack_activations`] on `acts`, whose padded
/// length must be the weight's and non-zero; `r0` must be a multiple of the row group.
pub(crate) unsafe fn rows(
    w: &TernaryWeight,
    r0: usize,
    acts: &QuantizedActivations,
    b: &[i8],
    mut out: ChunkOut,
) {
    let k = acts.padded_len();
    let (tokens, groups) = (acts.tokens(), acts.tokens().div_ceil(TILE));
    debug_assert!(k > 0 && k == w.padded_in_features() && b.len() == groups * k * TILE);
    let sums = acts.sums();
    PANEL.with_borrow_mut(|panel| {
        panel.resize(PANEL_ROWS * k / 64, Block64([0; 64]));
        let panel = panel.as_mut_ptr().cast::<u8>();
        let mut c = [[[0i32; TILE]; TILE]; 4];
        // SAFETY: the caller's contract covers the instruction sets; every pointer below stays
        // inside `panel` (PANEL_ROWS × k bytes), `b` (groups × k × 16) or `c`.
        unsafe {
            configure_tiles();
            for p0 in (0..out.rows).step_by(PANEL_ROWS) {
                let n = PANEL_ROWS.min(out.rows - p0);
                unpack_panel(w, r0 + p0, n, panel, k);
                for g in (0..groups).step_by(2) {
                    let pair = g + 1 < groups;
                    let b0 = b.as_ptr().add(g * k * TILE);
                    // A lone last group is multiplied twice; its copy's results are dropped.
                    let b1 = if pair { b0.add(k * TILE) } else { b0 };
                    panel_times_groups(panel, k, b0, b1, &mut c);
                    for (tile, ct) in c.iter().enumerate() {
                        let (dr, t0) = (TILE * (tile / 2), TILE * (g + tile % 2));
                        if dr < n && t0 < tokens {
                            let (rows, cols) = ((n - dr).min(TILE), (tokens - t0).min(TILE));
                            emit(ct, &sums[t0..t0 + cols], rows, |j| {
                                out.span(p0 + dr, t0 + j, rows)
                            });
                        }
                    }
                }
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    });
}

/// Writes an accumulator tile (rows × tokens) to the token-major output, transposed, minus
/// each token's `Σq`: `dst(j)` is where token `j`'s `rows` results go (`sums.len()` tokens).
#[target_feature(enable = "avx512f")]
unsafe fn emit(
    c: &[[i32; TILE]; TILE],
    sums: &[i32],
    rows: usize,
    mut dst: impl FnMut(usize) -> *mut i32,
) {
    let mut r = [_mm512_setzero_si512(); TILE];
    for (ri, ci) in r.iter_mut().zip(c) {
        *ri = _mm512_loadu_si512(ci.as_ptr().cast());
    }
    let mask = ((1u32 << rows) - 1) as u16;
    for (j, column) in transpose(r).iter().enumerate().take(sums.len()) {
        let v = _mm512_sub_epi32(*column, _mm512_set1_epi32(sums[j]));
        _mm512_mask_storeu_epi32(dst(j), mask, v);
    }
}

/// Transposes a 16 × 16 matrix of i32 held as 16 row vectors.
///
/// 32-bit then 64-bit interleaves leave 128-bit lane `L` of `u[4i + c]` holding column
/// `4L + c` of rows `4i .. 4i + 4`; two rounds of 128-bit lane shuffles gather the four lanes
/// of each column.
#[target_feature(enable = "avx512f")]
fn transpose(r: [__m512i; TILE]) -> [__m512i; TILE] {
    let mut t = [_mm512_setzero_si512(); TILE];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); TILE];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    let mut out = [_mm512_setzero_si512(); TILE];
    for c in 0..4 {
        let v0 = _mm512_shuffle_i32x4::<0x44>(u[c], u[4 + c]);
        let v1 = _mm512_shuffle_i32x4::<0xEE>(u[c], u[4 + c]);
        let w0 = _mm512_shuffle_i32x4::<0x44>(u[8 + c], u[12 + c]);
        let w1 = _mm512_shuffle_i32x4::<0xEE>(u[8 + c], u[12 + c]);
        out[c] = _mm512_shuffle_i32x4::<0x88>(v0, w0);
        out[4 + c] = _mm512_shuffle_i32x4::<0xDD>(v0, w0);
        out[8 + c] = _mm512_shuffle_i32x4::<0x88>(v1, w1);
        out[12 + c] = _mm512_shuffle_i32x4::<0xDD>(v1, w1);
    }
    out
}

/// Loads the tile configuration: palette 1, all eight tiles 16 rows × 64 bytes
/// (tmm0–3 accumulators, tmm4–5 weight codes, tmm6–7 activations).
unsafe fn configure_tiles() {
    let mut cfg = Block64([0; 64]);
    cfg.0[0] = 1;
    for t in 0..8 {
        cfg.0[16 + 2 * t] = TILE_BYTES as u8;
        cfg.0[48 + t] = TILE as u8;
    }
    // SAFETY: a valid palette-1 configuration (the caller checked AMX support).
    unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
}

/// Writes the codes of rows `row .. row + n` as bytes, row-major `[PANEL_ROWS][k]` (inputs in
/// natural order, since byte `j`, bit pair `i` of block `b` holds input `256b + 64i + j`);
/// rows past `n` are zero codes (their results are never written).
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unpack_panel(w: &TernaryWeight, row: usize, n: usize, panel: *mut u8, k: usize) {
    let (nb, bs) = (k / BLOCK, TernaryWeight::block_stride());
    let mask = _mm512_set1_epi8(3);
    for i in 0..PANEL_ROWS {
        let dst = panel.add(i * k);
        if i >= n {
            std::ptr::write_bytes(dst, 0, k);
            continue;
        }
        let src = w.row_ptr(row + i);
        for blk in 0..nb {
            let mut v = _mm512_loadu_si512(src.add(blk * bs).cast());
            for q in 0..4 {
                let codes = _mm512_and_si512(v, mask);
                _mm512_storeu_si512(dst.add(blk * BLOCK + q * BLOCK_BYTES).cast(), codes);
                v = _mm512_srli_epi16::<2>(v);
            }
        }
    }
}

/// `c[2a + j] = A_a · B_j` over all `k` inputs, for the panel's two A tiles (rows 0–15,
/// 16–31) and the token groups at `b0` and `b1`.
unsafe fn panel_times_groups(
    panel: *const u8,
    k: usize,
    b0: *const i8,
    b1: *const i8,
    c: &mut [[[i32; TILE]; TILE]; 4],
) {
    let c = c.as_mut_ptr().cast::<i32>();
    // SAFETY: tiles are configured; A rows are `k` bytes apart in the panel, B rows 64 bytes
    // apart in the packed activations; each step advances 64 inputs (`k / 64 ≥ 4` steps).
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "2:",
            "tileloadd tmm4, [{a0} + {ks}*1]",
            "tileloadd tmm5, [{a1} + {ks}*1]",
            "tileloadd tmm6, [{b0} + {bs}*1]",
            "tileloadd tmm7, [{b1} + {bs}*1]",
            "tdpbusd tmm0, tmm4, tmm6",
            "tdpbusd tmm1, tmm4, tmm7",
            "tdpbusd tmm2, tmm5, tmm6",
            "tdpbusd tmm3, tmm5, tmm7",
            "add {a0}, 64",
            "add {a1}, 64",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {steps}",
            "jnz 2b",
            "tilestored [{c0} + {cs}*1], tmm0",
            "tilestored [{c1} + {cs}*1], tmm1",
            "tilestored [{c2} + {cs}*1], tmm2",
            "tilestored [{c3} + {cs}*1], tmm3",
            a0 = inout(reg) panel => _,
            a1 = inout(reg) panel.add(TILE * k) => _,
            b0 = inout(reg) b0 => _,
            b1 = inout(reg) b1 => _,
            steps = inout(reg) k / TILE_BYTES => _,
            ks = in(reg) k,
            bs = in(reg) TILE_BYTES,
            c0 = in(reg) c,
            c1 = in(reg) c.add(TILE * TILE),
            c2 = in(reg) c.add(2 * TILE * TILE),
            c3 = in(reg) c.add(3 * TILE * TILE),
            cs = in(reg) TILE * 4,
            options(nostack),
        );
    }
}
