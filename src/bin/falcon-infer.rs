//! `falcon-infer`: run Falcon in 4 or 8 bits on GPUs and CPU, through llama.cpp.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};

use falcon::engine::{ContextOptions, GpuLayers, LoadOptions, SamplingParams, SplitMode};
use falcon::infer::{self, plan, Bits, Command, ModelSpec};

/// Run Falcon models in 4 or 8 bits on GPUs and CPU, through llama.cpp.
///
/// MODEL is a GGUF file, or a Hugging Face Falcon checkpoint directory, which is quantized once
/// (--bits) into a cache file that is reused while the checkpoint is unchanged.
/// Every GGUF is validated before llama.cpp reads it.
///
/// Without a subcommand, generates text from a prompt (--prompt, --prompt-file or stdin) and
/// streams it to stdout; a timing line goes to stderr.
///
/// Exit status: 0 on success, 1 on any error (printed once on stderr with its causes),
/// 2 for invalid command-line usage.
#[derive(Debug, Parser)]
#[command(name = "falcon-infer", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    generate: GenerateArgs,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Chat in Falcon-instruct's format (User: / Falcon: turns), reading lines from stdin.
    Chat(ChatArgs),
    /// Print what goes where and how much memory each device needs, before loading anything.
    Plan(PlanArgs),
    /// Perplexity of a text file (and, with --reference, KL divergence and top-1 agreement).
    Perplexity(PerplexityArgs),
    /// Prompt-processing and generation speed, and the memory-bandwidth ceiling.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
struct ModelArgs {
    /// GGUF file or Hugging Face Falcon checkpoint directory.
    #[arg(short, long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Bits per weight when MODEL is a checkpoint directory: 4 or 8.
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Print llama.cpp's own log on stderr.
    #[arg(short, long)]
    verbose: bool,
}

#[derive(Debug, Args)]
struct DeviceArgs {
    /// Layers on GPUs: a number, `auto` (as many as free GPU memory allows) or `all`.
    #[arg(long, value_name = "N|auto|all", default_value = "auto")]
    gpu_layers: String,
    /// Share of the model for each GPU, e.g. `3,1` (GPUs with share 0 are not used).
    #[arg(long, value_name = "A,B,...", value_delimiter = ',')]
    tensor_split: Option<Vec<f32>>,
    /// GPU for small tensors and intermediate results.
    #[arg(long, value_name = "INDEX")]
    main_gpu: Option<u32>,
    /// How to split across GPUs: whole layers or rows of each matrix.
    #[arg(long, value_name = "layer|row", default_value = "layer")]
    split_mode: String,
    /// CPU threads (default: all cores).
    #[arg(short, long)]
    threads: Option<u32>,
    /// Context window in tokens (default: the model's training context).
    #[arg(short, long)]
    ctx_size: Option<u32>,
    /// Tokens per batch when processing a prompt.
    #[arg(short, long)]
    batch_size: Option<u32>,
    /// Read the model into memory instead of mapping the file.
    #[arg(long)]
    no_mmap: bool,
    /// Lock the model in RAM (no swapping).
    #[arg(long)]
    mlock: bool,
}

#[derive(Debug, Args)]
struct SamplingArgs {
    /// Most tokens to generate per completion.
    #[arg(short = 'n', long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temp: f32,
    /// Keep the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    top_k: i32,
    /// Keep the most likely tokens up to this probability mass (1 = all).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one (0 = off).
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Penalty for repeating recent tokens (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Seed of the sampler (default: random; printed with --json).
    #[arg(long)]
    seed: Option<u32>,
    /// Stop a completion where this string appears (repeatable).
    #[arg(long, value_name = "STRING")]
    stop: Vec<String>,
}

#[derive(Debug, Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The prompt (default: read stdin).
    #[arg(short, long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from this file.
    #[arg(short = 'f', long, value_name = "FILE")]
    prompt_file: Option<PathBuf>,
    /// Completions to generate, with seeds SEED, SEED+1, ...
    #[arg(long, default_value_t = 1)]
    num_return_sequences: usize,
    /// Print one JSON document (prompt, completions with text, token ids and finish reason,
    /// timings) instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// A system line put before the conversation.
    #[arg(long)]
    system: Option<String>,
}

