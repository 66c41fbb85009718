//! The checkpoint's chat template travels into the GGUF as `tokenizer.chat_template`, where
//! llama.cpp and the server read it.

use std::path::Path;

use convert::gguf::{keys, GgufReader};
use convert::{quantize_checkpoint, Options, Target};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models")
        .join(name)
}

fn convert_vocab(dir: &Path) -> (tempfile::TempDir, GgufReader) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("vocab.gguf");
    let opts = Options {
        target: Target::Bits(8),
        vocab_only: true,
        ..Options::default()
    };
    quantize_checkpoint(dir, &out, &opts).unwrap();
    let r = GgufReader::open(&out).unwrap();
    (tmp, r)
}

#[test]
fn checkpoint_chat_template_is_written_verbatim() {
    let dir = fixture("tiny-7b-style");
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    let want = tc["chat_template"]
        .as_str()
        .expect("tiny-7b-style carries a chat template");
    let (_tmp, r) = convert_vocab(&dir);
    let got = r
        .get(keys::TOKENIZER_CHAT_TEMPLATE)
        .and_then(|v| v.as_str())
        .expect("tokenizer.chat_template written");
    assert_eq!(got, want);
}

#[test]
fn checkpoint_without_template_has_no_key() {
    let (_tmp, r) = convert_vocab(&fixture("tiny-k256"));
    assert!(r.get(keys::TOKENIZER_CHAT_TEMPLATE).is_none());
}
