//! `falcon-infer serve`, the real binary on a fixture, over loopback HTTP: greedy answers are
//! transformers' continuation, streams equal whole answers, concurrent requests get what each
//! gets alone, a dropped stream frees its slot, errors have their status and shape, the API key
//! is enforced, the queue's limit answers 503, SIGTERM stops cleanly, and the official Python
//! clients read every answer.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A running server, stopped (SIGTERM, then SIGKILL) when dropped.
struct Server {
    child: Child,
    url: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(gguf: &Path, extra: &[&str]) -> Server {
        Server::start_env(gguf, extra, &[])
    }

    fn start_env(gguf: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(infer_bin())
            .args(["serve", "-m", gguf.to_str().unwrap(), "--port", "0"])
            .args(["--threads", "2", "--shutdown-timeout", "2"])
            .args(extra)
            .env_remove("FALCON_API_KEY")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("falcon-infer serve starts");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split(" on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("the server did not start: {}", log.lock().unwrap());
            }
        };
        Server {
            child,
            url: format!("http://{addr}"),
            log,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, &body.to_string(), None)
    }

    fn post_raw(&self, path: &str, body: &str, key: Option<&str>) -> (u16, Value) {
        let mut req = ureq::post(&format!("{}{path}", self.url))
            .set("Content-Type", "application/json")
            .timeout(Duration::from_secs(120));
        if let Some(k) = key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        let resp = match req.send_string(body) {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("POST {path}: {e}\n{}", self.log()),
        };
        let status = resp.status();
        let text = resp.into_string().unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    fn get(&self, path: &str, key: Option<&str>) -> (u16, String) {
        let mut req = ureq::get(&format!("{}{path}", self.url));
        if let Some(k) = key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        match req.call() {
            Ok(r) | Err(ureq::Error::Status(_, r)) => (r.status(), r.into_string().unwrap()),
            Err(e) => panic!("GET {path}: {e}"),
        }
    }

    /// Opens a stream and returns its reader after the response head.
    fn stream(&self, path: &str, body: &Value) -> Box<dyn Read + Send + Sync> {
        match ureq::post(&format!("{}{path}", self.url))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
        {
            Ok(r) => r.into_reader(),
            Err(ureq::Error::Status(code, r)) => {
                panic!("POST {path}: {code} {}", r.into_string().unwrap())
            }
            Err(e) => panic!("POST {path}: {e}"),
        }
    }

    /// A metric's value from `/metrics`.
    fn metric(&self, name: &str) -> f64 {
        let (status, text) = self.get("/metrics", None);
        assert_eq!(status, 200);
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .filter(|r| r.starts_with(' '))
                    .map(|r| r.trim().parse::<f64>().unwrap())
            })
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child, not yet waited for.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGTERM);
            if self.wait_exit(Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// The data lines of a server-sent event stream, up to `[DONE]` or the end.
fn sse_data(reader: impl Read) -> Vec<String> {
    let mut out = Vec::new();
    for line in BufReader::new(reader).lines() {
        let line = line.unwrap();
        if let Some(d) = line.strip_prefix("data:") {
            let d = d.trim().to_string();
            if d == "[DONE]" {
                break;
            }
            out.push(d);
        }
    }
    out
}

/// TGI's greedy answer with details: (token ids, generated_text, text of non-special tokens).
fn tgi_greedy(s: &Server, prompt: &str, n: usize) -> (Vec<i64>, String, String) {
    let (status, v) = s.post(
        "/generate",
        &json!({"inputs": prompt, "parameters": {"max_new_tokens": n, "details": true}}),
    );
    assert_eq!(status, 200, "{v}");
    let tokens = v["details"]["tokens"].as_array().unwrap();
    let ids = tokens.iter().map(|t| t["id"].as_i64().unwrap()).collect();
    let visible = tokens
        .iter()
        .filter(|t| !t["special"].as_bool().unwrap())
        .map(|t| t["text"].as_str().unwrap())
        .collect();
    (
        ids,
        v["generated_text"].as_str().unwrap().to_string(),
        visible,
    )
}

/// A prompt whose greedy continuation on `tiny-7b-style` never reaches end-of-text (it settles
/// into repeating one word; see its reference.json), for requests that must keep running.
const LONG_RUNNER: &str = "Once upon a time, there were 3 bears.";

fn f32_model(name: &str) -> PathBuf {
    gguf(name, "f32")
}

#[test]
fn greedy_answers_are_transformers_continuation_streamed_or_not() {
    let r = reference("tiny-7b-style");
    let s = Server::start(&f32_model("tiny-7b-style"), &[]);
    let n = r.greedy_ids.len();

    let (ids, generated, visible) = tgi_greedy(&s, &r.prompt, n);
    let want: Vec<i64> = r.greedy_ids.iter().map(|&i| i64::from(i)).collect();
    assert_eq!(ids, want, "TGI /generate");

    let (status, v) = s.post(
        "/v1/completions",
        &json!({"model": "x", "prompt": r.prompt, "max_tokens": n, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(text, visible, "OpenAI text is the non-special tokens' text");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], n);
    assert_eq!(v["usage"]["prompt_tokens"], r.prompt_ids.len());

    // Streamed: the same text, and usage when asked for.
    let events = sse_data(s.stream(
        "/v1/completions",
        &json!({"model": "m", "prompt": r.prompt, "max_tokens": n, "temperature": 0, "stream": true,
                "stream_options": {"include_usage": true}}),
    ));
    let parsed: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let streamed: String = parsed
        .iter()
        .filter_map(|e| e["choices"].get(0).and_then(|c| c["text"].as_str()))
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(parsed.last().unwrap()["usage"]["completion_tokens"], n);

    let events = sse_data(s.stream(
        "/generate_stream",
        &json!({"inputs": r.prompt, "parameters": {"max_new_tokens": n}}),
    ));
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["generated_text"].as_str().unwrap(), generated);
    let streamed_ids: Vec<i64> = events
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["token"]["id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(streamed_ids, want);

    // Every request was logged once, with its route and status.
    let log = s.log();
    assert!(
        log.contains("route=/v1/completions") && log.contains("status=200"),
        "{log}"
    );
}

#[test]
fn chat_uses_the_models_template() {
    let fixtures: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("models/chat-templates.json")).unwrap(),
    )
    .unwrap();
    let case = fixtures["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["template"] == "checkpoint" && c["add_generation_prompt"] == true)
        .expect("a checkpoint case");
    let s = Server::start(&f32_model("tiny-7b-style"), &[]);
    let (status, chat) = s.post(
        "/v1/chat/completions",
        &json!({"model": "m", "messages": case["messages"], "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(status, 200, "{chat}");
    let (status, plain) = s.post(
        "/v1/completions",
        &json!({"model": "m", "prompt": case["rendered"], "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(status, 200, "{plain}");
    assert_eq!(
        chat["choices"][0]["message"]["content"],
        plain["choices"][0]["text"]
    );
    assert_eq!(chat["usage"], plain["usage"]);
}

#[test]
fn eight_prompts_at_once_give_what_each_gives_alone() {
    let s = Arc::new(Server::start(
        &f32_model("tiny-40b-style"),
        &["--parallel", "4"],
    ));
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("Story {i}: once there were {} bears and", i + 2))
        .collect();
    let alone: Vec<Vec<i64>> = prompts.iter().map(|p| tgi_greedy(&s, p, 24).0).collect();
    let threads: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (s, p) = (s.clone(), p.clone());
            std::thread::spawn(move || tgi_greedy(&s, &p, 24).0)
        })
        .collect();
    let together: Vec<Vec<i64>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(together, alone);
    assert!(
        alone.iter().any(|a| a != &alone[0]),
        "the prompts should not all give the same tokens"
    );
}

#[test]
fn a_dropped_stream_frees_its_slot() {
    let s = Server::start(&f32_model("tiny-7b-style"), &["--ctx-size", "4096"]);
    let mut reader = BufReader::new(s.stream(
        "/v1/completions",
        &json!({"model": "m", "prompt": LONG_RUNNER, "max_tokens": 4000, "temperature": 0,
                "stream": true}),
    ));
    let mut line = String::new();
    while !line.starts_with("data:") {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    assert_eq!(s.metric("falcon_busy_slots"), 1.0, "the stream is running");
    drop(reader);
    let start = Instant::now();
    while s.metric("falcon_busy_slots") != 0.0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the slot was not freed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.metric("falcon_kv_cache_cells_used"), 0.0);
    // The server goes on serving.
    let (status, _) = s.post(
        "/v1/completions",
        &json!({"model": "m", "prompt": "Hi", "max_tokens": 2}),
    );
    assert_eq!(status, 200);
}

#[test]
fn bad_requests_get_their_status_and_shape() {
    let s = Server::start(&f32_model("tiny-7b-style"), &["--ctx-size", "64"]);
    let openai_error = |status: u16, v: &Value, needle: &str| {
        assert_eq!(status, 400, "{v}");
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{v}"));
        assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
        assert!(v["error"]["type"].is_string(), "{v}");
    };
    let (st, v) = s.post_raw("/v1/completions", "{\"model\": \"m\", \"prompt\": ", None);
    openai_error(st, &v, "");
    let (st, v) = s.post("/v1/completions", &json!({"model": "m", "prompt": 5}));
    openai_error(st, &v, "prompt");
    let (st, v) = s.post(
        "/v1/chat/completions",
        &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 9}),
    );
    openai_error(st, &v, "n");
    assert_eq!(v["error"]["param"], "n");
    let long = "bears ".repeat(200);
    let (st, v) = s.post(
        "/v1/completions",
        &json!({"model": "m", "prompt": long, "max_tokens": 4}),
    );
    openai_error(st, &v, "64");
    let (st, v) = s.post(
        "/v1/completions",
        &json!({"model": "m", "prompt": "hi", "max_tokens": 100}),
    );
    openai_error(st, &v, "max_tokens");

    let (st, v) = s.post(
        "/generate",
        &json!({"inputs": "hi", "parameters": {"top_k": 0}}),
    );
    assert_eq!(st, 422, "{v}");
    assert!(
        v["error"].is_string() && v["error_type"] == "validation",
        "{v}"
    );

    let huge = format!("{{\"prompt\": \"{}\"}}", "a".repeat(9 << 20));
    let resp = ureq::post(&format!("{}/v1/completions", s.url))
        .set("Content-Type", "application/json")
        .send_string(&huge);
    match resp {
        Err(ureq::Error::Status(code, _)) => assert_eq!(code, 413),
        // The server may close the connection while the body is still being sent.
        Err(ureq::Error::Transport(_)) => {}
        Ok(r) => panic!("accepted a 9 MiB body: {}", r.status()),
    }
    let (st, _) = s.get("/v1/chat/completions", None);
    assert_eq!(st, 405);
    let (st, _) = s.get("/nowhere", None);
    assert_eq!(st, 404);

    // None of this stopped the server.
    let (st, v) = s.post(
        "/v1/completions",
        &json!({"model": "m", "prompt": "hi", "max_tokens": 2}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(s.get("/health", None).0, 200);
}

#[test]
fn the_api_key_is_required_except_for_health() {
    let s = Server::start_env(
        &f32_model("tiny-7b-style"),
        &[],
        &[("FALCON_API_KEY", "s3cret")],
    );
    assert_eq!(s.get("/v1/models", None).0, 401);
    assert_eq!(s.get("/v1/models", Some("wrong")).0, 401);
    let (st, models) = s.get("/v1/models", Some("s3cret"));
    assert_eq!(st, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-7b-style-f32");
    let (st, v) = s.post_raw("/generate", r#"{"inputs": "hi"}"#, None);
    assert_eq!(st, 401, "{v}");
    let (st, _) = s.post_raw(
        "/generate",
        r#"{"inputs": "hi", "parameters": {"max_new_tokens": 2}}"#,
        Some("s3cret"),
    );
    assert_eq!(st, 200);
    assert_eq!(s.get("/health", None).0, 200);
}

#[test]
fn beyond_max_queue_requests_get_503_with_retry_after() {
    let s = Arc::new(Server::start(
        &f32_model("tiny-7b-style"),
        &["--parallel", "1", "--max-queue", "1", "--ctx-size", "4096"],
    ));
    // One stream holds the only slot (it is not read, so it stays).
    let holder = s.stream(
        "/v1/completions",
        &json!({"model": "m", "prompt": LONG_RUNNER, "max_tokens": 4000, "stream": true, "temperature": 0}),
    );
    let waiting = {
        let s = s.clone();
        std::thread::spawn(move || {
            s.post(
                "/v1/completions",
                &json!({"model": "m", "prompt": "Hi", "max_tokens": 2}),
            )
        })
    };
    let start = Instant::now();
    while s.metric("falcon_queue_length") < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(10), "nothing queued");
        std::thread::sleep(Duration::from_millis(20));
    }
    let resp = ureq::post(&format!("{}/v1/completions", s.url))
        .send_string(r#"{"model": "m", "prompt": "Hi", "max_tokens": 2}"#);
    match resp {
        Err(ureq::Error::Status(503, r)) => {
            assert_eq!(r.header("Retry-After"), Some("1"));
        }
        other => panic!("expected 503, got {other:?}"),
    }
    drop(holder);
    let (st, v) = waiting.join().unwrap();
    assert_eq!(
        st, 200,
        "the queued request is served once the slot frees: {v}"
    );
}

#[test]
fn sigterm_stops_taking_requests_and_exits_0() {
    let mut s = Server::start(&f32_model("tiny-7b-style"), &["--ctx-size", "4096"]);
    let stream = s.stream(
        "/v1/completions",
        &json!({"model": "m", "prompt": LONG_RUNNER, "max_tokens": 4000, "stream": true, "temperature": 0}),
    );
    s.signal(libc::SIGTERM);
    // The running stream is cut after --shutdown-timeout (2 s); the process then exits 0.
    assert_eq!(s.wait_exit(Duration::from_secs(20)), Some(0), "{}", s.log());
    drop(stream);
    assert!(s.log().contains("stopped"), "{}", s.log());
    // Regression: the batching loop stopped only after a 10 s timeout (the queue stayed open).
    assert!(!s.log().contains("did not stop"), "{}", s.log());
    assert!(ureq::get(&format!("{}/health", s.url)).call().is_err());
}

/// The Python interpreter with `openai` and `huggingface_hub`: $FALCON_TEST_PYTHON, else the
/// virtual environment that `scripts/setup-client-tests.sh` makes.
fn client_python() -> PathBuf {
    if let Some(p) = std::env::var_os("FALCON_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = repo().join(".venv-clients/bin/python");
    assert!(
        venv.exists(),
        "no Python for the client tests: run scripts/setup-client-tests.sh, or set FALCON_TEST_PYTHON"
    );
    venv
}

#[test]
fn the_official_python_clients_read_every_answer() {
    let python = client_python();
    let s = Server::start(&f32_model("tiny-7b-style"), &[]);
    let out = Command::new(python)
        .arg(repo().join("tests/clients/test_clients.py"))
        .env("FALCON_SERVER_URL", &s.url)
        .env(
            "FALCON_REFERENCE",
            repo().join("models/tiny-7b-style/reference.json"),
        )
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}\n{}", s.log());
    assert!(!report.contains("skipped"), "{report}");
}

/// Two PEFT adapters and the base behind one server: three concurrent greedy requests, one for
/// each, get each its own reference continuation (the adapters' from peft, the base's from
/// transformers); `/v1/models` lists all three.
#[test]
fn adapters_chosen_per_request_give_their_own_continuations() {
    let tmp = tempfile::tempdir().unwrap();
    // The PEFT directories are converted once, beside the adapter: work on copies.
    let mut args = Vec::new();
    for name in ["lora-tiny-7b-all", "lora-tiny-7b-rslora"] {
        let dst = tmp.path().join(name);
        std::fs::create_dir(&dst).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(fixture(name).join(f), dst.join(f)).unwrap();
        }
        args.push(format!("{name}={}", dst.display()));
    }
    let s = Arc::new(Server::start(
        &f32_model("tiny-7b-style"),
        &["--lora", &args[0], "--lora", &args[1], "--parallel", "4"],
    ));
    let (st, models) = s.get("/v1/models", None);
    assert_eq!(st, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "tiny-7b-style-f32",
            "lora-tiny-7b-all",
            "lora-tiny-7b-rslora"
        ]
    );

    let cases = [
        (None, "tiny-7b-style"),
        (Some("lora-tiny-7b-all"), "lora-tiny-7b-all"),
        (Some("lora-tiny-7b-rslora"), "lora-tiny-7b-rslora"),
    ];
    let threads: Vec<_> = cases
        .iter()
        .map(|&(adapter, fixture_name)| {
            let s = s.clone();
            let r = reference(fixture_name);
            std::thread::spawn(move || {
                let mut params = json!({"max_new_tokens": r.greedy_ids.len(), "details": true});
                if let Some(a) = adapter {
                    params["adapter_id"] = json!(a);
                }
                let (st, v) = s.post(
                    "/generate",
                    &json!({"inputs": r.prompt, "parameters": params}),
                );
                assert_eq!(st, 200, "{v}");
                let ids: Vec<i32> = v["details"]["tokens"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t["id"].as_i64().unwrap() as i32)
                    .collect();
                (fixture_name, ids, r.greedy_ids)
            })
        })
        .collect();
    for t in threads {
        let (name, got, want) = t.join().unwrap();
        assert_eq!(got, want, "{name}");
    }
    // OpenAI's `model` picks the adapter too.
    let r = reference("lora-tiny-7b-all");
    let (st, v) = s.post(
        "/v1/completions",
        &json!({"model": "lora-tiny-7b-all", "prompt": r.prompt, "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["model"], "lora-tiny-7b-all");
    let (st, v) = s.post(
        "/v1/completions",
        &json!({"model": "nope", "prompt": "hi", "max_tokens": 2}),
    );
    assert_eq!(st, 404, "{v}");
}

#[test]
fn a_kv_cache_that_cannot_fit_is_refused_at_start() {
    let o = Command::new(infer_bin())
        .args(["serve", "-m", f32_model("tiny-7b-style").to_str().unwrap()])
        .args([
            "--port",
            "0",
            "--parallel",
            "256",
            "--ctx-size",
            "100000000",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--parallel 256") && err.contains("lower --parallel or --ctx-size"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}
