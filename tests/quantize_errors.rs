//! Every bad input gets one clear line naming the file, a non-zero exit, and nothing at the
//! destination.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

/// A copy of a fixture in a fresh temporary directory, with an `out` directory beside it.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new(fixture_name: &str) -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("ck");
        std::fs::create_dir(&ck).unwrap();
        for e in std::fs::read_dir(fixture(fixture_name)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), ck.join(e.file_name())).unwrap();
        }
        std::fs::create_dir(dir.path().join("out")).unwrap();
        Scratch { dir }
    }

    fn ck(&self) -> PathBuf {
        self.dir.path().join("ck")
    }

    fn out_dir(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    fn out(&self) -> PathBuf {
        self.out_dir().join("model.gguf")
    }

    fn run(&self) -> Output {
        quantize(&[
            self.ck().to_str().unwrap(),
            "-o",
            self.out().to_str().unwrap(),
            "--type",
            "q8_0",
        ])
    }

    fn edit_config(&self, f: impl FnOnce(&mut serde_json::Value)) {
        let p = self.ck().join("config.json");
        let mut j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut j);
        std::fs::write(&p, serde_json::to_string(&j).unwrap()).unwrap();
    }
}

/// Asserts a failed run: exit 1, one line on stderr containing every `needles`, nothing written.
fn assert_fails(o: &Output, out_dir: &Path, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "exit status; stderr: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(err.starts_with("falcon-quantize: error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in: {err}");
    }
    if out_dir.is_dir() {
        assert!(
            entries(out_dir).is_empty(),
            "left behind: {:?}",
            entries(out_dir)
        );
    }
}

#[test]
fn missing_directory() {
    let s = Scratch::new("tiny-7b-style");
    let o = quantize(&["/no/such/checkpoint", "-o", s.out().to_str().unwrap()]);
    assert_fails(
        &o,
        &s.out_dir(),
        &["/no/such/checkpoint", "not a directory"],
    );
}

#[test]
fn missing_config() {
    let s = Scratch::new("tiny-7b-style");
    std::fs::remove_file(s.ck().join("config.json")).unwrap();
    assert_fails(&s.run(), &s.out_dir(), &["config.json"]);
}

#[test]
fn invalid_json() {
    let s = Scratch::new("tiny-7b-style");
    std::fs::write(s.ck().join("config.json"), "{\"model_type\": \"falcon\",").unwrap();
    assert_fails(&s.run(), &s.out_dir(), &["config.json", "invalid JSON"]);
}

