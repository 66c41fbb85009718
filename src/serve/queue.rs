//! The only link between the HTTP side and the batching loop: a bounded queue of [`Job`]s, and
//! for each job its own bounded channel of [`Event`]s back.
//!
//! The contract, for the loop:
//! - Take a job from [`Jobs`] only when it can start (enough free sequence slots for `job.n`):
//!   what stays in the queue is what `--max-queue` counts, and `/metrics` reports.
//! - Send events with `try_send`, never blocking the batch on one client: on `Full`, keep the
//!   event and leave that sequence out of the next step (a slow reader slows only itself); on
//!   `Closed` (the client went away, or the server is cutting requests at shutdown), drop the
//!   job's sequences and free their KV cells at once. [`Job::is_cancelled`] says the same
//!   without sending.
//! - Per sequence: zero or more [`Event::Token`], then exactly one [`Event::Finished`]. A failure
//!   that ends the whole job is one [`Event::Failed`] instead of the remaining events.
//! - When every [`Queue`] handle is dropped (shutdown), `Jobs` yields `None` once the queue is
//!   empty; the loop then finishes the running sequences and returns.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::mpsc;

use super::params::GenerationParams;
use crate::engine::Token;

/// Events buffered per sequence of a job before the loop holds that sequence back.
pub const EVENTS_PER_SEQUENCE: usize = 128;

/// A served LoRA adapter, by its index in the list the server was started with (`--lora
/// NAME=PATH`, in order); `None` in [`Job::adapter`] is the base model alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AdapterId(pub usize);

/// One prompt to run, as `n` sequences that share it (OpenAI's `n`; the loop may decode the
/// prompt once and share its KV cells).
#[derive(Debug)]
pub struct Job {
    /// Unique within the process, for logs.
    pub id: u64,
    /// Tokenized, truncated and checked against the context: `prompt.len() +
    /// params.max_new_tokens` fits in one sequence's context, and the prompt is not empty.
    pub prompt: Vec<Token>,
    /// Sequences to generate from the prompt, `1..=` the server's slot count.
    pub n: u32,
    pub params: GenerationParams,
    pub adapter: Option<AdapterId>,
    pub events: mpsc::Sender<Event>,
    /// When validation queued it (queue time and time to first token start here).
    pub queued_at: Instant,
}

impl Job {
    /// A job and the receiver of its events.
    #[must_use]
    pub fn new(
        prompt: Vec<Token>,
        n: u32,
        params: GenerationParams,
        adapter: Option<AdapterId>,
    ) -> (Job, mpsc::Receiver<Event>) {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let (tx, rx) = mpsc::channel(EVENTS_PER_SEQUENCE * n.max(1) as usize);
        let job = Job {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            prompt,
            n,
            params,
            adapter,
            events: tx,
            queued_at: Instant::now(),
        };
        (job, rx)
    }

    /// The client is gone (its event receiver was dropped): stop and free the sequences.
    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }
}

/// What the loop reports for a job.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Sequence `seq` (`0..job.n`) generated a token.
    Token { seq: u32, token: GeneratedToken },
    /// Sequence `seq` is done; no more events for it.
    Finished { seq: u32, finish: Finish },
    /// The job failed as a whole; no more events for it.
    Failed(GenerationError),
}

/// One generated token, decoded (see [`crate::serve::text::Detokenizer`], which the loop runs
/// per sequence to fill `text` and `output`).
#[derive(Clone, Debug, PartialEq)]
pub struct GeneratedToken {
    pub id: Token,
    /// The token's bytes (special tokens as their text).
    pub bytes: Vec<u8>,
    /// The text this token completes: its bytes plus any left over from earlier tokens that
    /// split a UTF-8 character, up to the last whole character (so possibly empty). TGI's
    /// `token.text`; its `generated_text` is the concatenation over non-special tokens, stop
    /// sequence included.
    pub text: String,
    /// What this token adds to the visible output (OpenAI's text): never any special token's
    /// text, never any part of a stop string, and held back while it might still become one.
    pub output: String,
    /// Natural log of the token's probability under the model (the log-softmax of the raw
    /// logits, before penalties, temperature and truncation).
    pub logprob: f32,
    pub special: bool,
    /// The `params.top_logprobs` most probable tokens at this step, most probable first, on the
    /// same scale as `logprob`.
    pub top: Vec<TopLogprob>,
}

/// An alternative token at one step.
#[derive(Clone, Debug, PartialEq)]
pub struct TopLogprob {
    pub id: Token,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub special: bool,
}

/// How a sequence ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Finish {
    pub reason: FinishReason,
    /// Tokens generated, the last one (end-of-generation token or the one completing a stop
    /// string) included.
    pub generated_tokens: u32,
    /// Bytes of a UTF-8 character left incomplete at the end, decoded lossily (usually empty);
    /// belongs after the last token's `text`.
    pub text_tail: String,
    /// Output held back at the end (a partial stop string that never completed, plus
    /// `text_tail`); belongs after the last token's `output`.
    pub output_tail: String,
}

/// Why a sequence stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// The model generated an end-of-generation token.
    EndOfSequence,
    /// The output contains this stop string.
    StopSequence(String),
}

