//! Raw request bodies → checked generation requests, before anything is queued.
//!
//! Each API has its entry point ([`Validator::chat`], [`Validator::completion`],
//! [`Validator::generate`]); each returns either everything the HTTP side needs to queue jobs
//! and shape the answer, or an [`ApiError`] in the API's own shape that names the offending
//! field and the limit. Malformed JSON and missing or wrongly typed fields are reported with
//! the field's path (`messages[1].content`), found by `serde_path_to_error`.

use std::sync::Arc;

use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::{Api, ApiError, ErrorKind};
use super::openai::{self, ChatCompletionRequest, CompletionRequest, LlamaExtras};
use super::params::{GenerationParams, Sampling, REPEAT_LAST_N};
use super::queue::AdapterId;
use super::template::{ChatMessage, ChatTemplate};
use super::tgi;
use crate::engine::Token;

/// The model's tokenizer, as validation and `/tokenize` use it (the engine's model implements
/// it; tests use Hugging Face's `tokenizers`).
pub trait Tokenize: Send + Sync {
    /// Token ids of `text`; `add_special` adds BOS/EOS where the model asks for them,
    /// `parse_special` reads special tokens written in the text (`<|endoftext|>`) as such.
    fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<Token>;
    /// The bytes a token stands for (special tokens as their text); `None` outside the
    /// vocabulary.
    fn token_bytes(&self, token: Token) -> Option<Vec<u8>>;
    /// Whether the token is a special (control) token.
    fn is_special(&self, token: Token) -> bool;
    fn n_vocab(&self) -> usize;
}

/// The server's limits on requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Tokens one sequence holds: prompt plus generated tokens.
    pub n_ctx: u32,
    /// Most sequences per prompt (OpenAI's `n`): the server's slot count.
    pub max_n: u32,
    /// Most prompts in one `/v1/completions` request.
    pub max_prompts: usize,
    /// Most stop strings per request (OpenAI's and TGI's limit: 4).
    pub max_stop: usize,
    /// Longest stop string, in bytes.
    pub max_stop_bytes: usize,
    /// Most alternatives per token: chat `top_logprobs` (OpenAI: 20).
    pub max_top_logprobs: u32,
    /// Most alternatives per token: completion `logprobs` (OpenAI: 5).
    pub max_completion_logprobs: u32,
    /// Most alternatives per token: TGI's `top_n_tokens` (TGI's default: 5).
    pub max_top_n_tokens: u32,
    /// `/v1/completions`' `max_tokens` when not given (OpenAI's default: 16).
    pub completion_default_max_tokens: u32,
}

impl Limits {
    /// The limits of a server whose sequences hold `n_ctx` tokens each, with `slots` of them.
    #[must_use]
    pub fn new(n_ctx: u32, slots: u32) -> Limits {
        Limits {
            n_ctx,
            max_n: slots.max(1),
            max_prompts: 16,
            max_stop: 4,
            max_stop_bytes: 256,
            max_top_logprobs: 20,
            max_completion_logprobs: 5,
            max_top_n_tokens: 5,
            completion_default_max_tokens: 16,
        }
    }
}

/// What is served: the model's name and its adapters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelCard {
    /// The name clients see (`/v1/models`, `model` in answers, TGI's `model_id`).
    pub id: String,
    /// Adapter names, in the order of [`AdapterId`]s.
    pub adapters: Vec<String>,
    /// Unix seconds, for `/v1/models`.
    pub created: u64,
}

impl ModelCard {
    /// Which adapter an OpenAI `model` field asks for: an adapter's name picks it; the base
    /// model's name, an empty name, or (when no adapter is served) any name picks the base.
    pub fn adapter_for_model(&self, model: &str) -> Result<Option<AdapterId>, ApiError> {
        if let Some(i) = self.adapters.iter().position(|a| a == model) {
            return Ok(Some(AdapterId(i)));
        }
        if self.adapters.is_empty() || model.is_empty() || model == self.id {
            return Ok(None);
        }
        Err(ApiError::new(
            Api::OpenAi,
            StatusCode::NOT_FOUND,
            ErrorKind::NotFound,
            format!(
                "the model `{model}` does not exist: this server serves {}",
                self.names().join(", ")
            ),
        )
        .with_param("model")
        .with_code("model_not_found"))
    }

    /// Which adapter TGI's `adapter_id` asks for (absent or the base model's name: none).
    pub fn adapter_for_id(&self, id: Option<&str>) -> Result<Option<AdapterId>, ApiError> {
        match id {
            None => Ok(None),
            Some(id) if id == self.id || id.is_empty() => Ok(None),
            Some(id) => match self.adapters.iter().position(|a| a == id) {
                Some(i) => Ok(Some(AdapterId(i))),
                None => Err(ApiError::invalid(
                    Api::Tgi,
                    "adapter_id",
                    if self.adapters.is_empty() {
                        format!("`adapter_id` {id:?} is not served: this server has no adapters")
                    } else {
                        format!(
                            "`adapter_id` {id:?} is not served: the adapters are {}",
                            self.adapters.join(", ")
                        )
                    },
                )),
            },
        }
    }

    /// The base model's name, then the adapters'.
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        std::iter::once(self.id.clone())
            .chain(self.adapters.iter().cloned())
            .collect()
    }

    /// The name an answer reports for an adapter choice.
    #[must_use]
    pub fn name_of(&self, adapter: Option<AdapterId>) -> String {
        adapter
            .and_then(|AdapterId(i)| self.adapters.get(i).cloned())
            .unwrap_or_else(|| self.id.clone())
    }
}

/// A tokenized prompt with its own generation budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompt {
    pub tokens: Vec<Token>,
    /// The prompt's text (the rendered chat template for chat requests), for `echo` and
    /// `return_full_text`.
    pub text: String,
    /// New tokens allowed: the request's, or what the context leaves.
    pub max_new_tokens: u32,
}

/// A checked `/v1/chat/completions` request.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidChat {
    /// Reported back as `model`.
    pub model: String,
    pub prompt: Prompt,
    pub n: u32,
    pub params: GenerationParams,
    pub adapter: Option<AdapterId>,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
}

/// A checked `/v1/completions` request: one job per prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidCompletion {
    pub model: String,
    pub prompts: Vec<Prompt>,
    pub n: u32,
    pub params: GenerationParams,
    pub adapter: Option<AdapterId>,
    pub stream: bool,
    pub include_usage: bool,
    /// Alternatives per token when `logprobs` was asked for.
    pub logprobs: Option<u32>,
    pub echo: bool,
}

/// A checked TGI request.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidGenerate {
    pub prompt: Prompt,
    pub params: GenerationParams,
    pub adapter: Option<AdapterId>,
    pub details: bool,
    pub return_full_text: bool,
    pub stream: bool,
    /// The seed reported in `details` (none when decoding greedily).
    pub seed: Option<u64>,
}

