//! The HTTP server: axum routes for the OpenAI and TGI APIs, llama-server's `/tokenize` and
//! `/detokenize`, `/health`, `/info`, `/metrics`; authentication, CORS, body limits; streaming
//! as server-sent events. It knows nothing of batching: it validates a request, puts jobs in
//! the [`Queue`] and turns the [`Event`]s that come back into answers. Dropping an answer (the
//! client went away) drops its event receivers, which is how the loop learns of cancellation.
//!
//! Every request is logged once, as a `tracing` event (target `falcon::serve::request`) with
//! method, route, status, prompt and generated tokens and duration, when its last byte is sent.

use std::convert::Infallible;
use std::future::{Future, IntoFuture};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_openai::types::chat::{
    ChatChoice, ChatChoiceStream, ChatCompletionResponseMessage, ChatCompletionStreamResponseDelta,
    Choice, CompletionUsage, CreateChatCompletionResponse, CreateChatCompletionStreamResponse,
    Role,
};
use async_openai::types::completions::CreateCompletionResponse;
use async_openai::types::models::{ListModelResponse, Model};
use axum::body::Bytes;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures_util::stream::{self, SelectAll, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::error::{Api, ApiError, ErrorKind};
use super::metrics::{self, Metrics};
use super::openai::{self, SeqOutput};
use super::queue::{Event, GeneratedToken, GenerationError, Health, Job, Queue, SubmitError};
use super::tgi;
use super::validation::{
    self, Prompt, TgiRoute, ValidChat, ValidCompletion, ValidGenerate, Validator,
};
use crate::engine::Token;

/// What the HTTP side shares between requests.
#[derive(Debug)]
pub struct AppState {
    pub validator: Validator,
    pub queue: Queue,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Set to `true` to end every running request at once (shutdown's deadline).
    cut: watch::Sender<bool>,
}

impl AppState {
    #[must_use]
    pub fn new(
        validator: Validator,
        queue: Queue,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Arc<AppState> {
        Arc::new(AppState {
            validator,
            queue,
            metrics,
            health,
            cut: watch::Sender::new(false),
        })
    }

    /// Ends every running request now (they answer 503 or end their stream with an error).
    pub fn cut_requests(&self) {
        self.cut.send_replace(true);
    }

    /// What a cut request answers: the server is stopping, or can no longer generate.
    fn cut_error(&self, api: Api) -> ApiError {
        match self.health.failure() {
            Some(why) => ApiError::unhealthy(api, &why),
            None => ApiError::shutting_down(api),
        }
    }
}

/// Options of the HTTP layer.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Every route but `/health` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// The one origin browsers may call from; no CORS headers at all without it.
    pub cors_origin: Option<String>,
    /// Larger request bodies are refused with 413.
    pub max_body_bytes: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            api_key: None,
            cors_origin: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

/// 8 MiB: a full 32k-token context of text is about 150 KB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 << 20;

/// A bad HTTP option.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("the CORS origin {0:?} is not a valid header value")]
    CorsOrigin(String),
    #[error("the API key is empty")]
    EmptyApiKey,
}

/// The router with every route and layer.
pub fn router(state: Arc<AppState>, opts: &HttpOptions) -> Result<Router, HttpError> {
    let mut app = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/generate", post(generate))
        .route("/generate_stream", post(generate_stream))
        .route("/", post(compat_generate))
        .route("/info", get(info))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            opts.max_body_bytes,
        ));
    if let Some(key) = &opts.api_key {
        if key.is_empty() {
            return Err(HttpError::EmptyApiKey);
        }
        let key = Arc::new(ApiKey::new(key));
        app = app.layer(middleware::from_fn_with_state(key, authenticate));
    }
    let limit = opts.max_body_bytes;
    app = app.layer(middleware::from_fn_with_state(
        (state.clone(), limit),
        record,
    ));
    if let Some(origin) = &opts.cors_origin {
        let origin =
            HeaderValue::from_str(origin).map_err(|_| HttpError::CorsOrigin(origin.clone()))?;
        app = app.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origin)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    Ok(app.with_state(state))
}

/// Serves `app` on `listener` until `stop` resolves; then accepts nothing new, lets running
/// requests finish for up to `grace`, and cuts those still running.
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    app: Router,
    state: Arc<AppState>,
    stop: F,
    grace: Duration,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let stopping = Arc::new(tokio::sync::Notify::new());
    let notify = stopping.clone();
    // Streams send one small write per token: without TCP_NODELAY, Nagle's algorithm could hold
    // one back until the client acknowledges the previous one.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            stop.await;
            notify.notify_one();
        })
        .into_future();
    let mut server = std::pin::pin!(server);
    tokio::select! {
        r = &mut server => return r,
        () = stopping.notified() => {}
    }
    tracing::info!(
        grace_s = grace.as_secs_f64(),
        "stopping: accepting no new connections, letting running requests finish"
    );
    tokio::select! {
        r = &mut server => return r,
        () = tokio::time::sleep(grace) => {}
    }
    tracing::warn!("cutting the requests still running");
    state.cut_requests();
    match tokio::time::timeout(Duration::from_secs(2), &mut server).await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Middleware

