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
