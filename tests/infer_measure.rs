//! `falcon-infer perplexity`, `plan`, `bench` and `chat` on the fixtures, and `falcon-mini`
//! writing English at 4 bits.

mod infer_support;

use infer_support::*;

fn mini() -> std::path::PathBuf {
    let p = root().join("models/falcon-mini");
    assert!(
        p.join("config.json").is_file(),
        "fixture models/falcon-mini is missing"
    );
    p
}

#[test]
fn infer_perplexity_matches_the_reference_implementation() {
    let dir = mini();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("perplexity.json")).unwrap())
            .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let f32 = tmp.path().join("f32.gguf");
    quantize(&dir, &f32, "f32");
    let ctx = want["ctx"].as_u64().unwrap().to_string();
    let text = dir.join(want["file"].as_str().unwrap());
    let doc = json(&infer(&[
        "perplexity",
        "-m",
        f32.to_str().unwrap(),
        "--file",
        text.to_str().unwrap(),
        "-c",
        &ctx,
        "--json",
    ]));
    let got = doc["perplexity"].as_f64().unwrap();
    let reference = want["ppl_second_half"].as_f64().unwrap();
    assert!(
        (got / reference - 1.0).abs() < 0.005,
        "perplexity {got} vs reference {reference}"
    );
    assert_eq!(doc["chunks"], want["windows"]);

    // q8_0 against the f32 reference: nearly the same distribution.
    let q8 = tmp.path().join("q8.gguf");
    quantize(&dir, &q8, "q8_0");
    let doc = json(&infer(&[
        "perplexity",
        "-m",
        q8.to_str().unwrap(),
        "--reference",
        f32.to_str().unwrap(),
        "--file",
        text.to_str().unwrap(),
        "-c",
        &ctx,
        "--json",
    ]));
    let kl = doc["mean_kl_divergence"].as_f64().unwrap();
    let top1 = doc["top1_agreement"].as_f64().unwrap();
    assert!((0.0..0.01).contains(&kl), "KL {kl}");
    assert!(top1 > 0.95, "top-1 agreement {top1}");
}

#[test]
fn infer_perplexity_text_shorter_than_context_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("m.gguf");
    quantize(&smallest_fixture(), &gguf, "q8_0");
    let text = tmp.path().join("short.txt");
    std::fs::write(&text, "too short").unwrap();
    let o = infer(&[
        "perplexity",
        "-m",
        gguf.to_str().unwrap(),
        "--file",
        text.to_str().unwrap(),
        "-c",
        "64",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("less than one chunk"), "{}", stderr(&o));
}

/// Words of everyday (and King James) English.
const COMMON: &[&str] = &[
    "the", "and", "of", "to", "unto", "lord", "god", "he", "that", "in", "shall", "his", "i", "a",
    "for", "they", "be", "is", "him", "not", "them", "it", "with", "all", "thou", "thy", "was",
    "which", "my", "me", "said", "but", "ye", "their", "have", "will", "israel", "as", "from",
    "children", "land", "king", "man", "this", "son", "were", "upon", "out", "by", "there", "when",
    "saying", "moses", "spake", "thee", "up", "house", "came", "hath", "people", "come", "we",
    "are", "so", "at", "let", "also", "one", "what", "no", "then", "into", "on", "day", "shalt",
];

/// The demo prompt of the README.
const DEMO_PROMPT: &str = "And the LORD spake unto Moses, saying";

#[test]
fn infer_falcon_mini_4_bit_writes_english() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("falcon-mini");
    copy_dir(&mini(), &ck);
    let o = infer(&[
        "-m",
        ck.to_str().unwrap(),
        "--bits",
        "4",
        "-p",
        DEMO_PROMPT,
        "-n",
        "64",
        "--seed",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let completion = out.strip_prefix(DEMO_PROMPT).expect("the prompt is echoed");
    let words: Vec<String> = completion
        .split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    assert!(words.len() >= 20, "too few words: {completion:?}");
    let known = words
        .iter()
        .filter(|w| COMMON.contains(&w.as_str()))
        .count();
    assert!(
        known * 2 >= words.len(),
        "not English enough ({known}/{}): {completion:?}",
        words.len()
    );
    let plain = completion.chars().filter(|c| c.is_ascii()).count();
    assert!(
        plain * 10 >= completion.chars().count() * 9,
        "{completion:?}"
    );
}

fn plan_total_gb(model: &str, bits: &str) -> f64 {
    let doc = json(&infer(&[
        "plan", "-m", model, "--bits", bits, "--json", "--vram", "none",
    ]));
    doc["total"].as_f64().unwrap() / 1e9
}

#[test]
fn infer_plan_falcon_40b_4_and_8_bits() {
    let four = plan_total_gb("falcon-40b", "4");
    let eight = plan_total_gb("falcon-40b", "8");
    assert!((25.5..28.5).contains(&four), "4 bits: {four:.2} GB");
    assert!((43.5..46.5).contains(&eight), "8 bits: {eight:.2} GB");
    let o = infer(&["plan", "-m", "falcon-40b", "--vram", "24GiB,24GiB"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("GPU0") && text.contains("GPU1") && text.contains("61 of 61"),
        "{text}"
    );
}

#[test]
fn infer_plan_checkpoint_gguf_and_unknown() {
    let dir = smallest_fixture();
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("m.gguf");
    quantize(&dir, &gguf, "q8_0");
    let from_file = json(&infer(&[
        "plan",
        "-m",
        gguf.to_str().unwrap(),
        "--json",
        "--vram",
        "none",
    ]));
    let from_dir = json(&infer(&[
        "plan",
        "-m",
        dir.to_str().unwrap(),
        "--bits",
        "8",
        "--json",
        "--vram",
        "none",
    ]));
    let w = |d: &serde_json::Value| d["devices"][0]["weights"].as_u64().unwrap();
    assert_eq!(
        w(&from_file),
        w(&from_dir),
        "a checkpoint plans the bytes its GGUF has"
    );
    let o = infer(&["plan", "-m", "falcon-3b"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("falcon-40b"), "{}", stderr(&o));
}

#[test]
fn infer_bench_reports_speeds_and_ceiling() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("m.gguf");
    quantize(&mini(), &gguf, "q8_0");
    let doc = json(&infer(&[
        "bench",
        "-m",
        gguf.to_str().unwrap(),
        "-p",
        "32",
        "-n",
        "8",
        "-r",
        "2",
        "--json",
    ]));
    assert!(doc["pp_tokens_per_s"]["mean"].as_f64().unwrap() > 0.0);
    assert!(doc["tg_tokens_per_s"]["mean"].as_f64().unwrap() > 0.0);
    assert!(doc["copy_bandwidth"].as_f64().unwrap() > 1e8);
    if doc["gpu_layers"] == 0 {
        assert!(doc["fraction_of_ceiling"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn infer_chat_answers_each_turn() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("m.gguf");
    quantize(&mini(), &gguf, "q8_0");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_falcon-infer"))
        .args([
            "chat",
            "-m",
            gguf.to_str().unwrap(),
            "-n",
            "24",
            "--temp",
            "0",
            "--system",
            "Speak.",
            "--chat-template",
            "falcon-180b-chat",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Who spake unto Moses?\nAnd then?\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.matches("Falcon:").count(), 2, "{out}");
    assert!(
        !out.contains("User:"),
        "an answer ran into the next turn: {out}"
    );
}
