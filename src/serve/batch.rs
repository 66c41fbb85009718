//! The batching loop: one llama.cpp context holding up to `slots` sequences, each with the full
//! context size, advanced together one decode step at a time (continuous batching).
//!
//! Each step builds one batch: the next token of every running sequence, then chunks of the
//! prompts still being read, up to `n_batch` tokens in all, so that a long prompt is read over
//! several steps while the running streams keep flowing. A new job joins at the next step; a
//! finished or cancelled sequence frees its slot and its KV cells at once.
//!
//! A job with `n` sequences reads its prompt once, into its first sequence, whose cells are then
//! copied to the others. LoRA adapters apply to a whole context at a time: when running jobs
//! want different adapters, the steps alternate between them, so that each job gets its own
//! adapter's output.
//!
//! Greedy decoding gives the same tokens whether a sequence runs alone or beside others: every
//! sequence has its own KV stream, and its logits do not depend on the rest of the batch beyond
//! floating-point summation order (which the CPU backend keeps per row).
//!
//! The contract with the HTTP side is in [`super::queue`].

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

use super::metrics::Metrics;
use super::params::Sampling;
use super::queue::{
    AdapterId, Event, Finish, FinishReason, GeneratedToken, GenerationError, Job, Jobs, TopLogprob,
};
use super::text::Detokenizer;
use crate::engine::{Adapter, Batch, Context, EngineError, Model, Sampler, SamplingParams, Token};

/// The loop's settings.
#[derive(Clone, Debug)]
pub struct LoopOptions {
    /// Tokens per decode step: the running sequences' next tokens plus prompt chunks.
    pub n_batch: usize,
}

/// A LoRA adapter the server was started with, and its scale.
pub type ServedAdapter<'a, 'm> = (&'a Adapter<'m>, f32);

/// One sequence of a running job.
struct Seq {
    /// Its llama.cpp sequence id (its slot).
    id: i32,
    /// Its index within the job (`Event`'s `seq`).
    index: u32,
    sampler: Sampler,
    detok: Detokenizer,
    /// Position of the next token to decode.
    pos: u32,
    /// The sampled token to decode at the next step.
    next: Option<Token>,
    generated: u32,
    /// Events not yet sent (the client's channel was full).
    pending: VecDeque<Event>,
    done: bool,
    /// Its row in the current batch.
    row: Option<usize>,
}

/// A job taken from the queue.
struct Running {
    job: Job,
    seqs: Vec<Seq>,
    /// Prompt tokens decoded into the first sequence.
    read: usize,
    /// Row of the prompt's last token in the current batch.
    prompt_row: Option<usize>,
}

impl Running {
    fn reading(&self) -> bool {
        self.read < self.job.prompt.len()
    }

    fn finished(&self) -> bool {
        self.seqs.iter().all(|s| s.done && s.pending.is_empty())
    }
}

/// The engine's sampler chain for a sequence; sequence `index` of a sampled job draws with
/// `seed + index`, so that OpenAI's `n` choices differ.
fn sampler(model: &Model<'_>, s: &Sampling, index: u32) -> Sampler {
    model.sampler(&SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        repeat_last_n: s.repeat_last_n,
        frequency_penalty: s.frequency_penalty,
        presence_penalty: s.presence_penalty,
        seed: (s.seed as u32).wrapping_add(index),
    })
}

/// One pass over a row of logits: the most probable token and the log of the softmax's
/// denominator (so that a token's log-probability is `logit - log_norm`).
#[derive(Clone, Copy, Debug)]
struct RowStats {
    argmax: Token,
    log_norm: f32,
}

fn row_stats(logits: &[f32]) -> RowStats {
    let (argmax, max) =
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
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    RowStats {
        argmax: argmax as Token,
        log_norm: max + sum.ln(),
    }
}

/// The `k` most probable tokens under `logits`, most probable first, with their
/// log-probabilities.
fn top_k(logits: &[f32], log_norm: f32, k: usize) -> Vec<(Token, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut ids: Vec<Token> = (0..logits.len() as Token).collect();
    let k = k.min(ids.len());
    let by_logit = |a: &Token, b: &Token| logits[*b as usize].total_cmp(&logits[*a as usize]);
    ids.select_nth_unstable_by(k - 1, by_logit);
    ids.truncate(k);
    ids.sort_by(by_logit);
    ids.into_iter()
        .map(|t| (t, logits[t as usize] - log_norm))
        .collect()
}

