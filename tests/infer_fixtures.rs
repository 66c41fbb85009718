//! `falcon-infer` against every fixture in `models/`: greedy generation from the f32 GGUF gives
//! exactly the reference's ids; from q8_0, at least the first 8.

mod infer_support;

use infer_support::*;

fn greedy(gguf: &std::path::Path, prompt: &str) -> serde_json::Value {
    json(&infer(&[
        "-m",
        gguf.to_str().expect("utf-8 path"),
        "-p",
        prompt,
        "--temp",
        "0",
        "-n",
        "32",
        "--json",
        "--threads",
        "2",
    ]))
}

#[test]
fn infer_f32_greedy_matches_reference_exactly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let r = reference(&dir);
        let gguf = tmp.path().join(format!("{name}-f32.gguf"));
        quantize(&dir, &gguf, "f32");
        let doc = greedy(&gguf, &r.prompt);
        let prompt_ids: Vec<i32> = doc["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap() as i32)
            .collect();
        assert_eq!(
            prompt_ids, r.prompt_ids,
            "{name}: prompt tokenization differs"
        );
        let got = completion_ids(&doc);
        assert_prefix_agrees(&name, &got, &r.greedy_ids, r.greedy_ids.len(), eos_id(&dir));
        if got.len() == r.greedy_ids.len() {
            assert_eq!(
                doc["completions"][0]["text"],
                r.greedy_text.as_str(),
                "{name}: text differs"
            );
        }
    }
}

#[test]
fn infer_q8_0_greedy_matches_reference_first_8() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut failures = Vec::new();
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let r = reference(&dir);
        let gguf = tmp.path().join(format!("{name}-q8_0.gguf"));
        quantize(&dir, &gguf, "q8_0");
        let got = completion_ids(&greedy(&gguf, &r.prompt));
        let eos = eos_id(&dir);
        let result =
            std::panic::catch_unwind(|| assert_prefix_agrees(&name, &got, &r.greedy_ids, 8, eos));
        if result.is_err() {
            failures.push(name);
        }
    }
    assert!(
        failures.is_empty(),
        "q8_0 diverges within 8 tokens on: {failures:?}"
    );
}

#[test]
fn infer_same_seed_same_output() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = smallest_fixture();
    let gguf = tmp.path().join("m.gguf");
    quantize(&dir, &gguf, "q8_0");
    let run = |seed: &str| {
        json(&infer(&[
            "-m",
            gguf.to_str().unwrap(),
            "-p",
            "Once upon a time",
            "-n",
            "16",
            "--temp",
            "1.0",
            "--seed",
            seed,
            "--num-return-sequences",
            "2",
            "--json",
        ]))["completions"]
            .clone()
    };
    let a = run("7");
    assert_eq!(a, run("7"), "same seed, different output");
    assert_eq!(a.as_array().unwrap().len(), 2);
}

#[test]
fn infer_stop_string_ends_the_completion() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = smallest_fixture();
    let r = reference(&dir);
    let gguf = tmp.path().join("m.gguf");
    quantize(&dir, &gguf, "f32");
    // Stop at the third character of the reference completion: the text must end before it.
    let chars: Vec<char> = r.greedy_text.chars().collect();
    if chars.len() < 4 {
        return;
    }
    let stop: String = chars[2..4].iter().collect();
    let cut = r.greedy_text.find(&stop).unwrap();
    let doc = json(&infer(&[
        "-m",
        gguf.to_str().unwrap(),
        "-p",
        &r.prompt,
        "--temp",
        "0",
        "-n",
        "32",
        "--stop",
        &stop,
        "--json",
    ]));
    assert_eq!(doc["completions"][0]["finish_reason"], "stop");
    assert_eq!(doc["completions"][0]["text"], &r.greedy_text[..cut]);
}

#[test]
fn infer_streams_prompt_and_completion_with_timing_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = smallest_fixture();
    let r = reference(&dir);
    let gguf = tmp.path().join("m.gguf");
    quantize(&dir, &gguf, "f32");
    let o = infer(&[
        "-m",
        gguf.to_str().unwrap(),
        "-p",
        &r.prompt,
        "--temp",
        "0",
        "-n",
        "32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{}{}\n", r.prompt, r.greedy_text));
    let err = stderr(&o);
    assert!(
        err.contains("tokens/s") && err.contains("load"),
        "no timing line: {err}"
    );
}
