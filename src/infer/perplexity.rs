//! `falcon-infer perplexity`: perplexity over a text, llama.cpp's way (the text is cut into
//! chunks of `n_ctx` tokens; in each chunk the second half is scored with the first half as
//! context), and with a reference model also the mean KL divergence from the reference's
//! next-token distribution and how often both pick the same top token.

use anyhow::{bail, Context as _};
use serde::Serialize;

use super::{PerplexityConfig, Prepared};
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
) -> anyhow::Result<()> {
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

/// The `perplexity` command.
///
/// # Errors
/// Loading failures, a text too short for one chunk, or vocabularies that differ.
pub fn run(c: &PerplexityConfig) -> anyhow::Result<()> {
    let mut load = c.load.clone();
    load.context.all_logits = true;
    let prepared = Prepared::new(&c.model, &load, c.verbose)?;
    let reference_path = c
        .reference
        .as_ref()
        .map(Prepared::resolve_other)
        .transpose()?;
    let (model, _) = prepared.load()?;
    let mut ctx = prepared.context_options(&model);
    let n_ctx = ctx.n_ctx.unwrap_or(512) as usize;
    // One batch per chunk keeps every logit of the chunk available at once.
    ctx.n_batch = Some(ctx.n_batch.unwrap_or(n_ctx as u32).min(n_ctx as u32));
    let mut session = model.session(&ctx).context("creating the context")?;
    let tokens = model.tokenize(&c.text, true);
    let n_chunks = tokens.len() / n_ctx;
    if n_chunks == 0 {
        bail!(
            "the text is {} tokens, less than one chunk of --ctx-size {n_ctx}; give a longer text \
             or a smaller --ctx-size",
            tokens.len()
        );
    }
    let reference = match &reference_path {
        Some(p) => {
            let (m, _) = prepared.load_other(p)?;
            if m.n_vocab() != model.n_vocab() || m.tokenize(&c.text, true) != tokens {
                bail!(
                    "the reference model's vocabulary differs; compare models of the same family"
                );
            }
            Some(m)
        }
        None => None,
    };
    let mut ref_session = reference
        .as_ref()
        .map(|m| m.session(&ctx).context("creating the reference context"))
        .transpose()?;

    let first = n_ctx / 2;
    let (mut nll, mut kl, mut agree, mut count) = (0f64, 0f64, 0usize, 0usize);
    let mut lp = Vec::new();
    let mut ref_lp: Vec<Vec<f64>> = Vec::new();
    for k in 0..n_chunks {
        let chunk = &tokens[k * n_ctx..(k + 1) * n_ctx];
        ref_lp.clear();
        if let Some(rs) = ref_session.as_mut() {
            eval_chunk(rs, chunk, first, &mut |_, logits| {
                let mut v = Vec::new();
                log_softmax(logits, &mut v);
                ref_lp.push(v);
            })?;
        }
        let mut j = 0;
        eval_chunk(&mut session, chunk, first, &mut |i, logits| {
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
        if !c.json {
            eprintln!(
                "[{}/{n_chunks}] perplexity so far {:.4}",
                k + 1,
                (nll / count as f64).exp()
            );
        }
    }
    let with_ref = ref_session.is_some();
    let report = PerplexityReport {
        tokens: count,
        chunks: n_chunks,
        n_ctx,
        perplexity: (nll / count as f64).exp(),
        mean_kl_divergence: with_ref.then(|| kl / count as f64),
        top1_agreement: with_ref.then(|| agree as f64 / count as f64),
    };
    if c.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "perplexity {:.4} over {} tokens ({} chunks of {})",
            report.perplexity, report.tokens, report.chunks, report.n_ctx
        );
        if let (Some(kl), Some(a)) = (report.mean_kl_divergence, report.top1_agreement) {
            println!(
                "mean KL divergence {kl:.6} nats | top-1 agreement {:.2}%",
                100.0 * a
            );
        }
    }
    Ok(())
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
