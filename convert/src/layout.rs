//! Falcon's tensors, defined once: each tensor's llama.cpp name, Hugging Face name, shape and row
//! transform, and the type each gets in a file.
//!
//! Everything that lists Falcon's tensors reads the two tables below: mapping a checkpoint onto
//! GGUF names ([`match_checkpoint`]), the named shapes ([`crate::FalconShape::tensors`]),
//! synthetic checkpoints, the per-tensor types of a file ([`plan_types`]), the memory planner
//! ([`weight_sizes`]) and adapters ([`block_linears`]).
//!
//! ```
//! use convert::layout::{self, Variant};
//! use convert::{FalconShape, FileType};
//! let shape = FalconShape::named("falcon-7b").unwrap();
//! let tensors = layout::tensors(&shape.config, Variant::of_config(&shape.config));
//! assert_eq!(tensors[2].name, "token_embd.weight");
//! let sizes = layout::weight_sizes(&shape.config, FileType::Q4_0);
//! assert_eq!(sizes.layer_bytes.len(), 32);
//! ```

use crate::checkpoint::{Checkpoint, SourceTensor};
use crate::config::FalconConfig;
use crate::error::ConvertError;
use crate::gguf::PlannedTensor;
use crate::rules::{choose, FileType, TensorCtx};

/// One extent of a tensor, in terms of the hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dim {
    Hidden,
    Vocab,
    Ffn,
    /// Rows of the fused QKV matrix: `(n_head + 2 n_head_kv) × head_dim`.
    Qkv,
}

impl Dim {
    fn of(self, c: &FalconConfig) -> u64 {
        match self {
            Dim::Hidden => c.hidden_size,
            Dim::Vocab => c.vocab_size,
            Dim::Ffn => c.ffn_hidden_size,
            Dim::Qkv => c.qkv_rows(),
        }
    }
}

/// When a model has a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum When {
    Always,
    /// Blocks with one LayerNorm (Falcon-7B).
    OneNorm,
    /// Blocks with two LayerNorms (Falcon-40B/180B).
    TwoNorms,
    /// Models whose output matrix is not the token embedding.
    Untied,
}

/// One row of the tables: a weight (and its bias, for LayerNorms).
#[derive(Debug)]
struct Entry {
    /// llama.cpp's name without the `.weight`/`.bias` suffix (and, in a block, the `blk.N.`).
    gguf: &'static str,
    /// The Hugging Face module, without the suffix (and, in a block, the `h.N.`).
    hf: &'static str,
    /// The parameters of the module that are stored.
    parts: &'static [&'static str],
    /// PyTorch order (`[rows, columns]` for a matrix).
    shape: &'static [Dim],
    when: When,
    /// Rows are fused QKV heads, regrouped for llama.cpp (see [`qkv_source_row`]).
    qkv: bool,
}

const WEIGHT: &[&str] = &["weight"];
const WEIGHT_BIAS: &[&str] = &["weight", "bias"];

const fn entry(
    gguf: &'static str,
    hf: &'static str,
    parts: &'static [&'static str],
    shape: &'static [Dim],
    when: When,
) -> Entry {
    Entry {
        gguf,
        hf,
        parts,
        shape,
        when,
        qkv: false,
    }
}

/// The tensors outside the blocks. `lm_head` has no `transformer.` prefix.
const GLOBAL: &[Entry] = &[
    entry(
        "token_embd",
        "word_embeddings",
        WEIGHT,
        &[Dim::Vocab, Dim::Hidden],
        When::Always,
    ),
    entry(
        "output_norm",
        "ln_f",
        WEIGHT_BIAS,
        &[Dim::Hidden],
        When::Always,
    ),
    entry(
        "output",
        "lm_head",
        WEIGHT,
        &[Dim::Vocab, Dim::Hidden],
        When::Untied,
    ),
];

const LM_HEAD: &str = "lm_head";

