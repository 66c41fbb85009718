//! `falcon-infer`: run Falcon in 4 or 8 bits on GPUs and CPU, through llama.cpp.

mod args;
mod bench;
mod chat;
mod eval;
mod generate;
mod perplexity;
mod plan;
mod rpc;
mod serve;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};

use falcon::engine::EngineError;
use falcon::infer::{InferError, Runtime};

/// Run Falcon models in 4 or 8 bits on GPUs and CPU, through llama.cpp.
///
/// MODEL is a GGUF file, or a Hugging Face Falcon checkpoint directory, which is quantized once
/// (--bits) into a cache file that is reused while the checkpoint is unchanged.
/// Every GGUF is validated before llama.cpp reads it.
///
/// Without a subcommand, generates text from a prompt (--prompt, --prompt-file or stdin) and
/// streams it to stdout; a timing line goes to stderr.
///
/// Exit status: 0 on success (also when stdout is closed early, as by `| head`), 1 on any error
/// (printed once on stderr with its causes), 2 for invalid command-line usage, 130 when
/// interrupted (Ctrl-C or SIGTERM).
#[derive(Debug, Parser)]
#[command(name = "falcon-infer", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    generate: generate::GenerateArgs,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Chat in the model's own format (its chat template, else its family's), reading lines
    /// from stdin.
    Chat(chat::ChatArgs),
    /// Serve the model over the OpenAI and TGI HTTP APIs, many users at once.
    Serve(Box<serve::ServeArgs>),
    /// Print what goes where and how much memory each device needs, before loading anything.
    Plan(plan::PlanArgs),
    /// Perplexity of a text file (and, with --reference, KL divergence and top-1 agreement).
    Perplexity(perplexity::PerplexityArgs),
    /// Prompt-processing and generation speed, and the memory-bandwidth ceiling.
    Bench(bench::BenchArgs),
    /// The Open LLM Leaderboard's multiple-choice tasks, scored as lm-evaluation-harness does.
    ///
    /// Each task's data as its public release gives it, in JSON Lines or Parquet (a file, or a
    /// directory of them):
    ///
    ///   task        --data       --fewshot-data                        shots  leaderboard metric
    ///   arc         test         train (drawn at random, seeded)          25  acc_norm
    ///   hellaswag   validation   train (drawn at random, seeded)          10  acc_norm
    ///   mmlu        test         dev (the first K of each subject's)       5  acc (mean of subjects)
    ///   truthfulqa  validation   none: zero-shot only                      0  mc2
    ///   winogrande  validation   train (drawn at random, seeded)           5  acc
    ///
    /// Prompts, few-shot draws, tokenization and metrics follow lm-evaluation-harness at the
    /// commit the Open LLM Leaderboard used (b281b09; see docs/EVAL.md). Each choice is scored by
    /// its summed log-probability after the context; the contexts shared by choices and items
    /// are evaluated once, packed into batches of many sequences.
    ///
    /// Prints a table of metrics with standard errors on stdout; a progress bar on stderr when it
    /// is a terminal. Items that cannot be scored (a continuation longer than the model's
    /// context) are skipped and counted, or are an error with --strict; longer contexts are cut
    /// from the left, as the harness does.
    ///
    /// --ctx-size is the KV cells one packed batch of requests fills (default 4096, at least
    /// the model's context); --batch-size the tokens per llama.cpp decode (default: all of them).
    #[command(verbatim_doc_comment)]
    Eval(eval::EvalArgs),
    /// Serve this machine's devices (GPUs, or the CPU) to other machines' `--rpc`.
    ///
    /// The protocol has no authentication and no encryption: listen only on loopback (the
    /// default) or inside a trusted network (a VPN or an SSH tunnel).
    RpcServer(rpc::RpcServerArgs),
}

/// A command-line usage error: printed with a pointer to --help, exit status 2.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// Set by the first Ctrl-C or SIGTERM: long work stops at the next chance and cleans up.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether the user asked to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// `fatal`: install the command line's handler of ggml's fatal errors (the server installs its
/// own, which keeps answering `/health`).
fn install_signal_handlers(fatal: bool) {
    // The first signal asks the work to stop and clean up (a quantization in progress removes
    // its partial file); a second one ends the process at once, removing partial files first.
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            convert::partial::remove_all();
            std::process::exit(130);
        }
    });
    // ggml gives up on some errors (an RPC worker that died) by aborting; say what happened and
    // which worker, and exit like any other error.
    if !fatal {
        return;
    }
    falcon::engine::on_fatal(|f| {
        let msg = if f.dead_workers.is_empty() {
            f.reason()
        } else {
            format!("{}; restart it there, or run without it", f.reason())
        };
        eprintln!("falcon-infer: error: {msg}");
        // SAFETY: ends the process without running destructors of ggml's threads, which are
        // in the middle of the failed call.
        unsafe { libc::_exit(1) }
    });
}

/// Shows the library's `tracing` notices: info as plain lines, warnings with `warning:`, and
/// llama.cpp's own log with `-v`.
fn init_logging(verbose: bool) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let filter = Targets::new().with_default(LevelFilter::INFO).with_target(
        "llama_cpp",
        if verbose {
            LevelFilter::TRACE
        } else {
            LevelFilter::OFF
        },
    );
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .event_format(Plain);
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .try_init();
}

