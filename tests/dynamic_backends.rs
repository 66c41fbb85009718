//! The portable build (`dynamic-backends`, gathered by scripts/package-portable.sh): it starts
//! and runs a fixture on a CPU-only machine from wherever it is copied, and says in one line why
//! a GPU backend library beside it cannot be used.
//!
//! Ignored by default, since it needs that build: CI runs it with
//! `FALCON_PORTABLE_DIR=<dir> cargo test --release --test dynamic_backends -- --ignored`.

mod infer_support;

use std::path::Path;
use std::process::Command;

use infer_support::*;

fn copy_dir_all(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().filter_map(Result::ok) {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
#[ignore = "needs the portable build: set FALCON_PORTABLE_DIR (scripts/package-portable.sh)"]
fn portable_build_runs_on_the_cpu_and_explains_an_unusable_gpu_library() {
    let dist = std::env::var_os("FALCON_PORTABLE_DIR")
        .expect("FALCON_PORTABLE_DIR names the directory scripts/package-portable.sh wrote");
    let tmp = tempfile::tempdir().unwrap();
    // Copied elsewhere, as a user copies it to another machine.
    let bin_dir = tmp.path().join("falcon");
    copy_dir_all(Path::new(&dist), &bin_dir);
    let exe = bin_dir.join("falcon-infer");
    let help = Command::new(&exe).arg("--help").output().unwrap();
    assert!(
        help.status.success(),
        "{}",
        String::from_utf8_lossy(&help.stderr)
    );

    let fixture = root().join("models/tiny-40b-style");
    let r = reference(&fixture);
    let gguf = tmp.path().join("f32.gguf");
    quantize(&fixture, &gguf, "f32");
    let elsewhere = tmp.path().join("cwd");
    std::fs::create_dir(&elsewhere).unwrap();
    let run = || {
        Command::new(&exe)
            .current_dir(&elsewhere)
            .env_remove("LD_LIBRARY_PATH")
            .args(["-m", gguf.to_str().unwrap(), "-p", &r.prompt])
            .args(["--temp", "0", "-n", "32", "--json", "--threads", "2"])
            .output()
            .unwrap()
    };
    let o = run();
    let doc = json(&o);
    assert_prefix_agrees(
        "portable build",
        &completion_ids(&doc),
        &r.greedy_ids,
        32,
        eos_id(&fixture),
    );
    assert!(doc["devices"]["notice"].is_null(), "{}", doc["devices"]);
    assert!(!stderr(&o).contains("no usable GPU"), "{}", stderr(&o));

    // A CUDA backend library that cannot load (here: not a library at all).
    std::fs::write(bin_dir.join("libggml-cuda.so"), b"not an ELF file").unwrap();
    let o = run();
    let doc = json(&o);
    assert_prefix_agrees(
        "portable build",
        &completion_ids(&doc),
        &r.greedy_ids,
        32,
        eos_id(&fixture),
    );
    let err = stderr(&o);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("no usable GPU"))
        .collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(
        lines[0].starts_with("warning: CUDA build, but no usable GPU: "),
        "{err}"
    );
    assert!(lines[0].ends_with("; running on the CPU"), "{err}");
    assert!(
        lines[0].contains("libggml-cuda.so"),
        "the reason names the library: {err}"
    );
    assert_eq!(
        doc["devices"]["notice"]
            .as_str()
            .map(|s| s.contains("no usable GPU")),
        Some(true)
    );
}
