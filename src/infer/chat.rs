//! `falcon-infer chat`: a conversation in Falcon-instruct's format
//!
//! ```text
//! {system}
//! User: {message}
//! Falcon: {answer}
//! User: ...
//! Falcon:
//! ```
//!
//! Each answer stops at the next `User:` turn (or end-of-text). The history is kept within the
//! context window: when the next prompt plus room for an answer does not fit, the oldest turns
//! are dropped. The KV cache is reused for the unchanged prefix of the conversation.

use std::io::{BufRead, Write};

use anyhow::Context as _;

use super::generate::{complete, Counters};
use super::{ChatConfig, Prepared};

/// The conversation so far.
#[derive(Debug, Default, Clone)]
pub struct History {
    /// Optional first line.
    pub system: Option<String>,
    /// (user, answer) turns.
    pub turns: Vec<(String, String)>,
}

impl History {
    /// The prompt for a new user message, starting from turn `from`.
    #[must_use]
    pub fn prompt(&self, from: usize, message: &str) -> String {
        let mut s = String::new();
        if let Some(sys) = &self.system {
            s.push_str(sys.trim());
            s.push('\n');
        }
        for (u, a) in &self.turns[from..] {
            s.push_str(&format!("User: {}\nFalcon: {}\n", u.trim(), a.trim()));
        }
        s.push_str(&format!("User: {}\nFalcon:", message.trim()));
        s
    }
}

/// The `chat` command: reads one message per line from stdin until EOF.
///
/// # Errors
/// Loading failures or I/O errors.
pub fn run(c: &ChatConfig) -> anyhow::Result<()> {
    let g = &c.gen;
    let prepared = Prepared::new(&g.model, &g.load, g.verbose)?;
    let (model, _) = prepared.load()?;
    let mut session = prepared.session(&model)?;
    let n_ctx = session.n_ctx();
    let mut stops = g.stop.clone();
    stops.push("User:".into());
    let reserve = g.max_new_tokens.min(n_ctx / 2);
    let mut history = History {
        system: c.system.clone(),
        turns: Vec::new(),
    };
    let mut first = 0;
    let stdin = std::io::stdin();
    let mut counters = Counters::default();
    eprintln!("chat with the model; an empty line or end of input (Ctrl-D) ends the conversation");
    loop {
        eprint!("User: ");
        std::io::stderr().flush().ok();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).context("reading stdin")? == 0
            || line.trim().is_empty()
        {
            break;
        }
        // Drop the oldest turns until the prompt and room for an answer fit.
        let ids = loop {
            let ids = model.tokenize(&history.prompt(first, &line), true);
            if ids.len() + reserve <= n_ctx || first == history.turns.len() {
                break ids;
            }
            first += 1;
        };
        if ids.len() >= n_ctx {
            eprintln!(
                "error: this message is {} tokens with the system line; the context holds {n_ctx} \
                 (--ctx-size). Send something shorter.",
                ids.len()
            );
            continue;
        }
        let mut out = std::io::stdout().lock();
        write!(out, "Falcon:").ok();
        let mut on_text = |s: &str| -> anyhow::Result<()> {
            out.write_all(s.as_bytes()).context("writing to stdout")?;
            out.flush().context("writing to stdout")
        };
        let mut sampling = g.sampling.clone();
        sampling.seed = g.sampling.seed.wrapping_add(history.turns.len() as u32);
        let answer = complete(
            &model,
            &mut session,
            &ids,
            &sampling,
            g.max_new_tokens,
            &stops,
            &mut counters,
            &mut on_text,
        )?;
        writeln!(out).ok();
        history
            .turns
            .push((line.trim().to_string(), answer.text.trim().to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_format() {
        let mut h = History {
            system: Some("Be brief.".into()),
            turns: Vec::new(),
        };
        assert_eq!(h.prompt(0, "Hi"), "Be brief.\nUser: Hi\nFalcon:");
        h.turns.push(("Hi".into(), " Hello!".into()));
        assert_eq!(
            h.prompt(0, "Bye"),
            "Be brief.\nUser: Hi\nFalcon: Hello!\nUser: Bye\nFalcon:"
        );
        assert_eq!(h.prompt(1, "Bye"), "Be brief.\nUser: Bye\nFalcon:");
    }
}
