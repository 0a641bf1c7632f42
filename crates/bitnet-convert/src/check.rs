//! Comparing a packed checkpoint against its full-precision source.

use std::path::Path;
use std::time::Instant;

use bitnet_kernels::pack::{quantize_absmean, unpack_ternary};
use half::bf16;

use crate::error::{ConvertError, Result};
use crate::progress::Progress;
use crate::source::{is_ignored, is_linear_weight, Checkpoint, SourceTensor};
use crate::st;

/// How a packed checkpoint's `weight_scale` is applied, from its `quantization_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleConvention {
    /// `linear_class: autobitlinear`: `W ≈ T · weight_scale`, `weight_scale = mean|W|`.
    Multiply,
    /// Legacy `quant_method: bitnet` without `linear_class`: `W ≈ T / weight_scale`.
    Divide,
}

impl ScaleConvention {
    /// Reads the convention from a packed checkpoint's `config.json`.
    pub fn from_config(config: &serde_json::Value) -> Self {
        let q = config.get("quantization_config");
        let class = q
            .and_then(|q| q.get("linear_class"))
            .and_then(|v| v.as_str());
        let method = q
            .and_then(|q| q.get("quant_method"))
            .and_then(|v| v.as_str());
        match (class, method) {
            (Some("autobitlinear"), _) => ScaleConvention::Multiply,
            (None, Some("bitnet")) => ScaleConvention::Divide,
            _ => ScaleConvention::Multiply,
        }
    }
}

/// One tensor's comparison.
#[derive(Debug, Clone)]
pub struct CheckRow {
    pub name: String,
    /// A ternary linear (else a tensor stored in floating point).
    pub linear: bool,
    pub numel: usize,
    /// Max and mean of |dequantized packed − source| (for non-linears: |stored − source|).
    pub max_abs_err: f64,
    pub mean_abs_err: f64,
    /// Linears: how many ternary values differ from requantizing the source.
    pub ternary_mismatches: Option<usize>,
    /// Linears: the stored `weight_scale` and the one requantizing the source gives
    /// (BF16 of mean|W|, or of 1/mean|W| for the divide convention).
    pub stored_scale: Option<f32>,
    pub expected_scale: Option<f32>,
    /// Bit-identical to what this converter writes (ternary, scale, BF16 values).
    pub exact: bool,
    /// Missing tensor, wrong dtype or shape, invalid code, scale off by more than a BF16 step.
    pub problem: Option<String>,
}

impl CheckRow {
    fn new(name: &str, linear: bool, numel: usize) -> Self {
        Self {
            name: name.to_string(),
            linear,
            numel,
            max_abs_err: 0.0,
            mean_abs_err: 0.0,
            ternary_mismatches: None,
            stored_scale: None,
            expected_scale: None,
            exact: false,
            problem: None,
        }
    }

    /// The ternary values match and nothing is structurally wrong.
    pub fn ok(&self) -> bool {
        self.problem.is_none() && self.ternary_mismatches.unwrap_or(0) == 0
    }
}

/// The result of [`check`].
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub convention: ScaleConvention,
    pub rows: Vec<CheckRow>,
    /// Tensors of the packed checkpoint that correspond to nothing in the source.
    pub extra: Vec<String>,
}

impl CheckReport {
    /// Every tensor present with the right shape, every ternary value equal to requantizing
    /// the source, every scale within a BF16 rounding step.
    pub fn ok(&self) -> bool {
        self.rows.iter().all(CheckRow::ok)
    }

    /// [`ok`](Self::ok), and bit-identical to this converter's output with nothing extra.
    pub fn exact(&self) -> bool {
        self.ok() && self.extra.is_empty() && self.rows.iter().all(|r| r.exact)
    }

    pub fn failures(&self) -> Vec<&CheckRow> {
        self.rows.iter().filter(|r| !r.ok()).collect()
    }

