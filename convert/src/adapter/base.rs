//! The base model an adapter is checked against and converted for: a Hugging Face checkpoint
//! directory or a GGUF file written for llama.cpp's `falcon` architecture.

use std::path::{Path, PathBuf};

use crate::checkpoint::{to_f32, Checkpoint};
use crate::config::FalconConfig;
use crate::error::ConvertError;
use crate::gguf::{keys, GgufReader, Value};

/// Where the base's weights are.
#[derive(Debug)]
enum Source {
    /// A checkpoint directory, with its weights mapped (`None` for a directory with only the
    /// config: enough for adapters that replace no weights).
    Checkpoint(Option<Checkpoint>),
    Gguf(GgufReader),
}

/// A base model: its hyper-parameters and, on demand, its output-layer weights.
#[derive(Debug)]
pub struct BaseModel {
    pub path: PathBuf,
    pub config: FalconConfig,
    /// Whether the base has its own output layer (`lm_head.weight` / `output.weight`) rather
    /// than the token embeddings.
    pub has_output: bool,
    source: Source,
}

impl BaseModel {
    /// Opens a checkpoint directory (reading config.json) or a GGUF file (reading its falcon.*
    /// metadata with the validating reader).
    pub fn open(path: &Path) -> Result<BaseModel, ConvertError> {
        if path.is_dir() {
            if !path.join("config.json").is_file() {
                return Err(ConvertError::MissingConfig {
                    dir: path.to_path_buf(),
                });
            }
            let config = FalconConfig::from_dir(path)?;
            let ckpt = match Checkpoint::open(path) {
                Ok(c) => Some(c),
                // Only the config is needed to convert an adapter without modules_to_save.
                Err(ConvertError::NoWeights { .. }) => None,
                Err(e) => return Err(e),
            };
            let has_output = ckpt.as_ref().map_or(!config.tie_word_embeddings, |c| {
                c.get("lm_head.weight").is_some()
            });
            return Ok(BaseModel {
                path: path.to_path_buf(),
                config,
                has_output,
                source: Source::Checkpoint(ckpt),
            });
        }
        if !path.is_file() {
            return Err(ConvertError::NotADirectory {
                path: path.to_path_buf(),
            });
        }
        let reader = GgufReader::open(path)?;
        let config = config_from_gguf(&reader)?;
        let has_output = reader.tensor("output.weight").is_some();
        Ok(BaseModel {
            path: path.to_path_buf(),
            config,
            has_output,
            source: Source::Gguf(reader),
        })
    }

    /// The base's weight of `gguf_name` (`output.weight` or `token_embd.weight`), as f32
    /// rows `[vocab, hidden]`, rows `r0..r1` (dequantized from a GGUF base).
    pub fn embedding_rows(
        &self,
        gguf_name: &str,
        rows: std::ops::Range<usize>,
    ) -> Result<Vec<f32>, ConvertError> {
        let h = self.config.hidden_size as usize;
        let mut out = vec![0f32; rows.len() * h];
        match &self.source {
            Source::Gguf(r) => {
                let t = r
                    .tensor(gguf_name)
                    .ok_or_else(|| ConvertError::MissingTensor {
                        tensor: gguf_name.to_string(),
                        dir: self.path.clone(),
                    })?;
                let ty = t.ty.quant_type().ok_or_else(|| ConvertError::Unsupported {
                    path: self.path.clone(),
                    why: format!("tensor {gguf_name} has type {}, which this tool cannot read; use an f32, f16, bf16 or q8_0/q4/q5/q6 base", t.ty.name),
                })?;
                let row_bytes = ty.row_bytes(h)?;
                let bytes = r.tensor_data(t);
                quant::dequantize(
                    ty,
                    &bytes[rows.start * row_bytes..rows.end * row_bytes],
                    h,
                    &mut out,
                )?;
            }
            Source::Checkpoint(ckpt) => {
                let dir = &self.path;
                let ckpt = ckpt
                    .as_ref()
                    .ok_or_else(|| ConvertError::NoWeights { dir: dir.clone() })?;
                let hf = match gguf_name {
                    "output.weight" => "lm_head.weight".to_string(),
                    _ => {
                        let prefix = if ckpt.get("transformer.word_embeddings.weight").is_some() {
                            "transformer."
                        } else {
                            ""
                        };
                        format!("{prefix}word_embeddings.weight")
                    }
                };
                let src = ckpt.get(&hf).ok_or_else(|| ConvertError::MissingTensor {
                    tensor: hf.clone(),
                    dir: dir.clone(),
                })?;
                let es = src.dtype.size();
                let bytes = ckpt.bytes(src);
                to_f32(
                    src.dtype,
                    &bytes[rows.start * h * es..rows.end * h * es],
                    &mut out,
                );
            }
        }
        Ok(out)
    }
}

/// The hyper-parameters of a falcon GGUF file.
pub fn config_from_gguf(r: &GgufReader) -> Result<FalconConfig, ConvertError> {
    let path = r.path();
    let bad = |why: String| ConvertError::BadConfig {
        path: path.to_path_buf(),
        why,
    };
    match r.architecture() {
        Some(keys::ARCH_FALCON) => {}
        Some(other) => {
            return Err(ConvertError::Unsupported {
                path: path.to_path_buf(),
                why: format!("its architecture is '{other}', not falcon"),
            })
        }
        None => return Err(bad(format!("no {} key", keys::GENERAL_ARCHITECTURE))),
    }
    if r.get("general.type").and_then(Value::as_str) == Some("adapter") {
        return Err(bad(
            "it is an adapter, not a model: pass the base model it applies to".into(),
        ));
    }
    let uint = |key: &str| {
        r.get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(format!("missing or non-integer {key}")))
    };
    let hidden_size = uint(keys::EMBEDDING_LENGTH)?;
    let n_layer = uint(keys::BLOCK_COUNT)?;
    let n_head = uint(keys::HEAD_COUNT)?;
    let n_head_kv = uint(keys::HEAD_COUNT_KV)?;
    let ffn_hidden_size = uint(keys::FEED_FORWARD_LENGTH)?;
    let vocab_size = r
        .tensor("token_embd.weight")
        .and_then(|t| t.dims.get(1).copied())
        .ok_or_else(|| bad("no token_embd.weight tensor".into()))?;
    if n_head == 0 || n_head_kv == 0 || hidden_size % n_head != 0 || n_head % n_head_kv != 0 {
        return Err(bad(format!(
            "{hidden_size} wide with {n_head} heads over {n_head_kv} KV heads is not a Falcon shape"
        )));
    }
    Ok(FalconConfig {
        hidden_size,
        n_layer,
        n_head,
        n_head_kv,
        ffn_hidden_size,
        vocab_size,
        layer_norm_epsilon: r
            .get(keys::LAYER_NORM_EPS)
            .and_then(Value::as_f32)
            .unwrap_or(1e-5),
        new_decoder_architecture: r.tensor("blk.0.attn_norm_2.weight").is_some(),
        tie_word_embeddings: r.tensor("output.weight").is_none(),
        bos_token_id: None,
        eos_token_id: None,
        max_position_embeddings: r
            .get(keys::CONTEXT_LENGTH)
            .and_then(Value::as_u64)
            .unwrap_or(2048),
    })
}
