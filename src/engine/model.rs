//! Loading a model: placement over devices, the model handle, its vocabulary and LoRA adapters.

use std::ffi::{c_char, CString};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use super::context::{Context, ContextOptions, Session};
use super::placement::{self, Placement, Slot};
use super::sampler::{Sampler, SamplingParams};
use super::{devices, take_log, Device, DeviceKind, Engine, EngineError, Token};

/// Memory llama.cpp's fitting leaves free on each GPU (its own default is 1 GiB).
const FIT_MARGIN_BYTES: usize = 1 << 30;

/// How many layers go to GPUs (or RPC workers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuLayers {
    /// As many as free memory allows; none without a device to offload to.
    #[default]
    Auto,
    /// All of them.
    All,
    /// The last `n` of the `n_layer + 1` (llama.cpp's convention: the output layer counts).
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
    /// Layers on GPUs and workers.
    pub gpu_layers: GpuLayers,
    /// GPU for small tensors and scratch.
    pub main_gpu: Option<u32>,
    /// Split across GPUs.
    pub split_mode: SplitMode,
    /// Shares of the offloaded layers: local devices first (the GPUs, or the CPU on a machine
    /// without one), then RPC workers in the order they were added.
    pub tensor_split: Option<Vec<f32>>,
    /// Map the file instead of reading it.
    pub mmap: bool,
    /// Lock the weights in RAM.
    pub mlock: bool,
    /// The context that will be created (the fitting accounts for its memory).
    pub context: ContextOptions,
    /// GGUF LoRA adapters, with their scales, loaded with the model and applied to every
    /// context made from it (a context can change them with [`Context::set_adapters`]).
    pub adapters: Vec<(PathBuf, f32)>,
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
            adapters: Vec::new(),
        }
    }
}

/// `llama_model_params` with the arrays its pointers point into.
pub(crate) struct ModelParams {
    pub(crate) raw: llama_cpp_sys_2::llama_model_params,
    // Boxed so that the pointers in `raw` stay valid when this struct moves.
    devices: Box<[llama_cpp_sys_2::ggml_backend_dev_t]>,
    tensor_split: Box<[f32]>,
    buft_overrides: Box<[llama_cpp_sys_2::llama_model_tensor_buft_override]>,
}

impl std::fmt::Debug for ModelParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelParams")
            .field("n_gpu_layers", &self.raw.n_gpu_layers)
            .field("tensor_split", &self.tensor_split)
            .finish_non_exhaustive()
    }
}

impl ModelParams {
    /// Builds the parameters of a placement; `device` turns a ggml device index into its handle.
    pub(crate) fn new(
        placement: &Placement,
        opts: &LoadOptions,
        device: impl Fn(usize) -> llama_cpp_sys_2::ggml_backend_dev_t,
    ) -> Self {
        // SAFETY: returns a plain struct of defaults.
        let mut raw = unsafe { llama_cpp_sys_2::llama_model_default_params() };
        // SAFETY: a plain query.
        let max_devices = unsafe { llama_cpp_sys_2::llama_max_devices() }.max(1);
        let mut devices: Vec<_> = placement.devices.iter().map(|&i| device(i)).collect();
        // NULL-terminated; an empty list (just the NULL) means "no device": CPU only.
        devices.push(std::ptr::null_mut());
        let mut tensor_split = vec![0f32; max_devices];
        for (slot, share) in tensor_split.iter_mut().zip(&placement.split) {
            *slot = *share;
        }
        let mut p = ModelParams {
            raw: {
                raw.load_mode = match (opts.mmap, opts.mlock) {
                    (true, false) => llama_cpp_sys_2::LLAMA_LOAD_MODE_MMAP,
                    (true, true) => llama_cpp_sys_2::LLAMA_LOAD_MODE_MMAP_MLOCK,
                    (false, false) => llama_cpp_sys_2::LLAMA_LOAD_MODE_NONE,
                    (false, true) => llama_cpp_sys_2::LLAMA_LOAD_MODE_MLOCK,
                };
                raw.split_mode = match opts.split_mode {
                    SplitMode::Layer => llama_cpp_sys_2::LLAMA_SPLIT_MODE_LAYER,
                    SplitMode::Row => llama_cpp_sys_2::LLAMA_SPLIT_MODE_ROW,
                };
                if let Some(g) = opts.main_gpu {
                    raw.main_gpu = g as i32;
                }
                if let Some(n) = placement.gpu_layers {
                    raw.n_gpu_layers = n as i32;
                }
                raw
            },
            devices: devices.into_boxed_slice(),
            tensor_split: tensor_split.into_boxed_slice(),
            buft_overrides: Box::new([]),
        };
        p.raw.devices = p.devices.as_mut_ptr();
        if !placement.split.is_empty() {
            p.raw.tensor_split = p.tensor_split.as_ptr();
        }
        p
    }

