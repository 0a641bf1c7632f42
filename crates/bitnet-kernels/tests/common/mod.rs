//! Helpers shared by the kernel test files.

use rand::rngs::StdRng;
use rand::Rng;

/// Activations with a few outliers per row (every 97th value ×20), as real hidden states have,
/// so that quantization is not trivial.
pub fn random_acts(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v: f32 = rng.random_range(-1.0..1.0);
            if i % 97 == 0 {
                v * 20.0
            } else {
                v
            }
        })
        .collect()
}
