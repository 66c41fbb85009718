//! The inference engine: the one module that talks to llama.cpp.
//!
//! Everything else in the crate sees plain Rust types: token ids are `i32`, logits are `&[f32]`,
//! devices are [`Device`]s. Keeping every llama.cpp call here means one place to audit for
//! `unsafe`, one place to adapt when llama.cpp changes, and one place where its log output is
//! captured: llama.cpp's log lines become `tracing` events with the target `llama_cpp` (shown by
//! the binaries with `-v`), and its last warning and error lines are attached to the errors this
//! module returns.
//!
//! `llama-cpp-2` wraps llama.cpp safely, but its 0.1.160 keeps the raw model and context pointers
//! private and has no setter for the proportional `tensor_split`, no way to apply several LoRA
//! adapters at once and no multi-sequence KV-cache statistics. So the model, context, batch and
//! adapter handles here are thin owners of `llama-cpp-sys-2` pointers, each `unsafe` call with its
//! reason; `llama-cpp-2` still provides the backend initialisation and the sampler chains.
//!
//! Only files that passed the `convert` crate's GGUF validator should reach [`Engine::load`]:
//! llama.cpp trusts the offsets and sizes in the file it maps.
//!
//! LoRA adapters come two ways: [`LoadOptions::adapters`] are loaded with the model, owned by
//! it and applied to every context made from it (what the CLI's `--lora` uses); [`Model::lora`]
//! loads one more, which a context applies with [`Context::set_adapters`] (replacing the
//! model's own for that context), so that one model can serve several adapters.
//!
//! ```no_run
//! use falcon::engine::{ContextOptions, Engine, LoadOptions, SamplingParams};
//! let engine = Engine::init()?;
//! let model = engine.load("model.gguf".as_ref(), &LoadOptions::default())?;
//! let mut session = model.session(&ContextOptions::default())?;
//! let prompt = model.tokenize("The Falcon", true);
//! session.eval(&prompt, false)?;
//! let mut sampler = model.sampler(&SamplingParams::greedy());
//! let next = sampler.sample(session.logits(None));
//! # Ok::<(), falcon::engine::EngineError>(())
//! ```

mod context;
mod model;
mod placement;
mod rpc;
mod sampler;

use std::collections::VecDeque;
use std::ffi::{c_char, c_void, CStr};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use llama_cpp_2::llama_backend::LlamaBackend;

