//! `falcon-infer`: run Falcon models through llama.cpp (see [`crate::engine`]).
//!
//! The binary parses flags into one of the validated configs below and calls [`run`].
//! Subcommands: generation (default), chat, plan, perplexity and bench.

pub mod bench;
pub mod chat;
pub mod generate;
pub mod perplexity;
pub mod plan;
pub mod source;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

use crate::engine::{ContextOptions, Engine, LoadOptions, Model, SamplingParams, Session};
pub use source::{Bits, ModelSpec};

/// Generation settings shared by the default command and chat.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    /// The model.
    pub model: ModelSpec,
    /// Placement and context.
    pub load: LoadOptions,
    /// The prompt text.
    pub prompt: String,
    /// Most tokens per completion.
    pub max_new_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Completions to generate (seeds `seed`, `seed + 1`, ...).
    pub num_return_sequences: usize,
    /// Strings that end a completion.
    pub stop: Vec<String>,
    /// One JSON document instead of streamed text.
    pub json: bool,
    /// Show llama.cpp's own log.
    pub verbose: bool,
}

/// Chat settings.
#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// Model, sampling and limits (the prompt is unused).
    pub gen: GenerateConfig,
    /// A system line put before the conversation.
    pub system: Option<String>,
}

/// Perplexity settings.
#[derive(Debug, Clone)]
pub struct PerplexityConfig {
    /// The model to measure.
    pub model: ModelSpec,
    /// A reference model for KL divergence and top-1 agreement.
    pub reference: Option<ModelSpec>,
    /// Placement and context (`n_ctx` is the chunk length).
    pub load: LoadOptions,
    /// The text.
    pub text: String,
    /// Print JSON.
    pub json: bool,
    /// Show llama.cpp's own log.
    pub verbose: bool,
}

/// Bench settings.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The model.
    pub model: ModelSpec,
    /// Placement.
    pub load: LoadOptions,
    /// Prompt length for prompt processing.
    pub n_prompt: usize,
    /// Tokens for generation.
    pub n_gen: usize,
    /// Repetitions.
    pub repetitions: usize,
    /// Print JSON.
    pub json: bool,
    /// Show llama.cpp's own log.
    pub verbose: bool,
}

/// A validated command.
#[derive(Debug, Clone)]
pub enum Command {
    /// Generate from a prompt.
    Generate(GenerateConfig),
    /// Interactive chat.
    Chat(ChatConfig),
    /// Memory plan.
    Plan(plan::PlanConfig),
    /// Perplexity.
    Perplexity(PerplexityConfig),
    /// Speed.
    Bench(BenchConfig),
}

/// Runs a command.
///
/// # Errors
/// Whatever the command fails with, with context.
pub fn run(cmd: &Command) -> anyhow::Result<()> {
    match cmd {
        Command::Generate(c) => generate::run(c),
        Command::Chat(c) => chat::run(c),
        Command::Plan(c) => plan::run(c),
        Command::Perplexity(c) => perplexity::run(c),
        Command::Bench(c) => bench::run(c),
    }
}

/// A resolved, validated GGUF and an initialised engine, ready to load.
#[derive(Debug)]
pub struct Prepared {
    engine: Engine,
    /// The GGUF file that will be loaded.
    pub gguf: std::path::PathBuf,
    opts: LoadOptions,
    started: Instant,
}

impl Prepared {
    /// Resolves the model (quantizing a checkpoint if needed) and initialises llama.cpp.
    ///
    /// # Errors
    /// Resolution or initialisation failures.
    pub fn new(spec: &ModelSpec, opts: &LoadOptions, verbose: bool) -> anyhow::Result<Self> {
        let started = Instant::now();
        let summary = source::resolve(spec, false)?;
        let engine = Engine::init(verbose)?;
        warn_gpu_options(&engine, opts);
        Ok(Self {
            engine,
            gguf: summary.path,
            opts: opts.clone(),
            started,
        })
    }

    /// Like [`Prepared::new`] but sharing an engine is impossible (one per process), so a second
    /// model (a reference) is resolved here and loaded through [`Prepared::load_other`].
    ///
    /// # Errors
    /// Resolution failures.
    pub fn resolve_other(spec: &ModelSpec) -> anyhow::Result<std::path::PathBuf> {
        Ok(source::resolve(spec, false)?.path)
    }

    /// Loads the model; returns it and the time since [`Prepared::new`] began.
    ///
    /// # Errors
    /// llama.cpp load failures.
    pub fn load(&self) -> anyhow::Result<(Model<'_>, Duration)> {
        self.load_other(&self.gguf)
    }

    /// Loads another validated GGUF with the same options.
    ///
    /// # Errors
    /// llama.cpp load failures.
    pub fn load_other(&self, gguf: &std::path::Path) -> anyhow::Result<(Model<'_>, Duration)> {
        let model = self.engine.load(gguf, &self.opts)?;
        if self.engine.gpu_offload() {
            eprintln!(
                "{} of {} layers on GPU (the output layer counts as one)",
                model.gpu_layers(),
                model.n_layer() + 1
            );
        }
        Ok((model, self.started.elapsed()))
    }

    /// The context options, with the context size resolved: the user's, else the size
    /// llama.cpp's fitting chose, else the model's training context.
    #[must_use]
    pub fn context_options(&self, model: &Model<'_>) -> ContextOptions {
        let mut c = self.opts.context.clone();
        c.n_ctx = Some(
            c.n_ctx
                .or(model.fitted_ctx())
                .unwrap_or_else(|| model.n_ctx_train()),
        );
        c
    }

    /// A session with [`Prepared::context_options`].
    ///
    /// # Errors
    /// llama.cpp context failures.
    pub fn session<'m>(&self, model: &'m Model<'_>) -> anyhow::Result<Session<'m>> {
        model
            .session(&self.context_options(model))
            .context("creating the inference context")
    }

    /// The engine.
    #[must_use]
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// Placement options that cannot apply on this build or machine produce a warning, not an error.
fn warn_gpu_options(engine: &Engine, opts: &LoadOptions) {
    let asked = !matches!(opts.gpu_layers, crate::engine::GpuLayers::Auto)
        || opts.tensor_split.is_some()
        || opts.main_gpu.is_some();
    if asked && !engine.gpu_build() {
        eprintln!(
            "warning: this build has no GPU support (build with --features cuda); \
             --gpu-layers/--tensor-split/--main-gpu are ignored and everything runs on the CPU"
        );
    } else if asked && !engine.gpu_offload() {
        eprintln!("warning: no GPU found; everything runs on the CPU");
    }
}

/// Memory a device holds for this process.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryUse {
    /// Device name (`CPU`, `CUDA0`, ...).
    pub device: String,
    /// Bytes.
    pub bytes: u64,
}

/// Memory on each device (GPU: drop in free memory since loading; CPU: peak resident size).
#[must_use]
pub fn memory_use(model: &Model<'_>) -> Vec<MemoryUse> {
    model
        .memory_use()
        .into_iter()
        .map(|(d, bytes)| MemoryUse {
            device: d.name,
            bytes,
        })
        .collect()
}

/// `CPU 1.2 GiB, CUDA0 20.1 GiB`.
#[must_use]
pub fn format_memory(mem: &[MemoryUse]) -> String {
    mem.iter()
        .map(|m| format!("{} {}", m.device, human_bytes(m.bytes)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Bytes with a binary unit.
#[must_use]
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}
