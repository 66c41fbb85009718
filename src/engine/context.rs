//! Contexts (KV cache and compute buffers), batches of tokens over several sequences, and the
//! single-sequence [`Session`] that generation, chat and perplexity use.

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::model::{Adapter, Model};
use super::sampler::Sampler;
use super::{take_log, EngineError, Token};

/// Context (KV cache and batch) settings.
#[derive(Debug, Clone)]
pub struct ContextOptions {
    /// Context size in tokens for each sequence; `None` = the model's training context. With
    /// `kv_unified` it is the number of KV cells all sequences share, any one of which may use
    /// them all.
    pub n_ctx: Option<u32>,
    /// Logical batch size (tokens per decode call); `None` = llama.cpp's default.
    pub n_batch: Option<u32>,
    /// Physical batch size (tokens per graph evaluation); `None` = `min(n_batch, 512)`.
    pub n_ubatch: Option<u32>,
    /// Sequences the context holds at once, each with the full `n_ctx`.
    pub n_seq_max: u32,
    /// One KV buffer for all sequences (needed for sequences that share cells, e.g. a context
    /// evaluated once for several continuations).
    pub kv_unified: bool,
    /// Threads; `None` = all available cores.
    pub threads: Option<u32>,
    /// Keep the logits of every token of a batch ([`Session`] only; perplexity needs them).
    pub all_logits: bool,
}

impl Default for ContextOptions {
    fn default() -> Self {
        Self {
            n_ctx: None,
            n_batch: None,
            n_ubatch: None,
            n_seq_max: 1,
            kv_unified: false,
            threads: None,
            all_logits: false,
        }
    }
}

impl ContextOptions {
    /// llama.cpp's parameters for `n_seq` sequences of `n_ctx` each (sharing `n_ctx` cells
    /// when the cache is unified).
    pub(crate) fn raw(&self, n_seq: u32) -> llama_cpp_sys_2::llama_context_params {
        // SAFETY: returns a plain struct of defaults.
        let mut p = unsafe { llama_cpp_sys_2::llama_context_default_params() };
        let threads = self.threads.map_or_else(default_threads, |t| t as i32);
        // llama.cpp's n_ctx is the whole cache: split among the sequences, or shared by all of
        // them when unified.
        let cells_for = if self.kv_unified { 1 } else { n_seq.max(1) };
        p.n_ctx = self.n_ctx.unwrap_or(0).saturating_mul(cells_for);
        p.n_seq_max = n_seq.max(1);
        p.n_threads = threads;
        p.n_threads_batch = threads;
        p.kv_unified = self.kv_unified;
        p.no_perf = true;
        if let Some(b) = self.n_batch {
            p.n_batch = b;
            p.n_ubatch = self.n_ubatch.unwrap_or(b.min(512)).min(b);
        } else if let Some(u) = self.n_ubatch {
            p.n_ubatch = u.min(p.n_batch);
        }
        p
    }
}

fn default_threads() -> i32 {
    std::thread::available_parallelism().map_or(4, |n| n.get() as i32)
}

/// A llama.cpp context: the KV cache of up to `n_seq_max` sequences and the buffers to evaluate
/// batches. One thread owns it (it is `Send`, not `Sync`).
#[derive(Debug)]
pub struct Context<'m> {
    raw: NonNull<llama_cpp_sys_2::llama_context>,
    n_ctx: usize,
    n_batch: usize,
    n_seq_max: u32,
    n_vocab: usize,
    interrupt: Option<Arc<AtomicBool>>,
    /// The model's own adapters ([`super::LoadOptions::adapters`]), with their scales.
    defaults: Vec<(*mut llama_cpp_sys_2::llama_adapter_lora, f32)>,
    _model: PhantomData<&'m Model<'m>>,
}

// SAFETY: a llama_context is not tied to the thread that made it; `&mut self` on every method
// that evaluates or edits the cache keeps it to one thread at a time.
unsafe impl Send for Context<'_> {}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: created by llama_init_from_model, freed once.
        unsafe { llama_cpp_sys_2::llama_free(self.raw.as_ptr()) }
    }
}