/// The hash of the API key: comparing digests in constant time hides the key's length too.
struct ApiKey([u8; 32]);

impl ApiKey {
    fn new(key: &str) -> ApiKey {
        ApiKey(Sha256::digest(key.as_bytes()).into())
    }

    fn matches(&self, given: &str) -> bool {
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        given.ct_eq(&self.0).into()
    }
}

/// The key from an `Authorization: Bearer <key>` header (the scheme is case-insensitive).
fn bearer(value: &HeaderValue) -> Option<&str> {
    let v = value.to_str().ok()?;
    let (scheme, key) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

async fn authenticate(State(key): State<Arc<ApiKey>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == "/health" {
        return next.run(req).await;
    }
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(bearer)
        .is_some_and(|k| key.matches(k));
    if ok {
        next.run(req).await
    } else {
        ApiError::unauthorized(Api::of_path(path)).into_response()
    }
}

/// One request's log line and metrics, written when the last handle on it is dropped: when the
/// answer is complete (a stream holds a handle until its end), or when the client went away.
#[derive(Debug)]
struct RequestRecord {
    method: Method,
    route: String,
    start: Instant,
    metrics: Arc<Metrics>,
    /// 0 until the answer's head is known; still 0 if the client went away first.
    status: AtomicU16,
    prompt_tokens: AtomicU32,
    generated_tokens: AtomicU32,
    /// A stream that ended before its end (client gone, cut, failure).
    incomplete: AtomicBool,
}

/// Logged as the status of requests whose client went away before the answer (nginx's 499).
const CLIENT_GONE: u16 = 499;

impl RequestRecord {
    fn tokens(&self, prompt: usize, generated: u32) {
        self.prompt_tokens
            .store(u32::try_from(prompt).unwrap_or(u32::MAX), Ordering::Relaxed);
        self.generated_tokens.store(generated, Ordering::Relaxed);
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let status = match self.status.load(Ordering::Relaxed) {
            0 => CLIENT_GONE,
            s => s,
        };
        let elapsed = self.start.elapsed();
        self.metrics.count_request(&self.route, status);
        self.metrics.request_duration.observe(elapsed.as_secs_f64());
        tracing::info!(
            target: "falcon::serve::request",
            method = %self.method,
            route = %self.route,
            status,
            prompt_tokens = self.prompt_tokens.load(Ordering::Relaxed),
            generated_tokens = self.generated_tokens.load(Ordering::Relaxed),
            ms = elapsed.as_millis() as u64,
            complete = !self.incomplete.load(Ordering::Relaxed),
            "request"
        );
    }
}

async fn record(
    State((state, limit)): State<(Arc<AppState>, usize)>,
    matched: Option<MatchedPath>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let rec = Arc::new(RequestRecord {
        method: method.clone(),
        route: matched.map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string()),
        start: Instant::now(),
        metrics: state.metrics.clone(),
        status: AtomicU16::new(0),
        prompt_tokens: AtomicU32::new(0),
        generated_tokens: AtomicU32::new(0),
        incomplete: AtomicBool::new(false),
    });
    req.extensions_mut().insert(rec.clone());
    let mut response = next.run(req).await;
    // Answers made by layers (the body limit) or by axum's extractors carry plain text: give
    // them the API's error shape.
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE && !is_json {
        response = ApiError::too_large(Api::of_path(&path), limit).into_response();
    }
    rec.status
        .store(response.status().as_u16(), Ordering::Relaxed);
    response
}

async fn no_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::no_route(Api::of_path(uri.path()), method.as_str(), uri.path())
}

async fn wrong_method(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::wrong_method(Api::of_path(uri.path()), method.as_str(), uri.path())
}

// ---------------------------------------------------------------------------------------------
// Shared steps of the generation routes

type Rec = Extension<Arc<RequestRecord>>;

/// Runs validation off the async threads (templates and tokenization take CPU time).
/// Request bodies up to this size are validated (and their prompts tokenized) on the async
/// worker that received them.
const INLINE_VALIDATION_BYTES: usize = 16 << 10;

async fn validate<T, F>(state: &Arc<AppState>, api: Api, body: Bytes, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&Validator, &[u8]) -> Result<T, ApiError> + Send + 'static,
{
    // Tokenizing a long prompt takes milliseconds: off the async workers. A short one costs
    // less than the hop to the blocking pool.
    if body.len() <= INLINE_VALIDATION_BYTES {
        return f(&state.validator, &body);
    }
    let st = state.clone();
    tokio::task::spawn_blocking(move || f(&st.validator, &body))
        .await
        .unwrap_or_else(|e| Err(ApiError::generation(api, format!("validation failed: {e}"))))
}