/// The tensors of every block. With two LayerNorms, `ln_attn` feeds attention and `ln_mlp` the
/// MLP; llama.cpp's falcon graph feeds its `attn_norm` to the MLP and `attn_norm_2` to attention.
const BLOCK: &[Entry] = &[
    entry(
        "attn_norm",
        "input_layernorm",
        WEIGHT_BIAS,
        &[Dim::Hidden],
        When::OneNorm,
    ),
    entry(
        "attn_norm",
        "ln_mlp",
        WEIGHT_BIAS,
        &[Dim::Hidden],
        When::TwoNorms,
    ),
    entry(
        "attn_norm_2",
        "ln_attn",
        WEIGHT_BIAS,
        &[Dim::Hidden],
        When::TwoNorms,
    ),
    Entry {
        qkv: true,
        ..entry(
            "attn_qkv",
            "self_attention.query_key_value",
            WEIGHT,
            &[Dim::Qkv, Dim::Hidden],
            When::Always,
        )
    },
    entry(
        "attn_output",
        "self_attention.dense",
        WEIGHT,
        &[Dim::Hidden, Dim::Hidden],
        When::Always,
    ),
    entry(
        "ffn_up",
        "mlp.dense_h_to_4h",
        WEIGHT,
        &[Dim::Ffn, Dim::Hidden],
        When::Always,
    ),
    entry(
        "ffn_down",
        "mlp.dense_4h_to_h",
        WEIGHT,
        &[Dim::Hidden, Dim::Ffn],
        When::Always,
    ),
];

/// Hugging Face's prefix of every tensor but `lm_head` in `FalconForCausalLM` checkpoints.
pub const HF_PREFIX: &str = "transformer.";

/// Which of Falcon's optional tensors a model has and how its checkpoint names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    /// Two LayerNorms per block (`ln_attn`, `ln_mlp`: Falcon-40B/180B), else one
    /// (`input_layernorm`).
    pub two_norms: bool,
    /// A separate output matrix (`lm_head`), else the token embedding is reused.
    pub output: bool,
    /// Hugging Face names start with `transformer.` (all but bare `FalconModel` exports).
    pub hf_prefix: bool,
}

impl Variant {
    /// What the config says: two LayerNorms on the new decoder architecture, an output matrix
    /// when embeddings are not tied, `transformer.` names.
    pub fn of_config(c: &FalconConfig) -> Variant {
        Variant {
            two_norms: c.new_decoder_architecture,
            output: !c.tie_word_embeddings,
            hf_prefix: true,
        }
    }

    fn has(self, when: When) -> bool {
        match when {
            When::Always => true,
            When::OneNorm => !self.two_norms,
            When::TwoNorms => self.two_norms,
            When::Untied => self.output,
        }
    }
}

/// What happens to a tensor's rows on the way from the checkpoint to the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transform {
    /// Rows are written as stored.
    None,
    /// Fused QKV rows, stored per KV group as [q × (n_head/n_head_kv), k, v], regrouped into
    /// [all q, all k, all v] (the layout llama.cpp's falcon graph splits).
    RegroupQkv,
}

impl Transform {
    fn of(qkv: bool, c: &FalconConfig) -> Transform {
        // With one KV head on the old architecture, the stored order already is q..., k, v.
        if qkv && (c.n_head_kv != 1 || c.new_decoder_architecture) {
            Transform::RegroupQkv
        } else {
            Transform::None
        }
    }

    /// The checkpoint row that output row `r` comes from.
    pub fn source_row(self, c: &FalconConfig, r: u64) -> u64 {
        match self {
            Transform::None => r,
            Transform::RegroupQkv => qkv_source_row(r, c.n_head, c.n_head_kv, c.head_dim()),
        }
    }
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

/// One tensor of a Falcon model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FalconTensor {
    /// llama.cpp's name, e.g. `blk.3.attn_qkv.weight`.
    pub name: String,
    /// The name in a Hugging Face checkpoint, e.g. `transformer.h.3.self_attention.query_key_value.weight`.
    pub hf_name: String,
    /// ggml order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    /// Block index, for the per-layer type rules.
    pub layer: Option<u64>,
    pub transform: Transform,
}

impl FalconTensor {
    pub fn row_len(&self) -> u64 {
        self.dims[0]
    }

    pub fn n_rows(&self) -> u64 {
        self.dims[1..].iter().product()
    }

