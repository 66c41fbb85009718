//! `falcon-quantize`: a Hugging Face Falcon checkpoint → a quantized GGUF file, in one pass.
//!
//! `main` parses the flags, checks what clap cannot, and calls the `convert` crate; this binary
//! is the only place that prints (the progress bar, the summary, errors with advice).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use convert::{ConvertError, FalconShape, FileType, Options, Summary, Target};

mod cli;

use cli::{validate, Cli, ConvertArgs, Job, LoraArgs, SynthArgs};

/// Installs the handler of Ctrl-C, SIGTERM and SIGHUP: the first asks the converter to stop
/// (it removes its temporary file and returns an error); another removes every temporary file
/// at once and exits.
fn install_signal_handler(cancel: &Arc<AtomicBool>) {
    let flag = cancel.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            convert::partial::remove_all();
            eprintln!("falcon-quantize: error: interrupted; nothing was written");
            std::process::exit(130);
        }
        eprintln!("falcon-quantize: interrupted, cleaning up (interrupt again to stop at once)");
    });
}

fn main() -> ExitCode {
    let job = match validate(Cli::parse()) {
        Ok(job) => job,
        Err(e) => e.exit(),
    };
    let cancel = Arc::new(AtomicBool::new(false));
    install_signal_handler(&cancel);
    falcon::ignore_file_size_signal();
    let result = match job {
        Job::Convert { dir, out, args } => convert_checkpoint(dir, out, &args, &cancel),
        Job::Synth { shape, args } => synth(&shape, &args, &cancel),
        Job::Lora(args) => lora(&args, &cancel),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("falcon-quantize: error: {}", message(&e));
            if cancel.load(Ordering::SeqCst) {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error on one line, with advice where a flag helps.
fn message(e: &anyhow::Error) -> String {
    let text = falcon::error_chain(e);
    let advice = match e.downcast_ref::<ConvertError>() {
        Some(ConvertError::NoWeights { .. }) => " (--vocab-only writes the tokenizer alone)",
        Some(ConvertError::UnsupportedBits { .. }) => " (use --bits 4 or --bits 8)",
        Some(ConvertError::NoSpace { .. }) => " (write elsewhere with -o)",
        _ => "",
    };
    format!("{text}{advice}")
}

fn progress_bar(quiet: bool) -> Option<indicatif::ProgressBar> {
    (!quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("valid template"),
        );
        bar
    })
}

fn convert_checkpoint(
    dir: PathBuf,
    out: PathBuf,
    args: &ConvertArgs,
    cancel: &Arc<AtomicBool>,
) -> Result<()> {
    let bar = progress_bar(args.common.quiet);
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
        cancel: Some(cancel.clone()),
        loras: args.lora.clone(),
    };
    let result = convert::quantize_checkpoint(&dir, &out, &opts);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let summary = result?;
    if !args.common.quiet {
        eprintln!("{}", summary_line(&summary, opts.target));
        for m in &summary.merged {
            eprintln!(
                "merged {} at scale {} (sha256 {})",
                m.name, m.scale, m.sha256
            );
        }
    }
    Ok(())
}

fn lora(args: &LoraArgs, cancel: &Arc<AtomicBool>) -> Result<()> {
    let opts = convert::adapter::ExportOptions {
        file_type: args.r#type,
        cancel: Some(cancel.clone()),
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

fn summary_line(s: &Summary, target: Target) -> String {
    let secs = s.elapsed.as_secs_f64();
    let types: Vec<String> = s
        .type_counts
        .iter()
        .map(|(t, n)| format!("{n} {}", t.name()))
        .collect();
    let chose = match target {
        Target::Bits(b) => format!(" (--bits {b} → {})", s.file_type.name()),
        Target::Type(_) => String::new(),
    };
    format!(
        "wrote {}: {}{chose}, {}, {:.2} bits per weight, {} tensors ({}), {:.1} s, {:.2} GB/s of input",
        s.path.display(),
        s.file_type.name(),
        human_bytes(s.bytes),
        s.bits_per_weight(),
        s.n_tensors,
        types.join(", "),
        secs,
        s.input_bytes as f64 / 1e9 / secs.max(1e-9),
    )
}

fn synth(shape: &FalconShape, args: &SynthArgs, cancel: &AtomicBool) -> Result<()> {
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
        let bytes = convert::synth::write_gguf(shape, ft, &args.output, args.seed, Some(cancel))
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
            shape,
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

/// Sizes as people read them: 512 B, 3.2 MB, 27.1 GB (powers of 1000).
fn human_bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}
