//! Helpers shared by the `infer_*` integration tests: fixtures under `models/` and running the
//! real binaries.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every fixture: `models/<name>/` with a `reference.json`, sorted by name.
pub fn fixtures() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("models"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.join("reference.json").is_file() && p.join("config.json").is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    assert!(
        !v.is_empty(),
        "no fixtures (models/<name>/reference.json) found"
    );
    v
}

/// The fixture with the smallest weights, for tests that only need some valid model.
pub fn smallest_fixture() -> PathBuf {
    fixtures()
        .into_iter()
        .min_by_key(|p| dir_size(p))
        .expect("at least one fixture")
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The reference outputs of a fixture.
#[derive(Debug, serde::Deserialize)]
pub struct Reference {
    pub prompt: String,
    pub prompt_ids: Vec<i32>,
    pub greedy_ids: Vec<i32>,
    pub greedy_text: String,
}

pub fn reference(dir: &Path) -> Reference {
    let text = std::fs::read_to_string(dir.join("reference.json")).expect("reading reference.json");
    serde_json::from_str(&text).expect("parsing reference.json")
}

/// The end-of-text id from the fixture's config.json (11 for Falcon).
pub fn eos_id(dir: &Path) -> i32 {
    let text = std::fs::read_to_string(dir.join("config.json")).expect("config.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("config.json is JSON");
    v.get("eos_token_id")
        .and_then(serde_json::Value::as_i64)
        .unwrap_or(11) as i32
}

/// Copies a checkpoint directory (its regular files) into `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for e in std::fs::read_dir(from)
        .expect("read fixture")
        .filter_map(Result::ok)
    {
        let p = e.path();
        let name = e.file_name();
        if p.is_file() && !name.to_string_lossy().ends_with(".gguf") {
            std::fs::copy(&p, to.join(name)).expect("copy");
        }
    }
}

/// Runs `falcon-quantize DIR -o OUT --type TYPE --quiet`.
pub fn quantize(dir: &Path, out: &Path, ty: &str) {
    let o = Command::new(env!("CARGO_BIN_EXE_falcon-quantize"))
        .arg(dir)
        .arg("-o")
        .arg(out)
        .args(["--type", ty, "--quiet"])
        .output()
        .expect("running falcon-quantize");
    assert!(
        o.status.success(),
        "falcon-quantize {} --type {ty} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs `falcon-infer` with the given arguments (no stdin).
pub fn infer(args: &[&str]) -> Output {
    infer_env(args, &[])
}

/// Runs `falcon-infer` with extra environment variables.
pub fn infer_env(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_falcon-infer"));
    c.args(args).stdin(std::process::Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("running falcon-infer")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Parses `--json` output, failing with stderr shown.
pub fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "falcon-infer failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {}", stdout(o)))
}

/// Token ids of the first completion of a `--json` document.
pub fn completion_ids(doc: &serde_json::Value) -> Vec<i32> {
    doc["completions"][0]["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .map(|v| v.as_i64().expect("id") as i32)
        .collect()
}

/// Greedy ids agree with the reference for `n` tokens, where a completion that ended at
/// end-of-text agrees when the reference has end-of-text (or stops) at that point.
pub fn assert_prefix_agrees(name: &str, got: &[i32], want: &[i32], n: usize, eos: i32) {
    let n = n.min(want.len());
    for i in 0..n {
        match got.get(i) {
            Some(g) => assert_eq!(
                *g, want[i],
                "{name}: token {i} differs: got {got:?}, reference {want:?}"
            ),
            None => {
                assert_eq!(
                    want[i], eos,
                    "{name}: stopped after {i} tokens but the reference goes on: got {got:?}, reference {want:?}"
                );
                return;
            }
        }
    }
}