#[test]
fn unknown_architecture() {
    let s = Scratch::new("tiny-7b-style");
    s.edit_config(|j| {
        j["model_type"] = "llama".into();
        j["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    });
    assert_fails(
        &s.run(),
        &s.out_dir(),
        &["config.json", "'llama' is not Falcon"],
    );
}

#[test]
fn unsupported_variants() {
    for (key, value, words) in [
        ("alibi", serde_json::json!(true), "ALiBi"),
        ("bias", serde_json::json!(true), "biases"),
        (
            "parallel_attn",
            serde_json::json!(false),
            "sequential attention",
        ),
        ("rope_theta", serde_json::json!(1e6), "RoPE base"),
    ] {
        let s = Scratch::new("tiny-7b-style");
        s.edit_config(|j| j[key] = value);
        assert_fails(
            &s.run(),
            &s.out_dir(),
            &["config.json", "unsupported model", words],
        );
    }
}

#[test]
fn missing_shard() {
    let s = Scratch::new("tiny-40b-style");
    let shard = entries(&s.ck())
        .into_iter()
        .find(|n| n.starts_with("model-") && n.ends_with(".safetensors"))
        .unwrap();
    std::fs::remove_file(s.ck().join(&shard)).unwrap();
    assert_fails(
        &s.run(),
        &s.out_dir(),
        &["model.safetensors.index.json", &shard, "missing"],
    );
}

fn weights_file(s: &Scratch) -> PathBuf {
    let name = entries(&s.ck())
        .into_iter()
        .find(|n| n.ends_with(".safetensors"))
        .unwrap();
    s.ck().join(name)
}

#[test]
fn truncated_safetensors() {
    let s = Scratch::new("tiny-7b-style");
    let p = weights_file(&s);
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_fails(
        &s.run(),
        &s.out_dir(),
        &[p.file_name().unwrap().to_str().unwrap(), "truncated"],
    );
}

#[test]
fn shape_disagrees_with_config() {
    let s = Scratch::new("tiny-7b-style");
    s.edit_config(|j| {
        let v = j["vocab_size"].as_u64().unwrap();
        j["vocab_size"] = (v + 64).into();
    });
    assert_fails(
        &s.run(),
        &s.out_dir(),
        &["word_embeddings.weight", "has shape", "config.json implies"],
    );
}

/// Rewrites the weights file with `f` applied to one tensor: (name, dtype, shape, bytes).
fn rewrite_tensor(p: &Path, f: impl Fn(&str, &mut safetensors::Dtype, &mut Vec<u8>)) {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n.clone(), v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    for (name, dtype, _, data) in &mut owned {
        f(name, dtype, data);
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, p).unwrap();
}

#[test]
fn unsupported_dtype() {
    let s = Scratch::new("tiny-7b-style");
    // Same byte size, other dtype: an int16 tensor.
    rewrite_tensor(&weights_file(&s), |name, dtype, _| {
        if name.ends_with("h.0.mlp.dense_h_to_4h.weight") {
            *dtype = safetensors::Dtype::I16;
        }
    });
    assert_fails(
        &s.run(),
        &s.out_dir(),
        &[
            "h.0.mlp.dense_h_to_4h.weight",
            "I16",
            "only BF16, F16 and F32",
        ],
    );
}

#[test]
fn nan_in_a_weight_names_the_tensor() {
    let s = Scratch::new("tiny-7b-style");
    rewrite_tensor(&weights_file(&s), |name, _, data| {
        if name.ends_with("h.1.self_attention.dense.weight") {
            // bf16 NaN at element 70.
            data[140] = 0xc0;
            data[141] = 0x7f;
        }
    });
    assert_fails(
        &s.run(),
        &s.out_dir(),
        &["h.1.self_attention.dense.weight", "NaN", "corrupt"],
    );
}

#[test]
fn unwritable_destination() {
    let s = Scratch::new("tiny-7b-style");
    let o = quantize(&[s.ck().to_str().unwrap(), "-o", "/no/such/dir/model.gguf"]);
    assert_fails(
        &o,
        &s.out_dir(),
        &["/no/such/dir/model.gguf", "cannot write"],
    );
    // A destination below a regular file.
    let file = s.out_dir().join("file");
    std::fs::write(&file, b"x").unwrap();
    let o = quantize(&[
        s.ck().to_str().unwrap(),
        "-o",
        file.join("model.gguf").to_str().unwrap(),
    ]);
    std::fs::remove_file(&file).unwrap();
    assert_fails(&o, &s.out_dir(), &["model.gguf", "cannot write"]);
}

#[test]
fn full_disk() {
    let s = Scratch::new("tiny-7b-style");
    // A file-size limit of 64 KiB stands in for a full disk: the write fails part-way.
    let cmd = format!(
        "ulimit -f 64; exec '{}' '{}' -o '{}' --type f32",
        quantize_bin(),
        s.ck().display(),
        s.out().display()
    );
    let o = Command::new("bash").arg("-c").arg(cmd).output().unwrap();
    assert_fails(&o, &s.out_dir(), &["model.gguf", "file size limit"]);
}

#[test]
fn ctrl_c_mid_write_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    // A one-layer checkpoint with Falcon-7B's widths: large enough to interrupt mid-write.
    let o = quantize(&[
        "synth",
        "--shape",
        "falcon-7b",
        "--layers",
        "1",
        "-o",
        ck.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("model.gguf");
    let mut child = Command::new(quantize_bin())
        .args([
            ck.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--type",
            "f32",
            "--threads",
            "1",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the temporary file holds data, then interrupt.
    let started = std::time::Instant::now();
    loop {
        let partial = entries(&out_dir)
            .into_iter()
            .find(|n| n.ends_with(".partial"));
        if let Some(p) = partial {
            if std::fs::metadata(out_dir.join(p))
                .map(|m| m.len() > 1 << 20)
                .unwrap_or(false)
            {
                break;
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be interrupted"
        );
        assert!(started.elapsed().as_secs() < 120, "no output after 120 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: sending a signal to our own child process, whose pid is valid until it is waited for.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(
        entries(&out_dir).is_empty(),
        "left behind: {:?}",
        entries(&out_dir)
    );
}

#[test]
fn bits_and_type_together_are_a_usage_error() {
    let s = Scratch::new("tiny-7b-style");
    let o = quantize(&[
        s.ck().to_str().unwrap(),
        "-o",
        s.out().to_str().unwrap(),
        "--bits",
        "8",
        "--type",
        "q4_0",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("'--bits <BITS>' cannot be used with '--type <TYPE>'"),
        "{err}"
    );
    assert!(entries(&s.out_dir()).is_empty());
}
