//! Text Generation Inference's request and response types.
//!
//! Hand-written: TGI publishes no crate of its API types. Field names, optionality and serde
//! defaults follow TGI's `router/src/lib.rs` exactly (`GenerateRequest`, `GenerateParameters`
//! and its `default_parameters()`, `CompatGenerateRequest`, `Token`, `Details`,
//! `StreamResponse`, `StreamDetails`, `FinishReason`, `Info`), so that TGI clients
//! (`huggingface_hub.InferenceClient`, `text-generation`) read them unchanged. Note TGI's own
//! quirk, kept: `do_sample` defaults to `false` inside a given `parameters` object but to `true`
//! when `parameters` is absent.

use serde::{Deserialize, Serialize};

use super::queue::{self, GeneratedToken};

/// `POST /generate` and `POST /generate_stream`.
#[derive(Clone, Debug, Deserialize)]
pub struct GenerateRequest {
    pub inputs: String,
    #[serde(default = "default_parameters")]
    pub parameters: GenerateParameters,
}

/// `POST /`: either of the above, chosen by `stream`.
#[derive(Clone, Debug, Deserialize)]
pub struct CompatGenerateRequest {
    pub inputs: String,
    #[serde(default = "default_parameters")]
    pub parameters: GenerateParameters,
    #[serde(default)]
    pub stream: bool,
}

impl From<CompatGenerateRequest> for GenerateRequest {
    fn from(r: CompatGenerateRequest) -> Self {
        GenerateRequest {
            inputs: r.inputs,
            parameters: r.parameters,
        }
    }
}

/// TGI's generation parameters.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct GenerateParameters {
    #[serde(default)]
    pub best_of: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub typical_p: Option<f32>,
    #[serde(default)]
    pub do_sample: bool,
    #[serde(default)]
    pub max_new_tokens: Option<u32>,
    #[serde(default)]
    pub return_full_text: Option<bool>,
    #[serde(default)]
    pub stop: Vec<String>,
    #[serde(default)]
    pub truncate: Option<usize>,
    #[serde(default)]
    pub watermark: bool,
    #[serde(default)]
    pub details: bool,
    #[serde(default)]
    pub decoder_input_details: bool,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub top_n_tokens: Option<u32>,
    /// Grammar-constrained generation (`{"type": "json"|"regex"|"json_schema", "value"}`);
    /// refused here, so kept as raw JSON.
    #[serde(default)]
    pub grammar: Option<serde_json::Value>,
    #[serde(default)]
    pub adapter_id: Option<String>,
}

/// TGI's `default_parameters()`: what an absent `parameters` object means.
#[must_use]
pub fn default_parameters() -> GenerateParameters {
    GenerateParameters {
        do_sample: true,
        ..GenerateParameters::default()
    }
}

/// A generated token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Token {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    pub special: bool,
}

impl Token {
    #[must_use]
    pub fn from_generated(t: &GeneratedToken) -> Token {
        Token {
            id: u32::try_from(t.id).unwrap_or_default(),
            text: t.text.clone(),
            logprob: t.logprob,
            special: t.special,
        }
    }

    /// The alternatives of a step, as TGI's `top_tokens`.
    #[must_use]
    pub fn top_of(t: &GeneratedToken) -> Vec<Token> {
        t.top
            .iter()
            .map(|a| Token {
                id: u32::try_from(a.id).unwrap_or_default(),
                text: String::from_utf8_lossy(&a.bytes).into_owned(),
                logprob: a.logprob,
                special: a.special,
            })
            .collect()
    }
}

/// A prompt token with its log-probability (`decoder_input_details`, which this server
/// refuses: always empty).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrefillToken {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
}

/// Why generation stopped, as TGI names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Length,
    #[serde(rename = "eos_token")]
    EndOfSequenceToken,
    StopSequence,
}

impl From<&queue::FinishReason> for FinishReason {
    fn from(r: &queue::FinishReason) -> Self {
        match r {
            queue::FinishReason::Length => FinishReason::Length,
            queue::FinishReason::EndOfSequence => FinishReason::EndOfSequenceToken,
            queue::FinishReason::StopSequence(_) => FinishReason::StopSequence,
        }
    }
}

/// `details` of a `/generate` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Details {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<Token>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Vec<Token>>,
}

/// The answer of `/generate`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateResponse {
    pub generated_text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
}

/// `details` of the last `/generate_stream` event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamDetails {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub input_length: u32,
}

/// One `/generate_stream` event: a token; the last one also carries the whole text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamResponse {
    pub index: u32,
    pub token: Token,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Token>,
    pub generated_text: Option<String>,
    pub details: Option<StreamDetails>,
}

/// `GET /info`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Info {
    pub model_id: String,
    pub model_sha: Option<String>,
    pub model_pipeline_tag: Option<String>,
    pub max_concurrent_requests: usize,
    pub max_best_of: usize,
    pub max_stop_sequences: usize,
    pub max_input_tokens: usize,
    pub max_total_tokens: usize,
    pub validation_workers: usize,
    pub max_client_batch_size: usize,
    pub router: String,
    pub version: String,
    pub sha: Option<String>,
    pub docker_label: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_parameters_sample_but_given_ones_do_not() {
        let r: GenerateRequest = serde_json::from_str(r#"{"inputs": "x"}"#).unwrap();
        assert!(r.parameters.do_sample);
        let r: GenerateRequest =
            serde_json::from_str(r#"{"inputs": "x", "parameters": {"max_new_tokens": 3}}"#)
                .unwrap();
        assert!(!r.parameters.do_sample);
        assert!(!r.parameters.details);
        assert_eq!(r.parameters.max_new_tokens, Some(3));
    }

    #[test]
    fn every_parameter_huggingface_hub_sends_is_read() {
        let body = serde_json::json!({
            "inputs": "x",
            "parameters": {
                "adapter_id": "a", "best_of": 1, "decoder_input_details": false,
                "details": true, "do_sample": false, "frequency_penalty": 0.5,
                "grammar": {"type": "regex", "value": "a+"}, "max_new_tokens": 5,
                "repetition_penalty": 1.1, "return_full_text": true, "seed": 7,
                "stop": ["\n"], "temperature": 0.5, "top_k": 3, "top_n_tokens": 2,
                "top_p": 0.9, "truncate": 10, "typical_p": 0.5, "watermark": false
            },
            "stream": true
        });
        let r: CompatGenerateRequest = serde_json::from_value(body).unwrap();
        assert!(r.stream);
        let p = r.parameters;
        assert_eq!(p.adapter_id.as_deref(), Some("a"));
        assert_eq!(p.seed, Some(7));
        assert_eq!(p.top_n_tokens, Some(2));
        assert_eq!(p.truncate, Some(10));
        assert!(p.grammar.is_some());
    }

    #[test]
    fn finish_reasons_are_named_as_tgi_names_them() {
        let names: Vec<String> = [
            FinishReason::Length,
            FinishReason::EndOfSequenceToken,
            FinishReason::StopSequence,
        ]
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
        assert_eq!(
            names,
            [r#""length""#, r#""eos_token""#, r#""stop_sequence""#]
        );
    }

    #[test]
    fn stream_response_shape() {
        let e = StreamResponse {
            index: 1,
            token: Token {
                id: 5,
                text: "a".into(),
                logprob: -0.5,
                special: false,
            },
            top_tokens: Vec::new(),
            generated_text: None,
            details: None,
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"index": 1, "token": {"id": 5, "text": "a", "logprob": -0.5, "special": false},
                               "generated_text": null, "details": null})
        );
    }
}
