//! The command line of `falcon-quantize`: clap's definitions, and the checks clap cannot make,
//! which turn the flags into a [`Job`].

use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};
use convert::{FalconShape, FileType, Target};

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

fn parse_adapter_type(s: &str) -> Result<FileType, String> {
    FileType::from_name(s)
        .filter(|t| convert::adapter::EXPORT_TYPES.contains(t))
        .ok_or_else(|| format!("an adapter is written as f32, f16, bf16 or q8_0, not '{s}'"))
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
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub shard_gb: u64,
}

fn parse_file_type(s: &str) -> Result<FileType, String> {
    FileType::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = FileType::ALL.iter().map(|t| t.name()).collect();
        format!("unknown type '{s}'; choose one of {}", names.join(", "))
    })
}

impl TypeArgs {
    pub fn target(&self) -> Target {
        match self.r#type {
            Some(t) => Target::Type(t),
            None => Target::Bits(self.bits.parse().expect("validated by clap")),
        }
    }
}

/// A usage error found after parsing, reported as clap reports its own (exit status 2).
fn usage(kind: clap::error::ErrorKind, message: impl std::fmt::Display) -> clap::Error {
    Cli::command().error(kind, message)
}

/// What to do, checked.
#[derive(Debug)]
pub enum Job {
    Convert {
        dir: PathBuf,
        out: PathBuf,
        args: ConvertArgs,
    },
    Synth {
        shape: FalconShape,
        args: SynthArgs,
    },
    Lora(LoraArgs),
}

/// Checks what clap cannot: the arguments that depend on one another or on the shape.
pub fn validate(cli: Cli) -> Result<Job, clap::Error> {
    use clap::error::ErrorKind;
    match cli.command {
        Some(Command::Synth(args)) => {
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
            Ok(Job::Synth { shape, args })
        }
        Some(Command::Lora(args)) => Ok(Job::Lora(args)),
        None => {
            let mut args = cli.convert;
            let Some(dir) = args.model_dir.take() else {
                return Err(usage(
                    ErrorKind::MissingRequiredArgument,
                    "no checkpoint directory given: falcon-quantize <MODEL_DIR> -o <OUT.gguf>",
                ));
            };
            let Some(out) = args.output.take() else {
                return Err(usage(
                    ErrorKind::MissingRequiredArgument,
                    "no output file given: add -o <OUT.gguf>",
                ));
            };
            Ok(Job::Convert { dir, out, args })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bits_and_type_conflict() {
        let e = Cli::try_parse_from([
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
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        let e = Cli::try_parse_from([
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
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        // Each alone is fine, and --bits keeps its default when --type is given.
        assert!(Cli::try_parse_from(["falcon-quantize", "m", "-o", "o", "--type", "q4_0"]).is_ok());
        assert!(Cli::try_parse_from(["falcon-quantize", "m", "-o", "o", "--bits", "8"]).is_ok());
    }

    #[test]
    fn usage_errors_found_after_parsing_exit_2() {
        for argv in [
            &["falcon-quantize", "-o", "x.gguf"][..],
            &["falcon-quantize", "model"],
            &[
                "falcon-quantize",
                "synth",
                "--shape",
                "falcon-7b",
                "-o",
                "d",
                "--layers",
                "33",
            ],
        ] {
            let e = validate(Cli::try_parse_from(argv).unwrap()).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{argv:?}");
        }
    }
}
