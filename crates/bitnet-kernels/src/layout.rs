//! [`TernaryWeight`]: the kernel-side weight layout, built once at load time.
//!
//! The HF layout (see [`crate::pack`]) groups rows in four blocks, which is convenient for
//! torch but not for a dot-product kernel. Here each output row is padded with zeros to a
//! multiple of [`BLOCK`] input features and cut into 64-byte blocks: byte `j` (0..64) of block
//! `b` holds the codes of inputs `256b + j + 64k` for `k = 0..4` in bits `2k..2k+1` (codes
//! 0/1/2 = −1/0/+1, as in the HF layout). So one shift-and-mask of a 64-byte load yields the
//! codes of 64 *consecutive* inputs, which line up with a plain load of the int8 activations:
//! AVX-512 takes a block in one load, AVX2 in two 32-byte halves and NEON in four 16-byte
//! quarters, with no shuffles.
//!
//! Rows are interleaved in groups of [`ROW_GROUP`]: block `b` of the group's four rows are
//! adjacent (`[r0 b0][r1 b0][r2 b0][r3 b0][r0 b1]…`), so a 4-row kernel tile reads one strictly
//! sequential stream. With rows stored one after another, a tile reads four short streams
//! (640 bytes each at the 2B-4T width) that hardware prefetchers never learn; interleaving made
//! cold-cache GEMV ~3× faster. Weights stay at 2 bits each, as in the HF file.

use rayon::prelude::*;

use crate::error::{KernelError, Result};
use crate::pack::check_len;

/// Input features covered by one 64-byte block.
pub const BLOCK: usize = 256;
/// Bytes per block.
pub const BLOCK_BYTES: usize = BLOCK / 4;
/// Rows interleaved block by block (module docs); kernel tile heights divide it.
pub const ROW_GROUP: usize = 4;
/// A block of four zero codes in every byte (code 1 = 0), used for padding.
const ZERO_BYTE: u8 = 0b0101_0101;

/// One cache-line-aligned block of 256 ternary codes.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Block(pub(crate) [u8; BLOCK_BYTES]);

/// A ternary `[out, in]` weight matrix in the kernel layout (module docs), without its scale.
#[derive(Clone)]
pub struct TernaryWeight {
    out: usize,
    inp: usize,
    blocks: Vec<Block>,
}

impl std::fmt::Debug for TernaryWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TernaryWeight")
            .field("out", &self.out)
            .field("in", &self.inp)
            .finish()
    }
}

impl TernaryWeight {
    /// Builds the kernel layout from an HF packed U8 `[out/4, in]` buffer.
    ///
    /// Fails on a shape mismatch or the invalid code 3 (naming the packed position).
    pub fn from_hf_packed(packed: &[u8], out: usize, inp: usize) -> Result<Self> {
        if !out.is_multiple_of(4) {
            return Err(KernelError::RowsNotMultipleOfFour { out });
        }
        let quarter = out / 4;
        check_len("packed weight", packed.len(), quarter, inp)?;
        // Row `row` is bit pair `row / quarter` of packed row `row % quarter`.
        Self::build(out, inp, |row| {
            (
                &packed[(row % quarter) * inp..][..inp],
                2 * (row / quarter) as u32,
            )
        })
        .map_err(|(row, col)| KernelError::InvalidCode {
            row: row % quarter,
            col,
            bit: 2 * (row / quarter),
        })
    }

    /// Builds the kernel layout from a row-major ternary `[out, in]` matrix (values −1/0/+1).
    pub fn from_ternary(ternary: &[i8], out: usize, inp: usize) -> Result<Self> {
        check_len("ternary weight", ternary.len(), out, inp)?;
        if let Some(i) = ternary.iter().position(|v| !(-1..=1).contains(v)) {
            return Err(KernelError::NotTernary {
                row: i / inp,
                col: i % inp,
                value: ternary[i],
            });
        }
        // Validated above, so `v + 1` is a code 0..2.
        let codes: Vec<u8> = ternary.iter().map(|&v| (v + 1) as u8).collect();
        Self::build(out, inp, |row| (&codes[row * inp..][..inp], 0)).map_err(|(row, col)| {
            KernelError::NotTernary {
                row,
                col,
                value: ternary[row * inp + col],
            }
        })
    }

    /// Shared constructor: `source(row)` yields the bytes holding row `row`'s codes and the
    /// shift of its bit pair. Returns the first `(row, col)` whose code is 3.
    fn build<'s>(
        out: usize,
        inp: usize,
        source: impl Fn(usize) -> (&'s [u8], u32) + Sync,
    ) -> std::result::Result<Self, (usize, usize)> {
        let nb = inp.div_ceil(BLOCK);
        let groups = out.div_ceil(ROW_GROUP);
        let mut blocks = vec![Block([ZERO_BYTE; BLOCK_BYTES]); groups * ROW_GROUP * nb];
        if nb > 0 {
            blocks
                .par_chunks_mut(nb * ROW_GROUP)
                .enumerate()
                .try_for_each(|(group, dst)| {
                    for lane in 0..ROW_GROUP.min(out - group * ROW_GROUP) {
                        let row = group * ROW_GROUP + lane;
                        let (src, shift) = source(row);
                        if !fill_row(dst.iter_mut().skip(lane).step_by(ROW_GROUP), src, shift) {
                            let col = src.iter().position(|&b| (b >> shift) & 3 == 3).unwrap_or(0);
                            return Err((row, col));
                        }
                    }
                    Ok(())
                })?;
        }
        Ok(Self { out, inp, blocks })
    }

