//! aarch64 NEON micro-kernel (baseline NEON: `smull` + `sadalp`, no dot-product extension).

use std::arch::aarch64::*;

use super::Tile;
use crate::layout::{BLOCK, BLOCK_BYTES};

pub(crate) struct Neon;

impl Tile for Neon {
    unsafe fn tile<const R: usize, const T: usize>(
        w: *const u8,
        bs: usize,
        q: *const i8,
        qs: usize,
        nb: usize,
    ) -> [[i32; T]; R] {
        // SAFETY: forwarded from the trait contract; NEON is part of the aarch64 baseline.
        unsafe { tile_neon::<R, T>(w, bs, q, qs, nb) }
    }
}

#[target_feature(enable = "neon")]
unsafe fn tile_neon<const R: usize, const T: usize>(
    w: *const u8,
    bs: usize,
    q: *const i8,
    qs: usize,
    nb: usize,
) -> [[i32; T]; R] {
    let mask = vdupq_n_u8(3);
    let mut acc = [[vdupq_n_s32(0); T]; R];
    for b in 0..nb {
        for quarter in 0..4 {
            let mut wv = [vdupq_n_u8(0); R];
            for (r, wr) in wv.iter_mut().enumerate() {
                *wr = vld1q_u8(w.add(r * BLOCK_BYTES + b * bs + quarter * 16));
            }
            for k in 0..4 {
                let mut qv = [vdupq_n_s8(0); T];
                for (t, qt) in qv.iter_mut().enumerate() {
                    *qt = vld1q_s8(q.add(t * qs + b * BLOCK + k * BLOCK_BYTES + quarter * 16));
                }
                for r in 0..R {
                    let codes = vreinterpretq_s8_u8(vandq_u8(wv[r], mask));
                    wv[r] = vshrq_n_u8::<2>(wv[r]);
                    for t in 0..T {
                        let lo = vmull_s8(vget_low_s8(codes), vget_low_s8(qv[t]));
                        let hi = vmull_high_s8(codes, qv[t]);
                        acc[r][t] = vpadalq_s16(vpadalq_s16(acc[r][t], lo), hi);
                    }
                }
            }
        }
    }
    let mut sums = [[0i32; T]; R];
    for r in 0..R {
        for t in 0..T {
            sums[r][t] = vaddvq_s32(acc[r][t]);
        }
    }
    sums
}