/// A job in flight: its events, and what its timing metrics need.
struct Running {
    rx: mpsc::Receiver<Event>,
    queued_at: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    tokens: u32,
}

impl Running {
    fn saw_token(&mut self) {
        let now = Instant::now();
        self.first_token.get_or_insert(now);
        self.last_token = Some(now);
        self.tokens += 1;
    }

    /// Records time to first token and time per output token.
    fn record(&self, metrics: &Metrics) {
        if let Some(first) = self.first_token {
            metrics
                .time_to_first_token
                .observe((first - self.queued_at).as_secs_f64());
            if let (Some(last), true) = (self.last_token, self.tokens > 1) {
                metrics
                    .time_per_output_token
                    .observe((last - first).as_secs_f64() / f64::from(self.tokens - 1));
            }
        }
        metrics.generated_tokens.inc_by(u64::from(self.tokens));
    }
}

/// Queues one job per prompt.
fn submit(
    state: &AppState,
    api: Api,
    prompts: &[Prompt],
    n: u32,
    params: &super::params::GenerationParams,
    adapter: Option<super::queue::AdapterId>,
) -> Result<Vec<(u64, Running)>, ApiError> {
    if let Some(why) = state.health.failure() {
        return Err(ApiError::unhealthy(api, &why));
    }
    let mut running = Vec::with_capacity(prompts.len());
    for p in prompts {
        let mut params = params.clone();
        params.max_new_tokens = p.max_new_tokens;
        let (job, rx) = Job::new(p.tokens.clone(), n, params, adapter);
        let (id, queued_at) = (job.id, job.queued_at);
        state.queue.submit(job).map_err(|e| match e {
            SubmitError::Full(waiting) => ApiError::overloaded(api, waiting),
            SubmitError::Closed => ApiError::shutting_down(api),
        })?;
        state
            .metrics
            .prompt_tokens
            .inc_by(p.tokens.len() as u64 * u64::from(n));
        running.push((
            id,
            Running {
                rx,
                queued_at,
                first_token: None,
                last_token: None,
                tokens: 0,
            },
        ));
    }
    Ok(running)
}

/// Why a request ended without its answer.
enum Stopped {
    Failed(GenerationError),
    /// Cut at shutdown (`None`), or because the model can no longer generate (the reason).
    Cut(Option<String>),
}

impl Stopped {
    fn into_api_error(self, api: Api) -> ApiError {
        match self {
            Stopped::Failed(e) => ApiError::generation(api, e.to_string()),
            Stopped::Cut(Some(why)) => ApiError::unhealthy(api, &why),
            Stopped::Cut(None) => ApiError::shutting_down(api),
        }
    }
}

/// Waits for every sequence of a job.
async fn collect(state: &AppState, run: &mut Running, n: u32) -> Result<Vec<SeqOutput>, Stopped> {
    let mut outs = vec![SeqOutput::default(); n as usize];
    let mut left = n;
    let mut cut = state.cut.subscribe();
    while left > 0 {
        let event = tokio::select! {
            e = run.rx.recv() => e,
            _ = cut.wait_for(|c| *c) => return Err(Stopped::Cut(state.health.failure())),
        };
        match event {
            Some(Event::Token { seq, token }) => {
                run.saw_token();
                if let Some(o) = outs.get_mut(seq as usize) {
                    o.tokens.push(token);
                }
            }
            Some(Event::Finished { seq, finish }) => {
                if let Some(o) = outs.get_mut(seq as usize) {
                    if o.finish.is_none() {
                        left -= 1;
                    }
                    o.finish = Some(finish);
                }
            }
            Some(Event::Failed(e)) => return Err(Stopped::Failed(e)),
            None => {
                return Err(Stopped::Failed(GenerationError::Engine(
                    "the generation loop dropped the request".into(),
                )))
            }
        }
    }
    run.record(&state.metrics);
    Ok(outs)
}

fn unix_now() -> u32 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

fn json_event<T: Serialize>(value: &T) -> sse::Event {
    sse::Event::default().data(serde_json::to_string(value).unwrap_or_default())
}

fn done_event() -> sse::Event {
    sse::Event::default().data("[DONE]")
}

fn error_event(e: &ApiError) -> sse::Event {
    json_event(&e.body())
}