    /// Output features (rows).
    pub fn out_features(&self) -> usize {
        self.out
    }

    /// Input features (columns), before padding.
    pub fn in_features(&self) -> usize {
        self.inp
    }

    /// Input features after padding to a multiple of [`BLOCK`].
    pub fn padded_in_features(&self) -> usize {
        self.blocks_per_row() * BLOCK
    }

    pub(crate) fn blocks_per_row(&self) -> usize {
        self.inp.div_ceil(BLOCK)
    }

    /// Bytes held by the packed codes (2 bits per weight, padding included).
    pub fn storage_bytes(&self) -> usize {
        self.blocks.len() * BLOCK_BYTES
    }

    /// True when every weight is zero: a sign of a broken checkpoint (REFERENCE.md, known traps).
    pub fn is_all_zero(&self) -> bool {
        self.blocks.iter().all(|b| b.0 == [ZERO_BYTE; BLOCK_BYTES])
    }

    /// Pointer to the first block of `row` (a multiple of [`ROW_GROUP`] or within its group);
    /// the rows of a group are 64 bytes apart and a row's blocks [`Self::block_stride`] apart.
    pub(crate) fn row_ptr(&self, row: usize) -> *const u8 {
        let (group, lane) = (row / ROW_GROUP, row % ROW_GROUP);
        let index = group * ROW_GROUP * self.blocks_per_row() + lane;
        self.blocks[index..].as_ptr().cast::<u8>()
    }

    /// The whole layout as bytes (groups of four rows, each `blocks_per_row` blocks of
    /// `[row0][row1][row2][row3]` 64-byte row blocks; module docs), for upload to a GPU.
    #[cfg(feature = "cuda")]
    pub(crate) fn as_bytes(&self) -> &[u8] {
        // SAFETY: `Block` is `repr(C)` over `[u8; 64]` (size 64, no padding), so the vector's
        // initialized memory is exactly `len * 64` bytes.
        unsafe {
            std::slice::from_raw_parts(self.blocks.as_ptr().cast::<u8>(), self.storage_bytes())
        }
    }

    /// Bytes between consecutive blocks of one row.
    pub(crate) const fn block_stride() -> usize {
        BLOCK_BYTES * ROW_GROUP
    }

    /// Byte `j` of block `b` of `row`.
    fn byte(&self, row: usize, b: usize, j: usize) -> u8 {
        let (group, lane) = (row / ROW_GROUP, row % ROW_GROUP);
        self.blocks[(group * self.blocks_per_row() + b) * ROW_GROUP + lane].0[j]
    }

    /// The matrix back as row-major ternary values `[out, in]`.
    pub fn to_ternary(&self) -> Vec<i8> {
        let mut t = Vec::with_capacity(self.out * self.inp);
        for row in 0..self.out {
            t.extend((0..self.inp).map(|col| {
                let (b, within) = (col / BLOCK, col % BLOCK);
                let (k, j) = (within / BLOCK_BYTES, within % BLOCK_BYTES);
                ((self.byte(row, b, j) >> (2 * k)) & 3) as i8 - 1
            }));
        }
        t
    }
}

/// Writes one row's codes (`(src[col] >> shift) & 3`) into its blocks, in layout order;
/// inputs past the end are zero (code 1). Returns false if any code is 3.
///
/// Whole blocks build each byte from its four codes at once, a loop the compiler vectorizes:
/// this is most of the model's load time (2B-4T: 2.1 G weights).
fn fill_row<'b>(blocks: impl Iterator<Item = &'b mut Block>, src: &[u8], shift: u32) -> bool {
    let code = |v: u8| (v >> shift) & 3;
    // Code 3 is the only one with both bits set.
    let mut invalid = 0u8;
    for (b, block) in blocks.enumerate() {
        let base = b * BLOCK;
        if let Some(s) = src.get(base..base + BLOCK) {
            for (j, byte) in block.0.iter_mut().enumerate() {
                let c = [
                    code(s[j]),
                    code(s[j + 64]),
                    code(s[j + 128]),
                    code(s[j + 192]),
                ];
                invalid |= c.iter().fold(0, |a, &c| a | (c & (c >> 1)));
                *byte = c[0] | (c[1] << 2) | (c[2] << 4) | (c[3] << 6);
            }
        } else {
            for (j, byte) in block.0.iter_mut().enumerate() {
                let c = |k: usize| src.get(base + 64 * k + j).map_or(1, |&v| code(v));
                let c = [c(0), c(1), c(2), c(3)];
                invalid |= c.iter().fold(0, |a, &c| a | (c & (c >> 1)));
                *byte = c[0] | (c[1] << 2) | (c[2] << 4) | (c[3] << 6);
            }
        }
    }
    invalid == 0
}
