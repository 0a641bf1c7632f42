//! Parity with Hugging Face transformers on the tiny checkpoints of `tests/fixtures/`
//! (made by `tests/fixtures/make_fixtures.py`; schema in `tests/fixtures/README.md`).
//!
//! For every fixture, in f32: per-token NLL of the evaluation text (mean within 2e-3, each
//! within 2e-2), logits at the recorded positions, and 24 greedy tokens decoded with the KV
//! cache. bf16 is only reported, not asserted (transformers rounds differently in bf16).
//! Run with `--nocapture` to see the numbers.

use std::path::{Path, PathBuf};

use bitnet_model::{perplexity, ForCausalLM};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_f64())
                .map(|x| x as f32)
                .collect()
        })
        .unwrap_or_default()
}

fn greedy(model: &mut ForCausalLM, prompt: &[u32], n: usize) -> Vec<u32> {
    let dev = Device::Cpu;
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    let mut pos = 0;
    for _ in 0..n {
        let ids = Tensor::new(&input[..], &dev).unwrap().unsqueeze(0).unwrap();
        let logits: Vec<f32> = model
            .forward(&ids, pos)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        pos += input.len();
        // First maximum on ties, as torch.argmax.
        let (best, _) =
            logits
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                    if v > bv {
                        (i, v)
                    } else {
                        (bi, bv)
                    }
                });
        out.push(best as u32);
        input = vec![best as u32];
    }
    out
}

struct Outcome {
    mean_diff: f32,
    max_tok_diff: f32,
    max_logit_diff: f32,
    greedy_match: usize,
}

fn run(dir: &Path, reference: &Value, dtype: DType, key: &str) -> Outcome {
    let mut model = ForCausalLM::load(dir, dtype, &Device::Cpu).unwrap();
    assert!(model.warnings().is_empty(), "{:?}", model.warnings());
    let r = &reference["dtypes"][key];
    let ids = u32s(&reference["input_ids"]);
    let nll = perplexity(&mut model, &ids, ids.len()).unwrap();
    let want = f32s(&r["nll"]);
    assert_eq!(nll.len(), want.len());
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let max_tok_diff = nll
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    let mean_diff = (mean(&nll) - r["mean_nll"].as_f64().unwrap_or(f64::NAN) as f32).abs();

    let all = model
        .forward_all(
            &Tensor::new(&ids[..], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            0,
        )
        .unwrap()
        .squeeze(0)
        .unwrap();
    let mut max_logit_diff = 0f32;
    let positions = u32s(&r["logits"]["positions"]);
    let values = r["logits"]["values"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for (p, v) in positions.iter().zip(values) {
        let got: Vec<f32> = all.get(*p as usize).unwrap().to_vec1().unwrap();
        for (a, b) in got.iter().zip(f32s(&v)) {
            max_logit_diff = max_logit_diff.max((a - b).abs());
        }
    }

    let prompt = u32s(&reference["greedy_prompt_ids"]);
    let want_greedy = u32s(&r["greedy"]["ids"]);
    let got = greedy(&mut model, &prompt, want_greedy.len());
    let greedy_match = got
        .iter()
        .zip(&want_greedy)
        .take_while(|(a, b)| a == b)
        .count();
    Outcome {
        mean_diff,
        max_tok_diff,
        max_logit_diff,
        greedy_match,
    }
}

#[test]
fn matches_transformers_on_every_fixture() {
    let root = fixtures_dir();
    let mut names: Vec<PathBuf> = std::fs::read_dir(&root)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    names.retain(|p| p.join("reference.json").is_file());
    names.sort();
    if names.is_empty() {
        eprintln!("no fixtures under {}; skipping", root.display());
        return;
    }
    let mut failures = Vec::new();
    eprintln!("fixture         dtype  |Δmean NLL|  max|Δ NLL|  max|Δ logit|  greedy");
    for dir in names {
        let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
        let reference: Value = serde_json::from_str(&text).unwrap();
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        for (dtype, key) in [(DType::F32, "f32"), (DType::BF16, "bf16")] {
            let o = run(&dir, &reference, dtype, key);
            let n = u32s(&reference["dtypes"][key]["greedy"]["ids"]).len();
            eprintln!(
                "{name:15} {key:5}  {:10.2e}  {:10.2e}  {:12.2e}  {}/{n}",
                o.mean_diff, o.max_tok_diff, o.max_logit_diff, o.greedy_match
            );
            if dtype == DType::F32
                && (o.mean_diff > 2e-3 || o.max_tok_diff > 2e-2 || o.greedy_match < n)
            {
                failures.push(format!("{name} f32"));
            }
        }
    }
    assert!(failures.is_empty(), "parity failures: {failures:?}");
}
