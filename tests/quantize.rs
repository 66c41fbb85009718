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

/// Per quantized type: the largest mean KL divergence from the f32 file's next-token
/// distribution, and the smallest share of positions where the top token agrees with the f32
/// file's, over every fixture. Measured (see the test's output) and given a margin: about twice
/// the worst KL measured, and agreement floors a few points under the worst measured.
/// How far a quantized file may be from the f32 file: the largest mean KL divergence of its
/// next-token distributions, and the smallest share of positions whose top token agrees.
#[derive(Clone, Copy, Debug)]
struct Bound {
    kl: f64,
    top1: f64,
}

const fn b(kl: f64, top1: f64) -> Bound {
    Bound { kl, top1 }
}

/// Per quantized type: the bound for the random-weight fixtures (`tiny-*`, whose flat
/// distributions move most), then for the trained `falcon-mini`. Measured (the test prints the
/// figures; worst of the tiny fixtures, falcon-mini) and given a margin: about twice the KL,
/// and two or three positions of 46 under the agreement.
///
/// | type | tiny KL, top-1 | falcon-mini KL, top-1 |
/// |---|---|---|
/// | q8_0 | 0.0014, 95.7% | 0.000025, 100% |
/// | q6_k | 0.0093, 91.3% | 0.000074, 100% |
/// | q5_k_m | 0.027, 80.4% | 0.00015, 100% |
/// | q5_0 | 0.040, 67.4% | 0.00017, 100% |
/// | q5_1 | 0.032, 82.6% | 0.00011, 100% |
/// | q4_k_m | 0.096, 71.7% | 0.00039, 100% |
/// | q4_0 | 0.166, 71.7% | 0.00042, 100% |
/// | q4_1 | 0.136, 71.7% | 0.00049, 100% |
const QUALITY: &[(&str, Bound, Bound)] = &[
    ("q8_0", b(0.003, 0.90), b(0.0001, 0.97)),
    ("q6_k", b(0.02, 0.85), b(0.0002, 0.97)),
    ("q5_k_m", b(0.055, 0.74), b(0.0003, 0.95)),
    ("q5_0", b(0.08, 0.60), b(0.00035, 0.95)),
    ("q5_1", b(0.065, 0.76), b(0.00025, 0.95)),
    ("q4_k_m", b(0.2, 0.65), b(0.0008, 0.95)),
    ("q4_0", b(0.33, 0.65), b(0.0009, 0.95)),
    ("q4_1", b(0.28, 0.65), b(0.001, 0.95)),
];

