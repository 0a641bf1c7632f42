//! A tiny random model written to a temp dir in each test: loading, decoding with the KV cache,
//! the two on-disk formats, and the error messages.

use std::path::Path;

use bitnet_kernels::pack::{pack_ternary, quantize_absmean};
use bitnet_model::{inspect, perplexity, Config, Family, ForCausalLM};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

const HIDDEN: usize = 64;
const INTER: usize = 96;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const VOCAB: usize = 53;
const MAX_POS: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Format {
    /// Float master weights, quantized at load.
    Online,
    /// Packed U8 + weight_scale multiplied (autobitlinear).
    PackedMultiply,
    /// Packed U8 + weight_scale divided (legacy bitlinear, llama family only).
    PackedDivide,
}

/// A float tensor as stored on disk.
struct Stored {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn f32_tensor(name: &str, shape: &[usize], v: &[f32]) -> Stored {
    Stored {
        name: name.into(),
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn linear_shapes() -> Vec<(&'static str, usize, usize)> {
    vec![
        ("self_attn.q_proj", HEADS * HEAD_DIM, HIDDEN),
        ("self_attn.k_proj", KV_HEADS * HEAD_DIM, HIDDEN),
        ("self_attn.v_proj", KV_HEADS * HEAD_DIM, HIDDEN),
        ("self_attn.o_proj", HIDDEN, HEADS * HEAD_DIM),
        ("mlp.gate_proj", INTER, HIDDEN),
        ("mlp.up_proj", INTER, HIDDEN),
        ("mlp.down_proj", HIDDEN, INTER),
    ]
}

/// The tensors of a random model (same seed → same master weights for every format).
fn tensors(family: Family, format: Format, tied: bool, seed: u64) -> Vec<Stored> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut uniform =
        |n: usize, a: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-a..a)).collect() };
    let mut out = vec![f32_tensor(
        "model.embed_tokens.weight",
        &[VOCAB, HIDDEN],
        &uniform(VOCAB * HIDDEN, 0.2),
    )];
    let norm = |v: Vec<f32>| v.into_iter().map(|x| 1.0 + x).collect::<Vec<_>>();
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            out.push(f32_tensor(
                &format!("{p}.{n}.weight"),
                &[HIDDEN],
                &norm(uniform(HIDDEN, 0.3)),
            ));
        }
        if family == Family::BitNet {
            out.push(f32_tensor(
                &format!("{p}.self_attn.attn_sub_norm.weight"),
                &[HIDDEN],
                &norm(uniform(HIDDEN, 0.3)),
            ));
            out.push(f32_tensor(
                &format!("{p}.mlp.ffn_sub_norm.weight"),
                &[INTER],
                &norm(uniform(INTER, 0.3)),
            ));
        }
        for (n, o, i) in linear_shapes() {
            let name = format!("{p}.{n}.weight");
            let w = uniform(o * i, 0.3);
            match format {
                Format::Online => out.push(f32_tensor(&name, &[o, i], &w)),
                Format::PackedMultiply | Format::PackedDivide => {
                    let (t, scale) = quantize_absmean(&w);
                    let packed = pack_ternary(&t, o, i).unwrap();
                    out.push(Stored {
                        name: name.clone(),
                        dtype: Dtype::U8,
                        shape: vec![o / 4, i],
                        bytes: packed,
                    });
                    let s = if format == Format::PackedDivide {
                        1.0 / scale
                    } else {
                        scale
                    };
                    out.push(f32_tensor(&format!("{name}_scale"), &[1], &[s]));
                }
            }
        }
    }
    out.push(f32_tensor(
        "model.norm.weight",
        &[HIDDEN],
        &norm(uniform(HIDDEN, 0.3)),
    ));
    if !tied {
        out.push(f32_tensor(
            "lm_head.weight",
            &[VOCAB, HIDDEN],
            &uniform(VOCAB * HIDDEN, 0.3),
        ));
    }
    out
}

