//! PEFT LoRA adapters for Falcon: an adapter directory (`adapter_config.json` and
//! `adapter_model.safetensors`, as peft's `save_pretrained` writes them) read and checked
//! against a base model, and written as a GGUF LoRA adapter that llama.cpp applies at run time.
//!
//! [`PeftAdapter::open`] gives every LoRA pair (`lora_A` `[rank, in]`, `lora_B` `[out, rank]`,
//! QKV rows in the checkpoint's order) with the scale peft applies to it (`lora_alpha / r`, or
//! `/ sqrt(r)` with rsLoRA, after `rank_pattern` and `alpha_pattern`), and the full weights of
//! `modules_to_save`; [`export_lora`] writes the llama.cpp file.
//!
//! ```no_run
//! use convert::adapter::{export_lora, ExportOptions, PeftAdapter};
//! use convert::FalconConfig;
//!
//! let base = FalconConfig::from_dir("models/tiny-40b-style".as_ref())?;
//! let adapter = PeftAdapter::open("models/lora-tiny-40b-all".as_ref(), &base)?;
//! for m in &adapter.modules {
//!     println!("{} rank {} scale {}", m.linear.gguf_name(m.layer), m.rank(), m.scale.scale);
//! }
//! export_lora(
//!     "models/lora-tiny-40b-all".as_ref(),
//!     "models/tiny-40b-style".as_ref(),
//!     "/tmp/lora.gguf".as_ref(),
//!     &ExportOptions::default(),
//! )?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod base;
mod config;
mod error;
mod export;
mod merge;
mod modules;
mod peft;

pub use base::{config_from_gguf, BaseModel};
pub use config::{LoraConfig, ModuleScale, ModuleSet, Pattern};
pub use error::AdapterError;
pub use export::{export_lora, ExportOptions, ExportSummary, EXPORT_TYPES};
pub use merge::{Delta, LoraSpec, Merge, MergePlan, MergedAdapter};
pub use modules::{module_name, parse_module};
pub use peft::{
    LoraModule, PeftAdapter, SavedModule, SavedTensor, TensorRef, CONFIG_FILE, WEIGHTS_FILE,
};
