//! falcon-quantize on every fixture: logits against transformers, bytes against llama.cpp's own
//! quantizer, the tokenizer through llama.cpp, and one test per error path.

mod common;

use std::ffi::CString;
use std::path::Path;
use std::sync::OnceLock;

use common::*;
use convert::gguf::GgufReader;
use falcon::engine::{ContextOptions, Engine, GpuLayers, LoadOptions};

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::init().expect("llama.cpp initialises"))
}

/// llama.cpp's logits for every position of the prompt.
fn llama_logits(gguf: &Path, ids: &[i32]) -> Vec<Vec<f32>> {
    let opts = LoadOptions {
        gpu_layers: GpuLayers::Count(0),
        context: ContextOptions {
            n_ctx: Some(256),
            n_batch: Some(256),
            threads: Some(2),
            all_logits: true,
            ..ContextOptions::default()
        },
        ..LoadOptions::default()
    };
    let model = engine()
        .load(gguf, &opts)
        .expect("llama.cpp loads our file");
    let mut session = model.session(&opts.context).expect("context");
    session.eval(ids, true).expect("decode");
    (0..ids.len())
        .map(|i| session.logits(Some(i)).to_vec())
        .collect()
}

fn rel_err(ours: &[f32], reference: &[f32]) -> f64 {
    let num: f64 = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| ((*a - *b) as f64).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn f32_logits_match_transformers_at_every_position() {
    for name in FIXTURES {
        let r = reference(name);
        let logits = llama_logits(&gguf(name, "f32"), &r.prompt_ids);
        for (pos, (ours, theirs)) in logits.iter().zip(&r.logits).enumerate() {
            assert_eq!(ours.len(), theirs.len(), "{name}: vocabulary size");
            let e = rel_err(ours, theirs);
            assert!(
                e <= 1e-3,
                "{name}: position {pos}: relative error {e:.2e} > 1e-3"
            );
        }
        println!(
            "{name}: f32 logits within 1e-3 at all {} positions",
            r.prompt_ids.len()
        );
    }
}

#[test]
fn quantized_logits_agree_with_transformers() {
    for name in FIXTURES {
        let r = reference(name);
        // transformers' top-1 is known at every prompt position (its logits) and at every step of
        // its greedy continuation (the next greedy token): score the whole sequence.
        let mut ids = r.prompt_ids.clone();
        ids.extend_from_slice(&r.greedy_ids[..r.greedy_ids.len() - 1]);
        let want_top1: Vec<usize> = r
            .logits
            .iter()
            .map(|l| argmax(l))
            .chain(r.greedy_ids[1..].iter().map(|&t| t as usize))
            .collect();
        for ty in [
            "q8_0", "q6_k", "q5_k_m", "q5_0", "q5_1", "q4_k_m", "q4_0", "q4_1",
        ] {
            let logits = llama_logits(&gguf(name, ty), &ids);
            let top1 = logits
                .iter()
                .zip(&want_top1)
                .filter(|(l, &t)| argmax(l) == t)
                .count() as f64
                / ids.len() as f64;
            let n = r.logits.len() as f64;
            let mean_kl = logits
                .iter()
                .zip(&r.logits)
                .map(|(a, b)| kl(b, a))
                .sum::<f64>()
                / n;
            println!("{name} {ty}: top-1 agreement {:.1}% of {} positions, mean KL {mean_kl:.5} over the prompt", top1 * 100.0, ids.len());
            if ty == "q8_0" {
                assert!(
                    top1 >= 0.95,
                    "{name} q8_0: top-1 agrees at only {:.1}% of positions",
                    top1 * 100.0
                );
            }
            assert!(mean_kl.is_finite() && mean_kl >= 0.0);
        }
    }
}

/// Quantizes `input` with llama.cpp's own quantizer (`llama_model_quantize`).
fn llama_quantize(input: &Path, output: &Path, ftype: u32) {
    let _ = engine();
    let i = CString::new(input.to_str().unwrap()).unwrap();
    let o = CString::new(output.to_str().unwrap()).unwrap();
    // SAFETY: plain C call with valid NUL-terminated paths and a params struct that llama.cpp
    // filled with its defaults; only the thread count and file type are changed.
    let rc = unsafe {
        let mut p = llama_cpp_sys_2::llama_model_quantize_default_params();
        p.nthread = 2;
        p.ftype = ftype as _;
        llama_cpp_sys_2::llama_model_quantize(i.as_ptr(), o.as_ptr(), &p)
    };
    assert_eq!(rc, 0, "llama_model_quantize {} failed", input.display());
}

#[test]
fn same_types_and_bytes_as_llama_cpp_quantizer() {
    let dir = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let f32_file = gguf(name, "f32");
        for ft in convert::FileType::ALL {
            let ours = GgufReader::open(&gguf(name, ft.name())).unwrap();
            let theirs_path = dir.path().join(format!("{name}-{}.llama.gguf", ft.name()));
            llama_quantize(&f32_file, &theirs_path, ft.llama_ftype());
            let theirs = GgufReader::open(&theirs_path).unwrap();
            let names = |r: &GgufReader| {
                r.tensors()
                    .iter()
                    .map(|t| t.name.clone())
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                names(&ours),
                names(&theirs),
                "{name} {}: tensor order",
                ft.name()
            );
            for (a, b) in ours.tensors().iter().zip(theirs.tensors()) {
                assert_eq!(
                    (a.ty.name, &a.dims),
                    (b.ty.name, &b.dims),
                    "{name} {}: {}",
                    ft.name(),
                    a.name
                );
                assert!(
                    ours.tensor_data(a) == theirs.tensor_data(b),
                    "{name} {}: bytes of {} differ",
                    ft.name(),
                    a.name
                );
            }
            let types: std::collections::BTreeSet<&str> =
                ours.tensors().iter().map(|t| t.ty.name).collect();
            println!(
                "{name} {}: {} tensors identical ({types:?})",
                ft.name(),
                ours.tensors().len()
            );
        }
    }
}

