//! `falcon-infer plan`: what goes where and how much memory each device needs, computed from
//! tensor shapes and types alone (nothing is loaded).
//!
//! The layout follows llama.cpp's: the token embedding stays on the CPU; the last `gpu_layers`
//! of the `n_layer + 1` offloadable layers (the output norm and matrix count as the last one)
//! go to GPUs, split in contiguous runs in proportion to each GPU's memory; each layer's KV
//! cache lives with it; every device that holds layers needs a compute buffer.

use std::path::Path;

use anyhow::{bail, Context as _};
use serde::Serialize;

use super::{source, Bits};
use crate::engine::{DeviceKind, Engine, GpuLayers};

/// Plan settings.
#[derive(Debug, Clone)]
pub struct PlanConfig {
    /// GGUF file, checkpoint directory, or a named shape.
    pub model: String,
    /// Bits for a checkpoint or named shape.
    pub bits: Bits,
    /// Context size.
    pub n_ctx: u32,
    /// Batch size (compute buffers are sized for `min(batch, 512)` tokens, llama.cpp's ubatch).
    pub n_batch: u32,
    /// Free memory per GPU; `None` = ask the GPUs present.
    pub vram: Option<Vec<u64>>,
    /// Layers on GPUs.
    pub gpu_layers: GpuLayers,
    /// JSON output.
    pub json: bool,
}

/// The model's dimensions and the bytes of each group of tensors.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSizes {
    /// What was planned.
    pub name: String,
    /// The file type (e.g. `Q4_K_M`) when known.
    pub file_type: String,
    /// Transformer blocks.
    pub n_layer: u64,
    /// Hidden size.
    pub n_embd: u64,
    /// Query heads.
    pub n_head: u64,
    /// KV heads.
    pub n_head_kv: u64,
    /// FFN width.
    pub n_ff: u64,
    /// Vocabulary.
    pub n_vocab: u64,
    /// Bytes of each block's tensors.
    pub layer_bytes: Vec<u64>,
    /// Bytes of the token embedding (always on the CPU).
    pub embd_bytes: u64,
    /// Bytes of the output norm and output matrix (the token embedding again when tied).
    pub output_bytes: u64,
}

impl ModelSizes {
    /// All weights as they would be stored once.
    #[must_use]
    pub fn total_weights(&self) -> u64 {
        self.layer_bytes.iter().sum::<u64>() + self.embd_bytes + self.output_bytes
    }
}

/// What one device holds.
#[derive(Debug, Clone, Serialize)]
pub struct DevicePlan {
    /// `CPU`, `GPU0`, ...
    pub device: String,
    /// Its memory, when known.
    pub capacity: Option<u64>,
    /// Blocks it holds, as a half-open range.
    pub layers: Option<(u64, u64)>,
    /// Whether it holds the output layer.
    pub output: bool,
    /// Bytes of weights.
    pub weights: u64,
    /// Bytes of KV cache.
    pub kv_cache: u64,
    /// Bytes of compute buffers (estimate).
    pub compute: u64,
}

impl DevicePlan {
    /// Everything.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache + self.compute
    }
}

/// A full plan.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The model.
    pub model: ModelSizes,
    /// Context size.
    pub n_ctx: u32,
    /// Layers on GPUs (of `n_layer + 1`).
    pub gpu_layers: u64,
    /// Per device.
    pub devices: Vec<DevicePlan>,
    /// Sum over devices.
    pub total: u64,
}

