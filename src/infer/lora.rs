//! LoRA adapters named with `--lora PATH[:SCALE]`: a GGUF LoRA adapter, checked against the
//! base before llama.cpp reads it, or a PEFT adapter directory, converted once for the base
//! into a GGUF adapter that is cached beside it (or in the user cache directory) and reused
//! while the adapter and the base are unchanged. A PEFT adapter on a checkpoint directory is
//! merged into its one-time quantization instead (see [`super::source::resolve`]).
//!
//! ```no_run
//! use falcon::infer::lora::{resolve_adapter, LoraArg};
//!
//! let arg = LoraArg::parse("models/lora-tiny-7b-all:0.5")?;
//! let gguf = resolve_adapter(&arg.path, "tiny-7b-style-f32.gguf".as_ref(), None)?;
//! println!("{} at scale {}", gguf.display(), arg.scale);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use convert::adapter::{export_lora, ExportOptions, CONFIG_FILE, WEIGHTS_FILE};
use convert::gguf::{keys, GgufReader};

use super::source::{cache_dir_for, file_stamp, io_err, remove_stale, Fnv, SourceError};

/// One `--lora PATH[:SCALE]`: an adapter (GGUF file or PEFT directory) and its scale.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraArg {
    /// A GGUF LoRA adapter or a PEFT adapter directory.
    pub path: PathBuf,
    /// The factor of the adapter's contribution (1 by default).
    pub scale: f32,
}

impl LoraArg {
    /// Parses `PATH` or `PATH:SCALE`. The part after the last `:` is a scale when it reads as a
    /// number; a path that exists as written is taken whole, so names holding a colon work.
    ///
    /// # Errors
    /// An empty path, a scale that is not a finite number, or text after the last `:` that is
    /// not a number where the part before it exists (a mistyped scale).
    pub fn parse(s: &str) -> Result<LoraArg, String> {
        let whole = || LoraArg {
            path: s.into(),
            scale: 1.0,
        };
        if s.is_empty() {
            return Err("empty; give PATH or PATH:SCALE".into());
        }
        let Some((path, scale)) = s.rsplit_once(':') else {
            return Ok(whole());
        };
        if Path::new(s).exists() {
            return Ok(whole());
        }
        match scale.trim().parse::<f32>() {
            Ok(v) if !v.is_finite() => Err(format!(
                "the scale {scale:?} is not a finite number; write PATH:SCALE, e.g. {path}:0.5"
            )),
            Ok(_) if path.is_empty() => Err(format!("{s:?} has a scale but no adapter path")),
            Ok(v) => Ok(LoraArg {
                path: path.into(),
                scale: v,
            }),
            Err(_) if !path.is_empty() && Path::new(path).exists() => Err(format!(
                "the scale {scale:?} is not a number; write PATH:SCALE, e.g. {path}:0.5"
            )),
            Err(_) => Ok(whole()),
        }
    }
}

impl std::str::FromStr for LoraArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LoraArg::parse(s)
    }
}

/// Resolves one adapter to a GGUF LoRA adapter that llama.cpp can load on `base` (a validated
/// Falcon GGUF): a GGUF adapter file is checked ([`validate_adapter`]); a PEFT adapter
/// directory is converted for `base` once and cached (beside the adapter when its directory is
/// writable, else under the user cache directory), then reused while the adapter's files and
/// the base are unchanged. Whether the cache was used is a `tracing` notice.
///
/// # Errors
/// A missing path, a file that is not a Falcon GGUF LoRA adapter, an adapter made for another
/// base (the first tensor whose shape differs), a PEFT adapter that cannot be converted.
pub fn resolve_adapter(
    path: &Path,
    base: &Path,
    cancel: Option<Arc<AtomicBool>>,
) -> Result<PathBuf, SourceError> {
    let meta = fs::metadata(path).map_err(|_| SourceError::AdapterNotFound(path.to_path_buf()))?;
    if meta.is_file() {
        validate_adapter(path, base)?;
        return Ok(path.to_path_buf());
    }
    let (base_key, key) = peft_cache_key(path, base)?;
    let prefix = format!("falcon-lora-{base_key:08x}-");
    let file_name = format!("{prefix}{key:016x}.gguf");
    let dir = cache_dir_for(path)?;
    let cached = dir.join(&file_name);
    if cached.is_file() {
        match validate_adapter(&cached, base) {
            Ok(()) => {
                tracing::info!(
                    "using cached LoRA adapter {} (converted from {})",
                    cached.display(),
                    path.display()
                );
                return Ok(cached);
            }
            Err(e) => tracing::warn!("the cached LoRA adapter is unusable, re-creating it: {e}"),
        }
    }
    tracing::info!(
        "converting the PEFT adapter {} for {} once; the result is cached at {}",
        path.display(),
        base.display(),
        cached.display()
    );
    remove_stale(&dir, &prefix, &file_name);
    let opts = ExportOptions {
        cancel,
        ..ExportOptions::default()
    };
    export_lora(path, base, &cached, &opts).map_err(|source| SourceError::ConvertAdapter {
        path: path.to_path_buf(),
        base: base.to_path_buf(),
        source: Box::new(source),
    })?;
    validate_adapter(&cached, base)?;
    Ok(cached)
}

