//! The float tables at both ends of the model: the token [`Embedding`] and the [`LmHead`].
//!
//! In a small BitNet they are the largest tensors (2B-4T: one tied 128256 × 2560 table, 657 MB
//! in BF16), and during decoding the head is read in full for every token, so their storage
//! decides memory and decode speed. A table that is BF16 on disk (or whose model runs in BF16)
//! is kept as a kernel-crate [`Bf16Matrix`]: half the bytes of f32, and exact, since f32 holds
//! every bf16 value. The head then runs through [`Bf16LinearOp`] (BF16 × f32 with f32
//! accumulation, what transformers computes in f32 mode after upcasting the checkpoint);
//! candle's own BF16 matmul would widen the whole matrix to f32 on every call. Many rows at
//! once (`forward_all`, perplexity) go through candle's f32 matmul instead, a block of
//! vocabulary rows at a time. A tied head shares the embedding's matrix.
//!
//! [`HeadFormat::Q8`] and [`HeadFormat::Q4`] quantize the head at load time to the kernel
//! crate's [`I8Matrix`] / [`Q4Matrix`], trading a little accuracy for fewer bytes read per
//! generated token, through their own ops for any number of rows: Q8 on the CPU only, Q4 also
//! on CUDA (the kernel crate uploads it on first use; the same logits as on the CPU). A
//! tied embedding then reads the checkpoint's exact rows from the memory map (when the
//! checkpoint holds the table as a float matrix; otherwise it dequantizes the rows it gathers).
//! On CUDA, BF16 exact rows also get a device copy (uploaded straight from the map at load), so
//! decoding's single-token lookups stay on the GPU as with the exact head.

use std::sync::Arc;

use bitnet_kernels::{Bf16LinearOp, Bf16Matrix, I8LinearOp, I8Matrix, Q4LinearOp, Q4Matrix};
use candle_core::{DType, Device, Tensor};
use half::bf16;

use crate::weights::MappedRows;

/// Token rows up to which the head uses the GEMV kernel; beyond, a blocked f32 matmul wins.
const GEMV_MAX_ROWS: usize = 8;
/// Vocabulary rows widened to f32 at a time on the matmul path (`BLOCK × hidden × 4` bytes).
const MATMUL_BLOCK: usize = 8192;

/// How the LM head is stored (a tied embedding stays exact, see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HeadFormat {
    /// As in the checkpoint (BF16 or F32): the configuration that matches transformers.
    #[default]
    Exact,
    /// Int8 weights with one scale per row, f32 activations: half the bytes per generated
    /// token of BF16, at a small perplexity cost (docs/BENCHMARKS.md).
    Q8,
    /// 4-bit weights with an f16 scale per 64 columns, activations quantized to int8 per 64
    /// columns: about a quarter of the bytes per generated token of BF16 (2B-4T: 174 MB),
    /// at a larger perplexity cost than [`HeadFormat::Q8`] (docs/BENCHMARKS.md).
    Q4,
}

impl HeadFormat {
    /// The table of a head in this format, from its BF16 values (`[rows, cols]`, row-major):
    /// quantized for [`HeadFormat::Q8`] and [`HeadFormat::Q4`], kept as BF16 for
    /// [`HeadFormat::Exact`]. Fails if the length does not match the shape.
    pub(crate) fn table(
        self,
        values: &[bf16],
        rows: usize,
        cols: usize,
    ) -> bitnet_kernels::Result<Table> {
        Ok(match self {
            HeadFormat::Exact => Table::bf16(Bf16Matrix::new(values.to_vec(), rows, cols)?),
            HeadFormat::Q8 => Table::Q8(Arc::new(I8Matrix::quantize(values, rows, cols)?)),
            HeadFormat::Q4 => Table::Q4(Arc::new(Q4Matrix::quantize(values, rows, cols)?)),
        })
    }
}

/// A `[rows, cols]` float table.
#[derive(Clone, Debug)]
pub(crate) enum Table {
    /// BF16 values on the CPU, in the kernel crate's layout, with the op that multiplies by
    /// them (and holds their GPU copy, so a tied embedding and head upload it once).
    Bf16(Bf16LinearOp),
    /// An f32 tensor on the model's device.
    F32(Tensor),
    /// Int8 rows with per-row scales on the CPU ([`HeadFormat::Q8`]).
    Q8(Arc<I8Matrix>),
    /// 4-bit rows with f16 block scales ([`HeadFormat::Q4`]), held on the CPU and copied to a
    /// GPU on first use there.
    Q4(Arc<Q4Matrix>),
}

impl Table {
    pub(crate) fn bf16(m: Bf16Matrix) -> Self {
        Table::Bf16(Bf16LinearOp::new(Arc::new(m)))
    }
}