fn shape_sizes(name: &str, cfg: &convert::FalconConfig, bits: Bits) -> anyhow::Result<ModelSizes> {
    let shape = convert::FalconShape {
        name: "checkpoint",
        config: cfg.clone(),
    };
    let file_type = convert::rules::FileType::for_bits(bits.get(), cfg.hidden_size)
        .context("no file type for these bits")?;
    let tied = cfg.tie_word_embeddings;
    let mut layer_bytes = vec![0u64; cfg.n_layer as usize];
    let (mut embd_bytes, mut output_bytes) = (0u64, 0u64);
    for (tname, dims, layer) in shape.tensors() {
        let ctx = convert::rules::TensorCtx {
            name: &tname,
            dims: &dims,
            layer,
            n_layer: cfg.n_layer,
            tied,
            file_type,
        };
        let (ty, _) = convert::rules::choose(&ctx);
        let rows: u64 = dims[1..].iter().product();
        let bytes = ty
            .row_bytes(dims[0] as usize)
            .with_context(|| format!("row of {tname}"))? as u64
            * rows;
        match layer {
            Some(l) => layer_bytes[l as usize] += bytes,
            None if tname == "token_embd.weight" => {
                embd_bytes += bytes;
                if tied {
                    output_bytes += bytes;
                }
            }
            None => output_bytes += bytes,
        }
    }
    Ok(ModelSizes {
        name: name.to_string(),
        file_type: file_type.name().to_string(),
        n_layer: cfg.n_layer,
        n_embd: cfg.hidden_size,
        n_head: cfg.n_head,
        n_head_kv: cfg.n_head_kv,
        n_ff: cfg.ffn_hidden_size,
        n_vocab: cfg.vocab_size,
        layer_bytes,
        embd_bytes,
        output_bytes,
    })
}

fn gguf_sizes(path: &Path) -> anyhow::Result<ModelSizes> {
    source::validate_gguf(path)?;
    let r = convert::gguf::GgufReader::open(path)?;
    let get = |k: &str| -> anyhow::Result<u64> {
        r.get(k)
            .and_then(|v| v.as_u64())
            .with_context(|| format!("{} lacks {k}", path.display()))
    };
    use convert::gguf::keys;
    let n_layer = get(keys::BLOCK_COUNT)?;
    let mut layer_bytes = vec![0u64; n_layer as usize];
    let (mut embd_bytes, mut output_bytes, mut has_output) = (0, 0, false);
    for t in r.tensors() {
        let layer = t
            .name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|n| n.parse::<usize>().ok());
        match layer {
            Some(l) if l < layer_bytes.len() => layer_bytes[l] += t.n_bytes,
            Some(_) => bail!("{}: tensor {} is past block_count", path.display(), t.name),
            None if t.name == "token_embd.weight" => embd_bytes += t.n_bytes,
            None => {
                has_output |= t.name == "output.weight";
                output_bytes += t.n_bytes;
            }
        }
    }
    if !has_output {
        output_bytes += embd_bytes;
    }
    let n_embd = get(keys::EMBEDDING_LENGTH)?;
    let ft = r.get(keys::GENERAL_FILE_TYPE).and_then(|v| v.as_u64());
    Ok(ModelSizes {
        name: path.display().to_string(),
        file_type: ft
            .and_then(|id| {
                convert::FileType::ALL
                    .into_iter()
                    .find(|f| u64::from(f.llama_ftype()) == id)
            })
            .map_or_else(|| "mixed".into(), |f| f.name().to_string()),
        n_layer,
        n_embd,
        n_head: get(keys::HEAD_COUNT)?,
        n_head_kv: get(keys::HEAD_COUNT_KV)?,
        n_ff: get(keys::FEED_FORWARD_LENGTH).unwrap_or(4 * n_embd),
        n_vocab: r
            .tensor("token_embd.weight")
            .and_then(|t| t.dims.get(1).copied())
            .unwrap_or(65024),
        layer_bytes,
        embd_bytes,
        output_bytes,
    })
}

/// The sizes for a GGUF path, checkpoint directory or named shape.
///
/// # Errors
/// Unknown names, invalid files, directories that are not checkpoints.
pub fn model_sizes(model: &str, bits: Bits) -> anyhow::Result<ModelSizes> {
    let p = Path::new(model);
    if p.is_file() {
        return gguf_sizes(p);
    }
    if p.is_dir() {
        let cfg = convert::FalconConfig::from_dir(p)
            .with_context(|| format!("{} is not a Falcon checkpoint", p.display()))?;
        return shape_sizes(model, &cfg, bits);
    }
    match convert::FalconShape::named(model) {
        Some(s) => shape_sizes(s.name, &s.config, bits),
        None => bail!(
            "model not found: {model} is not a file, a directory, or one of {}",
            convert::FalconShape::NAMES.join(", ")
        ),
    }
}

