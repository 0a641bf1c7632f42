//! The converter's and synthesizer's outputs load in bitnet-model, and a converted checkpoint
//! computes exactly what its BF16 source computes in online mode.

use bitnet_convert::synth::{synth, SynthConfig, SynthOptions};
use bitnet_convert::{convert, progress, ConvertOptions};
use bitnet_model::ForCausalLM;
use candle_core::{DType, Device, Tensor};

fn logits(dir: &std::path::Path, dtype: DType, ids: &[u32]) -> Vec<f32> {
    let dev = Device::Cpu;
    let mut m = ForCausalLM::load(dir, dtype, &dev).unwrap();
    assert!(m.warnings().is_empty(), "{:?}", m.warnings());
    let ids = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
    m.forward_all(&ids, 0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn converted_model_matches_its_online_source() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = (tmp.path().join("src"), tmp.path().join("out"));
    let mut opts = SynthOptions::new(&src, SynthConfig::preset_tiny());
    opts.float = true;
    opts.seed = 3;
    synth(&opts, &mut progress::silent()).unwrap();
    convert(&ConvertOptions::new(&src, &out), &mut progress::silent()).unwrap();
    let ids = [496u32, 10, 300, 42, 7, 255, 256, 400];

    // BF16: online uses T·bf16(γ), exactly what the packed checkpoint stores.
    let a = logits(&src, DType::BF16, &ids);
    let b = logits(&out, DType::BF16, &ids);
    assert!(a.iter().all(|v| v.is_finite()));
    assert_eq!(a, b);

    // F32: online keeps the f32 γ, the checkpoint its BF16 rounding: close, not equal.
    let a = logits(&src, DType::F32, &ids);
    let b = logits(&out, DType::F32, &ids);
    let max = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max);
    assert!(max <= 0.02 * scale, "max diff {max} vs max |logit| {scale}");
}

#[test]
fn synthetic_packed_models_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let mut cfg = SynthConfig::preset_tiny();
    cfg.tied = false;
    synth(&SynthOptions::new(&dir, cfg), &mut progress::silent()).unwrap();
    let l = logits(&dir, DType::F32, &[1, 2, 3, 4]);
    assert_eq!(l.len(), 4 * 512);
    assert!(l.iter().all(|v| v.is_finite()));
    let spread = l.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(spread > 1e-3 && spread < 1e3, "{spread}");
}

/// The 2B-4T-shaped random model stays finite (slow: ~1.2 GB on disk, ~3 GB of memory).
#[test]
#[ignore]
fn synthetic_2b4t_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    synth(
        &SynthOptions::new(&dir, SynthConfig::preset_2b4t()),
        &mut progress::silent(),
    )
    .unwrap();
    let l = logits(&dir, DType::BF16, &[128_000, 1_000, 50_000, 128_009]);
    assert_eq!(l.len(), 4 * 128_256);
    assert!(l.iter().all(|v| v.is_finite()));
    let spread = l.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(spread > 1e-3 && spread < 1e3, "{spread}");
    eprintln!("max |logit| {spread}");
}