fn sse_response<S>(stream: S) -> Response
where
    S: Stream<Item = sse::Event> + Send + 'static,
{
    let mut r = Sse::new(stream.map(Ok::<_, Infallible>))
        .keep_alive(KeepAlive::default())
        .into_response();
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// The events of several jobs, each tagged with its index.
type Merged = SelectAll<stream::BoxStream<'static, (usize, Event)>>;

/// Moves the jobs' receivers into one stream (leaving closed ones in `running`, which keeps
/// the timings).
fn merge(running: &mut [(u64, Running)]) -> Merged {
    stream::select_all(running.iter_mut().enumerate().map(|(i, (_, r))| {
        let (_, closed) = mpsc::channel(1);
        let rx = std::mem::replace(&mut r.rx, closed);
        ReceiverStream::new(rx).map(move |e| (i, e)).boxed()
    }))
}

// ---------------------------------------------------------------------------------------------
// OpenAI

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(rec): Rec,
    body: Bytes,
) -> Response {
    let api = Api::OpenAi;
    let v = match validate(&state, api, body, |v, b| v.chat(b)).await {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let mut running = match submit(
        &state,
        api,
        std::slice::from_ref(&v.prompt),
        v.n,
        &v.params,
        v.adapter,
    ) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let (id, mut run) = running.pop().expect("one job per chat request");
    if v.stream {
        return sse_response(chat_stream(state, rec, v, id, run));
    }
    let outs = match collect(&state, &mut run, v.n).await {
        Ok(o) => o,
        Err(s) => return s.into_api_error(api).into_response(),
    };
    let generated: u32 = outs.iter().map(SeqOutput::generated_tokens).sum();
    rec.tokens(v.prompt.tokens.len(), generated);
    Json(chat_response(&v, id, &outs)).into_response()
}

#[allow(deprecated)] // the deprecated fields are left at their defaults
fn chat_response(v: &ValidChat, id: u64, outs: &[SeqOutput]) -> CreateChatCompletionResponse {
    let generated: u32 = outs.iter().map(SeqOutput::generated_tokens).sum();
    CreateChatCompletionResponse {
        id: format!("chatcmpl-{id}"),
        choices: outs
            .iter()
            .enumerate()
            .map(|(i, o)| ChatChoice {
                index: i as u32,
                message: ChatCompletionResponseMessage {
                    content: Some(o.output()),
                    role: Role::Assistant,
                    ..Default::default()
                },
                finish_reason: o
                    .finish
                    .as_ref()
                    .map(|f| openai::chat_finish_reason(&f.reason)),
                logprobs: v.logprobs.then(|| openai::chat_logprobs(&o.tokens)),
            })
            .collect(),
        created: unix_now(),
        model: v.model.clone(),
        object: "chat.completion".into(),
        usage: Some(openai::usage(v.prompt.tokens.len() as u32, generated)),
        ..Default::default()
    }
}

/// The streaming state of a chat request.
struct ChatStream {
    state: Arc<AppState>,
    rec: Arc<RequestRecord>,
    v: ValidChat,
    id: u64,
    created: u32,
    run: Running,
    cut: watch::Receiver<bool>,
    started: Vec<bool>,
    left: u32,
    generated: u32,
    ended: bool,
}

impl ChatStream {
    #[allow(deprecated)]
    fn chunk(&self, choices: Vec<ChatChoiceStream>) -> sse::Event {
        json_event(&CreateChatCompletionStreamResponse {
            id: format!("chatcmpl-{}", self.id),
            choices,
            created: self.created,
            model: self.v.model.clone(),
            object: "chat.completion.chunk".into(),
            ..Default::default()
        })
    }

    #[allow(deprecated)]
    fn choice(index: u32, content: Option<String>, role: Option<Role>) -> ChatChoiceStream {
        ChatChoiceStream {
            index,
            delta: ChatCompletionStreamResponseDelta {
                content,
                role,
                ..Default::default()
            },
            finish_reason: None,
            logprobs: None,
        }
    }

    /// The first chunk of a choice names the role.
    fn start(&mut self, seq: u32, out: &mut Vec<sse::Event>) {
        if let Some(s) = self.started.get_mut(seq as usize) {
            if !*s {
                *s = true;
                let c = ChatStream::choice(seq, Some(String::new()), Some(Role::Assistant));
                out.push(self.chunk(vec![c]));
            }
        }
    }

    fn end(&mut self, error: Option<ApiError>, out: &mut Vec<sse::Event>) {
        self.ended = true;
        match error {
            Some(e) => {
                self.rec.incomplete.store(true, Ordering::Relaxed);
                out.push(error_event(&e));
            }
            None => self.run.record(&self.state.metrics),
        }
        out.push(done_event());
    }

    async fn next(&mut self) -> Option<Vec<sse::Event>> {
        if self.ended {
            return None;
        }
        let event = tokio::select! {
            e = self.run.rx.recv() => e,
            _ = self.cut.wait_for(|c| *c) => None,
        };
        let mut out = Vec::new();
        match event {
            Some(Event::Token { seq, token }) => {
                self.run.saw_token();
                self.start(seq, &mut out);
                if !token.output.is_empty() || self.v.logprobs {
                    let mut c = ChatStream::choice(seq, Some(token.output.clone()), None);
                    c.logprobs = self
                        .v
                        .logprobs
                        .then(|| openai::chat_logprobs(std::slice::from_ref(&token)));
                    out.push(self.chunk(vec![c]));
                }
            }
            Some(Event::Finished { seq, finish }) => {
                self.start(seq, &mut out);
                if !finish.output_tail.is_empty() {
                    let c = ChatStream::choice(seq, Some(finish.output_tail.clone()), None);
                    out.push(self.chunk(vec![c]));
                }
                let mut c = ChatStream::choice(seq, None, None);
                c.finish_reason = Some(openai::chat_finish_reason(&finish.reason));
                out.push(self.chunk(vec![c]));
                self.generated += finish.generated_tokens;
                self.left = self.left.saturating_sub(1);
                self.rec.tokens(self.v.prompt.tokens.len(), self.generated);
                if self.left == 0 {
                    if self.v.include_usage {
                        let mut last = CreateChatCompletionStreamResponse {
                            id: format!("chatcmpl-{}", self.id),
                            created: self.created,
                            model: self.v.model.clone(),
                            object: "chat.completion.chunk".into(),
                            ..Default::default()
                        };
                        last.usage = Some(openai::usage(
                            self.v.prompt.tokens.len() as u32,
                            self.generated,
                        ));
                        out.push(json_event(&last));
                    }
                    self.end(None, &mut out);
                }
            }
            Some(Event::Failed(e)) => {
                self.end(
                    Some(ApiError::generation(Api::OpenAi, e.to_string())),
                    &mut out,
                );
            }
            None if *self.cut.borrow() => {
                self.end(Some(self.state.cut_error(Api::OpenAi)), &mut out);
            }
            None => self.end(
                Some(ApiError::generation(
                    Api::OpenAi,
                    "the generation loop dropped the request",
                )),
                &mut out,
            ),
        }
        Some(out)
    }
}

fn chat_stream(
    state: Arc<AppState>,
    rec: Arc<RequestRecord>,
    v: ValidChat,
    id: u64,
    run: Running,
) -> impl Stream<Item = sse::Event> + Send + 'static {
    let cut = state.cut.subscribe();
    let s = ChatStream {
        started: vec![false; v.n as usize],
        left: v.n,
        state,
        rec,
        created: unix_now(),
        id,
        run,
        cut,
        generated: 0,
        ended: false,
        v,
    };
    stream::unfold(s, |mut s| async move { s.next().await.map(|evs| (evs, s)) })
        .flat_map(stream::iter)
}

