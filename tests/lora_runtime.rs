//! `falcon-infer --lora`: PEFT adapter directories (converted once for a GGUF base and cached,
//! or merged into a checkpoint's one-time quantization) and GGUF LoRA adapters give peft's
//! greedy continuation; bad adapters get one-line errors.

mod common;
mod infer_support;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{base_of, fixture, gguf, quantize, reference, ADAPTERS};
use convert::gguf::GgufReader;
use infer_support::{copy_dir, infer_env};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `falcon-infer -m MODEL --lora …` greedy on the adapter's reference prompt, as JSON, with the
/// user cache directory in `tmp` (nothing is written outside it).
fn generate(tmp: &Path, model: &Path, loras: &[String], extra: &[&str], prompt: &str) -> Output {
    let mut args: Vec<String> = vec!["-m".into(), model.display().to_string()];
    for l in loras {
        args.push("--lora".into());
        args.push(l.clone());
    }
    args.extend(
        [
            "-p", prompt, "-n", "32", "--temp", "0", "--json", "-t", "2", "-c", "128",
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    infer_env(&refs, &[("XDG_CACHE_HOME", &tmp.join("cache"))])
}

/// The prompt ids and generated ids of a successful `--json` run.
fn ids(o: &Output, what: &str) -> (Vec<i32>, Vec<i32>) {
    assert!(o.status.success(), "{what}: {}", stderr(o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{what}: stdout is not JSON ({e})"));
    let get = |x: &serde_json::Value| -> Vec<i32> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_i64().unwrap() as i32)
            .collect()
    };
    (
        get(&v["prompt_ids"]),
        get(&v["completions"][0]["token_ids"]),
    )
}

/// The converted copies of a PEFT adapter kept in `dir`.
fn cached_adapters(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("falcon-lora-") && n.ends_with(".gguf")
        })
        .collect();
    v.sort();
    v
}

/// `falcon-quantize lora ADAPTER --base BASE -o OUT`.
fn export(adapter: &Path, base: &Path, out: &Path) {
    let o = quantize(&[
        "lora",
        adapter.to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "falcon-quantize lora: {}", stderr(&o));
}

#[test]
fn peft_directories_and_gguf_adapters_give_peft_greedy_on_the_f32_base() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ADAPTERS {
        let r = reference(name);
        let base = gguf(&base_of(name), "f32");
        // A copy, so that the converted adapter is cached beside it and not in the repository.
        let dir = tmp.path().join(name);
        copy_dir(&fixture(name), &dir);
        let peft = dir.display().to_string();

        let first = generate(
            tmp.path(),
            &base,
            std::slice::from_ref(&peft),
            &[],
            &r.prompt,
        );
        let (prompt_ids, got) = ids(&first, name);
        assert_eq!(prompt_ids, r.prompt_ids, "{name}: prompt tokens");
        assert_eq!(got, r.greedy_ids, "{name}: PEFT directory on the f32 base");
        assert!(
            stderr(&first).contains("converting the PEFT adapter"),
            "{name}: {}",
            stderr(&first)
        );
        let cached = cached_adapters(&dir);
        assert_eq!(cached.len(), 1, "{name}: one converted copy: {cached:?}");
        let doc: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
        assert_eq!(
            doc["adapters"],
            serde_json::json!([{"path": cached[0].display().to_string(), "scale": 1.0}]),
            "{name}: the JSON names the adapter applied"
        );
        let stamp = std::fs::metadata(&cached[0]).unwrap().modified().unwrap();

        // The second run reuses the converted copy.
        let second = generate(
            tmp.path(),
            &base,
            std::slice::from_ref(&peft),
            &[],
            &r.prompt,
        );
        assert_eq!(ids(&second, name).1, r.greedy_ids, "{name}: cached adapter");
        let err = stderr(&second);
        assert!(err.contains("using cached LoRA adapter"), "{name}: {err}");
        assert!(!err.contains("converting"), "{name}: {err}");
        assert_eq!(cached_adapters(&dir), cached);
        assert_eq!(
            std::fs::metadata(&cached[0]).unwrap().modified().unwrap(),
            stamp,
            "{name}: the cached copy is not rewritten"
        );

        // A GGUF adapter written by falcon-quantize lora, with an explicit scale of 1.
        let file = tmp.path().join(format!("{name}.gguf"));
        export(&fixture(name), &base, &file);
        let run = generate(
            tmp.path(),
            &base,
            &[format!("{}:1.0", file.display())],
            &[],
            &r.prompt,
        );
        assert_eq!(ids(&run, name).1, r.greedy_ids, "{name}: GGUF adapter");
    }
}