pub use context::{Batch, Context, ContextOptions, Session};
pub use model::{Adapter, GpuLayers, LoadOptions, Model, SplitMode};
pub use placement::{Placement, PlacementError, Slot};
pub use rpc::{parse_endpoint, probe, RpcProbe, RpcServerOptions, RPC_PROTOCOL};
pub use sampler::{Sampler, SamplingParams};

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
        "llama.cpp could not create a context of {n_ctx} tokens for {n_seq} sequence(s){}",
        detail(log)
    )]
    Context {
        /// The requested context size, per sequence.
        n_ctx: u32,
        /// Sequences.
        n_seq: u32,
        /// What llama.cpp logged.
        log: String,
    },
    /// Evaluating a batch of tokens failed.
    #[error(
        "llama.cpp failed to evaluate a batch of {n_tokens} tokens: {msg}{}",
        detail(log)
    )]
    Decode {
        /// Tokens in the batch.
        n_tokens: usize,
        /// What went wrong, from llama.cpp's return code.
        msg: String,
        /// What llama.cpp logged.
        log: String,
    },
    /// The KV cache has no room for the batch (free some sequences and try again).
    #[error("the KV cache has no room for a batch of {n_tokens} tokens")]
    NoKvSpace {
        /// Tokens in the batch.
        n_tokens: usize,
    },
    /// The tokens do not fit in the context.
    #[error("{needed} tokens do not fit in a context of {n_ctx}")]
    ContextFull {
        /// Tokens that would be in the context.
        needed: usize,
        /// The context size.
        n_ctx: u32,
    },
    /// A batch is full or was given a sequence id it cannot hold.
    #[error("batch: {0}")]
    Batch(String),
    /// Fitting the model to the free GPU memory failed.
    #[error("could not fit the model into free GPU memory{}", detail(log))]
    Fit {
        /// What llama.cpp logged.
        log: String,
    },
    /// A path that llama.cpp cannot take (it wants UTF-8 without NUL).
    #[error("path {} is not valid UTF-8 or contains a NUL byte; rename or move the file", .0.display())]
    Path(PathBuf),
    /// Where layers go could not be worked out (bad shares, missing devices).
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// A GPU index that does not exist.
    #[error("GPU {index} does not exist: there are {count} GPU(s)")]
    NoSuchGpu {
        /// The index asked for.
        index: u32,
        /// GPUs present.
        count: usize,
    },
    /// A LoRA adapter could not be loaded or applied.
    #[error("llama.cpp could not load the LoRA adapter {}{}", path.display(), detail(log))]
    Adapter {
        /// The adapter file.
        path: PathBuf,
        /// What llama.cpp logged.
        log: String,
    },
    /// The adapters could not be set on a context.
    #[error(
        "llama.cpp could not apply the LoRA adapters (code {code}){}",
        detail(log)
    )]
    SetAdapters {
        /// llama.cpp's return code.
        code: i32,
        /// What llama.cpp logged.
        log: String,
    },
    /// This build has no RPC backend.
    #[error("this build has no RPC backend (it was built without GGML_RPC=ON)")]
    NoRpc,
    /// An RPC worker could not be used.
    #[error("RPC worker {endpoint}: {why}")]
    Rpc {
        /// `host:port`.
        endpoint: String,
        /// What went wrong.
        why: String,
    },
    /// An RPC worker speaks another protocol version.
    #[error("RPC worker {endpoint} speaks protocol {theirs}, this build speaks {ours}")]
    RpcVersion {
        /// `host:port`.
        endpoint: String,
        /// The worker's version.
        theirs: String,
        /// Ours.
        ours: String,
    },
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

/// The last warning/error lines llama.cpp logged, to attach to errors.
static RECENT: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());
/// Every warning/error line llama.cpp logged while the backends were initialised, for the
/// no-usable-GPU notice.
static INIT_LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// The current line being assembled from llama.cpp's fragments, and its level.
static PENDING: Mutex<(String, u32)> = Mutex::new((String::new(), 0));
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
    let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    // Continuation fragments keep the level of the line they continue.
    if level != llama_cpp_sys_2::GGML_LOG_LEVEL_CONT {
        pending.1 = level;
    }
    pending.0.push_str(&text);
    while let Some(nl) = pending.0.find('\n') {
        let line: String = pending.0.drain(..=nl).collect();
        log_line(pending.1, line.trim_end());
    }
}

fn log_line(level: u32, line: &str) {
    if line.trim().is_empty() {
        return;
    }
    match level {
        llama_cpp_sys_2::GGML_LOG_LEVEL_ERROR => {
            tracing::debug!(target: "llama_cpp", "error: {line}")
        }
        llama_cpp_sys_2::GGML_LOG_LEVEL_WARN => {
            tracing::debug!(target: "llama_cpp", "warning: {line}")
        }
        _ => tracing::trace!(target: "llama_cpp", "{line}"),
    }
    if level == llama_cpp_sys_2::GGML_LOG_LEVEL_ERROR
        || level == llama_cpp_sys_2::GGML_LOG_LEVEL_WARN
    {
        let line = line.trim().to_string();
        let mut recent = RECENT.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT_LINES {
            recent.pop_front();
        }
        recent.push_back(line.clone());
        if INITIALISING.load(std::sync::atomic::Ordering::Relaxed) {
            INIT_LOG
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(line);
        }
    }
}

static INITIALISING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Takes (and clears) the warning and error lines llama.cpp logged since the last call.
pub(crate) fn take_log() -> String {
    let mut recent = RECENT.lock().unwrap_or_else(|e| e.into_inner());
    let lines: Vec<String> = recent.drain(..).collect();
    lines.join("; ")
}

// ---------------------------------------------------------------------------------------------
// Fatal errors inside ggml

/// What ggml reported when it gave up (it aborts the process after the handler returns).
#[derive(Debug, Clone)]
pub struct Fatal {
    /// ggml's message.
    pub message: String,
    /// RPC workers that no longer accept connections, when some were in use.
    pub dead_workers: Vec<String>,
}