#[derive(Debug, Args)]
struct PlanArgs {
    /// GGUF file, checkpoint directory, or a named shape: falcon-7b, falcon-40b, falcon-180b.
    #[arg(short, long, value_name = "PATH|NAME")]
    model: String,
    /// Bits per weight for a checkpoint or a named shape: 4 or 8.
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Context window in tokens.
    #[arg(short, long, default_value_t = 2048)]
    ctx_size: u32,
    /// Tokens per batch (sizes the compute buffers).
    #[arg(short, long, default_value_t = 512)]
    batch_size: u32,
    /// Free memory of each GPU, e.g. `24GiB,24GiB`, or `none` to plan for the CPU alone
    /// (default: the GPUs found, if any).
    #[arg(long, value_name = "SIZE,...", value_delimiter = ',')]
    vram: Option<Vec<String>>,
    /// Layers on GPUs: a number, `auto` or `all`.
    #[arg(long, value_name = "N|auto|all", default_value = "auto")]
    gpu_layers: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// The text to score.
    #[arg(short, long, value_name = "TEXT")]
    file: PathBuf,
    /// A reference model (e.g. the f16 or f32 GGUF): adds mean KL divergence and top-1 agreement.
    #[arg(long, value_name = "PATH")]
    reference: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Prompt tokens for the prompt-processing test.
    #[arg(short = 'p', long, default_value_t = 512)]
    n_prompt: usize,
    /// Tokens for the generation test.
    #[arg(short = 'n', long, default_value_t = 128)]
    n_gen: usize,
    /// Repetitions of each test.
    #[arg(short, long, default_value_t = 5)]
    repetitions: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn model_spec(m: &ModelArgs) -> anyhow::Result<ModelSpec> {
    let Some(path) = m.model.clone() else {
        bail!("no model given; pass --model PATH (a GGUF file or a checkpoint directory)");
    };
    Ok(ModelSpec {
        path,
        bits: Bits::from_u32(m.bits)?,
    })
}

fn gpu_layers(s: &str) -> anyhow::Result<GpuLayers> {
    match s {
        "auto" => Ok(GpuLayers::Auto),
        "all" => Ok(GpuLayers::All),
        n => n
            .parse()
            .map(GpuLayers::Count)
            .with_context(|| format!("--gpu-layers {n}: expected a number, `auto` or `all`")),
    }
}

fn load_options(d: &DeviceArgs) -> anyhow::Result<LoadOptions> {
    if let Some(split) = &d.tensor_split {
        if split.iter().any(|x| !x.is_finite() || *x < 0.0) || split.iter().sum::<f32>() <= 0.0 {
            bail!("--tensor-split needs non-negative shares with a positive sum, e.g. 3,1");
        }
    }
    if d.ctx_size == Some(0) || d.batch_size == Some(0) || d.threads == Some(0) {
        bail!("--ctx-size, --batch-size and --threads must be positive");
    }
    Ok(LoadOptions {
        gpu_layers: gpu_layers(&d.gpu_layers)?,
        main_gpu: d.main_gpu,
        split_mode: match d.split_mode.as_str() {
            "layer" => SplitMode::Layer,
            "row" => SplitMode::Row,
            other => bail!("--split-mode {other}: expected `layer` or `row`"),
        },
        tensor_split: d.tensor_split.clone(),
        mmap: !d.no_mmap,
        mlock: d.mlock,
        context: ContextOptions {
            n_ctx: d.ctx_size,
            n_batch: d.batch_size,
            threads: d.threads,
            all_logits: false,
        },
    })
}

fn sampling(s: &SamplingArgs) -> anyhow::Result<SamplingParams> {
    if s.temp.is_nan()
        || s.temp < 0.0
        || !(0.0..=1.0).contains(&s.top_p)
        || !(0.0..=1.0).contains(&s.min_p)
    {
        bail!("--temp must be >= 0, --top-p and --min-p within 0..=1");
    }
    if s.repeat_penalty.is_nan() || s.repeat_penalty <= 0.0 {
        bail!("--repeat-penalty must be positive (1 = off)");
    }
    Ok(SamplingParams {
        temperature: s.temp,
        top_k: s.top_k.max(0),
        top_p: s.top_p,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        repeat_last_n: 64,
        seed: s.seed.unwrap_or_else(random_seed),
    })
}

fn random_seed() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    nanos ^ std::process::id().rotate_left(16)
}