unsafe extern "C" fn abort_if_set(data: *mut std::ffi::c_void) -> bool {
    // SAFETY: `data` is the AtomicBool of an Arc that the context keeps alive.
    let flag = unsafe { &*data.cast::<AtomicBool>() };
    flag.load(Ordering::Relaxed)
}

impl<'m> Context<'m> {
    pub(crate) fn new(model: &'m Model<'_>, opts: &ContextOptions) -> Result<Self, EngineError> {
        let n_ctx = opts.n_ctx.unwrap_or_else(|| model.n_ctx_train()).max(1);
        let n_seq = opts.n_seq_max.max(1);
        let mut o = opts.clone();
        o.n_ctx = Some(n_ctx);
        let params = o.raw(n_seq);
        take_log();
        // SAFETY: the model is loaded and outlives the context (the borrow); the params are a
        // plain struct whose pointers are all NULL.
        let raw = unsafe { llama_cpp_sys_2::llama_init_from_model(model.raw(), params) };
        let raw = NonNull::new(raw).ok_or_else(|| EngineError::Context {
            n_ctx,
            n_seq,
            log: take_log(),
        })?;
        // SAFETY: `raw` is a live context.
        let n_batch = unsafe { llama_cpp_sys_2::llama_n_batch(raw.as_ptr()) } as usize;
        let mut ctx = Context {
            raw,
            n_ctx: n_ctx as usize,
            n_batch,
            n_seq_max: n_seq,
            n_vocab: model.n_vocab(),
            interrupt: None,
            defaults: Vec::new(),
            _model: PhantomData,
        };
        ctx.defaults = model.default_adapters().collect();
        let (ptrs, scales): (Vec<_>, Vec<_>) = ctx.defaults.iter().copied().unzip();
        if !ptrs.is_empty() {
            ctx.set_raw_adapters(ptrs, scales)?;
        }
        Ok(ctx)
    }

    /// Context size of each sequence, in tokens (with a unified cache, the cells all sequences
    /// share).
    #[must_use]
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Most tokens one [`Context::decode`] takes.
    #[must_use]
    pub fn n_batch(&self) -> usize {
        self.n_batch
    }

    /// Sequences the context holds.
    #[must_use]
    pub fn n_seq_max(&self) -> u32 {
        self.n_seq_max
    }

    /// Makes [`Context::decode`] stop between graph evaluations once `flag` is set (it then
    /// fails with an "aborted" error). Works on the CPU backend, as llama.cpp's abort callback.
    pub fn set_interrupt(&mut self, flag: Arc<AtomicBool>) {
        let data = Arc::as_ptr(&flag).cast_mut().cast::<std::ffi::c_void>();
        // SAFETY: the callback only reads the AtomicBool, which `self.interrupt` keeps alive as
        // long as the context.
        unsafe {
            llama_cpp_sys_2::llama_set_abort_callback(self.raw.as_ptr(), Some(abort_if_set), data)
        };
        self.interrupt = Some(flag);
    }