    /// A human-readable table, one row per tensor, with a summary line.
    pub fn table(&self) -> String {
        let w = self
            .rows
            .iter()
            .map(|r| r.name.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let mut s = format!(
            "{:<w$}  {:>6}  {:>10}  {:>10}  {:>10}  {:>10}  {:>9}  {}\n",
            "tensor", "kind", "max|err|", "mean|err|", "scale", "expected", "mismatch", "status"
        );
        for r in &self.rows {
            let scale = |v: Option<f32>| v.map_or("-".to_string(), |v| format!("{v:.6e}"));
            let status = match (&r.problem, r.ok(), r.exact) {
                (Some(p), _, _) => format!("FAIL: {p}"),
                (None, false, _) => "FAIL: ternary values differ".to_string(),
                (None, true, true) => "ok (exact)".to_string(),
                (None, true, false) => "ok".to_string(),
            };
            s.push_str(&format!(
                "{:<w$}  {:>6}  {:>10.3e}  {:>10.3e}  {:>10}  {:>10}  {:>9}  {status}\n",
                r.name,
                if r.linear { "ternry" } else { "float" },
                r.max_abs_err,
                r.mean_abs_err,
                scale(r.stored_scale),
                scale(r.expected_scale),
                r.ternary_mismatches
                    .map_or("-".to_string(), |m| m.to_string()),
            ));
        }
        for e in &self.extra {
            s.push_str(&format!("{e:<w$}  (in the packed checkpoint only)\n"));
        }
        let linears = self.rows.iter().filter(|r| r.linear).count();
        let mism: usize = self.rows.iter().filter_map(|r| r.ternary_mismatches).sum();
        s.push_str(&format!(
            "{} tensors ({linears} ternary), {} failing, {mism} ternary values differ, scale convention {:?}: {}\n",
            self.rows.len(),
            self.failures().len(),
            self.convention,
            if self.ok() { "OK" } else { "FAILED" }
        ));
        s
    }
}

/// Compares the packed checkpoint in `packed` with the full-precision checkpoint in `source`:
/// per tensor, the dequantization error and whether the ternary values equal requantizing the
/// source with [`quantize_absmean`]. Structural problems (missing tensors, wrong shapes) are
/// reported per row; only unreadable inputs are errors.
pub fn check(
    packed: &Path,
    source: &Path,
    progress: &mut dyn FnMut(&Progress<'_>),
) -> Result<CheckReport> {
    let src = Checkpoint::open(source)?;
    src.validate_full_precision(true)?;
    let pk = Checkpoint::open(packed)?;
    check_opened(&pk, &src, "checking", progress)
}

pub(crate) fn check_opened(
    pk: &Checkpoint,
    src: &Checkpoint,
    phase: &str,
    progress: &mut dyn FnMut(&Progress<'_>),
) -> Result<CheckReport> {
    let convention = ScaleConvention::from_config(&pk.config);
    let todo: Vec<&SourceTensor> = src
        .tensors
        .iter()
        .filter(|t| !is_ignored(&t.info.name))
        .collect();
    let total_bytes: u64 = todo.iter().map(|t| t.info.nbytes()).sum();
    let (mut done, start) = (0u64, Instant::now());
    let mut rows = Vec::with_capacity(todo.len());
    let mut known = std::collections::HashSet::new();
    progress(&Progress::Phase(phase));
    for (i, t) in todo.iter().enumerate() {
        let name = &t.info.name;
        known.insert(name.clone());
        let row = if is_linear_weight(name) {
            known.insert(format!("{name}_scale"));
            check_linear(pk, src, t, convention)?
        } else {
            check_float(pk, src, t)?
        };
        rows.push(row);
        done += t.info.nbytes();
        progress(&Progress::Tensor {
            phase,
            index: i + 1,
            total: todo.len(),
            name,
            bytes: done,
            total_bytes,
            elapsed: start.elapsed(),
        });
    }
    let extra = pk
        .tensors
        .iter()
        .map(|t| t.info.name.clone())
        .filter(|n| !known.contains(n))
        .collect();
    Ok(CheckReport {
        convention,
        rows,
        extra,
    })
}

fn check_linear(
    pk: &Checkpoint,
    src: &Checkpoint,
    t: &SourceTensor,
    convention: ScaleConvention,
) -> Result<CheckRow> {
    let name = &t.info.name;
    let (out, inp) = (t.info.shape[0], t.info.shape[1]);
    let mut row = CheckRow::new(name, true, out * inp);
    let Some(p) = pk.get(name) else {
        row.problem = Some("missing from the packed checkpoint".into());
        return Ok(row);
    };
    if p.info.dtype != "U8" || p.info.shape != [out / 4, inp] {
        row.problem = Some(format!(
            "packed as {} {:?}, expected U8 {:?}",
            p.info.dtype,
            p.info.shape,
            [out / 4, inp]
        ));
        return Ok(row);
    }
    let scale_name = format!("{name}_scale");
    let Some(s) = pk.get(&scale_name) else {
        row.problem = Some(format!("{scale_name} is missing"));
        return Ok(row);
    };
    if !st::is_float(&s.info.dtype) || s.info.numel() != 1 {
        row.problem = Some(format!(
            "{scale_name} is {} {:?}, expected one float",
            s.info.dtype, s.info.shape
        ));
        return Ok(row);
    }
    let stored = pk.read_f32(s)?[0];
    let w = src.read_f32(t)?;
    let (expect_t, gamma) = quantize_absmean(&w);
    let expected = match convention {
        ScaleConvention::Multiply => bf16::from_f32(gamma).to_f32(),
        ScaleConvention::Divide => bf16::from_f32(1.0 / gamma).to_f32(),
    };
    row.stored_scale = Some(stored);
    row.expected_scale = Some(expected);
    let mut raw = vec![0u8; p.info.numel()];
    pk.file_of(p).read_bytes(&p.info, 0, &mut raw)?;
    let got = match unpack_ternary(&raw, out, inp) {
        Ok(v) => v,
        Err(e) => {
            row.problem = Some(e.to_string());
            return Ok(row);
        }
    };
    drop(raw);
    let mismatches = got.iter().zip(&expect_t).filter(|(a, b)| a != b).count();
    row.ternary_mismatches = Some(mismatches);
    let (mut max, mut sum) = (0f64, 0f64);
    for (&q, &x) in got.iter().zip(&w) {
        let deq = match convention {
            ScaleConvention::Multiply => q as f32 * stored,
            ScaleConvention::Divide => q as f32 / stored,
        };
        let e = (deq as f64 - x as f64).abs();
        max = max.max(e);
        sum += e;
    }
    row.max_abs_err = max;
    row.mean_abs_err = sum / w.len().max(1) as f64;
    let scale_bits_equal = s.info.dtype == "BF16" && stored.to_bits() == expected.to_bits();
    row.exact = mismatches == 0 && scale_bits_equal;
    if !(stored.is_finite() && (stored - expected).abs() <= expected.abs() / 128.0) {
        row.problem = Some(format!(
            "weight_scale {stored:e} differs from the expected {expected:e} by more than a BF16 step \
             (scale convention {convention:?})"
        ));
    }
    Ok(row)
}

fn check_float(pk: &Checkpoint, src: &Checkpoint, t: &SourceTensor) -> Result<CheckRow> {
    let name = &t.info.name;
    let mut row = CheckRow::new(name, false, t.info.numel());
    let Some(p) = pk.get(name) else {
        row.problem = Some("missing from the packed checkpoint".into());
        return Ok(row);
    };
    if !st::is_float(&p.info.dtype) || p.info.shape != t.info.shape {
        row.problem = Some(format!(
            "stored as {} {:?}, expected a float {:?}",
            p.info.dtype, p.info.shape, t.info.shape
        ));
        return Ok(row);
    }
    const CHUNK: usize = 1 << 22;
    let n = t.info.numel();
    let (mut max, mut sum, mut exact) = (0f64, 0f64, p.info.dtype == "BF16");
    let mut first = 0;
    while first < n {
        let len = CHUNK.min(n - first);
        let a = pk.file_of(p).read_f32(&p.info, first, len)?;
        let b = src.file_of(t).read_f32(&t.info, first, len)?;
        for (&x, &y) in a.iter().zip(&b) {
            let e = (x as f64 - y as f64).abs();
            if e.is_nan() {
                if !(x.is_nan() && y.is_nan()) {
                    max = f64::NAN;
                }
            } else {
                max = max.max(e);
                sum += e;
            }
            exact &= x.to_bits() == bf16::from_f32(y).to_f32().to_bits();
        }
        first += len;
    }
    row.max_abs_err = max;
    row.mean_abs_err = sum / n.max(1) as f64;
    row.exact = exact;
    if max.is_nan() {
        row.problem = Some("NaN where the source has a number".into());
    }
    Ok(row)
}

/// Structural check of a freshly written output with the reference `safetensors` parser:
/// every file parses, and every planned tensor is present with its dtype and shape.
pub(crate) fn verify_structure(
    dir: &Path,
    files: &[String],
    plan: &[Vec<crate::st::PlannedTensor>],
) -> Result<()> {
    for (file, tensors) in files.iter().zip(plan) {
        let path = dir.join(file);
        let f =
            std::fs::File::open(&path).map_err(|e| ConvertError::Verify(format!("{file}: {e}")))?;
        // SAFETY: the file was just written by this process into its private temporary
        // directory and is not modified while mapped.
        let map = unsafe { memmap2::Mmap::map(&f) }
            .map_err(|e| ConvertError::Verify(format!("{file}: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&map)
            .map_err(|e| ConvertError::Verify(format!("{file}: {e}")))?;
        if st.len() != tensors.len() {
            return Err(ConvertError::Verify(format!(
                "{file} holds {} tensors, expected {}",
                st.len(),
                tensors.len()
            )));
        }
        for t in tensors {
            let v = st
                .tensor(&t.name)
                .map_err(|e| ConvertError::Verify(format!("{file}: {}: {e}", t.name)))?;
            let dtype = format!("{:?}", v.dtype());
            if dtype != t.dtype || v.shape() != t.shape.as_slice() {
                return Err(ConvertError::Verify(format!(
                    "{file}: {} is {dtype} {:?}, expected {} {:?}",
                    t.name,
                    v.shape(),
                    t.dtype,
                    t.shape
                )));
            }
        }
    }
    Ok(())
}