fn generate_config(
    model: &ModelArgs,
    device: &DeviceArgs,
    s: &SamplingArgs,
    prompt: String,
    num_return_sequences: usize,
    json: bool,
) -> anyhow::Result<infer::GenerateConfig> {
    if num_return_sequences == 0 {
        bail!("--num-return-sequences must be at least 1");
    }
    Ok(infer::GenerateConfig {
        model: model_spec(model)?,
        load: load_options(device)?,
        prompt,
        max_new_tokens: s.max_new_tokens,
        sampling: sampling(s)?,
        num_return_sequences,
        stop: s.stop.clone(),
        json,
        verbose: model.verbose,
    })
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("--vram {s}: not a size like 24GiB"))?;
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
        _ => bail!("--vram {s}: unknown unit {unit:?} (use GB or GiB)"),
    };
    Ok((n * mult) as u64)
}

fn command(cli: Cli) -> anyhow::Result<Command> {
    Ok(match cli.command {
        None => {
            let g = cli.generate;
            let prompt = match (&g.prompt, &g.prompt_file) {
                (Some(p), _) => p.clone(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .with_context(|| format!("reading the prompt file {}", f.display()))?,
                (None, None) => {
                    let mut s = String::new();
                    std::io::stdin()
                        .read_to_string(&mut s)
                        .context("reading the prompt from stdin")?;
                    s
                }
            };
            Command::Generate(generate_config(
                &g.model,
                &g.device,
                &g.sampling,
                prompt,
                g.num_return_sequences,
                g.json,
            )?)
        }
        Some(Sub::Chat(c)) => Command::Chat(infer::ChatConfig {
            gen: generate_config(&c.model, &c.device, &c.sampling, String::new(), 1, false)?,
            system: c.system,
        }),
        Some(Sub::Plan(p)) => Command::Plan(plan::PlanConfig {
            model: p.model,
            bits: Bits::from_u32(p.bits)?,
            n_ctx: p.ctx_size,
            n_batch: p.batch_size,
            vram: match p.vram {
                Some(v) if v.len() == 1 && v[0] == "none" => Some(Vec::new()),
                Some(v) => Some(
                    v.iter()
                        .map(|s| parse_size(s))
                        .collect::<anyhow::Result<_>>()?,
                ),
                None => None,
            },
            gpu_layers: gpu_layers(&p.gpu_layers)?,
            json: p.json,
        }),
        Some(Sub::Perplexity(p)) => {
            let text = std::fs::read_to_string(&p.file)
                .with_context(|| format!("reading {}", p.file.display()))?;
            Command::Perplexity(infer::PerplexityConfig {
                model: model_spec(&p.model)?,
                reference: p
                    .reference
                    .map(|path| {
                        Ok::<_, anyhow::Error>(ModelSpec {
                            path,
                            bits: Bits::from_u32(p.model.bits)?,
                        })
                    })
                    .transpose()?,
                load: load_options(&p.device)?,
                text,
                json: p.json,
                verbose: p.model.verbose,
            })
        }
        Some(Sub::Bench(b)) => {
            if b.repetitions == 0 || b.n_prompt == 0 || b.n_gen == 0 {
                bail!("--repetitions, --n-prompt and --n-gen must be positive");
            }
            Command::Bench(infer::BenchConfig {
                model: model_spec(&b.model)?,
                load: load_options(&b.device)?,
                n_prompt: b.n_prompt,
                n_gen: b.n_gen,
                repetitions: b.repetitions,
                json: b.json,
                verbose: b.model.verbose,
            })
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match command(cli).and_then(|c| infer::run(&c)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("falcon-infer: error: {}", falcon::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
