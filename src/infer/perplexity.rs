//! `falcon-infer perplexity`: perplexity over a text, llama.cpp's way (the text is cut into
//! chunks of `n_ctx` tokens; in each chunk the second half is scored with the first half as
//! context), and with a reference model also the mean KL divergence from the reference's
//! next-token distribution and how often both pick the same top token.

use serde::Serialize;

use super::InferError;
use crate::engine::{Session, Token};

/// The result.
#[derive(Debug, Clone, Serialize)]
pub struct PerplexityReport {
    /// Tokens scored.
    pub tokens: usize,
    /// Chunks of `n_ctx` tokens.
    pub chunks: usize,
    /// Chunk length.
    pub n_ctx: usize,
    /// exp(mean negative log-likelihood).
    pub perplexity: f64,
    /// Mean KL(reference ‖ model), nats.
    pub mean_kl_divergence: Option<f64>,
    /// Fraction of positions where both models' most likely token agree.
    pub top1_agreement: Option<f64>,
}

/// Log-softmax of `logits` into `out`.
fn log_softmax(logits: &[f32], out: &mut Vec<f64>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    out.clear();
    out.extend(logits.iter().map(|&l| l as f64 - lse));
}

fn argmax(v: &[f64]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// Evaluates one chunk and calls `each(i, logits)` for every position `i >= first`.
fn eval_chunk(
    session: &mut Session<'_>,
    chunk: &[Token],
    first: usize,
    each: &mut dyn FnMut(usize, &[f32]),
) -> Result<(), InferError> {
    session.truncate(0);
    let n_batch = session.n_batch();
    for (b, batch) in chunk.chunks(n_batch).enumerate() {
        session.eval(batch, true)?;
        for j in 0..batch.len() {
            let i = b * n_batch + j;
            if i >= first && i + 1 < chunk.len() {
                each(i, session.logits(Some(j)));
            }
        }
    }
    Ok(())
}

/// Measures perplexity of `tokens` with `session` (whose context size is the chunk length), and
/// with a reference session also the KL divergence and top-1 agreement. `progress` is called
/// after each chunk with (chunks done, chunks, perplexity so far).
///
/// # Errors
/// A text shorter than one chunk, or evaluation failures.
pub fn measure(
    session: &mut Session<'_>,
    mut reference: Option<&mut Session<'_>>,
    tokens: &[Token],
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<PerplexityReport, InferError> {
    let n_ctx = session.n_ctx();
    let n_chunks = tokens.len() / n_ctx;
    if n_chunks == 0 {
        return Err(InferError::TextTooShort {
            tokens: tokens.len(),
            n_ctx,
        });
    }
    let first = n_ctx / 2;
    let (mut nll, mut kl, mut agree, mut count) = (0f64, 0f64, 0usize, 0usize);
    let mut lp = Vec::new();
    let mut ref_lp: Vec<Vec<f64>> = Vec::new();
    for k in 0..n_chunks {
        let chunk = &tokens[k * n_ctx..(k + 1) * n_ctx];
        ref_lp.clear();
        if let Some(rs) = reference.as_deref_mut() {
            eval_chunk(rs, chunk, first, &mut |_, logits| {
                let mut v = Vec::new();
                log_softmax(logits, &mut v);
                ref_lp.push(v);
            })?;
        }
        let mut j = 0;
        eval_chunk(session, chunk, first, &mut |i, logits| {
            log_softmax(logits, &mut lp);
            nll -= lp[chunk[i + 1] as usize];
            if let Some(r) = ref_lp.get(j) {
                kl += r
                    .iter()
                    .zip(&lp)
                    .map(|(&p, &q)| p.exp() * (p - q))
                    .sum::<f64>();
                agree += usize::from(argmax(r) == argmax(&lp));
            }
            j += 1;
            count += 1;
        })?;
        progress(k + 1, n_chunks, (nll / count as f64).exp());
    }
    let with_ref = reference.is_some();
    Ok(PerplexityReport {
        tokens: count,
        chunks: n_chunks,
        n_ctx,
        perplexity: (nll / count as f64).exp(),
        mean_kl_divergence: with_ref.then(|| kl / count as f64),
        top1_agreement: with_ref.then(|| agree as f64 / count as f64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_normalises() {
        let mut v = Vec::new();
        log_softmax(&[1.0, 2.0, 3.0], &mut v);
        let s: f64 = v.iter().map(|x| x.exp()).sum();
        assert!((s - 1.0).abs() < 1e-12);
        assert_eq!(argmax(&v), 2);
    }
}
