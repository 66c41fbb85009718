//! `falcon-quantize CHECKPOINT --lora ADAPTER[:SCALE]`: adapters merged in the one pass,
//! compared with peft's logits and greedy continuation through llama.cpp.

mod common;
mod lora_support;

use std::path::{Path, PathBuf};

use common::*;
use convert::gguf::{GgufReader, Value};
use lora_support::{rel_err, run};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// `falcon-quantize BASE --lora L1 --lora L2 … -o OUT --type TY`.
fn merge(base: &Path, loras: &[String], out: &Path, ty: &str) {
    let mut args = vec![
        base.to_str().unwrap().to_string(),
        "-o".into(),
        out.to_str().unwrap().into(),
        "--type".into(),
        ty.into(),
    ];
    for l in loras {
        args.push("--lora".into());
        args.push(l.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = quantize(&args);
    assert!(
        o.status.success(),
        "falcon-quantize {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The values of an f32 tensor of a GGUF file.
fn f32_data(g: &GgufReader, name: &str) -> Vec<f32> {
    let t = g.tensor(name).unwrap_or_else(|| panic!("no {name}"));
    assert_eq!(t.ty.name, "f32", "{name}");
    g.tensor_data(t)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn lora_arg(adapter: &str, scale: Option<f32>) -> String {
    let dir = fixture(adapter).to_str().unwrap().to_string();
    match scale {
        Some(s) => format!("{dir}:{s}"),
        None => dir,
    }
}

#[test]
fn merged_f32_gives_peft_logits_and_greedy() {
    let dir = tempfile::tempdir().unwrap();
    for name in ADAPTERS {
        let r = reference(name);
        let out = dir.path().join(format!("{name}.gguf"));
        merge(
            &fixture(&base_of(name)),
            &[lora_arg(name, None)],
            &out,
            "f32",
        );
        let got = run(&out, &[], &r.prompt_ids, r.greedy_ids.len()).unwrap();
        let mut worst = 0f64;
        for (pos, (ours, theirs)) in got.logits.iter().zip(&r.logits).enumerate() {
            let e = rel_err(ours, theirs);
            worst = worst.max(e);
            assert!(
                e <= 1e-3,
                "{name}: position {pos}: relative error {e:.2e} > 1e-3"
            );
        }
        assert_eq!(got.greedy, r.greedy_ids, "{name}: greedy continuation");
        println!("{name}: merged f32 logits within {worst:.1e}, greedy exact");

        // The file records the adapter: its name, scale and digest (the one the run-time
        // adapter file records too).
        let g = GgufReader::open(&out).unwrap();
        let strings = |k: &str| -> Vec<String> {
            g.get(k)
                .and_then(Value::as_array)
                .and_then(|a| a.as_strings())
                .unwrap_or_else(|| panic!("{name}: no {k}"))
                .iter()
                .map(str::to_string)
                .collect()
        };
        assert_eq!(strings("lora.merged.names"), vec![name.to_string()]);
        let scales: Vec<f32> = g
            .get("lora.merged.scales")
            .and_then(Value::as_array)
            .map(|a| {
                (0..a.len())
                    .map(|i| a.get(i).unwrap().as_f32().unwrap())
                    .collect()
            })
            .unwrap();
        assert_eq!(scales, vec![1.0]);
        let sha = strings("lora.merged.sha256");
        let adapter_gguf = dir.path().join(format!("{name}.adapter.gguf"));
        let o = quantize(&[
            "lora",
            fixture(name).to_str().unwrap(),
            "--base",
            fixture(&base_of(name)).to_str().unwrap(),
            "-o",
            adapter_gguf.to_str().unwrap(),
            "--quiet",
        ]);
        assert!(o.status.success());
        let a = GgufReader::open(&adapter_gguf).unwrap();
        assert_eq!(
            a.get("adapter.lora.source.sha256").and_then(Value::as_str),
            Some(sha[0].as_str())
        );
    }
}

#[test]
fn adapters_add_up() {
    // The same adapter at 0.25 and 0.75 is the adapter at 1; at 0.25 alone it is not.
    let dir = tempfile::tempdir().unwrap();
    for name in ["lora-tiny-40b-patterns", "lora-tiny-7b-rslora"] {
        let r = reference(name);
        let base = fixture(&base_of(name));
        let whole = dir.path().join(format!("{name}-whole.gguf"));
        let parts = dir.path().join(format!("{name}-parts.gguf"));
        let quarter = dir.path().join(format!("{name}-quarter.gguf"));
        merge(&base, &[lora_arg(name, Some(1.0))], &whole, "f32");
        merge(
            &base,
            &[lora_arg(name, Some(0.25)), lora_arg(name, Some(0.75))],
            &parts,
            "f32",
        );
        merge(&base, &[lora_arg(name, Some(0.25))], &quarter, "f32");
        // Weight by weight: equal but for f32 rounding, and the quarter is not the whole.
        let (w, p, q) = (
            GgufReader::open(&whole).unwrap(),
            GgufReader::open(&parts).unwrap(),
            GgufReader::open(&quarter).unwrap(),
        );
        let mut changed = 0;
        for t in w.tensors() {
            let x = f32_data(&w, &t.name);
            let e = rel_err(&f32_data(&p, &t.name), &x);
            assert!(
                e < 1e-6,
                "{name}: {}: 0.25 + 0.75 differs from 1 by {e:.2e}",
                t.name
            );
            if rel_err(&f32_data(&q, &t.name), &x) > 1e-2 {
                changed += 1;
            }
        }
        let n_targeted = if name.contains("7b") { 4 } else { 9 };
        assert_eq!(
            changed, n_targeted,
            "{name}: tensors the quarter changes less"
        );
        // And through llama.cpp (whose f16 KV cache turns last-bit differences of K and V into
        // differences of about 1e-4).
        let a = run(&whole, &[], &r.prompt_ids, 0).unwrap();
        let b = run(&parts, &[], &r.prompt_ids, 0).unwrap();
        let c = run(&quarter, &[], &r.prompt_ids, 0).unwrap();
        for (pos, ((a, b), c)) in a.logits.iter().zip(&b.logits).zip(&c.logits).enumerate() {
            let e = rel_err(b, a);
            assert!(
                e < 1e-3,
                "{name}: position {pos}: 0.25 + 0.75 differs from 1 by {e:.2e}"
            );
            assert!(rel_err(c, a) > 1e-2, "{name}: position {pos}: 0.25 is 1");
        }
        let g = GgufReader::open(&parts).unwrap();
        let scales: Vec<f32> = g
            .get("lora.merged.scales")
            .and_then(Value::as_array)
            .map(|a| {
                (0..a.len())
                    .map(|i| a.get(i).unwrap().as_f32().unwrap())
                    .collect()
            })
            .unwrap();
        assert_eq!(scales, vec![0.25, 0.75]);
    }
    // Two different adapters add up too: merged together = each one's run-time adapter
    // applied together.
    let r = reference("lora-tiny-7b-all");
    let both = dir.path().join("both.gguf");
    merge(
        &fixture("tiny-7b-style"),
        &[
            lora_arg("lora-tiny-7b-all", Some(0.5)),
            lora_arg("lora-tiny-7b-rslora", Some(0.8)),
        ],
        &both,
        "f32",
    );
    let mut runtime = Vec::new();
    for name in ["lora-tiny-7b-all", "lora-tiny-7b-rslora"] {
        let out = dir.path().join(format!("{name}.adapter.gguf"));
        let o = quantize(&[
            "lora",
            fixture(name).to_str().unwrap(),
            "--base",
            fixture("tiny-7b-style").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--quiet",
        ]);
        assert!(o.status.success());
        runtime.push(out);
    }
    let merged = run(&both, &[], &r.prompt_ids, 0).unwrap();
    let applied = run(
        &gguf("tiny-7b-style", "f32"),
        &[(&runtime[0], 0.5), (&runtime[1], 0.8)],
        &r.prompt_ids,
        0,
    )
    .unwrap();
    for (pos, (a, b)) in merged.logits.iter().zip(&applied.logits).enumerate() {
        // The bar of the comparisons with peft: merged weights and run-time products differ in
        // rounding, which llama.cpp's f16 KV cache turns into differences of about 1e-4.
        let e = rel_err(a, b);
        assert!(
            e < 1e-3,
            "position {pos}: merged vs run-time adapters: {e:.2e}"
        );
    }
}

#[test]
fn q8_0_merged_and_runtime_adapter_agree() {
    let dir = tempfile::tempdir().unwrap();
    for name in ADAPTERS {
        let r = reference(name);
        let base = base_of(name);
        let merged = dir.path().join(format!("{name}-q8_0.gguf"));
        merge(&fixture(&base), &[lora_arg(name, None)], &merged, "q8_0");
        let adapter = dir.path().join(format!("{name}.adapter.gguf"));
        let o = quantize(&[
            "lora",
            fixture(name).to_str().unwrap(),
            "--base",
            fixture(&base).to_str().unwrap(),
            "-o",
            adapter.to_str().unwrap(),
            "--quiet",
        ]);
        assert!(o.status.success());
        // The whole sequence: prompt and peft's greedy continuation.
        let mut ids = r.prompt_ids.clone();
        ids.extend_from_slice(&r.greedy_ids[..r.greedy_ids.len() - 1]);
        let a = run(&merged, &[], &ids, 0).unwrap();
        let b = run(&gguf(&base, "q8_0"), &[(&adapter, 1.0)], &ids, 0).unwrap();
        let agree = a
            .logits
            .iter()
            .zip(&b.logits)
            .filter(|(x, y)| argmax(x) == argmax(y))
            .count() as f64
            / ids.len() as f64;
        println!(
            "{name}: q8_0 merged and run-time adapter agree on top-1 at {:.1}% of {} positions",
            agree * 100.0,
            ids.len()
        );
        assert!(
            agree >= 0.95,
            "{name}: top-1 agrees at only {:.1}%",
            agree * 100.0
        );
    }
}

/// A copy of an adapter fixture whose weights file gets an extra full `lm_head` weight (from
/// `head`, f32) and whose config lists it in modules_to_save.
fn with_lm_head(
    name: &str,
    vocab: usize,
    hidden: usize,
    head: &[f32],
) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(format!("{name}-head"));
    std::fs::create_dir(&dir).unwrap();
    let bytes = std::fs::read(fixture(name).join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let head_bytes: Vec<u8> = head.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut all: Vec<(String, TensorView<'_>)> = st.tensors();
    all.push((
        "base_model.model.lm_head.weight".into(),
        TensorView::new(Dtype::F32, vec![vocab, hidden], &head_bytes).unwrap(),
    ));
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        safetensors::serialize(all, None).unwrap(),
    )
    .unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(name).join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    cfg["modules_to_save"] = serde_json::json!(["lm_head"]);
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    (tmp, dir)
}

#[test]
fn lm_head_replacement_unties_a_tied_base() {
    // tiny-7b-style ties its output layer to the token embedding: replacing lm_head gives the
    // file its own output.weight, and leaves the embedding as it was.
    let (vocab, hidden) = (1024, 192);
    let head: Vec<f32> = (0..vocab * hidden)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 2500.0)
        .collect();
    let (_t, adapter) = with_lm_head("lora-tiny-7b-all", vocab, hidden, &head);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("untied.gguf");
    merge(
        &fixture("tiny-7b-style"),
        &[adapter.to_str().unwrap().to_string()],
        &out,
        "f32",
    );
    let g = GgufReader::open(&out).unwrap();
    assert_eq!(f32_data(&g, "output.weight"), head);
    let base = GgufReader::open(&gguf("tiny-7b-style", "f32")).unwrap();
    let embd = base.tensor("token_embd.weight").unwrap();
    assert!(g.tensor_data(g.tensor("token_embd.weight").unwrap()) == base.tensor_data(embd));
    assert!(base.tensor("output.weight").is_none());
    // llama.cpp runs it, with the new output layer.
    let r = reference("lora-tiny-7b-all");
    let with_head = run(&out, &[], &r.prompt_ids, 0).unwrap();
    assert!(rel_err(&with_head.logits[0], &r.logits[0]) > 0.1);

    // At scale 0.5 the output layer is halfway between the embedding and the replacement.
    let half = dir.path().join("half.gguf");
    merge(
        &fixture("tiny-7b-style"),
        &[format!("{}:0.5", adapter.display())],
        &half,
        "f32",
    );
    let got = f32_data(&GgufReader::open(&half).unwrap(), "output.weight");
    let e = f32_data(&base, "token_embd.weight");
    for ((g, e), n) in got.iter().zip(&e).zip(&head) {
        assert!((g - (e + 0.5 * (n - e))).abs() < 1e-6);
    }
}

#[test]
fn bad_adapters_leave_nothing_behind() {
    let cases: &[(&str, String, &[&str])] = &[
        // Made for another base.
        (
            "tiny-40b-style",
            lora_arg("lora-tiny-7b-all", None),
            &["query_key_value.lora_A.weight", "another base model"],
        ),
        // Not an adapter directory.
        (
            "tiny-7b-style",
            "/nonexistent/adapter:0.5".to_string(),
            &["/nonexistent/adapter", "not a directory"],
        ),
        // The second of two adapters is bad.
        (
            "tiny-7b-style",
            fixture("tiny-7b-style").to_str().unwrap().to_string(),
            &["no adapter_config.json"],
        ),
    ];
    for (base, lora, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m.gguf");
        let o = quantize(&[
            fixture(base).to_str().unwrap(),
            "--lora",
            &lora_arg("lora-tiny-7b-all", None),
            "--lora",
            lora,
            "-o",
            out.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{lora}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        for w in *want {
            assert!(err.contains(w), "{w:?} not in {err}");
        }
        assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
    }
    // --lora makes no sense with --vocab-only: a usage error.
    let o = quantize(&[
        fixture("tiny-7b-style").to_str().unwrap(),
        "--lora",
        &lora_arg("lora-tiny-7b-all", None),
        "--vocab-only",
        "-o",
        "/tmp/never.gguf",
    ]);
    assert_eq!(o.status.code(), Some(2));
}