async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(rec): Rec,
    body: Bytes,
) -> Response {
    let api = Api::OpenAi;
    let v = match validate(&state, api, body, |v, b| v.completion(b)).await {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let mut running = match submit(&state, api, &v.prompts, v.n, &v.params, v.adapter) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let id = running[0].0;
    let prompt_tokens: usize = v.prompts.iter().map(|p| p.tokens.len()).sum();
    if v.stream {
        return sse_response(completion_stream(state, rec, v, id, running));
    }
    // Jobs run concurrently; their answers are gathered in order.
    let n = v.n;
    let results =
        futures_util::future::join_all(running.iter_mut().map(|(_, run)| collect(&state, run, n)))
            .await;
    let mut outs = Vec::new();
    for r in results {
        match r {
            Ok(o) => outs.push(o),
            Err(s) => return s.into_api_error(api).into_response(),
        }
    }
    let generated: u32 = outs.iter().flatten().map(SeqOutput::generated_tokens).sum();
    rec.tokens(prompt_tokens, generated);
    Json(completion_response(&v, id, &outs)).into_response()
}

fn completion_response(
    v: &ValidCompletion,
    id: u64,
    outs: &[Vec<SeqOutput>],
) -> CreateCompletionResponse {
    let prompt_tokens: usize = v.prompts.iter().map(|p| p.tokens.len()).sum();
    let mut choices = Vec::new();
    let mut generated = 0;
    for (pi, seqs) in outs.iter().enumerate() {
        for (si, o) in seqs.iter().enumerate() {
            let prefix = if v.echo {
                v.prompts[pi].text.as_str()
            } else {
                ""
            };
            generated += o.generated_tokens();
            choices.push(Choice {
                text: format!("{prefix}{}", o.output()),
                index: (pi * v.n as usize + si) as u32,
                logprobs: v
                    .logprobs
                    .map(|_| openai::completion_logprobs(&o.tokens, prefix.chars().count() as u32)),
                finish_reason: o
                    .finish
                    .as_ref()
                    .map(|f| openai::completion_finish_reason(&f.reason)),
            });
        }
    }
    CreateCompletionResponse {
        id: format!("cmpl-{id}"),
        choices,
        created: unix_now(),
        model: v.model.clone(),
        system_fingerprint: None,
        object: "text_completion".into(),
        usage: Some(openai::usage(prompt_tokens as u32, generated)),
    }
}

/// The streaming state of a completion request (one or more prompts).
struct CompletionStream {
    state: Arc<AppState>,
    rec: Arc<RequestRecord>,
    v: ValidCompletion,
    id: u64,
    created: u32,
    running: Vec<(u64, Running)>,
    events: Merged,
    cut: watch::Receiver<bool>,
    started: Vec<bool>,
    left: usize,
    generated: u32,
    ended: bool,
}

impl CompletionStream {
    fn chunk(&self, choices: Vec<Choice>, usage: Option<CompletionUsage>) -> sse::Event {
        json_event(&CreateCompletionResponse {
            id: format!("cmpl-{}", self.id),
            choices,
            created: self.created,
            model: self.v.model.clone(),
            system_fingerprint: None,
            object: "text_completion".into(),
            usage,
        })
    }

    fn prompt_tokens(&self) -> usize {
        self.v.prompts.iter().map(|p| p.tokens.len()).sum()
    }

    /// The text of a choice's first chunk starts with the prompt under `echo`.
    fn text(&mut self, pi: usize, index: usize, text: &str) -> String {
        let first = !std::mem::replace(&mut self.started[index], true);
        if first && self.v.echo {
            format!("{}{text}", self.v.prompts[pi].text)
        } else {
            text.to_string()
        }
    }

    fn end(&mut self, error: Option<ApiError>, out: &mut Vec<sse::Event>) {
        self.ended = true;
        match error {
            Some(e) => {
                self.rec.incomplete.store(true, Ordering::Relaxed);
                out.push(error_event(&e));
            }
            None => {
                for (_, r) in &self.running {
                    r.record(&self.state.metrics);
                }
            }
        }
        out.push(done_event());
    }

    async fn next(&mut self) -> Option<Vec<sse::Event>> {
        if self.ended {
            return None;
        }
        let event = tokio::select! {
            e = self.events.next() => e,
            _ = self.cut.wait_for(|c| *c) => None,
        };
        let mut out = Vec::new();
        let n = self.v.n as usize;
        match event {
            Some((pi, Event::Token { seq, token })) => {
                self.running[pi].1.saw_token();
                let index = pi * n + seq as usize;
                if index >= self.started.len() {
                    return Some(out);
                }
                let text = self.text(pi, index, &token.output);
                if !text.is_empty() || self.v.logprobs.is_some() {
                    let logprobs = self
                        .v
                        .logprobs
                        .map(|_| openai::completion_logprobs(std::slice::from_ref(&token), 0));
                    let c = Choice {
                        text,
                        index: index as u32,
                        logprobs,
                        finish_reason: None,
                    };
                    out.push(self.chunk(vec![c], None));
                }
            }
            Some((pi, Event::Finished { seq, finish })) => {
                let index = pi * n + seq as usize;
                if index >= self.started.len() {
                    return Some(out);
                }
                let text = self.text(pi, index, &finish.output_tail);
                let c = Choice {
                    text,
                    index: index as u32,
                    logprobs: None,
                    finish_reason: Some(openai::completion_finish_reason(&finish.reason)),
                };
                out.push(self.chunk(vec![c], None));
                self.generated += finish.generated_tokens;
                self.left = self.left.saturating_sub(1);
                self.rec.tokens(self.prompt_tokens(), self.generated);
                if self.left == 0 {
                    if self.v.include_usage {
                        let usage = openai::usage(self.prompt_tokens() as u32, self.generated);
                        out.push(self.chunk(Vec::new(), Some(usage)));
                    }
                    self.end(None, &mut out);
                }
            }
            Some((_, Event::Failed(e))) => {
                self.end(
                    Some(ApiError::generation(Api::OpenAi, e.to_string())),
                    &mut out,
                );
            }
            None if *self.cut.borrow() => {
                self.end(Some(self.state.cut_error(Api::OpenAi)), &mut out);
            }
            None => self.end(
                Some(ApiError::generation(
                    Api::OpenAi,
                    "the generation loop dropped the request",
                )),
                &mut out,
            ),
        }
        Some(out)
    }
}

fn completion_stream(
    state: Arc<AppState>,
    rec: Arc<RequestRecord>,
    v: ValidCompletion,
    id: u64,
    mut running: Vec<(u64, Running)>,
) -> impl Stream<Item = sse::Event> + Send + 'static {
    let events = merge(&mut running);
    let total = v.prompts.len() * v.n as usize;
    let s = CompletionStream {
        cut: state.cut.subscribe(),
        state,
        rec,
        created: unix_now(),
        id,
        running,
        events,
        started: vec![false; total],
        left: total,
        generated: 0,
        ended: false,
        v,
    };
    stream::unfold(s, |mut s| async move { s.next().await.map(|evs| (evs, s)) })
        .flat_map(stream::iter)
}