/// Checks that `path` is a GGUF LoRA adapter for Falcon whose tensors fit the base GGUF at
/// `base`: every `X.lora_a` has `X`'s input width, every `X.lora_b` its output width, and the
/// two of a pair the same rank.
///
/// # Errors
/// A file that is not a valid GGUF, a GGUF that is not a Falcon LoRA adapter, the first
/// tensor that does not fit the base.
pub fn validate_adapter(path: &Path, base: &Path) -> Result<(), SourceError> {
    let r = GgufReader::open(path).map_err(|source| SourceError::InvalidAdapter {
        path: path.to_path_buf(),
        source,
    })?;
    let not = |what: String| SourceError::NotAnAdapter {
        path: path.to_path_buf(),
        what,
    };
    let arch = r.architecture().unwrap_or("");
    if arch != keys::ARCH_FALCON {
        return Err(not(format!("a GGUF for architecture {arch:?}")));
    }
    let general_type = r.get(keys::GENERAL_TYPE).and_then(|v| v.as_str());
    if general_type != Some(keys::GENERAL_TYPE_ADAPTER) {
        return Err(not(format!(
            "a model (general.type {:?})",
            general_type.unwrap_or("model")
        )));
    }
    let adapter_type = r.get(keys::ADAPTER_TYPE).and_then(|v| v.as_str());
    if adapter_type != Some(keys::ADAPTER_TYPE_LORA) {
        return Err(not(format!(
            "an adapter of type {:?}",
            adapter_type.unwrap_or("")
        )));
    }
    let b = GgufReader::open(base).map_err(|source| SourceError::InvalidGguf {
        path: base.to_path_buf(),
        source,
    })?;
    let mismatch = |tensor: &str, why: String| SourceError::AdapterMismatch {
        path: path.to_path_buf(),
        base: base.to_path_buf(),
        tensor: tensor.to_string(),
        why,
    };
    for t in r.tensors() {
        let (target, is_a) = match (
            t.name.strip_suffix(".lora_a"),
            t.name.strip_suffix(".lora_b"),
        ) {
            (Some(n), _) => (n, true),
            (_, Some(n)) => (n, false),
            _ => {
                return Err(mismatch(
                    &t.name,
                    "is not a LoRA tensor (.lora_a or .lora_b)".into(),
                ))
            }
        };
        let Some(bt) = b.tensor(target) else {
            return Err(mismatch(
                &t.name,
                format!("targets {target}, which the base lacks"),
            ));
        };
        let partner = format!("{target}.{}", if is_a { "lora_b" } else { "lora_a" });
        let Some(pt) = r.tensor(&partner) else {
            return Err(mismatch(&t.name, format!("has no partner {partner}")));
        };
        let (a, bb) = if is_a { (t, pt) } else { (pt, t) };
        // ggml order: lora_a is [in, rank], lora_b [rank, out], the base weight [in, out].
        let fits = a.dims.len() == 2
            && bb.dims.len() == 2
            && bt.dims.len() == 2
            && a.dims[0] == bt.dims[0]
            && bb.dims[1] == bt.dims[1]
            && a.dims[1] == bb.dims[0];
        if !fits {
            return Err(mismatch(
                &t.name,
                format!(
                    "has dims {:?} (its pair {:?}) but {target} of the base has dims {:?}",
                    t.dims, pt.dims, bt.dims
                ),
            ));
        }
    }
    Ok(())
}