fn config_json(family: Family, format: Format, tied: bool) -> String {
    let quant = match format {
        Format::Online => {
            r#"{"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}"#
        }
        Format::PackedMultiply => {
            r#"{"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}"#
        }
        Format::PackedDivide => r#"{"quant_method": "bitnet", "modules_to_not_convert": null}"#,
    };
    let (model_type, act) = match family {
        Family::BitNet => ("bitnet", "relu2"),
        Family::Llama => ("llama", "silu"),
    };
    format!(
        r#"{{"model_type": "{model_type}", "hidden_act": "{act}", "hidden_size": {HIDDEN},
        "intermediate_size": {INTER}, "num_hidden_layers": {LAYERS},
        "num_attention_heads": {HEADS}, "num_key_value_heads": {KV_HEADS},
        "vocab_size": {VOCAB}, "max_position_embeddings": {MAX_POS}, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": {tied}, "bos_token_id": 1,
        "eos_token_id": 2, "initializer_range": 0.02, "quantization_config": {quant}}}"#
    )
}

fn write_model(dir: &Path, config: &str, tensors: &[Stored]) {
    std::fs::write(dir.join("config.json"), config).unwrap();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
}

/// A model directory for `family` / `format`.
fn model_dir(family: Family, format: Format, tied: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_model(
        dir.path(),
        &config_json(family, format, tied),
        &tensors(family, format, tied, 42),
    );
    dir
}

fn load(dir: &Path, dtype: DType) -> ForCausalLM {
    ForCausalLM::load(dir, dtype, &Device::Cpu).unwrap()
}

const IDS: [u32; 12] = [1, 17, 5, 33, 8, 8, 41, 2, 19, 50, 3, 27];