    /// The shape in PyTorch order, as a checkpoint stores it.
    pub fn hf_shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

fn make(e: &Entry, part: &str, c: &FalconConfig, v: Variant, layer: Option<u64>) -> FalconTensor {
    let prefix = if v.hf_prefix { HF_PREFIX } else { "" };
    let (name, hf_name) = match layer {
        Some(i) => (
            format!("blk.{i}.{}.{part}", e.gguf),
            format!("{prefix}h.{i}.{}.{part}", e.hf),
        ),
        None if e.hf == LM_HEAD => (format!("{}.{part}", e.gguf), format!("{}.{part}", e.hf)),
        None => (
            format!("{}.{part}", e.gguf),
            format!("{prefix}{}.{part}", e.hf),
        ),
    };
    FalconTensor {
        name,
        hf_name,
        // ggml lists dimensions innermost first.
        dims: e.shape.iter().rev().map(|d| d.of(c)).collect(),
        layer,
        transform: Transform::of(e.qkv, c),
    }
}

/// Every tensor of a model, in the order llama.cpp's quantizer writes them: the tensors outside
/// the blocks by name, then block by block, each block's tensors by name.
pub fn tensors(c: &FalconConfig, v: Variant) -> Vec<FalconTensor> {
    let mut out = Vec::new();
    let mut add = |table: &[Entry], layer: Option<u64>| {
        let start = out.len();
        for e in table.iter().filter(|e| v.has(e.when)) {
            for part in e.parts {
                out.push(make(e, part, c, v, layer));
            }
        }
        out[start..].sort_by(|a, b| a.name.cmp(&b.name));
    };
    add(GLOBAL, None);
    for i in 0..c.n_layer {
        add(BLOCK, Some(i));
    }
    out
}

/// Maps a checkpoint's tensors onto the model's, checking that each is present with the shape
/// the config implies and that nothing else is there. The result is in [`tensors`]' order.
///
/// The variant is read from the checkpoint: two LayerNorms when block 0 has `ln_attn` (or the
/// config says so and it has no `input_layernorm`), an output matrix when it has `lm_head` (it
/// must when the config says the embeddings are not tied).
pub fn match_checkpoint(
    c: &FalconConfig,
    ckpt: &Checkpoint,
) -> Result<Vec<FalconTensor>, ConvertError> {
    let has = |n: String| ckpt.get(&n).is_some();
    let hf_prefix = has(format!("{HF_PREFIX}word_embeddings.weight"));
    let p = if hf_prefix { HF_PREFIX } else { "" };
    let variant = Variant {
        two_norms: has(format!("{p}h.0.ln_attn.weight"))
            || (c.new_decoder_architecture && !has(format!("{p}h.0.input_layernorm.weight"))),
        output: has(format!("{LM_HEAD}.weight")) || !c.tie_word_embeddings,
        hf_prefix,
    };
    let planned = tensors(c, variant);
    for t in &planned {
        let src = ckpt
            .get(&t.hf_name)
            .ok_or_else(|| ConvertError::MissingTensor {
                tensor: t.hf_name.clone(),
                dir: ckpt.dir.clone(),
            })?;
        check_shape(ckpt, src, &t.hf_shape())?;
    }
    let known: std::collections::HashSet<&str> =
        planned.iter().map(|t| t.hf_name.as_str()).collect();
    for t in ckpt.tensors() {
        // Rotary caches some exporters save are recomputed by llama.cpp.
        if !known.contains(t.name.as_str()) && !t.name.ends_with("inv_freq") {
            return Err(ConvertError::UnexpectedTensor {
                tensor: t.name.clone(),
                file: ckpt.shard_path(t).to_path_buf(),
            });
        }
    }
    Ok(planned)
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

/// The GGUF tensors of a file of `file_type`: each of `tensors` with the type llama.cpp's
/// quantizer gives it ([`crate::rules`]).
pub fn plan_types(
    c: &FalconConfig,
    file_type: FileType,
    tensors: &[FalconTensor],
) -> Vec<PlannedTensor> {
    let tied = !tensors.iter().any(|t| t.name == "output.weight");
    tensors
        .iter()
        .map(|t| {
            let (ty, _) = choose(&TensorCtx {
                name: &t.name,
                dims: &t.dims,
                layer: t.layer,
                n_layer: c.n_layer,
                tied,
                file_type,
            });
            PlannedTensor {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ty,
            }
        })
        .collect()
}

/// Bytes of a model's weights by where llama.cpp puts them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightSizes {
    /// Each block's tensors.
    pub layer_bytes: Vec<u64>,
    /// The token embedding (llama.cpp keeps it on the CPU).
    pub embd_bytes: u64,
    /// The output norm and output matrix; when the embeddings are tied, the token embedding
    /// counted again (llama.cpp places a copy with the output layer).
    pub output_bytes: u64,
}

impl WeightSizes {
    /// Every weight, stored once.
    pub fn total(&self) -> u64 {
        self.layer_bytes.iter().sum::<u64>() + self.embd_bytes + self.output_bytes
    }
}

/// The bytes of each group of tensors of a model of config `c` in a file of `file_type`,
/// computed from the shapes and the type rules alone.
pub fn weight_sizes(c: &FalconConfig, file_type: FileType) -> WeightSizes {
    let all = tensors(c, Variant::of_config(c));
    let planned = plan_types(c, file_type, &all);
    let tied = !all.iter().any(|t| t.name == "output.weight");
    let mut sizes = WeightSizes {
        layer_bytes: vec![0; c.n_layer as usize],
        embd_bytes: 0,
        output_bytes: 0,
    };
    for (t, p) in all.iter().zip(&planned) {
        let bytes = p.n_bytes();
        match t.layer {
            Some(l) => sizes.layer_bytes[l as usize] += bytes,
            None if t.name == "token_embd.weight" => {
                sizes.embd_bytes += bytes;
                if tied {
                    sizes.output_bytes += bytes;
                }
            }
            None => sizes.output_bytes += bytes,
        }
    }
    sizes
}

/// One of the linear layers of every block, as adapters (PEFT LoRA) name and shape them.
#[derive(Clone, Copy, Debug)]
pub struct BlockLinear(&'static Entry);

impl BlockLinear {
    /// The PyTorch module name inside a block, as PEFT's `target_modules` names it, e.g.
    /// `self_attention.query_key_value`.
    pub fn module(self) -> &'static str {
        self.0.hf
    }

    /// llama.cpp's base name, e.g. `attn_qkv` (the tensor is `blk.N.attn_qkv.weight`).
    pub fn gguf(self) -> &'static str {
        self.0.gguf
    }