async fn models(State(state): State<Arc<AppState>>) -> Json<ListModelResponse> {
    let card = &state.validator.model;
    Json(ListModelResponse {
        object: "list".into(),
        data: card
            .names()
            .into_iter()
            .map(|id| Model {
                id,
                object: "model".into(),
                created: u32::try_from(card.created).unwrap_or(u32::MAX),
                owned_by: "falcon".into(),
                shutdown_date: None,
            })
            .collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// TGI

async fn generate(
    State(state): State<Arc<AppState>>,
    Extension(rec): Rec,
    body: Bytes,
) -> Response {
    tgi_generate(state, rec, body, TgiRoute::Generate).await
}

async fn generate_stream(
    State(state): State<Arc<AppState>>,
    Extension(rec): Rec,
    body: Bytes,
) -> Response {
    tgi_generate(state, rec, body, TgiRoute::GenerateStream).await
}

async fn compat_generate(
    State(state): State<Arc<AppState>>,
    Extension(rec): Rec,
    body: Bytes,
) -> Response {
    tgi_generate(state, rec, body, TgiRoute::Compat).await
}

async fn tgi_generate(
    state: Arc<AppState>,
    rec: Arc<RequestRecord>,
    body: Bytes,
    route: TgiRoute,
) -> Response {
    let api = Api::Tgi;
    let v = match validate(&state, api, body, move |v, b| v.generate(b, route)).await {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let mut running = match submit(
        &state,
        api,
        std::slice::from_ref(&v.prompt),
        1,
        &v.params,
        v.adapter,
    ) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let (_, mut run) = running.pop().expect("one job per TGI request");
    if v.stream {
        return sse_response(tgi_stream(state, rec, v, run));
    }
    let out = match collect(&state, &mut run, 1).await {
        Ok(mut o) => o.remove(0),
        Err(s) => return s.into_api_error(api).into_response(),
    };
    rec.tokens(v.prompt.tokens.len(), out.generated_tokens());
    let response = tgi_response(&v, &out);
    if route == TgiRoute::Compat {
        // TGI answers `POST /` with a list, as the Inference API did.
        Json(vec![response]).into_response()
    } else {
        Json(response).into_response()
    }
}

fn tgi_response(v: &ValidGenerate, out: &SeqOutput) -> tgi::GenerateResponse {
    let mut text = if v.return_full_text {
        v.prompt.text.clone()
    } else {
        String::new()
    };
    text.push_str(&out.text());
    let details = v.details.then(|| tgi::Details {
        finish_reason: out
            .finish
            .as_ref()
            .map_or(tgi::FinishReason::Length, |f| (&f.reason).into()),
        generated_tokens: out.generated_tokens(),
        seed: v.seed,
        prefill: Vec::new(),
        tokens: out.tokens.iter().map(tgi::Token::from_generated).collect(),
        top_tokens: if v.params.top_logprobs > 0 {
            out.tokens.iter().map(tgi::Token::top_of).collect()
        } else {
            Vec::new()
        },
    });
    tgi::GenerateResponse {
        generated_text: text,
        details,
    }
}

/// The streaming state of a TGI request: each token is sent when the next event comes, so that
/// the last one can carry `generated_text` and `details` as TGI's last event does.
struct TgiStream {
    state: Arc<AppState>,
    rec: Arc<RequestRecord>,
    v: ValidGenerate,
    run: Running,
    cut: watch::Receiver<bool>,
    pending: Option<GeneratedToken>,
    index: u32,
    text: String,
    ended: bool,
}

impl TgiStream {
    fn event(&mut self, t: &GeneratedToken) -> tgi::StreamResponse {
        self.index += 1;
        tgi::StreamResponse {
            index: self.index,
            token: tgi::Token::from_generated(t),
            top_tokens: if self.v.params.top_logprobs > 0 {
                tgi::Token::top_of(t)
            } else {
                Vec::new()
            },
            generated_text: None,
            details: None,
        }
    }

    fn fail(&mut self, e: &ApiError, out: &mut Vec<sse::Event>) {
        self.ended = true;
        self.rec.incomplete.store(true, Ordering::Relaxed);
        out.push(error_event(e));
    }

    async fn next(&mut self) -> Option<Vec<sse::Event>> {
        if self.ended {
            return None;
        }
        let event = tokio::select! {
            e = self.run.rx.recv() => e,
            _ = self.cut.wait_for(|c| *c) => None,
        };
        let mut out = Vec::new();
        match event {
            Some(Event::Token { token, .. }) => {
                self.run.saw_token();
                if !token.special {
                    self.text.push_str(&token.text);
                }
                if let Some(prev) = self.pending.replace(token) {
                    let e = self.event(&prev);
                    out.push(json_event(&e));
                }
            }
            Some(Event::Finished { finish, .. }) => {
                self.ended = true;
                self.text.push_str(&finish.text_tail);
                self.rec
                    .tokens(self.v.prompt.tokens.len(), finish.generated_tokens);
                match self.pending.take() {
                    Some(last) => {
                        let mut e = self.event(&last);
                        let mut text = if self.v.return_full_text {
                            self.v.prompt.text.clone()
                        } else {
                            String::new()
                        };
                        text.push_str(&self.text);
                        e.generated_text = Some(text);
                        e.details = self.v.details.then(|| tgi::StreamDetails {
                            finish_reason: (&finish.reason).into(),
                            generated_tokens: finish.generated_tokens,
                            seed: self.v.seed,
                            input_length: self.v.prompt.tokens.len() as u32,
                        });
                        out.push(json_event(&e));
                        self.run.record(&self.state.metrics);
                    }
                    None => self.fail(
                        &ApiError::new(
                            Api::Tgi,
                            StatusCode::INTERNAL_SERVER_ERROR,
                            ErrorKind::Generation,
                            "Incomplete generation stream",
                        ),
                        &mut out,
                    ),
                }
            }
            Some(Event::Failed(e)) => {
                self.fail(&ApiError::generation(Api::Tgi, e.to_string()), &mut out);
            }
            None if *self.cut.borrow() => {
                let e = self.state.cut_error(Api::Tgi);
                self.fail(&e, &mut out);
            }
            None => self.fail(
                &ApiError::generation(Api::Tgi, "the generation loop dropped the request"),
                &mut out,
            ),
        }
        Some(out)
    }
}

fn tgi_stream(
    state: Arc<AppState>,
    rec: Arc<RequestRecord>,
    v: ValidGenerate,
    run: Running,
) -> impl Stream<Item = sse::Event> + Send + 'static {
    let s = TgiStream {
        cut: state.cut.subscribe(),
        state,
        rec,
        v,
        run,
        pending: None,
        index: 0,
        text: String::new(),
        ended: false,
    };
    stream::unfold(s, |mut s| async move { s.next().await.map(|evs| (evs, s)) })
        .flat_map(stream::iter)
}

async fn info(State(state): State<Arc<AppState>>) -> Json<tgi::Info> {
    let limits = &state.validator.limits;
    Json(tgi::Info {
        model_id: state.validator.model.id.clone(),
        model_sha: None,
        model_pipeline_tag: Some("text-generation".into()),
        max_concurrent_requests: limits.max_n as usize + state.queue.max_waiting(),
        max_best_of: 1,
        max_stop_sequences: limits.max_stop,
        max_input_tokens: limits.n_ctx.saturating_sub(1) as usize,
        max_total_tokens: limits.n_ctx as usize,
        validation_workers: 1,
        max_client_batch_size: 1,
        router: "falcon-infer".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        sha: None,
        docker_label: None,
    })
}

// ---------------------------------------------------------------------------------------------
// Health, metrics, tokenizer

async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.health.failure() {
        None => Json(serde_json::json!({"status": "ok"})).into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"error": why, "error_type": "healthcheck"})),
        )
            .into_response(),
    }
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    state.metrics.queue_length.set(state.queue.waiting() as i64);
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        state.metrics.encode(),
    )
        .into_response()
}

