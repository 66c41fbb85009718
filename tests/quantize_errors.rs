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

#[test]
fn config_values_out_of_range_name_the_key_value_and_limit() {
    for (key, value, limit) in [
        (
            "hidden_size",
            serde_json::json!(1u64 << 40),
            "from 1 to 65536",
        ),
        (
            "num_hidden_layers",
            serde_json::json!(1u64 << 33),
            "from 1 to 1024",
        ),
        ("num_attention_heads", serde_json::json!(0), "from 1 to 192"),
        ("num_kv_heads", serde_json::json!(7), "from 1 to 6"),
        (
            "vocab_size",
            serde_json::json!(1u64 << 32),
            "from 1 to 4194304",
        ),
        (
            "ffn_hidden_size",
            serde_json::json!(u64::MAX),
            "4 × hidden_size (768)",
        ),
        // Used to panic when written as a u32.
        (
            "max_position_embeddings",
            serde_json::json!(1u64 << 32),
            "from 1 to 1048576",
        ),
        (
            "bos_token_id",
            serde_json::json!(1024),
            "below vocab_size, 1024",
        ),
        (
            "eos_token_id",
            serde_json::json!(-1),
            "below vocab_size, 1024",
        ),
        (
            "layer_norm_epsilon",
            serde_json::json!(1e40),
            "a number from 1e-30 to 1",
        ),
    ] {
        let s = Scratch::new("tiny-7b-style");
        let shown = if key == "ffn_hidden_size" {
            format!("{key} {value}")
        } else {
            format!("'{key}' is {value}")
        };
        s.edit_config(|j| j[key] = value);
        assert_fails(&s.run(), &s.out_dir(), &["config.json", &shown, limit]);
    }
}

#[test]
fn a_tensor_in_two_shards_names_both_files() {
    let s = Scratch::new("tiny-40b-style");
    let shards: Vec<String> = entries(&s.ck())
        .into_iter()
        .filter(|n| n.starts_with("model-") && n.ends_with(".safetensors"))
        .collect();
    // The first shard's attention matrix, also written into the last shard.
    let read = |name: &str| std::fs::read(s.ck().join(name)).unwrap();
    let first = read(&shards[0]);
    let first = safetensors::SafeTensors::deserialize(&first).unwrap();
    let (dup_name, dup) = first
        .tensors()
        .into_iter()
        .find(|(n, _)| n.ends_with("self_attention.dense.weight"))
        .unwrap();
    let last_name = shards.last().unwrap();
    let last = read(last_name);
    let last = safetensors::SafeTensors::deserialize(&last).unwrap();
    let mut views = last.tensors();
    views.push((dup_name.clone(), dup));
    safetensors::serialize_to_file(views, None, &s.ck().join(last_name)).unwrap();
    assert_fails(
        &s.run(),
        &s.out_dir(),
        &[&dup_name, "is in both", &shards[0], last_name],
    );
}

/// Usage errors, ours as well as clap's, exit with 2 as `--help` says, with clap's usage line.
#[test]
fn usage_errors_exit_2() {
    let s = Scratch::new("tiny-7b-style");
    let (ck, out) = (s.ck(), s.out());
    let (ck, out) = (ck.to_str().unwrap(), out.to_str().unwrap());
    for (args, words) in [
        (vec![ck], "no output file given"),
        (vec!["-o", out], "no checkpoint directory given"),
        (vec![ck, "-o", out, "--threads", "0"], "--threads"),
        (vec![ck, "-o", out, "--bits", "5"], "--bits"),
        (vec![ck, "-o", out, "--type", "q3_k"], "unknown type 'q3_k'"),
        (vec![ck, "-o", out, "--no-such-flag"], "--no-such-flag"),
        (
            vec!["synth", "--shape", "falcon-7b", "-o", out, "--layers", "33"],
            "--layers 33 is more than the 32 layers of falcon-7b",
        ),
        (
            vec!["synth", "--shape", "falcon-7b", "-o", out, "--layers", "0"],
            "--layers",
        ),
    ] {
        let o = quantize(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(words), "{args:?}: {words:?} not in {err}");
        assert!(err.contains("--help"), "{args:?}: {err}");
        assert!(entries(&s.out_dir()).is_empty(), "{args:?}");
    }
}