    /// `(out_features, in_features)`: the weight's PyTorch shape.
    pub fn shape(self, c: &FalconConfig) -> (u64, u64) {
        (self.0.shape[0].of(c), self.0.shape[1].of(c))
    }

    /// What happens to the output rows (rows of the weight, and of a LoRA `B` matrix) on the way
    /// into a GGUF file.
    pub fn transform(self, c: &FalconConfig) -> Transform {
        Transform::of(self.0.qkv, c)
    }

    /// The GGUF name of this layer's weight in block `layer`.
    pub fn gguf_name(self, layer: u64) -> String {
        format!("blk.{layer}.{}.weight", self.0.gguf)
    }
}

/// The linear layers of a block: `self_attention.query_key_value` ↔ `attn_qkv`,
/// `self_attention.dense` ↔ `attn_output`, `mlp.dense_h_to_4h` ↔ `ffn_up`,
/// `mlp.dense_4h_to_h` ↔ `ffn_down`.
pub fn block_linears() -> impl Iterator<Item = BlockLinear> {
    BLOCK
        .iter()
        .filter(|e| e.shape.len() == 2 && e.when == When::Always)
        .map(BlockLinear)
}

/// The block linear layer with PyTorch module name `module` (e.g. `mlp.dense_4h_to_h`).
pub fn block_linear(module: &str) -> Option<BlockLinear> {
    block_linears().find(|l| l.module() == module)
}