#[test]
fn a_conversion_removes_partial_files_left_by_a_killed_one() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "lora-tiny-7b-all";
    let r = reference(name);
    let dir = tmp.path().join(name);
    copy_dir(&fixture(name), &dir);
    // What a conversion killed outright leaves: a partial file that nobody holds.
    let stale = dir.join(format!(
        ".falcon-lora-x.gguf.1234{}",
        convert::partial::SUFFIX
    ));
    std::fs::write(&stale, b"GGUF half").unwrap();
    let base = gguf(&base_of(name), "f32");
    let o = generate(
        tmp.path(),
        &base,
        &[dir.display().to_string()],
        &[],
        &r.prompt,
    );
    assert_eq!(ids(&o, name).1, r.greedy_ids);
    assert!(!stale.exists(), "the stale partial file is removed");
    assert_eq!(cached_adapters(&dir).len(), 1);
}

#[test]
fn the_scale_reaches_the_adapter() {
    // At scale 0 the adapter adds nothing: the base's own reference continuation.
    let tmp = tempfile::tempdir().unwrap();
    let name = "lora-tiny-40b-all";
    let base_name = base_of(name);
    let base = gguf(&base_name, "f32");
    let r = reference(&base_name);
    let file = tmp.path().join("a.gguf");
    export(&fixture(name), &base, &file);
    let zero = generate(
        tmp.path(),
        &base,
        &[format!("{}:0", file.display())],
        &[],
        &r.prompt,
    );
    assert_eq!(ids(&zero, "scale 0").1, r.greedy_ids);
    let one = generate(
        tmp.path(),
        &base,
        &[file.display().to_string()],
        &[],
        &r.prompt,
    );
    assert_eq!(ids(&one, "scale 1").1, reference(name).greedy_ids);
}

