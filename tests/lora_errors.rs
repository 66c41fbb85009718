//! `falcon-quantize lora` on bad adapters: one line naming the file, key or tensor and what to
//! do, exit status 1, and nothing at the destination.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// A copy of the adapter fixture `name` in a temporary directory, changed by `edit`.
fn variant(name: &str, edit: impl FnOnce(&Path)) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture(name).join(f), dir.join(f)).unwrap();
    }
    edit(&dir);
    (tmp, dir)
}

/// Sets `key` of the adapter's config to `value`.
fn set_config(dir: &Path, key: &str, value: serde_json::Value) {
    let path = dir.join("adapter_config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json[key] = value;
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
}

/// Runs the conversion, expects it to fail, checks that the destination directory is as it
/// was, and returns the one line of stderr.
fn fails(adapter: &Path, base: &Path) -> String {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("adapter.gguf");
    let o = quantize(&[
        "lora",
        adapter.to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "expected a failure, got: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("falcon-quantize: error: "), "{err}");
    assert!(
        entries(out_dir.path()).is_empty(),
        "left behind: {:?}",
        entries(out_dir.path())
    );
    err
}

fn has(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "{p:?} not in: {err}");
    }
}

#[test]
fn adapter_for_another_base_names_the_first_mismatching_tensor() {
    let err = fails(&fixture("lora-tiny-7b-all"), &fixture("tiny-40b-style"));
    has(
        &err,
        &[
            "adapter_model.safetensors",
            "base_model.model.transformer.h.0.self_attention.query_key_value.lora_A.weight",
            "[8, 192]",
            "[8, 256]",
            "another base model",
            "tiny-7b-style",
        ],
    );
    // Same architecture, another width.
    let err = fails(&fixture("lora-tiny-7b-all"), &fixture("tiny-k256"));
    has(
        &err,
        &["query_key_value.lora_A.weight", "another base model"],
    );
    // With a GGUF as the base.
    let err = fails(&fixture("lora-tiny-7b-rslora"), &gguf("tiny-k256", "f32"));
    has(
        &err,
        &[
            "h.0.self_attention.query_key_value.lora_A.weight",
            "[16, 256]",
            "another base model",
        ],
    );
}

#[test]
fn blocks_the_base_does_not_have() {
    // The 3-block base's adapter on blocks 0 and 2, moved to blocks 0 and 5.
    let (_t, dir) = variant("lora-tiny-7b-rslora", |d| {
        let path = d.join("adapter_model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let renamed: Vec<(String, TensorView<'_>)> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n.replace(".h.2.", ".h.5."), v))
            .collect();
        std::fs::write(&path, safetensors::serialize(renamed, None).unwrap()).unwrap();
        set_config(d, "layers_to_transform", serde_json::json!([0, 5]));
    });
    let err = fails(&dir, &fixture("tiny-7b-style"));
    has(
        &err,
        &[
            "transformer.h.5.",
            "block 5 does not exist",
            "3 blocks",
            "another base model",
        ],
    );
}

#[test]
fn target_module_that_is_not_a_falcon_linear_layer() {
    let (_t, dir) = variant("lora-tiny-7b-all", |d| {
        set_config(d, "target_modules", serde_json::json!(["q_proj", "v_proj"]))
    });
    let err = fails(&dir, &fixture("tiny-7b-style"));
    has(
        &err,
        &[
            "adapter_config.json",
            "target_modules",
            "\"q_proj\"",
            "query_key_value",
        ],
    );
    let (_t, dir) = variant("lora-tiny-7b-all", |d| {
        set_config(
            d,
            "target_modules",
            serde_json::json!(["query_key_value", "lm_head"]),
        )
    });
    let err = fails(&dir, &fixture("tiny-7b-style"));
    has(&err, &["target_modules", "\"lm_head\"", "modules_to_save"]);
}

#[test]
fn dora_is_refused() {
    let (_t, dir) = variant("lora-tiny-7b-all", |d| {
        set_config(d, "use_dora", true.into())
    });
    let err = fails(&dir, &fixture("tiny-7b-style"));
    has(&err, &["adapter_config.json", "use_dora", "DoRA", "merge"]);
}

#[test]
fn fan_in_fan_out_is_refused() {
    let (_t, dir) = variant("lora-tiny-40b-all", |d| {
        set_config(d, "fan_in_fan_out", true.into())
    });
    let err = fails(&dir, &fixture("tiny-40b-style"));
    has(&err, &["adapter_config.json", "fan_in_fan_out", "Conv1D"]);
}

#[test]
fn bias_all_is_refused() {
    let (_t, dir) = variant("lora-tiny-7b-all", |d| set_config(d, "bias", "all".into()));
    let err = fails(&dir, &fixture("tiny-7b-style"));
    has(&err, &["adapter_config.json", "bias", "\"none\""]);
}

#[test]
fn missing_files() {
    let (_t, dir) = variant("lora-tiny-7b-all", |d| {
        std::fs::remove_file(d.join("adapter_model.safetensors")).unwrap()
    });
    let err = fails(&dir, &fixture("tiny-7b-style"));
    has(&err, &["no adapter_model.safetensors", "copy"]);
    let (_t, dir) = variant("lora-tiny-7b-all", |d| {
        std::fs::remove_file(d.join("adapter_config.json")).unwrap()
    });
    let err = fails(&dir, &fixture("tiny-7b-style"));
    has(&err, &["no adapter_config.json"]);
    let err = fails(Path::new("/nonexistent/adapter"), &fixture("tiny-7b-style"));
    has(&err, &["/nonexistent/adapter", "not a directory"]);
}

#[test]
fn truncated_weights() {
    let (_t, dir) = variant("lora-tiny-40b-all", |d| {
        let path = d.join("adapter_model.safetensors");
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len / 2).unwrap();
    });
    let err = fails(&dir, &fixture("tiny-40b-style"));
    has(
        &err,
        &[
            "adapter_model.safetensors",
            "not a valid safetensors file",
            "truncated",
        ],
    );
}

#[test]
fn a_missing_pair_is_named() {
    let (_t, dir) = variant("lora-tiny-7b-all", |d| {
        let path = d.join("adapter_model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let kept: Vec<(String, TensorView<'_>)> = st
            .tensors()
            .into_iter()
            .filter(|(n, _)| !n.contains("h.1.mlp.dense_4h_to_h.lora_B"))
            .collect();
        std::fs::write(&path, safetensors::serialize(kept, None).unwrap()).unwrap();
    });
    let err = fails(&dir, &fixture("tiny-7b-style"));
    has(
        &err,
        &[
            "has no tensor base_model.model.transformer.h.1.mlp.dense_4h_to_h.lora_B.weight",
            "incomplete",
        ],
    );
}

#[test]
fn rank_disagreeing_with_the_config() {
    let (_t, dir) = variant("lora-tiny-7b-all", |d| set_config(d, "r", 4.into()));
    let err = fails(&dir, &fixture("tiny-7b-style"));
    has(&err, &["lora_A.weight has rank 8", "rank 4 (from r)"]);
}

#[test]
fn pickle_adapter_is_refused_with_advice() {
    let (_t, dir) = variant("lora-tiny-7b-all", |d| {
        std::fs::remove_file(d.join("adapter_model.safetensors")).unwrap();
        // A pickle's first bytes (protocol 2); never read further.
        std::fs::write(d.join("adapter_model.bin"), b"\x80\x02}q\x00.").unwrap();
    });
    let err = fails(&dir, &fixture("tiny-7b-style"));
    has(
        &err,
        &["adapter_model.bin", "pickle", "safe_serialization=True"],
    );
}

#[test]
fn lm_head_replacement_needs_an_untied_base_at_run_time() {
    // The 7B-style base ties lm_head to the embeddings.
    let (_t, dir) = variant("lora-tiny-7b-all", |d| {
        let path = d.join("adapter_model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let head = vec![0u8; 1024 * 192 * 4];
        let mut all: Vec<(String, TensorView<'_>)> = st.tensors();
        all.push((
            "base_model.model.lm_head.weight".into(),
            TensorView::new(Dtype::F32, vec![1024, 192], &head).unwrap(),
        ));
        std::fs::write(&path, safetensors::serialize(all, None).unwrap()).unwrap();
        set_config(d, "modules_to_save", serde_json::json!(["lm_head"]));
    });
    let err = fails(&dir, &fixture("tiny-7b-style"));
    has(&err, &["modules_to_save", "lm_head", "ties", "--lora"]);
}

#[test]
fn existing_destination_is_left_alone_on_failure() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("adapter.gguf");
    std::fs::write(&out, b"keep me").unwrap();
    let o = quantize(&[
        "lora",
        fixture("lora-tiny-7b-all").to_str().unwrap(),
        "--base",
        fixture("tiny-40b-style").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    assert_eq!(entries(out_dir.path()), vec!["adapter.gguf"]);
}

#[test]
fn bad_type_and_base() {
    let o = quantize(&[
        "lora",
        fixture("lora-tiny-7b-all").to_str().unwrap(),
        "--base",
        fixture("tiny-7b-style").to_str().unwrap(),
        "-o",
        "/tmp/never-written.gguf",
        "--type",
        "q4_0",
    ]);
    assert_eq!(o.status.code(), Some(2), "clap refuses the value");
    assert!(String::from_utf8_lossy(&o.stderr).contains("f32, f16, bf16 or q8_0"));
    // A base that is an adapter, not a model.
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("a.gguf");
    let o = quantize(&[
        "lora",
        fixture("lora-tiny-7b-all").to_str().unwrap(),
        "--base",
        fixture("tiny-7b-style").to_str().unwrap(),
        "-o",
        adapter.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = fails(&fixture("lora-tiny-7b-all"), &adapter);
    has(&err, &["a.gguf", "adapter, not a model"]);
}