/// The block linear layer with llama.cpp base name `gguf` (e.g. `ffn_down`).
pub fn block_linear_by_gguf(gguf: &str) -> Option<BlockLinear> {
    block_linears().find(|l| l.gguf() == gguf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FalconShape;

    fn config(name: &str) -> FalconConfig {
        FalconShape::named(name).unwrap().config
    }

    #[test]
    fn seven_b_has_one_norm_and_a_tied_output() {
        let c = FalconConfig {
            n_layer: 2,
            ..config("falcon-7b")
        };
        let names: Vec<String> = tensors(&c, Variant::of_config(&c))
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(
            names[..9],
            [
                "output_norm.bias",
                "output_norm.weight",
                "token_embd.weight",
                "blk.0.attn_norm.bias",
                "blk.0.attn_norm.weight",
                "blk.0.attn_output.weight",
                "blk.0.attn_qkv.weight",
                "blk.0.ffn_down.weight",
                "blk.0.ffn_up.weight",
            ]
        );
        assert_eq!(names.len(), 3 + 2 * 6);
    }

    #[test]
    fn forty_b_has_two_norms_an_output_and_regrouped_qkv() {
        let c = config("falcon-40b");
        let all = tensors(&c, Variant::of_config(&c));
        let find = |n: &str| all.iter().find(|t| t.name == n).unwrap();
        assert_eq!(find("output.weight").hf_name, "lm_head.weight");
        assert_eq!(find("output.weight").dims, [8192, 65024]);
        assert_eq!(
            find("blk.59.attn_norm_2.bias").hf_name,
            "transformer.h.59.ln_attn.bias"
        );
        assert_eq!(
            find("blk.0.attn_norm.weight").hf_name,
            "transformer.h.0.ln_mlp.weight"
        );
        let qkv = find("blk.3.attn_qkv.weight");
        assert_eq!(qkv.transform, Transform::RegroupQkv);
        assert_eq!(qkv.hf_shape(), [(128 + 16) * 64, 8192]);
        assert_eq!(find("blk.0.attn_output.weight").transform, Transform::None);
        // Blocks in numeric order: blk.10 after blk.9.
        let layers: Vec<u64> = all.iter().filter_map(|t| t.layer).collect();
        assert!(layers.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn block_linears_map_peft_modules_to_gguf_names() {
        let c = config("falcon-40b");
        let pairs: Vec<(&str, &str, (u64, u64))> = block_linears()
            .map(|l| (l.module(), l.gguf(), l.shape(&c)))
            .collect();
        assert_eq!(
            pairs,
            [
                ("self_attention.query_key_value", "attn_qkv", (9216, 8192)),
                ("self_attention.dense", "attn_output", (8192, 8192)),
                ("mlp.dense_h_to_4h", "ffn_up", (32768, 8192)),
                ("mlp.dense_4h_to_h", "ffn_down", (8192, 32768)),
            ]
        );
        let qkv = block_linear("self_attention.query_key_value").unwrap();
        assert_eq!(qkv.transform(&c), Transform::RegroupQkv);
        assert_eq!(qkv.gguf_name(7), "blk.7.attn_qkv.weight");
        assert_eq!(
            block_linear_by_gguf("ffn_down").unwrap().module(),
            "mlp.dense_4h_to_h"
        );
        assert!(block_linear("ln_attn").is_none());
        // On Falcon-7B (one KV head, old architecture) the QKV rows stay as stored.
        let c7 = config("falcon-7b");
        assert_eq!(qkv.transform(&c7), Transform::None);
        assert_eq!(Transform::RegroupQkv.source_row(&c7, 4600), 4600);
    }

    #[test]
    fn sizes_add_up_to_the_planned_tensors() {
        for name in FalconShape::NAMES {
            let c = config(name);
            for ft in [FileType::Q4_0, FileType::Q4_K_M, FileType::F16] {
                let all = tensors(&c, Variant::of_config(&c));
                let planned: u64 = plan_types(&c, ft, &all)
                    .iter()
                    .map(PlannedTensor::n_bytes)
                    .sum();
                let s = weight_sizes(&c, ft);
                let embd_again = if c.tie_word_embeddings {
                    s.embd_bytes
                } else {
                    0
                };
                assert_eq!(s.total() - embd_again, planned, "{name} {ft:?}");
                assert_eq!(s.layer_bytes.len() as u64, c.n_layer);
            }
        }
    }

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
