//! The weights of a Hugging Face checkpoint: one `model.safetensors` or the shards named by
//! `model.safetensors.index.json`, memory-mapped and validated with the `safetensors` crate.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};

use crate::error::ConvertError;

/// Element type of a source tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceDtype {
    BF16,
    F16,
    F32,
}

impl SourceDtype {
    pub fn size(self) -> usize {
        match self {
            SourceDtype::BF16 | SourceDtype::F16 => 2,
            SourceDtype::F32 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SourceDtype::BF16 => "BF16",
            SourceDtype::F16 => "F16",
            SourceDtype::F32 => "F32",
        }
    }
}

/// Where one tensor's bytes are.
#[derive(Clone, Debug)]
pub struct SourceTensor {
    pub name: String,
    pub shard: usize,
    pub dtype: SourceDtype,
    /// Row-major shape as stored (PyTorch order).
    pub shape: Vec<u64>,
    /// Byte range inside the shard's mapping.
    pub start: usize,
    pub end: usize,
}

/// A memory-mapped checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    shards: Vec<(PathBuf, Mmap)>,
    tensors: BTreeMap<String, SourceTensor>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint, ConvertError> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let shard_paths: Vec<PathBuf> = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| ConvertError::io(&index, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ConvertError::BadConfig {
                    path: index.clone(),
                    why: format!("invalid JSON: {e}"),
                })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ConvertError::BadConfig {
                    path: index.clone(),
                    why: "no 'weight_map' object".into(),
                })?;
            let names: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            let mut paths = Vec::new();
            for name in names {
                if name.contains('/') || name.contains("..") {
                    return Err(ConvertError::BadConfig {
                        path: index.clone(),
                        why: format!("shard name {name:?} leaves the directory"),
                    });
                }
                let p = dir.join(name);
                if !p.is_file() {
                    return Err(ConvertError::MissingShard {
                        index: index.clone(),
                        shard: p,
                    });
                }
                paths.push(p);
            }
            paths
        } else if single.is_file() {
            vec![single]
        } else {
            return Err(ConvertError::NoWeights {
                dir: dir.to_path_buf(),
            });
        };

        let mut shards: Vec<(PathBuf, Mmap)> = Vec::new();
        let mut tensors: BTreeMap<String, SourceTensor> = BTreeMap::new();
        for (i, path) in shard_paths.into_iter().enumerate() {
            let file = File::open(&path).map_err(|e| ConvertError::io(&path, e))?;
            // SAFETY: read-only mapping of a checkpoint file. If another process truncates it while
            // we read, we may fault (as every mmap-based loader, safetensors' own included, would);
            // modified bytes are caught by the NaN/Inf check or produce a valid but different file.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| ConvertError::io(&path, e))?;
            let st = SafeTensors::deserialize(&map).map_err(|e| ConvertError::BadSafetensors {
                path: path.clone(),
                why: e.to_string(),
            })?;
            let base = map.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let dtype = match view.dtype() {
                    Dtype::BF16 => SourceDtype::BF16,
                    Dtype::F16 => SourceDtype::F16,
                    Dtype::F32 => SourceDtype::F32,
                    other => {
                        return Err(ConvertError::UnsupportedDtype {
                            tensor: name,
                            file: path.clone(),
                            dtype: format!("{other:?}"),
                        })
                    }
                };
                let start = view.data().as_ptr() as usize - base;
                let end = start + view.data().len();
                let shape = view.shape().iter().map(|&d| d as u64).collect();
                if let Some(first) = tensors.get(&name) {
                    return Err(ConvertError::DuplicateTensor {
                        tensor: name,
                        first: shards[first.shard].0.clone(),
                        second: path.clone(),
                    });
                }
                tensors.insert(
                    name.clone(),
                    SourceTensor {
                        name,
                        shard: i,
                        dtype,
                        shape,
                        start,
                        end,
                    },
                );
            }
            // Reading front to back, once: tell the kernel.
            let _ = map.advise(memmap2::Advice::Sequential);
            shards.push((path, map));
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            shards,
            tensors,
        })
    }

    /// A checkpoint with no weights (for `--vocab-only`).
    pub fn empty() -> Checkpoint {
        Checkpoint {
            dir: PathBuf::new(),
            shards: Vec::new(),
            tensors: BTreeMap::new(),
        }
    }

    pub fn tensors(&self) -> impl Iterator<Item = &SourceTensor> {
        self.tensors.values()
    }

    pub fn get(&self, name: &str) -> Option<&SourceTensor> {
        self.tensors.get(name)
    }

    pub fn shard_path(&self, t: &SourceTensor) -> &Path {
        &self.shards[t.shard].0
    }

    /// Raw bytes of a tensor.
    pub fn bytes(&self, t: &SourceTensor) -> &[u8] {
        &self.shards[t.shard].1[t.start..t.end]
    }

    /// Total bytes of all weights.
    pub fn total_bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|t| (t.end - t.start) as u64)
            .sum()
    }

    /// Asks the kernel to start reading a tensor's bytes now, so that reading overlaps the
    /// conversion of the tensor before it.
    pub fn prefetch(&self, t: &SourceTensor) {
        let _ = self.shards[t.shard].1.advise_range(
            memmap2::Advice::WillNeed,
            t.start,
            t.end - t.start,
        );
    }

    /// Drops the pages of `range` (bytes within tensor `t`) from this process's resident set once
    /// they have been consumed, so that peak memory stays bounded by the work in flight rather
    /// than by the model. Only whole pages inside the range are released.
    pub fn release(&self, t: &SourceTensor, range: std::ops::Range<usize>) {
        const PAGE: usize = 4096;
        let map = &self.shards[t.shard].1;
        let start = (t.start + range.start).next_multiple_of(PAGE);
        let end = (t.start + range.end) / PAGE * PAGE;
        if end > start {
            // SAFETY: a read-only private file mapping; MADV_DONTNEED only drops pages, which are
            // read back from the file if touched again, so no data visible through `map` changes.
            unsafe {
                let _ = map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                );
            }
        }
    }
}

/// Converts one row of source elements to f32.
pub fn to_f32(dtype: SourceDtype, src: &[u8], dst: &mut [f32]) {
    match dtype {
        SourceDtype::BF16 => {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        SourceDtype::F16 => {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        SourceDtype::F32 => {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
}
