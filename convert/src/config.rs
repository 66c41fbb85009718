//! `config.json` of a Falcon checkpoint, native (`falcon`) or legacy (`RefinedWeb`) keys.

use std::path::Path;

use serde_json::Value as Json;

use crate::error::ConvertError;

/// The hyper-parameters llama.cpp's `falcon` architecture needs, resolved from either key set.
#[derive(Clone, Debug, PartialEq)]
pub struct FalconConfig {
    pub hidden_size: u64,
    pub n_layer: u64,
    pub n_head: u64,
    /// The true number of KV heads (transformers' rule, not the raw `num_kv_heads` key).
    pub n_head_kv: u64,
    pub ffn_hidden_size: u64,
    pub vocab_size: u64,
    pub layer_norm_epsilon: f32,
    /// Falcon-40B/180B layout: grouped KV and two LayerNorms (`ln_attn`, `ln_mlp`).
    pub new_decoder_architecture: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub max_position_embeddings: u64,
}

impl FalconConfig {
    /// The largest values accepted: generous multiples of Falcon-180B's (width 14848, 80
    /// layers, 65,024 tokens, 2048 positions) that keep every size computed from them far from
    /// overflowing a `u64` and every table built from them small. Each tensor's shape is then
    /// checked against the checkpoint's files before anything of that size is allocated.
    pub const MAX_HIDDEN_SIZE: u64 = 1 << 16;
    pub const MAX_LAYERS: u64 = 1 << 10;
    pub const MAX_VOCAB_SIZE: u64 = 1 << 22;
    pub const MAX_POSITIONS: u64 = 1 << 20;
    /// LayerNorm's epsilon: positive, and a normal `f32` (GGUF stores it as one).
    pub const MIN_EPSILON: f64 = 1e-30;
    pub const MAX_EPSILON: f64 = 1.0;