#[test]
fn a_checkpoint_directory_merges_peft_adapters_into_its_cached_quantization() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "lora-tiny-7b-all";
    let r = reference(name);
    let ck = tmp.path().join("ck");
    copy_dir(&fixture(&base_of(name)), &ck);
    let adapter_dir = tmp.path().join(name);
    copy_dir(&fixture(name), &adapter_dir);
    let adapter = adapter_dir.display().to_string();
    let ggufs = || -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&ck)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
            .collect();
        v.sort();
        v
    };
    let bits = ["--bits", "8"];

    let first = generate(
        tmp.path(),
        &ck,
        std::slice::from_ref(&adapter),
        &bits,
        &r.prompt,
    );
    let (_, merged_ids) = ids(&first, "merged");
    let err = stderr(&first);
    assert!(
        err.contains("quantizing") && err.contains("with the LoRA adapters"),
        "{err}"
    );
    let files = ggufs();
    assert_eq!(files.len(), 1, "{files:?}");
    let cached = files[0].clone();
    let file_name = cached.file_name().unwrap().to_string_lossy().into_owned();
    assert!(file_name.starts_with("falcon-8bit-lora-"), "{file_name}");
    let names = GgufReader::open(&cached)
        .unwrap()
        .get(convert::gguf::keys::LORA_MERGED_NAMES)
        .map(|v| format!("{v:?}"))
        .expect("the merged adapters are recorded");
    assert!(names.contains(name), "{names}");
    // Nothing was converted or cached beside the adapter.
    assert!(cached_adapters(&adapter_dir).is_empty());

    // The cached file is falcon-quantize's merge, and runs as it does.
    let by_hand = tmp.path().join("merged.gguf");
    let o = quantize(&[
        ck.to_str().unwrap(),
        "--lora",
        &adapter,
        "--bits",
        "8",
        "-o",
        by_hand.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (
        GgufReader::open(&cached).unwrap(),
        GgufReader::open(&by_hand).unwrap(),
    );
    assert_eq!(a.tensors().len(), b.tensors().len());
    for (x, y) in a.tensors().iter().zip(b.tensors()) {
        assert_eq!(x.name, y.name);
        assert!(a.tensor_data(x) == b.tensor_data(y), "{}", x.name);
    }
    let (_, hand_ids) = ids(
        &generate(tmp.path(), &by_hand, &[], &[], &r.prompt),
        "by hand",
    );
    assert_eq!(merged_ids, hand_ids);
    // At 8 bits the greedy continuation starts as peft's (it may part later, near a tie).
    assert_eq!(merged_ids[..8], r.greedy_ids[..8]);

    let second = generate(
        tmp.path(),
        &ck,
        std::slice::from_ref(&adapter),
        &bits,
        &r.prompt,
    );
    assert_eq!(ids(&second, "merged, cached").1, merged_ids);
    assert!(
        stderr(&second).contains("using cached"),
        "{}",
        stderr(&second)
    );
    assert!(
        !stderr(&second).contains("quantizing"),
        "{}",
        stderr(&second)
    );
    assert_eq!(ggufs(), files);

    // Another scale is another quantization; the base alone is yet another file.
    let half = generate(
        tmp.path(),
        &ck,
        &[format!("{adapter}:0.5")],
        &bits,
        &r.prompt,
    );
    assert!(stderr(&half).contains("quantizing"), "{}", stderr(&half));
    assert_ne!(ids(&half, "scale 0.5").1, merged_ids);
    assert_eq!(ggufs().len(), 2);
    let plain = generate(tmp.path(), &ck, &[], &bits, &r.prompt);
    assert!(plain.status.success(), "{}", stderr(&plain));
    let files = ggufs();
    assert_eq!(files.len(), 3);
    let base8 = files
        .iter()
        .find(|p| !p.file_name().unwrap().to_string_lossy().contains("lora"))
        .unwrap();

    assert!(!base8.to_string_lossy().contains("lora"));

    // A GGUF adapter on a checkpoint directory is applied at run time on its cached base: at
    // scale 0 that is the base's continuation, and no other quantization is made.
    let file = tmp.path().join("a.gguf");
    export(&adapter_dir, base8, &file);
    let zero = generate(
        tmp.path(),
        &ck,
        &[format!("{}:0", file.display())],
        &bits,
        &r.prompt,
    );
    assert_eq!(ids(&zero, "GGUF adapter at 0").1, ids(&plain, "base").1);
    let one = generate(
        tmp.path(),
        &ck,
        &[file.display().to_string()],
        &bits,
        &r.prompt,
    );
    assert_ne!(ids(&one, "GGUF adapter").1, ids(&plain, "base").1);
    assert_eq!(ggufs(), files);
}

#[test]
fn at_q8_0_merged_and_runtime_adapters_agree_on_top1() {
    // Perplexity of the run-time adapter (a PEFT directory) on the q8_0 base, with the merged
    // q8_0 model as the reference: the most likely tokens agree at >= 95% of positions.
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("text.txt");
    let heldout = std::fs::read_to_string(fixture("falcon-mini").join("heldout.txt")).unwrap();
    let cut = heldout
        .char_indices()
        .nth(8000)
        .map_or(heldout.len(), |(i, _)| i);
    std::fs::write(&text, &heldout[..cut]).unwrap();
    for name in ADAPTERS {
        let base = base_of(name);
        let dir = tmp.path().join(name);
        copy_dir(&fixture(name), &dir);
        let merged = tmp.path().join(format!("{name}-merged.gguf"));
        let o = quantize(&[
            fixture(&base).to_str().unwrap(),
            "--lora",
            dir.to_str().unwrap(),
            "--type",
            "q8_0",
            "-o",
            merged.to_str().unwrap(),
            "--quiet",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let o = infer_env(
            &[
                "perplexity",
                "-m",
                gguf(&base, "q8_0").to_str().unwrap(),
                "--lora",
                dir.to_str().unwrap(),
                "--reference",
                merged.to_str().unwrap(),
                "-f",
                text.to_str().unwrap(),
                "-c",
                "64",
                "-t",
                "2",
                "--json",
            ],
            &[("XDG_CACHE_HOME", &tmp.path().join("cache"))],
        );
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(v["tokens"].as_u64().unwrap() > 600, "{v}");
        let agree = v["top1_agreement"].as_f64().unwrap();
        assert!(agree >= 0.95, "{name}: top-1 agreement {agree}");
    }
}

/// A failed run: exit status 1 and one line on stderr that contains every one of `needles`.
fn assert_one_line_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = lines.last().copied().unwrap_or_default();
    assert!(last.starts_with("falcon-infer: error: "), "{err}");
    for n in needles {
        assert!(last.contains(n), "{n:?} missing from: {err}");
    }
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("falcon-infer: error") && *l != last),
        "{err}"
    );
}

