//! Why a PEFT adapter was refused. Each error names the file and the key or tensor, and says
//! what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{path} does not exist or is not a directory; pass the PEFT adapter directory (the one holding adapter_config.json and adapter_model.safetensors)")]
    NotADirectory { path: PathBuf },
    #[error("{dir} has no adapter_config.json: is it a PEFT adapter directory, as save_pretrained writes it?")]
    MissingConfig { dir: PathBuf },
    #[error("{path} is a PyTorch pickle, which is not read (it can run code): load the adapter with peft and save it again with save_pretrained(dir, safe_serialization=True) to get adapter_model.safetensors")]
    PickleWeights { path: PathBuf },
    #[error("{dir} has adapter_config.json but no adapter_model.safetensors; copy the adapter's weights file there")]
    MissingWeights { dir: PathBuf },
    #[error("{path}: {key}: {why}")]
    BadConfig {
        path: PathBuf,
        key: String,
        why: String,
    },
    #[error("{path}: {key}: {why}")]
    Unsupported {
        path: PathBuf,
        key: String,
        why: String,
    },
    #[error("{path} is not a valid safetensors file ({why}); it may be truncated: copy it again")]
    BadSafetensors { path: PathBuf, why: String },
    #[error("{path}: tensor {tensor}: {why}")]
    UnexpectedTensor {
        path: PathBuf,
        tensor: String,
        why: String,
    },
    #[error("{path} has no tensor {tensor}, which adapter_config.json implies (it targets {module}); the file is incomplete or belongs to another adapter_config.json")]
    MissingTensor {
        path: PathBuf,
        tensor: String,
        module: String,
    },
    #[error("{path}: tensor {tensor} has shape {actual:?} but the base model needs {expected:?}: the adapter was made for another base model{made_for}; pass the base it was trained on", made_for = made_for(.base_model))]
    Shape {
        path: PathBuf,
        tensor: String,
        expected: Vec<u64>,
        actual: Vec<u64>,
        /// `base_model_name_or_path` from adapter_config.json.
        base_model: Option<String>,
    },
    #[error("{path}: tensor {tensor} has rank {actual} but adapter_config.json gives this module rank {expected} (from {source_key}); the weights and the config do not belong together")]
    Rank {
        path: PathBuf,
        tensor: String,
        expected: u64,
        actual: u64,
        source_key: String,
    },
    #[error("{path}: tensor {tensor} has dtype {dtype}; only F32, F16 and BF16 adapter weights are supported")]
    Dtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{path}: tensor {tensor} holds {value} at row {row}, column {column}: the adapter is corrupt")]
    NonFinite {
        path: PathBuf,
        tensor: String,
        row: usize,
        column: usize,
        value: f32,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn made_for(base: &Option<String>) -> String {
    match base {
        Some(b) if !b.is_empty() => format!(" ({b}, says adapter_config.json)"),
        _ => String::new(),
    }
}