struct Plain;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for Plain
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        if meta.target() != "llama_cpp" && *meta.level() <= tracing::Level::WARN {
            write!(writer, "warning: ")?;
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// A progress bar for a checkpoint's one-time quantization, on a terminal.
pub fn progress_bar() -> Option<Arc<convert::ProgressFn>> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(Arc::new(move |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
        if done >= total {
            bar.finish_and_clear();
        }
    }))
}

/// A flag that is set once the user asks to stop, for the library to poll.
pub fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let watcher = flag.clone();
    // The library polls its own flag; mirror the process-wide one into it.
    std::thread::spawn(move || loop {
        if interrupted() {
            watcher.store(true, Ordering::Relaxed);
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    });
    flag
}

/// Resolves the model (quantizing a checkpoint once), initialises llama.cpp, adds RPC workers
/// and announces the devices.
pub fn runtime(
    model: &args::ModelArgs,
    device: &args::DeviceArgs,
    load: &falcon::engine::LoadOptions,
) -> anyhow::Result<Runtime> {
    let cancel = interrupt_flag();
    let rt = Runtime::new(&model.spec()?, load, progress_bar(), Some(cancel)).map_err(|e| {
        if interrupted() {
            anyhow::Error::new(InferError::Interrupted)
        } else {
            anyhow::Error::new(e)
        }
    })?;
    if !device.rpc.is_empty() {
        let added = rt
            .engine()
            .add_rpc_workers(&device.rpc, std::time::Duration::from_secs(10))?;
        for d in &added {
            tracing::info!(
                "RPC device {} ({}, {} free)",
                d.name,
                d.description,
                falcon::infer::human_bytes(d.free)
            );
        }
    }
    rt.announce_devices();
    Ok(rt)
}

/// Advice that names the flags to change, for the library's errors.
fn advice(e: &anyhow::Error) -> Option<&'static str> {
    for cause in e.chain() {
        if let Some(ie) = cause.downcast_ref::<InferError>() {
            return match ie {
                InferError::PromptTooLong { .. } => Some("shorten the prompt or raise --ctx-size"),
                InferError::TextTooShort { .. } => {
                    Some("give a longer text or a smaller --ctx-size")
                }
                InferError::EmptyPrompt => {
                    Some("give some text with --prompt, --prompt-file or stdin")
                }
                InferError::Pack(_) => Some("raise --ctx-size"),
                _ => continue,
            };
        }
        if let Some(ee) = cause.downcast_ref::<EngineError>() {
            return match ee {
                EngineError::Context { .. } => {
                    Some("not enough memory? try a smaller --ctx-size or fewer --gpu-layers")
                }
                EngineError::ContextFull { .. } => Some("raise --ctx-size"),
                EngineError::NoRpc => Some(
                    "build with GGML_RPC=ON (the repository's .cargo/config.toml sets it)",
                ),
                EngineError::Placement(_) => Some(
                    "give one --tensor-split share per device: local GPUs (or the CPU) first, then --rpc workers",
                ),
                EngineError::NoSuchGpu { .. } => Some("choose an existing --main-gpu"),
                EngineError::Fit { .. } => Some("set --gpu-layers and --ctx-size by hand"),
                _ => continue,
            };
        }
    }
    None
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || matches!(c.downcast_ref::<InferError>(), Some(InferError::Output(io)) if io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None => generate::run(cli.generate),
        Some(Sub::Chat(c)) => chat::run(c),
        Some(Sub::Plan(p)) => plan::run(p),
        Some(Sub::Perplexity(p)) => perplexity::run(p),
        Some(Sub::Bench(b)) => bench::run(b),
        Some(Sub::Eval(e)) => eval::run(e),
        Some(Sub::RpcServer(r)) => rpc::run(r),
        Some(Sub::Serve(s)) => serve::run(*s),
    }
}

fn verbose(cli: &Cli) -> bool {
    match &cli.command {
        None => cli.generate.model.verbose,
        Some(Sub::Chat(c)) => c.model.verbose,
        Some(Sub::Perplexity(p)) => p.model.verbose,
        Some(Sub::Bench(b)) => b.model.verbose,
        Some(Sub::Eval(e)) => e.model.verbose,
        Some(Sub::RpcServer(r)) => r.verbose,
        Some(Sub::Serve(s)) => s.model.verbose,
        Some(Sub::Plan(_)) => false,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(verbose(&cli));
    install_signal_handlers(!matches!(cli.command, Some(Sub::Serve(_))));
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(u) = e.downcast_ref::<Usage>() {
                eprintln!("falcon-infer: error: {u}\n\nFor more information, try '--help'.");
                return ExitCode::from(2);
            }
            if interrupted()
                || e.chain().any(|c| {
                    matches!(
                        c.downcast_ref::<InferError>(),
                        Some(InferError::Interrupted)
                    )
                })
            {
                eprintln!("falcon-infer: interrupted");
                return ExitCode::from(130);
            }
            let mut msg = falcon::error_chain(&e);
            if let Some(a) = advice(&e) {
                msg.push_str("; ");
                msg.push_str(a);
            }
            eprintln!("falcon-infer: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
