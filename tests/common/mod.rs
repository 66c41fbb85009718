//! Helpers shared by the integration tests: fixtures, references, running the binaries.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde::Deserialize;

/// The checkpoints under `models/` that have a `reference.json`.
pub const FIXTURES: &[&str] = &[
    "tiny-7b-style",
    "tiny-40b-style",
    "tiny-legacy-rw",
    "tiny-k256",
    "falcon-mini",
];

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    repo().join("models").join(name)
}

/// transformers' outputs for a fixed prompt, written by `models/make_fixtures.py`.
#[derive(Debug, Deserialize)]
pub struct Reference {
    pub prompt: String,
    pub prompt_ids: Vec<i32>,
    /// float32 logits at every prompt position.
    pub logits: Vec<Vec<f32>>,
    /// Greedy continuation of 32 tokens.
    pub greedy_ids: Vec<i32>,
    pub greedy_text: String,
}

pub fn reference(name: &str) -> Reference {
    let path = fixture(name).join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn quantize_bin() -> &'static str {
    env!("CARGO_BIN_EXE_falcon-quantize")
}

pub fn infer_bin() -> &'static str {
    env!("CARGO_BIN_EXE_falcon-infer")
}

/// Runs falcon-quantize with the given arguments.
pub fn quantize(args: &[&str]) -> Output {
    Command::new(quantize_bin())
        .args(args)
        .output()
        .expect("falcon-quantize runs")
}

/// A GGUF of `fixture` at `ty`, made once per test process and kept in a temporary directory.
pub fn gguf(fixture_name: &str, ty: &str) -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("tempdir"));
    let out = dir.path().join(format!("{fixture_name}-{ty}.gguf"));
    if !out.exists() {
        let src = fixture(fixture_name);
        let o = quantize(&[
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--type",
            ty,
            "--quiet",
        ]);
        assert!(
            o.status.success(),
            "falcon-quantize {fixture_name} --type {ty}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    out
}

/// Every entry of a directory, for checking that nothing was left behind.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Softmax of logits in f64.
pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exp: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

/// KL(p_ref || p) in nats.
pub fn kl(reference: &[f32], ours: &[f32]) -> f64 {
    let p = softmax(reference);
    let q = softmax(ours);
    p.iter()
        .zip(&q)
        .filter(|(p, _)| **p > 0.0)
        .map(|(p, q)| p * (p / q.max(1e-300)).ln())
        .sum()
}

pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(0, |best, (i, &x)| if x > v[best] { i } else { best })
}

/// The PEFT LoRA adapter fixtures under `models/`.
pub const ADAPTERS: &[&str] = &[
    "lora-tiny-7b-all",
    "lora-tiny-7b-rslora",
    "lora-tiny-40b-all",
    "lora-tiny-40b-patterns",
];

/// The base fixture an adapter was made on (its reference.json's "base").
pub fn base_of(adapter: &str) -> String {
    let path = fixture(adapter).join("reference.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["base"]
        .as_str()
        .expect("reference.json names its base")
        .to_string()
}