    /// Evaluates a batch.
    ///
    /// # Errors
    /// [`EngineError::NoKvSpace`] when the cache has no room (nothing was evaluated), or a
    /// decode failure.
    pub fn decode(&mut self, batch: &Batch) -> Result<(), EngineError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut raw = batch.raw;
        raw.n_tokens = batch.len() as i32;
        // SAFETY: the batch's arrays hold `n_tokens` initialised entries, each with at most
        // n_seq_max sequence ids (checked in Batch::add).
        let rc = unsafe { llama_cpp_sys_2::llama_decode(self.raw.as_ptr(), raw) };
        match rc {
            0 => Ok(()),
            1 => Err(EngineError::NoKvSpace {
                n_tokens: batch.len(),
            }),
            _ => Err(EngineError::Decode {
                n_tokens: batch.len(),
                msg: match rc {
                    2 => "aborted".into(),
                    -1 => "invalid batch".into(),
                    n => format!("error {n}"),
                },
                log: take_log(),
            }),
        }
    }

    /// The logits of row `i` of the last decoded batch.
    ///
    /// # Panics
    /// If that row was added without `logits = true`.
    #[must_use]
    pub fn logits(&self, i: usize) -> &[f32] {
        let i = i32::try_from(i).expect("batch rows fit in i32");
        // SAFETY: llama.cpp returns NULL for rows without logits and otherwise a pointer to
        // n_vocab floats that stays valid until the next decode, which needs `&mut self`.
        unsafe {
            let p = llama_cpp_sys_2::llama_get_logits_ith(self.raw.as_ptr(), i);
            assert!(!p.is_null(), "no logits were kept for batch row {i}");
            std::slice::from_raw_parts(p, self.n_vocab)
        }
    }

    fn memory(&self) -> llama_cpp_sys_2::llama_memory_t {
        // SAFETY: `raw` is a live context; its memory lives as long as it.
        unsafe { llama_cpp_sys_2::llama_get_memory(self.raw.as_ptr()) }
    }

    /// Drops positions `[p0, p1)` of sequence `seq` (`None` = open end; `seq = -1`: every
    /// sequence). Returns false when a part of a sequence cannot be removed.
    pub fn seq_rm(&mut self, seq: i32, p0: Option<u32>, p1: Option<u32>) -> bool {
        // SAFETY: a live context's memory; llama.cpp checks the ids.
        unsafe { llama_cpp_sys_2::llama_memory_seq_rm(self.memory(), seq, pos(p0), pos(p1)) }
    }

    /// Makes sequence `dst` share the cells of `src`'s positions `[p0, p1)`.
    pub fn seq_cp(&mut self, src: i32, dst: i32, p0: Option<u32>, p1: Option<u32>) {
        // SAFETY: as above.
        unsafe { llama_cpp_sys_2::llama_memory_seq_cp(self.memory(), src, dst, pos(p0), pos(p1)) }
    }

    /// Empties the whole cache.
    pub fn clear(&mut self) {
        // SAFETY: as above.
        unsafe { llama_cpp_sys_2::llama_memory_clear(self.memory(), false) }
    }

    /// The last position held for `seq`, if any.
    #[must_use]
    pub fn seq_pos_max(&self, seq: i32) -> Option<u32> {
        // SAFETY: as above.
        let p = unsafe { llama_cpp_sys_2::llama_memory_seq_pos_max(self.memory(), seq) };
        u32::try_from(p).ok()
    }

    /// Positions held over all sequences (a cell shared by several sequences counts for each).
    #[must_use]
    pub fn kv_cells_used(&self) -> usize {
        (0..self.n_seq_max as i32)
            .map(|s| {
                // SAFETY: as above.
                let (lo, hi) = unsafe {
                    (
                        llama_cpp_sys_2::llama_memory_seq_pos_min(self.memory(), s),
                        llama_cpp_sys_2::llama_memory_seq_pos_max(self.memory(), s),
                    )
                };
                if hi >= 0 && lo >= 0 {
                    (hi - lo + 1) as usize
                } else {
                    0
                }
            })
            .sum()
    }

    /// The LoRA adapters (with their scales) that the next decodes apply; empty = none. This
    /// replaces the model's own adapters ([`super::LoadOptions::adapters`]) for this context.
    ///
    /// # Errors
    /// If llama.cpp refuses them.
    pub fn set_adapters(&mut self, adapters: &[(&Adapter<'_>, f32)]) -> Result<(), EngineError> {
        self.set_raw_adapters(
            adapters.iter().map(|(a, _)| a.raw()).collect(),
            adapters.iter().map(|(_, s)| *s).collect(),
        )
    }

    /// The model's own adapters plus `adapters`, for the next decodes (a server that applies
    /// one of several adapters per request, over the adapters every request gets).
    ///
    /// # Errors
    /// If llama.cpp refuses them.
    pub fn set_adapters_over_defaults(
        &mut self,
        adapters: &[(&Adapter<'_>, f32)],
    ) -> Result<(), EngineError> {
        let (mut ptrs, mut scales): (Vec<_>, Vec<_>) = self.defaults.iter().copied().unzip();
        ptrs.extend(adapters.iter().map(|(a, _)| a.raw()));
        scales.extend(adapters.iter().map(|(_, s)| *s));
        self.set_raw_adapters(ptrs, scales)
    }

    /// Sets adapters of this context's model (`ptrs` and `scales` of the same length).
    fn set_raw_adapters(
        &mut self,
        mut ptrs: Vec<*mut llama_cpp_sys_2::llama_adapter_lora>,
        mut scales: Vec<f32>,
    ) -> Result<(), EngineError> {
        debug_assert_eq!(ptrs.len(), scales.len());
        // SAFETY: both arrays hold `ptrs.len()` entries; the adapters belong to this context's
        // model and outlive the call (llama.cpp keeps pointers to them: they are either the
        // model's own, freed with it, or `Adapter`s that the caller keeps loaded while the
        // context uses them, since they borrow the model).
        let code = unsafe {
            llama_cpp_sys_2::llama_set_adapters_lora(
                self.raw.as_ptr(),
                if ptrs.is_empty() {
                    std::ptr::null_mut()
                } else {
                    ptrs.as_mut_ptr()
                },
                ptrs.len(),
                if scales.is_empty() {
                    std::ptr::null_mut()
                } else {
                    scales.as_mut_ptr()
                },
            )
        };
        if code != 0 {
            return Err(EngineError::SetAdapters {
                code,
                log: take_log(),
            });
        }
        Ok(())
    }
}

fn pos(p: Option<u32>) -> i32 {
    p.map_or(-1, |p| i32::try_from(p).unwrap_or(i32::MAX))
}

/// Tokens to evaluate together, each at a position in one or more sequences.
#[derive(Debug)]
pub struct Batch {
    raw: llama_cpp_sys_2::llama_batch,
    capacity: usize,
    n_seq_max: usize,
    len: usize,
}

// SAFETY: the batch owns its arrays; nothing else points into them.
unsafe impl Send for Batch {}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: allocated by llama_batch_init, freed once.
        unsafe { llama_cpp_sys_2::llama_batch_free(self.raw) }
    }
}

impl Batch {
    /// A batch of up to `capacity` tokens, each in up to `n_seq_max` sequences.
    #[must_use]
    pub fn new(capacity: usize, n_seq_max: usize) -> Self {
        let capacity = capacity.max(1);
        // SAFETY: allocates arrays of `capacity` entries (and `n_seq_max` ids per entry).
        let raw = unsafe {
            llama_cpp_sys_2::llama_batch_init(
                i32::try_from(capacity).expect("batch capacity fits in i32"),
                0,
                i32::try_from(n_seq_max.max(1)).expect("sequence count fits in i32"),
            )
        };
        Batch {
            raw,
            capacity,
            n_seq_max: n_seq_max.max(1),
            len: 0,
        }
    }

    /// Empties the batch.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Tokens in the batch.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the batch is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most tokens it holds.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Adds a token at `pos` of the sequences `seqs`; `logits` keeps its logits. Returns its row.
    ///
    /// # Errors
    /// When the batch is full or `seqs` is empty or too long.
    pub fn add(
        &mut self,
        token: Token,
        pos: u32,
        seqs: &[i32],
        logits: bool,
    ) -> Result<usize, EngineError> {
        if self.len == self.capacity {
            return Err(EngineError::Batch(format!(
                "full ({} tokens)",
                self.capacity
            )));
        }
        if seqs.is_empty() || seqs.len() > self.n_seq_max {
            return Err(EngineError::Batch(format!(
                "a token needs 1 to {} sequence ids, got {}",
                self.n_seq_max,
                seqs.len()
            )));
        }
        let i = self.len;
        // SAFETY: `i` < capacity, the size llama_batch_init allocated each array with, and
        // `seq_id[i]` has room for n_seq_max ids.
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = i32::try_from(pos).unwrap_or(i32::MAX);
            *self.raw.n_seq_id.add(i) = seqs.len() as i32;
            let ids = *self.raw.seq_id.add(i);
            for (k, &s) in seqs.iter().enumerate() {
                *ids.add(k) = s;
            }
            *self.raw.logits.add(i) = i8::from(logits);
        }
        self.len += 1;
        Ok(i)
    }
}

