//! [`perplexity`]: per-token negative log-likelihood over non-overlapping windows.

use candle_core::{Tensor, D};

use crate::model::ForCausalLM;

/// Scores `ids` in non-overlapping windows of `context` tokens and returns the negative
/// log-likelihood (natural log, f32) of every scored token, in order.
///
/// Each window is a fresh sequence (the KV cache is cleared), and its first token is only
/// context: a text of `n` tokens split into `w` windows yields `n − w` values (a last window of
/// one token yields none). Perplexity is `exp(mean)`. Windows are run in prefill chunks, so the
/// logits held at once are `chunk × vocab`, not `context × vocab`.
pub fn perplexity(
    model: &mut ForCausalLM,
    ids: &[u32],
    context: usize,
) -> candle_core::Result<Vec<f32>> {
    if context < 2 {
        candle_core::bail!("perplexity needs a context of at least 2 tokens, got {context}");
    }
    if context > model.max_context() {
        candle_core::bail!(
            "context {context} exceeds the model's maximum of {} tokens",
            model.max_context()
        );
    }
    let chunk = model.prefill_chunk();
    let device = model.device().clone();
    let mut nll = Vec::with_capacity(ids.len());
    for window in ids.chunks(context) {
        if window.len() < 2 {
            continue;
        }
        model.clear_cache();
        // Position i predicts token i + 1, so the window's last token is never an input.
        let inputs = window.len() - 1;
        for start in (0..inputs).step_by(chunk) {
            let end = (start + chunk).min(inputs);
            let x = Tensor::new(&window[start..end], &device)?.unsqueeze(0)?;
            let logits = model.forward_all(&x, start)?.squeeze(0)?;
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let targets = Tensor::new(&window[start + 1..end + 1], &device)?.unsqueeze(1)?;
            let picked = logp.gather(&targets, 1)?.squeeze(1)?.neg()?;
            nll.extend(picked.to_vec1::<f32>()?);
        }
    }
    model.clear_cache();
    Ok(nll)
}
