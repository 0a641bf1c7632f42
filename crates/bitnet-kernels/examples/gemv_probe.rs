use bitnet_kernels::cpu::{ternary_matmul, Isa};
use bitnet_kernels::quant::QuantizedActivations;
use bitnet_kernels::TernaryWeight;
use std::time::Instant;
fn main() {
    let (inp, out) = (2560usize, 2560usize);
    let copies: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(1);
    let ws: Vec<TernaryWeight> = (0..copies)
        .map(|c| {
            let t: Vec<i8> = (0..out * inp)
                .map(|i| (((i * 7 + c) % 3) as i8) - 1)
                .collect();
            TernaryWeight::from_ternary(&t, out, inp).unwrap()
        })
        .collect();
    let x: Vec<f32> = (0..inp).map(|i| (i as f32).sin()).collect();
    let mut a = QuantizedActivations::default();
    a.quantize(&x, 1, inp, ws[0].padded_in_features());
    let mut y = vec![0i32; out];
    for isa in Isa::available() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let mut ts = vec![];
        for i in 0..200 {
            let t = Instant::now();
            pool.install(|| ternary_matmul(isa, &ws[i % copies], &a, &mut y));
            ts.push(t.elapsed().as_secs_f64());
        }
        ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let m = ts[ts.len() / 2];
        println!(
            "{isa:?} copies={copies}: {:.1} us, {:.1} GB/s",
            m * 1e6,
            (out * inp / 4) as f64 / m / 1e9
        );
    }
}
