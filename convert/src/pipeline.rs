//! One streaming pass: checkpoint → quantized GGUF, in a temporary file renamed into place.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quant::QuantType;
use rayon::prelude::*;

use crate::adapter::{LoraSpec, MergePlan, MergedAdapter};
use crate::checkpoint::{to_f32, Checkpoint};
use crate::config::FalconConfig;
use crate::error::ConvertError;
use crate::gguf::{keys, GgufPlan, GgufWriter, PlannedTensor, Value};
use crate::layout::{match_checkpoint, plan_types, FalconTensor, Transform};
use crate::partial::PartialFile;
use crate::rules::FileType;
use crate::vocab::Vocab;

/// What to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// `--bits 4|8`: the best mix of that width the model's shapes allow.
    Bits(u32),
    /// `--type`: one file type.
    Type(FileType),
}

/// Called with (bytes of input done, bytes in all).
pub type ProgressFn = dyn Fn(u64, u64) + Send + Sync;

/// Options of [`quantize_checkpoint`].
#[derive(Clone)]
pub struct Options {
    pub target: Target,
    /// Worker threads; `None` for one per core.
    pub threads: Option<usize>,
    /// Write the tokenizer and metadata only.
    pub vocab_only: bool,
    pub progress: Option<Arc<ProgressFn>>,
    /// Set from another thread (e.g. a Ctrl-C handler) to stop; nothing is left at the destination.
    pub cancel: Option<Arc<AtomicBool>>,
    /// PEFT LoRA adapters merged into the weights as they are converted (see
    /// [`crate::adapter::MergePlan`]).
    pub loras: Vec<LoraSpec>,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("target", &self.target)
            .field("threads", &self.threads)
            .field("vocab_only", &self.vocab_only)
            .field("loras", &self.loras)
            .finish_non_exhaustive()
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            target: Target::Bits(4),
            threads: None,
            vocab_only: false,
            progress: None,
            cancel: None,
            loras: Vec::new(),
        }
    }
}

/// What was written.
#[derive(Clone, Debug)]
pub struct Summary {
    pub path: PathBuf,
    pub file_type: FileType,
    pub bytes: u64,
    /// Bytes of tensor data (the file less its header).
    pub tensor_bytes: u64,
    pub n_tensors: usize,
    /// Parameters in the matrices and vectors written.
    pub n_params: u64,
    pub input_bytes: u64,
    pub elapsed: Duration,
    /// How many tensors of each type.
    pub type_counts: Vec<(QuantType, usize)>,
    /// The adapters merged, as recorded in the file.
    pub merged: Vec<MergedAdapter>,
}

impl Summary {
    pub fn bits_per_weight(&self) -> f64 {
        if self.n_params == 0 {
            return 0.0;
        }
        self.tensor_bytes as f64 * 8.0 / self.n_params as f64
    }
}

/// A checkpoint read and planned, before any byte is written.
#[derive(Debug)]
pub struct Prepared {
    pub config: FalconConfig,
    pub checkpoint: Checkpoint,
    pub file_type: FileType,
    pub plan: GgufPlan,
    pub tensors: Vec<FalconTensor>,
    /// The adapters merged into the weights.
    pub merge: Option<MergePlan>,
    pub merged: Vec<MergedAdapter>,
}