impl Fatal {
    /// What happened, for a message: the workers that stopped answering, or ggml's reason.
    #[must_use]
    pub fn reason(&self) -> String {
        if self.dead_workers.is_empty() {
            format!("llama.cpp gave up: {}", self.message)
        } else {
            format!(
                "RPC worker {} stopped answering ({})",
                self.dead_workers.join(", "),
                self.message
            )
        }
    }
}

type FatalHandler = Box<dyn Fn(&Fatal) + Send + Sync>;
static FATAL_HANDLER: OnceLock<FatalHandler> = OnceLock::new();

unsafe extern "C" fn abort_callback(message: *const c_char) {
    let message = if message.is_null() {
        String::new()
    } else {
        // SAFETY: ggml passes a NUL-terminated message valid during the call.
        unsafe { CStr::from_ptr(message) }
            .to_string_lossy()
            .trim()
            .to_string()
    };
    let fatal = Fatal {
        dead_workers: rpc::unreachable_workers(),
        message,
    };
    if let Some(handler) = FATAL_HANDLER.get() {
        handler(&fatal);
    }
}

/// Installs what runs when ggml hits an unrecoverable error (an RPC worker that died, a failed
/// assertion): it gets ggml's message and the RPC workers that no longer answer. ggml aborts the
/// process when the handler returns, so a handler either ends the process itself (with a clear
/// message and exit status) or never returns (a server can park the thread that owned the model
/// and keep answering `/health`). Only the first call installs a handler.
pub fn on_fatal(handler: impl Fn(&Fatal) + Send + Sync + 'static) {
    if FATAL_HANDLER.set(Box::new(handler)).is_ok() {
        // SAFETY: `abort_callback` is a plain function that lives for the whole program and only
        // reads the message during the call.
        unsafe {
            llama_cpp_sys_2::ggml_set_abort_callback(Some(abort_callback));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Engine and devices

/// What kind of device a [`Device`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The host CPU.
    Cpu,
    /// A local GPU (or another accelerator that holds layers).
    Gpu,
    /// A device of an RPC worker on another machine (or process).
    Remote,
}

/// A device llama.cpp can place tensors on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Device {
    /// ggml's name for it, e.g. `CUDA0` or `RPC0[10.0.0.2:50052]`.
    pub name: String,
    /// A human description, e.g. `NVIDIA H100 80GB HBM3`.
    pub description: String,
    /// CPU, GPU or remote.
    pub kind: DeviceKind,
    /// The backend that drives it (`CPU`, `CUDA`, `RPC`, ...).
    pub backend: String,
    /// Free memory in bytes.
    pub free: u64,
    /// Total memory in bytes.
    pub total: u64,
    /// ggml's index of the device (stable for the life of the process).
    #[serde(skip)]
    pub(crate) index: usize,
}

/// A backend (ggml "registry") and how many devices it found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackendInfo {
    /// `CPU`, `CUDA`, `Vulkan`, `RPC`, ...
    pub name: String,
    /// Devices it offers.
    pub devices: usize,
}

/// The backends that drive GPUs (everything but the CPU, BLAS-like accelerators and RPC).
fn is_gpu_backend(name: &str) -> bool {
    !matches!(name, "CPU" | "RPC" | "BLAS" | "AMX" | "ZenDNN")
}

/// The initialised llama.cpp backend. One per process.
#[derive(Debug)]
pub struct Engine {
    _backend: LlamaBackend,
    /// GPU backends this build carries that may not have loaded (the dynamic-backends build's
    /// libraries beside the executable).
    gpu_libraries: Vec<String>,
}

