//! The inference engine: the one module that talks to llama.cpp (through `llama-cpp-2`).
//!
//! Everything else in the crate sees plain Rust types: token ids are `i32`, logits are `&[f32]`,
//! devices are [`Device`]s. Keeping every llama.cpp call here means one place to audit for
//! `unsafe`, one place to adapt when llama.cpp changes, and one place where its log output is
//! captured (llama.cpp logs to stderr by default; here it is silent unless `verbose`, and its
//! last error lines are attached to the errors this module returns).
//!
//! Only files that passed the `convert` crate's GGUF validator should reach [`Engine::load`]:
//! llama.cpp trusts the offsets and sizes in the file it maps.
//!
//! ```no_run
//! use falcon::engine::{Engine, LoadOptions, ContextOptions, SamplingParams};
//! let engine = Engine::init(false)?;
//! let model = engine.load("model.gguf".as_ref(), &LoadOptions::default())?;
//! let mut session = model.session(&ContextOptions::default())?;
//! let prompt = model.tokenize("The Falcon", true);
//! session.eval(&prompt, false)?;
//! let mut sampler = model.sampler(&SamplingParams::greedy());
//! let next = session.sample(&mut sampler);
//! # Ok::<(), falcon::engine::EngineError>(())
//! ```

use std::collections::VecDeque;
use std::ffi::{c_char, c_void, CStr, CString};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::{LlamaModelParams, LlamaSplitMode};
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::{list_llama_ggml_backend_devices, LlamaBackendDeviceType};

/// A token id of the model's vocabulary.
pub type Token = i32;

/// Errors of the engine. Each carries the last error lines llama.cpp logged, if any.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// llama.cpp's backend could not be initialised (it can be only once per process).
    #[error("could not initialise llama.cpp: {0}")]
    Init(String),
    /// The model file could not be loaded.
    #[error("llama.cpp could not load {}{}", path.display(), detail(log))]
    Load {
        /// The GGUF file.
        path: PathBuf,
        /// What llama.cpp logged.
        log: String,
    },
    /// A context (KV cache and compute buffers) could not be created.
    #[error(
        "llama.cpp could not create a context of {n_ctx} tokens (not enough memory? \
         try a smaller --ctx-size or fewer --gpu-layers){}",
        detail(log)
    )]
    Context {
        /// The requested context size.
        n_ctx: u32,
        /// What llama.cpp logged.
        log: String,
    },
    /// Evaluating a batch of tokens failed.
    #[error(
        "llama.cpp failed to evaluate tokens at position {pos}: {msg}{}",
        detail(log)
    )]
    Decode {
        /// Position of the first token of the failed batch.
        pos: usize,
        /// llama.cpp's return code, as text.
        msg: String,
        /// What llama.cpp logged.
        log: String,
    },
    /// The tokens do not fit in the context.
    #[error("{needed} tokens do not fit in a context of {n_ctx}; raise --ctx-size")]
    ContextFull {
        /// Tokens that would be in the context.
        needed: usize,
        /// The context size.
        n_ctx: u32,
    },
    /// Fitting the model to the free GPU memory failed.
    #[error("could not fit the model into free GPU memory{}", detail(log))]
    Fit {
        /// What llama.cpp logged.
        log: String,
    },
    /// A path that llama.cpp cannot take (it wants UTF-8 without NUL).
    #[error("path {} is not valid UTF-8 or contains a NUL byte; rename or move the file", .0.display())]
    Path(PathBuf),
    /// A bad option value (e.g. a GPU index that does not exist).
    #[error("{0}")]
    Option(String),
}

fn detail(log: &str) -> String {
    if log.is_empty() {
        String::new()
    } else {
        format!(" (llama.cpp said: {log})")
    }
}

// ---------------------------------------------------------------------------------------------
// Logging

static VERBOSE: AtomicBool = AtomicBool::new(false);
/// The last warning/error lines llama.cpp logged, to attach to errors.
static RECENT: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());
const RECENT_LINES: usize = 8;

