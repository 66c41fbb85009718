//! Where the GGUF comes from: a file (validated), or a Hugging Face checkpoint directory
//! quantized once into a cache file that is reused while the checkpoint is unchanged (and, with
//! PEFT adapters given with `--lora`, while they are unchanged too: they are merged in that
//! one pass). Adapters applied at run time are resolved by [`super::lora`].

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

pub use super::lora::LoraArg;
use super::lora::{adapter_stamp, resolve_adapter};

/// Weight bits for a checkpoint directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bits {
    /// 4-bit (Q4_K family).
    Four,
    /// 8-bit (Q8_0).
    Eight,
}

impl Bits {
    /// 4 or 8.
    #[must_use]
    pub fn get(self) -> u32 {
        match self {
            Bits::Four => 4,
            Bits::Eight => 8,
        }
    }

    /// From 4 or 8.
    #[must_use]
    pub fn from_u32(n: u32) -> Option<Self> {
        match n {
            4 => Some(Bits::Four),
            8 => Some(Bits::Eight),
            _ => None,
        }
    }
}

/// The model the user named.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// A GGUF file or a checkpoint directory.
    pub path: PathBuf,
    /// Bits when `path` is a checkpoint directory.
    pub bits: Bits,
    /// LoRA adapters (`--lora`). PEFT adapter directories on a checkpoint directory are merged
    /// into its quantization ([`resolve`]); the others are applied at run time
    /// ([`resolve_adapters`]).
    pub loras: Vec<LoraArg>,
}

impl ModelSpec {
    /// A model without adapters.
    #[must_use]
    pub fn new(path: PathBuf, bits: Bits) -> Self {
        ModelSpec {
            path,
            bits,
            loras: Vec::new(),
        }
    }

    /// The adapters merged into the quantization: PEFT directories, when `path` is a
    /// checkpoint directory.
    fn merged(&self) -> Vec<&LoraArg> {
        if !self.path.is_dir() {
            return Vec::new();
        }
        self.loras.iter().filter(|l| l.path.is_dir()).collect()
    }
}

/// Why a model could not be resolved to a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Nothing at the path.
    #[error("model not found: {} (give a GGUF file or a Hugging Face checkpoint directory)", .0.display())]
    NotFound(PathBuf),
    /// A file that is not a valid GGUF.
    #[error("{} is not a valid GGUF file (re-create it with falcon-quantize, or pass a checkpoint directory)", path.display())]
    InvalidGguf {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: convert::gguf::GgufError,
    },
    /// A GGUF of another architecture.
    #[error("{} is a GGUF for architecture {architecture:?}, not falcon; this tool runs Falcon models", path.display())]
    NotFalcon {
        /// The file.
        path: PathBuf,
        /// Its `general.architecture`.
        architecture: String,
    },
    /// A directory that is not a Falcon checkpoint.
    #[error("{} is not a Falcon checkpoint: {why} (expected config.json, tokenizer.json and *.safetensors from a Hugging Face Falcon model, or a GGUF file)", path.display())]
    NotACheckpoint {
        /// The directory.
        path: PathBuf,
        /// Why not.
        why: String,
    },
    /// Reading the checkpoint or its cache failed.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The checkpoint directory is read-only and there is no user cache directory.
    #[error("{} is read-only and there is no user cache directory to keep its quantized copy in; convert it with falcon-quantize -o FILE.gguf and pass the file", .0.display())]
    NoCacheDir(PathBuf),
    /// A `--lora` path that does not exist.
    #[error("LoRA adapter not found: {} (give a GGUF LoRA adapter file or a PEFT adapter directory)", .0.display())]
    AdapterNotFound(PathBuf),
    /// A `--lora` file that is not a valid GGUF.
    #[error("{} is not a valid GGUF file; give a GGUF LoRA adapter (falcon-quantize lora ADAPTER_DIR --base MODEL -o FILE.gguf) or a PEFT adapter directory", path.display())]
    InvalidAdapter {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: convert::gguf::GgufError,
    },
    /// A `--lora` GGUF that is not a Falcon LoRA adapter.
    #[error("{} is {what}, not a Falcon LoRA adapter; --lora takes a GGUF LoRA adapter (falcon-quantize lora ADAPTER_DIR --base MODEL -o FILE.gguf) or a PEFT adapter directory, and a model goes to --model", path.display())]
    NotAnAdapter {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        what: String,
    },
    /// A GGUF LoRA adapter whose tensors do not fit the base.
    #[error("{}: tensor {tensor} {why}: the adapter was made for another base model than {}; use it with its own base, or convert the PEFT adapter again for this one", path.display(), base.display())]
    AdapterMismatch {
        /// The adapter.
        path: PathBuf,
        /// The base GGUF.
        base: PathBuf,
        /// The first tensor that does not fit.
        tensor: String,
        /// How.
        why: String,
    },
    /// Converting a PEFT adapter for the base failed.
    #[error("converting the PEFT adapter {} for {}", path.display(), base.display())]
    ConvertAdapter {
        /// The adapter directory.
        path: PathBuf,
        /// The base GGUF.
        base: PathBuf,
        /// The error (boxed: conversion errors carry much detail).
        #[source]
        source: Box<convert::ConvertError>,
    },
    /// Quantizing the checkpoint failed.
    #[error("quantizing checkpoint {}", path.display())]
    Convert {
        /// The checkpoint.
        path: PathBuf,
        /// The error (boxed: conversion errors carry much detail).
        #[source]
        source: Box<convert::ConvertError>,
    },
}

