//! Portable reference micro-kernel: the definition every SIMD path must match bit for bit.

use super::Tile;
use crate::layout::{BLOCK, BLOCK_BYTES};

pub(crate) struct Scalar;

impl Tile for Scalar {
    unsafe fn tile<const R: usize, const T: usize>(
        w: *const u8,
        ws: usize,
        q: *const i8,
        qs: usize,
        nb: usize,
    ) -> [[i32; T]; R] {
        let mut acc = [[0i32; T]; R];
        for (r, acc_r) in acc.iter_mut().enumerate() {
            // SAFETY: the caller guarantees R rows of nb blocks and T rows of nb · 256 values.
            let wr = unsafe { std::slice::from_raw_parts(w.add(r * ws), nb * BLOCK_BYTES) };
            for (t, acc_rt) in acc_r.iter_mut().enumerate() {
                let qt = unsafe { std::slice::from_raw_parts(q.add(t * qs), nb * BLOCK) };
                for (b, block) in wr.chunks_exact(BLOCK_BYTES).enumerate() {
                    for (j, &byte) in block.iter().enumerate() {
                        for k in 0..4 {
                            let code = ((byte >> (2 * k)) & 3) as i32;
                            *acc_rt += code * qt[b * BLOCK + k * BLOCK_BYTES + j] as i32;
                        }
                    }
                }
            }
        }
        acc
    }
}
