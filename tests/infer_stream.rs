//! Streaming text through the real Falcon tokenizer: byte tokens that leave a character
//! unfinished must neither stall the stream nor hide a stop string that follows.

mod infer_support;

use falcon::engine::Engine;
use falcon::infer::generate::StopStream;
use infer_support::*;

#[test]
fn broken_utf8_from_real_byte_tokens_keeps_streaming_and_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    std::fs::create_dir(&ck).unwrap();
    let tok = root().join("models/falcon-tokenizer/tokenizer.json");
    std::fs::copy(&tok, ck.join("tokenizer.json")).unwrap();
    std::fs::write(
        ck.join("config.json"),
        r#"{"architectures":["FalconForCausalLM"],"model_type":"falcon","hidden_size":4544,"num_hidden_layers":32,
            "num_attention_heads":71,"num_kv_heads":71,"multi_query":true,"new_decoder_architecture":false,
            "parallel_attn":true,"bias":false,"alibi":false,"vocab_size":65024,"bos_token_id":11,"eos_token_id":11}"#,
    )
    .unwrap();
    let vocab = tmp.path().join("vocab.gguf");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_falcon-quantize"))
        .arg(&ck)
        .arg("-o")
        .arg(&vocab)
        .args(["--vocab-only", "--quiet"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let engine = Engine::init().unwrap();
    let model = engine.load_vocab_only(&vocab).unwrap();
    // Byte-level BPE has a token for every single byte: find those of 0xE2 and 0x82, the first
    // two bytes of "€" (E2 82 AC).
    let byte_token = |b: u8| {
        (0..model.n_vocab() as i32)
            .find(|&t| model.token_bytes(t) == [b])
            .unwrap_or_else(|| panic!("no token for byte {b:#x}"))
    };
    let mut tokens = vec![byte_token(0xE2), byte_token(0x82)];
    tokens.extend(model.tokenize(" fine\nUser: and an invented turn", false));

    let stops = vec!["\nUser:".to_string()];
    let mut stream = StopStream::new(&stops);
    let mut shown = String::new();
    let mut stopped = false;
    for &t in &tokens {
        let (text, stop) = stream.push(&model.token_bytes(t));
        shown.push_str(&text);
        if stop {
            stopped = true;
            break;
        }
    }
    let (rest, all) = stream.finish();
    shown.push_str(&rest);
    assert!(
        stopped,
        "the stop string after the broken character was found: {shown:?}"
    );
    assert_eq!(shown, "\u{FFFD} fine");
    assert_eq!(all, shown);
}
