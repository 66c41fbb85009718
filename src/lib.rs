//! falcon: run the Falcon LLM family (7B, 40B, 180B) in little memory.
//!
//! Two binaries stand on this library: `falcon-quantize` (a Hugging Face checkpoint → one
//! quantized GGUF file, in one streaming pass, through the `convert` crate) and `falcon-infer`
//! (generation, chat, planning and measuring through llama.cpp, whose every call lives in
//! [`engine`]).
pub mod engine;
pub mod eval;
pub mod infer;
pub mod serve;

/// An error and its causes on one line, for the binaries' single error message.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        // thiserror's transparent wrappers repeat their source: print each message once.
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// Makes writes past a file-size limit (`ulimit -f`) fail with an error the program reports,
/// instead of killing it with SIGXFSZ before it can clean up.
pub fn ignore_file_size_signal() {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code and is
    // async-signal-safe; no other code of this program handles SIGXFSZ.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}
