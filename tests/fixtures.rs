//! The fixture checkpoints under `models/` are what real Falcon checkpoints look like, and the
//! real Falcon tokenizer reproduces its reference tokenizations.

mod common;

use std::collections::BTreeMap;

use common::*;
use convert::FalconConfig;

/// Every tensor of a checkpoint directory, read with the `safetensors` crate: name → (dtype, shape).
fn tensors(dir: &std::path::Path) -> BTreeMap<String, (safetensors::Dtype, Vec<usize>)> {
    let mut out = BTreeMap::new();
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<String> = if index.exists() {
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
        let mut f: Vec<String> = j["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        f.sort();
        f.dedup();
        f
    } else {
        vec!["model.safetensors".into()]
    };
    for f in files {
        let bytes = std::fs::read(dir.join(&f)).unwrap();
        let st =
            safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{f}: {e}"));
        for (name, view) in st.tensors() {
            out.insert(name, (view.dtype(), view.shape().to_vec()));
        }
    }
    out
}

#[test]
fn every_fixture_parses_and_its_shapes_agree_with_its_config() {
    for name in FIXTURES.iter().chain(["tiny-legacy-rw"].iter()) {
        let dir = fixture(name);
        let cfg = FalconConfig::from_dir(&dir).unwrap();
        let t = tensors(&dir);
        let (h, ff, v) = (
            cfg.hidden_size as usize,
            cfg.ffn_hidden_size as usize,
            cfg.vocab_size as usize,
        );
        let qkv = cfg.qkv_rows() as usize;
        let p = "transformer.";
        assert_eq!(
            t[&format!("{p}word_embeddings.weight")].1,
            vec![v, h],
            "{name}"
        );
        for i in 0..cfg.n_layer {
            let b = format!("{p}h.{i}.");
            assert_eq!(
                t[&format!("{b}self_attention.query_key_value.weight")].1,
                vec![qkv, h],
                "{name}"
            );
            assert_eq!(
                t[&format!("{b}self_attention.dense.weight")].1,
                vec![h, h],
                "{name}"
            );
            assert_eq!(
                t[&format!("{b}mlp.dense_h_to_4h.weight")].1,
                vec![ff, h],
                "{name}"
            );
            assert_eq!(
                t[&format!("{b}mlp.dense_4h_to_h.weight")].1,
                vec![h, ff],
                "{name}"
            );
            let norms: &[&str] = if cfg.new_decoder_architecture {
                &["ln_attn", "ln_mlp"]
            } else {
                &["input_layernorm"]
            };
            for n in norms {
                assert_eq!(t[&format!("{b}{n}.weight")].1, vec![h], "{name}");
                assert_eq!(t[&format!("{b}{n}.bias")].1, vec![h], "{name}");
            }
        }
        assert!(
            t.values().all(|(d, _)| *d == safetensors::Dtype::BF16),
            "{name}: weights are bf16"
        );
        assert_eq!(
            t.contains_key("lm_head.weight"),
            !cfg.tie_word_embeddings,
            "{name}: lm_head presence"
        );
        let r = reference(name);
        assert_eq!(r.logits.len(), r.prompt_ids.len(), "{name}");
        assert!(r.logits.iter().all(|l| l.len() == v), "{name}");
        assert_eq!(r.greedy_ids.len(), 32, "{name}");
        // The tokenizer shipped with the checkpoint gives the reference prompt ids.
        let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let ids: Vec<i32> = tok
            .encode(r.prompt.as_str(), false)
            .unwrap()
            .get_ids()
            .iter()
            .map(|&i| i as i32)
            .collect();
        assert_eq!(ids, r.prompt_ids, "{name}");
    }
}

#[test]
fn fixture_layouts_are_the_ones_that_bite() {
    let c7 = FalconConfig::from_dir(&fixture("tiny-7b-style")).unwrap();
    let raw: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-7b-style").join("config.json")).unwrap(),
    )
    .unwrap();
    // Current transformers writes num_kv_heads = num_attention_heads on multi-query models.
    assert_eq!(raw["num_kv_heads"], raw["num_attention_heads"]);
    assert_eq!(c7.n_head_kv, 1);
    assert_ne!(c7.hidden_size % 256, 0);
    let c40 = FalconConfig::from_dir(&fixture("tiny-40b-style")).unwrap();
    assert!(c40.new_decoder_architecture && c40.n_head_kv > 1 && c40.n_head_kv < c40.n_head);
    let shards = entries(&fixture("tiny-40b-style"))
        .iter()
        .filter(|n| n.ends_with(".safetensors"))
        .count();
    assert!(shards >= 3, "{shards} shards");
    let legacy: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-legacy-rw").join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(legacy["model_type"], "RefinedWeb");
    assert!(legacy.get("n_head").is_some() && legacy.get("n_head_kv").is_some());
    // Same weights as tiny-40b-style: the hyper-parameters that shape them agree.
    let rw = FalconConfig::from_dir(&fixture("tiny-legacy-rw")).unwrap();
    let key = |c: &FalconConfig| {
        (
            c.hidden_size,
            c.n_layer,
            c.n_head,
            c.n_head_kv,
            c.vocab_size,
            c.new_decoder_architecture,
        )
    };
    assert_eq!(key(&rw), key(&c40));
    let k = FalconConfig::from_dir(&fixture("tiny-k256")).unwrap();
    assert_eq!((k.hidden_size % 256, k.ffn_hidden_size % 256), (0, 0));
}

#[test]
fn real_falcon_tokenizer_reproduces_the_reference_ids() {
    let dir = fixture("falcon-tokenizer");
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    assert_eq!(tok.get_vocab_size(true), 65024);
    let inputs = std::fs::read_to_string(dir.join("cases.inp")).unwrap();
    let outputs = std::fs::read_to_string(dir.join("cases.out")).unwrap();
    let cases: Vec<&str> = inputs.split("\n__ggml_vocab_test__\n").collect();
    let expected: Vec<&str> = outputs.split('\n').collect();
    // 46 strings, and a last empty entry after the final separator in both files.
    assert_eq!((cases.len(), expected.len()), (47, 47));
    for (text, ids) in cases.iter().zip(&expected) {
        let want: Vec<u32> = ids.split_whitespace().map(|t| t.parse().unwrap()).collect();
        let got = tok.encode(*text, false).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "tokenizing {text:?}");
    }
}
