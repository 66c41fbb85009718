//! Text generation: sampling loop, streaming with stop strings, and the default command.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;

use super::{GenerateConfig, MemoryUse, Prepared};
use crate::engine::{Model, SamplingParams, Session, Token};

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced its end-of-text token.
    EndOfText,
    /// A `--stop` string appeared.
    Stop,
    /// `--max-new-tokens` were generated.
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

/// Turns a stream of token bytes into text, holding back incomplete UTF-8 and anything that
/// could still become a stop string.
#[derive(Debug)]
pub struct StopStream<'a> {
    stops: &'a [String],
    bytes: Vec<u8>,
    emitted: usize,
}

impl<'a> StopStream<'a> {
    /// A stream that ends at any of `stops`.
    #[must_use]
    pub fn new(stops: &'a [String]) -> Self {
        Self {
            stops,
            bytes: Vec::new(),
            emitted: 0,
        }
    }

    /// The text decodable so far (complete UTF-8 characters only).
    fn text(&self) -> &str {
        match std::str::from_utf8(&self.bytes) {
            Ok(s) => s,
            // SAFETY-free: `valid_up_to` marks a char boundary of valid UTF-8.
            Err(e) => std::str::from_utf8(&self.bytes[..e.valid_up_to()]).unwrap_or_default(),
        }
    }

    /// Adds a token's bytes. Returns the text now safe to show, and whether a stop string
    /// appeared (then the text ends just before it).
    pub fn push(&mut self, piece: &[u8]) -> (String, bool) {
        self.bytes.extend_from_slice(piece);
        let text = self.text();
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        // A new stop string can only start in the region not yet shown or just before it.
        let mut search_from = self.emitted.saturating_sub(longest);
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
            self.bytes.truncate(end);
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

    /// Everything not yet shown (at the end of generation), and the whole text.
    pub fn finish(&mut self) -> (String, String) {
        let text = String::from_utf8_lossy(&self.bytes).into_owned();
        let rest = text.get(self.emitted..).unwrap_or_default().to_string();
        self.emitted = self.bytes.len();
        (rest, text)
    }
}

/// Generates one completion after `prompt` (which the session is synced to), calling `on_text`
/// with each piece of text as soon as it is safe to show.
///
/// # Errors
/// If llama.cpp fails to evaluate a token.
#[allow(clippy::too_many_arguments)]
pub fn complete(
    model: &Model<'_>,
    session: &mut Session<'_>,
    prompt: &[Token],
    sampling: &SamplingParams,
    max_new_tokens: usize,
    stops: &[String],
    counters: &mut Counters,
    on_text: &mut dyn FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<Completion> {
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

#[derive(Debug, Serialize)]
struct JsonTimings {
    load_s: f64,
    prompt_tokens: usize,
    prompt_s: f64,
    prompt_tokens_per_s: f64,
    generated_tokens: usize,
    generate_s: f64,
    generated_tokens_per_s: f64,
    memory: Vec<MemoryUse>,
}

#[derive(Debug, Serialize)]
struct JsonOutput<'a> {
    model: String,
    prompt: &'a str,
    prompt_ids: &'a [Token],
    seed: u32,
    completions: Vec<Completion>,
    timings: JsonTimings,
}

fn rate(n: usize, t: Duration) -> f64 {
    if t.as_secs_f64() > 0.0 {
        n as f64 / t.as_secs_f64()
    } else {
        0.0
    }
}

/// The default command: generate from a prompt, stream or print JSON.
///
/// # Errors
/// Model resolution, loading, a prompt longer than the context, or evaluation failures.
pub fn run(cfg: &GenerateConfig) -> anyhow::Result<()> {
    let prepared = Prepared::new(&cfg.model, &cfg.load, cfg.verbose)?;
    let (model, load_time) = prepared.load()?;
    let mut session = prepared.session(&model)?;
    let prompt_ids = model.tokenize(&cfg.prompt, true);
    if prompt_ids.is_empty() {
        bail!("the prompt is empty; give some text with --prompt, --prompt-file or stdin");
    }
    if prompt_ids.len() >= session.n_ctx() {
        bail!(
            "the prompt is {} tokens but the context holds {} (--ctx-size); shorten the prompt \
             or raise --ctx-size (the model was trained with {})",
            prompt_ids.len(),
            session.n_ctx(),
            model.n_ctx_train()
        );
    }
    let mut counters = Counters::default();
    let mut completions = Vec::new();
    let stdout = std::io::stdout();
    for i in 0..cfg.num_return_sequences {
        let mut sampling = cfg.sampling.clone();
        sampling.seed = cfg.sampling.seed.wrapping_add(i as u32);
        let mut out = stdout.lock();
        let mut on_text = |s: &str| -> anyhow::Result<()> {
            if !cfg.json {
                out.write_all(s.as_bytes()).context("writing to stdout")?;
                out.flush().context("writing to stdout")?;
            }
            Ok(())
        };
        if !cfg.json {
            if cfg.num_return_sequences > 1 {
                on_text(&format!(
                    "--- sequence {} of {} ---\n",
                    i + 1,
                    cfg.num_return_sequences
                ))?;
            }
            on_text(&cfg.prompt)?;
        }
        let c = complete(
            &model,
            &mut session,
            &prompt_ids,
            &sampling,
            cfg.max_new_tokens,
            &cfg.stop,
            &mut counters,
            &mut on_text,
        )?;
        if !cfg.json {
            on_text("\n")?;
        }
        completions.push(c);
    }
    let memory = super::memory_use(&model);
    if cfg.json {
        let doc = JsonOutput {
            model: prepared.gguf.display().to_string(),
            prompt: &cfg.prompt,
            prompt_ids: &prompt_ids,
            seed: cfg.sampling.seed,
            completions,
            timings: JsonTimings {
                load_s: load_time.as_secs_f64(),
                prompt_tokens: counters.prompt_tokens,
                prompt_s: counters.prompt_time.as_secs_f64(),
                prompt_tokens_per_s: rate(counters.prompt_tokens, counters.prompt_time),
                generated_tokens: counters.gen_tokens,
                generate_s: counters.gen_time.as_secs_f64(),
                generated_tokens_per_s: rate(counters.gen_tokens, counters.gen_time),
                memory,
            },
        };
        let mut out = stdout.lock();
        serde_json::to_writer_pretty(&mut out, &doc).context("writing JSON to stdout")?;
        writeln!(out).context("writing to stdout")?;
    } else {
        eprintln!(
            "load {:.2} s | prompt {} tokens, {:.1} tokens/s | generated {} tokens, {:.1} tokens/s | {}",
            load_time.as_secs_f64(),
            counters.prompt_tokens,
            rate(counters.prompt_tokens, counters.prompt_time),
            counters.gen_tokens,
            rate(counters.gen_tokens, counters.gen_time),
            super::format_memory(&memory),
        );
    }
    Ok(())
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
}