/// Checks requests against the model and the limits.
pub struct Validator {
    pub vocab: Arc<dyn Tokenize>,
    pub template: Arc<ChatTemplate>,
    pub limits: Limits,
    pub model: ModelCard,
}

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validator")
            .field("template", &self.template)
            .field("limits", &self.limits)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// Which of TGI's routes: `stream` fixed by the route, or read from the body (`POST /`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TgiRoute {
    Generate,
    GenerateStream,
    Compat,
}

impl Validator {
    /// `POST /v1/chat/completions`.
    #[allow(deprecated)] // `max_tokens`, `seed`, `user`, `functions`: still sent by clients
    pub fn chat(&self, body: &[u8]) -> Result<ValidChat, ApiError> {
        let api = Api::OpenAi;
        let ChatCompletionRequest { request: r, extras } = parse_openai(api, body)?;
        if r.messages.is_empty() {
            return Err(ApiError::invalid(
                api,
                "messages",
                "`messages` must hold at least one message",
            ));
        }
        for (param, given) in [
            ("tools", r.tools.as_ref().is_some_and(|t| !t.is_empty())),
            (
                "functions",
                r.functions.as_ref().is_some_and(|f| !f.is_empty()),
            ),
            ("function_call", r.function_call.is_some()),
            ("audio", r.audio.is_some()),
            ("prediction", r.prediction.is_some()),
            ("web_search_options", r.web_search_options.is_some()),
            (
                "logit_bias",
                r.logit_bias.as_ref().is_some_and(|b| !b.is_empty()),
            ),
            (
                "response_format",
                r.response_format
                    .as_ref()
                    .is_some_and(|f| !matches!(f, async_openai::types::chat::ResponseFormat::Text)),
            ),
            (
                "modalities",
                r.modalities.as_ref().is_some_and(|m| {
                    m.iter()
                        .any(|m| !matches!(m, async_openai::types::chat::ResponseModalities::Text))
                }),
            ),
        ] {
            if given {
                return Err(unsupported(api, param));
            }
        }
        let n = self.check_n(api, r.n)?;
        let logprobs = r.logprobs.unwrap_or(false);
        let top_logprobs = u32::from(r.top_logprobs.unwrap_or(0));
        if top_logprobs > 0 && !logprobs {
            return Err(ApiError::invalid(
                api,
                "top_logprobs",
                "`top_logprobs` needs `logprobs` set to true",
            ));
        }
        at_most(
            api,
            "top_logprobs",
            top_logprobs,
            self.limits.max_top_logprobs,
        )?;
        let stream = r.stream.unwrap_or(false);
        let include_usage = stream_usage(api, stream, r.stream_options.as_ref())?;
        let mut stop = self.check_stop(api, r.stop.as_ref())?;
        for s in self.template.stop() {
            if !stop.contains(s) {
                stop.push(s.clone());
            }
        }
        let sampling = self.openai_sampling(
            api,
            r.temperature,
            r.top_p,
            r.presence_penalty,
            r.frequency_penalty,
            r.seed,
            &extras,
        )?;
        let max_tokens = match (r.max_completion_tokens, r.max_tokens) {
            (Some(m), _) => Some(("max_completion_tokens", m)),
            (None, Some(m)) => Some(("max_tokens", m)),
            (None, None) => None,
        };
        let adapter = self.model.adapter_for_model(&r.model)?;

        let mut messages: Vec<ChatMessage> = Vec::with_capacity(r.messages.len());
        for (i, m) in r.messages.iter().enumerate() {
            messages.push(openai::template_message(i, m).map_err(|u| {
                ApiError::invalid(
                    api,
                    &u.param,
                    format!(
                        "`{}`: {} content is not supported: this model reads text only",
                        u.param, u.kind
                    ),
                )
                .with_code("unsupported_value")
            })?);
        }
        let text = self.template.render(&messages, true).map_err(|e| {
            ApiError::invalid(api, "messages", e.to_string()).with_code("invalid_chat")
        })?;
        // The template writes the special tokens itself, as with transformers'
        // `apply_chat_template(tokenize=True)`.
        let tokens = self.vocab.tokenize(&text, false, true);
        let prompt = self.fit(api, "messages", tokens, text, max_tokens, None)?;
        Ok(ValidChat {
            model: self.model.name_of(adapter),
            n,
            params: GenerationParams {
                sampling,
                max_new_tokens: prompt.max_new_tokens,
                stop,
                top_logprobs: if logprobs { top_logprobs } else { 0 },
            },
            prompt,
            adapter,
            stream,
            include_usage,
            logprobs,
        })
    }

    /// `POST /v1/completions`.
    pub fn completion(&self, body: &[u8]) -> Result<ValidCompletion, ApiError> {
        use async_openai::types::chat::Prompt as P;
        let api = Api::OpenAi;
        let CompletionRequest { request: r, extras } = parse_openai(api, body)?;
        if r.suffix.is_some() {
            return Err(unsupported(api, "suffix"));
        }
        if r.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(unsupported(api, "logit_bias"));
        }
        let n = self.check_n(api, r.n)?;
        if r.best_of.is_some_and(|b| u32::from(b) != n) {
            return Err(ApiError::invalid(
                api,
                "best_of",
                "`best_of` other than `n` is not supported: every generated choice is returned",
            )
            .with_code("unsupported_value"));
        }
        let logprobs = r.logprobs.map(u32::from);
        if let Some(k) = logprobs {
            at_most(api, "logprobs", k, self.limits.max_completion_logprobs)?;
        }
        let echo = r.echo.unwrap_or(false);
        if echo && logprobs.is_some() {
            return Err(ApiError::invalid(
                api,
                "echo",
                "`echo` with `logprobs` is not supported: the prompt's log-probabilities are not computed",
            )
            .with_code("unsupported_value"));
        }
        let stream = r.stream.unwrap_or(false);
        let include_usage = stream_usage(api, stream, r.stream_options.as_ref())?;
        let stop = self.check_stop(api, r.stop.as_ref())?;
        let sampling = self.openai_sampling(
            api,
            r.temperature,
            r.top_p,
            r.presence_penalty,
            r.frequency_penalty,
            r.seed,
            &extras,
        )?;
        let adapter = self.model.adapter_for_model(&r.model)?;
        let max_tokens = r.max_tokens.map(|m| ("max_tokens", m));
        let default = Some(self.limits.completion_default_max_tokens);