#[test]
fn quantized_logits_stay_close_to_f32_and_transformers() {
    let mut failures = Vec::new();
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
        let f32_logits = llama_logits(&gguf(name, "f32"), &ids);
        for &(ty, random, trained) in QUALITY {
            let bound = if *name == "falcon-mini" {
                trained
            } else {
                random
            };
            let logits = llama_logits(&gguf(name, ty), &ids);
            let n = ids.len() as f64;
            let agree = |want: &mut dyn Iterator<Item = usize>| {
                logits
                    .iter()
                    .zip(want)
                    .filter(|(l, t)| argmax(l) == *t)
                    .count() as f64
                    / n
            };
            let top1_hf = agree(&mut want_top1.iter().copied());
            let top1 = agree(&mut f32_logits.iter().map(|l| argmax(l)));
            let mean_kl = logits
                .iter()
                .zip(&f32_logits)
                .map(|(q, f)| kl(f, q))
                .sum::<f64>()
                / n;
            println!(
                "{name} {ty}: against f32, mean KL {mean_kl:.6} and top-1 {:.1}% over {} positions; top-1 against transformers {:.1}%",
                top1 * 100.0,
                ids.len(),
                top1_hf * 100.0
            );
            if !(mean_kl.is_finite() && mean_kl <= bound.kl) {
                failures.push(format!("{name} {ty}: mean KL {mean_kl:.6} > {}", bound.kl));
            }
            if top1 < bound.top1 {
                failures.push(format!(
                    "{name} {ty}: top-1 agrees with f32 at {:.1}% < {:.1}%",
                    top1 * 100.0,
                    bound.top1 * 100.0
                ));
            }
            if ty == "q8_0" && top1_hf < 0.95 {
                failures.push(format!(
                    "{name} q8_0: top-1 agrees with transformers at only {:.1}%",
                    top1_hf * 100.0
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
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
            // Everything after the header, padding between and after tensors included.
            let ours_bytes = std::fs::read(ours.path()).unwrap();
            let theirs_bytes = std::fs::read(&theirs_path).unwrap();
            let (ours_data, theirs_data) = (
                &ours_bytes[ours.data_offset() as usize..],
                &theirs_bytes[theirs.data_offset() as usize..],
            );
            assert_eq!(
                ours_data.len(),
                theirs_data.len(),
                "{name} {}: data section length",
                ft.name()
            );
            assert!(
                ours_data == theirs_data,
                "{name} {}: the bytes after the header differ from llama.cpp's",
                ft.name()
            );
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

/// A checkpoint whose tensors' sizes are not multiples of the alignment (width 21, odd), with
/// f32 weights, written from the tensor layout the converter reads.
fn odd_checkpoint(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "architectures": ["FalconForCausalLM"], "model_type": "falcon", "hidden_size": 21,
        "num_hidden_layers": 2, "num_attention_heads": 3, "num_kv_heads": 3, "multi_query": true,
        "new_decoder_architecture": false, "parallel_attn": true, "bias": false, "alibi": false,
        "vocab_size": 1024, "bos_token_id": 11, "eos_token_id": 11, "tie_word_embeddings": true
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        fixture("tiny-7b-style").join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let cfg = convert::FalconConfig::from_json(&config).unwrap();
    let tensors = convert::layout::tensors(&cfg, convert::layout::Variant::of_config(&cfg));
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|t| {
            let shape: Vec<usize> = t.hf_shape().iter().map(|&d| d as usize).collect();
            let n: usize = shape.iter().product();
            let bytes = (0..n)
                .flat_map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let v = ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
                    let v = if t.name.ends_with("norm.weight") {
                        1.0 + v
                    } else {
                        v
                    };
                    v.to_le_bytes()
                })
                .collect();
            (t.hf_name.clone(), shape, bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// Regression: the last tensor's padding was not written, so files whose last tensor does not
/// end on the alignment differed from llama.cpp's after the tensor data.
#[test]
fn last_tensor_is_padded_as_llama_cpp_pads_it() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    odd_checkpoint(&ck);
    let convert = |ty: &str| {
        let out = dir.path().join(format!("ours-{ty}.gguf"));
        let o = quantize(&[
            ck.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--type",
            ty,
            "--quiet",
        ]);
        assert!(
            o.status.success(),
            "{ty}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    };
    let f32_file = convert("f32");
    for ft in [
        convert::FileType::F32,
        convert::FileType::F16,
        convert::FileType::Q8_0,
    ] {
        let ours = convert(ft.name());
        let theirs = dir.path().join(format!("theirs-{}.gguf", ft.name()));
        llama_quantize(&f32_file, &theirs, ft.llama_ftype());
        let (r_ours, r_theirs) = (
            GgufReader::open(&ours).unwrap(),
            GgufReader::open(&theirs).unwrap(),
        );
        let last = r_ours.tensors().last().unwrap();
        assert_ne!(
            last.n_bytes % 32,
            0,
            "{}: the last tensor should end off the alignment",
            ft.name()
        );
        let (a, b) = (
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
        );
        let (a, b) = (
            &a[r_ours.data_offset() as usize..],
            &b[r_theirs.data_offset() as usize..],
        );
        assert_eq!(a.len(), b.len(), "{}: data section length", ft.name());
        assert!(
            a == b,
            "{}: the bytes after the header differ from llama.cpp's",
            ft.name()
        );
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
