//! Streaming safetensors I/O.
//!
//! The format (<https://github.com/huggingface/safetensors>) is simple:
//!
//! ```text
//! [u64 little-endian N][N bytes of JSON header][data]
//! ```
//!
//! The header is a JSON object mapping each tensor name to
//! `{"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}` (byte offsets relative to the
//! start of the data section, which the tensors tile without gaps), plus an optional
//! `"__metadata__": {string: string}` entry (`{"format": "pt"}` for transformers). The header may
//! be padded with trailing spaces; writers pad it so that the data starts 8-byte aligned.
//! Tensors are row-major, little-endian.
//!
//! [`StFile`] reads the header and then tensor bytes with positioned reads, so memory use is
//! bounded by the largest piece asked for, never by the file. [`StWriter`] writes a file whose
//! header is known in advance (every output tensor's dtype and shape follow from the input
//! header), streaming the tensor data in order: nothing is held in memory and no temporary
//! data file is needed. Files written here are re-read with the `safetensors` crate itself
//! during verification.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::error::{ConvertError, IoContext, Result};

/// The largest header accepted (the `safetensors` crate's limit).
const MAX_HEADER: u64 = 100_000_000;

/// A tensor entry of a safetensors header.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Absolute byte offsets in the file.
    pub start: u64,
    pub end: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> u64 {
        self.end - self.start
    }
}

/// Size in bytes of one element of a safetensors dtype, if known.
pub fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// Whether the converter accepts this dtype as full-precision input.
pub fn is_float(dtype: &str) -> bool {
    matches!(dtype, "BF16" | "F16" | "F32")
}

/// An open safetensors file: the parsed header and a handle for positioned reads.
#[derive(Debug)]
pub struct StFile {
    pub path: PathBuf,
    file: File,
    /// Tensors in the order of their data.
    pub tensors: Vec<TensorInfo>,
}

impl StFile {
    /// Opens and validates `path`: header well-formed, every tensor's byte range consistent with
    /// its dtype and shape and inside the file, ranges not overlapping.
    pub fn open(path: &Path) -> Result<Self> {
        let corrupt = |reason: String| ConvertError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).at(path)?;
        let len = file.metadata().at(path)?.len();
        if len < 8 {
            return Err(corrupt(format!(
                "file has {len} bytes, fewer than the 8-byte header length"
            )));
        }
        let mut n = [0u8; 8];
        read_exact_at(&file, &mut n, 0).at(path)?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER {
            return Err(corrupt(format!(
                "header length {n} is implausible (limit {MAX_HEADER})"
            )));
        }
        if 8 + n > len {
            return Err(corrupt(format!(
                "header claims {n} bytes but the file has only {len}"
            )));
        }
        let mut header = vec![0u8; n as usize];
        read_exact_at(&file, &mut header, 8).at(path)?;
        let header: serde_json::Value = serde_json::from_slice(&header)
            .map_err(|e| corrupt(format!("header is not valid JSON ({e})")))?;
        let obj = header
            .as_object()
            .ok_or_else(|| corrupt("header is not a JSON object".into()))?;
        let data_start = 8 + n;
        let mut tensors = Vec::with_capacity(obj.len());
        for (name, v) in obj {
            if name == "__metadata__" {
                continue;
            }
            let bad = |what: &str| corrupt(format!("tensor {name}: {what}"));
            let dtype = v
                .get("dtype")
                .and_then(|d| d.as_str())
                .ok_or_else(|| bad("no dtype"))?
                .to_string();
            let shape = v
                .get("shape")
                .and_then(|s| s.as_array())
                .ok_or_else(|| bad("no shape"))?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("shape is not a list of non-negative integers"))?;
            let offs = v
                .get("data_offsets")
                .and_then(|s| s.as_array())
                .and_then(|a| match a.as_slice() {
                    [b, e] => Some((b.as_u64()?, e.as_u64()?)),
                    _ => None,
                })
                .ok_or_else(|| bad("data_offsets is not [begin, end]"))?;
            if offs.1 < offs.0 {
                return Err(bad("data_offsets end before they begin"));
            }
            let numel = shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
                .ok_or_else(|| bad("shape overflows"))?;
            if let Some(size) = dtype_size(&dtype) {
                if numel.checked_mul(size as u64) != Some(offs.1 - offs.0) {
                    return Err(bad(&format!(
                        "{} data bytes do not match dtype {dtype} and shape {shape:?}",
                        offs.1 - offs.0
                    )));
                }
            }
            let (start, end) = (data_start + offs.0, data_start + offs.1);
            if end > len {
                return Err(corrupt(format!(
                    "tensor {name} ends at byte {end} but the file has only {len} bytes (truncated)"
                )));
            }
            tensors.push(TensorInfo {
                name: name.clone(),
                dtype,
                shape,
                start,
                end,
            });
        }
        tensors.sort_by_key(|t| (t.start, t.end));
        for w in tensors.windows(2) {
            if w[1].start < w[0].end {
                return Err(corrupt(format!(
                    "tensors {} and {} overlap",
                    w[0].name, w[1].name
                )));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            tensors,
        })
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Reads `len` bytes of tensor `t` starting `offset` bytes into it.
    pub fn read_bytes(&self, t: &TensorInfo, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset + buf.len() as u64 > t.nbytes() {
            return Err(ConvertError::Corrupt {
                path: self.path.clone(),
                reason: format!("read past the end of tensor {}", t.name),
            });
        }
        read_exact_at(&self.file, buf, t.start + offset).at(&self.path)
    }

    /// Reads `n` elements of float tensor `t`, starting at element `first`, as f32.
    pub fn read_f32(&self, t: &TensorInfo, first: usize, n: usize) -> Result<Vec<f32>> {
        let size = float_size(&self.path, t)?;
        let mut raw = vec![0u8; n * size];
        self.read_bytes(t, (first * size) as u64, &mut raw)?;
        Ok(to_f32(&t.dtype, &raw))
    }

    /// Reads all of float tensor `t` as f32.
    pub fn read_all_f32(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        self.read_f32(t, 0, t.numel())
    }
}

