//! Runs a GGUF model with LoRA adapters through llama.cpp's C API (llama-cpp-sys-2) and reads
//! the logits at every prompt position and a greedy continuation.
#![allow(dead_code)]

use std::ffi::CString;
use std::path::Path;
use std::sync::Once;

use llama_cpp_sys_2 as sys;

unsafe extern "C" fn quiet(
    _level: sys::ggml_log_level,
    _text: *const std::ffi::c_char,
    _user: *mut std::ffi::c_void,
) {
}

fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // SAFETY: one-time global initialisation of llama.cpp; the log callback is a plain
        // function that ignores its arguments and lives for the whole process.
        unsafe {
            sys::llama_log_set(Some(quiet), std::ptr::null_mut());
            sys::llama_backend_init();
        }
    });
}

/// What llama.cpp computed for one prompt.
#[derive(Debug)]
pub struct Run {
    /// Logits at every prompt position.
    pub logits: Vec<Vec<f32>>,
    /// Greedy continuation (argmax at each step).
    pub greedy: Vec<i32>,
    /// Logits of each greedy step (the distribution the step's token was taken from).
    pub greedy_logits: Vec<Vec<f32>>,
}

/// Loads `model` on the CPU, applies `adapters` (GGUF LoRA files with their scales), decodes
/// `prompt` with logits at every position, then `n_greedy` greedy tokens one at a time.
/// Returns `Err` with llama.cpp's failure when the model or an adapter does not load.
pub fn run(
    model: &Path,
    adapters: &[(&Path, f32)],
    prompt: &[i32],
    n_greedy: usize,
) -> Result<Run, String> {
    init();
    let path = CString::new(model.to_str().unwrap()).unwrap();
    // SAFETY: every pointer passed to llama.cpp below is either one it returned (checked for
    // null before use) or points into a live Rust allocation of the size llama.cpp expects; the
    // batch, context, adapters and model are freed in reverse order of creation before return.
    unsafe {
        let mut mp = sys::llama_model_default_params();
        mp.n_gpu_layers = 0;
        let m = sys::llama_model_load_from_file(path.as_ptr(), mp);
        if m.is_null() {
            return Err(format!("llama.cpp cannot load {}", model.display()));
        }
        let mut loaded = Vec::new();
        for (a, _) in adapters {
            let p = CString::new(a.to_str().unwrap()).unwrap();
            let ad = sys::llama_adapter_lora_init(m, p.as_ptr());
            if ad.is_null() {
                for ad in loaded {
                    sys::llama_adapter_lora_free(ad);
                }
                sys::llama_model_free(m);
                return Err(format!("llama.cpp cannot load the adapter {}", a.display()));
            }
            loaded.push(ad);
        }
        let n_vocab = sys::llama_vocab_n_tokens(sys::llama_model_get_vocab(m)) as usize;
        let mut cp = sys::llama_context_default_params();
        cp.n_ctx = 256;
        cp.n_batch = 256;
        cp.n_ubatch = 256;
        cp.n_threads = 2;
        cp.n_threads_batch = 2;
        cp.no_perf = true;
        let ctx = sys::llama_init_from_model(m, cp);
        assert!(!ctx.is_null(), "llama.cpp context");
        let mut scales: Vec<f32> = adapters.iter().map(|(_, s)| *s).collect();
        let rc = sys::llama_set_adapters_lora(
            ctx,
            loaded.as_mut_ptr(),
            loaded.len(),
            scales.as_mut_ptr(),
        );
        assert_eq!(rc, 0, "llama_set_adapters_lora");

        let mut batch = sys::llama_batch_init(prompt.len().max(1) as i32, 0, 1);
        let mut decode = |tokens: &[i32], pos0: usize, all: bool| {
            batch.n_tokens = tokens.len() as i32;
            for (i, &t) in tokens.iter().enumerate() {
                *batch.token.add(i) = t;
                *batch.pos.add(i) = (pos0 + i) as i32;
                *batch.n_seq_id.add(i) = 1;
                *(*batch.seq_id.add(i)).add(0) = 0;
                *batch.logits.add(i) = i8::from(all || i + 1 == tokens.len());
            }
            assert_eq!(sys::llama_decode(ctx, batch), 0, "llama_decode");
        };
        let row = |i: i32| {
            std::slice::from_raw_parts(sys::llama_get_logits_ith(ctx, i), n_vocab).to_vec()
        };

        decode(prompt, 0, true);
        let logits: Vec<Vec<f32>> = (0..prompt.len() as i32).map(row).collect();
        let mut greedy = Vec::new();
        let mut greedy_logits = vec![logits.last().unwrap().clone()];
        for step in 0..n_greedy {
            let last = greedy_logits.last().unwrap();
            let t = argmax(last) as i32;
            greedy.push(t);
            if step + 1 < n_greedy {
                decode(&[t], prompt.len() + step, false);
                greedy_logits.push(row(0));
            }
        }
        sys::llama_batch_free(batch);
        sys::llama_free(ctx);
        for ad in loaded {
            sys::llama_adapter_lora_free(ad);
        }
        sys::llama_model_free(m);
        Ok(Run {
            logits,
            greedy,
            greedy_logits,
        })
    }
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(0, |best, (i, &x)| if x > v[best] { i } else { best })
}

/// ‖ours − reference‖ / ‖reference‖.
pub fn rel_err(ours: &[f32], reference: &[f32]) -> f64 {
    let num: f64 = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| ((*a - *b) as f64).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den).sqrt()
}
