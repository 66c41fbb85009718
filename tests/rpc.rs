//! Several machines on loopback: `falcon-infer rpc-server` workers with CPU devices, and clients
//! that spread a model's layers over the local CPU and the workers.

mod infer_support;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use infer_support::*;

/// A worker process, killed when dropped.
struct Worker {
    child: Child,
    endpoint: String,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_worker(extra: &[&str]) -> Worker {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_falcon-infer"))
        .args(["rpc-server", "--port", &port.to_string(), "--threads", "1"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rpc-server starts");
    let endpoint = format!("127.0.0.1:{port}");
    let t = Instant::now();
    while TcpStream::connect(&endpoint).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "rpc-server did not listen on {endpoint}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The probe connection above is served and closed by the worker before the next client.
    Worker { child, endpoint }
}

fn greedy(gguf: &std::path::Path, prompt: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "-m",
        gguf.to_str().unwrap(),
        "-p",
        prompt,
        "--temp",
        "0",
        "-n",
        "32",
        "--json",
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    json(&infer(&args))
}

#[test]
fn rpc_layers_split_over_the_cpu_and_two_workers_give_the_reference_tokens() {
    let dir = root().join("models/tiny-40b-style");
    let r = reference(&dir);
    let tmp = tempfile::tempdir().unwrap();
    let f32 = tmp.path().join("f32.gguf");
    quantize(&dir, &f32, "f32");
    let (a, b) = (spawn_worker(&[]), spawn_worker(&[]));
    let rpc = format!("{},{}", a.endpoint, b.endpoint);
    let doc = greedy(&f32, &r.prompt, &["--rpc", &rpc, "--tensor-split", "1,1,1"]);
    let devices = &doc["devices"];
    let offload: Vec<String> = devices["offload"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(offload.len(), 2, "both workers hold layers: {devices}");
    assert!(
        offload[0].contains(&a.endpoint) && offload[1].contains(&b.endpoint),
        "{devices}"
    );
    let layers = devices["layers"].as_u64().unwrap();
    let offloaded = devices["offloaded_layers"].as_u64().unwrap();
    assert!(
        offloaded > 0 && offloaded < layers,
        "some layers stay on the CPU: {devices}"
    );
    assert_prefix_agrees(
        "tiny-40b-style over RPC",
        &completion_ids(&doc),
        &r.greedy_ids,
        32,
        eos_id(&dir),
    );

    // At q8_0, the same tokens as the local run.
    let q8 = tmp.path().join("q8_0.gguf");
    quantize(&dir, &q8, "q8_0");
    let local = completion_ids(&greedy(&q8, &r.prompt, &[]));
    let remote = completion_ids(&greedy(
        &q8,
        &r.prompt,
        &["--rpc", &rpc, "--tensor-split", "1,1,1"],
    ));
    assert_eq!(local, remote);
}

#[test]
fn rpc_a_worker_killed_mid_generation_ends_the_client_naming_it() {
    let dir = root().join("models/falcon-mini");
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("q8_0.gguf");
    quantize(&dir, &gguf, "q8_0");
    let mut worker = spawn_worker(&[]);
    let mut client = Command::new(env!("CARGO_BIN_EXE_falcon-infer"))
        .args([
            "bench",
            "-m",
            gguf.to_str().unwrap(),
            "-p",
            "16",
            "-n",
            "200",
            "-r",
            "1000",
        ])
        .args([
            "--threads",
            "1",
            "--rpc",
            &worker.endpoint,
            "--gpu-layers",
            "all",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Let the model load onto the worker and generation start.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        client.try_wait().unwrap().is_none(),
        "the client still runs"
    );
    worker.child.kill().unwrap();
    worker.child.wait().unwrap();
    let killed = Instant::now();
    let status = loop {
        if let Some(s) = client.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed() > Duration::from_secs(20) {
            let _ = client.kill();
            panic!("the client hangs after its worker died");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    client
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "took {:?}",
        killed.elapsed()
    );
    assert!(err.contains(&worker.endpoint), "the worker is named: {err}");
}

#[test]
fn rpc_an_unreachable_worker_is_an_error_naming_it() {
    let dir = root().join("models/falcon-mini");
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("q8_0.gguf");
    quantize(&dir, &gguf, "q8_0");
    let endpoint = format!("127.0.0.1:{}", free_port());
    let t = Instant::now();
    let o = infer(&["-m", gguf.to_str().unwrap(), "-p", "hi", "--rpc", &endpoint]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(&endpoint), "{}", stderr(&o));
    assert!(t.elapsed() < Duration::from_secs(15));
}

/// Whether some socket listens on `port` at exactly 127.0.0.1 (from /proc/net/tcp).
fn listens_on_loopback_only(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let want = format!(":{port:04X}");
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // local address, state 0A = LISTEN
        f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A" && f[1].starts_with("0100007F")
    })
}

#[test]
fn rpc_server_listens_on_loopback_by_default_and_warns_otherwise() {
    let w = spawn_worker(&[]);
    let port: u16 = w.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        TcpStream::connect(&w.endpoint).is_ok(),
        "reachable on loopback"
    );
    assert!(
        listens_on_loopback_only(port),
        "bound to 127.0.0.1, not to every address"
    );
    drop(w);

    let mut any = spawn_worker(&["--host", "0.0.0.0"]);
    std::thread::sleep(Duration::from_millis(300));
    any.child.kill().unwrap();
    let mut err = String::new();
    any.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("warning:"), "{err}");
    assert!(err.contains("no authentication and no encryption"), "{err}");
    assert!(err.contains("trusted network"), "{err}");
}

#[test]
fn rpc_plan_spreads_falcon_180b_over_three_machines_of_48_gb() {
    let o = infer(&[
        "plan",
        "-m",
        "falcon-180b",
        "--bits",
        "4",
        "--vram",
        "none",
        "--cpu-memory",
        "48GiB",
        "--rpc-memory",
        "48GiB,48GiB",
        "--json",
    ]);
    let p = json(&o);
    let devices = p["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 3, "the CPU and two workers: {p}");
    for d in devices {
        assert!(!d["layers"].is_null(), "every machine holds layers: {d}");
        let total = d["weights"].as_u64().unwrap()
            + d["kv_cache"].as_u64().unwrap()
            + d["compute"].as_u64().unwrap();
        assert!(total <= 48 << 30, "{d}");
    }
    assert!(p["network"]["per_generated_token"].as_u64().unwrap() > 0);

    // The human-readable plan says when it does not fit.
    let o = infer(&[
        "plan",
        "-m",
        "falcon-180b",
        "--bits",
        "4",
        "--vram",
        "none",
        "--cpu-memory",
        "48GiB",
        "--rpc-memory",
        "48GiB",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("does not fit"), "{}", stdout(&o));
}

/// `serve` with its layers on a worker that dies: requests end with an error naming the worker,
/// `/health` turns to 503 with the worker's address, and the server goes on answering.
#[test]
fn rpc_serve_reports_a_dead_worker_on_health_and_keeps_answering() {
    use std::io::BufRead;
    let dir = root().join("models/falcon-mini");
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("q8_0.gguf");
    quantize(&dir, &gguf, "q8_0");
    let mut worker = spawn_worker(&[]);
    let mut server = Command::new(env!("CARGO_BIN_EXE_falcon-infer"))
        .args(["serve", "-m", gguf.to_str().unwrap(), "--port", "0"])
        .args([
            "--threads",
            "1",
            "--rpc",
            &worker.endpoint,
            "--gpu-layers",
            "all",
        ])
        .args(["--ctx-size", "256", "--parallel", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = server.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(rest) = line.split(" on http://").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
            }
            sink.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    let Ok(addr) = rx.recv_timeout(Duration::from_secs(60)) else {
        let _ = server.kill();
        panic!("serve did not start: {}", log.lock().unwrap());
    };
    let url = format!("http://{addr}");
    // (status, body) of a small generation request.
    let generate = || -> (u16, String) {
        match ureq::post(&format!("{url}/generate"))
            .set("Content-Type", "application/json")
            .timeout(Duration::from_secs(30))
            .send_string(r#"{"inputs": "And the LORD", "parameters": {"max_new_tokens": 8}}"#)
        {
            Ok(r) | Err(ureq::Error::Status(_, r)) => (r.status(), r.into_string().unwrap()),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(generate().0, 200, "{}", log.lock().unwrap());

    worker.child.kill().unwrap();
    worker.child.wait().unwrap();
    let killed = Instant::now();
    let (status, body) = generate();
    assert_eq!(status, 503, "a request on a dead worker: {body}");
    assert!(body.contains(&worker.endpoint), "{body}");
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "{:?}",
        killed.elapsed()
    );
    match ureq::get(&format!("{url}/health")).call() {
        Err(ureq::Error::Status(503, r)) => {
            let body = r.into_string().unwrap();
            assert!(body.contains(&worker.endpoint), "{body}");
        }
        other => panic!("/health after the worker died: {other:?}"),
    }
    // New requests are refused at once, and the server still answers.
    assert_eq!(generate().0, 503);
    assert!(server.try_wait().unwrap().is_none(), "the server exited");
    assert!(log.lock().unwrap().contains(&worker.endpoint));
    let _ = server.kill();
    let _ = server.wait();
}