    /// Runs llama.cpp's fitting (`common_fit_params`): it picks the GPU layers, split and
    /// context size that fit the free memory. Returns the context size it chose.
    fn fit(
        &mut self,
        path: &CString,
        context: &ContextOptions,
        n_devices: usize,
    ) -> Result<Option<u32>, EngineError> {
        // SAFETY: plain queries.
        let (max_devices, max_buft) = unsafe {
            (
                llama_cpp_sys_2::llama_max_devices(),
                llama_cpp_sys_2::llama_max_tensor_buft_overrides(),
            )
        };
        let mut split = vec![0f32; max_devices.max(1)].into_boxed_slice();
        let mut bufts = vec![
            llama_cpp_sys_2::llama_model_tensor_buft_override {
                pattern: std::ptr::null(),
                buft: std::ptr::null_mut(),
            };
            max_buft + 1
        ]
        .into_boxed_slice();
        let mut margins = vec![FIT_MARGIN_BYTES; max_devices.max(n_devices + 1)];
        let mut cparams = context.raw(1);
        self.raw.tensor_split = std::ptr::null();
        self.raw.tensor_buft_overrides = std::ptr::null();
        // SAFETY: every pointer is valid for the call: the path is NUL-terminated, the params
        // are owned here, `split` has llama_max_devices() entries, `bufts` has room for
        // llama_max_tensor_buft_overrides() entries and its NULL terminator, `margins` one entry
        // per device.
        let status = unsafe {
            llama_cpp_sys_2::llama_rs_fit_params(
                path.as_ptr(),
                &mut self.raw,
                &mut cparams,
                split.as_mut_ptr(),
                bufts.as_mut_ptr(),
                margins.as_mut_ptr(),
                context.n_ctx.unwrap_or(0),
                std::ptr::null(),
                llama_cpp_sys_2::GGML_LOG_LEVEL_ERROR,
            )
        };
        if status != 0 {
            return Err(EngineError::Fit { log: take_log() });
        }
        self.tensor_split = split;
        self.buft_overrides = bufts;
        self.raw.tensor_split = self.tensor_split.as_ptr();
        self.raw.tensor_buft_overrides = self.buft_overrides.as_ptr();
        Ok(NonZeroU32::new(cparams.n_ctx).map(NonZeroU32::get))
    }

    /// The shares llama.cpp will read (for tests and reports).
    #[cfg(test)]
    pub(crate) fn tensor_split(&self) -> Option<&[f32]> {
        if self.raw.tensor_split.is_null() {
            None
        } else {
            Some(&self.tensor_split)
        }
    }
}

pub(crate) fn c_path(path: &Path) -> Result<CString, EngineError> {
    path.to_str()
        .and_then(|s| CString::new(s).ok())
        .ok_or_else(|| EngineError::Path(path.to_path_buf()))
}

