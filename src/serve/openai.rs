//! The OpenAI API: `async-openai`'s request and response types, with llama.cpp's sampling
//! extras beside them, and the pieces that turn generated tokens into OpenAI answers.

use async_openai::types::chat::{
    ChatChoiceLogprobs, ChatCompletionRequestAssistantMessageContent,
    ChatCompletionRequestAssistantMessageContentPart, ChatCompletionRequestDeveloperMessageContent,
    ChatCompletionRequestDeveloperMessageContentPart, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessageContent, ChatCompletionRequestSystemMessageContentPart,
    ChatCompletionRequestToolMessageContent, ChatCompletionRequestToolMessageContentPart,
    ChatCompletionRequestUserMessageContent, ChatCompletionRequestUserMessageContentPart,
    ChatCompletionTokenLogprob, CompletionFinishReason, CompletionUsage,
    CreateChatCompletionRequest, FinishReason as ChatFinishReason, Logprobs, TopLogprobs,
};
use async_openai::types::completions::CreateCompletionRequest;
use serde::Deserialize;

use super::queue::{Finish, FinishReason, GeneratedToken};
use super::template::ChatMessage;

/// llama.cpp's sampling parameters that OpenAI's API lacks, accepted beside it as
/// llama-server accepts them.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct LlamaExtras {
    /// Keep the k most probable tokens; `0` or less = off.
    #[serde(default)]
    pub top_k: Option<i32>,
    /// Drop tokens less probable than `min_p` times the most probable one; `0` = off.
    #[serde(default)]
    pub min_p: Option<f32>,
    /// Multiplicative repetition penalty; `1` = off.
    #[serde(default)]
    pub repeat_penalty: Option<f32>,
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatCompletionRequest {
    #[serde(flatten)]
    pub request: CreateChatCompletionRequest,
    #[serde(flatten)]
    pub extras: LlamaExtras,
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub request: CreateCompletionRequest,
    #[serde(flatten)]
    pub extras: LlamaExtras,
}

/// Why a message cannot be given to a chat template.
#[derive(Debug, PartialEq, Eq)]
pub struct UnsupportedPart {
    /// e.g. `messages[2].content[0]`
    pub param: String,
    pub kind: &'static str,
}

/// A request message as chat templates see it: its role, and its text (text parts joined, as
/// TGI joins them). `developer` is OpenAI's newer name for `system`.
pub fn template_message(
    i: usize,
    m: &ChatCompletionRequestMessage,
) -> Result<ChatMessage, UnsupportedPart> {
    use ChatCompletionRequestMessage as M;
    let unsupported = |j: usize, kind: &'static str| UnsupportedPart {
        param: format!("messages[{i}].content[{j}]"),
        kind,
    };
    let (role, content, name) = match m {
        M::Developer(m) => (
            "system",
            match &m.content {
                ChatCompletionRequestDeveloperMessageContent::Text(t) => t.clone(),
                ChatCompletionRequestDeveloperMessageContent::Array(parts) => parts
                    .iter()
                    .map(
                        |ChatCompletionRequestDeveloperMessageContentPart::Text(t)| t.text.as_str(),
                    )
                    .collect(),
            },
            m.name.clone(),
        ),
        M::System(m) => (
            "system",
            match &m.content {
                ChatCompletionRequestSystemMessageContent::Text(t) => t.clone(),
                ChatCompletionRequestSystemMessageContent::Array(parts) => parts
                    .iter()
                    .map(|ChatCompletionRequestSystemMessageContentPart::Text(t)| t.text.as_str())
                    .collect(),
            },
            m.name.clone(),
        ),
        M::User(m) => (
            "user",
            match &m.content {
                ChatCompletionRequestUserMessageContent::Text(t) => t.clone(),
                ChatCompletionRequestUserMessageContent::Array(parts) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match p {
                            ChatCompletionRequestUserMessageContentPart::Text(t) => {
                                text.push_str(&t.text);
                            }
                            ChatCompletionRequestUserMessageContentPart::ImageUrl(_) => {
                                return Err(unsupported(j, "image"));
                            }
                            ChatCompletionRequestUserMessageContentPart::InputAudio(_) => {
                                return Err(unsupported(j, "audio"));
                            }
                            ChatCompletionRequestUserMessageContentPart::File(_) => {
                                return Err(unsupported(j, "file"));
                            }
                        }
                    }
                    text
                }
            },
            m.name.clone(),
        ),
        M::Assistant(m) => (
            "assistant",
            match &m.content {
                None => String::new(),
                Some(ChatCompletionRequestAssistantMessageContent::Text(t)) => t.clone(),
                Some(ChatCompletionRequestAssistantMessageContent::Array(parts)) => parts
                    .iter()
                    .map(|p| match p {
                        ChatCompletionRequestAssistantMessageContentPart::Text(t) => {
                            t.text.as_str()
                        }
                        ChatCompletionRequestAssistantMessageContentPart::Refusal(r) => {
                            r.refusal.as_str()
                        }
                    })
                    .collect(),
            },
            m.name.clone(),
        ),
        M::Tool(m) => (
            "tool",
            match &m.content {
                ChatCompletionRequestToolMessageContent::Text(t) => t.clone(),
                ChatCompletionRequestToolMessageContent::Array(parts) => parts
                    .iter()
                    .map(|ChatCompletionRequestToolMessageContentPart::Text(t)| t.text.as_str())
                    .collect(),
            },
            None,
        ),
        M::Function(m) => (
            "function",
            m.content.clone().unwrap_or_default(),
            Some(m.name.clone()),
        ),
    };
    Ok(ChatMessage {
        role: role.to_string(),
        content,
        name,
    })
}

