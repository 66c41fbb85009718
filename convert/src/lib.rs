//! Hugging Face Falcon checkpoints → GGUF files that llama.cpp runs, in one streaming pass.
//!
//! It reads `config.json` (native `falcon` or legacy `RefinedWeb` keys), `tokenizer.json` and
//! bf16/f16/f32 safetensors (sharded or not), maps the tensors onto llama.cpp's `falcon`
//! architecture (regrouping fused QKV rows), picks each tensor's type with llama.cpp's rules and
//! quantizes with the `quant` crate. It also holds a GGUF reader that validates every file
//! before anything trusts it.
//!
//! ```no_run
//! use convert::{quantize_checkpoint, Options, Target};
//! let summary = quantize_checkpoint(
//!     "models/falcon-mini".as_ref(),
//!     "/tmp/falcon-mini.gguf".as_ref(),
//!     &Options { target: Target::Bits(4), ..Options::default() },
//! )?;
//! println!("{} bytes, {:.2} bits per weight", summary.bytes, summary.bits_per_weight());
//! # Ok::<(), convert::ConvertError>(())
//! ```

pub mod adapter;
pub mod checkpoint;
pub mod config;
mod error;
pub mod gguf;
pub mod layout;
mod output;
pub mod partial;
mod pipeline;
pub mod rules;
pub mod shapes;
pub mod synth;
mod sys;
pub mod vocab;

pub use config::FalconConfig;
pub use error::ConvertError;
pub use pipeline::{prepare, quantize_checkpoint, Options, Prepared, ProgressFn, Summary, Target};
pub use rules::FileType;
pub use shapes::FalconShape;