impl Engine {
    /// Decides where the layers of a model of `n_layer` blocks go, without loading it.
    ///
    /// # Errors
    /// Shares that do not fit the devices.
    pub fn placement(&self, n_layer: u32, opts: &LoadOptions) -> Result<Placement, EngineError> {
        let all = devices();
        let slot = |d: &Device| Slot {
            index: Some(d.index),
            name: d.name.clone(),
            free: d.free,
        };
        let mut local: Vec<Slot> = all
            .iter()
            .filter(|d| d.kind == DeviceKind::Gpu)
            .map(slot)
            .collect();
        let remote: Vec<Slot> = all
            .iter()
            .filter(|d| d.kind == DeviceKind::Remote)
            .map(slot)
            .collect();
        if local.is_empty() {
            local.push(Slot {
                index: None,
                name: "CPU".into(),
                free: super::available_memory().unwrap_or(0),
            });
        }
        Ok(placement::place(
            n_layer,
            &local,
            &remote,
            opts.gpu_layers,
            opts.tensor_split.as_deref(),
        )?)
    }

    /// Loads a GGUF file (which must have passed validation) with the given placement.
    ///
    /// # Errors
    /// If llama.cpp rejects the file, the placement does not fit, or the path is not UTF-8.
    pub fn load(&self, path: &Path, opts: &LoadOptions) -> Result<Model<'_>, EngineError> {
        let cpath = c_path(path)?;
        take_log();
        let n_gpus = self.gpus().len();
        if let Some(main) = opts.main_gpu {
            if main as usize >= n_gpus.max(1) {
                return Err(EngineError::NoSuchGpu {
                    index: main,
                    count: n_gpus,
                });
            }
        }
        let n_layer = gguf_block_count(path).unwrap_or(0);
        let placement = self.placement(n_layer, opts)?;
        // SAFETY: `i` comes from the device list, below ggml_backend_dev_count().
        let mut params = ModelParams::new(&placement, opts, |i| unsafe {
            llama_cpp_sys_2::ggml_backend_dev_get(i)
        });
        let mut fitted_ctx = None;
        if placement.gpu_layers.is_none() {
            fitted_ctx = params.fit(&cpath, &opts.context, placement.devices.len())?;
        }
        let free_before: Vec<(String, u64)> =
            devices().into_iter().map(|d| (d.name, d.free)).collect();
        // SAFETY: the path is NUL-terminated and `params.raw`'s pointers point into `params`,
        // which outlives the call.
        let raw =
            unsafe { llama_cpp_sys_2::llama_model_load_from_file(cpath.as_ptr(), params.raw) };
        let raw = NonNull::new(raw).ok_or_else(|| EngineError::Load {
            path: path.to_path_buf(),
            log: take_log(),
        })?;
        let mut model = Model::new(self, raw, params.raw.n_gpu_layers, free_before, fitted_ctx);
        model.placement = placement;
        for (path, scale) in &opts.adapters {
            // On failure the model drops, freeing the adapters loaded so far and itself.
            let raw = model.lora_raw(path)?;
            model.adapters.push((raw, *scale));
        }
        Ok(model)
    }

    /// Loads only the tokenizer and metadata of a GGUF file (e.g. one written with
    /// `falcon-quantize --vocab-only`): enough to tokenize, not to evaluate.
    ///
    /// # Errors
    /// If llama.cpp rejects the file.
    pub fn load_vocab_only(&self, path: &Path) -> Result<Model<'_>, EngineError> {
        let cpath = c_path(path)?;
        take_log();
        // SAFETY: returns a plain struct of defaults.
        let mut params = unsafe { llama_cpp_sys_2::llama_model_default_params() };
        params.vocab_only = true;
        // SAFETY: the path is NUL-terminated; the params hold no pointers.
        let raw = unsafe { llama_cpp_sys_2::llama_model_load_from_file(cpath.as_ptr(), params) };
        let raw = NonNull::new(raw).ok_or_else(|| EngineError::Load {
            path: path.to_path_buf(),
            log: take_log(),
        })?;
        Ok(Model::new(self, raw, 0, Vec::new(), None))
    }
}