impl Engine {
    /// Initialises llama.cpp (loading its backends, with the `dynamic-backends` build) and routes
    /// its logs through `tracing`.
    ///
    /// # Errors
    /// If llama.cpp was already initialised in this process.
    pub fn init() -> Result<Self, EngineError> {
        // SAFETY: `log_callback` is a plain function that lives for the whole program and only
        // reads the pointer it is given during the call; the user-data pointer is unused.
        unsafe {
            llama_cpp_sys_2::llama_log_set(Some(log_callback), std::ptr::null_mut());
            llama_cpp_sys_2::ggml_log_set(Some(log_callback), std::ptr::null_mut());
        }
        INITIALISING.store(true, std::sync::atomic::Ordering::Relaxed);
        // Backend libraries are looked for where this build put them, beside the executable
        // (a binary copied to another machine with its libraries) and in the current directory.
        #[cfg(feature = "dynamic-backends")]
        // SAFETY: loads ggml's backend modules; called once, before any device is used.
        unsafe {
            llama_cpp_sys_2::ggml_backend_load_all();
        }
        let backend = LlamaBackend::init().map_err(|e| EngineError::Init(e.to_string()));
        // Static GPU backends initialise their devices lazily, at the first device query.
        let _ = device_count();
        INITIALISING.store(false, std::sync::atomic::Ordering::Relaxed);
        let engine = Self {
            _backend: backend?,
            gpu_libraries: gpu_libraries_beside_executable(),
        };
        engine.explain_unloaded_libraries();
        Ok(engine)
    }

    /// All devices, CPU included, with their current free memory.
    #[must_use]
    pub fn devices(&self) -> Vec<Device> {
        devices()
    }

    /// The local GPUs.
    #[must_use]
    pub fn gpus(&self) -> Vec<Device> {
        devices()
            .into_iter()
            .filter(|d| d.kind == DeviceKind::Gpu)
            .collect()
    }

    /// Whether layers can go anywhere but the CPU (a local GPU or an RPC worker).
    #[must_use]
    pub fn can_offload(&self) -> bool {
        devices().iter().any(|d| d.kind != DeviceKind::Cpu)
    }

    /// The backends registered in this process.
    #[must_use]
    pub fn backends(&self) -> Vec<BackendInfo> {
        // SAFETY: plain queries of ggml's registry, which lives for the whole process.
        let n = unsafe { llama_cpp_sys_2::ggml_backend_reg_count() };
        (0..n)
            .filter_map(|i| {
                // SAFETY: `i` is below the registry's count.
                let reg = unsafe { llama_cpp_sys_2::ggml_backend_reg_get(i) };
                if reg.is_null() {
                    return None;
                }
                // SAFETY: `reg` is a registered backend; its name is a static string.
                let name = unsafe { cstr(llama_cpp_sys_2::ggml_backend_reg_name(reg)) };
                // SAFETY: as above.
                let devices = unsafe { llama_cpp_sys_2::ggml_backend_reg_dev_count(reg) };
                Some(BackendInfo { name, devices })
            })
            .collect()
    }

    /// One line saying that this build can use a GPU but none is usable here, with llama.cpp's
    /// reason; `None` when a GPU is in use or the build has no GPU backend at all.
    #[must_use]
    pub fn gpu_notice(&self) -> Option<String> {
        let init_log = INIT_LOG.lock().unwrap_or_else(|e| e.into_inner()).clone();
        gpu_notice(&self.compiled_gpu_backends(), &self.backends(), &init_log)
    }

    /// ggml loads backend libraries silently in release builds: for a GPU library that is
    /// present but did not register, load it once more here to learn why (the loader's
    /// message, e.g. a missing `libcuda.so.1`), for [`Engine::gpu_notice`].
    fn explain_unloaded_libraries(&self) {
        let registered: Vec<String> = self
            .backends()
            .into_iter()
            .map(|b| b.name.to_ascii_lowercase())
            .collect();
        for (label, path) in gpu_library_paths() {
            if registered.contains(&label.to_ascii_lowercase()) {
                continue;
            }
            if let Some(why) = dlopen_error(&path) {
                INIT_LOG
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(format!("{label}: cannot load {}: {why}", path.display()));
            }
        }
    }

    /// GPU backends this build was compiled with or carries as libraries.
    fn compiled_gpu_backends(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        if cfg!(feature = "cuda") {
            v.push("CUDA".into());
        }
        v.extend(self.gpu_libraries.iter().cloned());
        v
    }
}