/// llama-server's `POST /tokenize` request.
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub content: String,
    #[serde(default)]
    pub add_special: bool,
    #[serde(default = "yes")]
    pub parse_special: bool,
    #[serde(default)]
    pub with_pieces: bool,
}

fn yes() -> bool {
    true
}

/// A token with its piece: text when it is valid UTF-8, else its bytes (llama-server's shape).
#[derive(Debug, Serialize)]
struct Piece {
    id: Token,
    piece: serde_json::Value,
}

/// llama-server's `POST /detokenize` request.
#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub tokens: Vec<i64>,
}

async fn tokenize(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let api = Api::OpenAi;
    let r = validate(&state, api, body, move |v, b| {
        let r: TokenizeRequest = validation::parse_body(api, b)?;
        let tokens = v.vocab.tokenize(&r.content, r.add_special, r.parse_special);
        Ok(if r.with_pieces {
            let pieces: Vec<Piece> = tokens
                .iter()
                .map(|&id| {
                    let bytes = v.vocab.token_bytes(id).unwrap_or_default();
                    let piece = match String::from_utf8(bytes) {
                        Ok(s) => serde_json::Value::from(s),
                        Err(e) => serde_json::Value::from(e.into_bytes()),
                    };
                    Piece { id, piece }
                })
                .collect();
            serde_json::json!({ "tokens": pieces })
        } else {
            serde_json::json!({ "tokens": tokens })
        })
    })
    .await;
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn detokenize(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let api = Api::OpenAi;
    let r = validate(&state, api, body, move |v, b| {
        let r: DetokenizeRequest = validation::parse_body(api, b)?;
        let mut bytes = Vec::new();
        for (i, &id) in r.tokens.iter().enumerate() {
            let piece = Token::try_from(id)
                .ok()
                .filter(|&t| t >= 0 && (t as usize) < v.vocab.n_vocab())
                .and_then(|t| v.vocab.token_bytes(t));
            match piece {
                Some(p) => bytes.extend_from_slice(&p),
                None => {
                    return Err(ApiError::invalid(
                        api,
                        &format!("tokens[{i}]"),
                        format!(
                            "`tokens[{i}]`: token {id} is not in the vocabulary of {} tokens",
                            v.vocab.n_vocab()
                        ),
                    )
                    .with_code("invalid_value"))
                }
            }
        }
        Ok(serde_json::json!({ "content": String::from_utf8_lossy(&bytes) }))
    })
    .await;
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