fn float_size(path: &Path, t: &TensorInfo) -> Result<usize> {
    if !is_float(&t.dtype) {
        return Err(ConvertError::NonFloat {
            path: path.to_path_buf(),
            name: t.name.clone(),
            dtype: t.dtype.clone(),
        });
    }
    Ok(dtype_size(&t.dtype).unwrap_or(4))
}

/// Decodes little-endian BF16 / F16 / F32 bytes to f32 (callers check the dtype first).
pub fn to_f32(dtype: &str, raw: &[u8]) -> Vec<f32> {
    match dtype {
        "BF16" => raw
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        "F16" => raw
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    }
}

/// Appends f32 values as little-endian BF16 (round to nearest, ties to even; NaN stays NaN).
pub fn push_bf16(values: &[f32], out: &mut Vec<u8>) {
    out.reserve(values.len() * 2);
    for &v in values {
        out.extend_from_slice(&bf16::from_f32(v).to_le_bytes());
    }
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A tensor to be written: its header entry, known before any data is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    pub fn new(name: impl Into<String>, dtype: &'static str, shape: Vec<usize>) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape,
        }
    }

    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * dtype_size(self.dtype).unwrap_or(1) as u64
    }
}

/// Serializes a safetensors header (length prefix included) for `tensors`, laid out in order.
pub fn encode_header(tensors: &[PlannedTensor]) -> Vec<u8> {
    let mut json = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut offset = 0u64;
    for t in tensors {
        let end = offset + t.nbytes();
        let name = serde_json::Value::String(t.name.clone()).to_string();
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        json.push_str(&format!(
            ",{name}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            t.dtype,
            shape.join(",")
        ));
        offset = end;
    }
    json.push('}');
    // Pad with spaces so the data section starts 8-byte aligned, as the reference writer does.
    while (8 + json.len()) % 8 != 0 {
        json.push(' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out
}

/// Writes one safetensors file whose tensors are fixed up front, streaming their data in order.
pub struct StWriter {
    path: PathBuf,
    out: BufWriter<File>,
    plan: Vec<PlannedTensor>,
    /// Index of the tensor being written and bytes of it written so far.
    current: usize,
    written: u64,
}

impl StWriter {
    pub fn create(path: &Path, plan: Vec<PlannedTensor>) -> Result<Self> {
        let file = File::create(path).at(path)?;
        let mut out = BufWriter::with_capacity(8 << 20, file);
        out.write_all(&encode_header(&plan)).at(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            out,
            plan,
            current: 0,
            written: 0,
        })
    }

    fn bug(&self, msg: String) -> ConvertError {
        ConvertError::Verify(format!("{}: {msg}", self.path.display()))
    }

    /// Appends bytes of tensor `name`, which must be the next one of the plan (or the current).
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let Some(t) = self.plan.get(self.current) else {
            return Err(self.bug(format!("tensor {name} written past the end of the plan")));
        };
        if t.name != name {
            return Err(self.bug(format!("tensor {name} written where {} was due", t.name)));
        }
        let want = t.nbytes();
        if self.written + data.len() as u64 > want {
            return Err(self.bug(format!("tensor {name} is longer than its {want} bytes")));
        }
        self.out.write_all(data).at(&self.path)?;
        self.written += data.len() as u64;
        if self.written == want {
            self.current += 1;
            self.written = 0;
            // Zero-sized tensors that follow need no data.
            while self.plan.get(self.current).is_some_and(|t| t.nbytes() == 0) {
                self.current += 1;
            }
        }
        Ok(())
    }

    /// Flushes and syncs; fails if any planned tensor was not written in full.
    pub fn finish(mut self) -> Result<()> {
        while self.plan.get(self.current).is_some_and(|t| t.nbytes() == 0) {
            self.current += 1;
        }
        if let Some(t) = self.plan.get(self.current) {
            return Err(self.bug(format!("tensor {} was not written in full", t.name)));
        }
        self.out.flush().at(&self.path)?;
        self.out.get_ref().sync_all().at(&self.path)?;
        Ok(())
    }
}