/// Token embedding: rows of a [`Table`], cast to the model dtype.
#[derive(Clone, Debug)]
pub(crate) struct Embedding {
    table: Table,
    /// The checkpoint's own rows, when the table is a quantized tied head: lookups read these
    /// instead, so only the head is approximated. Quantizing the embedding too cost most of
    /// q4's perplexity change on the fixtures (docs/BENCHMARKS.md).
    exact: Option<MappedRows>,
    /// On a CUDA model, a device copy of those rows when they are BF16, so that decoding looks
    /// them up on the GPU too (a second 0.66 GB of device memory at the 2B-4T shape).
    #[cfg(feature = "cuda")]
    exact_on_device: Option<Tensor>,
    dtype: DType,
    device: Device,
}

impl Embedding {
    pub(crate) fn new(
        table: Table,
        exact: Option<MappedRows>,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        #[cfg(feature = "cuda")]
        let exact_on_device = match &exact {
            Some(rows) if device.is_cuda() => rows.upload_bf16(device)?,
            _ => None,
        };
        Ok(Self {
            table,
            exact,
            #[cfg(feature = "cuda")]
            exact_on_device,
            dtype,
            device: device.clone(),
        })
    }

    /// Rows for `ids` (u32, any shape, on any device, already checked to be `< rows`) as
    /// `[n, cols]` on the model's device.
    pub(crate) fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let ids = ids.flatten_all()?;
        if let Some(m) = &self.exact {
            return self.gather(&ids, m.rows(), m.cols(), |i| m.row_f32(i));
        }
        match &self.table {
            Table::F32(t) => t
                .index_select(&ids.to_device(t.device())?, 0)?
                .to_dtype(self.dtype),
            Table::Bf16(op) => {
                let m = op.weight();
                self.gather(&ids, m.rows(), m.cols(), |i| {
                    m.row(i).map(|r| r.iter().map(|v| v.to_f32()).collect())
                })
            }
            Table::Q8(m) => self.gather(&ids, m.rows(), m.cols(), |i| m.row_f32(i)),
            Table::Q4(m) => self.gather(&ids, m.rows(), m.cols(), |i| m.row_f32(i)),
        }
    }

    /// Gathers `row(id)` (as f32; exact for BF16) for every id on the CPU, then moves the
    /// `[n, cols]` result to the model's device and dtype.
    fn gather(
        &self,
        ids: &Tensor,
        rows: usize,
        cols: usize,
        row: impl Fn(usize) -> Option<Vec<f32>>,
    ) -> candle_core::Result<Tensor> {
        let ids = ids.to_vec1::<u32>()?;
        let mut out = Vec::with_capacity(ids.len() * cols);
        for &id in &ids {
            let Some(r) = row(id as usize) else {
                candle_core::bail!("token id {id} is out of range for {rows} rows");
            };
            out.extend(r);
        }
        Tensor::from_vec(out, (ids.len(), cols), &Device::Cpu)?
            .to_device(&self.device)?
            .to_dtype(self.dtype)
    }

    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// Where rows are looked up on the GPU: a BF16 table (whose op holds the device copy it
    /// shares with the head), or a quantized tied head's BF16 exact rows, on a CUDA model.
    /// Other exact rows and F32 tables are read on the host.
    #[cfg(feature = "cuda")]
    fn device_rows(&self) -> Option<DeviceRows<'_>> {
        match (&self.table, &self.exact) {
            (Table::Bf16(op), None) if self.device.is_cuda() => Some(DeviceRows::Table(op)),
            (_, Some(_)) => self.exact_on_device.as_ref().map(DeviceRows::Exact),
            _ => None,
        }
    }

    /// True when [`Embedding::forward_on_device`] works.
    #[cfg(feature = "cuda")]
    pub(crate) fn looks_up_on_device(&self) -> bool {
        self.device_rows().is_some()
    }

    /// Row `state[0]` as `[1, cols]` in the model dtype, looked up on the GPU that holds the
    /// `[token, position]` state (see `bitnet_kernels::cuda::greedy`).
    #[cfg(feature = "cuda")]
    pub(crate) fn forward_on_device(&self, state: &Tensor) -> candle_core::Result<Tensor> {
        match self.device_rows() {
            Some(DeviceRows::Table(op)) => op.embed_row(state, self.dtype),
            Some(DeviceRows::Exact(rows)) => {
                bitnet_kernels::cuda::greedy::embed_row_of(rows, state, self.dtype)
            }
            None => candle_core::bail!("this embedding table is read on the host"),
        }
    }
}

