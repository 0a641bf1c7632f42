//! [`Weights`]: the tensors of a checkpoint, memory-mapped from safetensors files.
//!
//! A model directory holds either one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`. Every file is mapped once and its header validated up front,
//! so a truncated download fails at open with the file's name rather than deep inside loading.
//! Lookups check dtype and shape and name the tensor and file on failure.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
#[cfg(unix)]
use memmap2::UncheckedAdvice;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index of a sharded checkpoint.
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

/// One mapped safetensors file.
struct Shard {
    path: PathBuf,
    mmap: Arc<Mmap>,
}

/// Where one tensor lives.
#[derive(Clone, Debug)]
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Range<usize>,
}

/// A borrowed view of one tensor in a mapped file.
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    /// The tensor's name in the checkpoint.
    pub name: &'a str,
    /// The file that holds it.
    pub path: &'a Path,
    /// Its dtype on disk.
    pub dtype: Dtype,
    /// Its shape on disk.
    pub shape: &'a [usize],
    /// Its raw little-endian bytes.
    pub data: &'a [u8],
}

impl TensorRef<'_> {
    /// `"F16 [6912, 2561]"`: dtype and shape as shown in error messages.
    pub fn describe(&self) -> String {
        describe(self.dtype, self.shape)
    }

    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// A [`Error::TensorMismatch`] for this tensor.
    pub fn mismatch(&self, expected: impl Into<String>) -> Error {
        Error::TensorMismatch {
            name: self.name.to_string(),
            path: self.path.to_path_buf(),
            expected: expected.into(),
            found: self.describe(),
        }
    }

    /// A [`Error::BadTensor`] for this tensor.
    pub fn bad(&self, reason: impl Into<String>) -> Error {
        Error::BadTensor {
            name: self.name.to_string(),
            path: self.path.to_path_buf(),
            reason: reason.into(),
        }
    }

    /// True for the float dtypes a checkpoint may store weights in.
    pub fn is_float(&self) -> bool {
        float_dtype(self.dtype).is_some()
    }

    /// The values converted to f32 (BF16, F16 or F32 on disk), checking the shape.
    pub fn to_f32_vec(&self, shape: &[usize]) -> Result<Vec<f32>> {
        self.check_float(shape)?;
        Ok(match self.dtype {
            Dtype::F32 => self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => self
                .data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            _ => self
                .data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        })
    }

    /// The tensor as a candle `Tensor` of `dtype` on `device`, checking it is a float of `shape`.
    pub fn to_tensor(&self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let src = self.check_float(shape)?;
        let t = Tensor::from_raw_buffer(self.data, src, shape, &Device::Cpu)?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    fn check_float(&self, shape: &[usize]) -> Result<DType> {
        match float_dtype(self.dtype) {
            Some(dt) if self.shape == shape => Ok(dt),
            _ => Err(self.mismatch(format!("a float (BF16, F16 or F32) {shape:?}"))),
        }
    }
}

/// The candle dtype of a float safetensors dtype.
fn float_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F16 => Some(DType::F16),
        Dtype::F32 => Some(DType::F32),
        _ => None,
    }
}

/// `"F16 [6912, 2561]"`.
pub(crate) fn describe(dtype: Dtype, shape: &[usize]) -> String {
    format!("{dtype:?} {shape:?}")
}

/// All tensors of a checkpoint, memory-mapped.
pub struct Weights {
    /// The model directory (or the single file), for "missing tensor" errors.
    origin: PathBuf,
    shards: Vec<Shard>,
    entries: HashMap<String, Entry>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("origin", &self.origin)
            .field("files", &self.shards.len())
            .field("tensors", &self.entries.len())
            .finish()
    }
}