/// Bytes of KV cache per layer: K and V, f16, `n_ctx` positions of `n_head_kv` heads.
fn kv_per_layer(m: &ModelSizes, n_ctx: u64) -> u64 {
    let head_dim = m.n_embd / m.n_head.max(1);
    2 * n_ctx * m.n_head_kv * head_dim * 2
}

/// Estimated compute buffer of a device that evaluates `ubatch` tokens: the largest
/// intermediate tensors of one layer (FFN activations, attention scores, QKV) plus, on the
/// device holding the output, the logits.
fn compute_bytes(m: &ModelSizes, n_ctx: u64, ubatch: u64, with_output: bool) -> u64 {
    let per_layer = 4 * ubatch * (2 * m.n_ff + 4 * m.n_embd + m.n_head * n_ctx);
    let logits = if with_output {
        4 * ubatch * m.n_vocab
    } else {
        0
    };
    per_layer + logits
}

/// Plans the placement.
#[must_use]
pub fn plan(m: &ModelSizes, n_ctx: u32, n_batch: u32, vram: &[u64], gpu_layers: GpuLayers) -> Plan {
    let n_off = m.n_layer + 1; // the output layer counts as one
    let ubatch = u64::from(n_batch.min(512));
    let kv = kv_per_layer(m, u64::from(n_ctx));
    let assign = |n_gpu: u64| -> Vec<DevicePlan> {
        let start = n_off - n_gpu;
        let total_vram: u64 = vram.iter().sum::<u64>().max(1);
        let mut devices = Vec::new();
        let mut next = start;
        for (g, &cap) in vram.iter().enumerate() {
            // Contiguous runs in proportion to each GPU's memory (llama.cpp's default split).
            let share = if g + 1 == vram.len() {
                n_off - next
            } else {
                ((n_gpu as f64) * cap as f64 / total_vram as f64).round() as u64
            };
            let end = (next + share).min(n_off);
            let output = end == n_off && next < end;
            let blocks_end = end.min(m.n_layer);
            let weights: u64 = (next..blocks_end)
                .map(|i| m.layer_bytes[i as usize])
                .sum::<u64>()
                + if output { m.output_bytes } else { 0 };
            let kv_cache = (blocks_end.saturating_sub(next)) * kv;
            let holds = end > next;
            devices.push(DevicePlan {
                device: format!("GPU{g}"),
                capacity: Some(cap),
                layers: (blocks_end > next).then_some((next, blocks_end)),
                output,
                weights,
                kv_cache,
                compute: if holds {
                    compute_bytes(m, u64::from(n_ctx), ubatch, output)
                } else {
                    0
                },
            });
            next = end;
        }
        let cpu_end = start.min(m.n_layer);
        let cpu_output = n_gpu == 0;
        devices.insert(
            0,
            DevicePlan {
                device: "CPU".into(),
                capacity: None,
                layers: (cpu_end > 0).then_some((0, cpu_end)),
                output: cpu_output,
                weights: m.embd_bytes
                    + (0..cpu_end).map(|i| m.layer_bytes[i as usize]).sum::<u64>()
                    + if cpu_output { m.output_bytes } else { 0 },
                kv_cache: cpu_end * kv,
                // With every layer offloaded the CPU only gathers the input embeddings.
                compute: if cpu_end > 0 || cpu_output {
                    compute_bytes(m, u64::from(n_ctx), ubatch, cpu_output)
                } else {
                    4 * ubatch * m.n_embd
                },
            },
        );
        devices
    };
    let n_gpu = if vram.is_empty() {
        0
    } else {
        match gpu_layers {
            GpuLayers::All => n_off,
            GpuLayers::Count(n) => u64::from(n).min(n_off),
            GpuLayers::Auto => (0..=n_off)
                .rev()
                .find(|&n| {
                    assign(n)
                        .iter()
                        .all(|d| d.capacity.is_none_or(|c| d.total() <= c))
                })
                .unwrap_or(0),
        }
    };
    let devices = assign(n_gpu);
    let total = devices.iter().map(DevicePlan::total).sum();
    Plan {
        model: m.clone(),
        n_ctx,
        gpu_layers: n_gpu,
        devices,
        total,
    }
}

fn gb(b: u64) -> String {
    format!("{:.2} GB", b as f64 / 1e9)
}

