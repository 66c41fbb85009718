//! `falcon-quantize`: a Hugging Face Falcon checkpoint → a quantized GGUF file, in one pass.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand};
use convert::{FalconShape, FileType, Options, Target};

/// Convert a Hugging Face Falcon checkpoint (Falcon-7B, -40B, -180B or a fine-tune) into one
/// quantized GGUF file that llama.cpp and every GGUF tool can run, in a single streaming pass.
///
/// Exit status: 0 on success, 1 on any error (nothing is left at the destination), 2 on a usage
/// error, 130 when interrupted (Ctrl-C, SIGTERM).
#[derive(Debug, Parser)]
#[command(
    name = "falcon-quantize",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub convert: ConvertArgs,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Checkpoint directory: config.json, tokenizer.json and *.safetensors (sharded or not).
    pub model_dir: Option<PathBuf>,
    /// Output GGUF file. Written to a temporary file beside it and renamed when complete.
    #[arg(short, long, value_name = "OUT.gguf")]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub common: TypeArgs,
    /// Write the tokenizer and metadata only, no tensors.
    #[arg(long, conflicts_with = "lora")]
    pub vocab_only: bool,
    /// Merge a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) into
    /// the weights as they are converted, optionally at a scale (default 1). Repeatable: several
    /// adapters add up. The file records which were merged.
    #[arg(long, value_name = "ADAPTER_DIR[:SCALE]", value_parser = convert::adapter::LoraSpec::parse)]
    pub lora: Vec<convert::adapter::LoraSpec>,
}

/// Options shared by conversion and `synth`.
#[derive(Debug, Args)]
pub struct TypeArgs {
    /// 8 writes Q8_0; 4 writes the best 4-bit mix the shapes allow: Q4_K_M when the matrices'
    /// rows are multiples of 256 (40B, 180B), Q4_0 when not (7B).
    #[arg(long, value_parser = ["4", "8"], default_value = "4", conflicts_with = "type")]
    pub bits: String,
    /// One file type explicitly: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k_m, q5_k_m, q6_k.
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_file_type)]
    pub r#type: Option<FileType>,
    /// Worker threads (default: one per core).
    #[arg(short, long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    pub threads: Option<usize>,
    /// Print nothing but errors.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a random-weight checkpoint or GGUF with the real shapes of Falcon-7B, -40B or -180B,
    /// to measure speed and memory without downloading weights.
    Synth(SynthArgs),
    /// Convert a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) into a GGUF
    /// LoRA adapter that llama.cpp applies at run time on a GGUF of its base model.
    Lora(LoraArgs),
}

#[derive(Debug, Args)]
pub struct LoraArgs {
    /// PEFT adapter directory, as peft's save_pretrained writes it: adapter_config.json and
    /// adapter_model.safetensors.
    pub adapter_dir: PathBuf,
    /// The base model the adapter was trained on: its checkpoint directory (config.json is
    /// enough unless the adapter replaces lm_head) or a GGUF file made from it. Every shape of
    /// the adapter is checked against it.
    #[arg(long, value_name = "CHECKPOINT|GGUF")]
    pub base: PathBuf,
    /// Output GGUF adapter file. Written to a temporary file beside it and renamed when complete.
    #[arg(short, long, value_name = "OUT.gguf")]
    pub output: PathBuf,
    /// Tensor type: f32, f16, bf16 or q8_0 (q8_0 writes tensors whose rows are not a multiple of
    /// 32 values, such as lora_b of a small rank, as f16).
    #[arg(long = "type", value_name = "TYPE", default_value = "f32", value_parser = parse_adapter_type)]
    pub r#type: FileType,
    /// Print nothing but errors.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// falcon-7b, falcon-40b or falcon-180b.
    #[arg(long, value_parser = FalconShape::NAMES)]
    pub shape: String,
    /// Output: a directory for a bf16 safetensors checkpoint, or a .gguf file (with --type/--bits).
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub common: TypeArgs,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep only the first N layers (smaller files with the real widths, for quick tests).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub layers: Option<u64>,
    /// Shard size of a checkpoint, in GB.
    #[arg(long, default_value_t = 5)]
    pub shard_gb: u64,
}

fn parse_adapter_type(s: &str) -> Result<FileType, String> {
    FileType::from_name(s)
        .filter(|t| convert::adapter::EXPORT_TYPES.contains(t))
        .ok_or_else(|| format!("an adapter is written as f32, f16, bf16 or q8_0, not '{s}'"))
}

fn parse_file_type(s: &str) -> Result<FileType, String> {
    FileType::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = FileType::ALL.iter().map(|t| t.name()).collect();
        format!("unknown type '{s}'; choose one of {}", names.join(", "))
    })
}

impl TypeArgs {
    fn target(&self) -> Target {
        match self.r#type {
            Some(t) => Target::Type(t),
            None => Target::Bits(self.bits.parse().expect("validated by clap")),
        }
    }
}

/// A usage error found after parsing, as clap reports its own: the binary prints it with the
/// usage line and exits with status 2.
fn usage(kind: ErrorKind, message: impl std::fmt::Display) -> anyhow::Error {
    Cli::command().error(kind, message).into()
}

/// Runs the command. Usage errors are `clap::Error`s.
pub fn run(cli: Cli, cancel: Arc<AtomicBool>) -> Result<()> {
    match cli.command {
        Some(Command::Synth(args)) => synth(args, &cancel),
        Some(Command::Lora(args)) => lora(args, cancel),
        None => convert_checkpoint(cli.convert, cancel),
    }
}