/// The notice of [`Engine::gpu_notice`], from facts that tests can make up: the GPU backends
/// the build has (`compiled`, e.g. `["CUDA"]`), the backends registered with their device counts,
/// and the warning/error lines llama.cpp logged while initialising.
#[must_use]
pub fn gpu_notice(
    compiled: &[String],
    backends: &[BackendInfo],
    init_log: &[String],
) -> Option<String> {
    if backends
        .iter()
        .any(|b| is_gpu_backend(&b.name) && b.devices > 0)
    {
        return None;
    }
    // A GPU backend registered without devices, or compiled in (or beside the executable) and
    // not registered at all (its library failed to load).
    let registered_empty = backends
        .iter()
        .find(|b| is_gpu_backend(&b.name) && b.devices == 0)
        .map(|b| b.name.clone());
    let name = registered_empty.or_else(|| compiled.first().cloned())?;
    let lower = name.to_ascii_lowercase();
    let reason = init_log
        .iter()
        .rev()
        .find(|l| l.to_ascii_lowercase().contains(&lower))
        .or_else(|| init_log.last())
        .map_or_else(|| "no device found".to_string(), |l| clean_reason(l));
    Some(format!(
        "{name} build, but no usable GPU: {reason}; running on the CPU"
    ))
}

/// `ggml_cuda_init: failed to initialize CUDA: no CUDA-capable device is detected` → the part
/// after the function name.
fn clean_reason(line: &str) -> String {
    let line = line.trim();
    match line.split_once(": ") {
        Some((head, rest)) if !head.contains(' ') => rest.trim().to_string(),
        _ => line.to_string(),
    }
}

/// `libggml-cuda.so` and the like beside the executable or in the current directory (where
/// ggml's loader looks): the GPU backends a dynamic-backends build carries, with their files.
fn gpu_library_paths() -> Vec<(&'static str, PathBuf)> {
    if !cfg!(feature = "dynamic-backends") {
        return Vec::new();
    }
    const KNOWN: [(&str, &str); 6] = [
        ("cuda", "CUDA"),
        ("vulkan", "Vulkan"),
        ("hip", "ROCm"),
        ("sycl", "SYCL"),
        ("metal", "Metal"),
        ("opencl", "OpenCL"),
    ];
    let dirs = [
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(std::path::Path::to_path_buf)),
        std::env::current_dir().ok(),
    ];
    let mut found: Vec<(&'static str, PathBuf)> = Vec::new();
    for dir in dirs.into_iter().flatten() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().to_ascii_lowercase();
            for (stem, label) in KNOWN {
                if name.starts_with(&format!("libggml-{stem}"))
                    && name.ends_with(".so")
                    && !found.iter().any(|(l, _)| *l == label)
                {
                    found.push((label, e.path()));
                }
            }
        }
    }
    found
}

fn gpu_libraries_beside_executable() -> Vec<String> {
    gpu_library_paths()
        .into_iter()
        .map(|(label, _)| label.to_string())
        .collect()
}

/// The dynamic loader's reason for refusing a library, or `None` when it loads.
fn dlopen_error(path: &std::path::Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: dlopen with a NUL-terminated path; a handle that opens is closed at once, and
    // dlerror's message is copied before any other dl call.
    unsafe {
        let handle = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if handle.is_null() {
            let e = libc::dlerror();
            Some(if e.is_null() {
                "unknown error".to_string()
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            })
        } else {
            libc::dlclose(handle);
            None
        }
    }
}

fn device_count() -> usize {
    // SAFETY: a plain query of ggml's device registry.
    unsafe { llama_cpp_sys_2::ggml_backend_dev_count() }
}

