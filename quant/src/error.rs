//! The one error type of the crate.

use crate::types::all_names;
use crate::QuantType;

/// Why a quantize or dequantize call was refused. Nothing is partially written that the caller
/// should trust when one of these comes back.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// The row length is not a whole number of the type's blocks.
    #[error(
        "a row of {len} elements is not a whole number of {ty} blocks of {block}; \
         pick a type whose block size divides the row (f16, bf16 or q8_0 for rows of 32s)"
    )]
    RowLength {
        ty: QuantType,
        len: usize,
        block: usize,
    },

    /// A row length of zero was given.
    #[error("row length is 0; pass the number of elements in one row (the innermost dimension)")]
    EmptyRow,

    /// The f32 input is not a whole number of rows.
    #[error(
        "{len} input values are not a whole number of rows of {row_len}; \
         check the tensor's shape against the row length passed"
    )]
    SourceLength { len: usize, row_len: usize },

    /// An input value is NaN or infinite; ggml would write garbage for it.
    #[error(
        "row {row}, element {index} is {value}: NaN and infinity cannot be quantized; \
         repair the tensor or keep it in f32"
    )]
    NonFinite {
        row: usize,
        index: usize,
        value: f32,
    },

    /// A buffer does not have the size the row count and type call for.
    #[error(
        "buffer holds {actual} bytes but {expected} are needed; \
         size it as rows × QuantType::row_bytes(row_len)"
    )]
    BufferSize { expected: usize, actual: usize },

    /// A type name that is not one of ggml's names for the supported types.
    #[error("unknown type {name:?}; expected one of {}", all_names())]
    UnknownType { name: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_problem_and_the_fix() {
        let e = QuantError::RowLength {
            ty: QuantType::Q4_K,
            len: 100,
            block: 256,
        };
        assert!(
            e.to_string().contains("100") && e.to_string().contains("q4_K"),
            "{e}"
        );
        let e = QuantError::NonFinite {
            row: 3,
            index: 7,
            value: f32::NAN,
        };
        assert!(e.to_string().starts_with("row 3, element 7 is NaN"), "{e}");
        let e = QuantError::UnknownType {
            name: "q3_K".into(),
        };
        assert!(e.to_string().contains("q4_K, q5_K, q6_K"), "{e}");
    }
}