impl Weights {
    /// Opens the weights of a model directory: `model.safetensors`, or the shards named by
    /// `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(SHARD_INDEX);
        let files = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            shard_files(dir, &index)?
        } else {
            return Err(Error::NoWeights {
                dir: dir.to_path_buf(),
            });
        };
        let mut w = Self::from_files(&files)?;
        w.origin = dir.to_path_buf();
        Ok(w)
    }

    /// Opens the given safetensors files as one checkpoint.
    pub fn from_files(files: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(files.len());
        let mut entries = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let io = |source| Error::Io {
                path: path.clone(),
                source,
            };
            let file = File::open(path).map_err(io)?;
            // SAFETY: the map is read-only and lives as long as `Weights`. Like every
            // memory-mapped loader, this assumes nobody truncates or rewrites the file while
            // the model is loaded (that would be undefined behaviour, typically a SIGBUS).
            let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| Error::Safetensors {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let base = mmap.as_ptr() as usize;
            for (name, view) in st.iter() {
                let start = view.data().as_ptr() as usize - base;
                entries.insert(
                    name.to_string(),
                    Entry {
                        shard: i,
                        dtype: view.dtype(),
                        shape: view.shape().to_vec(),
                        bytes: start..start + view.data().len(),
                    },
                );
            }
            shards.push(Shard {
                path: path.clone(),
                mmap: Arc::new(mmap),
            });
        }
        let origin = match files {
            [one] => one.clone(),
            _ => files
                .first()
                .and_then(|f| f.parent())
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        };
        Ok(Self {
            origin,
            shards,
            entries,
        })
    }

    /// True if the checkpoint has a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The tensor called `name`, or an error naming it and the checkpoint.
    pub fn get<'a>(&'a self, name: &'a str) -> Result<TensorRef<'a>> {
        self.get_or(name, "")
    }

    /// Like [`Weights::get`], with `hint` (e.g. "; set tie_word_embeddings …") appended to the
    /// "missing" error.
    pub fn get_or<'a>(&'a self, name: &'a str, hint: &str) -> Result<TensorRef<'a>> {
        let e = self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            path: self.origin.clone(),
            hint: hint.to_string(),
        })?;
        let shard = &self.shards[e.shard];
        Ok(TensorRef {
            name,
            path: &shard.path,
            dtype: e.dtype,
            shape: &e.shape,
            data: &shard.mmap[e.bytes.clone()],
        })
    }

    /// Drops `name`'s pages from this process's resident memory (they stay in the OS page
    /// cache, so a later read is cheap). The loader calls this once a tensor has been copied
    /// into its runtime form: otherwise every mapped page read during loading would count in
    /// the resident set until the map is dropped, nearly doubling the peak (2B-4T: ~2.3 GB
    /// instead of ~1.2 GB).
    pub fn release(&self, name: &str) {
        self.release_part(name, 0..usize::MAX);
    }

    /// [`Weights::release`] for the bytes `part` of tensor `name` only (clamped to the tensor),
    /// so that a large tensor copied piece by piece never has all its pages resident at once.
    pub fn release_part(&self, name: &str, part: std::ops::Range<usize>) {
        if let Some(e) = self.entries.get(name) {
            let start = e.bytes.start + part.start.min(e.bytes.len());
            let end = e.bytes.start + part.end.min(e.bytes.len());
            release_pages(&self.shards[e.shard].mmap, start..end);
        }
    }

    /// Rows of the float matrix `name` (`[rows, cols]`, BF16 / F16 / F32), read from the map
    /// on demand and outliving `self`; `None` for any other dtype or shape.
    pub(crate) fn mapped_rows(&self, name: &str, rows: usize, cols: usize) -> Option<MappedRows> {
        let e = self.entries.get(name)?;
        let width = match e.dtype {
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::F32 => 4,
            _ => return None,
        };
        (e.shape == [rows, cols]).then(|| MappedRows {
            mmap: self.shards[e.shard].mmap.clone(),
            bytes: e.bytes.clone(),
            dtype: e.dtype,
            rows,
            cols,
            width,
        })
    }

    /// All tensors, sorted by name (rotary `inv_freq` buffers included; the model ignores them).
    pub fn tensors(&self) -> Vec<TensorRef<'_>> {
        let sorted: BTreeMap<&str, &Entry> =
            self.entries.iter().map(|(k, v)| (k.as_str(), v)).collect();
        sorted
            .into_iter()
            .map(|(name, e)| {
                let shard = &self.shards[e.shard];
                TensorRef {
                    name,
                    path: &shard.path,
                    dtype: e.dtype,
                    shape: &e.shape,
                    data: &shard.mmap[e.bytes.clone()],
                }
            })
            .collect()
    }

    /// The files that make up the checkpoint.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }
}

