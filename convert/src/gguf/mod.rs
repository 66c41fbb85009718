//! GGUF v3: metadata values, a two-phase streaming writer and a validating reader.
//!
//! The layout is the one llama.cpp's `gguf.cpp` reads: magic `GGUF`, version, tensor count,
//! metadata count, the metadata key/value pairs, the tensor infos, padding to the alignment,
//! then the tensor data, each tensor starting at a multiple of the alignment.

pub mod keys;
mod reader;
mod value;
mod writer;

pub use reader::{validate_bytes, GgmlTypeInfo, GgufError, GgufReader, TensorInfo};
pub use value::{Array, Strings, Value, ValueType};
pub use writer::{GgufPlan, GgufWriter, PlannedTensor};

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// The version this crate writes.
pub const VERSION: u32 = 3;
/// The data alignment llama.cpp uses when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Rounds `n` up to a multiple of `align` (a power of two or any positive number).
pub(crate) fn align_up(n: u64, align: u64) -> u64 {
    n.div_ceil(align) * align
}