fn ids(v: &[u32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

/// `[1, t, vocab]` → rows.
fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.squeeze(0).unwrap().to_vec2().unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn loads_and_runs_both_families() {
    for (family, format, tied) in [
        (Family::BitNet, Format::PackedMultiply, true),
        (Family::BitNet, Format::Online, false),
        (Family::Llama, Format::PackedDivide, false),
        (Family::Llama, Format::Online, true),
    ] {
        let dir = model_dir(family, format, tied);
        for dtype in [DType::F32, DType::BF16] {
            let mut m = load(dir.path(), dtype);
            assert!(m.warnings().is_empty(), "{:?}", m.warnings());
            assert_eq!(m.config().family, family);
            let logits = m.forward(&ids(&IDS), 0).unwrap();
            assert_eq!(logits.dims(), [1, VOCAB]);
            assert_eq!(logits.dtype(), DType::F32);
            let v: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{family:?} {format:?} {dtype:?}"
            );
            let spread = v.iter().fold(f32::MIN, |a, &b| a.max(b))
                - v.iter().fold(f32::MAX, |a, &b| a.min(b));
            assert!(spread > 0.1, "logits look constant: {spread}");
            assert_eq!(m.cached_tokens(), IDS.len());
        }
    }
}

#[test]
fn full_sequence_equals_token_by_token_decoding() {
    for (family, format) in [
        (Family::BitNet, Format::PackedMultiply),
        (Family::Llama, Format::PackedDivide),
    ] {
        let dir = model_dir(family, format, true);
        let mut m = load(dir.path(), DType::F32);
        let full = rows(&m.forward_all(&ids(&IDS), 0).unwrap());
        m.clear_cache();
        let mut steps = Vec::new();
        for (pos, &id) in IDS.iter().enumerate() {
            let l = m.forward(&ids(&[id]), pos).unwrap();
            steps.push(l.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
        }
        let d = max_diff(&full, &steps);
        assert!(d < 1e-4, "{family:?}: full vs incremental max |diff| {d}");
        // Multi-turn reuse: a prefix, then the rest appended at its offset.
        let first = rows(&m.forward_all(&ids(&IDS[..5]), 0).unwrap());
        let rest = rows(&m.forward_all(&ids(&IDS[5..]), 5).unwrap());
        let joined: Vec<Vec<f32>> = first.into_iter().chain(rest).collect();
        assert!(max_diff(&full, &joined) < 1e-4);
        // Chunked prefill gives the same logits.
        m.set_prefill_chunk(5);
        let chunked = rows(&m.forward_all(&ids(&IDS), 0).unwrap());
        assert!(max_diff(&full, &chunked) < 1e-4);
        let last = m
            .forward(&ids(&IDS), 0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(max_diff(&full[IDS.len() - 1..], &[last]) < 1e-4);
        // Rewinding: regenerate from position 8 after having seen all 12.
        let again = m
            .forward(&ids(&IDS[8..9]), 8)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(max_diff(&full[8..9], &[again]) < 1e-4);
        assert_eq!(m.cached_tokens(), 9);
    }
}

#[test]
fn batched_rows_match_single_sequences() {
    let dir = model_dir(Family::BitNet, Format::PackedMultiply, true);
    let mut m = load(dir.path(), DType::F32);
    let a = &IDS[..6];
    let b = &IDS[6..];
    let batch = Tensor::new(&[a, b].concat()[..], &Device::Cpu)
        .unwrap()
        .reshape((2, 6))
        .unwrap();
    let both: Vec<Vec<f32>> = m.forward(&batch, 0).unwrap().to_vec2().unwrap();
    for (i, seq) in [a, b].iter().enumerate() {
        let one = m
            .forward(&ids(seq), 0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(max_diff(&both[i..i + 1], &[one]) < 1e-5);
    }
}

#[test]
fn packed_and_online_loads_give_identical_logits() {
    for (family, packed) in [
        (Family::BitNet, Format::PackedMultiply),
        (Family::Llama, Format::PackedDivide),
    ] {
        let on = model_dir(family, Format::Online, true);
        let off = model_dir(family, packed, true);
        for dtype in [DType::F32, DType::BF16] {
            let a = rows(&load(on.path(), dtype).forward_all(&ids(&IDS), 0).unwrap());
            let b = rows(&load(off.path(), dtype).forward_all(&ids(&IDS), 0).unwrap());
            let d = max_diff(&a, &b);
            // Multiply with the same f32 scale is bit-identical; dividing by 1/scale and the
            // bf16-rounded online scale differ only in rounding.
            let tol = match (packed, dtype) {
                (Format::PackedMultiply, DType::F32) => 0.0,
                (_, DType::F32) => 1e-4,
                _ => 0.15,
            };
            assert!(
                d <= tol,
                "{family:?} {dtype:?}: online vs packed max |diff| {d}"
            );
        }
    }
}

#[test]
fn perplexity_scores_windows_independently() {
    let dir = model_dir(Family::BitNet, Format::PackedMultiply, true);
    let mut m = load(dir.path(), DType::F32);
    let nll = perplexity(&mut m, &IDS, 5).unwrap();
    // Windows of 5, 5 and 2 tokens: 4 + 4 + 1 scored.
    assert_eq!(nll.len(), 9);
    let logits = rows(&m.forward_all(&ids(&IDS[5..10]), 0).unwrap());
    for (i, row) in logits.iter().take(4).enumerate() {
        let max = row.iter().fold(f32::MIN, |a, &b| a.max(b));
        let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
        let want = lse - row[IDS[5 + i + 1] as usize];
        assert!((nll[4 + i] - want).abs() < 1e-4, "{} vs {want}", nll[4 + i]);
    }
    m.set_prefill_chunk(2);
    let chunked = perplexity(&mut m, &IDS, 5).unwrap();
    assert!(max_diff(&[nll], &[chunked]) < 1e-4);
    assert!(perplexity(&mut m, &IDS, 1).is_err());
    assert!(perplexity(&mut m, &IDS, MAX_POS + 1).is_err());
}

#[test]
fn all_zero_ternary_tensor_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = tensors(Family::BitNet, Format::PackedMultiply, true, 7);
    let name = "model.layers.1.mlp.up_proj.weight";
    if let Some(s) = t.iter_mut().find(|s| s.name == name) {
        s.bytes.iter_mut().for_each(|b| *b = 0x55);
    }
    t.push(f32_tensor(
        "model.layers.0.self_attn.rotary_emb.inv_freq",
        &[8],
        &[1.0; 8],
    ));
    t.push(f32_tensor("model.extra.weight", &[2], &[1.0; 2]));
    write_model(
        dir.path(),
        &config_json(Family::BitNet, Format::PackedMultiply, true),
        &t,
    );
    let m = load(dir.path(), DType::F32);
    let w = m.warnings().join("\n");
    assert!(w.contains(name) && w.contains("zero"), "{w}");
    assert!(
        w.contains("model.extra.weight") && !w.contains("inv_freq"),
        "{w}"
    );
    let info = inspect(dir.path()).unwrap();
    assert!(
        info.warnings.iter().any(|x| x.contains(name)),
        "{:?}",
        info.warnings
    );
}

#[test]
fn inspect_summarizes() {
    let dir = model_dir(Family::BitNet, Format::PackedMultiply, true);
    let info = inspect(dir.path()).unwrap();
    assert!(info.warnings.is_empty(), "{:?}", info.warnings);
    let linear: usize = linear_shapes().iter().map(|(_, o, i)| o * i).sum();
    let norms = LAYERS * (3 * HIDDEN + INTER) + HIDDEN;
    let expected = VOCAB * HIDDEN + LAYERS * (linear + 7) + norms;
    assert_eq!(info.parameters as usize, expected);
    let g = info
        .tensor_groups
        .iter()
        .find(|g| g.kind == "model.layers.*.mlp.up_proj.weight")
        .unwrap();
    assert_eq!(
        (g.dtype.as_str(), g.shape.clone(), g.count),
        ("U8", vec![INTER / 4, HIDDEN], LAYERS)
    );
    let text = info.to_string();
    assert!(
        text.contains("family:       bitnet") && text.contains("multiplied"),
        "{text}"
    );
}

fn load_err(dir: &Path) -> String {
    ForCausalLM::load(dir, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string()
}

#[test]
fn truncated_safetensors_is_named() {
    let dir = model_dir(Family::BitNet, Format::PackedMultiply, true);
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains(&format!(
            "{}: not a valid safetensors file (truncated?)",
            path.display()
        )),
        "{err}"
    );
}

#[test]
fn wrong_dtype_or_shape_names_tensor_and_file() {
    let name = "model.layers.1.mlp.up_proj.weight";
    for (dtype, shape, found) in [
        (
            Dtype::F16,
            vec![INTER, HIDDEN + 1],
            format!("F16 [{INTER}, {}]", HIDDEN + 1),
        ),
        (
            Dtype::I32,
            vec![INTER / 4, HIDDEN],
            format!("I32 [{}, {HIDDEN}]", INTER / 4),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tensors(Family::BitNet, Format::PackedMultiply, true, 1);
        if let Some(s) = t.iter_mut().find(|s| s.name == name) {
            let n: usize = shape.iter().product();
            s.bytes = vec![0; n * if dtype == Dtype::F16 { 2 } else { 4 }];
            s.dtype = dtype;
            s.shape = shape;
        }
        write_model(
            dir.path(),
            &config_json(Family::BitNet, Format::PackedMultiply, true),
            &t,
        );
        let err = load_err(dir.path());
        let file = dir.path().join("model.safetensors");
        let want = format!(
            "{name} in {}: expected U8 [{}, {HIDDEN}] (packed) or a float [{INTER}, {HIDDEN}], found {found}",
            file.display(),
            INTER / 4
        );
        assert_eq!(err, want);
    }
    // A norm of the wrong length.
    let dir = tempfile::tempdir().unwrap();
    let mut t = tensors(Family::BitNet, Format::PackedMultiply, true, 1);
    let norm = "model.layers.0.mlp.ffn_sub_norm.weight";
    if let Some(s) = t.iter_mut().find(|s| s.name == norm) {
        *s = f32_tensor(norm, &[HIDDEN], &[1.0; HIDDEN]);
    }
    write_model(
        dir.path(),
        &config_json(Family::BitNet, Format::PackedMultiply, true),
        &t,
    );
    let err = load_err(dir.path());
    assert!(
        err.contains(norm)
            && err.contains(&format!("[{INTER}]"))
            && err.contains(&format!("F32 [{HIDDEN}]")),
        "{err}"
    );
}

#[test]
fn missing_tensors_are_named() {
    for (missing, tied, needle) in [
        (
            "model.layers.0.self_attn.attn_sub_norm.weight",
            true,
            "is missing from",
        ),
        (
            "model.layers.1.self_attn.k_proj.weight_scale",
            true,
            "needs its scale",
        ),
        ("lm_head.weight", false, "tie_word_embeddings"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let t: Vec<Stored> = tensors(Family::BitNet, Format::PackedMultiply, tied, 3)
            .into_iter()
            .filter(|s| s.name != missing)
            .collect();
        write_model(
            dir.path(),
            &config_json(Family::BitNet, Format::PackedMultiply, tied),
            &t,
        );
        let err = load_err(dir.path());
        assert!(
            err.starts_with(&format!("{missing} is missing from ")),
            "{err}"
        );
        assert!(
            err.contains(needle) && err.contains(&dir.path().display().to_string()),
            "{err}"
        );
    }
}

#[test]
fn bad_requests_fail_cleanly() {
    let dir = model_dir(Family::BitNet, Format::PackedMultiply, true);
    let err = ForCausalLM::load(dir.path(), DType::F16, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("F16") && err.contains("bf16 or f32"), "{err}");
    let mut m = load(dir.path(), DType::F32);
    let err = m.forward(&ids(&[1, 2]), 5).unwrap_err().to_string();
    assert!(err.contains("seqlen_offset 5"), "{err}");
    let err = m.forward(&ids(&[VOCAB as u32]), 0).unwrap_err().to_string();
    assert!(err.contains("out of range"), "{err}");
    let long: Vec<u32> = (0..MAX_POS as u32 + 1).map(|i| i % 7).collect();
    let err = m.forward(&ids(&long), 0).unwrap_err().to_string();
    assert!(err.contains("context of 64"), "{err}");
    // Config errors reach the caller with the file name.
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("config.json: `model_type` = \"gpt2\""),
        "{err}"
    );
    assert_eq!(
        Config::from_json(&config_json(Family::Llama, Format::Online, true))
            .unwrap()
            .head_dim,
        HEAD_DIM
    );
}

#[test]
fn storage_disagreeing_with_config_loads_with_one_warning() {
    // Packed tensors under a config that says online: still loads (the tensor's dtype decides),
    // same logits as the matching config, and one summary warning.
    let dir = tempfile::tempdir().unwrap();
    let t = tensors(Family::BitNet, Format::PackedMultiply, true, 42);
    write_model(
        dir.path(),
        &config_json(Family::BitNet, Format::Online, true),
        &t,
    );
    let mut m = load(dir.path(), DType::F32);
    assert_eq!(m.warnings().len(), 1, "{:?}", m.warnings());
    let w = &m.warnings()[0];
    assert!(
        w.starts_with(&format!("{} linear weight(s) are packed", 7 * LAYERS)),
        "{w}"
    );
    let good = model_dir(Family::BitNet, Format::PackedMultiply, true);
    let a = rows(&m.forward_all(&ids(&IDS), 0).unwrap());
    let b = rows(
        &load(good.path(), DType::F32)
            .forward_all(&ids(&IDS), 0)
            .unwrap(),
    );
    assert_eq!(max_diff(&a, &b), 0.0);
}

#[test]
fn clones_have_independent_caches() {
    let dir = model_dir(Family::BitNet, Format::PackedMultiply, true);
    let mut a = load(dir.path(), DType::F32);
    a.forward(&ids(&IDS[..6]), 0).unwrap();
    let mut b = a.clone();
    assert_eq!(b.cached_tokens(), 0);
    b.forward(&ids(&IDS[6..]), 0).unwrap();
    let after = a
        .forward(&ids(&IDS[6..7]), 6)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let full = rows(&a.forward_all(&ids(&IDS[..7]), 0).unwrap());
    assert!(max_diff(&full[6..7], &[after]) < 1e-4);
}
