//! `falcon-infer eval`: the leaderboard's multiple-choice tasks ([`crate::eval`]) scored on a
//! loaded model.
//!
//! [`ContextDecoder`] is the [`Decoder`] that [`PackedScorer`] runs its rounds through: one
//! llama.cpp context with a unified KV cache, whose batches carry tokens shared by several
//! sequence ids. [`tokenize`] applies the harness's tokenization rule with the model's own
//! tokenizer, and [`score`] packs, evaluates and reports.
//!
//! ```no_run
//! use falcon::engine::{Engine, LoadOptions};
//! use falcon::eval::{data, tasks, TaskKind};
//! use falcon::infer::eval::{score, tokenize, EvalContext};
//! let engine = Engine::init()?;
//! let model = engine.load("falcon-7b-q4_k_m.gguf".as_ref(), &LoadOptions::default())?;
//! let test = data::load(TaskKind::Hellaswag, "validation.jsonl".as_ref())?;
//! let train = data::load(TaskKind::Hellaswag, "train.jsonl".as_ref())?;
//! let setup = tasks::Setup { task: TaskKind::Hellaswag, shots: 10, seed: 42, limit: Some(100) };
//! let items = tasks::build_items(&setup, &test, tasks::Fewshot::Split(&train))?;
//! let tokenized = tokenize(&model, &items)?;
//! let report = score(&model, &EvalContext::default(), &setup, &items, tokenized, None, &mut |_, _| {})?;
//! println!("acc_norm {}", report.metrics["acc_norm"].value);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::InferError;
use crate::engine::{Batch, Context, ContextOptions, EngineError, Model};
use crate::eval::pack::{Decoder, Entry, Limits, PackedError, PackedScorer};
use crate::eval::report::{evaluate, Report};
use crate::eval::tasks::{tokenize_items, Item, Request, Setup, Unscorable};

/// The most sequence ids a unified llama.cpp KV cache takes (`LLAMA_MAX_SEQ`).
pub const MAX_SEQS: u32 = 256;

/// KV cells of one round when not given: enough for several items of a 2048-token model.
pub const DEFAULT_CELLS: u32 = 4096;

/// How to size the context the requests are packed into.
#[derive(Debug, Clone, Default)]
pub struct EvalContext {
    /// KV cells one round fills (`None`: [`DEFAULT_CELLS`], at least the model's context).
    pub cells: Option<u32>,
    /// Tokens per decode call (`None`: the whole round in one call).
    pub batch: Option<u32>,
    /// Sequence ids per round (`None`: [`MAX_SEQS`]).
    pub seqs: Option<u32>,
    /// CPU threads (`None`: all cores).
    pub threads: Option<u32>,
}

impl EvalContext {
    /// The context options and packing limits for `model`.
    #[must_use]
    pub fn resolve(&self, model: &Model<'_>) -> (ContextOptions, Limits) {
        let max_length = model.n_ctx_train();
        let cells = self
            .cells
            .unwrap_or_else(|| DEFAULT_CELLS.max(max_length))
            .max(1);
        let batch = self.batch.unwrap_or(cells).clamp(1, cells);
        // llama.cpp keeps room for at least one output row per sequence, within n_batch rows.
        let seqs = self.seqs.unwrap_or(MAX_SEQS).clamp(1, MAX_SEQS).min(batch);
        let opts = ContextOptions {
            n_ctx: Some(cells),
            n_batch: Some(batch),
            n_ubatch: None,
            n_seq_max: seqs,
            kv_unified: true,
            threads: self.threads,
            all_logits: false,
        };
        let limits = Limits {
            max_tokens: cells as usize,
            max_batch: batch as usize,
            max_seqs: seqs as usize,
        };
        (opts, limits)
    }
}

/// A llama.cpp context with a unified KV cache as a [`Decoder`].
#[derive(Debug)]
pub struct ContextDecoder<'m> {
    ctx: Context<'m>,
    batch: Batch,
    seqs: Vec<i32>,
}

impl<'m> ContextDecoder<'m> {
    /// A context of `model` with these options (`kv_unified` is set).
    ///
    /// # Errors
    /// llama.cpp cannot create the context.
    pub fn new(model: &'m Model<'_>, opts: &ContextOptions) -> Result<Self, EngineError> {
        let mut opts = opts.clone();
        opts.kv_unified = true;
        let ctx = model.context(&opts)?;
        let batch = Batch::new(ctx.n_batch(), ctx.n_seq_max() as usize);
        Ok(Self {
            ctx,
            batch,
            seqs: Vec::new(),
        })
    }

    /// Makes decoding stop (with an "aborted" error) once `flag` is set.
    pub fn set_interrupt(&mut self, flag: Arc<AtomicBool>) {
        self.ctx.set_interrupt(flag);
    }
}

impl Decoder for ContextDecoder<'_> {
    type Error = EngineError;

    fn clear(&mut self) -> Result<(), EngineError> {
        self.ctx.clear();
        Ok(())
    }

    fn decode(&mut self, entries: &[Entry]) -> Result<(), EngineError> {
        self.batch.clear();
        for e in entries {
            self.seqs.clear();
            self.seqs.extend(e.seqs.clone());
            self.batch.add(e.token, e.pos, &self.seqs, e.logits)?;
        }
        self.ctx.decode(&self.batch)
    }

    fn logits(&self, i: usize) -> &[f32] {
        self.ctx.logits(i)
    }
}

/// Tokenizes every item's requests with the model's tokenizer by the harness's rule, cut to
/// the model's context (its training context, as the harness's `max_length`).
///
/// # Errors
/// A vocabulary without an end-of-text token (the harness's context for an empty one).
pub fn tokenize(
    model: &Model<'_>,
    items: &[Item],
) -> Result<Vec<Result<Vec<Request>, Unscorable>>, InferError> {
    let eot = model.eos().ok_or(InferError::NoEndOfText)?;
    let mut tok = |s: &str| model.tokenize(s, false);
    Ok(tokenize_items(
        items,
        &mut tok,
        eot,
        model.n_ctx_train() as usize,
    ))
}

/// Scores the tokenized items ([`tokenize`]'s output for `items`) on `model`, packed into
/// rounds of a context sized by `sizing`, and reports. `progress(done, total)` is called
/// after each round with distinct requests scored; decoding stops once `interrupt` is set.
///
/// # Errors
/// A request longer than a round's cells, or llama.cpp failures.
pub fn score(
    model: &Model<'_>,
    sizing: &EvalContext,
    setup: &Setup,
    items: &[Item],
    tokenized: Vec<Result<Vec<Request>, Unscorable>>,
    interrupt: Option<Arc<AtomicBool>>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Report, InferError> {
    let (opts, limits) = sizing.resolve(model);
    let mut decoder = ContextDecoder::new(model, &opts)?;
    if let Some(flag) = interrupt {
        decoder.set_interrupt(flag);
    }
    let mut scorer = PackedScorer::new(decoder, limits).with_progress(progress);
    evaluate(
        setup,
        model.n_ctx_train() as usize,
        items,
        tokenized,
        &mut scorer,
    )
    .map_err(|e| match e {
        PackedError::Pack(p) => InferError::Pack(p),
        PackedError::Decode(d) => InferError::Engine(d),
    })
}