/// Keys of a PEFT adapter's converted copy: one of the base (its canonical path, size and
/// mtime), and one of everything the conversion reads (the base key, adapter_config.json's
/// bytes, the weights file's size and mtime, this tool's version).
fn peft_cache_key(dir: &Path, base: &Path) -> Result<(u32, u64), SourceError> {
    let mut b = Fnv::new();
    let canonical = base.canonicalize().map_err(io_err(base))?;
    b.write(canonical.as_os_str().as_encoded_bytes());
    b.write(&file_stamp(base)?);
    let base_key = b.0 as u32;
    let mut h = Fnv::new();
    h.write(&b.0.to_le_bytes());
    adapter_stamp(&mut h, dir)?;
    h.write(env!("CARGO_PKG_VERSION").as_bytes());
    Ok((base_key, h.0))
}

/// Adds a PEFT adapter directory's identity to `h`: adapter_config.json's bytes and the weights
/// file's size and mtime (an absent file counts as such; the conversion then says what is
/// missing).
pub(super) fn adapter_stamp(h: &mut Fnv, dir: &Path) -> Result<(), SourceError> {
    let config = dir.join(CONFIG_FILE);
    match fs::read(&config) {
        Ok(bytes) => h.write(&bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => h.write(b"<absent>"),
        Err(e) => return Err(io_err(&config)(e)),
    }
    let weights = dir.join(WEIGHTS_FILE);
    if weights.exists() {
        h.write(&file_stamp(&weights)?);
    } else {
        h.write(b"<absent>");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scale_follows_the_last_colon() {
        let a = LoraArg::parse("dir/adapter.gguf:0.5").unwrap();
        assert_eq!(a.path, PathBuf::from("dir/adapter.gguf"));
        assert_eq!(a.scale, 0.5);
        let b = LoraArg::parse("dir/adapter.gguf").unwrap();
        assert_eq!((b.path, b.scale), (PathBuf::from("dir/adapter.gguf"), 1.0));
        assert_eq!(LoraArg::parse("a:-1").unwrap().scale, -1.0);
    }

    #[test]
    fn bad_scales_are_refused() {
        assert!(LoraArg::parse("").is_err());
        assert!(LoraArg::parse(":0.5").is_err());
        assert!(LoraArg::parse("a.gguf:inf").is_err());
        assert!(LoraArg::parse("a.gguf:NaN").is_err());
        // A mistyped scale on a path that exists.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.gguf");
        fs::write(&f, b"").unwrap();
        let e = LoraArg::parse(&format!("{}:0.5x", f.display())).unwrap_err();
        assert!(e.contains("\"0.5x\" is not a number"), "{e}");
        // Text after a colon that is not a scale, with nothing before it that exists: a path.
        let p = LoraArg::parse("no/such:thing").unwrap();
        assert_eq!(p.path, PathBuf::from("no/such:thing"));
    }

    #[test]
    fn a_path_with_a_colon_that_exists_is_taken_whole() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("adapter:2");
        fs::write(&f, b"").unwrap();
        let a = LoraArg::parse(f.to_str().unwrap()).unwrap();
        assert_eq!((a.path, a.scale), (f, 1.0));
    }

    #[test]
    fn the_adapter_files_and_the_base_change_the_cache_key() {
        let dir = tempfile::tempdir().unwrap();
        let ad = dir.path().join("ad");
        fs::create_dir(&ad).unwrap();
        fs::write(ad.join(CONFIG_FILE), "{}").unwrap();
        fs::write(ad.join(WEIGHTS_FILE), "x").unwrap();
        let base = dir.path().join("base.gguf");
        fs::write(&base, "b").unwrap();
        let other = dir.path().join("other.gguf");
        fs::write(&other, "b").unwrap();
        let k = peft_cache_key(&ad, &base).unwrap();
        assert_eq!(k, peft_cache_key(&ad, &base).unwrap());
        let ko = peft_cache_key(&ad, &other).unwrap();
        assert_ne!(k.0, ko.0);
        assert_ne!(k.1, ko.1);
        fs::write(ad.join(CONFIG_FILE), "{ }").unwrap();
        let k2 = peft_cache_key(&ad, &base).unwrap();
        assert_eq!(k.0, k2.0, "the base part stays");
        assert_ne!(k.1, k2.1);
        fs::write(ad.join(WEIGHTS_FILE), "xy").unwrap();
        assert_ne!(k2.1, peft_cache_key(&ad, &base).unwrap().1);
    }
}