        // Each prompt as (param path, tokens, text).
        let mut raw: Vec<(String, Vec<Token>, String)> = Vec::new();
        let from_text = |param: String, text: &String| {
            (param, self.vocab.tokenize(text, true, true), text.clone())
        };
        match &r.prompt {
            P::String(s) => raw.push(from_text("prompt".into(), s)),
            P::StringArray(v) => {
                for (i, s) in v.iter().enumerate() {
                    raw.push(from_text(format!("prompt[{i}]"), s));
                }
            }
            P::IntegerArray(ids) => raw.push(self.prompt_of_ids(api, "prompt".into(), ids)?),
            P::ArrayOfIntegerArray(v) => {
                for (i, ids) in v.iter().enumerate() {
                    raw.push(self.prompt_of_ids(api, format!("prompt[{i}]"), ids)?);
                }
            }
        }
        if raw.is_empty() {
            return Err(ApiError::invalid(
                api,
                "prompt",
                "`prompt` must hold at least one prompt",
            ));
        }
        if raw.len() > self.limits.max_prompts {
            return Err(ApiError::invalid(
                api,
                "prompt",
                format!(
                    "`prompt` holds {} prompts, more than the limit of {}",
                    raw.len(),
                    self.limits.max_prompts
                ),
            )
            .with_code("invalid_value"));
        }
        let prompts = raw
            .into_iter()
            .map(|(param, tokens, text)| self.fit(api, &param, tokens, text, max_tokens, default))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ValidCompletion {
            model: self.model.name_of(adapter),
            n,
            params: GenerationParams {
                sampling,
                max_new_tokens: prompts[0].max_new_tokens,
                stop,
                top_logprobs: logprobs.unwrap_or(0),
            },
            prompts,
            adapter,
            stream,
            include_usage,
            logprobs,
            echo,
        })
    }

    /// TGI's `POST /generate`, `/generate_stream` and `/`, checked as TGI's `validation.rs`
    /// checks them, with TGI's messages.
    pub fn generate(&self, body: &[u8], route: TgiRoute) -> Result<ValidGenerate, ApiError> {
        let api = Api::Tgi;
        let (req, stream) = match route {
            TgiRoute::Compat => {
                let r: tgi::CompatGenerateRequest = parse_body(api, body)?;
                let stream = r.stream;
                (tgi::GenerateRequest::from(r), stream)
            }
            TgiRoute::Generate => (parse_body(api, body)?, false),
            TgiRoute::GenerateStream => (parse_body(api, body)?, true),
        };
        let tgi::GenerateRequest { inputs, parameters } = req;
        let p = parameters;
        let invalid = |param: &str, msg: String| ApiError::invalid(api, param, msg);
        if p.best_of.is_some_and(|b| b != 1) {
            return Err(invalid(
                "best_of",
                "`best_of` != 1 is not allowed for this endpoint".into(),
            ));
        }
        let temperature = p.temperature.unwrap_or(1.0);
        if temperature <= 0.0 {
            return Err(invalid(
                "temperature",
                "`temperature` must be strictly positive".into(),
            ));
        }
        let repetition_penalty = p.repetition_penalty.unwrap_or(1.0);
        if repetition_penalty <= 0.0 {
            return Err(invalid(
                "repetition_penalty",
                "`repetition_penalty` must be strictly positive".into(),
            ));
        }
        let frequency_penalty = p.frequency_penalty.unwrap_or(0.0);
        if !(-2.0..=2.0).contains(&frequency_penalty) {
            return Err(invalid(
                "frequency_penalty",
                "`frequency_penalty` must be >= -2.0 and <= 2.0".into(),
            ));
        }
        if p.top_p.is_some_and(|v| v <= 0.0 || v >= 1.0) {
            return Err(invalid("top_p", "`top_p` must be > 0.0 and < 1.0".into()));
        }
        if p.typical_p.is_some_and(|v| v <= 0.0 || v >= 1.0) {
            return Err(invalid(
                "typical_p",
                "`typical_p` must be > 0.0 and < 1.0".into(),
            ));
        }
        if p.top_k.is_some_and(|k| k <= 0) {
            return Err(invalid("top_k", "`top_k` must be strictly positive".into()));
        }
        if p.max_new_tokens == Some(0) {
            return Err(invalid(
                "max_new_tokens",
                "`max_new_tokens` must be strictly positive".into(),
            ));
        }
        if p.stop.len() > self.limits.max_stop {
            return Err(invalid(
                "stop",
                format!(
                    "`stop` supports up to {} stop sequences. Given: {}",
                    self.limits.max_stop,
                    p.stop.len()
                ),
            ));
        }
        let stop = self.check_stop_strings(api, &p.stop)?;
        let top_n_tokens = p.top_n_tokens.unwrap_or(0);
        if top_n_tokens > self.limits.max_top_n_tokens {
            return Err(invalid(
                "top_n_tokens",
                format!(
                    "`top_n_tokens` must be >= 0 and <= {}. Given: {top_n_tokens}",
                    self.limits.max_top_n_tokens
                ),
            ));
        }
        if inputs.is_empty() {
            return Err(invalid("inputs", "`inputs` cannot be empty".into()));
        }
        let max_input = self.limits.n_ctx.saturating_sub(1) as usize;
        if let Some(t) = p.truncate {
            if t == 0 || t > max_input {
                return Err(invalid(
                    "truncate",
                    format!("`truncate` must be strictly positive and less than {max_input}. Given: {t}"),
                ));
            }
        }
        // What TGI accepts but this server cannot do.
        if p.typical_p.is_some() {
            return Err(invalid(
                "typical_p",
                "`typical_p` is not supported by this server".into(),
            ));
        }
        if p.watermark {
            return Err(invalid(
                "watermark",
                "`watermark` is not supported by this server".into(),
            ));
        }
        if p.decoder_input_details {
            return Err(invalid(
                "decoder_input_details",
                "`decoder_input_details` is not supported by this server: prompt log-probabilities are not computed".into(),
            ));
        }
        if p.grammar.is_some() {
            return Err(invalid("grammar", "grammar is not supported".into()));
        }
        let adapter = self.model.adapter_for_id(p.adapter_id.as_deref())?;

        // TGI samples when asked to or when any warper is set; otherwise it decodes greedily.
        let sampling = p.do_sample
            || p.temperature.is_some_and(|t| t != 1.0)
            || p.top_k.is_some()
            || p.top_p.is_some();
        let seed = sampling.then(|| p.seed.unwrap_or_else(rand::random));
        let mut tokens = self.vocab.tokenize(&inputs, true, true);
        if let Some(t) = p.truncate {
            // TGI keeps the end of the input.
            let cut = tokens.len().saturating_sub(t);
            tokens.drain(..cut);
        }
        let input_length = tokens.len();
        if input_length == 0 {
            return Err(invalid("inputs", "`inputs` cannot be empty".into()));
        }
        let n_ctx = self.limits.n_ctx as usize;
        let max_new_tokens = match p.max_new_tokens {
            Some(m) => m,
            None => u32::try_from(n_ctx.saturating_sub(input_length)).unwrap_or(u32::MAX),
        };
        if input_length + max_new_tokens as usize > n_ctx {
            return Err(invalid(
                "max_new_tokens",
                format!("`inputs` tokens + `max_new_tokens` must be <= {n_ctx}. Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`"),
            ));
        }
        if input_length > max_input {
            return Err(invalid(
                "inputs",
                format!("`inputs` must have less than {max_input} tokens. Given: {input_length}"),
            ));
        }
        let params = GenerationParams {
            sampling: Sampling {
                temperature: if sampling { temperature } else { 0.0 },
                top_k: if sampling { p.top_k.unwrap_or(0) } else { 0 },
                top_p: if sampling {
                    p.top_p.unwrap_or(1.0)
                } else {
                    1.0
                },
                min_p: 0.0,
                repeat_penalty: repetition_penalty,
                repeat_last_n: REPEAT_LAST_N,
                frequency_penalty,
                presence_penalty: 0.0,
                seed: seed.unwrap_or(0),
            },
            max_new_tokens,
            stop,
            top_logprobs: top_n_tokens,
        };
        Ok(ValidGenerate {
            prompt: Prompt {
                tokens,
                text: inputs,
                max_new_tokens,
            },
            params,
            adapter,
            details: p.details,
            return_full_text: p.return_full_text.unwrap_or(false),
            stream,
            seed,
        })
    }

    fn check_n(&self, api: Api, n: Option<u8>) -> Result<u32, ApiError> {
        let n = u32::from(n.unwrap_or(1));
        if n == 0 || n > self.limits.max_n {
            return Err(ApiError::invalid(
                api,
                "n",
                format!(
                    "`n` must be between 1 and {} (the server's parallel sequences); given {n}",
                    self.limits.max_n
                ),
            )
            .with_code("invalid_value"));
        }
        Ok(n)
    }

    fn check_stop(
        &self,
        api: Api,
        stop: Option<&async_openai::types::chat::StopConfiguration>,
    ) -> Result<Vec<String>, ApiError> {
        use async_openai::types::chat::StopConfiguration as S;
        let stop: Vec<String> = match stop {
            None => Vec::new(),
            Some(S::String(s)) => vec![s.clone()],
            Some(S::StringArray(v)) => v.clone(),
        };
        if stop.len() > self.limits.max_stop {
            return Err(ApiError::invalid(
                api,
                "stop",
                format!(
                    "`stop` holds {} strings, more than the limit of {}",
                    stop.len(),
                    self.limits.max_stop
                ),
            )
            .with_code("invalid_value"));
        }
        self.check_stop_strings(api, &stop)
    }

    fn check_stop_strings(&self, api: Api, stop: &[String]) -> Result<Vec<String>, ApiError> {
        for (i, s) in stop.iter().enumerate() {
            let param = format!("stop[{i}]");
            if s.is_empty() {
                return Err(ApiError::invalid(
                    api,
                    &param,
                    format!("`{param}` is empty: stop strings must hold at least one character"),
                )
                .with_code("invalid_value"));
            }
            if s.len() > self.limits.max_stop_bytes {
                return Err(ApiError::invalid(
                    api,
                    &param,
                    format!(
                        "`{param}` is {} bytes long, more than the limit of {}",
                        s.len(),
                        self.limits.max_stop_bytes
                    ),
                )
                .with_code("invalid_value"));
            }
        }
        Ok(stop.to_vec())
    }

    #[allow(clippy::too_many_arguments)]
    fn openai_sampling(
        &self,
        api: Api,
        temperature: Option<f32>,
        top_p: Option<f32>,
        presence_penalty: Option<f32>,
        frequency_penalty: Option<f32>,
        seed: Option<i64>,
        extras: &LlamaExtras,
    ) -> Result<Sampling, ApiError> {
        let temperature = within(api, "temperature", temperature, 0.0, 2.0, 1.0)?;
        let top_p = within(api, "top_p", top_p, 0.0, 1.0, 1.0)?;
        let presence_penalty = within(api, "presence_penalty", presence_penalty, -2.0, 2.0, 0.0)?;
        let frequency_penalty =
            within(api, "frequency_penalty", frequency_penalty, -2.0, 2.0, 0.0)?;
        let min_p = within(api, "min_p", extras.min_p, 0.0, 1.0, 0.0)?;
        let top_k = extras.top_k.unwrap_or(0);
        if top_k < 0 {
            return Err(ApiError::invalid(
                api,
                "top_k",
                format!("`top_k` must be 0 (off) or more; given {top_k}"),
            )
            .with_code("invalid_value"));
        }
        let repeat_penalty = extras.repeat_penalty.unwrap_or(1.0);
        if repeat_penalty <= 0.0 || !repeat_penalty.is_finite() {
            return Err(ApiError::invalid(
                api,
                "repeat_penalty",
                format!("`repeat_penalty` must be above 0 (1 = off); given {repeat_penalty}"),
            )
            .with_code("invalid_value"));
        }
        Ok(Sampling {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            repeat_last_n: REPEAT_LAST_N,
            frequency_penalty,
            presence_penalty,
            // A negative seed keeps its 64 bits.
            seed: seed.map_or_else(rand::random, |s| s as u64),
        })
    }

    fn prompt_of_ids(
        &self,
        api: Api,
        param: String,
        ids: &[u32],
    ) -> Result<(String, Vec<Token>, String), ApiError> {
        let n_vocab = self.vocab.n_vocab();
        let mut tokens = Vec::with_capacity(ids.len());
        let mut text = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let bytes = Token::try_from(id)
                .ok()
                .filter(|_| (id as usize) < n_vocab)
                .and_then(|t| self.vocab.token_bytes(t).map(|b| (t, b)));
            let Some((t, b)) = bytes else {
                return Err(ApiError::invalid(
                    api,
                    &format!("{param}[{i}]"),
                    format!(
                        "`{param}[{i}]`: token {id} is not in the vocabulary of {n_vocab} tokens"
                    ),
                )
                .with_code("invalid_value"));
            };
            tokens.push(t);
            text.extend_from_slice(&b);
        }
        Ok((param, tokens, String::from_utf8_lossy(&text).into_owned()))
    }

    /// Checks a prompt against the context and sets its budget: the request's `max_tokens`
    /// (`requested`, with the name it was given under), else `default` capped by what the
    /// context leaves, else all the context leaves.
    fn fit(
        &self,
        api: Api,
        param: &str,
        tokens: Vec<Token>,
        text: String,
        requested: Option<(&str, u32)>,
        default: Option<u32>,
    ) -> Result<Prompt, ApiError> {
        let n_ctx = self.limits.n_ctx as usize;
        if tokens.is_empty() {
            return Err(ApiError::invalid(
                api,
                param,
                format!("`{param}` is empty: give at least one token of prompt"),
            ));
        }
        if tokens.len() >= n_ctx {
            return Err(ApiError::invalid(
                api,
                param,
                format!(
                    "the prompt has {} tokens, but a sequence holds at most {n_ctx} tokens, prompt and answer together: shorten the prompt",
                    tokens.len()
                ),
            )
            .with_code("context_length_exceeded"));
        }
        let room = u32::try_from(n_ctx - tokens.len()).unwrap_or(u32::MAX);
        let max_new_tokens = match requested {
            Some((name, 0)) => {
                return Err(ApiError::invalid(
                    api,
                    name,
                    format!("`{name}` must be at least 1"),
                )
                .with_code("invalid_value"))
            }
            Some((name, m)) if m > room => {
                return Err(ApiError::invalid(
                    api,
                    name,
                    format!(
                        "a sequence holds at most {n_ctx} tokens, but {} tokens of prompt and `{name}` {m} make {}: lower `{name}` to {room} or less, or shorten the prompt",
                        tokens.len(),
                        tokens.len() + m as usize
                    ),
                )
                .with_code("context_length_exceeded"))
            }
            Some((_, m)) => m,
            None => default.map_or(room, |d| d.min(room)),
        };
        Ok(Prompt {
            tokens,
            text,
            max_new_tokens,
        })
    }
}

