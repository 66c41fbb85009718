//! The real shapes of Falcon-7B, -40B and -180B, for planning and synthetic checkpoints.

use crate::config::FalconConfig;
use crate::layout::{self, Variant};

/// A named Falcon shape.
#[derive(Clone, Debug, PartialEq)]
pub struct FalconShape {
    pub name: &'static str,
    pub config: FalconConfig,
}

fn shape(
    name: &'static str,
    hidden: u64,
    layers: u64,
    heads: u64,
    kv: u64,
    new_arch: bool,
) -> FalconShape {
    FalconShape {
        name,
        config: FalconConfig {
            hidden_size: hidden,
            n_layer: layers,
            n_head: heads,
            n_head_kv: kv,
            ffn_hidden_size: 4 * hidden,
            vocab_size: 65024,
            layer_norm_epsilon: 1e-5,
            new_decoder_architecture: new_arch,
            tie_word_embeddings: !new_arch,
            bos_token_id: Some(11),
            eos_token_id: Some(11),
            max_position_embeddings: 2048,
        },
    }
}

impl FalconShape {
    pub const NAMES: [&'static str; 3] = ["falcon-7b", "falcon-40b", "falcon-180b"];

    pub fn named(name: &str) -> Option<FalconShape> {
        match name.to_ascii_lowercase().as_str() {
            "falcon-7b" | "7b" => Some(shape("falcon-7b", 4544, 32, 71, 1, false)),
            "falcon-40b" | "40b" => Some(shape("falcon-40b", 8192, 60, 128, 8, true)),
            "falcon-180b" | "180b" => Some(shape("falcon-180b", 14848, 80, 232, 8, true)),
            _ => None,
        }
    }

    /// Every tensor of the model: llama.cpp name, ggml dims, layer (see [`crate::layout`]).
    pub fn tensors(&self) -> Vec<(String, Vec<u64>, Option<u64>)> {
        let c = &self.config;
        layout::tensors(c, Variant::of_config(c))
            .into_iter()
            .map(|t| (t.name, t.dims, t.layer))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_published_models() {
        let count = |n| {
            FalconShape::named(n)
                .unwrap()
                .tensors()
                .iter()
                .map(|t| t.1.iter().product::<u64>())
                .sum::<u64>()
        };
        // 6.92B, 41.8B, 179.5B parameters.
        assert_eq!(count("falcon-7b") / 10_000_000, 692);
        assert_eq!(count("falcon-40b") / 100_000_000, 418);
        assert_eq!(count("falcon-180b") / 1_000_000_000, 179);
    }
}
