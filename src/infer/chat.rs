//! `falcon-infer chat`: a conversation in the model's own format: its chat template
//! (`tokenizer.chat_template`), else its family's (Falcon-7B/40B-instruct's `User:`/`Assistant:`,
//! Falcon-180B-chat's `System:`/`User:`/`Falcon:`), rendered as transformers renders it (see
//! [`crate::serve::template`]); `--chat-template` overrides.
//!
//! Each answer stops at the format's stop strings (the next `User:` turn) or end-of-text. The
//! history is kept within the context window: when the next prompt plus room for an answer does
//! not fit, the oldest turns are dropped. The KV cache is reused for the unchanged prefix of the
//! conversation.

use crate::engine::{Model, Token};
use crate::serve::template::{ChatMessage, ChatTemplate, TemplateError, TemplateSpec};

/// The conversation so far.
#[derive(Debug, Default, Clone)]
pub struct History {
    /// Optional system message.
    pub system: Option<String>,
    /// (user, answer) turns.
    pub turns: Vec<(String, String)>,
}

impl History {
    /// The messages for a new user message, starting from turn `from`.
    #[must_use]
    pub fn messages(&self, from: usize, message: &str) -> Vec<ChatMessage> {
        let mut m = Vec::new();
        if let Some(sys) = &self.system {
            m.push(ChatMessage::new("system", sys.trim()));
        }
        for (u, a) in &self.turns[from..] {
            m.push(ChatMessage::new("user", u.trim()));
            m.push(ChatMessage::new("assistant", a.trim()));
        }
        m.push(ChatMessage::new("user", message.trim()));
        m
    }
}

/// A special token's text, from the GGUF's id for it (`tokenizer.ggml.eos_token_id`, ...).
#[must_use]
pub fn special_text(model: &Model<'_>, key: &str) -> Option<String> {
    let id: Token = model.meta(key)?.trim().parse().ok()?;
    (id >= 0 && (id as usize) < model.n_vocab())
        .then(|| String::from_utf8_lossy(&model.token_bytes(id)).into_owned())
}

/// The model's chat template: `spec` when given, else the GGUF's `tokenizer.chat_template`, else
/// the Falcon family's format for the model's name.
///
/// # Errors
/// A template that does not compile, or a file that cannot be read.
pub fn template(
    model: &Model<'_>,
    spec: Option<&TemplateSpec>,
) -> Result<ChatTemplate, TemplateError> {
    ChatTemplate::select(
        spec,
        model.meta("tokenizer.chat_template").as_deref(),
        model.meta("general.name").as_deref(),
        special_text(model, "tokenizer.ggml.bos_token_id"),
        special_text(model, "tokenizer.ggml.eos_token_id"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::template::{Family, TemplateOrigin};

    #[test]
    fn turns_render_in_each_family_format() {
        let mut h = History {
            system: Some("Be brief.".into()),
            turns: Vec::new(),
        };
        h.turns.push(("Hi".into(), " Hello!".into()));
        let instruct = ChatTemplate::family(
            Family::FalconInstruct,
            TemplateOrigin::Named(Family::FalconInstruct),
            None,
            Some("<|endoftext|>".into()),
        );
        let text = instruct.render(&h.messages(0, "Bye"), true).unwrap();
        assert!(text.contains("User: Hi\nAssistant: Hello!"), "{text:?}");
        assert!(text.ends_with("User: Bye\nAssistant:"), "{text:?}");
        assert!(text.starts_with("Be brief."), "{text:?}");
        let chat = ChatTemplate::family(
            Family::Falcon180bChat,
            TemplateOrigin::Named(Family::Falcon180bChat),
            None,
            Some("<|endoftext|>".into()),
        );
        let text = chat.render(&h.messages(1, "Bye"), true).unwrap();
        assert_eq!(text, "System: Be brief.\nUser: Bye\nFalcon:");
    }
}