/// OpenAI's chat `finish_reason`: `stop` for an end-of-generation token or a stop string.
#[must_use]
pub fn chat_finish_reason(r: &FinishReason) -> ChatFinishReason {
    match r {
        FinishReason::Length => ChatFinishReason::Length,
        FinishReason::EndOfSequence | FinishReason::StopSequence(_) => ChatFinishReason::Stop,
    }
}

/// OpenAI's completion `finish_reason`.
#[must_use]
pub fn completion_finish_reason(r: &FinishReason) -> CompletionFinishReason {
    match r {
        FinishReason::Length => CompletionFinishReason::Length,
        FinishReason::EndOfSequence | FinishReason::StopSequence(_) => CompletionFinishReason::Stop,
    }
}

#[must_use]
pub fn usage(prompt_tokens: u32, completion_tokens: u32) -> CompletionUsage {
    CompletionUsage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
        prompt_tokens_details: None,
        completion_tokens_details: None,
    }
}

/// The chat `logprobs` entry of a token.
#[must_use]
pub fn chat_token_logprob(t: &GeneratedToken) -> ChatCompletionTokenLogprob {
    ChatCompletionTokenLogprob {
        token: String::from_utf8_lossy(&t.bytes).into_owned(),
        logprob: t.logprob,
        bytes: Some(t.bytes.clone()),
        top_logprobs: t
            .top
            .iter()
            .map(|a| TopLogprobs {
                token: String::from_utf8_lossy(&a.bytes).into_owned(),
                logprob: a.logprob,
                bytes: Some(a.bytes.clone()),
            })
            .collect(),
    }
}

/// The chat `logprobs` of a choice.
#[must_use]
pub fn chat_logprobs(tokens: &[GeneratedToken]) -> ChatChoiceLogprobs {
    ChatChoiceLogprobs {
        content: Some(tokens.iter().map(chat_token_logprob).collect()),
        refusal: None,
    }
}

/// The legacy completion `logprobs` of tokens whose text starts `offset` characters into the
/// choice's text.
#[must_use]
pub fn completion_logprobs(tokens: &[GeneratedToken], mut offset: u32) -> Logprobs {
    let mut lp = Logprobs::default();
    for t in tokens {
        lp.tokens
            .push(String::from_utf8_lossy(&t.bytes).into_owned());
        lp.token_logprobs.push(Some(t.logprob));
        let top: serde_json::Map<String, serde_json::Value> = t
            .top
            .iter()
            .map(|a| {
                (
                    String::from_utf8_lossy(&a.bytes).into_owned(),
                    serde_json::Value::from(a.logprob),
                )
            })
            .collect();
        lp.top_logprobs.push(serde_json::Value::Object(top));
        lp.text_offset.push(offset);
        if !t.special {
            offset += u32::try_from(t.text.chars().count()).unwrap_or(u32::MAX);
        }
    }
    lp
}

/// Everything one sequence generated, for non-streaming answers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeqOutput {
    pub tokens: Vec<GeneratedToken>,
    pub finish: Option<Finish>,
}

impl SeqOutput {
    /// The visible text (OpenAI's): outputs and the held-back tail.
    #[must_use]
    pub fn output(&self) -> String {
        let mut s: String = self.tokens.iter().map(|t| t.output.as_str()).collect();
        if let Some(f) = &self.finish {
            s.push_str(&f.output_tail);
        }
        s
    }