/// Splits groups of tensors (a linear's weight and its scale form one group, kept in one file)
/// into shards of at most `limit` bytes of data each, keeping their order; a group larger than
/// the limit gets a shard of its own.
pub fn plan_shards(groups: Vec<Vec<PlannedTensor>>, limit: u64) -> Vec<Vec<PlannedTensor>> {
    let mut shards: Vec<Vec<PlannedTensor>> = Vec::new();
    let mut size = 0u64;
    for g in groups {
        let n: u64 = g.iter().map(PlannedTensor::nbytes).sum();
        match shards.last_mut() {
            Some(last) if size + n <= limit || last.is_empty() => {
                size += n;
                last.extend(g);
            }
            _ => {
                size = n;
                shards.push(g);
            }
        }
    }
    if shards.is_empty() {
        shards.push(Vec::new());
    }
    shards
}

/// File names for `n` shards: `model.safetensors` alone, else `model-00001-of-0000n.safetensors`.
pub fn shard_names(n: usize) -> Vec<String> {
    if n == 1 {
        vec!["model.safetensors".to_string()]
    } else {
        (1..=n)
            .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
            .collect()
    }
}

/// The `model.safetensors.index.json` for shards written by [`plan_shards`] / [`shard_names`].
pub fn index_json(shards: &[Vec<PlannedTensor>], names: &[String]) -> serde_json::Value {
    let total: u64 = shards.iter().flatten().map(|t| t.nbytes()).sum();
    let mut map = serde_json::Map::new();
    for (shard, name) in shards.iter().zip(names) {
        for t in shard {
            map.insert(t.name.clone(), serde_json::Value::String(name.clone()));
        }
    }
    serde_json::json!({ "metadata": { "total_size": total }, "weight_map": map })
}

/// Writes shards from a generator: `emit(tensor, writer)` must write the tensor's bytes.
/// Returns the shard file names.
pub(crate) fn write_shards(
    dir: &Path,
    shards: Vec<Vec<PlannedTensor>>,
    mut emit: impl FnMut(&PlannedTensor, &mut StWriter) -> Result<()>,
) -> Result<Vec<String>> {
    let names = shard_names(shards.len());
    if shards.len() > 1 {
        let index = index_json(&shards, &names);
        crate::util::write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }
    for (shard, name) in shards.into_iter().zip(&names) {
        let mut w = StWriter::create(&dir.join(name), shard.clone())?;
        for t in &shard {
            emit(t, &mut w)?;
        }
        w.finish()?;
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_the_reference_parser() {
        let plan = vec![
            PlannedTensor::new("a.weight", "U8", vec![2, 3]),
            PlannedTensor::new("a.weight_scale", "BF16", vec![1]),
            PlannedTensor::new("b \"quoted\"", "F32", vec![2]),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let mut w = StWriter::create(&path, plan.clone()).unwrap();
        w.write("a.weight", &[1, 2, 3]).unwrap();
        w.write("a.weight", &[4, 5, 6]).unwrap();
        w.write("a.weight_scale", &[0, 0x3f]).unwrap();
        w.write("b \"quoted\"", &[0; 8]).unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("a.weight").unwrap().data(), &[1, 2, 3, 4, 5, 6]);
        assert_eq!(st.tensor("a.weight_scale").unwrap().shape(), &[1]);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        let f = StFile::open(&path).unwrap();
        assert_eq!(
            f.read_all_f32(f.get("b \"quoted\"").unwrap()).unwrap(),
            [0.0; 2]
        );
        assert_eq!(
            (8 + u64::from_le_bytes(bytes[..8].try_into().unwrap())) % 8,
            0
        );
    }

    #[test]
    fn writer_rejects_out_of_plan_data() {
        let dir = tempfile::tempdir().unwrap();
        let plan = vec![PlannedTensor::new("a", "U8", vec![2])];
        let mut w = StWriter::create(&dir.path().join("x"), plan.clone()).unwrap();
        assert!(w.write("b", &[1]).is_err());
        assert!(w.write("a", &[1, 2, 3]).is_err());
        w.write("a", &[1]).unwrap();
        assert!(w.finish().is_err());
    }

    #[test]
    fn shards_respect_the_limit() {
        let t = |n: &str, k: usize| PlannedTensor::new(n, "U8", vec![k]);
        let s = plan_shards(
            vec![
                vec![t("a", 5)],
                vec![t("b", 5)],
                vec![t("c", 20)],
                vec![t("d", 1)],
            ],
            10,
        );
        let sizes: Vec<Vec<&str>> = s
            .iter()
            .map(|s| s.iter().map(|t| t.name.as_str()).collect())
            .collect();
        assert_eq!(sizes, vec![vec!["a", "b"], vec!["c"], vec!["d"]]);
        assert_eq!(shard_names(3)[2], "model-00003-of-00003.safetensors");
        // A group is never split, even when its first member would fit.
        let s = plan_shards(vec![vec![t("a", 8)], vec![t("w", 2), t("w_scale", 2)]], 10);
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].len(), 2);
    }
}
