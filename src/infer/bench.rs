//! `falcon-infer bench`: prompt processing and generation speed (mean ± standard deviation over
//! repetitions, like llama-bench), and the memory-bandwidth ceiling of generation: each generated
//! token reads every weight once, so tokens/s cannot beat bandwidth / weight bytes. The
//! bandwidth is measured here with a large in-process copy.

use std::time::Instant;

use anyhow::Context as _;
use serde::Serialize;

use super::{BenchConfig, Prepared};
use crate::engine::Token;

/// Mean and sample standard deviation.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    /// Mean.
    pub mean: f64,
    /// Standard deviation.
    pub std: f64,
}

impl Stat {
    fn of(xs: &[f64]) -> Self {
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

/// The `bench` command.
///
/// # Errors
/// Loading or evaluation failures.
pub fn run(c: &BenchConfig) -> anyhow::Result<()> {
    let mut load = c.load.clone();
    let need = (c.n_prompt + c.n_gen) as u32;
    load.context.n_ctx = Some(load.context.n_ctx.unwrap_or(need).max(need));
    let prepared = Prepared::new(&c.model, &load, c.verbose)?;
    let (model, _) = prepared.load()?;
    let mut session = prepared.session(&model)?;
    let n_vocab = model.n_vocab() as u64;
    // Deterministic pseudo-random tokens (an LCG), as llama-bench uses random tokens.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 33) % n_vocab) as Token
    };
    let prompt: Vec<Token> = (0..c.n_prompt).map(|_| next()).collect();
    let gen: Vec<Token> = (0..c.n_gen).map(|_| next()).collect();

    // Warm-up.
    session.eval(&prompt[..prompt.len().min(8)], false)?;
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    for r in 0..c.repetitions {
        session.truncate(0);
        let t = Instant::now();
        session.eval(&prompt, false)?;
        pp.push(c.n_prompt as f64 / t.elapsed().as_secs_f64());
        session.truncate(0);
        session.eval(&gen[..1], false)?;
        let t = Instant::now();
        for &tok in &gen[1..] {
            session.eval(&[tok], false).context("generation test")?;
        }
        tg.push((c.n_gen - 1).max(1) as f64 / t.elapsed().as_secs_f64());
        if !c.json {
            eprintln!(
                "repetition {}/{}: pp {:.1} t/s, tg {:.1} t/s",
                r + 1,
                c.repetitions,
                pp[r],
                tg[r]
            );
        }
    }
    let threads = load.context.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        |t| t as usize,
    );
    let bw = copy_bandwidth(threads);
    let bytes = model.size_bytes();
    let n_off = u64::from(model.n_layer()) + 1;
    let cpu_share = 1.0 - f64::from(model.gpu_layers()) / n_off as f64;
    let cpu_bytes = bytes as f64 * cpu_share;
    let tg_stat = Stat::of(&tg);
    let ceiling = (cpu_bytes > 0.0).then(|| bw / cpu_bytes);
    let report = BenchReport {
        model: prepared.gguf.display().to_string(),
        model_bytes: bytes,
        gpu_layers: model.gpu_layers(),
        n_prompt: c.n_prompt,
        n_gen: c.n_gen,
        pp_tokens_per_s: Stat::of(&pp),
        tg_tokens_per_s: tg_stat,
        copy_bandwidth: bw,
        tg_ceiling_tokens_per_s: ceiling,
        fraction_of_ceiling: ceiling.map(|c| tg_stat.mean / c),
    };
    if c.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "model {} ({}), {} of {} layers on GPU",
        report.model,
        super::human_bytes(bytes),
        report.gpu_layers,
        n_off
    );
    println!(
        "pp{:<5} {:>10.2} ± {:.2} tokens/s",
        c.n_prompt, report.pp_tokens_per_s.mean, report.pp_tokens_per_s.std
    );
    println!(
        "tg{:<5} {:>10.2} ± {:.2} tokens/s",
        c.n_gen, tg_stat.mean, tg_stat.std
    );
    match (ceiling, report.fraction_of_ceiling) {
        (Some(ceil), Some(f)) => println!(
            "copy bandwidth {:.1} GB/s -> generation ceiling {:.2} tokens/s ({} of weights read per token); reached {:.0}%",
            bw / 1e9,
            ceil,
            super::human_bytes(cpu_bytes as u64),
            100.0 * f
        ),
        _ => println!(
            "copy bandwidth {:.1} GB/s; all weights are on GPUs, so the host ceiling does not apply",
            bw / 1e9
        ),
    }
    Ok(())
}
