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

        let uint = |names: &[&str]| -> Option<u64> {
            names
                .iter()
                .find_map(|n| obj.get(*n))
                .and_then(Json::as_u64)
        };
        let flag = |names: &[&str]| -> Option<bool> {
            names
                .iter()
                .find_map(|n| obj.get(*n))
                .and_then(Json::as_bool)
        };
        let need = |names: &[&str]| {
            uint(names).ok_or_else(|| bad(format!("missing or non-integer '{}'", names[0])))
        };

        let hidden_size = need(&["hidden_size", "d_model", "n_embed"])?;
        let n_layer = need(&["num_hidden_layers", "n_layer"])?;
        let n_head = need(&["num_attention_heads", "n_head"])?;
        let vocab_size = need(&["vocab_size"])?;
        let is_legacy = matches!(model_type, "RefinedWeb" | "RefinedWebModel")
            || architectures.iter().any(|a| a.starts_with("RW"));
        // Legacy RefinedWeb (40B) configs have no new_decoder_architecture key: the class itself is
        // the new decoder; RefinedWebModel (7B) is the old one.
        let new_decoder_architecture =
            flag(&["new_decoder_architecture"]).unwrap_or(model_type == "RefinedWeb" && is_legacy);
        let multi_query = flag(&["multi_query"]).unwrap_or(true);
        let raw_kv = uint(&["num_kv_heads", "n_head_kv"]);
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
        let ffn_hidden_size = uint(&["ffn_hidden_size"]).unwrap_or(4 * hidden_size);
        if ffn_hidden_size != 4 * hidden_size {
            return Err(unsupported(format!(
                "ffn_hidden_size {ffn_hidden_size} is not 4 × hidden_size; llama.cpp's falcon architecture assumes it is"
            )));
        }
        if n_head == 0 || hidden_size % n_head != 0 {
            return Err(bad(format!(
                "hidden_size {hidden_size} is not a multiple of the {n_head} attention heads"
            )));
        }
        if n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(bad(format!(
                "{n_head} attention heads cannot be grouped over {n_head_kv} KV heads"
            )));
        }
        if n_layer == 0 || vocab_size == 0 {
            return Err(bad(
                "num_hidden_layers and vocab_size must be positive".into()
            ));
        }
        let layer_norm_epsilon = obj
            .get("layer_norm_epsilon")
            .and_then(Json::as_f64)
            .unwrap_or(1e-5) as f32;
        let token = |name: &str| {
            obj.get(name)
                .and_then(Json::as_u64)
                .and_then(|v| u32::try_from(v).ok())
        };

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
            bos_token_id: token("bos_token_id"),
            eos_token_id: token("eos_token_id"),
            max_position_embeddings: uint(&["max_position_embeddings"]).unwrap_or(2048),
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

    #[test]
    fn refuses_other_architectures() {
        let e = FalconConfig::from_json(&json!({"model_type": "llama", "hidden_size": 64}))
            .unwrap_err();
        assert!(e.to_string().contains("llama"), "{e}");
    }
}
