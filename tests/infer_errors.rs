//! Each error path of `falcon-infer`: a clear message and exit status 1, 2 for usage errors (or
//! a warning).

mod infer_support;

use infer_support::*;

fn assert_fails_with(o: &std::process::Output, needle: &str) {
    assert_exits_with(o, 1, needle);
}

fn assert_usage_error(o: &std::process::Output, needle: &str) {
    assert_exits_with(o, 2, needle);
}

fn assert_exits_with(o: &std::process::Output, code: i32, needle: &str) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "expected exit {code}; stderr: {}",
        stderr(o)
    );
    let err = stderr(o);
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert_eq!(
        err.matches("error:").count(),
        1,
        "error printed more than once: {err}"
    );
}

#[test]
fn infer_missing_model_is_an_error() {
    let o = infer(&["-m", "/nonexistent/falcon.gguf", "-p", "hi"]);
    assert_fails_with(&o, "model not found");
}

#[test]
fn infer_no_model_is_an_error() {
    let o = infer(&["-p", "hi"]);
    assert_usage_error(&o, "--model");
}

#[test]
fn infer_garbage_gguf_fails_validation() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.gguf");
    std::fs::write(
        &bad,
        b"GGUF\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xffgarbage",
    )
    .unwrap();
    let o = infer(&["-m", bad.to_str().unwrap(), "-p", "hi"]);
    assert_fails_with(&o, "not a valid GGUF");
}

#[test]
fn infer_truncated_gguf_fails_validation() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.gguf");
    quantize(&smallest_fixture(), &good, "q8_0");
    let bytes = std::fs::read(&good).unwrap();
    let bad = tmp.path().join("truncated.gguf");
    std::fs::write(&bad, &bytes[..bytes.len() - 100]).unwrap();
    let o = infer(&["-m", bad.to_str().unwrap(), "-p", "hi"]);
    assert_fails_with(&o, "not a valid GGUF");
}

#[test]
fn infer_directory_that_is_not_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let o = infer(&["-m", tmp.path().to_str().unwrap(), "-p", "hi"]);
    assert_fails_with(&o, "not a Falcon checkpoint");
    std::fs::write(tmp.path().join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let o = infer(&["-m", tmp.path().to_str().unwrap(), "-p", "hi"]);
    assert_fails_with(&o, "not a Falcon checkpoint");
}

#[test]
fn infer_prompt_longer_than_context() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("m.gguf");
    quantize(&smallest_fixture(), &gguf, "q8_0");
    let prompt = "the quick brown fox jumps over the lazy dog ".repeat(20);
    let o = infer(&[
        "-m",
        gguf.to_str().unwrap(),
        "-p",
        &prompt,
        "--ctx-size",
        "64",
    ]);
    assert_fails_with(&o, "--ctx-size");
}

#[test]
fn infer_bad_bits_is_an_error() {
    let o = infer(&["-m", "/nonexistent", "--bits", "5", "-p", "hi"]);
    assert_usage_error(&o, "--bits");
    for args in [
        &["-m", "/nonexistent", "--gpu-layers", "many", "-p", "hi"][..],
        &["-m", "/nonexistent", "--tensor-split", "1,-1", "-p", "hi"][..],
        &["-m", "/nonexistent", "--ctx-size", "0", "-p", "hi"][..],
        &["-m", "/nonexistent", "--temp", "-1", "-p", "hi"][..],
        &["-m", "/nonexistent", "--rpc", "nohost", "-p", "hi"][..],
        &["plan", "-m", "falcon-7b", "--vram", "lots"][..],
    ] {
        let o = infer(args);
        assert_usage_error(&o, "--");
    }
}

#[test]
fn infer_gpu_layers_on_cpu_build_is_a_warning() {
    if cfg!(feature = "cuda") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("m.gguf");
    quantize(&smallest_fixture(), &gguf, "q8_0");
    let o = infer(&[
        "-m",
        gguf.to_str().unwrap(),
        "-p",
        "Hello",
        "-n",
        "4",
        "--gpu-layers",
        "99",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning:"),
        "no warning: {}",
        stderr(&o)
    );
}

#[test]
fn infer_output_into_a_closed_pipe_ends_quietly_with_status_0() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("m.gguf");
    quantize(&smallest_fixture(), &gguf, "q8_0");
    // `head -c 1` reads one byte and closes the pipe while falcon-infer still writes.
    let cmd = format!(
        "set -o pipefail; '{}' -m '{}' -p 'And it came to pass' -n 200 --temp 0 --threads 2 2>{}/err | head -c 1 >/dev/null",
        env!("CARGO_BIN_EXE_falcon-infer"),
        gguf.display(),
        tmp.path().display()
    );
    let o = std::process::Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .output()
        .unwrap();
    let err = std::fs::read_to_string(tmp.path().join("err")).unwrap();
    assert!(o.status.success(), "status {:?}; stderr: {err}", o.status);
    assert!(!err.contains("error"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
