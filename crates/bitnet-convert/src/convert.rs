//! Full-precision checkpoint → packed offline BitNet checkpoint.

use std::path::{Path, PathBuf};
use std::time::Instant;

use bitnet_kernels::pack::{pack_ternary, quantize_absmean};
use half::bf16;

use crate::check::{check_opened, verify_structure};
use crate::error::{ConvertError, IoContext, Result};
use crate::progress::Progress;
use crate::source::{is_ignored, is_linear_weight, Checkpoint, Family};
use crate::st::{self, plan_shards, PlannedTensor};
use crate::util::{utc_date, write_json, OutputDir, TOKENIZER_FILES};

/// Default shard size limit: 2 GB (10^9 bytes, as transformers counts).
pub const DEFAULT_SHARD_SIZE: u64 = 2_000_000_000;

/// A function that loads a finished checkpoint directory in a model implementation, returning a
/// description of the failure. Run on the new checkpoint before it is moved into place.
pub type LoadCheck = fn(&Path) -> std::result::Result<(), String>;

/// What [`convert`] does.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Checkpoint directory with full-precision linears (`config.json` + safetensors).
    pub input: PathBuf,
    /// Output directory (created; see `force`).
    pub output: PathBuf,
    /// Replace an existing output (only after the new one is complete and verified).
    pub force: bool,
    /// Largest shard, in bytes of tensor data; above it the output is sharded with an index.
    pub shard_size: u64,
    /// Re-read the output and compare it with the source before moving it into place.
    pub verify: bool,
    /// Accept a `llama` checkpoint that shows no sign of ternary training.
    pub allow_plain_llama: bool,
    /// How the user named the source (e.g. a Hub id), for the model card; default: the input path.
    pub source_name: Option<String>,
    /// The command line to record in the model card; default: `cargo xtask convert ...`.
    pub command: Option<String>,
    /// Extra check that a model implementation loads the output (see [`LoadCheck`]).
    pub load_check: Option<LoadCheck>,
}

