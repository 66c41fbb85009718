//! The router over HTTP, without a model: routing, authentication, limits, error bodies, CORS,
//! and the answers of every generation route, streamed and not, fed by stand-ins for the
//! batching loop that keep its contract ([`super::testing`]).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::http::{self, HttpOptions};
use super::queue::Jobs;
use super::testing::{self, HfVocab};
use super::validation::Tokenize;

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `data:` payloads of a server-sent-events body.
    fn events(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter_map(|e| {
                e.lines()
                    .find_map(|l| l.strip_prefix("data:").map(|d| d.trim_start().to_string()))
            })
            .collect()
    }
}

async fn send(app: &Router, req: Request<Body>) -> Answer {
    let r = app.clone().oneshot(req).await.unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let body = axum::body::to_bytes(r.into_body(), usize::MAX)
        .await
        .unwrap();
    Answer {
        status,
        headers,
        body,
    }
}

fn post(path: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .unwrap()
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

async fn post_json(app: &Router, path: &str, body: Value) -> Answer {
    send(app, post(path, body.to_string())).await
}

/// A server with the echo loop behind it.
fn echo_server(opts: &HttpOptions) -> Router {
    echo_server_with(opts, &[])
}

/// The same, serving adapters.
fn echo_server_with(opts: &HttpOptions, adapters: &[&str]) -> Router {
    let v = testing::validator(256, 4, adapters);
    let vocab = v.vocab.clone();
    let (st, jobs, _queue) = testing::state(v, 8);
    testing::echo_loop(jobs, vocab);
    http::router(st, opts).unwrap()
}

fn vocab() -> HfVocab {
    HfVocab::load()
}

fn decode(ids: &[i32]) -> String {
    let v = vocab();
    let bytes: Vec<u8> = ids
        .iter()
        .filter(|&&t| !v.is_special(t))
        .flat_map(|&t| v.token_bytes(t).unwrap())
        .collect();
    String::from_utf8(bytes).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Routing, errors, security

#[tokio::test]
async fn informational_routes() {
    let app = echo_server_with(&HttpOptions::default(), &["french"]);
    let r = send(&app, get("/v1/models")).await;
    assert_eq!(r.status, StatusCode::OK);
    let j = r.json();
    let ids: Vec<&str> = j["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny-7b-style", "french"]);
    assert_eq!(j["object"], "list");
    assert_eq!(j["data"][0]["object"], "model");

    let r = send(&app, get("/info")).await;
    assert_eq!(r.status, StatusCode::OK);
    let info = r.json();
    assert_eq!(info["model_id"], "tiny-7b-style");
    assert_eq!(info["max_total_tokens"], 256);
    assert_eq!(info["max_input_tokens"], 255);
    assert_eq!(info["max_stop_sequences"], 4);
    assert_eq!(info["max_best_of"], 1);

    let r = send(&app, get("/health")).await;
    assert_eq!(
        (r.status, r.json()),
        (StatusCode::OK, json!({"status": "ok"}))
    );

    let r = send(&app, get("/metrics")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    assert!(r.text().contains("falcon_queue_length 0"), "{}", r.text());
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_the_api_shape() {
    let app = echo_server(&HttpOptions::default());
    let r = send(&app, get("/v1/nothing")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    let r = send(&app, get("/nothing")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error_type"], "not_found");
    let r = send(&app, get("/generate")).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(r.json()["error"].as_str().unwrap().contains("/generate"));
}

#[tokio::test]
async fn health_reports_a_failure_of_the_loop() {
    let v = testing::validator(256, 4, &[]);
    let (st, _jobs, _q) = testing::state(v, 8);
    let app = http::router(st.clone(), &HttpOptions::default()).unwrap();
    st.health
        .set_failed("the RPC worker at 10.0.0.7:50052 stopped answering");
    let r = send(&app, get("/health")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        r.json(),
        json!({"error": "the RPC worker at 10.0.0.7:50052 stopped answering", "error_type": "healthcheck"})
    );
}

#[tokio::test]
async fn api_key_is_required_everywhere_but_health() {
    let opts = HttpOptions {
        api_key: Some("s3cret".into()),
        ..HttpOptions::default()
    };
    let app = echo_server(&opts);
    let with = |req: Request<Body>, auth: &str| {
        let (mut parts, body) = req.into_parts();
        parts
            .headers
            .insert(header::AUTHORIZATION, auth.parse().unwrap());
        Request::from_parts(parts, body)
    };
    // No key, a wrong key, a key of another length, the key under another scheme.
    for auth in [
        None,
        Some("Bearer wrong!"),
        Some("Bearer s3cret2"),
        Some("Basic s3cret"),
    ] {
        let req = |r| match auth {
            Some(a) => with(r, a),
            None => r,
        };
        let r = send(&app, req(get("/v1/models"))).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(r.headers[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(r.json()["error"]["type"], "authentication_error");
        assert_eq!(r.json()["error"]["code"], "invalid_api_key");
        let r = send(&app, req(post("/generate", r#"{"inputs":"a"}"#))).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.json()["error_type"], "authentication");
        for path in ["/metrics", "/info", "/nothing"] {
            assert_eq!(
                send(&app, req(get(path))).await.status,
                StatusCode::UNAUTHORIZED,
                "{path}"
            );
        }
    }
    assert_eq!(send(&app, get("/health")).await.status, StatusCode::OK);
    for auth in ["Bearer s3cret", "bearer s3cret"] {
        let r = send(&app, with(get("/v1/models"), auth)).await;
        assert_eq!(r.status, StatusCode::OK, "{auth}");
    }
    let r = send(
        &app,
        with(
            post(
                "/generate",
                r#"{"inputs":"Hello","parameters":{"max_new_tokens":2}}"#,
            ),
            "Bearer s3cret",
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

#[test]
fn empty_api_key_is_refused() {
    let (st, _jobs, _q) = testing::state(testing::validator(64, 1, &[]), 1);
    let opts = HttpOptions {
        api_key: Some(String::new()),
        ..HttpOptions::default()
    };
    assert!(http::router(st, &opts).is_err());
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let opts = HttpOptions {
        max_body_bytes: 1000,
        ..HttpOptions::default()
    };
    let app = echo_server(&opts);
    let big = json!({"model": "m", "prompt": "x".repeat(2000)}).to_string();
    let r = send(&app, post("/v1/completions", big.clone())).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.json()["error"]["code"], "request_too_large");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("1000 bytes"));
    let big = json!({"inputs": "x".repeat(2000)}).to_string();
    let r = send(&app, post("/generate", big.clone())).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.json()["error_type"], "validation");
    // Without Content-Length (a chunked body), the limit holds while reading.
    let chunks = futures_util::stream::iter(
        big.into_bytes()
            .chunks(100)
            .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    );
    let r = send(&app, post("/generate", Body::from_stream(chunks))).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.json()["error_type"], "validation");
}

#[tokio::test]
async fn malformed_and_mistyped_bodies() {
    let app = echo_server(&HttpOptions::default());
    // Malformed JSON: 400 on both APIs.
    let r = send(&app, post("/v1/chat/completions", "{\"model\": ")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["code"], "invalid_json");
    let r = send(&app, post("/generate", "not json")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error_type"], "validation");
    // A missing field: 400 (OpenAI) / 422 (TGI), naming it.
    let r = post_json(&app, "/v1/chat/completions", json!({"model": "m"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["param"], "messages");
    assert_eq!(r.json()["error"]["code"], "missing_required_parameter");
    let r = post_json(&app, "/generate", json!({"parameters": {}})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.json()["error"].as_str().unwrap().contains("inputs"));
    // A wrongly typed field, nested.
    let r = post_json(
        &app,
        "/generate",
        json!({"inputs": "a", "parameters": {"max_new_tokens": "many"}}),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("parameters.max_new_tokens"),
        "{}",
        r.text()
    );
}

#[tokio::test]
async fn no_cors_headers_unless_an_origin_is_named() {
    let app = echo_server(&HttpOptions::default());
    let req = Request::get("/v1/models")
        .header(header::ORIGIN, "https://evil.example")
        .body(Body::empty())
        .unwrap();
    let r = send(&app, req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r
        .headers
        .keys()
        .all(|k| !k.as_str().starts_with("access-control-")));

    let opts = HttpOptions {
        cors_origin: Some("https://app.example".into()),
        api_key: Some("k".into()),
        ..HttpOptions::default()
    };
    let app = echo_server(&opts);
    // A preflight carries no key and must not be refused.
    let req = Request::options("/v1/chat/completions")
        .header(header::ORIGIN, "https://app.example")
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .header(header::ACCESS_CONTROL_REQUEST_HEADERS, "authorization")
        .body(Body::empty())
        .unwrap();
    let r = send(&app, req).await;
    assert!(r.status.is_success(), "{}", r.status);
    assert_eq!(
        r.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://app.example"
    );
    let req = Request::get("/v1/models")
        .header(header::ORIGIN, "https://app.example")
        .header(header::AUTHORIZATION, "Bearer k")
        .body(Body::empty())
        .unwrap();
    let r = send(&app, req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://app.example"
    );
}

// ---------------------------------------------------------------------------------------------
// Generation routes (echo loop)

#[tokio::test]
async fn completion_with_n_and_several_prompts() {
    let app = echo_server(&HttpOptions::default());
    let prompts = ["The quick brown fox", "Hello world"];
    let toks: Vec<Vec<i32>> = prompts
        .iter()
        .map(|p| vocab().tokenize(p, true, true))
        .collect();
    // The echo loop repeats the prompt: with as many tokens as the longer prompt, the first
    // sequence of each prompt reproduces it (then starts it again); sampled sequences start one
    // token further each.
    let max_tokens = toks[0].len();
    let r = post_json(
        &app,
        "/v1/completions",
        json!({"model": "tiny-7b-style", "prompt": prompts, "n": 2, "max_tokens": max_tokens,
               "temperature": 0.7}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let j = r.json();
    assert_eq!(j["object"], "text_completion");
    assert_eq!(j["model"], "tiny-7b-style");
    let choices = j["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (pi, t) in toks.iter().enumerate() {
        for seq in 0..2 {
            let c = &choices[pi * 2 + seq];
            assert_eq!(c["index"], pi * 2 + seq);
            let want: Vec<i32> = (0..max_tokens).map(|k| t[(k + seq) % t.len()]).collect();
            assert_eq!(c["text"], decode(&want), "prompt {pi} seq {seq}");
            assert_eq!(c["finish_reason"], "length");
        }
    }
    let usage = &j["usage"];
    assert_eq!(usage["prompt_tokens"], toks[0].len() + toks[1].len());
    assert_eq!(usage["completion_tokens"], 4 * max_tokens);
    assert_eq!(
        usage["total_tokens"],
        toks[0].len() + toks[1].len() + 4 * max_tokens
    );
}

#[tokio::test]
async fn completion_stop_string_and_echo_and_logprobs() {
    let app = echo_server(&HttpOptions::default());
    let r = post_json(
        &app,
        "/v1/completions",
        json!({"model": "m", "prompt": "one two. stop here", "max_tokens": 20,
               "stop": " stop", "logprobs": 2}),
    )
    .await;
    let j = r.json();
    assert_eq!(j["choices"][0]["text"], "one two.");
    assert_eq!(j["choices"][0]["finish_reason"], "stop");
    let lp = &j["choices"][0]["logprobs"];
    let n = lp["tokens"].as_array().unwrap().len();
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), n);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    assert_eq!(j["usage"]["completion_tokens"], n);

    let n = vocab().tokenize("Hello world", true, true).len();
    let r = post_json(
        &app,
        "/v1/completions",
        json!({"model": "m", "prompt": "Hello world", "max_tokens": n, "echo": true}),
    )
    .await;
    assert_eq!(r.json()["choices"][0]["text"], "Hello worldHello world");
}

#[tokio::test]
async fn chat_answer_streamed_and_not() {
    let app = echo_server(&HttpOptions::default());
    // No system prompt: the rendered prompt has no "\nUser:", the template's stop string.
    let messages = json!([{"role": "user", "content": "Hi there"}]);
    let prompt = "User: Hi there\nAssistant:";
    let n_prompt = vocab().tokenize(prompt, false, true).len();
    let body = json!({"model": "tiny-7b-style", "messages": messages, "max_tokens": n_prompt,
                      "logprobs": true, "top_logprobs": 1});
    let r = post_json(&app, "/v1/chat/completions", body.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let j = r.json();
    assert_eq!(j["object"], "chat.completion");
    let c = &j["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    // The echo loop answers with the rendered prompt itself.
    assert_eq!(c["message"]["content"], prompt);
    assert_eq!(c["finish_reason"], "length");
    let lp = c["logprobs"]["content"].as_array().unwrap();
    assert_eq!(lp.len(), n_prompt);
    assert_eq!(lp[0]["top_logprobs"].as_array().unwrap().len(), 1);
    assert_eq!(j["usage"]["prompt_tokens"], n_prompt);

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let r = post_json(&app, "/v1/chat/completions", sbody).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = r.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .filter_map(|c| c["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, prompt, "streamed text equals the answer");
    let finish: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|c| &c["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [&json!("length")]);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], n_prompt);
    assert_eq!(last["usage"]["prompt_tokens"], n_prompt);
}

#[tokio::test]
async fn chat_stops_at_the_family_stop_string() {
    let app = echo_server(&HttpOptions::default());
    // Rendered: "User: Hi\nUser: x\nAssistant:"; the echo answer runs into "\nUser:".
    let r = post_json(
        &app,
        "/v1/chat/completions",
        json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "x"}],
               "max_tokens": 30, "n": 1}),
    )
    .await;
    let c = &r.json()["choices"][0];
    assert_eq!(c["message"]["content"], "User: Hi");
    assert_eq!(c["finish_reason"], "stop");
}

#[tokio::test]
async fn chat_n_streams_every_choice() {
    let app = echo_server(&HttpOptions::default());
    let r = post_json(
        &app,
        "/v1/chat/completions",
        json!({"model": "m", "messages": [{"role": "user", "content": "Hello"}],
               "max_tokens": 3, "n": 3, "stream": true}),
    )
    .await;
    let events = r.events();
    let mut finished = [false; 3];
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert!(c["usage"].is_null(), "no usage without include_usage");
        let ch = &c["choices"][0];
        if !ch["finish_reason"].is_null() {
            finished[ch["index"].as_u64().unwrap() as usize] = true;
        }
    }
    assert_eq!(finished, [true; 3]);
}

#[tokio::test]
async fn completion_stream_of_two_prompts() {
    let app = echo_server(&HttpOptions::default());
    let prompts = ["Hello world", "The quick brown fox"];
    let r = post_json(
        &app,
        "/v1/completions",
        json!({"model": "m", "prompt": prompts, "max_tokens": 3,
               "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    let events = r.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut text = [String::new(), String::new()];
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert_eq!(c["object"], "text_completion");
        if let Some(ch) = c["choices"].get(0) {
            text[ch["index"].as_u64().unwrap() as usize] += ch["text"].as_str().unwrap();
        } else {
            usage = Some(c["usage"].clone());
        }
    }
    for (p, t) in prompts.iter().zip(&text) {
        let ids = vocab().tokenize(p, true, true);
        assert_eq!(t, &decode(&ids[..3]));
    }
    assert_eq!(usage.unwrap()["completion_tokens"], 6);
}

#[tokio::test]
async fn tgi_generate_and_stream_agree() {
    let app = echo_server(&HttpOptions::default());
    let inputs = "Hello world! This is";
    let ids = vocab().tokenize(inputs, true, true);
    let params = json!({"max_new_tokens": ids.len(), "details": true, "top_n_tokens": 2,
                        "return_full_text": false});
    let r = post_json(
        &app,
        "/generate",
        json!({"inputs": inputs, "parameters": params}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let g = r.json();
    assert_eq!(g["generated_text"], inputs);
    let d = &g["details"];
    assert_eq!(d["finish_reason"], "length");
    assert_eq!(d["generated_tokens"], ids.len());
    assert_eq!(d["seed"], Value::Null, "greedy: no seed");
    assert_eq!(d["prefill"], json!([]));
    let toks = d["tokens"].as_array().unwrap();
    let got_ids: Vec<i64> = toks.iter().map(|t| t["id"].as_i64().unwrap()).collect();
    assert_eq!(
        got_ids,
        ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>()
    );
    assert_eq!(d["top_tokens"][0].as_array().unwrap().len(), 2);

    let r = post_json(
        &app,
        "/generate_stream",
        json!({"inputs": inputs, "parameters": params}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let events: Vec<Value> = r
        .events()
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(events.len(), ids.len());
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["index"], i + 1);
        assert_eq!(e["token"], toks[i]);
        if i + 1 < events.len() {
            assert!(e["generated_text"].is_null() && e["details"].is_null());
        }
    }
    let last = events.last().unwrap();
    assert_eq!(last["generated_text"], inputs);
    assert_eq!(last["details"]["finish_reason"], "length");
    assert_eq!(last["details"]["generated_tokens"], ids.len());
    assert_eq!(last["details"]["input_length"], ids.len());
    let text: String = events
        .iter()
        .filter(|e| !e["token"]["special"].as_bool().unwrap())
        .map(|e| e["token"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, inputs);

    // POST / picks by `stream`, and answers a list when not streaming.
    let r = post_json(
        &app,
        "/",
        json!({"inputs": inputs, "parameters": {"max_new_tokens": 2}, "stream": false}),
    )
    .await;
    assert_eq!(r.json()[0]["generated_text"], decode(&ids[..2]));
    assert!(r.json()[0].get("details").is_none());
    let r = post_json(
        &app,
        "/",
        json!({"inputs": inputs, "parameters": {"max_new_tokens": 2}, "stream": true}),
    )
    .await;
    assert_eq!(r.events().len(), 2);
}

#[tokio::test]
async fn tgi_end_of_text_and_full_text_and_sampling_seed() {
    let app = echo_server(&HttpOptions::default());
    // The echo loop generates the prompt's end-of-text token and stops there.
    let r = post_json(
        &app,
        "/generate",
        json!({"inputs": "Hi<|endoftext|>", "parameters": {"max_new_tokens": 10, "details": true,
               "return_full_text": true, "do_sample": true, "seed": 42}}),
    )
    .await;
    let g = r.json();
    assert_eq!(
        g["generated_text"], "Hi<|endoftext|>Hi",
        "prompt, then text without specials"
    );
    assert_eq!(g["details"]["finish_reason"], "eos_token");
    assert_eq!(g["details"]["seed"], 42);
    let last = g["details"]["tokens"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["special"], true);
    assert_eq!(last["text"], "<|endoftext|>");
}

#[tokio::test]
async fn adapters_are_chosen_by_model_and_adapter_id() {
    let app = echo_server_with(&HttpOptions::default(), &["french"]);
    let r = post_json(
        &app,
        "/v1/completions",
        json!({"model": "french", "prompt": "Hello", "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.json()["model"], "french");
    let r = post_json(
        &app,
        "/v1/completions",
        json!({"model": "german", "prompt": "Hello", "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    let r = post_json(
        &app,
        "/generate",
        json!({"inputs": "Hello", "parameters": {"adapter_id": "german", "max_new_tokens": 1}}),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.json()["error"].as_str().unwrap().contains("french"));
}

#[tokio::test]
async fn metrics_count_requests_and_tokens() {
    let app = echo_server(&HttpOptions::default());
    post_json(
        &app,
        "/generate",
        json!({"inputs": "Hello world", "parameters": {"max_new_tokens": 3}}),
    )
    .await;
    post_json(&app, "/generate", json!({"inputs": ""})).await;
    let text = send(&app, get("/metrics")).await.text();
    for want in [
        r#"falcon_requests_total{route="/generate",status="200"} 1"#,
        r#"falcon_requests_total{route="/generate",status="422"} 1"#,
        "falcon_generated_tokens_total 3",
        "falcon_time_to_first_token_seconds_count 1",
        "falcon_time_per_output_token_seconds_count 1",
    ] {
        assert!(text.contains(want), "{want} missing from\n{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// The queue, cancellation, shutdown (holding loop)

fn holding_server(
    max_queue: usize,
) -> (Router, Arc<http::AppState>, std::sync::mpsc::Receiver<u64>) {
    let (st, jobs, _q): (_, Jobs, _) = testing::state(testing::validator(256, 4, &[]), max_queue);
    let (tx, rx) = std::sync::mpsc::channel();
    testing::holding_loop(jobs, tx);
    (
        http::router(st.clone(), &HttpOptions::default()).unwrap(),
        st,
        rx,
    )
}

fn gen_body() -> String {
    json!({"inputs": "Hello", "parameters": {"max_new_tokens": 50}}).to_string()
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    let (app, st, _cancelled) = holding_server(1);
    // The loop holds the first; the second waits; the third finds the queue full.
    let a = tokio::spawn(app.clone().oneshot(post("/generate", gen_body())));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(st.queue.waiting(), 0, "the loop took the first");
    let b = tokio::spawn(app.clone().oneshot(post("/generate", gen_body())));
    for _ in 0..500 {
        if st.queue.waiting() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(st.queue.waiting(), 1, "the second waits");
    let r = send(
        &app,
        post(
            "/v1/completions",
            json!({"model": "m", "prompt": "Hi"}).to_string(),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers[header::RETRY_AFTER], "1");
    assert_eq!(r.json()["error"]["code"], "server_overloaded");
    let r = send(&app, post("/generate", gen_body())).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["error_type"], "overloaded");
    let text = send(&app, get("/metrics")).await.text();
    assert!(text.contains("falcon_queue_length 1"), "{text}");
    a.abort();
    b.abort();
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_its_job() {
    let (app, _st, cancelled) = holding_server(4);
    // Not streaming: the answer's future is dropped.
    let a = tokio::spawn(app.clone().oneshot(post("/generate", gen_body())));
    tokio::time::sleep(Duration::from_millis(50)).await;
    a.abort();
    let id = tokio::task::spawn_blocking(move || cancelled.recv_timeout(Duration::from_secs(5)))
        .await
        .unwrap()
        .expect("the loop saw the cancellation");
    assert!(id > 0);

    // Streaming: the body is dropped after its first event.
    let (app, _st, cancelled) = holding_server(4);
    let r = app
        .clone()
        .oneshot(post(
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": true})
                .to_string(),
        ))
        .await
        .unwrap();
    let mut body = r.into_body().into_data_stream();
    use futures_util::StreamExt;
    let first = body.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("assistant"));
    drop(body);
    tokio::task::spawn_blocking(move || cancelled.recv_timeout(Duration::from_secs(5)))
        .await
        .unwrap()
        .expect("the loop saw the cancellation");
}

/// One HTTP/1.1 exchange over a TCP socket; returns everything the server sent.
async fn raw_http(addr: std::net::SocketAddr, request: String) -> std::io::Result<String> {
    use std::io::{Read, Write};
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(request.as_bytes())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    })
    .await
    .unwrap()
}

fn raw_post(path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn shutdown_stops_accepting_then_cuts_running_requests() {
    let (app, st, cancelled) = holding_server(4);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(
        listener,
        app,
        st,
        async move {
            let _ = stop_rx.await;
        },
        Duration::from_millis(300),
    ));
    // A request that runs until cut.
    let running = tokio::spawn(raw_http(addr, raw_post("/generate_stream", &gen_body())));
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop_tx.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // No new connections once stopping.
    let late = tokio::time::timeout(
        Duration::from_secs(1),
        raw_http(addr, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n".into()),
    )
    .await;
    let served = matches!(&late, Ok(Ok(text)) if !text.is_empty());
    assert!(
        !served,
        "a connection made while stopping was served: {late:?}"
    );
    let answer = tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("the running request is cut after the grace period")
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("the server is shutting down"), "{answer}");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returns")
        .unwrap()
        .unwrap();
    tokio::task::spawn_blocking(move || cancelled.recv_timeout(Duration::from_secs(5)))
        .await
        .unwrap()
        .expect("the cut request's job was cancelled");
}

#[tokio::test]
async fn loopback_server_answers_a_generation() {
    let v = testing::validator(256, 4, &[]);
    let vocab = v.vocab.clone();
    let (st, jobs, _q) = testing::state(v, 8);
    testing::echo_loop(jobs, vocab);
    let app = http::router(st.clone(), &HttpOptions::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(
        listener,
        app,
        st,
        async move {
            let _ = stop_rx.await;
        },
        Duration::from_secs(1),
    ));
    let answer = raw_http(
        addr,
        raw_post(
            "/generate",
            &json!({"inputs": "Hello world", "parameters": {"max_new_tokens": 2}}).to_string(),
        ),
    )
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let ids = HfVocab::load().tokenize("Hello world", true, true);
    let want = json!({"generated_text": decode(&ids[..2])}).to_string();
    assert!(answer.ends_with(&want), "{answer}");
    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// The official Python clients (`tests/clients/test_clients.py`) against the HTTP layer, fed by
/// the echo loop: every answer's shape as `openai` and `huggingface_hub` read it.
///
/// The Python is `$FALCON_TEST_PYTHON`, else the virtual environment that
/// `scripts/setup-client-tests.sh` makes.
#[tokio::test(flavor = "multi_thread")]
async fn python_clients_read_every_answer() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("FALCON_TEST_PYTHON")
        .map_or_else(|| root.join(".venv-clients/bin/python"), Into::into);
    assert!(
        python.exists(),
        "no Python for the client tests: run scripts/setup-client-tests.sh, or set FALCON_TEST_PYTHON"
    );
    let v = testing::validator(256, 4, &[]);
    let vocab = v.vocab.clone();
    let (st, jobs, _q) = testing::state(v, 8);
    testing::echo_loop(jobs, vocab);
    let app = http::router(st.clone(), &HttpOptions::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(
        listener,
        app,
        st,
        async move {
            let _ = stop_rx.await;
        },
        Duration::from_secs(1),
    ));
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/test_clients.py");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .env("FALCON_SERVER_URL", format!("http://{addr}"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    println!("{log}");
    assert!(out.status.success(), "{log}");
    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}