/// What a validated GGUF holds, as far as the CLI cares.
#[derive(Debug, Clone)]
pub struct GgufSummary {
    /// The file.
    pub path: PathBuf,
    /// `general.architecture`.
    pub architecture: String,
    /// Bytes of tensor data.
    pub tensor_bytes: u64,
}

/// Validates a GGUF with the `convert` crate's reader: counts, strings, type ids, dimensions,
/// offsets and sizes against the file length. Only files that pass reach llama.cpp.
///
/// # Errors
/// A clear message naming the file and what is wrong with it.
pub fn validate_gguf(path: &Path) -> Result<GgufSummary, SourceError> {
    let reader =
        convert::gguf::GgufReader::open(path).map_err(|source| SourceError::InvalidGguf {
            path: path.to_path_buf(),
            source,
        })?;
    let architecture = reader.architecture().unwrap_or("").to_string();
    if architecture != convert::gguf::keys::ARCH_FALCON {
        return Err(SourceError::NotFalcon {
            path: path.to_path_buf(),
            architecture,
        });
    }
    Ok(GgufSummary {
        path: path.to_path_buf(),
        architecture,
        tensor_bytes: reader.tensor_bytes(),
    })
}

/// Resolves the user's model to a validated GGUF file, quantizing a checkpoint directory
/// into the cache when needed (`progress` is called with bytes done and total). Where the cache
/// is and whether it was reused are `tracing` notices.
///
/// # Errors
/// Missing paths, invalid GGUFs, directories that are not Falcon checkpoints, and conversion
/// failures.
pub fn resolve(
    spec: &ModelSpec,
    progress: Option<Arc<convert::ProgressFn>>,
    cancel: Option<Arc<AtomicBool>>,
) -> Result<GgufSummary, SourceError> {
    let path = &spec.path;
    let meta = fs::metadata(path).map_err(|_| SourceError::NotFound(path.clone()))?;
    for l in &spec.loras {
        if !l.path.exists() {
            return Err(SourceError::AdapterNotFound(l.path.clone()));
        }
    }
    if meta.is_file() {
        return validate_gguf(path);
    }
    check_checkpoint(path)?;
    let merged = spec.merged();
    let key = cache_key(path, spec.bits)?;
    let (file_name, stale_prefix, with) = if merged.is_empty() {
        (
            format!("falcon-{}bit-{key:016x}.gguf", spec.bits.get()),
            format!("falcon-{}bit-", spec.bits.get()),
            String::new(),
        )
    } else {
        let (which, key) = merged_key(key, &merged)?;
        let prefix = format!("falcon-{}bit-lora-{which:08x}-", spec.bits.get());
        let names: Vec<String> = merged
            .iter()
            .map(|l| format!("{} (scale {})", l.path.display(), l.scale))
            .collect();
        (
            format!("{prefix}{key:016x}.gguf"),
            prefix,
            format!(" with the LoRA adapters {}", names.join(", ")),
        )
    };
    let dir = cache_dir_for(path)?;
    let cached = dir.join(&file_name);
    if cached.is_file() {
        match validate_gguf(&cached) {
            Ok(summary) => {
                tracing::info!(
                    "using cached {}-bit model {}{with}",
                    spec.bits.get(),
                    cached.display()
                );
                return Ok(summary);
            }
            Err(e) => tracing::warn!("the cached model is unusable, re-creating it: {e}"),
        }
    }
    tracing::info!(
        "quantizing {} to {} bits once{with}; the result is cached at {}",
        path.display(),
        spec.bits.get(),
        cached.display()
    );
    remove_stale(&dir, &stale_prefix, &file_name);
    let opts = convert::Options {
        target: convert::Target::Bits(spec.bits.get()),
        progress,
        cancel,
        loras: merged
            .iter()
            .map(|l| convert::adapter::LoraSpec {
                dir: l.path.clone(),
                scale: l.scale,
            })
            .collect(),
        ..Default::default()
    };
    convert::quantize_checkpoint(path, &cached, &opts).map_err(|source| SourceError::Convert {
        path: path.clone(),
        source: Box::new(source),
    })?;
    validate_gguf(&cached)
}

