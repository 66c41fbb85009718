//! Where the GGUF comes from: a file (validated), or a Hugging Face checkpoint directory
//! quantized once into a cache file that is reused while the checkpoint is unchanged.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{bail, Context as _};

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
    ///
    /// # Errors
    /// Any other number.
    pub fn from_u32(n: u32) -> anyhow::Result<Self> {
        match n {
            4 => Ok(Bits::Four),
            8 => Ok(Bits::Eight),
            _ => bail!("--bits {n} is not supported; use 4 or 8"),
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
pub fn validate_gguf(path: &Path) -> anyhow::Result<GgufSummary> {
    let reader = convert::gguf::GgufReader::open(path).with_context(|| {
        format!(
            "{} is not a valid GGUF file (re-create it with falcon-quantize, or pass a \
             checkpoint directory)",
            path.display()
        )
    })?;
    let architecture = reader.architecture().unwrap_or("").to_string();
    if architecture != convert::gguf::keys::ARCH_FALCON {
        bail!(
            "{} is a GGUF for architecture {:?}, not falcon; this tool runs Falcon models",
            path.display(),
            architecture
        );
    }
    Ok(GgufSummary {
        path: path.to_path_buf(),
        architecture,
        tensor_bytes: reader.tensor_bytes(),
    })
}

/// Resolves the user's model to a validated GGUF file, quantizing a checkpoint directory
/// into the cache when needed. Progress and the cache location go to stderr.
///
/// # Errors
/// Missing paths, invalid GGUFs, directories that are not Falcon checkpoints, and conversion
/// failures.
pub fn resolve(spec: &ModelSpec, quiet: bool) -> anyhow::Result<GgufSummary> {
    let path = &spec.path;
    let meta = fs::metadata(path).with_context(|| {
        format!(
            "model not found: {} (give a GGUF file or a Hugging Face checkpoint directory)",
            path.display()
        )
    })?;
    if meta.is_file() {
        return validate_gguf(path);
    }
    check_checkpoint(path)?;
    let key = cache_key(path, spec.bits)?;
    let file_name = format!("falcon-{}bit-{key:016x}.gguf", spec.bits.get());
    let dir = cache_dir_for(path)?;
    let cached = dir.join(&file_name);
    if cached.is_file() {
        match validate_gguf(&cached) {
            Ok(summary) => {
                if !quiet {
                    eprintln!(
                        "using cached {}-bit model {}",
                        spec.bits.get(),
                        cached.display()
                    );
                }
                return Ok(summary);
            }
            Err(e) => eprintln!("warning: cached model is unusable, re-creating it: {e:#}"),
        }
    }
    if !quiet {
        eprintln!(
            "quantizing {} to {} bits once; the result is cached at {}",
            path.display(),
            spec.bits.get(),
            cached.display()
        );
    }
    remove_stale(&dir, spec.bits, &file_name);
    let mut opts = convert::Options {
        target: convert::Target::Bits(spec.bits.get()),
        ..Default::default()
    };
    let bar = (!quiet).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    if let Some(bar) = bar.clone() {
        opts.progress = Some(std::sync::Arc::new(move |done: u64, total: u64| {
            bar.set_length(total);
            bar.set_position(done);
        }));
    }
    convert::quantize_checkpoint(path, &cached, &opts)
        .with_context(|| format!("quantizing checkpoint {}", path.display()))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    validate_gguf(&cached)
}

/// A directory is taken for a Falcon checkpoint when its `config.json` names a Falcon model
/// type and it holds `.safetensors` weights.
fn check_checkpoint(dir: &Path) -> anyhow::Result<()> {
    let not = |why: String| {
        anyhow::anyhow!(
            "{} is not a Falcon checkpoint: {why} (expected config.json, tokenizer.json and \
             *.safetensors from a Hugging Face Falcon model, or a GGUF file)",
            dir.display()
        )
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

fn safetensors_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading directory {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

/// FNV-1a, 64 bit: a stable hash (std's `DefaultHasher` may change between Rust releases).
#[derive(Debug)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // A separator so that ("ab","c") and ("a","bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
}

/// The cache key: config.json's bytes, each safetensors file's name, size and mtime, the bits
/// and this tool's version.
fn cache_key(dir: &Path, bits: Bits) -> anyhow::Result<u64> {
    let mut h = Fnv::new();
    h.write(&fs::read(dir.join("config.json")).context("reading config.json")?);
    for f in safetensors_files(dir)? {
        let m = fs::metadata(&f).with_context(|| format!("reading {}", f.display()))?;
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        h.write(
            f.file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default(),
        );
        h.write(&m.len().to_le_bytes());
        h.write(&mtime.to_le_bytes());
    }
    h.write(&bits.get().to_le_bytes());
    h.write(env!("CARGO_PKG_VERSION").as_bytes());
    Ok(h.0)
}

/// The checkpoint directory itself when it is writable, else `<user cache>/falcon/<name>/`.
fn cache_dir_for(dir: &Path) -> anyhow::Result<PathBuf> {
    if tempfile_probe(dir) {
        return Ok(dir.to_path_buf());
    }
    let base = dirs::cache_dir().context(
        "the checkpoint directory is read-only and there is no user cache directory; \
         convert it with falcon-quantize -o FILE.gguf and pass the file",
    )?;
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut h = Fnv::new();
    h.write(canonical.as_os_str().as_encoded_bytes());
    let name = canonical
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    let out = base
        .join("falcon")
        .join(format!("{name}-{:08x}", h.0 as u32));
    fs::create_dir_all(&out)
        .with_context(|| format!("creating cache directory {}", out.display()))?;
    Ok(out)
}

fn tempfile_probe(dir: &Path) -> bool {
    let probe = dir.join(format!(".falcon-write-probe-{}", std::process::id()));
    let ok = fs::File::create(&probe).is_ok();
    let _ = fs::remove_file(&probe);
    ok
}

/// Removes earlier cache files of the same bits (for an older version of the checkpoint).
fn remove_stale(dir: &Path, bits: Bits, keep: &str) {
    let prefix = format!("falcon-{}bit-", bits.get());
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let hex = name
            .strip_prefix(&prefix)
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
    fn fnv_is_stable() {
        let mut h = Fnv::new();
        h.write(b"falcon");
        assert_eq!(h.0, {
            let mut g = Fnv::new();
            g.write(b"falcon");
            g.0
        });
        let mut a = Fnv::new();
        a.write(b"ab");
        a.write(b"c");
        let mut b = Fnv::new();
        b.write(b"a");
        b.write(b"bc");
        assert_ne!(a.0, b.0);
    }

    #[test]
    fn bits_parse() {
        assert_eq!(Bits::from_u32(4).unwrap().get(), 4);
        assert_eq!(Bits::from_u32(8).unwrap().get(), 8);
        assert!(Bits::from_u32(5).is_err());
    }
}
