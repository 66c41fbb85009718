//! `falcon-quantize lora`: PEFT adapters converted into GGUF LoRA adapters, loaded by llama.cpp
//! on the f32 base and compared with peft's logits and greedy continuation.

mod common;
mod lora_support;

use std::path::{Path, PathBuf};

use common::*;
use convert::gguf::{GgufReader, Value};
use lora_support::{rel_err, run};

/// `falcon-quantize lora ADAPTER --base BASE -o OUT --type TY`, into `dir`.
fn export(dir: &Path, adapter: &str, base: &Path, ty: &str) -> PathBuf {
    let tag = base.extension().map_or("ckpt", |_| "gguf");
    let out = dir.join(format!("{adapter}-{tag}-{ty}.gguf"));
    let o = quantize(&[
        "lora",
        fixture(adapter).to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--type",
        ty,
    ]);
    assert!(
        o.status.success(),
        "falcon-quantize lora {adapter}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let summary = String::from_utf8_lossy(&o.stderr);
    assert!(summary.contains("LoRA adapter"), "summary: {summary}");
    out
}

#[test]
fn runtime_adapter_gives_peft_logits_and_greedy_on_the_f32_base() {
    let dir = tempfile::tempdir().unwrap();
    for name in ADAPTERS {
        let r = reference(name);
        let base = base_of(name);
        let base_gguf = gguf(&base, "f32");
        // The base can be given as its checkpoint or as a GGUF of it.
        for base_arg in [fixture(&base), base_gguf.clone()] {
            let adapter = export(dir.path(), name, &base_arg, "f32");
            let got = run(
                &base_gguf,
                &[(&adapter, 1.0)],
                &r.prompt_ids,
                r.greedy_ids.len(),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut worst = 0f64;
            for (pos, (ours, theirs)) in got.logits.iter().zip(&r.logits).enumerate() {
                let e = rel_err(ours, theirs);
                worst = worst.max(e);
                assert!(
                    e <= 1e-3,
                    "{name} (--base {}): position {pos}: relative error {e:.2e} > 1e-3",
                    base_arg.display()
                );
            }
            assert_eq!(
                got.greedy,
                r.greedy_ids,
                "{name} (--base {}): greedy continuation",
                base_arg.display()
            );
            println!(
                "{name} (--base {}): logits within {worst:.1e} at {} positions, greedy exact",
                base_arg.file_name().unwrap().to_string_lossy(),
                r.prompt_ids.len()
            );
        }
        // Without the adapter the base gives something else: the comparison above is not empty.
        let bare = run(&base_gguf, &[], &r.prompt_ids, r.greedy_ids.len()).unwrap();
        assert_ne!(
            bare.greedy, r.greedy_ids,
            "{name}: the adapter changes nothing"
        );
    }
}

#[test]
fn adapter_metadata_names_and_shapes_are_llama_cpps() {
    let dir = tempfile::tempdir().unwrap();
    let name = "lora-tiny-40b-patterns";
    let out = export(dir.path(), name, &fixture("tiny-40b-style"), "f32");
    let g = GgufReader::open(&out).unwrap();
    let s = |k: &str| g.get(k).and_then(Value::as_str).map(str::to_string);
    assert_eq!(s("general.architecture").as_deref(), Some("falcon"));
    assert_eq!(s("general.type").as_deref(), Some("adapter"));
    assert_eq!(s("adapter.type").as_deref(), Some("lora"));
    assert_eq!(
        g.get("adapter.lora.alpha").and_then(Value::as_f32),
        Some(8.0)
    );
    assert_eq!(
        s("adapter.lora.source.base_model").as_deref(),
        Some("tiny-40b-style")
    );
    assert_eq!(s("adapter.lora.source.sha256").map(|h| h.len()), Some(64));
    let dims = |n: &str| g.tensor(n).map(|t| (t.dims.clone(), t.ty.name));
    // lora_a [in, rank], lora_b [rank, out]; rank_pattern gives QKV rank 6 and layer 1's
    // dense_h_to_4h rank 2.
    assert_eq!(
        dims("blk.0.attn_qkv.weight.lora_a"),
        Some((vec![256, 6], "f32"))
    );
    assert_eq!(
        dims("blk.0.attn_qkv.weight.lora_b"),
        Some((vec![6, 384], "f32"))
    );
    assert_eq!(
        dims("blk.1.ffn_up.weight.lora_a"),
        Some((vec![256, 2], "f32"))
    );
    assert_eq!(
        dims("blk.0.ffn_up.weight.lora_b"),
        Some((vec![12, 1024], "f32"))
    );
    assert_eq!(
        dims("blk.1.ffn_down.weight.lora_a"),
        Some((vec![1024, 4], "f32"))
    );
    // The lm_head replacement: identity and difference, rank = hidden.
    assert_eq!(dims("output.weight.lora_a"), Some((vec![256, 256], "f32")));
    assert_eq!(dims("output.weight.lora_b"), Some((vec![256, 1024], "f32")));
    assert_eq!(g.tensors().len(), 2 + 2 * 4 * 2);
    for t in g.tensors() {
        assert!(
            t.name.ends_with(".lora_a") || t.name.ends_with(".lora_b"),
            "{}",
            t.name
        );
    }
}

#[test]
fn f16_bf16_and_q8_0_adapters_stay_close() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["lora-tiny-7b-all", "lora-tiny-40b-patterns"] {
        let r = reference(name);
        let base = base_of(name);
        let base_gguf = gguf(&base, "f32");
        for ty in ["f16", "bf16", "q8_0"] {
            let adapter = export(dir.path(), name, &fixture(&base), ty);
            let g = GgufReader::open(&adapter).unwrap();
            for t in g.tensors() {
                // q8_0 needs rows of 32 values: lora_b of rank 8 and below is f16.
                let want = match ty {
                    "q8_0" if t.dims[0] % 32 != 0 || t.name == "output.weight.lora_a" => "f16",
                    "q8_0" => "q8_0",
                    "bf16" if t.name == "output.weight.lora_a" => "f16",
                    t => t,
                };
                assert_eq!(t.ty.name, want, "{name} {ty}: {}", t.name);
            }
            let got = run(
                &base_gguf,
                &[(&adapter, 1.0)],
                &r.prompt_ids,
                r.greedy_ids.len(),
            )
            .unwrap();
            let want_top1: Vec<usize> = r
                .logits
                .iter()
                .map(|l| argmax(l))
                .chain(r.greedy_ids.iter().map(|&t| t as usize))
                .collect();
            let ours: Vec<usize> = got
                .logits
                .iter()
                .map(|l| argmax(l))
                .chain(got.greedy.iter().map(|&t| t as usize))
                .collect();
            let agree = ours.iter().zip(&want_top1).filter(|(a, b)| a == b).count() as f64
                / want_top1.len() as f64;
            let worst = got
                .logits
                .iter()
                .zip(&r.logits)
                .map(|(a, b)| rel_err(a, b))
                .fold(0f64, f64::max);
            println!(
                "{name} {ty}: top-1 agrees at {:.1}%, worst relative error {worst:.1e}",
                agree * 100.0
            );
            assert!(
                agree >= 0.95,
                "{name} {ty}: top-1 agrees at only {:.1}%",
                agree * 100.0
            );
            assert!(worst < 0.05, "{name} {ty}: relative error {worst:.2e}");
        }
    }
}