/// A context holding one sequence, and the tokens in it.
#[derive(Debug)]
pub struct Session<'m> {
    ctx: Context<'m>,
    batch: Batch,
    tokens: Vec<Token>,
    all_logits: bool,
}

impl<'m> Session<'m> {
    pub(crate) fn new(ctx: Context<'m>, all_logits: bool) -> Self {
        let n_batch = ctx.n_batch();
        Session {
            batch: Batch::new(n_batch, 1),
            ctx,
            tokens: Vec::new(),
            all_logits,
        }
    }

    /// Context size in tokens.
    #[must_use]
    pub fn n_ctx(&self) -> usize {
        self.ctx.n_ctx()
    }

    /// Tokens per evaluated batch.
    #[must_use]
    pub fn n_batch(&self) -> usize {
        self.ctx.n_batch()
    }

    /// The tokens in the KV cache, in order.
    #[must_use]
    pub fn tokens(&self) -> &[Token] {
        &self.tokens
    }

    /// The underlying context (e.g. to set LoRA adapters).
    pub fn context(&mut self) -> &mut Context<'m> {
        &mut self.ctx
    }

    /// Drops everything after the first `len` tokens from the KV cache.
    pub fn truncate(&mut self, len: usize) {
        if len < self.tokens.len() {
            // Removing a suffix of the only sequence cannot fail for a plain KV cache; if it
            // does (a model whose memory cannot be cut), start over from an empty cache.
            if self.ctx.seq_rm(0, Some(len as u32), None) {
                self.tokens.truncate(len);
            } else {
                self.ctx.clear();
                self.tokens.clear();
            }
        }
    }

    /// Makes the cache hold exactly `tokens`, evaluating only what differs from what it holds,
    /// and re-evaluating at least the last token so that its logits are fresh.
    ///
    /// # Errors
    /// If the tokens do not fit in the context or llama.cpp fails.
    pub fn sync(&mut self, tokens: &[Token]) -> Result<(), EngineError> {
        let common = self
            .tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count();
        let keep = common.min(tokens.len().saturating_sub(1));
        self.truncate(keep);
        self.eval(&tokens[self.tokens.len()..], false)
    }

    /// Appends tokens to the cache and evaluates them, in batches of the context's batch size.
    /// Afterwards [`Self::logits`] gives the last token's logits (and, when `all_logits` was set
    /// for the session or `want_all` here, those of every token of the last batch).
    ///
    /// # Errors
    /// If the tokens do not fit in the context or llama.cpp fails.
    pub fn eval(&mut self, tokens: &[Token], want_all: bool) -> Result<(), EngineError> {
        let n_ctx = self.n_ctx();
        if self.tokens.len() + tokens.len() > n_ctx {
            return Err(EngineError::ContextFull {
                needed: self.tokens.len() + tokens.len(),
                n_ctx: n_ctx as u32,
            });
        }
        let all = self.all_logits || want_all;
        for chunk in tokens.chunks(self.batch.capacity()) {
            self.batch.clear();
            let start = self.tokens.len();
            for (i, &t) in chunk.iter().enumerate() {
                let last = i + 1 == chunk.len();
                self.batch.add(t, (start + i) as u32, &[0], all || last)?;
            }
            self.ctx.decode(&self.batch)?;
            self.tokens.extend_from_slice(chunk);
        }
        Ok(())
    }

    /// Logits of the `i`-th token of the last evaluated batch (`None` = its last token).
    ///
    /// # Panics
    /// If that token's logits were not kept (see [`Self::eval`]).
    #[must_use]
    pub fn logits(&self, i: Option<usize>) -> &[f32] {
        self.ctx
            .logits(i.unwrap_or_else(|| self.batch.len().saturating_sub(1)))
    }

    /// Samples the next token from the last evaluated token's logits (without evaluating it).
    pub fn sample(&mut self, sampler: &mut Sampler) -> Token {
        sampler.sample(self.logits(None))
    }
}