/// `falcon.block_count` of a (validated) GGUF, for placing layers before llama.cpp loads it.
fn gguf_block_count(path: &Path) -> Option<u32> {
    let r = convert::gguf::GgufReader::open(path).ok()?;
    let v = r.get(convert::gguf::keys::BLOCK_COUNT)?.as_u64()?;
    u32::try_from(v).ok()
}

/// A loaded model. It can be shared between threads: llama.cpp only reads a model after
/// loading it, and its tokenizer is safe to call from several threads at once.
#[derive(Debug)]
pub struct Model<'e> {
    engine: &'e Engine,
    raw: NonNull<llama_cpp_sys_2::llama_model>,
    vocab: NonNull<llama_cpp_sys_2::llama_vocab>,
    gpu_layers: u32,
    n_layer: u32,
    free_before: Vec<(String, u64)>,
    fitted_ctx: Option<u32>,
    placement: Placement,
    /// The adapters of [`LoadOptions::adapters`], owned by the model and freed before it.
    adapters: Vec<(NonNull<llama_cpp_sys_2::llama_adapter_lora>, f32)>,
}

// SAFETY: llama.cpp does not mutate a model after loading it; contexts and adapters created from
// it keep their own state. llama-server shares one model between threads in the same way.
unsafe impl Send for Model<'_> {}
// SAFETY: as above: every method of `Model` only reads the model.
unsafe impl Sync for Model<'_> {}

impl Drop for Model<'_> {
    fn drop(&mut self) {
        for (raw, _) in self.adapters.drain(..) {
            // SAFETY: the model's own adapters, loaded for it and freed once, before it; the
            // contexts that use them borrow the model, so none is alive any more.
            unsafe { llama_cpp_sys_2::llama_adapter_lora_free(raw.as_ptr()) }
        }
        // SAFETY: the model was loaded by llama_model_load_from_file and is freed once; contexts
        // and adapters borrow it, so none outlives it.
        unsafe { llama_cpp_sys_2::llama_model_free(self.raw.as_ptr()) }
    }
}

impl<'e> Model<'e> {
    fn new(
        engine: &'e Engine,
        raw: NonNull<llama_cpp_sys_2::llama_model>,
        requested_gpu_layers: i32,
        free_before: Vec<(String, u64)>,
        fitted_ctx: Option<u32>,
    ) -> Self {
        // SAFETY: `raw` is a loaded model.
        let vocab = unsafe { llama_cpp_sys_2::llama_model_get_vocab(raw.as_ptr()) };
        // SAFETY: as above.
        let n_layer = unsafe { llama_cpp_sys_2::llama_model_n_layer(raw.as_ptr()) }.max(0) as u32;
        let offload = engine.can_offload();
        let gpu_layers = if !offload {
            0
        } else if requested_gpu_layers < 0 {
            n_layer + 1
        } else {
            (requested_gpu_layers as u32).min(n_layer + 1)
        };
        Model {
            engine,
            raw,
            vocab: NonNull::new(vocab.cast_mut()).expect("a loaded model has a vocabulary"),
            gpu_layers,
            n_layer,
            free_before,
            fitted_ctx,
            placement: Placement {
                devices: Vec::new(),
                names: Vec::new(),
                split: Vec::new(),
                gpu_layers: Some(0),
            },
            adapters: Vec::new(),
        }
    }

    pub(crate) fn raw(&self) -> *mut llama_cpp_sys_2::llama_model {
        self.raw.as_ptr()
    }

