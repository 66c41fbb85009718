//! Running Falcon models through llama.cpp (see [`crate::engine`]): where the GGUF comes from
//! ([`source`]) and its LoRA adapters ([`lora`]), the generation loop with stop strings
//! ([`generate`]), chat prompts ([`chat`]), perplexity ([`perplexity`]), the leaderboard's
//! multiple-choice tasks ([`eval`]), memory plans ([`plan`]) and speed ([`bench`](mod@bench)).
//!
//! Nothing here prints: results are returned, progress goes to callbacks, and notices (a cached
//! model reused, a GPU option that cannot apply) are `tracing` events that the binaries show.

pub mod bench;
pub mod chat;
pub mod eval;
pub mod generate;
pub mod lora;
pub mod perplexity;
pub mod plan;
pub mod source;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::engine::{ContextOptions, Engine, EngineError, GpuLayers, LoadOptions, Model, Session};
pub use lora::LoraArg;
pub use source::{Bits, ModelSpec};

/// Errors of running a model. Each names the file or value involved.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// llama.cpp failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Resolving the model (a missing path, an invalid GGUF, a checkpoint that failed to
    /// convert).
    #[error(transparent)]
    Source(#[from] source::SourceError),
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The prompt does not fit in the context.
    #[error("the prompt is {tokens} tokens but the context holds {n_ctx} (the model was trained with {n_ctx_train})")]
    PromptTooLong {
        /// Prompt tokens.
        tokens: usize,
        /// Context size.
        n_ctx: usize,
        /// The model's training context.
        n_ctx_train: u32,
    },
    /// A text shorter than one chunk.
    #[error("the text is {tokens} tokens, less than one chunk of {n_ctx}")]
    TextTooShort {
        /// Tokens of the text.
        tokens: usize,
        /// Chunk (context) size.
        n_ctx: usize,
    },
    /// Two models that should share a vocabulary do not.
    #[error("{} and {} have different vocabularies; compare models of the same family", a.display(), b.display())]
    VocabularyMismatch {
        /// One model.
        a: PathBuf,
        /// The other.
        b: PathBuf,
    },
    /// Writing a result failed (a closed pipe is not reported as an error by the binaries).
    #[error("writing the output: {0}")]
    Output(#[source] std::io::Error),
    /// The run was interrupted.
    #[error("interrupted")]
    Interrupted,
    /// Evaluation requests that cannot be packed into the context.
    #[error(transparent)]
    Pack(#[from] crate::eval::pack::PackError),
    /// A vocabulary without an end-of-text token.
    #[error("the model's vocabulary has no end-of-text token, which scoring needs")]
    NoEndOfText,
}

/// A resolved, validated GGUF and an initialised engine, ready to load.
#[derive(Debug)]
pub struct Runtime {
    engine: Engine,
    /// The GGUF file that will be loaded.
    pub gguf: PathBuf,
    opts: LoadOptions,
    started: Instant,
}

impl Runtime {
    /// Resolves the model (quantizing a checkpoint once if needed, with `progress` called as it
    /// goes) and its LoRA adapters (converting PEFT adapters once if needed; they are loaded
    /// with the model and applied to its contexts), and initialises llama.cpp.
    ///
    /// # Errors
    /// Resolution or initialisation failures.
    pub fn new(
        spec: &ModelSpec,
        opts: &LoadOptions,
        progress: Option<Arc<convert::ProgressFn>>,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<Self, InferError> {
        let started = Instant::now();
        let summary = source::resolve(spec, progress, cancel.clone())?;
        let mut opts = opts.clone();
        opts.adapters
            .extend(source::resolve_adapters(spec, &summary.path, cancel)?);
        let engine = Engine::init()?;
        Ok(Self {
            engine,
            gguf: summary.path,
            opts,
            started,
        })
    }

    /// Announces (as `tracing` warnings) placement options that cannot apply on this build or
    /// machine, and a GPU build that finds no usable GPU.
    pub fn announce_devices(&self) {
        if let Some(notice) = self.engine.gpu_notice() {
            tracing::warn!("{notice}");
        }
        let asked = !matches!(self.opts.gpu_layers, GpuLayers::Auto)
            || self.opts.tensor_split.is_some()
            || self.opts.main_gpu.is_some();
        if asked && !self.engine.can_offload() {
            tracing::warn!(
                "no GPU or RPC worker to offload to: the GPU placement options are ignored and \
                 everything runs on the CPU"
            );
        }
    }

    /// Loads the model; returns it and the time since [`Runtime::new`] began.
    ///
    /// # Errors
    /// llama.cpp load failures.
    pub fn load(&self) -> Result<(Model<'_>, Duration), InferError> {
        for (path, scale) in &self.opts.adapters {
            tracing::info!("LoRA adapter {} at scale {scale}", path.display());
        }
        self.load_with(&self.gguf, &self.opts)
    }

    /// Loads another validated GGUF (such as a reference model) with the same options, without
    /// the LoRA adapters.
    ///
    /// # Errors
    /// llama.cpp load failures.
    pub fn load_other(&self, gguf: &std::path::Path) -> Result<(Model<'_>, Duration), InferError> {
        let opts = LoadOptions {
            adapters: Vec::new(),
            ..self.opts.clone()
        };
        self.load_with(gguf, &opts)
    }

    fn load_with(
        &self,
        gguf: &std::path::Path,
        opts: &LoadOptions,
    ) -> Result<(Model<'_>, Duration), InferError> {
        let model = self.engine.load(gguf, opts)?;
        if self.engine.can_offload() {
            let p = model.placement();
            let n = model.n_layer() + 1;
            let on = if p.names.is_empty() {
                String::new()
            } else {
                format!(" ({})", p.names.join(", "))
            };
            tracing::info!(
                "{} of {n} layers offloaded{on}, {} on the CPU (the output layer counts as one)",
                model.gpu_layers(),
                n - model.gpu_layers()
            );
            if let GpuLayers::Count(asked) = self.opts.gpu_layers {
                if asked > model.gpu_layers() {
                    tracing::warn!(
                        "{asked} layers were asked for the GPU but the model has {n}: {} went to the GPU, {} stayed on the CPU",
                        model.gpu_layers(),
                        n - model.gpu_layers()
                    );
                }
            }
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

    /// A single-sequence session with [`Runtime::context_options`].
    ///
    /// # Errors
    /// llama.cpp context failures.
    pub fn session<'m>(&self, model: &'m Model<'_>) -> Result<Session<'m>, InferError> {
        Ok(model.session(&self.context_options(model))?)
    }

    /// The engine.
    #[must_use]
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The load options (with the resolved LoRA adapters).
    #[must_use]
    pub fn options(&self) -> &LoadOptions {
        &self.opts
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

/// Memory on each device (GPU: drop in free memory since loading; CPU: resident size now).
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