/// The distinct shard files of a `model.safetensors.index.json`, in order of first mention.
fn shard_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|source| Error::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: index.to_path_buf(),
        source,
    })?;
    let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(Error::config(
            index,
            "weight_map",
            "(missing)",
            "a shard index needs a \"weight_map\" object from tensor names to files",
        ));
    };
    let mut files: Vec<PathBuf> = Vec::new();
    for (name, file) in map {
        let Some(file) = file.as_str() else {
            return Err(Error::config(
                index,
                format!("weight_map.{name}"),
                file,
                "expected a file name",
            ));
        };
        let path = dir.join(file);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(&str, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn reads_floats_in_any_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let bf: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        write(
            &dir.path().join(SINGLE_FILE),
            &[
                ("a", Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0])),
                ("b", Dtype::BF16, vec![2], bf),
            ],
        );
        let w = Weights::open(dir.path()).unwrap();
        let a = w
            .get("a")
            .unwrap()
            .to_tensor(&[2], DType::BF16, &Device::Cpu);
        assert_eq!(
            a.unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [1.0, 2.0]
        );
        assert_eq!(w.get("b").unwrap().to_f32_vec(&[2]).unwrap(), [1.5, -2.0]);
        let err = w
            .get("b")
            .unwrap()
            .to_f32_vec(&[3])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("b in ") && err.contains("found BF16 [2]"),
            "{err}"
        );
        let err = w.get("zzz").unwrap_err().to_string();
        assert!(err.contains("zzz is missing from"), "{err}");
    }

    #[test]
    fn sharded_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("s1.safetensors"),
            &[("a", Dtype::F32, vec![1], f32_bytes(&[1.0]))],
        );
        write(
            &dir.path().join("s2.safetensors"),
            &[("b", Dtype::F32, vec![1], f32_bytes(&[2.0]))],
        );
        std::fs::write(
            dir.path().join(SHARD_INDEX),
            r#"{"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}"#,
        )
        .unwrap();
        let w = Weights::open(dir.path()).unwrap();
        assert_eq!(w.files().len(), 2);
        assert!(w.get("b").unwrap().path.ends_with("s2.safetensors"));
        assert_eq!(w.get("b").unwrap().to_f32_vec(&[1]).unwrap(), [2.0]);
    }

    #[test]
    fn truncated_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SINGLE_FILE);
        write(&path, &[("a", Dtype::F32, vec![64], f32_bytes(&[0.5; 64]))]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let err = Weights::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors: not a valid safetensors file (truncated?)"),
            "{err}"
        );
        std::fs::write(&path, b"").unwrap();
        let err = Weights::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a valid safetensors file"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        let err = Weights::open(empty.path()).unwrap_err().to_string();
        assert!(err.contains("no model.safetensors"), "{err}");
    }
}

/// Drops the resident pages of `bytes` of a read-only map (see [`Weights::release`]).
fn release_pages(mmap: &Mmap, bytes: Range<usize>) {
    #[cfg(unix)]
    // SAFETY: the map is read-only and file-backed, so MADV_DONTNEED only unmaps pages; a later
    // access faults them back in from the unchanged file. Failure is harmless.
    let _ =
        unsafe { mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, bytes.start, bytes.len()) };
    #[cfg(not(unix))]
    let _ = (mmap, bytes);
}

/// A float matrix left in the memory map, read a row at a time (see [`Weights::mapped_rows`]).
///
/// Used for a tied embedding when the LM head is quantized: a token reads one row, so keeping
/// the exact rows costs no resident memory beyond the rows touched, and the embedding stays
/// exactly the checkpoint's.
#[derive(Clone)]
pub(crate) struct MappedRows {
    mmap: Arc<Mmap>,
    bytes: Range<usize>,
    dtype: Dtype,
    rows: usize,
    cols: usize,
    width: usize,
}

impl std::fmt::Debug for MappedRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MappedRows({:?} [{}, {}])",
            self.dtype, self.rows, self.cols
        )
    }
}

impl MappedRows {
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// The whole matrix as a BF16 `[rows, cols]` tensor on `device` when it is stored in BF16
    /// (so exactly), else `None`. It is copied from the map 64 MB at a time, each block's pages
    /// released after its copy, so neither a host copy nor the mapped pages stay resident.
    #[cfg(feature = "cuda")]
    pub(crate) fn upload_bf16(&self, device: &Device) -> candle_core::Result<Option<Tensor>> {
        if self.dtype != Dtype::BF16 || self.mmap.get(self.bytes.clone()).is_none() {
            return Ok(None);
        }
        let out = Tensor::zeros((self.rows, self.cols), DType::BF16, device)?;
        let row_bytes = self.cols * self.width;
        let block = ((64 << 20) / row_bytes.max(1)).max(1);
        for first in (0..self.rows).step_by(block) {
            let n = block.min(self.rows - first);
            let start = self.bytes.start + first * row_bytes;
            let bytes = start..start + n * row_bytes;
            // In range: the whole matrix is (checked above). Safetensors data is little-endian,
            // as are the targets this runs on.
            let data = &self.mmap[bytes.clone()];
            let rows = Tensor::from_raw_buffer(data, DType::BF16, &[n, self.cols], device)?;
            out.slice_set(&rows, 0, first)?;
            release_pages(&self.mmap, bytes);
        }
        Ok(Some(out))
    }

    /// Row `i` widened to f32 (exact for every stored dtype), or `None` past the end.
    pub(crate) fn row_f32(&self, i: usize) -> Option<Vec<f32>> {
        if i >= self.rows {
            return None;
        }
        let len = self.cols * self.width;
        let start = self.bytes.start + i * len;
        let b = self.mmap.get(start..start + len)?;
        Some(match self.dtype {
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        })
    }
}