/// Runs jobs until the queue is closed and empty and every running job has ended.
///
/// `adapters` are the served adapters in [`AdapterId`] order, each applied over the model's own
/// ([`crate::engine::LoadOptions::adapters`]), which every request gets. The context must hold `slots`
/// sequences ([`Context::n_seq_max`]) in separate KV streams.
pub fn run(
    model: &Model<'_>,
    ctx: &mut Context<'_>,
    adapters: &[ServedAdapter<'_, '_>],
    mut jobs: Jobs,
    opts: &LoopOptions,
    metrics: &Metrics,
) {
    let slots = ctx.n_seq_max() as usize;
    let n_ctx = ctx.n_ctx() as u32;
    let n_batch = opts.n_batch.max(1);
    let mut batch = Batch::new(n_batch, 1);
    let mut free: Vec<i32> = (0..slots as i32).rev().collect();
    let mut running: Vec<Running> = Vec::new();
    // A job taken from the queue that waits for enough free slots.
    let mut held: Option<Job> = None;
    let mut open = true;
    // The adapter set the context applies now (a new context applies the model's own, the
    // base's set), and the step count (to alternate adapters).
    let mut applied: Option<Option<AdapterId>> = Some(None);
    let mut step: usize = 0;

    loop {
        // Before the loop may block waiting for a job: what /metrics shows must be current.
        report(metrics, ctx, slots, &free);
        // Take new jobs while there are free slots: what waits for one stays in the queue,
        // where --max-queue counts it.
        while open {
            if held.is_none() {
                if free.is_empty() {
                    break;
                }
                let next = if running.is_empty() {
                    jobs.blocking_next().ok_or(TryRecvError::Disconnected)
                } else {
                    jobs.try_next()
                };
                match next {
                    Ok(job) => held = Some(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            let Some(job) = held.take() else { break };
            if job.is_cancelled() {
                continue;
            }
            let n = job.n.max(1) as usize;
            if n > slots {
                // Validation keeps `n` within the slots; refuse rather than wait forever.
                let _ = job
                    .events
                    .try_send(Event::Failed(GenerationError::Engine(format!(
                        "{n} sequences asked for, but the server has {slots} slots"
                    ))));
                continue;
            }
            if n > free.len() {
                held = Some(job);
                break;
            }
            let seqs = (0..n as u32)
                .map(|index| {
                    let mut sampler = sampler(model, &job.params.sampling, index);
                    sampler.accept(&job.prompt);
                    Seq {
                        id: free.pop().expect("a free slot"),
                        index,
                        sampler,
                        detok: Detokenizer::new(job.params.stop.clone()),
                        pos: 0,
                        next: None,
                        generated: 0,
                        pending: VecDeque::new(),
                        done: false,
                        row: None,
                    }
                })
                .collect();
            running.push(Running {
                job,
                seqs,
                read: 0,
                prompt_row: None,
            });
        }
        if running.is_empty() {
            if open || held.is_some() {
                continue;
            }
            return;
        }

        // Drop the jobs whose clients went away, and those that are done.
        running.retain_mut(|r| {
            let gone = r.job.is_cancelled() || r.finished();
            if gone {
                release(ctx, r, &mut free);
            }
            !gone
        });
        if running.is_empty() {
            continue;
        }

        // The adapter this step serves: alternate between those that running jobs want.
        let mut wanted: Vec<Option<AdapterId>> = Vec::new();
        for r in &running {
            if !wanted.contains(&r.job.adapter) && r.seqs.iter().any(|s| !s.done) {
                wanted.push(r.job.adapter);
            }
        }
        let Some(&group) = wanted.get(step % wanted.len().max(1)) else {
            // Only events left to deliver.
            flush_all(ctx, &mut running, &mut free);
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        step = step.wrapping_add(1);
        if applied != Some(group) {
            let set: Vec<(&Adapter<'_>, f32)> = group
                .and_then(|AdapterId(i)| adapters.get(i))
                .map(|&(a, s)| vec![(a, s)])
                .unwrap_or_default();
            if let Err(e) = ctx.set_adapters_over_defaults(&set) {
                fail_group(ctx, &mut running, group, &e, &mut free);
                applied = None;
                continue;
            }
            applied = Some(group);
        }

        // The batch: next tokens of running sequences first, then prompt chunks.
        batch.clear();
        for r in running.iter_mut().filter(|r| r.job.adapter == group) {
            r.prompt_row = None;
            for s in &mut r.seqs {
                s.row = None;
                if s.done || !s.pending.is_empty() {
                    continue;
                }
                if let Some(t) = s.next {
                    if batch.len() < n_batch {
                        s.row = Some(batch.add(t, s.pos, &[s.id], true).expect("room"));
                    }
                }
            }
        }
        for r in running.iter_mut().filter(|r| r.job.adapter == group) {
            if !r.reading() || batch.len() >= n_batch {
                continue;
            }
            let take = (r.job.prompt.len() - r.read).min(n_batch - batch.len());
            let id = r.seqs[0].id;
            for k in r.read..r.read + take {
                let last = k + 1 == r.job.prompt.len();
                let row = batch
                    .add(r.job.prompt[k], k as u32, &[id], last)
                    .expect("room");
                if last {
                    r.prompt_row = Some(row);
                }
            }
            r.read += take;
        }
        if batch.is_empty() {
            // Every sequence of this adapter waits for its client to read.
            flush_all(ctx, &mut running, &mut free);
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }

        if let Err(e) = ctx.decode(&batch) {
            fail_group(ctx, &mut running, group, &e, &mut free);
            continue;
        }

        // Sample the next token of every sequence that got logits: one pass over each row
        // finds the argmax (greedy's choice) and the softmax's denominator (the logprob).
        for r in running.iter_mut().filter(|r| r.job.adapter == group) {
            if let Some(row) = r.prompt_row.take() {
                let len = r.job.prompt.len() as u32;
                let first = r.seqs[0].id;
                for s in &mut r.seqs {
                    if s.id != first {
                        ctx.seq_cp(first, s.id, None, None);
                    }
                    s.pos = len;
                    s.row = Some(row);
                }
            }
        }
        let mut rows: Vec<usize> = running
            .iter()
            .filter(|r| r.job.adapter == group)
            .flat_map(|r| r.seqs.iter().filter_map(|s| s.row))
            .collect();
        rows.sort_unstable();
        rows.dedup();
        let stats: Vec<RowStats> = rows.iter().map(|&row| row_stats(ctx.logits(row))).collect();
        for r in running.iter_mut().filter(|r| r.job.adapter == group) {
            for s in &mut r.seqs {
                let Some(row) = s.row.take() else { continue };
                if s.next.is_some() {
                    s.pos += 1;
                }
                let st = stats[rows.binary_search(&row).expect("a row of this step")];
                let logits = ctx.logits(row);
                let token = if s.sampler.is_argmax() {
                    st.argmax
                } else {
                    s.sampler.sample(logits)
                };
                let logprob = logits[token as usize] - st.log_norm;
                let top = top_k(logits, st.log_norm, r.job.params.top_logprobs as usize);
                emit(model, &r.job, s, token, logprob, &top, n_ctx);
            }
        }
        flush_all(ctx, &mut running, &mut free);
    }
}

/// Slots and KV cells in use, for `/metrics`.
fn report(metrics: &Metrics, ctx: &Context<'_>, slots: usize, free: &[i32]) {
    metrics.busy_slots.set((slots - free.len()) as i64);
    metrics.kv_cells_used.set(ctx.kv_cells_used() as i64);
}

/// Records one generated token of `s` as events, and ends the sequence when it is done.
fn emit(
    model: &Model<'_>,
    job: &Job,
    s: &mut Seq,
    token: Token,
    logprob: f32,
    top: &[(Token, f32)],
    n_ctx: u32,
) {
    let bytes = model.token_bytes(token);
    let special = model.is_special(token);
    let piece = s.detok.push(&bytes, special);
    s.generated += 1;
    s.pending.push_back(Event::Token {
        seq: s.index,
        token: GeneratedToken {
            id: token,
            bytes,
            text: piece.text,
            output: piece.output,
            logprob,
            special,
            top: top
                .iter()
                .map(|&(id, logprob)| TopLogprob {
                    id,
                    bytes: model.token_bytes(id),
                    logprob,
                    special: model.is_special(id),
                })
                .collect(),
        },
    });
    let reason = if let Some(stop) = piece.stop {
        Some(FinishReason::StopSequence(stop))
    } else if model.is_end(token) {
        Some(FinishReason::EndOfSequence)
    } else if s.generated >= job.params.max_new_tokens || s.pos >= n_ctx {
        Some(FinishReason::Length)
    } else {
        None
    };
    match reason {
        Some(reason) => {
            let (text_tail, output_tail) = s.detok.finish();
            s.pending.push_back(Event::Finished {
                seq: s.index,
                finish: Finish {
                    reason,
                    generated_tokens: s.generated,
                    text_tail,
                    output_tail,
                },
            });
            s.done = true;
            s.next = None;
        }
        None => s.next = Some(token),
    }
}

/// Sends what each sequence has pending, without blocking; frees the cells of sequences that
/// are done, and drops jobs whose clients went away.
fn flush_all(ctx: &mut Context<'_>, running: &mut Vec<Running>, free: &mut Vec<i32>) {
    running.retain_mut(|r| {
        let mut closed = false;
        'seqs: for s in &mut r.seqs {
            while let Some(e) = s.pending.pop_front() {
                match r.job.events.try_send(e) {
                    Ok(()) => {}
                    Err(TrySendError::Full(e)) => {
                        s.pending.push_front(e);
                        break;
                    }
                    Err(TrySendError::Closed(_)) => {
                        closed = true;
                        break 'seqs;
                    }
                }
            }
            if s.done && s.id >= 0 {
                ctx.seq_rm(s.id, None, None);
                free.push(s.id);
                s.id = -1;
            }
        }
        if closed || r.finished() {
            release(ctx, r, free);
            return false;
        }
        true
    });
}

/// Frees every slot a job still holds.
fn release(ctx: &mut Context<'_>, r: &mut Running, free: &mut Vec<i32>) {
    for s in &mut r.seqs {
        if s.id >= 0 {
            ctx.seq_rm(s.id, None, None);
            free.push(s.id);
            s.id = -1;
        }
    }
}

/// Ends the jobs of the adapter group whose step failed, each with one `Failed` event.
fn fail_group(
    ctx: &mut Context<'_>,
    running: &mut Vec<Running>,
    group: Option<AdapterId>,
    e: &EngineError,
    free: &mut Vec<i32>,
) {
    let error = match e {
        EngineError::NoKvSpace { .. } => GenerationError::KvCacheFull {
            cells: ctx.n_ctx() * ctx.n_seq_max() as usize,
        },
        e => GenerationError::Engine(e.to_string()),
    };
    tracing::error!("{error}");
    running.retain_mut(|r| {
        if r.job.adapter != group {
            return true;
        }
        // Never wait on a client: one whose channel is full sees its channel close without a
        // last event, which the HTTP side reports as a failure too.
        let _ = r.job.events.try_send(Event::Failed(error.clone()));
        release(ctx, r, free);
        false
    });
}

#[cfg(test)]
mod tests {
    use super::{row_stats, top_k};

    #[test]
    fn row_stats_give_a_log_softmax_and_top_is_sorted() {
        let logits = [1.0f32, 3.0, 2.0, 0.5];
        let st = row_stats(&logits);
        assert_eq!(st.argmax, 1);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((logits[2] - st.log_norm - (2.0f32.exp() / z).ln()).abs() < 1e-5);
        let total: f32 = logits.iter().map(|&l| (l - st.log_norm).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        let top = top_k(&logits, st.log_norm, 3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2, 0]);
        assert!((top[1].1 - (logits[2] - st.log_norm)).abs() < 1e-6);
        assert!(top_k(&logits, st.log_norm, 0).is_empty());
    }
}