/// Integer fields of OpenAI requests whose type is narrower than JSON's (`u8`): checked before
/// typed parsing so that the error names the limit.
const OPENAI_INTS: [(&str, u64); 4] = [
    ("n", u8::MAX as u64),
    ("logprobs", u8::MAX as u64),
    ("top_logprobs", u8::MAX as u64),
    ("best_of", u8::MAX as u64),
];

/// Parses a body into `T`, naming the offending field of a malformed one.
pub fn parse_body<T: DeserializeOwned>(api: Api, body: &[u8]) -> Result<T, ApiError> {
    from_value(api, parse_value(api, body, &[])?)
}

/// An OpenAI request with llama.cpp's extras beside it. The two parts are read one after the
/// other from the same JSON, not through `serde(flatten)`, which loses the path of an error.
fn parse_openai<T: OpenAiWithExtras>(api: Api, body: &[u8]) -> Result<T, ApiError> {
    let value = parse_value(api, body, &OPENAI_INTS)?;
    let extras = from_value(api, value.clone())?;
    Ok(T::join(from_value(api, value)?, extras))
}

/// The request types made of an OpenAI request and [`LlamaExtras`].
trait OpenAiWithExtras {
    type Request: DeserializeOwned;
    fn join(request: Self::Request, extras: LlamaExtras) -> Self;
}

