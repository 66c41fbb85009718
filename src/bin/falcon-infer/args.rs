//! Option groups shared by the commands, and their checked conversion into library settings.

use std::path::PathBuf;

use clap::Args;

use falcon::engine::{ContextOptions, GpuLayers, LoadOptions, SamplingParams, SplitMode};
use falcon::infer::{Bits, LoraArg, ModelSpec};

use crate::Usage;

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// GGUF file or Hugging Face Falcon checkpoint directory.
    #[arg(short, long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Bits per weight when MODEL is a checkpoint directory: 4 or 8.
    #[arg(long, default_value = "4", value_parser = ["4", "8"])]
    pub bits: String,
    /// A LoRA adapter, with its scale (default 1); repeatable. A GGUF LoRA adapter
    /// (falcon-quantize lora) is applied at run time. A PEFT adapter directory is converted
    /// once for a GGUF model and cached beside the adapter; on a checkpoint directory it is
    /// merged into the one-time quantization instead.
    #[arg(long = "lora", value_name = "PATH[:SCALE]", value_parser = LoraArg::parse)]
    pub lora: Vec<LoraArg>,
    /// Print llama.cpp's own log on stderr.
    #[arg(short, long)]
    pub verbose: bool,
}

impl ModelArgs {
    pub fn bits(&self) -> Bits {
        Bits::from_u32(self.bits.parse().unwrap_or(4)).unwrap_or(Bits::Four)
    }

    pub fn spec(&self) -> Result<ModelSpec, Usage> {
        let Some(path) = self.model.clone() else {
            return Err(Usage(
                "no model given; pass --model PATH (a GGUF file or a checkpoint directory)".into(),
            ));
        };
        Ok(ModelSpec {
            path,
            bits: self.bits(),
            loras: self.lora.clone(),
        })
    }
}

#[derive(Debug, Args)]
pub struct DeviceArgs {
    /// Layers on GPUs and RPC workers: a number, `auto` (as many as free memory allows) or `all`.
    #[arg(long, value_name = "N|auto|all", default_value = "auto")]
    pub gpu_layers: String,
    /// Shares of the layers for each device, e.g. `3,1`: local devices first (the GPUs, or the
    /// CPU on a machine without one), then the RPC workers in --rpc order. A device with share 0
    /// is not used. Default: llama.cpp's fitting on GPUs; with --rpc, in proportion to each
    /// device's free memory.
    #[arg(long, value_name = "A,B,...", value_delimiter = ',')]
    pub tensor_split: Option<Vec<f32>>,
    /// GPU for small tensors and intermediate results.
    #[arg(long, value_name = "INDEX")]
    pub main_gpu: Option<u32>,
    /// How to split across GPUs: whole layers or rows of each matrix.
    #[arg(long, value_name = "layer|row", default_value = "layer", value_parser = ["layer", "row"])]
    pub split_mode: String,
    /// RPC workers (`falcon-infer rpc-server`) whose devices join this machine's, e.g.
    /// `10.0.0.2:50052,10.0.0.3:50052`.
    #[arg(long, value_name = "HOST:PORT,...", value_delimiter = ',')]
    pub rpc: Vec<String>,
    /// CPU threads (default: all cores).
    #[arg(short, long)]
    pub threads: Option<u32>,
    /// Context window in tokens (default: the model's training context).
    #[arg(short, long)]
    pub ctx_size: Option<u32>,
    /// Tokens per batch when processing a prompt.
    #[arg(short, long)]
    pub batch_size: Option<u32>,
    /// Read the model into memory instead of mapping the file.
    #[arg(long)]
    pub no_mmap: bool,
    /// Lock the model in RAM (no swapping).
    #[arg(long)]
    pub mlock: bool,
}

pub fn gpu_layers(s: &str) -> Result<GpuLayers, Usage> {
    match s {
        "auto" => Ok(GpuLayers::Auto),
        "all" => Ok(GpuLayers::All),
        n => n.parse().map(GpuLayers::Count).map_err(|_| {
            Usage(format!(
                "--gpu-layers {n}: expected a number, `auto` or `all`"
            ))
        }),
    }
}

impl DeviceArgs {
    pub fn load_options(&self) -> Result<LoadOptions, Usage> {
        if let Some(split) = &self.tensor_split {
            if split.iter().any(|x| !x.is_finite() || *x < 0.0) || split.iter().sum::<f32>() <= 0.0
            {
                return Err(Usage(
                    "--tensor-split needs non-negative shares with a positive sum, e.g. 3,1".into(),
                ));
            }
        }
        if self.ctx_size == Some(0) || self.batch_size == Some(0) || self.threads == Some(0) {
            return Err(Usage(
                "--ctx-size, --batch-size and --threads must be positive".into(),
            ));
        }
        for r in &self.rpc {
            falcon::engine::parse_endpoint(r).map_err(|e| Usage(format!("--rpc: {e}")))?;
        }
        Ok(LoadOptions {
            gpu_layers: gpu_layers(&self.gpu_layers)?,
            main_gpu: self.main_gpu,
            split_mode: if self.split_mode == "row" {
                SplitMode::Row
            } else {
                SplitMode::Layer
            },
            tensor_split: self.tensor_split.clone(),
            mmap: !self.no_mmap,
            mlock: self.mlock,
            context: ContextOptions {
                n_ctx: self.ctx_size,
                n_batch: self.batch_size,
                threads: self.threads,
                ..ContextOptions::default()
            },
            adapters: Vec::new(),
        })
    }
}

#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// Most tokens to generate per completion.
    #[arg(short = 'n', long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temp: f32,
    /// Keep the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    pub top_k: i32,
    /// Keep the most likely tokens up to this probability mass (1 = all).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one (0 = off).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalty for repeating recent tokens (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Seed of the sampler (default: random; printed with --json).
    #[arg(long)]
    pub seed: Option<u32>,
    /// Stop a completion where this string appears (repeatable).
    #[arg(long, value_name = "STRING")]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    pub fn params(&self) -> Result<SamplingParams, Usage> {
        if self.temp.is_nan()
            || self.temp < 0.0
            || !(0.0..=1.0).contains(&self.top_p)
            || !(0.0..=1.0).contains(&self.min_p)
        {
            return Err(Usage(
                "--temp must be >= 0, --top-p and --min-p within 0..=1".into(),
            ));
        }
        if self.repeat_penalty.is_nan() || self.repeat_penalty <= 0.0 {
            return Err(Usage("--repeat-penalty must be positive (1 = off)".into()));
        }
        Ok(SamplingParams {
            temperature: self.temp,
            top_k: self.top_k.max(0),
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            seed: self.seed.unwrap_or_else(random_seed),
            ..SamplingParams::greedy()
        })
    }
}

fn random_seed() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    nanos ^ std::process::id().rotate_left(16)
}

/// `24GiB`, `48GB`, `512MiB`, `1e9` → bytes.
pub fn parse_size(flag: &str, s: &str) -> Result<u64, Usage> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| Usage(format!("{flag} {s}: not a size like 24GiB")))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(Usage(format!(
                "{flag} {s}: unknown unit {unit:?} (use GB or GiB)"
            )))
        }
    };
    if !(n.is_finite() && n >= 0.0) {
        return Err(Usage(format!("{flag} {s}: not a size like 24GiB")));
    }
    Ok((n * mult) as u64)
}
