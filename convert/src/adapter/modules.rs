//! The names peft gives Falcon's modules, over the layout's table of block linear layers
//! ([`crate::layout::block_linears`]).

use crate::layout::{block_linear, block_linears, BlockLinear, HF_PREFIX};

/// The module's full name in `FalconForCausalLM`, as peft matches it, e.g.
/// `transformer.h.3.mlp.dense_h_to_4h`.
pub fn module_name(l: BlockLinear, layer: u64) -> String {
    format!("{HF_PREFIX}h.{layer}.{}", l.module())
}

/// Parses `transformer.h.N.<module>` into (N, layer).
pub fn parse_module(name: &str) -> Option<(u64, BlockLinear)> {
    let rest = name.strip_prefix(HF_PREFIX)?.strip_prefix("h.")?;
    let (layer, module) = rest.split_once('.')?;
    Some((layer.parse().ok()?, block_linear(module)?))
}

/// The position of a layer in the block's table: the order modules are listed in.
pub fn index(l: BlockLinear) -> usize {
    block_linears()
        .position(|x| x.module() == l.module())
        .expect("one of the block's linear layers")
}

/// Names of the other modules of `FalconForCausalLM` that peft could wrap (the token embedding
/// and the output layer, which is linear), which this tool does not take as LoRA targets.
pub const OTHER_MODULES: [(&str, bool); 2] =
    [("transformer.word_embeddings", false), ("lm_head", true)];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for l in block_linears() {
            let (layer, back) = parse_module(&module_name(l, 7)).unwrap();
            assert_eq!((layer, back.module()), (7, l.module()));
        }
        let up = block_linear("mlp.dense_h_to_4h").unwrap();
        assert_eq!(module_name(up, 2), "transformer.h.2.mlp.dense_h_to_4h");
        assert_eq!(index(up), 2);
        assert!(parse_module("transformer.h.x.mlp.dense_h_to_4h").is_none());
        assert!(parse_module("transformer.h.1.mlp.act").is_none());
    }
}