impl OpenAiWithExtras for ChatCompletionRequest {
    type Request = async_openai::types::chat::CreateChatCompletionRequest;
    fn join(request: Self::Request, extras: LlamaExtras) -> Self {
        ChatCompletionRequest { request, extras }
    }
}

impl OpenAiWithExtras for CompletionRequest {
    type Request = async_openai::types::completions::CreateCompletionRequest;
    fn join(request: Self::Request, extras: LlamaExtras) -> Self {
        CompletionRequest { request, extras }
    }
}

/// The body as JSON: an object, with the integer fields `ints` within their limits.
fn parse_value(api: Api, body: &[u8], ints: &[(&str, u64)]) -> Result<serde_json::Value, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            api,
            StatusCode::BAD_REQUEST,
            ErrorKind::Validation,
            format!("the body is not valid JSON: {e}"),
        )
        .with_code("invalid_json")
    })?;
    if !value.is_object() {
        return Err(ApiError::new(
            api,
            data_status(api),
            ErrorKind::Validation,
            "the body must be a JSON object",
        )
        .with_code("invalid_type"));
    }
    for &(field, max) in ints {
        if let Some(v) = value.get(field).and_then(serde_json::Value::as_u64) {
            if v > max {
                return Err(ApiError::invalid(
                    api,
                    field,
                    format!("`{field}` is {v}, more than the limit of {max}"),
                )
                .with_code("invalid_value"));
            }
        }
    }
    Ok(value)
}

/// `T` from JSON, naming the offending field's path.
fn from_value<T: DeserializeOwned>(api: Api, value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        // serde names a missing field in its message and points at its parent.
        let (param, code) = match inner
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            Some(field) if path == "." => (field.to_string(), "missing_required_parameter"),
            Some(field) => (format!("{path}.{field}"), "missing_required_parameter"),
            None => (path, "invalid_type"),
        };
        let message = if param.is_empty() || param == "." {
            format!("invalid request: {inner}")
        } else {
            format!("`{param}`: {inner}")
        };
        ApiError::new(api, data_status(api), ErrorKind::Validation, message)
            .with_param(if param == "." { "" } else { &param })
            .with_code(code)
    })
}

