//! `falcon-infer bench`: prompt processing and generation speed (mean ± standard deviation over
//! repetitions, like llama-bench), and the memory-bandwidth ceiling of generation: each generated
//! token reads every weight once, so tokens/s cannot beat bandwidth / weight bytes. The
//! bandwidth is measured here with a large in-process copy.

use std::time::Instant;

use serde::Serialize;

use super::InferError;
use crate::engine::{Session, Token};

/// Mean and sample standard deviation.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    /// Mean.
    pub mean: f64,
    /// Standard deviation.
    pub std: f64,
}

impl Stat {
    /// Of a sample.
    #[must_use]
    pub fn of(xs: &[f64]) -> Self {
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = if xs.len() > 1 {
            xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        Stat {
            mean,
            std: var.sqrt(),
        }
    }
}

/// Results.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The GGUF.
    pub model: String,
    /// Weight bytes.
    pub model_bytes: u64,
    /// Layers on GPU of n_layer + 1.
    pub gpu_layers: u32,
    /// Prompt tokens per test.
    pub n_prompt: usize,
    /// Generated tokens per test.
    pub n_gen: usize,
    /// Prompt processing, tokens/s.
    pub pp_tokens_per_s: Stat,
    /// Generation, tokens/s.
    pub tg_tokens_per_s: Stat,
    /// Measured host copy bandwidth, bytes/s (read + write).
    pub copy_bandwidth: f64,
    /// Generation ceiling from bandwidth, tokens/s (CPU-resident weights only; `None` when all
    /// weights are on GPUs).
    pub tg_ceiling_tokens_per_s: Option<f64>,
    /// Fraction of the ceiling reached.
    pub fraction_of_ceiling: Option<f64>,
}

/// Copy bandwidth: best of several copies of a buffer far larger than the caches, counting the
/// bytes read and written.
#[must_use]
pub fn copy_bandwidth(threads: usize) -> f64 {
    use rayon::prelude::*;
    const LEN: usize = 512 << 20;
    // One thread cannot saturate a server's memory: copy with as many threads as generation uses.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .expect("thread pool");
    let src = vec![1u8; LEN];
    let mut dst = vec![0u8; LEN];
    let chunk = LEN / (threads.max(1) * 4);
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        pool.install(|| {
            dst.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(s));
        });
        std::hint::black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * LEN as f64 / best
}

/// Timings of prompt processing and generation over `repetitions`, on random tokens, as
/// llama-bench measures them; `on_repetition` is called with (repetition, pp t/s, tg t/s).
///
/// # Errors
/// Evaluation failures (a context smaller than `n_prompt` or `n_gen`).
pub fn measure(
    session: &mut Session<'_>,
    n_vocab: usize,
    n_prompt: usize,
    n_gen: usize,
    repetitions: usize,
    on_repetition: &mut dyn FnMut(usize, f64, f64),
) -> Result<(Stat, Stat), InferError> {
    let n_vocab = n_vocab as u64;
    // Deterministic pseudo-random tokens (an LCG), as llama-bench uses random tokens.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 33) % n_vocab) as Token
    };
    let prompt: Vec<Token> = (0..n_prompt).map(|_| next()).collect();
    let gen: Vec<Token> = (0..n_gen).map(|_| next()).collect();

    // Warm-up.
    session.eval(&prompt[..prompt.len().min(8)], false)?;
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    for r in 0..repetitions {
        session.truncate(0);
        let t = Instant::now();
        session.eval(&prompt, false)?;
        pp.push(n_prompt as f64 / t.elapsed().as_secs_f64());
        session.truncate(0);
        session.eval(&gen[..1], false)?;
        let t = Instant::now();
        for &tok in &gen[1..] {
            session.eval(&[tok], false)?;
        }
        tg.push((n_gen - 1).max(1) as f64 / t.elapsed().as_secs_f64());
        on_repetition(r, pp[r], tg[r]);
    }
    Ok((Stat::of(&pp), Stat::of(&tg)))
}
