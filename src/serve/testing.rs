//! Test support: the fixtures' real tokenizer behind [`Tokenize`], and stand-ins for the
//! batching loop that keep its contract (see [`super::queue`]) without a model.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::params::GenerationParams;
use super::queue::{Event, Finish, FinishReason, GeneratedToken, Health, Jobs, Queue, TopLogprob};
use super::template::{ChatTemplate, Family, TemplateOrigin};
use super::text::Detokenizer;
use super::validation::{Limits, ModelCard, Tokenize, Validator};
use crate::engine::Token;

/// `models/tiny-7b-style`'s tokenizer (Falcon's pre-tokenizer, 1024 tokens, ids 0..=11
/// special), through Hugging Face's `tokenizers`.
pub struct HfVocab(tokenizers::Tokenizer);

pub const EOT: Token = 11;

impl HfVocab {
    pub fn load() -> HfVocab {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-7b-style/tokenizer.json");
        HfVocab(tokenizers::Tokenizer::from_file(path).expect("fixture tokenizer"))
    }
}

impl Tokenize for HfVocab {
    fn tokenize(&self, text: &str, add_special: bool, _parse_special: bool) -> Vec<Token> {
        self.0
            .encode(text, add_special)
            .expect("encodes")
            .get_ids()
            .iter()
            .map(|&i| i as Token)
            .collect()
    }

    fn token_bytes(&self, token: Token) -> Option<Vec<u8>> {
        let id = u32::try_from(token).ok()?;
        self.0.id_to_token(id)?;
        Some(self.0.decode(&[id], false).ok()?.into_bytes())
    }

    fn is_special(&self, token: Token) -> bool {
        (0..=EOT).contains(&token)
    }

    fn n_vocab(&self) -> usize {
        self.0.get_vocab_size(true)
    }
}

/// A validator for `tiny-7b-style` with the Falcon-instruct template.
pub fn validator(n_ctx: u32, slots: u32, adapters: &[&str]) -> Validator {
    Validator {
        vocab: Arc::new(HfVocab::load()),
        template: Arc::new(ChatTemplate::family(
            Family::FalconInstruct,
            TemplateOrigin::Named(Family::FalconInstruct),
            None,
            Some("<|endoftext|>".into()),
        )),
        limits: Limits::new(n_ctx, slots),
        model: ModelCard {
            id: "tiny-7b-style".into(),
            adapters: adapters.iter().map(|s| s.to_string()).collect(),
            created: 1_700_000_000,
        },
    }
}

/// What the echo loop generates for a prompt: the prompt's tokens again, in order, cycling,
/// `max_new_tokens` of them; the end-of-text token ends a sequence as an end-of-generation
/// token does. Greedy sequences are all the same, as a model's are; when sampling, sequence
/// `seq` starts `seq` tokens into the prompt, so that choices differ.
pub fn echo_tokens(prompt: &[Token], seq: u32, params: &GenerationParams) -> Vec<Token> {
    let offset = if params.sampling.is_greedy() {
        0
    } else {
        seq as usize
    };
    (0..params.max_new_tokens as usize)
        .map(|k| prompt[(k + offset) % prompt.len()])
        .collect()
}

/// Runs one sequence of the echo loop into events, as the real loop must: a
/// [`Detokenizer`] per sequence, stop strings and end-of-generation tokens honoured.
pub fn echo_sequence(
    vocab: &dyn Tokenize,
    prompt: &[Token],
    seq: u32,
    params: &GenerationParams,
) -> Vec<Event> {
    let mut d = Detokenizer::new(params.stop.clone());
    let mut events = Vec::new();
    let mut n = 0;
    let mut reason = FinishReason::Length;
    for (k, id) in echo_tokens(prompt, seq, params).into_iter().enumerate() {
        n += 1;
        let bytes = vocab.token_bytes(id).unwrap_or_default();
        let special = vocab.is_special(id);
        let piece = d.push(&bytes, special);
        // The chosen token is the most probable, as under greedy decoding.
        let logprob = -0.1 * (k as f32 + 1.0);
        let top = (0..params.top_logprobs)
            .map(|j| {
                let alt = if j == 0 { id } else { (id + j as Token) % 1024 };
                TopLogprob {
                    id: alt,
                    bytes: vocab.token_bytes(alt).unwrap_or_default(),
                    logprob: logprob - j as f32,
                    special: vocab.is_special(alt),
                }
            })
            .collect();
        events.push(Event::Token {
            seq,
            token: GeneratedToken {
                id,
                bytes,
                text: piece.text,
                output: piece.output,
                logprob,
                special,
                top,
            },
        });
        if let Some(s) = piece.stop {
            reason = FinishReason::StopSequence(s);
            break;
        }
        if id == EOT {
            reason = FinishReason::EndOfSequence;
            break;
        }
    }
    let (text_tail, output_tail) = d.finish();
    events.push(Event::Finished {
        seq,
        finish: Finish {
            reason,
            generated_tokens: n,
            text_tail,
            output_tail,
        },
    });
    events
}

/// A loop on its own thread that answers every job with [`echo_sequence`] (sequences
/// interleaved token by token, as a batch would).
pub fn echo_loop(mut jobs: Jobs, vocab: Arc<dyn Tokenize>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while let Some(job) = jobs.blocking_next() {
            let per_seq: Vec<Vec<Event>> = (0..job.n)
                .map(|s| echo_sequence(vocab.as_ref(), &job.prompt, s, &job.params))
                .collect();
            let longest = per_seq.iter().map(Vec::len).max().unwrap_or(0);
            'job: for step in 0..longest {
                for seq in &per_seq {
                    if let Some(e) = seq.get(step) {
                        if job.events.blocking_send(e.clone()).is_err() {
                            break 'job;
                        }
                    }
                }
            }
        }
    })
}

/// A loop that takes one job at a time, sends one token of each sequence, then holds the job
/// until its client goes away, and reports each cancellation it sees.
pub fn holding_loop(
    mut jobs: Jobs,
    cancelled: std::sync::mpsc::Sender<u64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while let Some(job) = jobs.blocking_next() {
            for seq in 0..job.n {
                let _ = job.events.try_send(Event::Token {
                    seq,
                    token: GeneratedToken {
                        id: 42,
                        bytes: b"x".to_vec(),
                        text: "x".into(),
                        output: "x".into(),
                        logprob: -0.5,
                        special: false,
                        top: Vec::new(),
                    },
                });
            }
            while !job.is_cancelled() {
                std::thread::sleep(Duration::from_millis(2));
            }
            let _ = cancelled.send(job.id);
        }
    })
}

/// A server state over `validator` with a queue of `max_queue`.
pub fn state(validator: Validator, max_queue: usize) -> (Arc<super::http::AppState>, Jobs, Queue) {
    let (queue, jobs) = super::queue::queue(max_queue);
    let st = super::http::AppState::new(
        validator,
        queue.clone(),
        Arc::new(super::metrics::Metrics::new()),
        Arc::new(Health::default()),
    );
    (st, jobs, queue)
}
