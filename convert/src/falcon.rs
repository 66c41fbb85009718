//! Falcon's tensors: Hugging Face names and shapes → llama.cpp's `falcon` names and shapes, and
//! the regrouping of the fused QKV rows.

use std::collections::BTreeSet;

use crate::checkpoint::{Checkpoint, SourceTensor};
use crate::config::FalconConfig;
use crate::error::ConvertError;

/// What happens to a tensor's rows on the way out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transform {
    /// Rows are written as stored.
    None,
    /// Fused QKV rows, stored per KV group as [q × (n_head/n_head_kv), k, v], regrouped into
    /// [all q, all k, all v] (the layout llama.cpp's falcon graph splits).
    RegroupQkv,
}

/// One tensor of the output file.
#[derive(Clone, Debug)]
pub struct OutputTensor {
    /// llama.cpp's name, e.g. `blk.3.attn_qkv.weight`.
    pub name: String,
    /// The source tensor's name in the checkpoint.
    pub source: String,
    /// ggml order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    /// Block index, for the per-layer quantization rules.
    pub layer: Option<u64>,
    pub transform: Transform,
}

impl OutputTensor {
    pub fn row_len(&self) -> u64 {
        self.dims[0]
    }

    pub fn n_rows(&self) -> u64 {
        self.dims[1..].iter().product()
    }
}

/// Maps the checkpoint's tensors onto llama.cpp's falcon tensors, checking names and shapes.
/// The result is in the order llama.cpp's quantizer writes tensors: the tensors outside the
/// blocks by name, then block by block, each block's tensors by name.
pub fn plan_tensors(
    cfg: &FalconConfig,
    ckpt: &Checkpoint,
) -> Result<Vec<OutputTensor>, ConvertError> {
    let prefix = if ckpt.get("transformer.word_embeddings.weight").is_some() {
        "transformer."
    } else {
        ""
    };
    let (h, ff, v, qkv) = (
        cfg.hidden_size,
        cfg.ffn_hidden_size,
        cfg.vocab_size,
        cfg.qkv_rows(),
    );
    let mut used = BTreeSet::new();
    let mut out = Vec::new();

    let mut add = |out: &mut Vec<OutputTensor>,
                   gguf: String,
                   hf: String,
                   shape: Vec<u64>,
                   layer: Option<u64>,
                   transform: Transform|
     -> Result<(), ConvertError> {
        let src = ckpt.get(&hf).ok_or_else(|| ConvertError::MissingTensor {
            tensor: hf.clone(),
            dir: ckpt.dir.clone(),
        })?;
        check_shape(ckpt, src, &shape)?;
        used.insert(hf.clone());
        // ggml lists dimensions innermost first.
        let dims = shape.iter().rev().copied().collect();
        out.push(OutputTensor {
            name: gguf,
            source: hf,
            dims,
            layer,
            transform,
        });
        Ok(())
    };

    add(
        &mut out,
        "token_embd.weight".into(),
        format!("{prefix}word_embeddings.weight"),
        vec![v, h],
        None,
        Transform::None,
    )?;
    add(
        &mut out,
        "output_norm.weight".into(),
        format!("{prefix}ln_f.weight"),
        vec![h],
        None,
        Transform::None,
    )?;
    add(
        &mut out,
        "output_norm.bias".into(),
        format!("{prefix}ln_f.bias"),
        vec![h],
        None,
        Transform::None,
    )?;
    if ckpt.get("lm_head.weight").is_some() {
        add(
            &mut out,
            "output.weight".into(),
            "lm_head.weight".into(),
            vec![v, h],
            None,
            Transform::None,
        )?;
    }

    for i in 0..cfg.n_layer {
        let b = format!("{prefix}h.{i}.");
        let l = Some(i);
        // Two LayerNorms (40B/180B): ln_attn feeds attention, ln_mlp the MLP. llama.cpp's graph
        // feeds its attn_norm to the MLP and attn_norm_2 to attention.
        let two_norms = ckpt.get(&format!("{b}ln_attn.weight")).is_some();
        let norms: &[(&str, &str)] = if two_norms {
            &[("attn_norm", "ln_mlp"), ("attn_norm_2", "ln_attn")]
        } else {
            &[("attn_norm", "input_layernorm")]
        };
        if cfg.two_layer_norms()
            && !two_norms
            && ckpt.get(&format!("{b}input_layernorm.weight")).is_none()
        {
            return Err(ConvertError::MissingTensor {
                tensor: format!("{b}ln_attn.weight"),
                dir: ckpt.dir.clone(),
            });
        }
        for (gguf, hf) in norms {
            for part in ["weight", "bias"] {
                add(
                    &mut out,
                    format!("blk.{i}.{gguf}.{part}"),
                    format!("{b}{hf}.{part}"),
                    vec![h],
                    l,
                    Transform::None,
                )?;
            }
        }
        let regroup = if cfg.n_head_kv == 1 && !cfg.new_decoder_architecture {
            Transform::None
        } else {
            Transform::RegroupQkv
        };
        add(
            &mut out,
            format!("blk.{i}.attn_qkv.weight"),
            format!("{b}self_attention.query_key_value.weight"),
            vec![qkv, h],
            l,
            regroup,
        )?;
        add(
            &mut out,
            format!("blk.{i}.attn_output.weight"),
            format!("{b}self_attention.dense.weight"),
            vec![h, h],
            l,
            Transform::None,
        )?;
        add(
            &mut out,
            format!("blk.{i}.ffn_up.weight"),
            format!("{b}mlp.dense_h_to_4h.weight"),
            vec![ff, h],
            l,
            Transform::None,
        )?;
        add(
            &mut out,
            format!("blk.{i}.ffn_down.weight"),
            format!("{b}mlp.dense_4h_to_h.weight"),
            vec![h, ff],
            l,
            Transform::None,
        )?;
    }

    for t in ckpt.tensors() {
        // Rotary caches some exporters save are recomputed by llama.cpp.
        if !used.contains(&t.name) && !t.name.ends_with("inv_freq") {
            return Err(ConvertError::UnexpectedTensor {
                tensor: t.name.clone(),
                file: ckpt.shard_path(t).to_path_buf(),
            });
        }
    }

    out.sort_by(|a, b| {
        (a.layer.map_or(-1, |l| l as i64), &a.name)
            .cmp(&(b.layer.map_or(-1, |l| l as i64), &b.name))
    });
    Ok(out)
}