unsafe extern "C" fn log_callback(
    level: llama_cpp_sys_2::ggml_log_level,
    text: *const c_char,
    _user_data: *mut c_void,
) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string valid for the duration of the call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    if VERBOSE.load(Ordering::Relaxed) {
        eprint!("{text}");
    }
    if level == llama_cpp_sys_2::GGML_LOG_LEVEL_ERROR
        || level == llama_cpp_sys_2::GGML_LOG_LEVEL_WARN
    {
        let line = text.trim();
        if !line.is_empty() {
            let mut recent = RECENT.lock().unwrap_or_else(|e| e.into_inner());
            if recent.len() == RECENT_LINES {
                recent.pop_front();
            }
            recent.push_back(line.to_string());
        }
    }
}

/// Takes (and clears) the warning and error lines llama.cpp logged since the last call.
fn take_log() -> String {
    let mut recent = RECENT.lock().unwrap_or_else(|e| e.into_inner());
    let lines: Vec<String> = recent.drain(..).collect();
    lines.join("; ")
}

// ---------------------------------------------------------------------------------------------
// Engine and devices

/// What kind of device a [`Device`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The host CPU.
    Cpu,
    /// A discrete or integrated GPU (or another accelerator that holds layers).
    Gpu,
}

/// A device llama.cpp can place tensors on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Device {
    /// ggml's name for it, e.g. `CUDA0`.
    pub name: String,
    /// A human description, e.g. `NVIDIA H100 80GB HBM3`.
    pub description: String,
    /// CPU or GPU.
    pub kind: DeviceKind,
    /// Free memory in bytes.
    pub free: u64,
    /// Total memory in bytes.
    pub total: u64,
}

/// The initialised llama.cpp backend. One per process.
#[derive(Debug)]
pub struct Engine {
    backend: LlamaBackend,
}

impl Engine {
    /// Initialises llama.cpp and routes its logs (to stderr only when `verbose`).
    ///
    /// # Errors
    /// If llama.cpp was already initialised in this process.
    pub fn init(verbose: bool) -> Result<Self, EngineError> {
        VERBOSE.store(verbose, Ordering::Relaxed);
        // SAFETY: `log_callback` is a plain function that lives for the whole program and only
        // reads the pointer it is given during the call; the user-data pointer is unused.
        unsafe {
            llama_cpp_sys_2::llama_log_set(Some(log_callback), std::ptr::null_mut());
            llama_cpp_sys_2::ggml_log_set(Some(log_callback), std::ptr::null_mut());
        }
        #[cfg(feature = "dynamic-backends")]
        llama_cpp_2::llama_backend::load_backends();
        let backend = LlamaBackend::init().map_err(|e| EngineError::Init(e.to_string()))?;
        Ok(Self { backend })
    }

    /// Whether this build can offload layers to a GPU and one is present.
    #[must_use]
    pub fn gpu_offload(&self) -> bool {
        self.backend.supports_gpu_offload() && self.gpus().next().is_some()
    }

    /// Whether this build was compiled with a GPU backend at all.
    #[must_use]
    pub fn gpu_build(&self) -> bool {
        self.backend.supports_gpu_offload()
    }

    /// All devices, CPU included, with their current free memory.
    #[must_use]
    pub fn devices(&self) -> Vec<Device> {
        list_llama_ggml_backend_devices()
            .into_iter()
            .filter_map(|d| {
                let kind = match d.device_type {
                    LlamaBackendDeviceType::Cpu => DeviceKind::Cpu,
                    LlamaBackendDeviceType::Gpu
                    | LlamaBackendDeviceType::IntegratedGpu
                    | LlamaBackendDeviceType::Accelerator => DeviceKind::Gpu,
                    LlamaBackendDeviceType::Unknown => return None,
                };
                Some(Device {
                    name: d.name,
                    description: d.description,
                    kind,
                    free: d.memory_free as u64,
                    total: d.memory_total as u64,
                })
            })
            .collect()
    }

    fn gpus(&self) -> impl Iterator<Item = Device> {
        self.devices()
            .into_iter()
            .filter(|d| d.kind == DeviceKind::Gpu)
    }