#[test]
fn bad_adapters_get_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let base = gguf("tiny-7b-style", "f32");
    let prompt = "Hello";

    // A path that does not exist.
    let missing = tmp.path().join("no-such-adapter");
    let o = generate(
        tmp.path(),
        &base,
        &[missing.display().to_string()],
        &[],
        prompt,
    );
    assert_one_line_error(&o, &["LoRA adapter not found", "no-such-adapter"]);

    // A PEFT adapter made for another base: the converter names the tensor.
    let other = tmp.path().join("other");
    copy_dir(&fixture("lora-tiny-40b-all"), &other);
    let o = generate(
        tmp.path(),
        &base,
        &[other.display().to_string()],
        &[],
        prompt,
    );
    assert_one_line_error(
        &o,
        &["converting the PEFT adapter", "tensor", "another base"],
    );
    assert!(cached_adapters(&other).is_empty(), "nothing cached");
    assert!(
        !std::fs::read_dir(&other).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("partial")),
        "no partial file left"
    );

    // A GGUF adapter made for another base.
    let foreign = tmp.path().join("foreign.gguf");
    export(
        &fixture("lora-tiny-40b-all"),
        &gguf("tiny-40b-style", "f32"),
        &foreign,
    );
    let o = generate(
        tmp.path(),
        &base,
        &[foreign.display().to_string()],
        &[],
        prompt,
    );
    assert_one_line_error(&o, &["foreign.gguf", "tensor blk.", "another base model"]);

    // A GGUF that is a model, not an adapter.
    let o = generate(
        tmp.path(),
        &base,
        &[base.display().to_string()],
        &[],
        prompt,
    );
    assert_one_line_error(&o, &["not a Falcon LoRA adapter", "--model"]);

    // A file that is not a GGUF at all.
    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf").unwrap();
    let o = generate(
        tmp.path(),
        &base,
        &[junk.display().to_string()],
        &[],
        prompt,
    );
    assert_one_line_error(&o, &["junk.gguf", "not a valid GGUF"]);

    // A scale that is not a number is a usage error.
    for bad in [
        format!("{}:x0.5", foreign.display()),
        format!("{}:inf", foreign.display()),
    ] {
        let o = generate(tmp.path(), &base, std::slice::from_ref(&bad), &[], prompt);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", stderr(&o));
        assert!(stderr(&o).contains("--lora"), "{}", stderr(&o));
        assert!(stderr(&o).contains("not a"), "{}", stderr(&o));
    }
}

#[test]
fn every_model_command_takes_lora() {
    // perplexity with the adapter differs from the base's, and at scale 0 equals it.
    let tmp = tempfile::tempdir().unwrap();
    let base = gguf("tiny-7b-style", "f32");
    let file = tmp.path().join("a.gguf");
    export(&fixture("lora-tiny-7b-all"), &base, &file);
    let text = tmp.path().join("text.txt");
    std::fs::write(&text, reference("tiny-7b-style").prompt.repeat(12)).unwrap();
    let ppl = |lora: Option<String>| -> String {
        let mut args = vec![
            "perplexity".to_string(),
            "-m".into(),
            base.display().to_string(),
            "-f".into(),
            text.display().to_string(),
            "-c".into(),
            "64".into(),
            "-t".into(),
            "2".into(),
            "--json".into(),
        ];
        if let Some(l) = lora {
            args.extend(["--lora".to_string(), l]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = infer_env(&refs, &[("XDG_CACHE_HOME", &tmp.path().join("cache"))]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["perplexity"].to_string()
    };
    let plain = ppl(None);
    assert_ne!(ppl(Some(file.display().to_string())), plain);
    assert_eq!(ppl(Some(format!("{}:0", file.display()))), plain);

    for sub in ["chat", "bench"] {
        let help = infer_env(&[sub, "--help"], &[]);
        assert!(
            String::from_utf8_lossy(&help.stdout).contains("--lora <PATH[:SCALE]>"),
            "{sub} --help"
        );
    }
}