    /// Reads and validates `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<FalconConfig, ConvertError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ConvertError::io(&path, e))?;
        let json: Json = serde_json::from_str(&text).map_err(|e| ConvertError::BadConfig {
            path: path.clone(),
            why: format!("invalid JSON: {e}"),
        })?;
        Self::from_json(&json).map_err(|why| match why {
            ConvertError::BadConfig { why, .. } => ConvertError::BadConfig {
                path: path.clone(),
                why,
            },
            ConvertError::Unsupported { why, .. } => ConvertError::Unsupported {
                path: path.clone(),
                why,
            },
            ConvertError::ConfigValue {
                key,
                value,
                expected,
                ..
            } => ConvertError::ConfigValue {
                path: path.clone(),
                key,
                value,
                expected,
            },
            e => e,
        })
    }

    /// Resolves the hyper-parameters from a parsed config. Errors carry an empty path, which
    /// [`FalconConfig::from_dir`] fills in.
    pub fn from_json(json: &Json) -> Result<FalconConfig, ConvertError> {
        let bad = |why: String| ConvertError::BadConfig {
            path: Default::default(),
            why,
        };
        let unsupported = |why: String| ConvertError::Unsupported {
            path: Default::default(),
            why,
        };
        let obj = json
            .as_object()
            .ok_or_else(|| bad("the top level is not a JSON object".into()))?;

        let model_type = obj.get("model_type").and_then(Json::as_str).unwrap_or("");
        let architectures: Vec<&str> = obj
            .get("architectures")
            .and_then(Json::as_array)
            .map(|a| a.iter().filter_map(Json::as_str).collect())
            .unwrap_or_default();
        let known_type = matches!(model_type, "falcon" | "RefinedWeb" | "RefinedWebModel");
        let known_arch = architectures.iter().any(|a| {
            matches!(
                *a,
                "FalconForCausalLM" | "RWForCausalLM" | "FalconModel" | "RWModel"
            )
        });
        if !known_type && !known_arch {
            let what = if model_type.is_empty() {
                architectures.join(", ")
            } else {
                model_type.to_string()
            };
            return Err(unsupported(format!(
                "model type '{what}' is not Falcon (expected model_type 'falcon', 'RefinedWeb' or 'RefinedWebModel')"
            )));
        }
        if model_type == "falcon_h1" || model_type == "falcon_mamba" {
            return Err(unsupported(format!(
                "{model_type} is a different architecture from Falcon-7B/40B/180B"
            )));
        }

        let keys = Keys { obj };
        let flag = |names: &[&str]| -> Option<bool> {
            names
                .iter()
                .find_map(|n| obj.get(*n))
                .and_then(Json::as_bool)
        };

        let hidden_size = keys.need(
            &["hidden_size", "d_model", "n_embed"],
            1,
            Self::MAX_HIDDEN_SIZE,
        )?;
        let n_layer = keys.need(&["num_hidden_layers", "n_layer"], 1, Self::MAX_LAYERS)?;
        // At least one dimension per head.
        let n_head = keys.need(&["num_attention_heads", "n_head"], 1, hidden_size)?;
        let vocab_size = keys.need(&["vocab_size"], 1, Self::MAX_VOCAB_SIZE)?;
        let is_legacy = matches!(model_type, "RefinedWeb" | "RefinedWebModel")
            || architectures.iter().any(|a| a.starts_with("RW"));
        // Legacy RefinedWeb (40B) configs have no new_decoder_architecture key: the class itself is
        // the new decoder; RefinedWebModel (7B) is the old one.
        let new_decoder_architecture =
            flag(&["new_decoder_architecture"]).unwrap_or(model_type == "RefinedWeb" && is_legacy);
        let multi_query = flag(&["multi_query"]).unwrap_or(true);
        let raw_kv = keys.int(&["num_kv_heads", "n_head_kv"], 1, n_head)?;
        // transformers' FalconAttention: num_kv_heads counts only when the new decoder
        // architecture is used or multi-query is off; otherwise (Falcon-7B) there is one KV head.
        let n_head_kv = if new_decoder_architecture || !multi_query {
            raw_kv.unwrap_or(n_head)
        } else {
            1
        };

        if obj.get("alibi").and_then(Json::as_bool) == Some(true) {
            return Err(unsupported("ALiBi position encoding is not supported by llama.cpp's falcon architecture (only RoPE models such as Falcon-7B/40B/180B are)".into()));
        }
        if obj.get("bias").and_then(Json::as_bool) == Some(true) {
            return Err(unsupported("linear layers with biases ('bias': true) are not supported by llama.cpp's falcon architecture".into()));
        }
        if obj.get("parallel_attn").and_then(Json::as_bool) == Some(false) {
            return Err(unsupported("sequential attention/MLP ('parallel_attn': false) is not supported by llama.cpp's falcon architecture".into()));
        }
        // transformers 5 nests RoPE settings under `rope_parameters`.
        let rope = obj.get("rope_parameters").and_then(Json::as_object);
        if let Some(kind) = rope.and_then(|r| r.get("rope_type")).and_then(Json::as_str) {
            if kind != "default" {
                return Err(unsupported(format!("RoPE type '{kind}' is not supported: llama.cpp's falcon architecture uses plain RoPE")));
            }
        }
        let theta = obj
            .get("rope_theta")
            .or_else(|| rope.and_then(|r| r.get("rope_theta")));
        if let Some(theta) = theta.and_then(Json::as_f64) {
            if theta != 10000.0 {
                return Err(unsupported(format!("a RoPE base of {theta} is not supported: llama.cpp's falcon architecture uses 10000")));
            }
        }
        if obj.get("rope_scaling").is_some_and(|v| !v.is_null()) {
            return Err(unsupported(
                "RoPE scaling is not supported by llama.cpp's falcon architecture".into(),
            ));
        }
        // No overflow: hidden_size is at most MAX_HIDDEN_SIZE.
        let four_h = 4 * hidden_size;
        let ffn_hidden_size = keys
            .int(&["ffn_hidden_size"], 1, u64::MAX)?
            .unwrap_or(four_h);
        if ffn_hidden_size != four_h {
            return Err(unsupported(format!(
                "ffn_hidden_size {ffn_hidden_size} is not 4 × hidden_size ({four_h}); llama.cpp's falcon architecture assumes it is"
            )));
        }
        if hidden_size % n_head != 0 {
            return Err(bad(format!(
                "hidden_size {hidden_size} is not a multiple of the {n_head} attention heads"
            )));
        }
        if n_head % n_head_kv != 0 {
            return Err(bad(format!(
                "{n_head} attention heads cannot be grouped over {n_head_kv} KV heads"
            )));
        }
        let layer_norm_epsilon = match keys.find(&["layer_norm_epsilon"]) {
            None => 1e-5,
            Some((key, v)) => match v.as_f64() {
                Some(e) if (Self::MIN_EPSILON..=Self::MAX_EPSILON).contains(&e) => e as f32,
                _ => {
                    return Err(out_of_range(
                        key,
                        v,
                        format!(
                            "a number from {:e} to {}",
                            Self::MIN_EPSILON,
                            Self::MAX_EPSILON
                        ),
                    ))
                }
            },
        };
        let max_position_embeddings = keys
            .int(&["max_position_embeddings"], 1, Self::MAX_POSITIONS)?
            .unwrap_or(2048);

        Ok(FalconConfig {
            hidden_size,
            n_layer,
            n_head,
            n_head_kv,
            ffn_hidden_size,
            vocab_size,
            layer_norm_epsilon,
            new_decoder_architecture,
            tie_word_embeddings: flag(&["tie_word_embeddings"]).unwrap_or(true),
            bos_token_id: keys.token_id("bos_token_id", vocab_size)?,
            eos_token_id: keys.token_id("eos_token_id", vocab_size)?,
            max_position_embeddings,
        })
    }

    pub fn head_dim(&self) -> u64 {
        self.hidden_size / self.n_head
    }

    /// Rows of the fused QKV matrix.
    pub fn qkv_rows(&self) -> u64 {
        (self.n_head + 2 * self.n_head_kv) * self.head_dim()
    }

    /// Number of LayerNorms per block: two on the new decoder architecture.
    pub fn two_layer_norms(&self) -> bool {
        self.new_decoder_architecture
    }
}