    /// Loads a GGUF file (which must have passed validation) with the given placement.
    ///
    /// # Errors
    /// If llama.cpp rejects the file, the placement does not fit, or the path is not UTF-8.
    pub fn load(&self, path: &Path, opts: &LoadOptions) -> Result<Model<'_>, EngineError> {
        let cpath = path
            .to_str()
            .and_then(|s| CString::new(s).ok())
            .ok_or_else(|| EngineError::Path(path.to_path_buf()))?;
        take_log();
        let mut params = LlamaModelParams::default()
            .with_use_mmap(opts.mmap)
            .with_use_mlock(opts.mlock)
            .with_split_mode(match opts.split_mode {
                SplitMode::Layer => LlamaSplitMode::Layer,
                SplitMode::Row => LlamaSplitMode::Row,
            });
        let n_gpus = self.gpus().count();
        if let Some(main) = opts.main_gpu {
            if main as usize >= n_gpus.max(1) {
                return Err(EngineError::Option(format!(
                    "--main-gpu {main}: there are only {n_gpus} GPU(s)"
                )));
            }
            params = params.with_main_gpu(main as i32);
        }
        if let Some(split) = &opts.tensor_split {
            if split.len() > n_gpus {
                return Err(EngineError::Option(format!(
                    "--tensor-split names {} devices but there are only {n_gpus} GPU(s)",
                    split.len()
                )));
            }
            // llama-cpp-2 exposes no setter for llama.cpp's proportional `tensor_split`; the
            // devices given a zero share are left out, and the others share by the fitting below.
            let all = self.devices();
            let gpu_indices: Vec<usize> = all
                .iter()
                .enumerate()
                .filter(|(_, d)| d.kind == DeviceKind::Gpu)
                .map(|(i, _)| i)
                .collect();
            let chosen: Vec<usize> = split
                .iter()
                .zip(&gpu_indices)
                .filter(|(share, _)| **share > 0.0)
                .map(|(_, &i)| i)
                .collect();
            params = params
                .with_devices(&chosen)
                .map_err(|e| EngineError::Option(format!("--tensor-split: {e}")))?;
        }
        let gpu = self.gpu_offload();
        let params = match opts.gpu_layers {
            GpuLayers::Count(n) => params.with_n_gpu_layers(n),
            GpuLayers::Auto if !gpu => params.with_n_gpu_layers(0),
            // llama.cpp's default, -1, means all layers.
            GpuLayers::All | GpuLayers::Auto => params,
        };
        let mut params = pin!(params);
        let mut fitted_ctx = None;
        if gpu && opts.gpu_layers == GpuLayers::Auto {
            let mut cparams = opts.context.context_params();
            let mut margins = vec![FIT_MARGIN_BYTES; llama_cpp_2::max_devices().max(n_gpus + 1)];
            params
                .as_mut()
                .fit_params(
                    &cpath,
                    &mut cparams,
                    &mut margins,
                    opts.context.n_ctx.unwrap_or(0),
                    llama_cpp_sys_2::GGML_LOG_LEVEL_ERROR,
                )
                .map_err(|_| EngineError::Fit { log: take_log() })?;
            fitted_ctx = cparams.n_ctx().map(NonZeroU32::get);
        }
        let free_before: Vec<u64> = self.devices().iter().map(|d| d.free).collect();
        let model = LlamaModel::load_from_file(&self.backend, path, &params).map_err(|_| {
            EngineError::Load {
                path: path.to_path_buf(),
                log: take_log(),
            }
        })?;
        let n_layer = model.n_layer();
        let gpu_layers = if gpu {
            let requested = params.n_gpu_layers();
            // llama.cpp counts the output layer as one more offloadable layer.
            if requested < 0 {
                n_layer + 1
            } else {
                (requested as u32).min(n_layer + 1)
            }
        } else {
            0
        };
        Ok(Model {
            engine: self,
            model,
            gpu_layers,
            n_layer,
            free_before,
            fitted_ctx,
        })
    }
}

impl Engine {
    /// Loads only the tokenizer and metadata of a GGUF file (e.g. one written with
    /// `falcon-quantize --vocab-only`): enough to tokenize, not to evaluate.
    ///
    /// # Errors
    /// If llama.cpp rejects the file.
    pub fn load_vocab_only(&self, path: &Path) -> Result<Model<'_>, EngineError> {
        take_log();
        let params = LlamaModelParams::default().with_vocab_only(true);
        let model = LlamaModel::load_from_file(&self.backend, path, &params).map_err(|_| {
            EngineError::Load {
                path: path.to_path_buf(),
                log: take_log(),
            }
        })?;
        let n_layer = model.n_layer();
        Ok(Model {
            engine: self,
            model,
            gpu_layers: 0,
            n_layer,
            free_before: Vec::new(),
            fitted_ctx: None,
        })
    }
}