    /// The engine this model was loaded by.
    #[must_use]
    pub fn engine(&self) -> &'e Engine {
        self.engine
    }

    /// Tokenizes text as the model's tokenizer does (special tokens in the text are parsed as
    /// such, like Hugging Face tokenizers do); `add_special` adds BOS/EOS where the GGUF asks.
    #[must_use]
    pub fn tokenize(&self, text: &str, add_special: bool) -> Vec<Token> {
        self.tokenize_with(text, add_special, true)
    }

    /// Tokenizes text; `parse_special = false` reads special tokens written in the text
    /// (`<|endoftext|>`) as plain text.
    #[must_use]
    pub fn tokenize_with(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<Token> {
        let Ok(len) = i32::try_from(text.len()) else {
            return Vec::new();
        };
        let mut out: Vec<Token> = vec![0; text.len() + 2];
        loop {
            // SAFETY: `text` is valid for `len` bytes; `out` has room for `out.len()` tokens.
            let n = unsafe {
                llama_cpp_sys_2::llama_tokenize(
                    self.vocab.as_ptr(),
                    text.as_ptr().cast::<c_char>(),
                    len,
                    out.as_mut_ptr(),
                    i32::try_from(out.len()).unwrap_or(i32::MAX),
                    add_special,
                    parse_special,
                )
            };
            if n >= 0 {
                out.truncate(n as usize);
                return out;
            }
            if n == i32::MIN {
                return Vec::new();
            }
            out.resize((-n) as usize, 0);
        }
    }

    /// The bytes a token stands for; special tokens (`>>TITLE<<`, ...) as their text, as Hugging
    /// Face's `decode` without `skip_special_tokens` writes them.
    #[must_use]
    pub fn token_bytes(&self, token: Token) -> Vec<u8> {
        let mut buf = vec![0u8; 32];
        loop {
            // SAFETY: `buf` has room for `buf.len()` bytes.
            let n = unsafe {
                llama_cpp_sys_2::llama_token_to_piece(
                    self.vocab.as_ptr(),
                    token,
                    buf.as_mut_ptr().cast::<c_char>(),
                    i32::try_from(buf.len()).unwrap_or(i32::MAX),
                    0,
                    true,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize((-n) as usize, 0);
        }
    }

    /// Whether the token ends generation (end-of-text and the like).
    #[must_use]
    pub fn is_end(&self, token: Token) -> bool {
        // SAFETY: a read of the vocabulary; out-of-range ids are handled by llama.cpp.
        self.valid(token)
            && unsafe { llama_cpp_sys_2::llama_vocab_is_eog(self.vocab.as_ptr(), token) }
    }

    /// Whether the token is a control (special) token.
    #[must_use]
    pub fn is_special(&self, token: Token) -> bool {
        // SAFETY: as above.
        self.valid(token)
            && unsafe { llama_cpp_sys_2::llama_vocab_is_control(self.vocab.as_ptr(), token) }
    }

    fn valid(&self, token: Token) -> bool {
        token >= 0 && (token as usize) < self.n_vocab()
    }

    /// Vocabulary size.
    #[must_use]
    pub fn n_vocab(&self) -> usize {
        // SAFETY: a read of the vocabulary.
        unsafe { llama_cpp_sys_2::llama_vocab_n_tokens(self.vocab.as_ptr()) }.max(0) as usize
    }

    /// The end-of-text token, if the vocabulary has one.
    #[must_use]
    pub fn eos(&self) -> Option<Token> {
        // SAFETY: a read of the vocabulary; it returns -1 (LLAMA_TOKEN_NULL) when there is none.
        let t = unsafe { llama_cpp_sys_2::llama_vocab_eos(self.vocab.as_ptr()) };
        self.valid(t).then_some(t)
    }

    /// The context length the model was trained with.
    #[must_use]
    pub fn n_ctx_train(&self) -> u32 {
        // SAFETY: a read of the model.
        unsafe { llama_cpp_sys_2::llama_model_n_ctx_train(self.raw.as_ptr()) }.max(0) as u32
    }

    /// Transformer blocks.
    #[must_use]
    pub fn n_layer(&self) -> u32 {
        self.n_layer
    }

    /// Layers placed on GPUs or workers (out of `n_layer() + 1`, the output layer counting as one).
    #[must_use]
    pub fn gpu_layers(&self) -> u32 {
        self.gpu_layers
    }

    /// The devices that hold offloaded layers, in order.
    #[must_use]
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The context size llama.cpp's fitting settled on, when it ran and chose one.
    #[must_use]
    pub fn fitted_ctx(&self) -> Option<u32> {
        self.fitted_ctx
    }

    /// Bytes of all weights.
    #[must_use]
    pub fn size_bytes(&self) -> u64 {
        // SAFETY: a read of the model.
        unsafe { llama_cpp_sys_2::llama_model_size(self.raw.as_ptr()) }
    }

    /// Number of weights.
    #[must_use]
    pub fn n_params(&self) -> u64 {
        // SAFETY: a read of the model.
        unsafe { llama_cpp_sys_2::llama_model_n_params(self.raw.as_ptr()) }
    }

    /// A string metadata value of the GGUF (`None` when absent or not a scalar).
    #[must_use]
    pub fn meta(&self, key: &str) -> Option<String> {
        let key = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: `key` is NUL-terminated; `buf` has room for `buf.len()` bytes.
            let n = unsafe {
                llama_cpp_sys_2::llama_model_meta_val_str(
                    self.raw.as_ptr(),
                    key.as_ptr(),
                    buf.as_mut_ptr().cast::<c_char>(),
                    buf.len(),
                )
            };
            if n < 0 {
                return None;
            }
            if (n as usize) < buf.len() {
                buf.truncate(n as usize);
                return String::from_utf8(buf).ok();
            }
            buf.resize(n as usize + 1, 0);
        }
    }

    /// Memory taken on each device since before the model was loaded: (device, bytes).
    /// For GPUs and workers this is the drop in free memory; for the CPU, the process's resident
    /// memory now: the weights left on the CPU, the KV cache and buffers. Pages of the mapped
    /// file that were only read to upload them to a GPU are not counted, as llama.cpp unmaps
    /// them after loading.
    #[must_use]
    pub fn memory_use(&self) -> Vec<(Device, u64)> {
        devices()
            .into_iter()
            .map(|d| {
                let before = self
                    .free_before
                    .iter()
                    .find(|(n, _)| *n == d.name)
                    .map_or(d.free, |(_, f)| *f);
                let used = match d.kind {
                    DeviceKind::Gpu | DeviceKind::Remote => before.saturating_sub(d.free),
                    DeviceKind::Cpu => super::resident_bytes().unwrap_or(0),
                };
                (d, used)
            })
            .collect()
    }

    /// A sampler for these parameters.
    #[must_use]
    pub fn sampler(&self, p: &SamplingParams) -> Sampler {
        Sampler::new(p, self.n_vocab())
    }

    /// Loads a GGUF LoRA adapter made for this model.
    ///
    /// # Errors
    /// If llama.cpp refuses the file (another architecture, shapes that do not match).
    pub fn lora(&self, path: &Path) -> Result<Adapter<'_>, EngineError> {
        Ok(Adapter {
            raw: self.lora_raw(path)?,
            path: path.to_path_buf(),
            _model: std::marker::PhantomData,
        })
    }

    fn lora_raw(
        &self,
        path: &Path,
    ) -> Result<NonNull<llama_cpp_sys_2::llama_adapter_lora>, EngineError> {
        let cpath = c_path(path)?;
        take_log();
        // SAFETY: the model is loaded and the path NUL-terminated. llama.cpp reads the model's
        // tensor list to check shapes; it records the adapter on the model, which is why it
        // takes a mutable pointer, and frees it with the model unless freed before.
        let raw =
            unsafe { llama_cpp_sys_2::llama_adapter_lora_init(self.raw.as_ptr(), cpath.as_ptr()) };
        NonNull::new(raw).ok_or_else(|| EngineError::Adapter {
            path: path.to_path_buf(),
            log: take_log(),
        })
    }

    /// The adapters loaded with the model ([`LoadOptions::adapters`]) that every new context
    /// applies, with their scales.
    pub(crate) fn default_adapters(
        &self,
    ) -> impl Iterator<Item = (*mut llama_cpp_sys_2::llama_adapter_lora, f32)> + '_ {
        self.adapters.iter().map(|(a, s)| (a.as_ptr(), *s))
    }

    /// Creates a context (KV cache, compute buffers) for this model.
    ///
    /// # Errors
    /// If llama.cpp cannot allocate it.
    pub fn context(&self, opts: &ContextOptions) -> Result<Context<'_>, EngineError> {
        Context::new(self, opts)
    }

    /// A single-sequence context with the conveniences of [`Session`].
    ///
    /// # Errors
    /// If llama.cpp cannot allocate it.
    pub fn session(&self, opts: &ContextOptions) -> Result<Session<'_>, EngineError> {
        let mut opts = opts.clone();
        opts.n_seq_max = 1;
        Ok(Session::new(self.context(&opts)?, opts.all_logits))
    }
}

