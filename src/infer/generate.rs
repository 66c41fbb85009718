//! Text generation: the sampling loop of one sequence, and streaming text with stop strings.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::InferError;
use crate::engine::{Model, SamplingParams, Session, Token};

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced its end-of-text token.
    EndOfText,
    /// A stop string appeared.
    Stop,
    /// The token limit was reached.
    Length,
    /// The context window is full.
    Context,
}

/// One generated continuation.
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    /// The text, cut before a stop string if one ended it.
    pub text: String,
    /// Every generated token id (the end-of-text token excluded).
    pub token_ids: Vec<Token>,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

/// Counters for the timing line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    /// Prompt tokens evaluated.
    pub prompt_tokens: usize,
    /// Time spent evaluating them.
    pub prompt_time: Duration,
    /// Tokens generated (sampled and, but for the last, evaluated).
    pub gen_tokens: usize,
    /// Time spent generating.
    pub gen_time: Duration,
}

/// Turns a stream of token bytes into text and finds stop strings in it.
///
/// Bytes are decoded incrementally, as llama.cpp's own server does: an incomplete UTF-8
/// sequence at the end is held back until the next token completes it, and bytes that can never
/// become valid UTF-8 turn into U+FFFD at once, so that a token ending inside a character that
/// never completes cannot stall the stream or hide a stop string that follows. Text that could
/// still be the start of a stop string is held back too.
#[derive(Debug)]
pub struct StopStream<'a> {
    stops: &'a [String],
    /// Decoded text so far.
    text: String,
    /// Bytes of an incomplete character at the end.
    pending: Vec<u8>,
    /// Bytes of `text` already handed out.
    emitted: usize,
}

/// Appends `bytes` to `text`, replacing invalid sequences with U+FFFD; returns the bytes of an
/// incomplete sequence at the end, which may still become valid.
fn decode_into(text: &mut String, mut bytes: &[u8]) -> Vec<u8> {
    loop {
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                text.push_str(s);
                return Vec::new();
            }
            Err(e) => {
                let (good, rest) = bytes.split_at(e.valid_up_to());
                // SAFETY-free: `valid_up_to` marks the end of valid UTF-8.
                text.push_str(std::str::from_utf8(good).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        text.push(char::REPLACEMENT_CHARACTER);
                        bytes = &rest[n..];
                    }
                    None => return rest.to_vec(),
                }
            }
        }
    }
}