/// Memory llama.cpp's fitting leaves free on each GPU (its own default is 1 GiB).
const FIT_MARGIN_BYTES: usize = 1 << 30;

/// How many layers go to GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuLayers {
    /// As many as free GPU memory allows (llama.cpp's fitting); none without a GPU.
    #[default]
    Auto,
    /// All of them.
    All,
    /// The first `n` from the output end (llama.cpp's convention).
    Count(u32),
}

/// How layers are split across several GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SplitMode {
    /// Whole layers per GPU.
    #[default]
    Layer,
    /// Rows of each matrix across GPUs.
    Row,
}

/// Where and how a model is loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Layers on GPUs.
    pub gpu_layers: GpuLayers,
    /// GPU for small tensors and scratch.
    pub main_gpu: Option<u32>,
    /// Split across GPUs.
    pub split_mode: SplitMode,
    /// Shares of the model per GPU.
    pub tensor_split: Option<Vec<f32>>,
    /// Map the file instead of reading it.
    pub mmap: bool,
    /// Lock the weights in RAM.
    pub mlock: bool,
    /// The context that will be created (the fitting accounts for its memory).
    pub context: ContextOptions,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            gpu_layers: GpuLayers::Auto,
            main_gpu: None,
            split_mode: SplitMode::Layer,
            tensor_split: None,
            mmap: true,
            mlock: false,
            context: ContextOptions::default(),
        }
    }
}

/// Context (KV cache and batch) settings.
#[derive(Debug, Clone, Default)]
pub struct ContextOptions {
    /// Context size in tokens; `None` = the model's training context.
    pub n_ctx: Option<u32>,
    /// Logical batch size for prompt processing; `None` = llama.cpp's default.
    pub n_batch: Option<u32>,
    /// Threads; `None` = all available cores.
    pub threads: Option<u32>,
    /// Keep the logits of every token of a batch (perplexity needs them).
    pub all_logits: bool,
}

impl ContextOptions {
    fn context_params(&self) -> LlamaContextParams {
        let threads = self.threads.map_or_else(default_threads, |t| t as i32);
        let mut p = LlamaContextParams::default()
            .with_n_ctx(self.n_ctx.and_then(NonZeroU32::new))
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_n_seq_max(1);
        if let Some(b) = self.n_batch {
            p = p.with_n_batch(b).with_n_ubatch(b.min(512));
        }
        p
    }
}

fn default_threads() -> i32 {
    std::thread::available_parallelism().map_or(4, |n| n.get() as i32)
}

// ---------------------------------------------------------------------------------------------
// Model

/// A loaded model.
#[derive(Debug)]
pub struct Model<'e> {
    engine: &'e Engine,
    model: LlamaModel,
    gpu_layers: u32,
    n_layer: u32,
    free_before: Vec<u64>,
    fitted_ctx: Option<u32>,
}