/// A LoRA adapter loaded for a model (apply it with [`Context::set_adapters`]).
#[derive(Debug)]
pub struct Adapter<'m> {
    raw: NonNull<llama_cpp_sys_2::llama_adapter_lora>,
    path: std::path::PathBuf,
    _model: std::marker::PhantomData<&'m Model<'m>>,
}

// SAFETY: an adapter's tensors are read-only after loading; contexts only read them.
unsafe impl Send for Adapter<'_> {}
// SAFETY: as above.
unsafe impl Sync for Adapter<'_> {}

impl Adapter<'_> {
    pub(crate) fn raw(&self) -> *mut llama_cpp_sys_2::llama_adapter_lora {
        self.raw.as_ptr()
    }

    /// The file it came from.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A string metadata value of the adapter's GGUF.
    #[must_use]
    pub fn meta(&self, key: &str) -> Option<String> {
        let key = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        // SAFETY: `key` is NUL-terminated; `buf` has room for `buf.len()` bytes.
        let n = unsafe {
            llama_cpp_sys_2::llama_adapter_meta_val_str(
                self.raw.as_ptr(),
                key.as_ptr(),
                buf.as_mut_ptr().cast::<c_char>(),
                buf.len(),
            )
        };
        if n < 0 || n as usize >= buf.len() {
            return None;
        }
        buf.truncate(n as usize);
        String::from_utf8(buf).ok()
    }
}

