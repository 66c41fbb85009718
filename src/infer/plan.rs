//! Memory plans: what goes where and how much memory each device needs, computed from tensor
//! shapes and types alone (nothing is loaded).
//!
//! The layout follows llama.cpp's: the token embedding stays on the CPU; the last `gpu_layers`
//! of the `n_layer + 1` offloadable layers (the output norm and matrix count as the last one)
//! leave the CPU and are split over the offload devices (local GPUs, then RPC workers) in
//! contiguous runs in proportion to their memory; each layer's KV cache lives with it (one
//! `n_ctx` per sequence); every device that holds layers needs a compute buffer.
//!
//! With RPC workers, the plan also counts the bytes that cross the network: at every boundary
//! between two devices of which one is remote the hidden state of each token (f32, `n_embd`
//! values) crosses once (twice between two workers: ggml copies through the client), and the
//! logits (f32, `n_vocab` values) of each token that needs them come back from a remote output
//! layer.

use std::path::Path;

use serde::Serialize;

use super::{source, Bits};
use crate::engine::GpuLayers;

/// Why no plan could be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Not a file, directory or known shape.
    #[error("model not found: {0} is not a file, a directory, or one of falcon-7b, falcon-40b, falcon-180b")]
    NotFound(String),
    /// The GGUF is invalid.
    #[error(transparent)]
    Source(#[from] source::SourceError),
    /// The GGUF lacks a key or has a tensor outside its blocks.
    #[error("{}: {why}", path.display())]
    Gguf {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The checkpoint's config is invalid.
    #[error(transparent)]
    Convert(#[from] convert::ConvertError),
    /// A row length that the chosen type cannot hold.
    #[error(transparent)]
    Quant(#[from] quant::QuantError),
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

/// A device to plan for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceSpec {
    /// `GPU0`, `RPC0[host:port]`, ...
    pub name: String,
    /// Memory it offers, in bytes.
    pub capacity: u64,
    /// Whether it is an RPC worker.
    pub remote: bool,
}

/// What one device holds.
#[derive(Debug, Clone, Serialize)]
pub struct DevicePlan {
    /// `CPU`, `GPU0`, `RPC0[host:port]`, ...
    pub device: String,
    /// Whether it is an RPC worker.
    pub remote: bool,
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

    /// Whether it fits its capacity.
    #[must_use]
    pub fn fits(&self) -> bool {
        self.capacity.is_none_or(|c| self.total() <= c)
    }
}

/// Bytes that cross the network.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct NetworkBytes {
    /// Per generated token.
    pub per_generated_token: u64,
    /// Per prompt token (a long prompt: the logits of its last token are negligible).
    pub per_prompt_token: u64,
}

/// A full plan.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The model.
    pub model: ModelSizes,
    /// Context size per sequence.
    pub n_ctx: u32,
    /// Sequences (each with `n_ctx`).
    pub n_seq: u32,
    /// Layers off the CPU (of `n_layer + 1`).
    pub gpu_layers: u64,
    /// Per device: the CPU first, then the offload devices in order.
    pub devices: Vec<DevicePlan>,
    /// Sum over devices.
    pub total: u64,
    /// Network traffic, when RPC workers hold layers.
    pub network: Option<NetworkBytes>,
}

impl Plan {
    /// Whether every device's share fits its capacity.
    #[must_use]
    pub fn fits(&self) -> bool {
        self.devices.iter().all(DevicePlan::fits)
    }
}

/// The sizes of a checkpoint's config or a named shape at `bits`.
///
/// # Errors
/// A row length that the chosen type cannot hold.
pub fn shape_sizes(
    name: &str,
    cfg: &convert::FalconConfig,
    bits: Bits,
) -> Result<ModelSizes, PlanError> {
    let file_type = convert::rules::FileType::for_bits(bits.get(), cfg.hidden_size)
        .expect("4 and 8 bits have a file type");
    let w = convert::layout::weight_sizes(cfg, file_type);
    let (layer_bytes, embd_bytes, output_bytes) = (w.layer_bytes, w.embd_bytes, w.output_bytes);
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

fn gguf_sizes(path: &Path) -> Result<ModelSizes, PlanError> {
    source::validate_gguf(path)?;
    let r = convert::gguf::GgufReader::open(path).map_err(|source| {
        source::SourceError::InvalidGguf {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let bad = |why: String| PlanError::Gguf {
        path: path.to_path_buf(),
        why,
    };
    let get = |k: &str| -> Result<u64, PlanError> {
        r.get(k)
            .and_then(convert::gguf::Value::as_u64)
            .ok_or_else(|| bad(format!("lacks {k}")))
    };
    use convert::gguf::keys;
    let n_layer = get(keys::BLOCK_COUNT)?;
    let mut layer_bytes = vec![0u64; usize::try_from(n_layer).unwrap_or(usize::MAX).min(1 << 16)];
    let (mut embd_bytes, mut output_bytes, mut has_output) = (0, 0, false);
    for t in r.tensors() {
        let layer = t
            .name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|n| n.parse::<usize>().ok());
        match layer {
            Some(l) if l < layer_bytes.len() => layer_bytes[l] += t.n_bytes,
            Some(_) => return Err(bad(format!("tensor {} is past block_count", t.name))),
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
    let ft = r
        .get(keys::GENERAL_FILE_TYPE)
        .and_then(convert::gguf::Value::as_u64);
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
pub fn model_sizes(model: &str, bits: Bits) -> Result<ModelSizes, PlanError> {
    let p = Path::new(model);
    if p.is_file() {
        return gguf_sizes(p);
    }
    if p.is_dir() {
        let cfg = convert::FalconConfig::from_dir(p)?;
        return shape_sizes(model, &cfg, bits);
    }
    match convert::FalconShape::named(model) {
        Some(s) => shape_sizes(s.name, &s.config, bits),
        None => Err(PlanError::NotFound(model.to_string())),
    }
}

/// Bytes of KV cache per layer and sequence: K and V, f16, `n_ctx` positions of `n_head_kv`
/// heads.
#[must_use]
pub fn kv_per_layer(m: &ModelSizes, n_ctx: u64) -> u64 {
    let head_dim = m.n_embd / m.n_head.max(1);
    2 * n_ctx * m.n_head_kv * head_dim * 2
}

/// Estimated compute buffer of a device that evaluates `ubatch` tokens: the largest
/// intermediate tensors of one layer (FFN activations, attention scores, QKV) plus, on the
/// device holding the output, the logits.
fn compute_bytes(m: &ModelSizes, n_kv: u64, ubatch: u64, with_output: bool) -> u64 {
    let per_layer = 4 * ubatch * (2 * m.n_ff + 4 * m.n_embd + m.n_head * n_kv);
    let logits = if with_output {
        4 * ubatch * m.n_vocab
    } else {
        0
    };
    per_layer + logits
}

/// What to plan for.
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    /// Context size per sequence.
    pub n_ctx: u32,
    /// Sequences (a server's `--parallel`).
    pub n_seq: u32,
    /// Batch size (compute buffers are sized for `min(batch, 512)` tokens, llama.cpp's ubatch).
    pub n_batch: u32,
    /// The offload devices in order: local GPUs, then RPC workers.
    pub devices: &'a [DeviceSpec],
    /// The CPU's memory, when it should be checked.
    pub cpu_capacity: Option<u64>,
    /// Layers off the CPU.
    pub gpu_layers: GpuLayers,
}

/// Plans the placement.
#[must_use]
pub fn plan(m: &ModelSizes, input: &PlanInput<'_>) -> Plan {
    let n_off = m.n_layer + 1; // the output layer counts as one
    let ubatch = u64::from(input.n_batch.min(512));
    let n_seq = u64::from(input.n_seq.max(1));
    let kv = kv_per_layer(m, u64::from(input.n_ctx)) * n_seq;
    // Attention over the whole cache of one sequence (a unified cache holds them all).
    let n_kv = u64::from(input.n_ctx) * n_seq;
    let devs = input.devices;
    let assign = |n_gpu: u64| -> Vec<DevicePlan> {
        let start = n_off - n_gpu;
        let total_mem: u64 = devs.iter().map(|d| d.capacity).sum::<u64>().max(1);
        let mut out = Vec::new();
        let mut next = start;
        for (g, d) in devs.iter().enumerate() {
            // Contiguous runs in proportion to each device's memory (llama.cpp's default split).
            let share = if g + 1 == devs.len() {
                n_off - next
            } else {
                ((n_gpu as f64) * d.capacity as f64 / total_mem as f64).round() as u64
            };
            let end = (next + share).min(n_off);
            let output = end == n_off && next < end;
            let blocks_end = end.min(m.n_layer);
            let weights: u64 = (next..blocks_end)
                .map(|i| m.layer_bytes[i as usize])
                .sum::<u64>()
                + if output { m.output_bytes } else { 0 };
            out.push(DevicePlan {
                device: d.name.clone(),
                remote: d.remote,
                capacity: Some(d.capacity),
                layers: (blocks_end > next).then_some((next, blocks_end)),
                output,
                weights,
                kv_cache: blocks_end.saturating_sub(next) * kv,
                compute: if end > next {
                    compute_bytes(m, n_kv, ubatch, output)
                } else {
                    0
                },
            });
            next = end;
        }
        let cpu_end = start.min(m.n_layer);
        let cpu_output = n_gpu == 0;
        out.insert(
            0,
            DevicePlan {
                device: "CPU".into(),
                remote: false,
                capacity: input.cpu_capacity,
                layers: (cpu_end > 0).then_some((0, cpu_end)),
                output: cpu_output,
                weights: m.embd_bytes
                    + (0..cpu_end).map(|i| m.layer_bytes[i as usize]).sum::<u64>()
                    + if cpu_output { m.output_bytes } else { 0 },
                kv_cache: cpu_end * kv,
                // With every layer offloaded the CPU only gathers the input embeddings.
                compute: if cpu_end > 0 || cpu_output {
                    compute_bytes(m, n_kv, ubatch, cpu_output)
                } else {
                    4 * ubatch * m.n_embd
                },
            },
        );
        out
    };
    let n_gpu = if devs.is_empty() {
        0
    } else {
        match input.gpu_layers {
            GpuLayers::All => n_off,
            GpuLayers::Count(n) => u64::from(n).min(n_off),
            GpuLayers::Auto => {
                let most = (0..=n_off)
                    .rev()
                    .find(|&n| assign(n).iter().skip(1).all(DevicePlan::fits))
                    .unwrap_or(0);
                // With workers and no local GPU, the CPU takes its share by memory, as at run
                // time (see engine::placement), when that share fits.
                match (
                    input.cpu_capacity,
                    devs.iter().any(|d| d.remote),
                    devs.iter().any(|d| !d.remote),
                ) {
                    (Some(cpu), true, false) => {
                        let all = cpu + devs.iter().map(|d| d.capacity).sum::<u64>();
                        let cpu_layers =
                            ((n_off as f64) * cpu as f64 / all.max(1) as f64).round() as u64;
                        let n = n_off - cpu_layers.min(n_off);
                        if assign(n).iter().all(DevicePlan::fits) {
                            n
                        } else {
                            most
                        }
                    }
                    _ => most,
                }
            }
        }
    };
    let devices = assign(n_gpu);
    let total = devices.iter().map(DevicePlan::total).sum();
    let network = devices
        .iter()
        .any(|d| d.remote && (d.layers.is_some() || d.output))
        .then(|| network_bytes(m, &devices));
    Plan {
        model: m.clone(),
        n_ctx: input.n_ctx,
        n_seq: input.n_seq.max(1),
        gpu_layers: n_gpu,
        devices,
        total,
        network,
    }
}

/// Bytes crossing the network for one token, from the chain of devices that hold layers.
fn network_bytes(m: &ModelSizes, devices: &[DevicePlan]) -> NetworkBytes {
    // The CPU always computes the input embedding; then the devices holding layers, in order.
    let mut chain: Vec<bool> = vec![false];
    chain.extend(
        devices
            .iter()
            .skip(1)
            .filter(|d| d.layers.is_some() || d.output)
            .map(|d| d.remote),
    );
    let hidden = 4 * m.n_embd;
    let mut per_token = 0;
    for w in chain.windows(2) {
        per_token += match (w[0], w[1]) {
            (false, false) => 0,
            (true, true) => 2 * hidden,
            _ => hidden,
        };
    }
    let out_remote = devices.iter().any(|d| d.output && d.remote);
    let logits = if out_remote { 4 * m.n_vocab } else { 0 };
    NetworkBytes {
        per_generated_token: per_token + logits,
        per_prompt_token: per_token,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(devices: &[DeviceSpec]) -> PlanInput<'_> {
        PlanInput {
            n_ctx: 2048,
            n_seq: 1,
            n_batch: 512,
            devices,
            cpu_capacity: None,
            gpu_layers: GpuLayers::Auto,
        }
    }

    fn gpus(gb: &[u64]) -> Vec<DeviceSpec> {
        gb.iter()
            .enumerate()
            .map(|(i, &g)| DeviceSpec {
                name: format!("GPU{i}"),
                capacity: g * 1_000_000_000,
                remote: false,
            })
            .collect()
    }

    fn total_gb(name: &str, bits: u32) -> f64 {
        let m = model_sizes(name, Bits::from_u32(bits).unwrap()).unwrap();
        plan(&m, &input(&[])).total as f64 / 1e9
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
        let devs = gpus(&[10, 10]);
        let p = plan(&m, &input(&devs));
        assert!(p.gpu_layers > 0 && p.gpu_layers < m.n_layer + 1);
        assert!(p.fits());
        let devs = gpus(&[24, 24]);
        let big = plan(&m, &input(&devs));
        assert_eq!(
            big.gpu_layers,
            m.n_layer + 1,
            "40B at 4 bits fits on two 24 GB GPUs"
        );
        assert!(big.network.is_none());
    }

    #[test]
    fn layers_are_covered_once() {
        let m = model_sizes("falcon-7b", Bits::Eight).unwrap();
        let devs = gpus(&[8, 8]);
        for n in [0, 5, 33] {
            let mut i = input(&devs);
            i.gpu_layers = GpuLayers::Count(n);
            let p = plan(&m, &i);
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

    #[test]
    fn parallel_sequences_multiply_the_kv_cache() {
        let m = model_sizes("falcon-7b", Bits::Four).unwrap();
        let one = plan(&m, &input(&[]));
        let mut i = input(&[]);
        i.n_seq = 4;
        let four = plan(&m, &i);
        assert_eq!(four.devices[0].kv_cache, 4 * one.devices[0].kv_cache);
        // 7B: 32 layers × 2048 positions × 1 KV head × 64 × K and V × f16 = 16 MiB per sequence.
        assert_eq!(one.devices[0].kv_cache, 32 * 2048 * 64 * 2 * 2);
    }

    #[test]
    fn falcon_180b_at_4_bits_fits_three_machines_of_48_gb() {
        let m = model_sizes("falcon-180b", Bits::Four).unwrap();
        let devs = vec![
            DeviceSpec {
                name: "GPU0".into(),
                capacity: 48 << 30,
                remote: false,
            },
            DeviceSpec {
                name: "RPC0[a:50052]".into(),
                capacity: 48 << 30,
                remote: true,
            },
            DeviceSpec {
                name: "RPC1[b:50052]".into(),
                capacity: 48 << 30,
                remote: true,
            },
        ];
        let p = plan(&m, &input(&devs));
        assert_eq!(p.gpu_layers, m.n_layer + 1, "all 81 layers leave the CPU");
        assert!(p.fits(), "{:?}", p.devices);
        for d in &p.devices[1..] {
            assert!(d.layers.is_some(), "{} holds layers", d.device);
        }
        let net = p.network.expect("workers hold layers");
        // GPU0 → RPC0 (once), RPC0 → RPC1 (twice), logits back from RPC1.
        assert_eq!(net.per_prompt_token, 3 * 4 * 14848);
        assert_eq!(net.per_generated_token, 3 * 4 * 14848 + 4 * 65024);
        // Two machines of 48 GB cannot hold it.
        let p2 = plan(&m, &input(&devs[..2]));
        assert!(p2.gpu_layers < m.n_layer + 1);
    }
}