impl Model<'_> {
    /// Tokenizes text as the model's tokenizer does (special tokens in the text are parsed as
    /// such, like Hugging Face tokenizers do); `add_special` adds BOS/EOS where the GGUF asks.
    #[must_use]
    pub fn tokenize(&self, text: &str, add_special: bool) -> Vec<Token> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), add_special, true)
            .into_iter()
            .map(|t| t.0)
            .collect()
    }

    /// The bytes a token stands for; special tokens (`>>TITLE<<`, ...) as their text, as Hugging
    /// Face's `decode` without `skip_special_tokens` writes them.
    #[must_use]
    pub fn token_bytes(&self, token: Token) -> Vec<u8> {
        self.model
            .vocab()
            .token_to_piece(LlamaToken(token), true, None)
    }

    /// Whether the token ends generation (end-of-text and the like).
    #[must_use]
    pub fn is_end(&self, token: Token) -> bool {
        self.model.vocab().is_eog(LlamaToken(token))
    }

    /// Vocabulary size.
    #[must_use]
    pub fn n_vocab(&self) -> usize {
        self.model.n_vocab().max(0) as usize
    }

    /// The context length the model was trained with.
    #[must_use]
    pub fn n_ctx_train(&self) -> u32 {
        self.model.n_ctx_train()
    }

    /// Transformer blocks.
    #[must_use]
    pub fn n_layer(&self) -> u32 {
        self.n_layer
    }

    /// Layers placed on GPUs (out of `n_layer() + 1`, the output layer counting as one).
    #[must_use]
    pub fn gpu_layers(&self) -> u32 {
        self.gpu_layers
    }

    /// The context size llama.cpp's fitting settled on, when it ran and chose one.
    #[must_use]
    pub fn fitted_ctx(&self) -> Option<u32> {
        self.fitted_ctx
    }

    /// Bytes of all weights.
    #[must_use]
    pub fn size_bytes(&self) -> u64 {
        self.model.size()
    }

    /// Number of weights.
    #[must_use]
    pub fn n_params(&self) -> u64 {
        self.model.n_params()
    }

    /// A string metadata value of the GGUF.
    #[must_use]
    pub fn meta(&self, key: &str) -> Option<String> {
        self.model.meta_val_str(key).ok()
    }

    /// Memory taken on each device since before the model was loaded: (device, bytes).
    /// For GPUs this is the drop in free memory; for the CPU, the process's resident memory now:
    /// the weights left on the CPU, the KV cache and buffers. Pages of the mapped file that were
    /// only read to upload them to a GPU are not counted, as llama.cpp unmaps them after loading
    /// (the peak would count them and report a fully offloaded model as if it were on the CPU).
    #[must_use]
    pub fn memory_use(&self) -> Vec<(Device, u64)> {
        self.engine
            .devices()
            .into_iter()
            .zip(self.free_before.iter().copied().chain(std::iter::repeat(0)))
            .map(|(d, before)| {
                let used = match d.kind {
                    DeviceKind::Gpu => before.saturating_sub(d.free),
                    DeviceKind::Cpu => resident_bytes().unwrap_or(0),
                };
                (d, used)
            })
            .collect()
    }

    /// A sampler for these parameters.
    #[must_use]
    pub fn sampler(&self, p: &SamplingParams) -> Sampler {
        let mut chain = Vec::new();
        if p.repeat_penalty != 1.0 {
            chain.push(LlamaSampler::penalties(
                self.model.n_vocab(),
                p.repeat_last_n,
                p.repeat_penalty,
                0.0,
                0.0,
            ));
        }
        if p.temperature <= 0.0 {
            chain.push(LlamaSampler::greedy());
        } else {
            if p.top_k > 0 {
                chain.push(LlamaSampler::top_k(p.top_k));
            }
            if p.top_p < 1.0 {
                chain.push(LlamaSampler::top_p(p.top_p, 1));
            }
            if p.min_p > 0.0 {
                chain.push(LlamaSampler::min_p(p.min_p, 1));
            }
            chain.push(LlamaSampler::temp(p.temperature));
            chain.push(LlamaSampler::dist(p.seed));
        }
        Sampler(LlamaSampler::chain_simple(chain))
    }

    /// Creates a context (KV cache, compute buffers) for this model.
    ///
    /// # Errors
    /// If llama.cpp cannot allocate it.
    pub fn session(&self, opts: &ContextOptions) -> Result<Session<'_>, EngineError> {
        let n_ctx = opts.n_ctx.unwrap_or_else(|| self.n_ctx_train());
        let mut opts = opts.clone();
        opts.n_ctx = Some(n_ctx);
        take_log();
        let ctx = self
            .model
            .new_context(&self.engine.backend, opts.context_params())
            .map_err(|_| EngineError::Context {
                n_ctx,
                log: take_log(),
            })?;
        let n_batch = ctx.n_batch() as usize;
        Ok(Session {
            n_ctx: (n_ctx as usize).min(ctx.n_ctx() as usize),
            ctx,
            batch: LlamaBatch::new(n_batch, 1),
            n_batch,
            tokens: Vec::new(),
            all_logits: opts.all_logits,
            n_vocab: self.n_vocab(),
        })
    }
}

/// Peak resident set size of this process (Linux: `VmHWM` in `/proc/self/status`).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

// ---------------------------------------------------------------------------------------------
// Sampling

/// Sampling settings. The chain is llama.cpp's usual one: repetition penalty, then greedy when
/// `temperature <= 0`, else top-k, top-p, min-p, temperature and a seeded draw.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: i32,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// 1 = off.
    pub repeat_penalty: f32,
    /// Tokens the penalty looks back on.
    pub repeat_last_n: i32,
    /// Seed of the draw.
    pub seed: u32,
}