impl Drop for Adapter<'_> {
    fn drop(&mut self) {
        // SAFETY: the adapter belongs to a model that outlives it (the borrow), and contexts
        // that use it borrow it too; it is freed once.
        unsafe { llama_cpp_sys_2::llama_adapter_lora_free(self.raw.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_split_shares_reach_the_model_params() {
        let placement = Placement {
            devices: vec![3, 5],
            names: vec!["A".into(), "B".into()],
            split: vec![0.75, 0.25],
            gpu_layers: Some(40),
        };
        // Fake handles: ModelParams only stores them.
        let fake = |i: usize| (0x1000 + i * 0x10) as llama_cpp_sys_2::ggml_backend_dev_t;
        let p = ModelParams::new(&placement, &LoadOptions::default(), fake);
        assert_eq!(p.raw.n_gpu_layers, 40);
        let split = p.tensor_split().expect("tensor_split set");
        assert_eq!(&split[..2], &[0.75, 0.25]);
        assert!(split[2..].iter().all(|&x| x == 0.0));
        // SAFETY: `devices` is the NULL-terminated list ModelParams built: 2 handles and NULL.
        let devs = unsafe { std::slice::from_raw_parts(p.raw.devices, 3) };
        assert_eq!(devs[0], fake(3));
        assert_eq!(devs[1], fake(5));
        assert!(devs[2].is_null());

        let default = ModelParams::new(
            &Placement {
                devices: vec![1],
                names: vec!["A".into()],
                split: Vec::new(),
                gpu_layers: None,
            },
            &LoadOptions::default(),
            fake,
        );
        assert!(
            default.tensor_split().is_none(),
            "llama.cpp's default split"
        );
        assert_eq!(
            default.raw.n_gpu_layers, -1,
            "llama.cpp's default: all layers"
        );
    }
}