    /// TGI's `generated_text`: the text of every non-special token, stop string included.
    #[must_use]
    pub fn text(&self) -> String {
        let mut s: String = self
            .tokens
            .iter()
            .filter(|t| !t.special)
            .map(|t| t.text.as_str())
            .collect();
        if let Some(f) = &self.finish {
            s.push_str(&f.text_tail);
        }
        s
    }

    #[must_use]
    pub fn generated_tokens(&self) -> u32 {
        self.finish.as_ref().map_or_else(
            || u32::try_from(self.tokens.len()).unwrap_or(u32::MAX),
            |f| f.generated_tokens,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::queue::TopLogprob;

    fn token(id: i32, text: &str, output: &str, special: bool) -> GeneratedToken {
        GeneratedToken {
            id,
            bytes: text.as_bytes().to_vec(),
            text: text.into(),
            output: output.into(),
            logprob: -0.25,
            special,
            top: vec![TopLogprob {
                id: 9,
                bytes: b" x".to_vec(),
                logprob: -1.5,
                special: false,
            }],
        }
    }

    #[test]
    fn messages_become_template_messages() {
        let req: ChatCompletionRequest = serde_json::from_value(serde_json::json!({
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "you"}], "name": "ann"},
                {"role": "assistant", "content": null},
                {"role": "assistant", "content": "Hi"},
            ]
        }))
        .unwrap();
        let got: Vec<ChatMessage> = req
            .request
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| template_message(i, m).unwrap())
            .collect();
        assert_eq!(got[0], ChatMessage::new("system", "Be brief."));
        assert_eq!(got[1].content, "Hello, you");
        assert_eq!(got[1].name.as_deref(), Some("ann"));
        assert_eq!(got[2], ChatMessage::new("assistant", ""));
        assert_eq!(got[3], ChatMessage::new("assistant", "Hi"));
    }

    #[test]
    fn image_parts_are_refused_by_position() {
        let req: ChatCompletionRequest = serde_json::from_value(serde_json::json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": [{"type": "text", "text": "see"},
                    {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]},
            ]
        }))
        .unwrap();
        let e = template_message(1, &req.request.messages[1]).unwrap_err();
        assert_eq!(e.param, "messages[1].content[1]");
        assert_eq!(e.kind, "image");
    }

    #[test]
    fn extras_are_read_beside_the_openai_fields() {
        let req: CompletionRequest = serde_json::from_value(serde_json::json!({
            "model": "m", "prompt": "x", "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1,
            "max_tokens": 3
        }))
        .unwrap();
        assert_eq!(req.extras.top_k, Some(40));
        assert_eq!(req.extras.min_p, Some(0.05));
        assert_eq!(req.extras.repeat_penalty, Some(1.1));
        assert_eq!(req.request.max_tokens, Some(3));
    }

    #[test]
    fn outputs_and_texts() {
        let s = SeqOutput {
            tokens: vec![
                token(1, "Hi", "Hi", false),
                token(2, "\nUs", "", false),
                token(3, "<|endoftext|>", "", true),
            ],
            finish: Some(Finish {
                reason: FinishReason::EndOfSequence,
                generated_tokens: 3,
                text_tail: String::new(),
                output_tail: "\nUs".into(),
            }),
        };
        assert_eq!(s.output(), "Hi\nUs");
        assert_eq!(s.text(), "Hi\nUs");
        assert_eq!(s.generated_tokens(), 3);
        let lp = completion_logprobs(&s.tokens, 5);
        assert_eq!(lp.text_offset, [5, 7, 10]);
        assert_eq!(lp.tokens[2], "<|endoftext|>");
        assert_eq!(lp.top_logprobs[0], serde_json::json!({" x": -1.5}));
        let chat = chat_logprobs(&s.tokens);
        let c = chat.content.unwrap();
        assert_eq!(c[0].token, "Hi");
        assert_eq!(c[0].bytes.as_deref(), Some(&b"Hi"[..]));
        assert_eq!(c[0].top_logprobs[0].token, " x");
    }

    #[test]
    fn finish_reasons() {
        assert_eq!(
            chat_finish_reason(&FinishReason::StopSequence("\n".into())),
            ChatFinishReason::Stop
        );
        assert_eq!(
            chat_finish_reason(&FinishReason::Length),
            ChatFinishReason::Length
        );
        assert_eq!(
            completion_finish_reason(&FinishReason::EndOfSequence),
            CompletionFinishReason::Stop
        );
    }
}