impl SamplingParams {
    /// Greedy decoding.
    #[must_use]
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

/// A sampler chain built by [`Model::sampler`].
#[derive(Debug)]
pub struct Sampler(LlamaSampler);

impl Sampler {
    /// Feeds tokens the sampler should remember (the prompt, for the repetition penalty).
    pub fn accept(&mut self, tokens: &[Token]) {
        for &t in tokens {
            self.0.accept(LlamaToken(t));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Session

/// A context: the KV cache of one sequence and the tokens in it.
#[derive(Debug)]
pub struct Session<'m> {
    ctx: LlamaContext<'m>,
    /// The context size asked for (llama.cpp may round its own up).
    n_ctx: usize,
    batch: LlamaBatch<'static>,
    n_batch: usize,
    tokens: Vec<Token>,
    all_logits: bool,
    n_vocab: usize,
}

impl Session<'_> {
    /// Context size in tokens.
    #[must_use]
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Tokens per evaluated batch.
    #[must_use]
    pub fn n_batch(&self) -> usize {
        self.n_batch
    }

    /// The tokens in the KV cache, in order.
    #[must_use]
    pub fn tokens(&self) -> &[Token] {
        &self.tokens
    }

    /// Drops everything after the first `len` tokens from the KV cache.
    pub fn truncate(&mut self, len: usize) {
        if len < self.tokens.len() {
            // Removing a suffix of the only sequence cannot fail for a plain KV cache; if it
            // does (a model whose memory cannot be cut), start over from an empty cache.
            if self.ctx.kv_cache_seq_rm(0, Some(len as u32), None).is_err() {
                self.ctx.clear_kv_cache();
                self.tokens.clear();
                return;
            }
            self.tokens.truncate(len);
        }
    }

    /// Makes the cache hold exactly `tokens`, evaluating only what differs from what it holds,
    /// and re-evaluating at least the last token so that its logits are fresh.
    ///
    /// # Errors
    /// If the tokens do not fit in the context or llama.cpp fails.
    pub fn sync(&mut self, tokens: &[Token]) -> Result<(), EngineError> {
        let common = self
            .tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count();
        let keep = common.min(tokens.len().saturating_sub(1));
        self.truncate(keep);
        self.eval(&tokens[self.tokens.len()..], false)
    }

    /// Appends tokens to the cache and evaluates them, in batches of the context's batch size.
    /// Afterwards [`Self::logits`] gives the last token's logits (and, when `all_logits` was set
    /// for the session or `want_all` here, those of every token of the last batch).
    ///
    /// # Errors
    /// If the tokens do not fit in the context or llama.cpp fails.
    pub fn eval(&mut self, tokens: &[Token], want_all: bool) -> Result<(), EngineError> {
        let n_ctx = self.n_ctx();
        if self.tokens.len() + tokens.len() > n_ctx {
            return Err(EngineError::ContextFull {
                needed: self.tokens.len() + tokens.len(),
                n_ctx: n_ctx as u32,
            });
        }
        let all = self.all_logits || want_all;
        for chunk in tokens.chunks(self.n_batch) {
            self.batch.clear();
            let start = self.tokens.len();
            for (i, &t) in chunk.iter().enumerate() {
                let last = i + 1 == chunk.len();
                self.batch
                    .add(LlamaToken(t), (start + i) as i32, &[0], all || last)
                    .map_err(|e| EngineError::Decode {
                        pos: start,
                        msg: e.to_string(),
                        log: String::new(),
                    })?;
            }
            self.ctx
                .decode(&mut self.batch)
                .map_err(|e| EngineError::Decode {
                    pos: start,
                    msg: e.to_string(),
                    log: take_log(),
                })?;
            self.tokens.extend_from_slice(chunk);
        }
        Ok(())
    }

    /// Logits of the `i`-th token of the last evaluated batch (`None` = its last token).
    ///
    /// # Panics
    /// If that token's logits were not kept (see [`Self::eval`]).
    #[must_use]
    pub fn logits(&self, i: Option<usize>) -> &[f32] {
        let logits = match i {
            Some(i) => self.ctx.get_logits_ith(i as i32),
            None => self.ctx.get_logits_ith(-1),
        };
        &logits[..self.n_vocab.min(logits.len())]
    }

    /// Samples the next token from the last evaluated token's logits (without evaluating it).
    pub fn sample(&mut self, sampler: &mut Sampler) -> Token {
        sampler.0.sample(&self.ctx, -1).0
    }
}