#[test]
fn bits_choose_the_mix_the_shapes_allow() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bits, expect) in [
        ("tiny-7b-style", "4", "q4_0"),
        ("tiny-k256", "4", "q4_K"),
        ("tiny-7b-style", "8", "q8_0"),
    ] {
        let out = dir.path().join(format!("{name}-{bits}.gguf"));
        let o = quantize(&[
            fixture(name).to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--bits",
            bits,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let summary = String::from_utf8_lossy(&o.stderr);
        assert!(summary.contains("bits per weight"), "summary: {summary}");
        let r = GgufReader::open(&out).unwrap();
        let qkv = r
            .tensor("blk.1.attn_up.weight")
            .or_else(|| r.tensor("blk.1.ffn_up.weight"))
            .unwrap();
        assert_eq!(qkv.ty.name, expect, "{name} --bits {bits}");
    }
}

#[test]
fn output_gets_the_usual_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.gguf");
    let cmd = format!(
        "umask 022; exec '{}' '{}' -o '{}' --quiet",
        quantize_bin(),
        fixture("tiny-7b-style").display(),
        out.display()
    );
    let o = std::process::Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o644
    );
}

#[test]
fn vocab_only_file_tokenizes_like_falcon() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("falcon-tokenizer");
    let ck = dir.path().join("ck");
    std::fs::create_dir(&ck).unwrap();
    std::fs::copy(src.join("tokenizer.json"), ck.join("tokenizer.json")).unwrap();
    // Falcon-7B's config, as current transformers writes it.
    std::fs::write(
        ck.join("config.json"),
        r#"{"architectures":["FalconForCausalLM"],"model_type":"falcon","hidden_size":4544,"num_hidden_layers":32,
            "num_attention_heads":71,"num_kv_heads":71,"multi_query":true,"new_decoder_architecture":false,
            "parallel_attn":true,"bias":false,"alibi":false,"vocab_size":65024,"bos_token_id":11,"eos_token_id":11}"#,
    )
    .unwrap();
    let out = dir.path().join("vocab.gguf");
    let o = quantize(&[
        ck.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--vocab-only",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(GgufReader::open(&out).unwrap().tensors().is_empty());

    let model = engine()
        .load_vocab_only(&out)
        .expect("llama.cpp loads the vocabulary");
    let inputs = std::fs::read_to_string(src.join("cases.inp")).unwrap();
    let outputs = std::fs::read_to_string(src.join("cases.out")).unwrap();
    let cases: Vec<&str> = inputs.split("\n__ggml_vocab_test__\n").collect();
    // 46 strings; the input ends with a separator, so both files end with one more, empty entry
    // (the empty string, which tokenizes to nothing).
    let expected: Vec<&str> = outputs.split('\n').collect();
    assert_eq!((cases.len(), expected.len()), (47, 47));
    let mut n = 0;
    for (text, ids) in cases.iter().zip(&expected) {
        let ids: Vec<i32> = ids.split_whitespace().map(|t| t.parse().unwrap()).collect();
        assert_eq!(model.tokenize(text, false), ids, "tokenizing {text:?}");
        n += 1;
    }
    assert_eq!(n, 47);
}