impl ConvertOptions {
    pub fn new(input: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Self {
        Self {
            input: input.into(),
            output: output.into(),
            force: false,
            shard_size: DEFAULT_SHARD_SIZE,
            verify: true,
            allow_plain_llama: false,
            source_name: None,
            command: None,
            load_check: None,
        }
    }
}

/// What [`convert`] did.
#[derive(Debug, Clone)]
pub struct Report {
    pub family: Family,
    pub output: PathBuf,
    /// Safetensors files written, relative to `output`.
    pub files: Vec<String>,
    /// Tensors written (a linear's weight and scale count as one) and how many were ternary.
    pub tensors: usize,
    pub linears: usize,
    /// Source tensors left out (rotary `inv_freq` buffers).
    pub dropped: Vec<String>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub seconds: f64,
    pub warnings: Vec<String>,
    /// The output was re-read and matched the source exactly.
    pub verified: bool,
    /// The load check ran and passed.
    pub load_checked: bool,
}

/// Converts the full-precision checkpoint `opts.input` into a packed offline BitNet
/// checkpoint in `opts.output`.
///
/// Every decoder-layer linear becomes U8 `[out/4, in]` plus a BF16 `weight_scale` `[1]`
/// (`T` and `γ` of [`quantize_absmean`], applied as `W ≈ T·γ`); every other tensor is
/// stored as BF16. The output is written into a temporary directory next to `opts.output`,
/// verified, and renamed into place; on any error nothing is left behind and an existing
/// output is untouched.
///
/// Equivalence with transformers' online mode: online, `WeightQuant` turns a linear into
/// `T·(1/s)` in f32 and casts it to the model dtype, so a BF16 model computes with
/// `T·bf16(γ)` — exactly the weights this checkpoint stores (`γ` is f32 `1/s`, stored as
/// `bf16(γ)`). Offline, transformers computes `F.linear(x, T)·bf16(γ)` instead of
/// `F.linear(x, T·bf16(γ))`: the same value up to the rounding order of the matmul. An F32
/// model run online uses the unrounded f32 `γ`; offline it gets `bf16(γ)` (relative
/// difference ≤ 2⁻⁹ per tensor). Non-ternary tensors of an F16/F32 source are rounded to BF16.
pub fn convert(opts: &ConvertOptions, progress: &mut dyn FnMut(&Progress<'_>)) -> Result<Report> {
    let start = Instant::now();
    if opts.shard_size == 0 {
        return Err(ConvertError::InvalidOptions(
            "shard size must be positive".into(),
        ));
    }
    let src = Checkpoint::open(&opts.input)?;
    let family = src.validate_full_precision(opts.allow_plain_llama)?;
    let mut warnings = Vec::new();
    let mut warn = |w: String, progress: &mut dyn FnMut(&Progress<'_>)| {
        progress(&Progress::Warning(&w));
        warnings.push(w);
    };

    // Plan every output tensor (known from the source headers alone) and the shards.
    let mut plan = Vec::new();
    let mut dropped = Vec::new();
    let mut linears = 0;
    for t in &src.tensors {
        let name = &t.info.name;
        if is_ignored(name) {
            dropped.push(name.clone());
        } else if is_linear_weight(name) {
            let (out, inp) = (t.info.shape[0], t.info.shape[1]);
            plan.push(vec![
                PlannedTensor::new(name.clone(), "U8", vec![out / 4, inp]),
                PlannedTensor::new(format!("{name}_scale"), "BF16", vec![1]),
            ]);
            linears += 1;
        } else {
            plan.push(vec![PlannedTensor::new(
                name.clone(),
                "BF16",
                t.info.shape.clone(),
            )]);
        }
    }
    if family == Family::Llama
        && src
            .tensors
            .iter()
            .any(|t| t.info.name.contains("inner_attn_ln") || t.info.name.contains("ffn_layernorm"))
    {
        warn(
            "the sub-norm tensors inner_attn_ln / ffn_layernorm keep their 1bitLLM names, which \
             bitnet-model runs; transformers' LlamaForCausalLM has no sub-norms and ignores them, \
             so transformers computes a different model from this checkpoint than the original \
             remote code does"
                .into(),
            progress,
        );
    }
    let shards = plan_shards(plan, opts.shard_size);
    let out_dir = OutputDir::create(&opts.output, opts.force, Some(&opts.input))?;
    let dir = out_dir.tmp.clone();

    // Stream the tensors.
    let total_bytes: u64 = src.tensors.iter().map(|t| t.info.nbytes()).sum();
    let total = src.tensors.len() - dropped.len();
    let (mut done_bytes, mut index) = (0u64, 0usize);
    let mut all_zero = Vec::new();
    progress(&Progress::Phase("converting"));
    let files = st::write_shards(&dir, shards.clone(), |p, w| {
        if p.name.ends_with("_scale") && !is_linear_weight(&p.name) && src.get(&p.name).is_none() {
            return Ok(()); // written together with its weight
        }
        let Some(t) = src.get(&p.name) else {
            return Err(ConvertError::Verify(format!("no source for {}", p.name)));
        };
        let file = src.file_of(t);
        if is_linear_weight(&p.name) {
            let (out, inp) = (t.info.shape[0], t.info.shape[1]);
            let weights = file.read_all_f32(&t.info)?;
            let (ternary, gamma) = quantize_absmean(&weights);
            drop(weights);
            if ternary.iter().all(|&v| v == 0) {
                all_zero.push(p.name.clone());
            }
            let packed =
                pack_ternary(&ternary, out, inp).map_err(|source| ConvertError::Kernel {
                    name: p.name.clone(),
                    source,
                })?;
            w.write(&p.name, &packed)?;
            w.write(
                &format!("{}_scale", p.name),
                &bf16::from_f32(gamma).to_le_bytes(),
            )?;
        } else {
            // Chunked, so even a 128k-vocab embedding never sits in memory whole.
            const CHUNK: usize = 1 << 22;
            let n = t.info.numel();
            let mut first = 0;
            let mut buf = Vec::with_capacity(CHUNK * 2);
            while first < n {
                let len = CHUNK.min(n - first);
                buf.clear();
                if t.info.dtype == "BF16" {
                    buf.resize(len * 2, 0);
                    file.read_bytes(&t.info, first as u64 * 2, &mut buf)?;
                } else {
                    st::push_bf16(&file.read_f32(&t.info, first, len)?, &mut buf);
                }
                w.write(&p.name, &buf)?;
                first += len;
            }
        }
        index += 1;
        done_bytes += t.info.nbytes();
        progress(&Progress::Tensor {
            phase: "converting",
            index,
            total,
            name: &p.name,
            bytes: done_bytes,
            total_bytes,
            elapsed: start.elapsed(),
        });
        Ok(())
    })?;
    for name in all_zero {
        warn(
            format!(
                "{name} quantizes to all zeros (the source tensor is all zero?); some Hub revisions \
                 of the 2B-4T repositories are reported to have all-zero MLP tensors: check the source"
            ),
            progress,
        );
    }

    // config.json, tokenizer files, model card.
    write_json(
        &dir.join("config.json"),
        &output_config(&src.config, family),
    )?;
    let mut copied = Vec::new();
    for f in TOKENIZER_FILES {
        let from = src.dir.join(f);
        if from.is_file() {
            std::fs::copy(&from, dir.join(f)).at(&from)?;
            copied.push(*f);
        }
    }
    if !copied.contains(&"tokenizer.json") {
        warn(
            format!(
                "{} has no tokenizer.json; copy one into the output to use it",
                src.dir.display()
            ),
            progress,
        );
    }
    let bytes_written: u64 = shards.iter().flatten().map(PlannedTensor::nbytes).sum();
    let card = model_card(opts, family, &src, linears, bytes_written);
    std::fs::write(dir.join("README.md"), card).at(dir.join("README.md"))?;

    // Verify before anything replaces an existing output.
    let mut verified = false;
    if opts.verify {
        verify_structure(&dir, &files, &shards)?;
        let packed = Checkpoint::open(&dir)?;
        let report = check_opened(&packed, &src, "verifying", progress)?;
        if !report.exact() {
            let first = report
                .rows
                .iter()
                .find(|r| !(r.ok() && r.exact))
                .map(|r| format!("{}: {:?}", r.name, r.problem))
                .or_else(|| {
                    report
                        .extra
                        .first()
                        .map(|e| format!("unexpected tensor {e}"))
                })
                .unwrap_or_default();
            return Err(ConvertError::Verify(format!(
                "the re-read output differs from the source ({first})"
            )));
        }
        verified = true;
    }
    let mut load_checked = false;
    if let Some(load) = opts.load_check {
        progress(&Progress::Phase("loading the new checkpoint"));
        load(&dir).map_err(|e| ConvertError::Verify(format!("loading it failed: {e}")))?;
        load_checked = true;
    }
    out_dir.commit()?;
    Ok(Report {
        family,
        output: opts.output.clone(),
        files,
        tensors: total,
        linears,
        dropped,
        bytes_read: total_bytes,
        bytes_written,
        seconds: start.elapsed().as_secs_f64(),
        warnings,
        verified,
        load_checked,
    })
}

/// The output's `config.json`: the source's, with the offline packed quantization config.
pub fn output_config(src: &serde_json::Value, family: Family) -> serde_json::Value {
    let mut c = src.clone();
    if let Some(obj) = c.as_object_mut() {
        obj.insert(
            "quantization_config".into(),
            serde_json::json!({
                "quant_method": "bitnet",
                "linear_class": "autobitlinear",
                "quantization_mode": "offline",
            }),
        );
        obj.insert("torch_dtype".into(), "bfloat16".into());
        if obj.contains_key("dtype") {
            obj.insert("dtype".into(), "bfloat16".into());
        }
        if family == Family::Llama {
            // 1bitLLM-style remote code expects latent weights, not packed ones.
            obj.remove("auto_map");
            obj.insert(
                "architectures".into(),
                serde_json::json!(["LlamaForCausalLM"]),
            );
        }
    }
    c
}

fn model_card(
    opts: &ConvertOptions,
    family: Family,
    src: &Checkpoint,
    linears: usize,
    bytes: u64,
) -> String {
    // A path or Hub id in code style; a description as plain text.
    let source = match &opts.source_name {
        Some(name) if name.contains(char::is_whitespace) => name.clone(),
        Some(name) => format!("`{name}`"),
        None => format!("`{}`", opts.input.display()),
    };
    let command = opts.command.clone().unwrap_or_else(|| {
        format!(
            "cargo xtask convert {} {}",
            opts.input.display(),
            opts.output.display()
        )
    });
    let arch = match family {
        Family::BitNet => "BitNetForCausalLM, `model_type: bitnet`",
        Family::Llama => "LlamaForCausalLM, `model_type: llama`, with BitNet quantization",
    };
    let sub_norm_note = if family == Family::Llama
        && src
            .tensors
            .iter()
            .any(|t| t.info.name.contains("inner_attn_ln"))
    {
        "\n- The sub-norms `inner_attn_ln` / `ffn_layernorm` keep their 1bitLLM names (the \
         bitnet-rs runtime applies them). transformers' Llama has no sub-norms and ignores them, \
         so it computes a different model than the original remote code.\n"
    } else {
        ""
    };
    format!(
        "---\nlibrary_name: transformers\ntags:\n- bitnet\n- bitnet-b1.58\n- ternary\n- 1.58-bit\n---\n\n\
# Packed BitNet b1.58 checkpoint\n\n\
This is a **packed offline BitNet checkpoint** converted from {source}: {linears} ternary linear \
layers stored 2 bits per weight, {:.1} MB of tensors.\n\n\
- Source: {source}\n\
- Architecture: {arch}\n\
- Converted: {date} with `{command}` (bitnet-convert {version})\n\
- Format: every decoder-layer linear (`q/k/v/o_proj`, `gate/up/down_proj`) is a U8 tensor \
`[out/4, in]` holding four ternary values per byte (bits `2k..2k+1` of row `r` hold row \
`r + k·out/4`; codes 0/1/2 = −1/0/+1) plus a BF16 `weight_scale` `[1]` = mean|W|, multiplied \
(`quantization_config`: `quant_method: bitnet`, `linear_class: autobitlinear`, \
`quantization_mode: offline`). Embeddings, norms and the LM head are BF16.\n\
- Quantization: per tensor absmean, identical to transformers' online `WeightQuant` \
(`T = clamp(round(W/mean|W|), −1, 1)`, ties to even). A BF16 model computes with the same \
weights `T·bf16(mean|W|)` as transformers running the source in online mode; only the rounding \
order of the matmul differs.{sub_norm_note}\n\n\
Load it with transformers (`AutoModelForCausalLM.from_pretrained(dir)`) or with this project's \
runtime.\n",
        bytes as f64 / 1e6,
        date = utc_date(),
        version = env!("CARGO_PKG_VERSION"),
    )
}