impl<'a> StopStream<'a> {
    /// A stream that ends at any of `stops`.
    #[must_use]
    pub fn new(stops: &'a [String]) -> Self {
        Self {
            stops,
            text: String::new(),
            pending: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds a token's bytes. Returns the text now safe to show, and whether a stop string
    /// appeared (then the text ends just before it).
    pub fn push(&mut self, piece: &[u8]) -> (String, bool) {
        let mut bytes = std::mem::take(&mut self.pending);
        bytes.extend_from_slice(piece);
        let before = self.text.len();
        self.pending = decode_into(&mut self.text, &bytes);
        let text = &self.text;
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        // A new stop string can only end in the newly decoded text.
        let mut search_from = before.min(self.emitted).saturating_sub(longest);
        while !text.is_char_boundary(search_from) {
            search_from -= 1;
        }
        let found = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| {
                text[search_from..]
                    .find(s.as_str())
                    .map(|p| p + search_from)
            })
            .min();
        if let Some(end) = found {
            let out = text[self.emitted.min(end)..end].to_string();
            self.text.truncate(end);
            self.pending.clear();
            self.emitted = end;
            return (out, true);
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut safe = text.len();
        for s in self.stops {
            for k in (1..s.len().min(text.len() + 1)).rev() {
                if s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                    safe = safe.min(text.len() - k);
                    break;
                }
            }
        }
        let safe = safe.max(self.emitted);
        let out = text[self.emitted..safe].to_string();
        self.emitted = safe;
        (out, false)
    }

    /// Everything not yet shown (at the end of generation; an incomplete character becomes
    /// U+FFFD), and the whole text.
    pub fn finish(&mut self) -> (String, String) {
        if !self.pending.is_empty() {
            self.text.push(char::REPLACEMENT_CHARACTER);
            self.pending.clear();
        }
        let rest = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        (rest, self.text.clone())
    }
}

/// Generates one completion after `prompt` (which the session is synced to), calling `on_text`
/// with each piece of text as soon as it is safe to show. `on_text` returning an error stops
/// generation with that error.
///
/// # Errors
/// If llama.cpp fails to evaluate a token, or `on_text` fails.
#[allow(clippy::too_many_arguments)]
pub fn complete(
    model: &Model<'_>,
    session: &mut Session<'_>,
    prompt: &[Token],
    sampling: &SamplingParams,
    max_new_tokens: usize,
    stops: &[String],
    counters: &mut Counters,
    on_text: &mut dyn FnMut(&str) -> Result<(), InferError>,
) -> Result<Completion, InferError> {
    let before = session.tokens().len();
    let t0 = Instant::now();
    session.sync(prompt)?;
    let evaluated = prompt
        .len()
        .saturating_sub(before.min(prompt.len().saturating_sub(1)));
    counters.prompt_tokens += evaluated;
    counters.prompt_time += t0.elapsed();

    let mut sampler = model.sampler(sampling);
    sampler.accept(prompt);
    let mut stream = StopStream::new(stops);
    let mut ids = Vec::new();
    let t1 = Instant::now();
    let mut finish = FinishReason::Length;
    while ids.len() < max_new_tokens {
        let token = session.sample(&mut sampler);
        counters.gen_tokens += 1;
        if model.is_end(token) {
            finish = FinishReason::EndOfText;
            break;
        }
        ids.push(token);
        let (text, stopped) = stream.push(&model.token_bytes(token));
        if !text.is_empty() {
            on_text(&text)?;
        }
        if stopped {
            finish = FinishReason::Stop;
            break;
        }
        if ids.len() == max_new_tokens {
            break;
        }
        if session.tokens().len() + 1 > session.n_ctx() {
            finish = FinishReason::Context;
            break;
        }
        session.eval(&[token], false)?;
    }
    counters.gen_time += t1.elapsed();
    let (rest, text) = stream.finish();
    if !rest.is_empty() {
        on_text(&rest)?;
    }
    Ok(Completion {
        text,
        token_ids: ids,
        finish_reason: finish,
    })
}

/// Tokens per second, 0 for no time.
#[must_use]
pub fn rate(n: usize, t: Duration) -> f64 {
    if t.as_secs_f64() > 0.0 {
        n as f64 / t.as_secs_f64()
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_stream(stops: &[&str], pieces: &[&[u8]]) -> (String, String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut s = StopStream::new(&stops);
        let mut shown = String::new();
        for p in pieces {
            let (t, stop) = s.push(p);
            shown.push_str(&t);
            if stop {
                let (rest, all) = s.finish();
                shown.push_str(&rest);
                return (shown, all, true);
            }
        }
        let (rest, all) = s.finish();
        shown.push_str(&rest);
        (shown, all, false)
    }

    #[test]
    fn no_stops_passes_everything_through() {
        let (shown, all, stopped) = run_stream(&[], &[b"Hello", b", ", b"world"]);
        assert_eq!(shown, "Hello, world");
        assert_eq!(all, "Hello, world");
        assert!(!stopped);
    }

    #[test]
    fn stop_string_split_across_tokens_is_cut() {
        let (shown, all, stopped) = run_stream(&["User:"], &[b"Sure.\nUs", b"er", b": next"]);
        assert_eq!(shown, "Sure.\n");
        assert_eq!(all, "Sure.\n");
        assert!(stopped);
    }

    #[test]
    fn held_back_prefix_is_released_when_it_diverges() {
        let (shown, _, stopped) = run_stream(&["User:"], &[b"Us", b"ual"]);
        assert_eq!(shown, "Usual");
        assert!(!stopped);
    }

    #[test]
    fn split_utf8_is_held_until_complete() {
        let euro = "€".as_bytes();
        let stops: Vec<String> = Vec::new();
        let mut s = StopStream::new(&stops);
        assert_eq!(s.push(&euro[..1]).0, "");
        assert_eq!(s.push(&euro[1..]).0, "€");
    }

    #[test]
    fn a_character_that_never_completes_does_not_stall_the_stream_or_hide_a_stop() {
        // The first two bytes of "€" followed by plain text: the character never completes.
        // Before the fix the undecodable bytes stopped all later text, and the stop string with it.
        let euro = "€".as_bytes();
        let (shown, all, stopped) = run_stream(
            &["\nUser:"],
            &[&euro[..2], b" fine", b"\nUser:", b" invented turn"],
        );
        assert!(stopped, "the stop string is found after broken bytes");
        assert_eq!(shown, "\u{FFFD} fine");
        assert_eq!(all, "\u{FFFD} fine");
    }

    #[test]
    fn an_incomplete_character_at_the_end_becomes_a_replacement() {
        let euro = "€".as_bytes();
        let (shown, all, stopped) = run_stream(&[], &[b"ok ", &euro[..2]]);
        assert!(!stopped);
        assert_eq!(shown, "ok \u{FFFD}");
        assert_eq!(all, shown);
    }
}
