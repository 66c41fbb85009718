//! The errors of reading a checkpoint and writing a GGUF file. Each names the file or tensor
//! and says what to do next.

use std::path::{Path, PathBuf};

use crate::gguf::GgufError;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{path} does not exist or is not a directory; pass the Hugging Face checkpoint directory (the one holding config.json)")]
    NotADirectory { path: PathBuf },
    #[error("{dir} has no config.json: is it a Hugging Face checkpoint directory?")]
    MissingConfig { dir: PathBuf },
    #[error("{path}: {why}")]
    BadConfig { path: PathBuf, why: String },
    #[error("{path}: '{key}' is {value}; it must be {expected}")]
    ConfigValue {
        path: PathBuf,
        key: String,
        /// The value as written in the file.
        value: String,
        expected: String,
    },
    #[error("{path}: unsupported model: {why}")]
    Unsupported { path: PathBuf, why: String },
    #[error("{dir} has no weights: expected model.safetensors or model.safetensors.index.json (PyTorch .bin checkpoints are not supported: convert them to safetensors first)")]
    NoWeights { dir: PathBuf },
    #[error("{index} names the shard {shard}, which is missing; download it again")]
    MissingShard { index: PathBuf, shard: PathBuf },
    #[error(
        "{path} is not a valid safetensors file ({why}); it may be truncated: download it again"
    )]
    BadSafetensors { path: PathBuf, why: String },
    #[error("tensor {tensor} is in both {first} and {second}: a checkpoint holds each tensor once; download the checkpoint again")]
    DuplicateTensor {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("tensor {tensor} is missing from the checkpoint in {dir}")]
    MissingTensor { tensor: String, dir: PathBuf },
    #[error(
        "{file}: unexpected tensor {tensor}: it is not part of a Falcon-7B/40B/180B checkpoint"
    )]
    UnexpectedTensor { tensor: String, file: PathBuf },
    #[error("{file}: tensor {tensor} has shape {actual:?} but config.json implies {expected:?}")]
    TensorShape {
        tensor: String,
        file: PathBuf,
        expected: Vec<u64>,
        actual: Vec<u64>,
    },
    #[error(
        "{file}: tensor {tensor} has dtype {dtype}; only BF16, F16 and F32 weights are supported"
    )]
    UnsupportedDtype {
        tensor: String,
        file: PathBuf,
        dtype: String,
    },
    #[error("{file}: tensor {tensor} holds {value} at row {row}, column {column}: the checkpoint is corrupt")]
    NonFinite {
        tensor: String,
        file: PathBuf,
        row: usize,
        column: usize,
        value: f32,
    },
    #[error("{path}: {why}")]
    Tokenizer { path: PathBuf, why: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}{hint}", hint = write_hint(source))]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} needs {needed} bytes but only {available} are free on its file system; free some space or choose another destination")]
    NoSpace {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("no file type has {bits}-bit weights: 4 and 8 are supported")]
    UnsupportedBits { bits: u32 },
    #[error("interrupted; nothing was written to {path}")]
    Interrupted { path: PathBuf },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("quantization failed: {0}")]
    Quant(#[from] quant::QuantError),
    /// Boxed: adapter errors carry shapes and names, and would make every result larger.
    #[error(transparent)]
    Adapter(Box<crate::adapter::AdapterError>),
}

impl From<crate::adapter::AdapterError> for ConvertError {
    fn from(e: crate::adapter::AdapterError) -> ConvertError {
        ConvertError::Adapter(Box::new(e))
    }
}

fn write_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(28) => " (the disk is full: free some space or choose another destination)",
        Some(27) => {
            " (the file size limit was reached: raise `ulimit -f` or choose another destination)"
        }
        Some(13) | Some(30) => " (no permission: choose a writable destination)",
        _ => "",
    }
}

impl ConvertError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> ConvertError {
        ConvertError::Read {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn write(path: &Path, source: std::io::Error) -> ConvertError {
        ConvertError::Write {
            path: path.to_path_buf(),
            source,
        }
    }
}