/// The adapters of `spec` applied at run time, each resolved to a GGUF LoRA adapter for the
/// model's GGUF `base` (see [`super::lora::resolve_adapter`]), with its scale: all of them on a
/// GGUF model, the GGUF adapters on a checkpoint directory (its PEFT adapters are merged).
///
/// # Errors
/// As [`super::lora::resolve_adapter`].
pub fn resolve_adapters(
    spec: &ModelSpec,
    base: &Path,
    cancel: Option<Arc<AtomicBool>>,
) -> Result<Vec<(PathBuf, f32)>, SourceError> {
    let merged = spec.merged();
    spec.loras
        .iter()
        .filter(|l| !merged.contains(l))
        .map(|l| Ok((resolve_adapter(&l.path, base, cancel.clone())?, l.scale)))
        .collect()
}

/// Keys of a checkpoint's quantization with PEFT adapters merged: one of which adapters at
/// which scales (their canonical paths), and one of everything the conversion reads (the
/// checkpoint's `key`, each adapter's name, scale and files).
fn merged_key(key: u64, merged: &[&LoraArg]) -> Result<(u32, u64), SourceError> {
    let mut which = Fnv::new();
    let mut h = Fnv::new();
    h.write(&key.to_le_bytes());
    for l in merged {
        let canonical = l.path.canonicalize().map_err(io_err(&l.path))?;
        which.write(canonical.as_os_str().as_encoded_bytes());
        which.write(&l.scale.to_le_bytes());
        h.write(
            canonical
                .file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default(),
        );
        h.write(&l.scale.to_le_bytes());
        adapter_stamp(&mut h, &l.path)?;
    }
    h.write(&which.0.to_le_bytes());
    Ok((which.0 as u32, h.0))
}

/// Size and modification time of a file, as bytes for a cache key.
pub(super) fn file_stamp(path: &Path) -> Result<Vec<u8>, SourceError> {
    let m = fs::metadata(path).map_err(io_err(path))?;
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let mut v = m.len().to_le_bytes().to_vec();
    v.extend_from_slice(&mtime.to_le_bytes());
    Ok(v)
}