/// The status of a well-formed body with missing or wrongly typed fields: 400 for OpenAI, 422
/// for TGI (as axum's `Json` extractor answers in TGI).
fn data_status(api: Api) -> StatusCode {
    match api {
        Api::OpenAi => StatusCode::BAD_REQUEST,
        Api::Tgi => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

fn unsupported(api: Api, param: &str) -> ApiError {
    ApiError::invalid(
        api,
        param,
        format!("`{param}` is not supported by this server"),
    )
    .with_code("unsupported_parameter")
}

fn at_most(api: Api, param: &str, v: u32, max: u32) -> Result<(), ApiError> {
    if v > max {
        return Err(ApiError::invalid(
            api,
            param,
            format!("`{param}` must be at most {max}; given {v}"),
        )
        .with_code("invalid_value"));
    }
    Ok(())
}

fn within(
    api: Api,
    param: &str,
    v: Option<f32>,
    lo: f32,
    hi: f32,
    default: f32,
) -> Result<f32, ApiError> {
    let v = v.unwrap_or(default);
    if !(lo..=hi).contains(&v) {
        return Err(ApiError::invalid(
            api,
            param,
            format!("`{param}` must be between {lo} and {hi}; given {v}"),
        )
        .with_code("invalid_value"));
    }
    Ok(v)
}

fn stream_usage(
    api: Api,
    stream: bool,
    options: Option<&async_openai::types::chat::ChatCompletionStreamOptions>,
) -> Result<bool, ApiError> {
    match options {
        Some(_) if !stream => Err(ApiError::invalid(
            api,
            "stream_options",
            "`stream_options` is only allowed when `stream` is true",
        )
        .with_code("invalid_value")),
        Some(o) => Ok(o.include_usage.unwrap_or(false)),
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::serve::testing::{validator, HfVocab};

    const N_CTX: u32 = 64;

    fn v() -> Validator {
        validator(N_CTX, 4, &["french"])
    }

    /// A request's model: the base model's name.
    const M: &str = "tiny-7b-style";

    fn chat(body: Value) -> Result<ValidChat, ApiError> {
        v().chat(body.to_string().as_bytes())
    }

    fn completion(body: Value) -> Result<ValidCompletion, ApiError> {
        v().completion(body.to_string().as_bytes())
    }

    fn generate(body: Value) -> Result<ValidGenerate, ApiError> {
        v().generate(body.to_string().as_bytes(), TgiRoute::Generate)
    }

    fn user(content: &str) -> Value {
        json!([{"role": "user", "content": content}])
    }

    /// Asserts an OpenAI error: 400 unless said, its param, a message containing `words`.
    fn openai_err(
        r: Result<impl std::fmt::Debug, ApiError>,
        param: &str,
        words: &[&str],
    ) -> ApiError {
        let e = r.expect_err("an error");
        assert_eq!(e.api, Api::OpenAi);
        let body = e.body();
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        if !param.is_empty() {
            assert_eq!(body["error"]["param"], param, "{body}");
        }
        let msg = body["error"]["message"].as_str().unwrap();
        for w in words {
            assert!(msg.contains(w), "{w:?} not in {msg:?}");
        }
        e
    }

    /// Asserts a TGI error: 422 unless said, `error_type` validation, the exact message.
    fn tgi_err(body: Value, message: &str) {
        let e = generate(body).expect_err("an error");
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY, "{message}");
        assert_eq!(
            e.body(),
            json!({"error": message, "error_type": "validation"})
        );
    }

    #[test]
    fn chat_parameters_map_onto_the_sampler() {
        let c = chat(
            json!({"model": "tiny-7b-style", "messages": user("Hi"), "temperature": 0,
                            "top_p": 0.5, "top_k": 7, "min_p": 0.1, "repeat_penalty": 1.2,
                            "presence_penalty": 0.5, "frequency_penalty": -0.5, "seed": -1,
                            "stop": "###", "n": 2, "max_completion_tokens": 5,
                            "logprobs": true, "top_logprobs": 3, "user": "ann"}),
        )
        .unwrap();
        let s = &c.params.sampling;
        assert!(s.is_greedy());
        assert_eq!((s.top_p, s.top_k, s.min_p), (0.5, 7, 0.1));
        assert_eq!(
            (s.repeat_penalty, s.presence_penalty, s.frequency_penalty),
            (1.2, 0.5, -0.5)
        );
        assert_eq!(s.seed, u64::MAX);
        assert_eq!(c.n, 2);
        assert_eq!(c.params.max_new_tokens, 5);
        assert_eq!(c.params.top_logprobs, 3);
        // The client's stop strings, then the template's.
        assert_eq!(c.params.stop, ["###", "\nUser:", "<|endoftext|>"]);
        assert_eq!(c.prompt.text, "User: Hi\nAssistant:");
        assert_eq!(
            c.prompt.tokens,
            HfVocab::load().tokenize("User: Hi\nAssistant:", false, true)
        );
        assert_eq!(c.model, "tiny-7b-style");
        assert_eq!(c.adapter, None);
    }

    #[test]
    fn chat_defaults_use_the_rest_of_the_context() {
        let c = chat(json!({"model": "french", "messages": user("Hi")})).unwrap();
        assert_eq!(c.params.sampling.temperature, 1.0, "OpenAI's default");
        assert_eq!(
            c.params.max_new_tokens as usize,
            N_CTX as usize - c.prompt.tokens.len()
        );
        assert_eq!(c.adapter, Some(AdapterId(0)));
        assert_eq!(c.model, "french");
        assert!(!c.stream && !c.include_usage && !c.logprobs);
        // `max_tokens`, the older name, counts too.
        let c = chat(json!({"model": M, "messages": user("Hi"), "max_tokens": 3})).unwrap();
        assert_eq!(c.params.max_new_tokens, 3);
    }

    #[test]
    fn chat_error_paths() {
        let m = user("Hi");
        openai_err(
            chat(json!({"model": M, "messages": []})),
            "messages",
            &["at least one"],
        );
        openai_err(
            chat(json!({"model": M, "messages": m, "n": 0})),
            "n",
            &["between 1 and 4"],
        );
        openai_err(
            chat(json!({"model": M, "messages": m, "n": 5})),
            "n",
            &["between 1 and 4", "5"],
        );
        openai_err(
            chat(json!({"model": M, "messages": m, "n": 300})),
            "n",
            &["300", "255"],
        );
        openai_err(
            chat(json!({"model": M, "messages": m, "temperature": 2.5})),
            "temperature",
            &["between 0 and 2"],
        );
        openai_err(
            chat(json!({"model": M, "messages": m, "top_p": 1.5})),
            "top_p",
            &["between 0 and 1"],
        );
        openai_err(
            chat(json!({"model": M, "messages": m, "presence_penalty": -3})),
            "presence_penalty",
            &["between -2 and 2"],
        );
        openai_err(
            chat(json!({"model": M, "messages": m, "frequency_penalty": 3})),
            "frequency_penalty",
            &["between -2 and 2"],
        );
        openai_err(
            chat(json!({"model": M, "messages": m, "top_k": -1})),
            "top_k",
            &["0 (off) or more"],
        );
        openai_err(
            chat(json!({"model": M, "messages": m, "min_p": 2})),
            "min_p",
            &["between 0 and 1"],
        );
        openai_err(
            chat(json!({"model": M, "messages": m, "repeat_penalty": 0})),
            "repeat_penalty",
            &["above 0"],
        );
        openai_err(
            chat(json!({"model": M, "messages": m, "top_logprobs": 2})),
            "top_logprobs",
            &["`logprobs`"],
        );
        openai_err(
            chat(json!({"model": M, "messages": m, "logprobs": true, "top_logprobs": 21})),
            "top_logprobs",
            &["at most 20"],
        );
        openai_err(
            chat(json!({"model": M, "messages": m, "stop": ["a", "b", "c", "d", "e"]})),
            "stop",
            &["5 strings", "limit of 4"],
        );
        openai_err(
            chat(json!({"model": M, "messages": m, "stop": ["a", ""]})),
            "stop[1]",
            &["empty"],
        );
        openai_err(
            chat(json!({"model": M, "messages": m, "stop": "x".repeat(300)})),
            "stop[0]",
            &["300 bytes", "256"],
        );
        openai_err(
            chat(json!({"model": M, "messages": m, "stream_options": {"include_usage": true}})),
            "stream_options",
            &["`stream` is true"],
        );
        openai_err(
            chat(json!({"model": M, "messages": m, "max_tokens": 0})),
            "max_tokens",
            &["at least 1"],
        );
        let e = openai_err(
            chat(json!({"model": M, "messages": m, "max_completion_tokens": 100})),
            "max_completion_tokens",
            &["at most 64 tokens", "100"],
        );
        assert_eq!(e.code, Some("context_length_exceeded"));
        let e = openai_err(
            chat(json!({"model": M, "messages": user(&"word ".repeat(100))})),
            "messages",
            &["tokens", "at most 64"],
        );
        assert_eq!(e.code, Some("context_length_exceeded"));
        for (param, value) in [
            (
                "tools",
                json!([{"type": "function", "function": {"name": "f"}}]),
            ),
            ("logit_bias", json!({"50": 10})),
            ("response_format", json!({"type": "json_object"})),
        ] {
            let mut body = json!({"model": M, "messages": m});
            body[param] = value;
            let e = openai_err(chat(body), param, &["not supported"]);
            assert_eq!(e.code, Some("unsupported_parameter"));
        }
        // Harmless: accepted.
        chat(json!({"model": M, "messages": m, "response_format": {"type": "text"}, "tools": []}))
            .unwrap();
        openai_err(
            chat(
                json!({"model": M, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}),
            ),
            "messages[0].content[0]",
            &["image"],
        );
        // The template refuses a tool message.
        let e = openai_err(
            chat(
                json!({"model": M, "messages": [{"role": "user", "content": "a"},
                        {"role": "tool", "content": "b", "tool_call_id": "t"}]}),
            ),
            "messages",
            &["unknown role tool"],
        );
        assert_eq!(e.code, Some("invalid_chat"));
        // Adapters: an unknown name when adapters are served.
        let e = chat(json!({"model": "german", "messages": m})).unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.code, Some("model_not_found"));
        assert!(e.message.contains("tiny-7b-style, french"), "{}", e.message);
        // Without adapters, any name is the base model.
        let plain = validator(N_CTX, 4, &[]);
        assert!(plain
            .chat(
                json!({"model": "gpt-4o", "messages": m})
                    .to_string()
                    .as_bytes()
            )
            .is_ok());
    }

    #[test]
    fn malformed_requests_name_the_field() {
        let e = openai_err(v().chat(b"{\"model\": \"m\", "), "", &["not valid JSON"]);
        assert_eq!(e.code, Some("invalid_json"));
        let e = openai_err(v().chat(b"[1, 2]"), "", &["JSON object"]);
        assert_eq!(e.code, Some("invalid_type"));
        let e = openai_err(
            chat(json!({"messages": user("a")})),
            "model",
            &["missing field `model`"],
        );
        assert_eq!(e.code, Some("missing_required_parameter"));
        openai_err(
            chat(json!({"model": M, "messages": user("a"), "temperature": "hot"})),
            "temperature",
            &["invalid type"],
        );
        openai_err(
            chat(json!({"model": M, "messages": [{"role": "robot", "content": "a"}]})),
            "messages[0].role",
            &["robot"],
        );
        openai_err(
            chat(json!({"model": M, "messages": [{"role": "user"}]})),
            "messages[0].content",
            &["missing field"],
        );
        openai_err(
            chat(json!({"model": M, "messages": user("a"), "top_k": "x"})),
            "top_k",
            &["invalid type"],
        );
        let e = v()
            .generate(b"{\"inputs\": 3}", TgiRoute::Generate)
            .unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(e.message.contains("`inputs`"), "{}", e.message);
        let e = v()
            .generate(b"{\"inputs\": ", TgiRoute::Generate)
            .unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.body()["error_type"], "validation");
    }

    #[test]
    fn completion_prompts() {
        let c = completion(json!({"model": M, "prompt": "Hello world"})).unwrap();
        assert_eq!(c.prompts.len(), 1);
        assert_eq!(c.prompts[0].max_new_tokens, 16, "OpenAI's default");
        assert_eq!(
            c.prompts[0].tokens,
            HfVocab::load().tokenize("Hello world", true, true)
        );
        let c = completion(json!({"model": M, "prompt": ["a b", "c"], "max_tokens": 4, "n": 2}))
            .unwrap();
        assert_eq!(c.prompts.len(), 2);
        assert!(c.prompts.iter().all(|p| p.max_new_tokens == 4));
        let c = completion(json!({"model": M, "prompt": [5, 6, 7]})).unwrap();
        assert_eq!(c.prompts[0].tokens, [5, 6, 7]);
        let c = completion(json!({"model": M, "prompt": [[5], [6, 7]]})).unwrap();
        assert_eq!(c.prompts[1].tokens, [6, 7]);
        // Near the end of the context the default shrinks to what is left.
        let long = "word ".repeat(55);
        let c = completion(json!({"model": M, "prompt": long})).unwrap();
        assert_eq!(
            c.prompts[0].max_new_tokens as usize,
            N_CTX as usize - c.prompts[0].tokens.len()
        );
    }

    #[test]
    fn completion_error_paths() {
        openai_err(
            completion(json!({"model": M, "prompt": []})),
            "prompt",
            &["at least one"],
        );
        openai_err(
            completion(json!({"model": M, "prompt": vec!["a"; 17]})),
            "prompt",
            &["17 prompts", "16"],
        );
        openai_err(
            completion(json!({"model": M, "prompt": ""})),
            "prompt",
            &["empty"],
        );
        openai_err(
            completion(json!({"model": M, "prompt": [[1], [2, 5000]]})),
            "prompt[1][1]",
            &["5000", "1024 tokens"],
        );
        openai_err(
            completion(json!({"model": M, "prompt": "a", "suffix": "b"})),
            "suffix",
            &["not supported"],
        );
        openai_err(
            completion(json!({"model": M, "prompt": "a", "best_of": 3})),
            "best_of",
            &["`n`"],
        );
        openai_err(
            completion(json!({"model": M, "prompt": "a", "logprobs": 6})),
            "logprobs",
            &["at most 5"],
        );
        openai_err(
            completion(json!({"model": M, "prompt": "a", "logprobs": 1, "echo": true})),
            "echo",
            &["not supported"],
        );
        openai_err(
            completion(json!({"model": M, "prompt": "a", "max_tokens": 64})),
            "max_tokens",
            &["lower `max_tokens`"],
        );
        openai_err(
            completion(json!({"model": M, "prompt": ["a", "word ".repeat(80)]})),
            "prompt[1]",
            &["shorten the prompt"],
        );
    }

    #[test]
    fn tgi_parameters_follow_tgi() {
        // No `parameters`: TGI samples, with a seed chosen and reported.
        let g = generate(json!({"inputs": "Hello"})).unwrap();
        assert!(!g.params.sampling.is_greedy());
        assert_eq!(g.params.sampling.temperature, 1.0);
        assert_eq!(g.seed, Some(g.params.sampling.seed));
        assert_eq!(
            g.params.max_new_tokens as usize,
            N_CTX as usize - g.prompt.tokens.len()
        );
        // `parameters` without `do_sample` nor warpers: greedy, no seed.
        let g = generate(
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 5,
                                "repetition_penalty": 1.3, "frequency_penalty": 0.5}}),
        )
        .unwrap();
        assert!(g.params.sampling.is_greedy());
        assert_eq!(g.seed, None);
        assert_eq!(g.params.sampling.repeat_penalty, 1.3);
        assert_eq!(g.params.sampling.frequency_penalty, 0.5);
        assert_eq!(g.params.max_new_tokens, 5);
        // A warper turns sampling on; the client's seed is kept.
        let g = generate(
            json!({"inputs": "Hello", "parameters": {"top_k": 5, "seed": 9,
                                "top_n_tokens": 3, "stop": ["\n"], "details": true}}),
        )
        .unwrap();
        assert_eq!((g.params.sampling.top_k, g.seed), (5, Some(9)));
        assert_eq!(g.params.top_logprobs, 3);
        assert_eq!(g.params.stop, ["\n"]);
        assert!(g.details && !g.return_full_text);
        // temperature 1.0 is not a warper.
        let g = generate(json!({"inputs": "Hello", "parameters": {"temperature": 1.0}})).unwrap();
        assert!(g.params.sampling.is_greedy());
        // `truncate` keeps the end of the input.
        let all = HfVocab::load().tokenize("one two three four five", true, true);
        let g =
            generate(json!({"inputs": "one two three four five", "parameters": {"truncate": 2}}))
                .unwrap();
        assert_eq!(g.prompt.tokens, all[all.len() - 2..]);
        // The adapter by `adapter_id`; the base model's name is the base.
        let g = generate(json!({"inputs": "a", "parameters": {"adapter_id": "french"}})).unwrap();
        assert_eq!(g.adapter, Some(AdapterId(0)));
        let g = generate(json!({"inputs": "a", "parameters": {"adapter_id": "tiny-7b-style"}}))
            .unwrap();
        assert_eq!(g.adapter, None);
        // The route fixes `stream`; `POST /` reads it.
        let b = json!({"inputs": "a", "stream": true}).to_string();
        assert!(v().generate(b.as_bytes(), TgiRoute::Compat).unwrap().stream);
        assert!(
            v().generate(b"{\"inputs\": \"a\"}", TgiRoute::GenerateStream)
                .unwrap()
                .stream
        );
    }

    #[test]
    fn tgi_error_paths_with_tgi_messages() {
        let p = |params: Value| json!({"inputs": "Hello", "parameters": params});
        tgi_err(
            p(json!({"best_of": 2})),
            "`best_of` != 1 is not allowed for this endpoint",
        );
        tgi_err(
            p(json!({"temperature": 0.0})),
            "`temperature` must be strictly positive",
        );
        tgi_err(
            p(json!({"repetition_penalty": 0.0})),
            "`repetition_penalty` must be strictly positive",
        );
        tgi_err(
            p(json!({"frequency_penalty": 2.5})),
            "`frequency_penalty` must be >= -2.0 and <= 2.0",
        );
        tgi_err(p(json!({"top_p": 1.0})), "`top_p` must be > 0.0 and < 1.0");
        tgi_err(
            p(json!({"typical_p": 1.5})),
            "`typical_p` must be > 0.0 and < 1.0",
        );
        tgi_err(p(json!({"top_k": 0})), "`top_k` must be strictly positive");
        tgi_err(
            p(json!({"max_new_tokens": 0})),
            "`max_new_tokens` must be strictly positive",
        );
        tgi_err(
            p(json!({"stop": ["a", "b", "c", "d", "e"]})),
            "`stop` supports up to 4 stop sequences. Given: 5",
        );
        tgi_err(
            p(json!({"top_n_tokens": 6})),
            "`top_n_tokens` must be >= 0 and <= 5. Given: 6",
        );
        tgi_err(json!({"inputs": ""}), "`inputs` cannot be empty");
        tgi_err(
            p(json!({"truncate": 0})),
            "`truncate` must be strictly positive and less than 63. Given: 0",
        );
        tgi_err(
            p(json!({"truncate": 64})),
            "`truncate` must be strictly positive and less than 63. Given: 64",
        );
        tgi_err(
            p(json!({"typical_p": 0.5})),
            "`typical_p` is not supported by this server",
        );
        tgi_err(
            p(json!({"watermark": true})),
            "`watermark` is not supported by this server",
        );
        tgi_err(
            p(json!({"decoder_input_details": true})),
            "`decoder_input_details` is not supported by this server: prompt log-probabilities are not computed",
        );
        tgi_err(
            p(json!({"grammar": {"type": "regex", "value": "a+"}})),
            "grammar is not supported",
        );
        tgi_err(
            p(json!({"adapter_id": "german"})),
            "`adapter_id` \"german\" is not served: the adapters are french",
        );
        let n = HfVocab::load().tokenize("Hello", true, true).len();
        tgi_err(
            p(json!({"max_new_tokens": 64})),
            &format!("`inputs` tokens + `max_new_tokens` must be <= 64. Given: {n} `inputs` tokens and 64 `max_new_tokens`"),
        );
        let long = "word ".repeat(100);
        let n = HfVocab::load().tokenize(&long, true, true).len();
        tgi_err(
            json!({"inputs": long}),
            &format!("`inputs` tokens + `max_new_tokens` must be <= 64. Given: {n} `inputs` tokens and 0 `max_new_tokens`"),
        );
        // Exactly a context of input and no room for an answer.
        let vocab = HfVocab::load();
        let mut exact = String::from("a");
        while vocab.tokenize(&exact, true, true).len() < N_CTX as usize {
            exact.push_str(" a");
        }
        assert_eq!(vocab.tokenize(&exact, true, true).len(), N_CTX as usize);
        tgi_err(
            json!({"inputs": exact}),
            "`inputs` must have less than 63 tokens. Given: 64",
        );
    }

    #[test]
    fn model_card_adapter_rules() {
        let card = ModelCard {
            id: "base".into(),
            adapters: vec!["a".into(), "b".into()],
            created: 0,
        };
        assert_eq!(card.adapter_for_model("b").unwrap(), Some(AdapterId(1)));
        assert_eq!(card.adapter_for_model("base").unwrap(), None);
        assert_eq!(card.adapter_for_model("").unwrap(), None);
        assert!(card.adapter_for_model("c").is_err());
        assert_eq!(card.adapter_for_id(None).unwrap(), None);
        assert_eq!(card.adapter_for_id(Some("a")).unwrap(), Some(AdapterId(0)));
        assert_eq!(card.name_of(Some(AdapterId(1))), "b");
        assert_eq!(card.names(), ["base", "a", "b"]);
    }
}