fn out_of_range(key: &str, value: &Json, expected: String) -> ConvertError {
    ConvertError::ConfigValue {
        path: Default::default(),
        key: key.to_string(),
        value: value.to_string(),
        expected,
    }
}

/// Typed, bounded access to the keys of a config.
struct Keys<'a> {
    obj: &'a serde_json::Map<String, Json>,
}

impl<'a> Keys<'a> {
    /// The first of `names` that is present and not null, with its name.
    fn find(&self, names: &[&'static str]) -> Option<(&'static str, &'a Json)> {
        names
            .iter()
            .find_map(|&n| self.obj.get(n).filter(|v| !v.is_null()).map(|v| (n, v)))
    }

    /// An integer from `lo` to `hi`, if present.
    fn int(&self, names: &[&'static str], lo: u64, hi: u64) -> Result<Option<u64>, ConvertError> {
        let Some((key, v)) = self.find(names) else {
            return Ok(None);
        };
        match v.as_u64() {
            Some(n) if (lo..=hi).contains(&n) => Ok(Some(n)),
            _ => Err(out_of_range(
                key,
                v,
                format!("an integer from {lo} to {hi}"),
            )),
        }
    }

    /// An integer from `lo` to `hi` that must be present.
    fn need(&self, names: &[&'static str], lo: u64, hi: u64) -> Result<u64, ConvertError> {
        self.int(names, lo, hi)?
            .ok_or_else(|| ConvertError::BadConfig {
                path: Default::default(),
                why: format!("missing '{}' (an integer from {lo} to {hi})", names[0]),
            })
    }

    /// A token id below `vocab_size`; of a list of ids (some configs list several end
    /// tokens), every one is checked and the first is taken.
    fn token_id(&self, key: &'static str, vocab_size: u64) -> Result<Option<u32>, ConvertError> {
        let Some((key, v)) = self.find(&[key]) else {
            return Ok(None);
        };
        let expected = || format!("a token id (or a list of them) below vocab_size, {vocab_size}");
        let ids: Vec<&Json> = match v.as_array() {
            Some(list) if !list.is_empty() => list.iter().collect(),
            Some(_) => return Err(out_of_range(key, v, expected())),
            None => vec![v],
        };
        let mut first = None;
        for id in ids {
            match id.as_u64() {
                // vocab_size is at most MAX_VOCAB_SIZE, so the id fits a u32.
                Some(n) if n < vocab_size => {
                    first.get_or_insert(n as u32);
                }
                _ => return Err(out_of_range(key, v, expected())),
            }
        }
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn seven_b_as_current_transformers_writes_it_has_one_kv_head() {
        let c = FalconConfig::from_json(&json!({
            "model_type": "falcon", "architectures": ["FalconForCausalLM"], "hidden_size": 4544,
            "num_hidden_layers": 32, "num_attention_heads": 71, "num_kv_heads": 71,
            "multi_query": true, "new_decoder_architecture": false, "vocab_size": 65024,
            "alibi": false, "bias": false, "parallel_attn": true, "rope_theta": 10000.0
        }))
        .unwrap();
        assert_eq!(c.n_head_kv, 1);
        assert_eq!(c.qkv_rows(), 4544 + 2 * 64);
        assert!(!c.two_layer_norms());
    }

    #[test]
    fn legacy_40b_keys() {
        let c = FalconConfig::from_json(&json!({
            "model_type": "RefinedWeb", "architectures": ["RWForCausalLM"], "hidden_size": 8192,
            "n_layer": 60, "n_head": 128, "n_head_kv": 8, "vocab_size": 65024, "parallel_attn": true
        }))
        .unwrap();
        assert_eq!((c.n_layer, c.n_head, c.n_head_kv), (60, 128, 8));
        assert!(c.new_decoder_architecture);
    }

    #[test]
    fn legacy_7b_keys() {
        let c = FalconConfig::from_json(&json!({
            "model_type": "RefinedWebModel", "hidden_size": 4544, "n_layer": 32, "n_head": 71,
            "multi_query": true, "vocab_size": 65024
        }))
        .unwrap();
        assert_eq!(c.n_head_kv, 1);
        assert!(!c.new_decoder_architecture);
    }

    #[test]
    fn refuses_alibi_bias_sequential_and_rope_base() {
        let base = json!({"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "vocab_size": 10});
        for (k, v) in [
            ("alibi", json!(true)),
            ("bias", json!(true)),
            ("parallel_attn", json!(false)),
            ("rope_theta", json!(500000.0)),
        ] {
            let mut j = base.clone();
            j[k] = v;
            let e = FalconConfig::from_json(&j).unwrap_err();
            assert!(matches!(e, ConvertError::Unsupported { .. }), "{k}: {e}");
        }
        assert!(FalconConfig::from_json(&base).is_ok());
    }

    #[test]
    fn reads_transformers_5_rope_parameters() {
        let base = json!({"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "vocab_size": 10,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}});
        assert!(FalconConfig::from_json(&base).is_ok());
        let mut j = base.clone();
        j["rope_parameters"]["rope_theta"] = json!(1e6);
        assert!(FalconConfig::from_json(&j)
            .unwrap_err()
            .to_string()
            .contains("RoPE base"));
        let mut j = base;
        j["rope_parameters"]["rope_type"] = json!("linear");
        assert!(FalconConfig::from_json(&j)
            .unwrap_err()
            .to_string()
            .contains("linear"));
    }

    /// A valid small config with `key` set to `value`.
    fn with(key: &str, value: Json) -> Result<FalconConfig, ConvertError> {
        let mut j = json!({"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_kv_heads": 2, "new_decoder_architecture": true,
            "vocab_size": 100, "bos_token_id": 1, "eos_token_id": 2});
        j[key] = value;
        FalconConfig::from_json(&j)
    }

    /// Asserts that `key` = `value` is refused with an error naming the key, the value and
    /// `limit`.
    fn refused(key: &str, value: Json, limit: &str) {
        let shown = value.to_string();
        let e = with(key, value).expect_err(key);
        assert!(
            matches!(e, ConvertError::ConfigValue { .. }),
            "{key}: {e:?}"
        );
        let msg = e.to_string();
        for part in [key, &shown, limit] {
            assert!(msg.contains(part), "{key}: {part:?} not in {msg:?}");
        }
    }

    #[test]
    fn bounds_hidden_size() {
        refused("hidden_size", json!(1u64 << 17), "from 1 to 65536");
        refused("hidden_size", json!(0), "from 1 to 65536");
        refused("hidden_size", json!(-64), "from 1 to 65536");
        refused("hidden_size", json!(64.5), "from 1 to 65536");
        // 4 × hidden_size used to wrap.
        refused("hidden_size", json!(u64::MAX / 2), "from 1 to 65536");
        assert!(with("hidden_size", json!(128)).is_ok());
    }

    #[test]
    fn bounds_the_layer_count() {
        refused(
            "num_hidden_layers",
            json!(1_000_000_000_000u64),
            "from 1 to 1024",
        );
        refused("num_hidden_layers", json!(0), "from 1 to 1024");
        let mut j = json!({"model_type": "RefinedWeb", "hidden_size": 64, "n_layer": 5000,
            "n_head": 4, "n_head_kv": 2, "vocab_size": 100});
        let e = FalconConfig::from_json(&j).unwrap_err().to_string();
        assert!(e.contains("'n_layer' is 5000") && e.contains("1024"), "{e}");
        j["n_layer"] = json!(3);
        assert_eq!(FalconConfig::from_json(&j).unwrap().n_layer, 3);
    }

    #[test]
    fn bounds_the_head_count() {
        refused("num_attention_heads", json!(65), "from 1 to 64");
        refused("num_attention_heads", json!(0), "from 1 to 64");
    }

    #[test]
    fn bounds_the_kv_head_count() {
        refused("num_kv_heads", json!(8), "from 1 to 4");
        refused("num_kv_heads", json!(0), "from 1 to 4");
    }

    #[test]
    fn bounds_vocab_size() {
        refused("vocab_size", json!(1u64 << 40), "from 1 to 4194304");
        refused("vocab_size", json!(0), "from 1 to 4194304");
    }

    #[test]
    fn bounds_ffn_hidden_size() {
        let e = with("ffn_hidden_size", json!(u64::MAX))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ffn_hidden_size 18446744073709551615") && e.contains("(256)"),
            "{e}"
        );
        refused("ffn_hidden_size", json!(-1), "an integer from 1 to");
        assert!(with("ffn_hidden_size", json!(256)).is_ok());
    }

    #[test]
    fn bounds_max_position_embeddings() {
        // 2^32 used to panic when written as a u32.
        refused(
            "max_position_embeddings",
            json!(1u64 << 32),
            "from 1 to 1048576",
        );
        refused("max_position_embeddings", json!(0), "from 1 to 1048576");
        assert_eq!(
            with("max_position_embeddings", json!(8192))
                .unwrap()
                .max_position_embeddings,
            8192
        );
    }

    #[test]
    fn bounds_bos_token_id() {
        refused("bos_token_id", json!(100), "below vocab_size, 100");
        refused("bos_token_id", json!(1u64 << 33), "below vocab_size, 100");
        refused("bos_token_id", json!("<s>"), "below vocab_size, 100");
        assert_eq!(
            with("bos_token_id", json!(99)).unwrap().bos_token_id,
            Some(99)
        );
        assert_eq!(with("bos_token_id", Json::Null).unwrap().bos_token_id, None);
    }

    #[test]
    fn bounds_eos_token_id() {
        refused("eos_token_id", json!(-1), "below vocab_size, 100");
        refused("eos_token_id", json!([2, 100]), "below vocab_size, 100");
        refused("eos_token_id", json!([]), "below vocab_size, 100");
        assert_eq!(
            with("eos_token_id", json!([7, 2])).unwrap().eos_token_id,
            Some(7)
        );
    }

    #[test]
    fn bounds_layer_norm_epsilon() {
        for v in [
            json!(0.0),
            json!(-1e-5),
            json!(2.0),
            json!(1e-300),
            json!("1e-5"),
        ] {
            refused("layer_norm_epsilon", v, "a number from 1e-30 to 1");
        }
        assert_eq!(
            with("layer_norm_epsilon", json!(1e-6))
                .unwrap()
                .layer_norm_epsilon,
            1e-6
        );
    }

    #[test]
    fn refuses_other_architectures() {
        let e = FalconConfig::from_json(&json!({"model_type": "llama", "hidden_size": 64}))
            .unwrap_err();
        assert!(e.to_string().contains("llama"), "{e}");
    }
}