/// Reads the checkpoint directory and plans the output file.
pub fn prepare(dir: &Path, opts: &Options) -> Result<Prepared, ConvertError> {
    if !dir.is_dir() {
        return Err(ConvertError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    if !dir.join("config.json").is_file() {
        return Err(ConvertError::MissingConfig {
            dir: dir.to_path_buf(),
        });
    }
    // Every number of config.json is bounded first; then the weights' shapes are checked
    // against it (safetensors checks them against the files' sizes) before the vocabulary, the
    // largest table built from it, is read.
    let config = FalconConfig::from_dir(dir)?;
    let file_type = match opts.target {
        Target::Type(t) => t,
        Target::Bits(b) => FileType::for_bits(b, config.hidden_size)
            .ok_or(ConvertError::UnsupportedBits { bits: b })?,
    };
    let checkpoint = if opts.vocab_only {
        None
    } else {
        Some(Checkpoint::open(dir)?)
    };
    let mut tensors = match &checkpoint {
        Some(c) => match_checkpoint(&config, c)?,
        None => Vec::new(),
    };
    let vocab = Vocab::from_dir(dir, &config)?;
    let merge = if opts.loras.is_empty() || checkpoint.is_none() {
        None
    } else {
        Some(MergePlan::prepare(&opts.loras, &config, &mut tensors)?)
    };

    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let mut plan = falcon_metadata(&config, &name.unwrap_or_else(|| "falcon".into()), file_type);
    vocab.add_to(&mut plan);
    let merged = match &merge {
        Some(m) => m.add_metadata(&mut plan)?,
        None => Vec::new(),
    };

    for t in plan_types(&config, file_type, &tensors) {
        plan.add_tensor(t);
    }
    Ok(Prepared {
        config,
        checkpoint: checkpoint.unwrap_or_else(Checkpoint::empty),
        file_type,
        plan,
        tensors,
        merge,
        merged,
    })
}

/// A plan holding the `general.*` and `falcon.*` metadata of a model, no tokenizer, no tensors.
pub(crate) fn falcon_metadata(config: &FalconConfig, name: &str, file_type: FileType) -> GgufPlan {
    let u32_of = |v: u64| Value::U32(u32::try_from(v).expect("validated hyper-parameter"));
    let mut plan = GgufPlan::new();
    plan.set(
        keys::GENERAL_ARCHITECTURE,
        Value::String(keys::ARCH_FALCON.into()),
    );
    plan.set(keys::GENERAL_NAME, Value::String(name.into()));
    plan.set(keys::GENERAL_FILE_TYPE, Value::U32(file_type.llama_ftype()));
    plan.set(
        keys::GENERAL_QUANTIZATION_VERSION,
        Value::U32(keys::QNT_VERSION),
    );
    plan.set(keys::CONTEXT_LENGTH, u32_of(config.max_position_embeddings));
    plan.set(keys::EMBEDDING_LENGTH, u32_of(config.hidden_size));
    plan.set(keys::FEED_FORWARD_LENGTH, u32_of(config.ffn_hidden_size));
    plan.set(keys::BLOCK_COUNT, u32_of(config.n_layer));
    plan.set(keys::HEAD_COUNT, u32_of(config.n_head));
    plan.set(keys::HEAD_COUNT_KV, u32_of(config.n_head_kv));
    plan.set(keys::LAYER_NORM_EPS, Value::F32(config.layer_norm_epsilon));
    plan.set(
        keys::TENSOR_DATA_LAYOUT,
        Value::String(keys::TENSOR_DATA_LAYOUT_REGROUPED.into()),
    );
    plan
}

/// Elements of f32 converted per chunk: bounds the memory in flight (about 3 chunks of f32 plus
/// their quantized bytes, i.e. under 200 MB whatever the model's size).
const CHUNK_ELEMENTS: usize = 8 << 20;

/// Converts a checkpoint directory into a GGUF file at `out`, in one pass.
pub fn quantize_checkpoint(
    dir: &Path,
    out: &Path,
    opts: &Options,
) -> Result<Summary, ConvertError> {
    let start = Instant::now();
    let prepared = prepare(dir, opts)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.unwrap_or(0))
        .build()
        .map_err(|e| ConvertError::write(out, std::io::Error::other(e)))?;
    let bytes = pool.install(|| write_file(&prepared, out, opts))?;
    let mut type_counts: Vec<(QuantType, usize)> = Vec::new();
    for t in &prepared.plan.tensors {
        match type_counts.iter_mut().find(|(ty, _)| *ty == t.ty) {
            Some((_, n)) => *n += 1,
            None => type_counts.push((t.ty, 1)),
        }
    }
    Ok(Summary {
        path: out.to_path_buf(),
        file_type: prepared.file_type,
        bytes,
        tensor_bytes: prepared
            .plan
            .tensors
            .iter()
            .map(PlannedTensor::n_bytes)
            .sum(),
        n_tensors: prepared.plan.tensors.len(),
        n_params: prepared
            .plan
            .tensors
            .iter()
            .map(|t| t.dims.iter().product::<u64>())
            .sum(),
        input_bytes: prepared.checkpoint.total_bytes(),
        elapsed: start.elapsed(),
        type_counts,
        merged: prepared.merged.clone(),
    })
}

fn write_file(p: &Prepared, out: &Path, opts: &Options) -> Result<u64, ConvertError> {
    let parent = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(ConvertError::write(
            out,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the destination directory does not exist",
            ),
        ));
    }
    let file_len = p.plan.file_len();
    if let Some(available) = crate::sys::free_space(&parent) {
        if available < file_len {
            return Err(ConvertError::NoSpace {
                path: out.to_path_buf(),
                needed: file_len,
                available,
            });
        }
    }
    // Removed on every early return and by `partial::remove_all`; stale ones of killed runs
    // are removed when it is created: nothing half-written stays behind.
    let partial = PartialFile::create(out).map_err(|e| ConvertError::write(out, e))?;
    let file = partial
        .file()
        .try_clone()
        .map_err(|e| ConvertError::write(out, e))?;
    let total_in: u64 = p
        .tensors
        .iter()
        .map(|t| {
            p.checkpoint
                .get(&t.hf_name)
                .map_or(0, |s| (s.end - s.start) as u64)
        })
        .sum();
    let done = AtomicU64::new(0);
    let cancelled = || {
        opts.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    };

    // A writer thread takes finished chunks while the pool converts the next ones.
    let (tx, rx) = sync_channel::<Vec<u8>>(2);
    let plan = p.plan.clone();
    let out_path = out.to_path_buf();
    let writer = std::thread::spawn(move || -> Result<File, std::io::Error> {
        let mut w = GgufWriter::new(BufWriter::with_capacity(4 << 20, file), plan)?;
        for chunk in rx {
            w.write_tensor_bytes(&chunk)?;
        }
        let buf = w.finish()?;
        buf.into_inner().map_err(|e| e.into_error())
    });

    let produce = || -> Result<(), ConvertError> {
        let source = |t: &FalconTensor| {
            p.checkpoint
                .get(&t.hf_name)
                .expect("planned from the checkpoint")
        };
        if let Some(first) = p.tensors.first() {
            p.checkpoint.prefetch(source(first));
        }
        for (i, (t, planned)) in p.tensors.iter().zip(&p.plan.tensors).enumerate() {
            let src = source(t);
            // Adapters: LoRA products added to this weight's rows, or a replacement of it.
            let delta = match &p.merge {
                Some(m) => m.delta_for(t)?,
                None => None,
            };
            let replaced = p.merge.as_ref().is_some_and(|m| m.replaces(&t.name));
            if let Some(next) = p.tensors.get(i + 1) {
                p.checkpoint.prefetch(source(next));
            }
            let bytes = p.checkpoint.bytes(src);
            let row_len = t.row_len() as usize;
            let n_rows = t.n_rows() as usize;
            let es = src.dtype.size();
            let rows_per_chunk = (CHUNK_ELEMENTS / row_len).max(1);
            let mut r0 = 0;
            while r0 < n_rows {
                if cancelled() {
                    return Err(ConvertError::Interrupted {
                        path: out_path.clone(),
                    });
                }
                let r1 = (r0 + rows_per_chunk).min(n_rows);
                let mut f32s = vec![0f32; (r1 - r0) * row_len];
                f32s.par_chunks_mut(row_len)
                    .enumerate()
                    .for_each(|(i, row)| {
                        let r = (r0 + i) as u64;
                        let s = t.transform.source_row(&p.config, r) as usize;
                        to_f32(
                            src.dtype,
                            &bytes[s * row_len * es..(s + 1) * row_len * es],
                            row,
                        );
                    });
                if let Some(d) = &delta {
                    d.add_to(&mut f32s, row_len, r0..r1, |r| {
                        t.transform.source_row(&p.config, r as u64) as usize
                    })?;
                }
                if replaced {
                    let m = p.merge.as_ref().expect("replacements come from adapters");
                    m.replace_rows(&t.name, &mut f32s, r0..r1)?;
                }
                let mut q = vec![0u8; planned.ty.row_bytes(row_len)? * (r1 - r0)];
                quant::quantize(planned.ty, &f32s, row_len, &mut q).map_err(|e| match e {
                    quant::QuantError::NonFinite { row, index, value } => ConvertError::NonFinite {
                        tensor: t.hf_name.clone(),
                        file: p.checkpoint.shard_path(src).to_path_buf(),
                        row: r0 + row,
                        column: index,
                        value,
                    },
                    e => ConvertError::Quant(e),
                })?;
                drop(f32s);
                if tx.send(q).is_err() {
                    // The writer stopped: its error is reported when it is joined.
                    return Ok(());
                }
                if t.transform == Transform::None {
                    p.checkpoint
                        .release(src, r0 * row_len * es..r1 * row_len * es);
                }
                let n = ((r1 - r0) * row_len * es) as u64;
                let d = done.fetch_add(n, Ordering::Relaxed) + n;
                if let Some(cb) = &opts.progress {
                    cb(d, total_in);
                }
                r0 = r1;
            }
            p.checkpoint.release(src, 0..bytes.len());
        }
        Ok(())
    };
    let produced = produce();
    drop(tx);
    let written = writer.join().expect("the writer thread does not panic");
    produced?;
    // The writer's handle is closed here; `persist` flushes the file through its own.
    drop(written.map_err(|e| ConvertError::write(out, e))?);
    if cancelled() {
        return Err(ConvertError::Interrupted {
            path: out.to_path_buf(),
        });
    }
    partial.persist().map_err(|e| ConvertError::write(out, e))?;
    Ok(file_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_bits_are_a_typed_error_naming_no_flag() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-7b-style");
        let opts = Options {
            target: Target::Bits(5),
            vocab_only: true,
            ..Options::default()
        };
        let e = prepare(&dir, &opts).unwrap_err();
        assert!(
            matches!(e, ConvertError::UnsupportedBits { bits: 5 }),
            "{e:?}"
        );
        assert!(!e.to_string().contains("--"), "{e}");
    }
}