/// # Safety
/// `p` is null or a NUL-terminated string valid for the call.
unsafe fn cstr(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: guaranteed by the caller.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

fn devices() -> Vec<Device> {
    (0..device_count())
        .filter_map(|index| {
            // SAFETY: `index` is below the device count; devices live for the whole process.
            let dev = unsafe { llama_cpp_sys_2::ggml_backend_dev_get(index) };
            if dev.is_null() {
                return None;
            }
            // SAFETY: `dev` is a registered device; the strings it returns are owned by it.
            let (mut name, description, ty, reg) = unsafe {
                (
                    cstr(llama_cpp_sys_2::ggml_backend_dev_name(dev)),
                    cstr(llama_cpp_sys_2::ggml_backend_dev_description(dev)),
                    llama_cpp_sys_2::ggml_backend_dev_type(dev),
                    llama_cpp_sys_2::ggml_backend_dev_backend_reg(dev),
                )
            };
            let backend = if reg.is_null() {
                String::new()
            } else {
                // SAFETY: `reg` is the device's registry; its name is a static string.
                unsafe { cstr(llama_cpp_sys_2::ggml_backend_reg_name(reg)) }
            };
            let kind = if backend == "RPC" {
                // ggml names remote devices RPC0, RPC1, ...: add the worker they belong to.
                if let Some(endpoint) = rpc::endpoint_of(dev) {
                    name = format!("{name}[{endpoint}]");
                }
                DeviceKind::Remote
            } else {
                match ty {
                    llama_cpp_sys_2::GGML_BACKEND_DEVICE_TYPE_CPU => DeviceKind::Cpu,
                    llama_cpp_sys_2::GGML_BACKEND_DEVICE_TYPE_GPU
                    | llama_cpp_sys_2::GGML_BACKEND_DEVICE_TYPE_IGPU => DeviceKind::Gpu,
                    // Accelerators (BLAS, AMX) only speed up the CPU's work.
                    _ => return None,
                }
            };
            let (mut free, mut total) = (0usize, 0usize);
            // SAFETY: `dev` is valid and both pointers point to writable usizes.
            unsafe { llama_cpp_sys_2::ggml_backend_dev_memory(dev, &mut free, &mut total) };
            Some(Device {
                name,
                description,
                kind,
                backend,
                free: free as u64,
                total: total as u64,
                index,
            })
        })
        .collect()
}

/// Resident set size of this process now (Linux: `VmRSS` in `/proc/self/status`).
pub(crate) fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Memory the system can give this process now (Linux: `MemAvailable`).
#[must_use]
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(name: &str, devices: usize) -> BackendInfo {
        BackendInfo {
            name: name.into(),
            devices,
        }
    }

    #[test]
    fn a_gpu_backend_without_devices_is_announced_with_llama_cpp_reason() {
        let log = vec![
            "ggml_cuda_init: failed to initialize CUDA: CUDA driver is a stub library".to_string(),
        ];
        let notice = gpu_notice(&["CUDA".into()], &[b("CUDA", 0), b("CPU", 1)], &log).unwrap();
        assert_eq!(
            notice,
            "CUDA build, but no usable GPU: failed to initialize CUDA: CUDA driver is a stub library; running on the CPU"
        );
    }

    #[test]
    fn a_gpu_library_that_failed_to_load_is_announced() {
        let log = vec![
            "load_backend: failed to load /opt/falcon/libggml-cuda.so: libcuda.so.1: cannot open shared object file: No such file or directory".to_string(),
        ];
        let notice = gpu_notice(&["CUDA".into()], &[b("CPU", 1)], &log).unwrap();
        assert!(
            notice.starts_with("CUDA build, but no usable GPU: "),
            "{notice}"
        );
        assert!(notice.contains("libcuda.so.1"), "{notice}");
        assert!(notice.ends_with("; running on the CPU"), "{notice}");
    }

    #[test]
    fn no_notice_when_a_gpu_works_or_the_build_has_none() {
        assert_eq!(
            gpu_notice(&["CUDA".into()], &[b("CUDA", 1), b("CPU", 1)], &[]),
            None
        );
        assert_eq!(gpu_notice(&[], &[b("CPU", 1)], &[]), None);
        // An RPC worker is not a local GPU, and a CPU build that uses one has nothing to say.
        assert_eq!(gpu_notice(&[], &[b("CPU", 1), b("RPC", 0)], &[]), None);
    }

    #[test]
    fn a_reason_is_given_even_when_llama_cpp_logged_none() {
        let notice = gpu_notice(&[], &[b("Vulkan", 0), b("CPU", 1)], &[]).unwrap();
        assert_eq!(
            notice,
            "Vulkan build, but no usable GPU: no device found; running on the CPU"
        );
    }
}