/// A directory is taken for a Falcon checkpoint when its `config.json` names a Falcon model
/// type and it holds `.safetensors` weights.
fn check_checkpoint(dir: &Path) -> Result<(), SourceError> {
    let not = |why: String| SourceError::NotACheckpoint {
        path: dir.to_path_buf(),
        why,
    };
    let config = dir.join("config.json");
    let text = fs::read_to_string(&config).map_err(|_| not("no readable config.json".into()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| not(format!("config.json is not JSON ({e})")))?;
    let model_type = json
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let falcon_arch = json
        .get("architectures")
        .and_then(|v| v.as_array())
        .is_some_and(|a| {
            a.iter().any(|x| {
                x.as_str()
                    .is_some_and(|s| s.starts_with("Falcon") || s.starts_with("RW"))
            })
        });
    if !matches!(model_type, "falcon" | "RefinedWeb" | "RefinedWebModel") && !falcon_arch {
        return Err(not(format!("config.json has model_type {model_type:?}")));
    }
    if safetensors_files(dir)?.is_empty() {
        return Err(not("no *.safetensors files".into()));
    }
    Ok(())
}

pub(super) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SourceError + '_ {
    move |source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

/// FNV-1a, 64 bit, of `bytes`: a stable hash (std's `DefaultHasher` may change between Rust
/// releases).
fn fnv1a(state: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(state, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A hash of a sequence of byte strings: FNV-1a with a separator after each, so that
/// ("ab", "c") and ("a", "bc") differ.
#[derive(Debug)]
pub(super) struct Fnv(pub(super) u64);

impl Fnv {
    pub(super) fn new() -> Self {
        Fnv(FNV_OFFSET)
    }

    pub(super) fn write(&mut self, bytes: &[u8]) {
        self.0 = (fnv1a(self.0, bytes) ^ 0xff).wrapping_mul(0x0100_0000_01b3);
    }
}

/// The files besides the weights that go into the GGUF (a change to any of them must produce a
/// new cache file): the config, the tokenizer and its settings.
const INPUT_FILES: [&str; 4] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// The cache key: the bytes of every input file the conversion reads, each safetensors file's
/// name, size and mtime, the bits and this tool's version.
fn cache_key(dir: &Path, bits: Bits) -> Result<u64, SourceError> {
    let mut h = Fnv::new();
    for name in INPUT_FILES {
        let p = dir.join(name);
        h.write(name.as_bytes());
        match fs::read(&p) {
            Ok(bytes) => h.write(&bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => h.write(b"<absent>"),
            Err(e) => return Err(io_err(&p)(e)),
        }
    }
    for f in safetensors_files(dir)? {
        h.write(
            f.file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default(),
        );
        h.write(&file_stamp(&f)?);
    }
    h.write(&bits.get().to_le_bytes());
    h.write(env!("CARGO_PKG_VERSION").as_bytes());
    Ok(h.0)
}

/// The checkpoint directory itself when it is writable, else `<user cache>/falcon/<name>/`.
pub(super) fn cache_dir_for(dir: &Path) -> Result<PathBuf, SourceError> {
    if tempfile_probe(dir) {
        return Ok(dir.to_path_buf());
    }
    let base = dirs::cache_dir().ok_or_else(|| SourceError::NoCacheDir(dir.to_path_buf()))?;
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut h = Fnv::new();
    h.write(canonical.as_os_str().as_encoded_bytes());
    let name = canonical
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    let out = base
        .join("falcon")
        .join(format!("{name}-{:08x}", h.0 as u32));
    fs::create_dir_all(&out).map_err(io_err(&out))?;
    Ok(out)
}

fn tempfile_probe(dir: &Path) -> bool {
    let probe = dir.join(format!(".falcon-write-probe-{}", std::process::id()));
    let ok = fs::File::create(&probe).is_ok();
    let _ = fs::remove_file(&probe);
    ok
}

/// Removes earlier cache files named `prefix` + 16 hex digits (for an older version of the
/// checkpoint, or of its adapters).
pub(crate) fn remove_stale(dir: &Path, prefix: &str, keep: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let hex = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(".gguf"));
        if name != keep
            && hex.is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        // From the FNV reference test suite (64-bit FNV-1a).
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn the_separator_keeps_split_points_apart() {
        let mut a = Fnv::new();
        a.write(b"ab");
        a.write(b"c");
        let mut b = Fnv::new();
        b.write(b"a");
        b.write(b"bc");
        assert_ne!(a.0, b.0);
    }

    #[test]
    fn every_input_file_changes_the_cache_key() {
        let dir = tempfile::tempdir().unwrap();
        for name in INPUT_FILES {
            fs::write(dir.path().join(name), "{}").unwrap();
        }
        fs::write(dir.path().join("model.safetensors"), "x").unwrap();
        let base = cache_key(dir.path(), Bits::Four).unwrap();
        assert_ne!(base, cache_key(dir.path(), Bits::Eight).unwrap());
        for name in INPUT_FILES {
            fs::write(dir.path().join(name), "{ }").unwrap();
            assert_ne!(base, cache_key(dir.path(), Bits::Four).unwrap(), "{name}");
            fs::write(dir.path().join(name), "{}").unwrap();
            assert_eq!(base, cache_key(dir.path(), Bits::Four).unwrap());
        }
    }

    #[test]
    fn merged_adapters_their_scales_and_files_change_the_cache_key() {
        let dir = tempfile::tempdir().unwrap();
        let ad = |name: &str| {
            let p = dir.path().join(name);
            fs::create_dir_all(&p).unwrap();
            fs::write(p.join(convert::adapter::CONFIG_FILE), "{}").unwrap();
            fs::write(p.join(convert::adapter::WEIGHTS_FILE), "w").unwrap();
            p
        };
        let arg = |path: &PathBuf, scale: f32| LoraArg {
            path: path.clone(),
            scale,
        };
        let (a, b) = (ad("a"), ad("b"));
        let one = merged_key(7, &[&arg(&a, 1.0)]).unwrap();
        assert_eq!(one, merged_key(7, &[&arg(&a, 1.0)]).unwrap());
        assert_ne!(
            one.1,
            merged_key(8, &[&arg(&a, 1.0)]).unwrap().1,
            "the checkpoint"
        );
        for other in [
            merged_key(7, &[&arg(&a, 0.5)]).unwrap(),
            merged_key(7, &[&arg(&b, 1.0)]).unwrap(),
            merged_key(7, &[&arg(&a, 1.0), &arg(&b, 1.0)]).unwrap(),
        ] {
            assert_ne!(one.0, other.0, "which adapters");
            assert_ne!(one.1, other.1);
        }
        // A changed adapter keeps its place (the stale file is replaced) under a new key.
        fs::write(a.join(convert::adapter::CONFIG_FILE), "{ }").unwrap();
        let changed = merged_key(7, &[&arg(&a, 1.0)]).unwrap();
        assert_eq!(one.0, changed.0);
        assert_ne!(one.1, changed.1);
    }

    #[test]
    fn bits_parse() {
        assert_eq!(Bits::from_u32(4).unwrap().get(), 4);
        assert_eq!(Bits::from_u32(8).unwrap().get(), 8);
        assert!(Bits::from_u32(5).is_none());
    }
}