/// A failure while generating.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GenerationError {
    /// The KV cache has no room left for this job's sequences.
    #[error("the KV cache is full ({cells} cells): retry later or with a shorter request")]
    KvCacheFull { cells: usize },
    /// A remote (RPC) worker holding some of the model's layers stopped answering.
    #[error("the RPC worker at {host} stopped answering: {why}")]
    WorkerLost { host: String, why: String },
    /// The server is stopping and cut the request.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Any other failure of the engine.
    #[error("generation failed: {0}")]
    Engine(String),
}

/// Why a job was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("{0} requests are already waiting")]
    Full(usize),
    #[error("the server is shutting down")]
    Closed,
}

/// The HTTP side's end of the queue.
#[derive(Clone, Debug)]
pub struct Queue {
    tx: mpsc::Sender<Job>,
    max_waiting: usize,
}

/// The batching loop's end of the queue.
#[derive(Debug)]
pub struct Jobs {
    rx: mpsc::Receiver<Job>,
}

/// A queue holding at most `max_waiting` (at least 1) jobs not yet taken by the loop.
#[must_use]
pub fn queue(max_waiting: usize) -> (Queue, Jobs) {
    let max_waiting = max_waiting.max(1);
    let (tx, rx) = mpsc::channel(max_waiting);
    (Queue { tx, max_waiting }, Jobs { rx })
}

impl Queue {
    /// Queues a job, or refuses it at once when `max_waiting` jobs are waiting.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SubmitError::Full(self.max_waiting),
            mpsc::error::TrySendError::Closed(_) => SubmitError::Closed,
        })
    }

    /// Jobs waiting for the loop.
    #[must_use]
    pub fn waiting(&self) -> usize {
        self.max_waiting - self.tx.capacity()
    }

    #[must_use]
    pub fn max_waiting(&self) -> usize {
        self.max_waiting
    }
}

impl Jobs {
    /// The next job, waiting for one (from the loop's own thread, outside any async runtime);
    /// `None` once the queue is closed and empty.
    pub fn blocking_next(&mut self) -> Option<Job> {
        self.rx.blocking_recv()
    }

    /// The next job if one is waiting.
    pub fn try_next(&mut self) -> Result<Job, mpsc::error::TryRecvError> {
        self.rx.try_recv()
    }

    /// The next job, from async code.
    pub async fn next(&mut self) -> Option<Job> {
        self.rx.recv().await
    }

    /// Jobs waiting.
    #[must_use]
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Refuses new jobs from now on; those already queued can still be taken.
    pub fn close(&mut self) {
        self.rx.close();
    }
}

/// Whether the server can serve: set by the loop when the model stops working (e.g. an RPC
/// worker was lost), read by `/health`.
#[derive(Debug, Default)]
pub struct Health {
    failure: Mutex<Option<String>>,
}

impl Health {
    /// Marks the server unhealthy, with a reason for `/health` and the log.
    pub fn set_failed(&self, why: impl Into<String>) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.into());
    }

    /// Marks the server healthy again.
    pub fn clear(&self) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The reason the server is unhealthy, if it is.
    #[must_use]
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::params::Sampling;

    fn params() -> GenerationParams {
        GenerationParams {
            sampling: Sampling::greedy(),
            max_new_tokens: 4,
            stop: Vec::new(),
            top_logprobs: 0,
        }
    }

    #[test]
    fn queue_refuses_beyond_max_waiting_and_counts_waiting() {
        let (q, mut jobs) = queue(2);
        let mut receivers = Vec::new();
        for _ in 0..2 {
            let (job, rx) = Job::new(vec![1, 2], 1, params(), None);
            q.submit(job).unwrap();
            receivers.push(rx);
        }
        assert_eq!(q.waiting(), 2);
        let (job, _rx) = Job::new(vec![1], 1, params(), None);
        assert_eq!(q.submit(job).unwrap_err(), SubmitError::Full(2));
        let first = jobs.try_next().unwrap();
        assert_eq!(first.prompt, vec![1, 2]);
        assert_eq!(q.waiting(), 1);
        let (job, _rx) = Job::new(vec![1], 1, params(), None);
        q.submit(job).unwrap();
        drop(jobs);
        let (job, _rx) = Job::new(vec![1], 1, params(), None);
        assert_eq!(q.submit(job).unwrap_err(), SubmitError::Closed);
    }

    #[test]
    fn dropping_the_receiver_cancels_the_job() {
        let (job, rx) = Job::new(vec![1], 2, params(), Some(AdapterId(0)));
        assert!(!job.is_cancelled());
        drop(rx);
        assert!(job.is_cancelled());
        let e = job
            .events
            .try_send(Event::Failed(GenerationError::ShuttingDown));
        assert!(matches!(e, Err(mpsc::error::TrySendError::Closed(_))));
    }

    #[test]
    fn job_ids_are_unique() {
        let (a, _ra) = Job::new(vec![1], 1, params(), None);
        let (b, _rb) = Job::new(vec![1], 1, params(), None);
        assert_ne!(a.id, b.id);
    }

    #[test]
    fn health_reports_the_failure() {
        let h = Health::default();
        assert_eq!(h.failure(), None);
        h.set_failed("the RPC worker at 10.0.0.2:50052 stopped answering");
        assert!(h.failure().unwrap().contains("10.0.0.2:50052"));
        h.clear();
        assert_eq!(h.failure(), None);
    }
}