/// The device copy an [`Embedding`] looks rows up in.
#[cfg(feature = "cuda")]
enum DeviceRows<'a> {
    Table(&'a Bf16LinearOp),
    Exact(&'a Tensor),
}

/// The LM head `x · Wᵀ` over a `[vocab, hidden]` [`Table`], always producing f32 logits.
#[derive(Clone, Debug)]
pub(crate) struct LmHead {
    table: Table,
}

impl LmHead {
    /// Bytes of the head matrix, all of which one decoded token reads.
    pub(crate) fn storage_bytes(&self) -> usize {
        match &self.table {
            Table::Bf16(op) => op.weight().storage_bytes(),
            Table::F32(t) => t.elem_count() * 4,
            Table::Q8(m) => m.storage_bytes(),
            Table::Q4(m) => m.storage_bytes(),
        }
    }

    pub(crate) fn new(table: Table) -> Self {
        Self { table }
    }

    /// `x` `[m, hidden]` (any float dtype) → logits `[m, vocab]` in f32.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let m = x.dim(0)?;
        match &self.table {
            Table::F32(w) => x.matmul(&w.t()?),
            Table::Q8(w) => I8LinearOp::new(w.clone()).forward(&x),
            Table::Q4(w) => Q4LinearOp::new(w.clone()).forward(&x),
            Table::Bf16(op) if m <= GEMV_MAX_ROWS || !x.device().is_cpu() => op.forward(&x),
            Table::Bf16(op) => {
                let w = op.weight();
                let (rows, cols) = (w.rows(), w.cols());
                let mut blocks = Vec::with_capacity(rows.div_ceil(MATMUL_BLOCK));
                for start in (0..rows).step_by(MATMUL_BLOCK) {
                    let n = MATMUL_BLOCK.min(rows - start);
                    let mut block = Vec::with_capacity(n * cols);
                    for r in start..start + n {
                        if let Some(row) = w.row(r) {
                            block.extend(row.iter().map(|v| v.to_f32()));
                        }
                    }
                    let block = Tensor::from_vec(block, (n, cols), x.device())?;
                    blocks.push(x.matmul(&block.t()?)?);
                }
                Tensor::cat(&blocks, 1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;

    #[test]
    fn bf16_head_paths_match_f32_matmul() {
        let dev = Device::Cpu;
        let (rows, cols) = (MATMUL_BLOCK + 1000, 77);
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let exact = LmHead::new(Table::F32(w.to_dtype(DType::F32).unwrap()));
        let data = w.flatten_all().unwrap().to_vec1::<bf16>().unwrap();
        let table = Table::bf16(Bf16Matrix::new(data, rows, cols).unwrap());
        let head = LmHead::new(table.clone());
        for m in [1, 3, GEMV_MAX_ROWS + 5] {
            let x = Tensor::randn(0f32, 1.0, (m, cols), &dev).unwrap();
            let a = head.forward(&x).unwrap();
            let b = exact.forward(&x).unwrap();
            assert_eq!(a.dims(), [m, rows]);
            let d: f32 = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(d < 1e-4, "m = {m}: {d}");
        }
        let emb = Embedding::new(table, None, DType::F32, &dev).unwrap();
        let ids = Tensor::new(&[3u32, 0, 3], &dev).unwrap();
        let got = emb.forward(&ids).unwrap();
        let want = w
            .to_dtype(DType::F32)
            .unwrap()
            .index_select(&ids, 0)
            .unwrap();
        let d: f32 = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(d, 0.0);
    }

    #[test]
    fn quantized_heads_use_their_kernels_and_rows() {
        let dev = Device::Cpu;
        let (rows, cols) = (300, 96);
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let values = w.flatten_all().unwrap().to_vec1::<bf16>().unwrap();
        assert!(matches!(
            HeadFormat::Exact.table(&values, rows, cols),
            Ok(Table::Bf16(_))
        ));
        for format in [HeadFormat::Exact, HeadFormat::Q8, HeadFormat::Q4] {
            assert!(format.table(&values, rows, 95).is_err());
        }
        let q4 = Q4Matrix::quantize(&values, rows, cols).unwrap();
        let q8 = I8Matrix::quantize(&values, rows, cols).unwrap();
        for format in [HeadFormat::Q8, HeadFormat::Q4] {
            let table = format.table(&values, rows, cols).unwrap();
            let head = LmHead::new(table.clone());
            for m in [1, GEMV_MAX_ROWS + 5] {
                let x = Tensor::randn(0f32, 1.0, (m, cols), &dev).unwrap();
                let got = head.forward(&x).unwrap().to_vec2::<f32>().unwrap();
                let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let mut want = vec![0f32; rows * m];
                let isa = bitnet_kernels::cpu::Isa::detect();
                match format {
                    HeadFormat::Q4 => q4.matmul(isa, &xs, &mut want),
                    _ => q8.matmul(isa, &xs, &mut want),
                }
                for t in 0..m {
                    for r in 0..rows {
                        assert_eq!(got[t][r], want[r * m + t], "{format:?} m = {m}");
                    }
                }
            }
            let emb = Embedding::new(table, None, DType::F32, &dev).unwrap();
            let got = emb
                .forward(&Tensor::new(&[7u32, 0, 299], &dev).unwrap())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (row, id) in got.iter().zip([7, 0, 299]) {
                let want = match format {
                    HeadFormat::Q4 => q4.row_f32(id),
                    _ => q8.row_f32(id),
                };
                assert_eq!(Some(row.clone()), want, "{format:?} id {id}");
            }
            assert!(emb.forward(&Tensor::new(&[300u32], &dev).unwrap()).is_err());
        }
    }
}