fn convert_checkpoint(args: ConvertArgs, cancel: Arc<AtomicBool>) -> Result<()> {
    let Some(dir) = args.model_dir else {
        return Err(usage(
            ErrorKind::MissingRequiredArgument,
            "no checkpoint directory given: falcon-quantize <MODEL_DIR> -o <OUT.gguf>",
        ));
    };
    let Some(out) = args.output else {
        return Err(usage(
            ErrorKind::MissingRequiredArgument,
            "no output file given: add -o <OUT.gguf>",
        ));
    };
    let show = !args.common.quiet && std::io::stderr().is_terminal();
    let bar = show.then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("valid template"),
        );
        bar
    });
    let progress = bar.clone().map(|bar| -> Arc<convert::ProgressFn> {
        Arc::new(move |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        })
    });
    let opts = Options {
        target: args.common.target(),
        threads: args.common.threads,
        vocab_only: args.vocab_only,
        progress,
        cancel: Some(cancel),
        loras: args.lora,
    };
    let summary = convert::quantize_checkpoint(&dir, &out, &opts)?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if !args.common.quiet {
        let secs = summary.elapsed.as_secs_f64();
        let types: Vec<String> = summary
            .type_counts
            .iter()
            .map(|(t, n)| format!("{n} {}", t.name()))
            .collect();
        let chose = match opts.target {
            Target::Bits(b) => format!(" (--bits {b} → {})", summary.file_type.name()),
            Target::Type(_) => String::new(),
        };
        eprintln!(
            "wrote {}: {}{chose}, {}, {:.2} bits per weight, {} tensors ({}), {:.1} s, {:.2} GB/s of input",
            summary.path.display(),
            summary.file_type.name(),
            human_bytes(summary.bytes),
            summary.bits_per_weight(),
            summary.n_tensors,
            types.join(", "),
            secs,
            summary.input_bytes as f64 / 1e9 / secs.max(1e-9),
        );
        for m in &summary.merged {
            eprintln!(
                "merged {} at scale {} (sha256 {})",
                m.name, m.scale, m.sha256
            );
        }
    }
    Ok(())
}

fn synth(args: SynthArgs, cancel: &AtomicBool) -> Result<()> {
    let mut shape = FalconShape::named(&args.shape).expect("validated by clap");
    if let Some(n) = args.layers {
        if n > shape.config.n_layer {
            return Err(usage(
                ErrorKind::ValueValidation,
                format!(
                    "--layers {n} is more than the {} layers of {}",
                    shape.config.n_layer, shape.name
                ),
            ));
        }
        shape.config.n_layer = n;
    }
    if let Some(n) = args.common.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .ok();
    }
    let start = std::time::Instant::now();
    let is_gguf = args.output.extension().is_some_and(|e| e == "gguf");
    if is_gguf {
        let ft = match args.common.target() {
            Target::Type(t) => t,
            Target::Bits(b) => FileType::for_bits(b, shape.config.hidden_size).expect("4 or 8"),
        };
        let bytes = convert::synth::write_gguf(&shape, ft, &args.output, args.seed, Some(cancel))
            .with_context(|| format!("writing {}", args.output.display()))?;
        if !args.common.quiet {
            eprintln!(
                "wrote {} ({}, {}, {:.2} GB) in {:.1} s",
                args.output.display(),
                shape.name,
                ft.name(),
                bytes as f64 / 1e9,
                start.elapsed().as_secs_f64()
            );
        }
    } else {
        convert::synth::write_checkpoint(
            &shape,
            &args.output,
            args.seed,
            args.shard_gb << 30,
            Some(cancel),
        )
        .with_context(|| format!("writing {}", args.output.display()))?;
        if !args.common.quiet {
            eprintln!(
                "wrote a bf16 {} checkpoint to {} in {:.1} s",
                shape.name,
                args.output.display(),
                start.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

fn lora(args: LoraArgs, cancel: Arc<AtomicBool>) -> Result<()> {
    let opts = convert::adapter::ExportOptions {
        file_type: args.r#type,
        cancel: Some(cancel),
    };
    let s = convert::adapter::export_lora(&args.adapter_dir, &args.base, &args.output, &opts)?;
    if !args.quiet {
        let mut notes = Vec::new();
        if s.n_rescaled > 0 {
            notes.push(format!(
                "{} with their rsLoRA/rank_pattern/alpha_pattern scale folded into lora_b",
                s.n_rescaled
            ));
        }
        if !s.replaced.is_empty() {
            notes.push(format!("replacing {}", s.replaced.join(", ")));
        }
        let notes = if notes.is_empty() {
            String::new()
        } else {
            format!(" ({})", notes.join("; "))
        };
        eprintln!(
            "wrote {}: LoRA adapter, {}, {} modules{notes}, alpha {}, {} tensors, {}",
            s.path.display(),
            args.r#type.name(),
            s.n_modules,
            s.alpha,
            s.n_tensors,
            human_bytes(s.bytes),
        );
    }
    Ok(())
}

/// Sizes as people read them: 512 B, 3.2 MB, 27.1 GB (powers of 1000).
pub fn human_bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bits_and_type_conflict() {
        let parse = |argv: &[&str]| Cli::try_parse_from(argv);
        let e = parse(&[
            "falcon-quantize",
            "m",
            "-o",
            "o.gguf",
            "--bits",
            "8",
            "--type",
            "q4_0",
        ])
        .unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict, "{e}");
        let e = parse(&[
            "falcon-quantize",
            "synth",
            "--shape",
            "falcon-7b",
            "-o",
            "x.gguf",
            "--type",
            "q8_0",
            "--bits",
            "4",
        ])
        .unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict, "{e}");
        // Each alone is accepted.
        assert!(parse(&["falcon-quantize", "m", "-o", "o", "--type", "q4_0"]).is_ok());
        assert!(parse(&["falcon-quantize", "m", "-o", "o", "--bits", "8"]).is_ok());
    }
}