/// The `plan` command.
///
/// # Errors
/// Model resolution failures.
pub fn run(c: &PlanConfig) -> anyhow::Result<()> {
    let sizes = model_sizes(&c.model, c.bits)?;
    let vram = match &c.vram {
        Some(v) => v.clone(),
        None => {
            let engine = Engine::init(false)?;
            engine
                .devices()
                .into_iter()
                .filter(|d| d.kind == DeviceKind::Gpu)
                .map(|d| d.free)
                .collect()
        }
    };
    let p = plan(&sizes, c.n_ctx, c.n_batch, &vram, c.gpu_layers);
    if c.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(());
    }
    let m = &p.model;
    println!(
        "{} ({}): {} layers, hidden {}, {} heads ({} KV), ffn {}, vocab {}",
        m.name, m.file_type, m.n_layer, m.n_embd, m.n_head, m.n_head_kv, m.n_ff, m.n_vocab
    );
    println!(
        "weights {} | context {} tokens | {} of {} layers on GPU",
        gb(m.total_weights()),
        p.n_ctx,
        p.gpu_layers,
        m.n_layer + 1
    );
    println!(
        "{:<6} {:>12} {:>12} {:>10} {:>10} {:>12} {:>12}",
        "device", "layers", "weights", "KV cache", "compute", "total", "capacity"
    );
    for d in &p.devices {
        let layers = match (d.layers, d.output) {
            (Some((a, b)), true) => format!("{a}-{}+out", b - 1),
            (Some((a, b)), false) => format!("{a}-{}", b - 1),
            (None, true) => "out".into(),
            (None, false) => "-".into(),
        };
        println!(
            "{:<6} {:>12} {:>12} {:>10} {:>10} {:>12} {:>12}",
            d.device,
            layers,
            gb(d.weights),
            gb(d.kv_cache),
            gb(d.compute),
            gb(d.total()),
            d.capacity.map_or_else(|| "-".into(), gb)
        );
    }
    println!("total  {}", gb(p.total));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total_gb(name: &str, bits: u32) -> f64 {
        let m = model_sizes(name, Bits::from_u32(bits).unwrap()).unwrap();
        plan(&m, 2048, 512, &[], GpuLayers::Auto).total as f64 / 1e9
    }

    #[test]
    fn falcon_40b_needs_about_27_gb_at_4_bits_and_45_at_8() {
        let four = total_gb("falcon-40b", 4);
        let eight = total_gb("falcon-40b", 8);
        assert!((25.5..28.5).contains(&four), "4 bits: {four:.2} GB");
        assert!((43.5..46.5).contains(&eight), "8 bits: {eight:.2} GB");
    }

    #[test]
    fn auto_fits_within_each_gpu() {
        let m = model_sizes("falcon-40b", Bits::Four).unwrap();
        let p = plan(
            &m,
            2048,
            512,
            &[10_000_000_000, 10_000_000_000],
            GpuLayers::Auto,
        );
        assert!(p.gpu_layers > 0 && p.gpu_layers < m.n_layer + 1);
        for d in &p.devices {
            if let Some(c) = d.capacity {
                assert!(d.total() <= c, "{d:?}");
            }
        }
        let big = plan(
            &m,
            2048,
            512,
            &[24_000_000_000, 24_000_000_000],
            GpuLayers::Auto,
        );
        assert_eq!(
            big.gpu_layers,
            m.n_layer + 1,
            "40B at 4 bits fits on two 24 GB GPUs"
        );
    }

    #[test]
    fn layers_are_covered_once() {
        let m = model_sizes("falcon-7b", Bits::Eight).unwrap();
        for n in [0, 5, 33] {
            let p = plan(
                &m,
                2048,
                512,
                &[8e9 as u64, 8e9 as u64],
                GpuLayers::Count(n),
            );
            let blocks: u64 = p
                .devices
                .iter()
                .filter_map(|d| d.layers)
                .map(|(a, b)| b - a)
                .sum();
            assert_eq!(blocks, m.n_layer);
            assert_eq!(p.devices.iter().filter(|d| d.output).count(), 1);
            let w: u64 = p.devices.iter().map(|d| d.weights).sum();
            assert_eq!(w, m.total_weights());
        }
    }
}