fn check_shape(
    ckpt: &Checkpoint,
    src: &SourceTensor,
    expected: &[u64],
) -> Result<(), ConvertError> {
    if src.shape != expected {
        return Err(ConvertError::TensorShape {
            tensor: src.name.clone(),
            file: ckpt.shard_path(src).to_path_buf(),
            expected: expected.to_vec(),
            actual: src.shape.clone(),
        });
    }
    Ok(())
}

/// For output row `r` of a regrouped QKV matrix, the source row it comes from.
///
/// Source layout: `n_head_kv` groups, each of `q_per_group` query heads, one key head and one
/// value head, every head `head_dim` rows. Output: all query heads, then all key heads, then all
/// value heads, in group order.
pub fn qkv_source_row(r: u64, n_head: u64, n_head_kv: u64, head_dim: u64) -> u64 {
    let q_per_group = n_head / n_head_kv;
    let group_rows = (q_per_group + 2) * head_dim;
    let (head, within) = (r / head_dim, r % head_dim);
    let (group, slot) = if head < n_head {
        (head / q_per_group, head % q_per_group)
    } else if head < n_head + n_head_kv {
        (head - n_head, q_per_group)
    } else {
        (head - n_head - n_head_kv, q_per_group + 1)
    };
    group * group_rows + slot * head_dim + within
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regroup_is_a_permutation_matching_the_reference_layout() {
        // 8 query heads over 2 KV groups, head_dim 2: source rows labelled by (group, slot, i).
        let (n_head, n_kv, hd) = (8, 2, 2);
        let rows = (n_head + 2 * n_kv) * hd;
        let src: Vec<(u64, u64, u64)> = (0..n_kv)
            .flat_map(|g| (0..n_head / n_kv + 2).flat_map(move |s| (0..hd).map(move |i| (g, s, i))))
            .collect();
        let out: Vec<_> = (0..rows)
            .map(|r| src[qkv_source_row(r, n_head, n_kv, hd) as usize])
            .collect();
        // First all q heads: group 0 slots 0..4, then group 1 slots 0..4.
        assert_eq!(out[0], (0, 0, 0));
        assert_eq!(out[7], (0, 3, 1));
        assert_eq!(out[8], (1, 0, 0));
        // Then k of group 0, k of group 1, then v of each.
        assert_eq!(out[16], (0, 4, 0));
        assert_eq!(out[18], (1, 4, 0));
        assert_eq!(out[20], (0, 5, 0));
        assert_eq!(out[23], (1, 5, 1));
        let mut seen: Vec<u64> = (0..rows)
            .map(|r| qkv_source_row(r, n_head, n_kv, hd))
            .collect();
        seen.sort();
        assert_eq!(seen, (0..rows).collect::<Vec<_>>());
    }

    #[test]
    fn regroup_is_identity_for_one_kv_head() {
        for r in 0..(6 + 2) * 4 {
            assert_eq!(qkv_source_row(r, 6, 1, 4), r);
        }
    }
}
