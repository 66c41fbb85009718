//! Random-weight checkpoints and GGUF files with Falcon's real shapes, for measuring speed and
//! memory without downloading weights.

use std::collections::BTreeMap;
use std::path::Path;

use half::bf16;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use safetensors::tensor::{Dtype, View};

use crate::error::ConvertError;
use crate::gguf::GgufWriter;
use crate::layout::{self, plan_types, Variant};
use crate::pipeline::falcon_metadata;
use crate::rules::FileType;
use crate::shapes::FalconShape;
use crate::vocab::Vocab;

/// The real Falcon tokenizer (65,024 tokens), so that synthetic models tokenize text as Falcon
/// does and every tool that inspects tokenizers accepts them.
const FALCON_TOKENIZER: &str = include_str!("../../models/falcon-tokenizer/tokenizer.json");

/// Rows of random values: LayerNorm weights near 1, biases near 0, matrices N(0, 0.02).
fn fill(name: &str, seed: u64, row0: usize, row_len: usize, out: &mut [f32]) {
    out.par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(i, row)| {
            let mut rng = SmallRng::seed_from_u64(
                seed ^ ((row0 + i) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            if name.ends_with("_norm.weight") {
                row.iter_mut()
                    .for_each(|x| *x = 1.0 + 0.05 * (rng.random::<f32>() - 0.5));
            } else if name.ends_with(".bias") {
                row.iter_mut()
                    .for_each(|x| *x = 0.02 * (rng.random::<f32>() - 0.5));
            } else {
                let n = Normal::new(0.0f32, 0.02).expect("valid");
                row.iter_mut().for_each(|x| *x = n.sample(&mut rng));
            }
        });
}

fn seed_of(name: &str, seed: u64) -> u64 {
    name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Writes a synthetic GGUF of the given shape and file type directly (no checkpoint).
pub fn write_gguf(
    shape: &FalconShape,
    file_type: FileType,
    out: &Path,
    seed: u64,
) -> Result<u64, ConvertError> {
    let c = &shape.config;
    let mut plan = falcon_metadata(c, &format!("{} (synthetic)", shape.name), file_type);
    let tok_dir = tempfile::tempdir().map_err(|e| ConvertError::write(out, e))?;
    std::fs::write(tok_dir.path().join("tokenizer.json"), FALCON_TOKENIZER)
        .map_err(|e| ConvertError::write(out, e))?;
    Vocab::from_dir(tok_dir.path(), c)?.add_to(&mut plan);

    for t in plan_types(c, file_type, &layout::tensors(c, Variant::of_config(c))) {
        plan.add_tensor(t);
    }
    let len = plan.file_len();
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".synth.")
        .suffix(".partial")
        .tempfile_in(parent)
        .map_err(|e| ConvertError::write(out, e))?;
    let file = tmp
        .as_file()
        .try_clone()
        .map_err(|e| ConvertError::write(out, e))?;
    let mut w = GgufWriter::new(
        std::io::BufWriter::with_capacity(4 << 20, file),
        plan.clone(),
    )
    .map_err(|e| ConvertError::write(out, e))?;
    for t in &plan.tensors {
        let row_len = t.dims[0] as usize;
        let n_rows: usize = t.dims[1..].iter().product::<u64>() as usize;
        let per = ((8 << 20) / row_len).max(1);
        let s = seed_of(&t.name, seed);
        let mut r0 = 0;
        while r0 < n_rows {
            let r1 = (r0 + per).min(n_rows);
            let mut f = vec![0f32; (r1 - r0) * row_len];
            fill(&t.name, s, r0, row_len, &mut f);
            let mut q = vec![0u8; t.ty.row_bytes(row_len)? * (r1 - r0)];
            quant::quantize(t.ty, &f, row_len, &mut q)?;
            w.write_tensor_bytes(&q)
                .map_err(|e| ConvertError::write(out, e))?;
            r0 = r1;
        }
    }
    w.finish().map_err(|e| ConvertError::write(out, e))?;
    crate::sys::set_default_permissions(tmp.as_file()).map_err(|e| ConvertError::write(out, e))?;
    tmp.persist(out)
        .map_err(|e| ConvertError::write(out, e.error))?;
    Ok(len)
}

struct LazyTensor {
    name: String,
    shape: Vec<usize>,
    seed: u64,
}

impl View for LazyTensor {
    fn dtype(&self) -> Dtype {
        Dtype::BF16
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let row_len = *self.shape.last().expect("at least 1-D");
        let n: usize = self.shape.iter().product();
        let mut f = vec![0f32; n];
        let kind = if self.name.contains("ln") || self.name.contains("layernorm") {
            if self.name.ends_with("weight") {
                "_norm.weight"
            } else {
                ".bias"
            }
        } else {
            "matrix"
        };
        fill(kind, self.seed, 0, row_len, &mut f);
        let mut out = vec![0u8; n * 2];
        out.par_chunks_mut(2)
            .zip(f.par_iter())
            .for_each(|(o, x)| o.copy_from_slice(&bf16::from_f32(*x).to_le_bytes()));
        out.into()
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 2
    }
}

/// Writes a synthetic Hugging Face checkpoint (config.json, tokenizer.json, bf16 safetensors in
/// shards of at most `shard_bytes`) with the given shape.
pub fn write_checkpoint(
    shape: &FalconShape,
    dir: &Path,
    seed: u64,
    shard_bytes: u64,
) -> Result<(), ConvertError> {
    let c = &shape.config;
    std::fs::create_dir_all(dir).map_err(|e| ConvertError::write(dir, e))?;
    let config = serde_json::json!({
        "architectures": ["FalconForCausalLM"], "model_type": "falcon",
        "hidden_size": c.hidden_size, "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        // As current transformers writes it: on multi-query models the key repeats the head count.
        "num_kv_heads": if c.new_decoder_architecture { c.n_head_kv } else { c.n_head },
        "multi_query": !c.new_decoder_architecture, "new_decoder_architecture": c.new_decoder_architecture,
        "parallel_attn": true, "bias": false, "alibi": false, "rope_theta": 10000.0,
        "layer_norm_epsilon": c.layer_norm_epsilon, "vocab_size": c.vocab_size,
        "bos_token_id": 11, "eos_token_id": 11, "tie_word_embeddings": c.tie_word_embeddings,
        "torch_dtype": "bfloat16", "max_position_embeddings": c.max_position_embeddings,
    });
    let write = |name: &str, text: String| {
        std::fs::write(dir.join(name), text).map_err(|e| ConvertError::write(&dir.join(name), e))
    };
    write(
        "config.json",
        serde_json::to_string_pretty(&config).expect("json"),
    )?;
    write("tokenizer.json", FALCON_TOKENIZER.to_string())?;

    let all: Vec<(String, Vec<usize>)> = layout::tensors(c, Variant::of_config(c))
        .into_iter()
        .map(|t| {
            let shape = t.hf_shape().into_iter().map(|d| d as usize).collect();
            (t.hf_name, shape)
        })
        .collect();
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in all {
        let bytes = t.1.iter().product::<usize>() as u64 * 2;
        if size + bytes > shard_bytes && !shards.last().expect("one").is_empty() {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().expect("one").push(t);
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.into_iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let views: Vec<(String, LazyTensor)> = shard
            .into_iter()
            .map(|(name, shape)| {
                weight_map.insert(name.clone(), file.clone());
                let s = seed_of(&name, seed);
                (
                    name.clone(),
                    LazyTensor {
                        name,
                        shape,
                        seed: s,
                    },
                )
            })
            .collect();
        let path = dir.join(&file);
        safetensors::serialize_to_file(views, None, &path)
            .map_err(|e| ConvertError::write(&path, std::io::Error::other(e.to_string())))?;
    }
    if n > 1 {
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        write(
            "model.safetensors.index.json",
            serde_json::to_string_pretty(&index).expect("json"),
        )?;
    }
    Ok(())
}
