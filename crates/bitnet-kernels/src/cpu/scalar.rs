//! Portable reference micro-kernel: the definition every SIMD path must match bit for bit.

use super::Tile;
use crate::layout::{BLOCK, BLOCK_BYTES};

pub(crate) struct Scalar;

impl Tile for Scalar {
    unsafe fn tile<const R: usize, const T: usize>(
        w: *const u8,
        bs: usize,
        q: *const i8,
        qs: usize,
        nb: usize,
    ) -> [[i32; T]; R] {
        let mut acc = [[0i32; T]; R];
        for (r, acc_r) in acc.iter_mut().enumerate() {
            for (t, acc_rt) in acc_r.iter_mut().enumerate() {
                for b in 0..nb {
                    // SAFETY: the caller guarantees these blocks and activation rows exist.
                    let (block, qb) = unsafe {
                        (
                            std::slice::from_raw_parts(
                                w.add(r * BLOCK_BYTES + b * bs),
                                BLOCK_BYTES,
                            ),
                            std::slice::from_raw_parts(q.add(t * qs + b * BLOCK), BLOCK),
                        )
                    };
                    for (j, &byte) in block.iter().enumerate() {
                        for k in 0..4 {
                            let code = ((byte >> (2 * k)) & 3) as i32;
                            *acc_rt += code * qb[k * BLOCK_BYTES + j] as i32;
                        }
                    }
                }
            }
        }
        acc
    }
}
