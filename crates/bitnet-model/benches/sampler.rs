//! `Sampler::sample` over a 128,256-token vocabulary (BitNet 2B-4T's) at `bitnet generate`'s
//! default settings (temperature 0.8, top-p 0.95): the host-side cost of each sampled token.
//!
//! Two logit shapes bracket it: "zipf" is peaked like a trained LM's (the id at rank k has logit
//! 12 − 1.2 ln(k + 1), ids shuffled), so top-p keeps a few hundred ids; "flat" is what a random
//! synthetic model gives (uniform in ±0.5), where top-p keeps most ids and they must be sorted.
//!
//! `cargo bench -p bitnet-model --bench sampler`

use bitnet_model::generation::{Sampler, SamplingParams};
use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const VOCAB: usize = 128_256;

fn logits(shape: &str) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(1);
    match shape {
        "zipf" => {
            let mut ids: Vec<usize> = (0..VOCAB).collect();
            for i in (1..VOCAB).rev() {
                ids.swap(i, rng.random_range(0..=i));
            }
            let mut out = vec![0.0; VOCAB];
            for (rank, &id) in ids.iter().enumerate() {
                out[id] = 12.0 - 1.2 * ((rank + 1) as f32).ln() + rng.random::<f32>() * 0.1;
            }
            out
        }
        _ => (0..VOCAB).map(|_| rng.random::<f32>() - 0.5).collect(),
    }
}

fn bench(c: &mut Criterion) {
    for shape in ["zipf", "flat"] {
        let logits = logits(shape);
        let mut sampler = Sampler::new(SamplingParams {
            temperature: 0.8,
            top_p: Some(0.95),
            ..SamplingParams::default()
        })
        .expect("valid sampling parameters");
        c.bench_function(&format!("sample {VOCAB} logits, {shape}"), |b| {
            b.iter(|| sampler.sample(&logits, &[]).expect("logits without NaN"))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
