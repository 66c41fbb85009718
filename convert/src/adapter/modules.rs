//! The Falcon modules a LoRA adapter can target: per-block linear layers, with their PEFT /
//! Hugging Face names, llama.cpp names and shapes.

use crate::config::FalconConfig;

/// One of the four linear layers of a Falcon block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Linear {
    QueryKeyValue,
    Dense,
    DenseHTo4h,
    Dense4hToH,
}

impl Linear {
    pub const ALL: [Linear; 4] = [
        Linear::QueryKeyValue,
        Linear::Dense,
        Linear::DenseHTo4h,
        Linear::Dense4hToH,
    ];

    /// The module's name inside a block, as in `transformer.h.N.<path>`.
    pub fn hf_path(self) -> &'static str {
        match self {
            Linear::QueryKeyValue => "self_attention.query_key_value",
            Linear::Dense => "self_attention.dense",
            Linear::DenseHTo4h => "mlp.dense_h_to_4h",
            Linear::Dense4hToH => "mlp.dense_4h_to_h",
        }
    }

    /// The last part of the module's name (what `target_modules` usually lists).
    pub fn short_name(self) -> &'static str {
        self.hf_path().rsplit('.').next().expect("non-empty")
    }

    /// llama.cpp's tensor name in block `layer`, e.g. `blk.3.attn_qkv.weight`.
    pub fn gguf_name(self, layer: u64) -> String {
        let n = match self {
            Linear::QueryKeyValue => "attn_qkv",
            Linear::Dense => "attn_output",
            Linear::DenseHTo4h => "ffn_up",
            Linear::Dense4hToH => "ffn_down",
        };
        format!("blk.{layer}.{n}.weight")
    }

    /// (out_features, in_features) of the layer: PyTorch's weight shape.
    pub fn shape(self, cfg: &FalconConfig) -> (u64, u64) {
        let (h, ff) = (cfg.hidden_size, cfg.ffn_hidden_size);
        match self {
            Linear::QueryKeyValue => (cfg.qkv_rows(), h),
            Linear::Dense => (h, h),
            Linear::DenseHTo4h => (ff, h),
            Linear::Dense4hToH => (h, ff),
        }
    }

    /// The module's full name in `FalconForCausalLM`, as peft matches it.
    pub fn module_name(self, layer: u64) -> String {
        format!("transformer.h.{layer}.{}", self.hf_path())
    }

    /// Parses `transformer.h.N.<path>` into (N, layer kind).
    pub fn parse_module(name: &str) -> Option<(u64, Linear)> {
        let rest = name.strip_prefix("transformer.h.")?;
        let (layer, path) = rest.split_once('.')?;
        let layer = layer.parse().ok()?;
        Linear::ALL
            .into_iter()
            .find(|l| l.hf_path() == path)
            .map(|l| (layer, l))
    }
}

/// Whether the fused QKV rows of this model are regrouped for llama.cpp, as the converter does
/// for its weights (see `falcon::qkv_source_row`). With one KV head the regrouping is the
/// identity whichever the layout.
pub fn regroups_qkv(cfg: &FalconConfig) -> bool {
    cfg.n_head_kv > 1
}

/// Names of the other modules of `FalconForCausalLM` that peft could wrap (an embedding and the
/// output layer), which this tool does not take as LoRA targets.
pub const OTHER_MODULES: [(&str, bool); 2] =
    [("transformer.word_embeddings", false), ("lm_head", true)];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for l in Linear::ALL {
            assert_eq!(Linear::parse_module(&l.module_name(7)), Some((7, l)));
        }
        assert_eq!(Linear::DenseHTo4h.short_name(), "dense_h_to_4h");
        assert_eq!(Linear::Dense.gguf_name(2), "blk.2.attn_output.weight");
        assert_eq!(
            Linear::parse_module("transformer.h.x.mlp.dense_h_to_4h"),
            None
        );
        assert_eq!(Linear::parse_module("transformer.h.1.mlp.act"), None);
    }
}
