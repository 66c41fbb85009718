//! ggml's block quantization formats in Rust, byte for byte.
//!
//! `quant` turns rows of `f32` into the bytes ggml stores for F32, F16, BF16, Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K, and back. Quantizing gives exactly the bytes of
//! ggml's `ggml_quantize_chunk` without an importance matrix; dequantizing gives exactly the
//! floats of ggml's `to_float`. It knows nothing of files or models: [`QuantType`] holds the
//! per-type facts (ggml id, name, block size, bytes per block) and the three functions below
//! move the data.
//!
//! [`quantize`] runs in parallel over the input and uses SIMD chosen at run time where it pays;
//! [`quantize_reference`] is the single-threaded scalar path it is tested against.
//!
//! ```
//! use quant::{dequantize, quantize, QuantType};
//!
//! let row_len = 64;
//! let weights: Vec<f32> = (0..2 * row_len).map(|i| (i as f32 * 0.37).sin()).collect();
//!
//! let ty = QuantType::Q8_0;
//! let mut bytes = vec![0u8; 2 * ty.row_bytes(row_len)?];
//! quantize(ty, &weights, row_len, &mut bytes)?;
//! assert_eq!(bytes.len(), 2 * 2 * 34); // two rows of two 34-byte blocks
//!
//! let mut back = vec![0f32; weights.len()];
//! dequantize(ty, &bytes, row_len, &mut back)?;
//! assert!(weights.iter().zip(&back).all(|(a, b)| (a - b).abs() < 0.01));
//! # Ok::<(), quant::QuantError>(())
//! ```

mod error;
mod formats;
mod numeric;
mod types;

use rayon::prelude::*;

pub use error::QuantError;
pub use types::QuantType;

/// Elements handed to one parallel task: a multiple of every block size (1, 32, 256), large
/// enough to amortize scheduling, small enough to keep the task's input in L2.
const CHUNK: usize = 16 * 1024;

/// Checks the shapes of a quantize call and returns the row count.
fn check_quantize(
    ty: QuantType,
    src: &[f32],
    row_len: usize,
    dst: &[u8],
) -> Result<usize, QuantError> {
    if row_len == 0 {
        return Err(QuantError::EmptyRow);
    }
    let row_bytes = ty.row_bytes(row_len)?;
    if src.len() % row_len != 0 {
        return Err(QuantError::SourceLength {
            len: src.len(),
            row_len,
        });
    }
    let rows = src.len() / row_len;
    let expected = rows * row_bytes;
    if dst.len() != expected {
        return Err(QuantError::BufferSize {
            expected,
            actual: dst.len(),
        });
    }
    Ok(rows)
}

/// The error for the first non-finite value of `src`, if there is one.
fn non_finite(src: &[f32], row_len: usize) -> Result<(), QuantError> {
    match numeric::first_non_finite(src) {
        None => Ok(()),
        Some(at) => Err(QuantError::NonFinite {
            row: at / row_len,
            index: at % row_len,
            value: src[at],
        }),
    }
}

/// Quantizes `src`, `n_rows` contiguous rows of `row_len` values, into `dst`, which must hold
/// exactly `n_rows * ty.row_bytes(row_len)` bytes. The work is spread over rayon's pool and
/// uses the fastest code path the CPU supports; the bytes are those of [`quantize_reference`].
///
/// # Errors
/// [`QuantError::RowLength`] or [`QuantError::EmptyRow`] for a row length that is not a
/// positive whole number of blocks; [`QuantError::SourceLength`] when `src` is not a whole
/// number of rows; [`QuantError::BufferSize`] for a wrongly sized `dst`;
/// [`QuantError::NonFinite`] naming the first NaN or infinity (then `dst` holds no useful data).
pub fn quantize(
    ty: QuantType,
    src: &[f32],
    row_len: usize,
    dst: &mut [u8],
) -> Result<(), QuantError> {
    check_quantize(ty, src, row_len, dst)?;
    let chunk_bytes = CHUNK / ty.block_size() * ty.type_size();
    let result = src
        .par_chunks(CHUNK)
        .zip(dst.par_chunks_mut(chunk_bytes))
        .try_for_each(|(x, y)| {
            if formats::quantize_fast(ty, x, y) {
                Ok(())
            } else {
                Err(())
            }
        });
    // Some task met a NaN or infinity; find the first one in the whole input.
    result.or_else(|()| non_finite(src, row_len))
}

/// Quantizes like [`quantize`], on the calling thread with the scalar reference code: the
/// definition of the right bytes, which the fast paths are tested against.
///
/// # Errors
/// As [`quantize`].
pub fn quantize_reference(
    ty: QuantType,
    src: &[f32],
    row_len: usize,
    dst: &mut [u8],
) -> Result<(), QuantError> {
    check_quantize(ty, src, row_len, dst)?;
    non_finite(src, row_len)?;
    formats::quantize_ref(ty, src, dst);
    Ok(())
}

/// Dequantizes `src`, rows of `ty.row_bytes(row_len)` bytes, into `dst`, whose length sets
/// the row count (`dst.len() / row_len`). The floats are those of ggml's `to_float`.
///
/// # Errors
/// [`QuantError::RowLength`] or [`QuantError::EmptyRow`] for a bad row length;
/// [`QuantError::SourceLength`] when `dst` is not a whole number of rows;
/// [`QuantError::BufferSize`] when `src` does not hold exactly that many rows' bytes.
pub fn dequantize(
    ty: QuantType,
    src: &[u8],
    row_len: usize,
    dst: &mut [f32],
) -> Result<(), QuantError> {
    if row_len == 0 {
        return Err(QuantError::EmptyRow);
    }
    let row_bytes = ty.row_bytes(row_len)?;
    if dst.len() % row_len != 0 {
        return Err(QuantError::SourceLength {
            len: dst.len(),
            row_len,
        });
    }
    let expected = dst.len() / row_len * row_bytes;
    if src.len() != expected {
        return Err(QuantError::BufferSize {
            expected,
            actual: src.len(),
        });
    }
    let chunk_bytes = CHUNK / ty.block_size() * ty.type_size();
    src.par_chunks(chunk_bytes)
        .zip(dst.par_chunks_mut(CHUNK))
        .for_each(|(x, y)| formats::dequantize(ty, x, y));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::testing::values;

    #[test]
    fn fast_equals_reference_for_every_type_across_chunks() {
        // Rows that straddle task boundaries and a tail chunk smaller than the rest.
        let row_len = 2560;
        let mut x = values(row_len * 13, 3.0, 99);
        x[row_len * 5..row_len * 6].fill(0.0);
        for ty in QuantType::ALL {
            let bytes = 13 * ty.row_bytes(row_len).unwrap();
            let (mut a, mut b) = (vec![0u8; bytes], vec![0u8; bytes]);
            quantize_reference(ty, &x, row_len, &mut a).unwrap();
            quantize(ty, &x, row_len, &mut b).unwrap();
            assert!(a == b, "{ty}");
        }
    }

    #[test]
    fn non_finite_names_first_row_and_index() {
        let row_len = 256;
        let mut x = vec![0.5f32; row_len * 200];
        x[row_len * 150 + 3] = f32::NAN;
        x[row_len * 70 + 9] = f32::INFINITY;
        let mut dst = vec![0u8; 200 * QuantType::Q4_K.row_bytes(row_len).unwrap()];
        for result in [
            quantize(QuantType::Q4_K, &x, row_len, &mut dst),
            quantize_reference(QuantType::Q4_K, &x, row_len, &mut dst),
        ] {
            match result {
                Err(QuantError::NonFinite {
                    row: 70,
                    index: 9,
                    value,
                }) => assert!(value > 0.0),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn partial_block_row_is_an_error() {
        let x = vec![0.0f32; 100];
        let mut dst = vec![0u8; 1000];
        let err = quantize(QuantType::Q8_0, &x, 50, &mut dst).unwrap_err();
        assert!(
            matches!(
                err,
                QuantError::RowLength {
                    len: 50,
                    block: 32,
                    ..
                }
            ),
            "{err}"
        );
        let err = dequantize(QuantType::Q4_K, &dst, 100, &mut vec![0.0; 100]).unwrap_err();
        assert!(
            matches!(
                err,
                QuantError::RowLength {
                    len: 100,
                    block: 256,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn zero_row_length_is_an_error() {
        let err = quantize(QuantType::F16, &[], 0, &mut []).unwrap_err();
        assert!(matches!(err, QuantError::EmptyRow), "{err}");
        let err = dequantize(QuantType::F16, &[], 0, &mut []).unwrap_err();
        assert!(matches!(err, QuantError::EmptyRow), "{err}");
    }

    #[test]
    fn ragged_input_is_an_error() {
        let x = vec![0.0f32; 96];
        let mut dst = vec![0u8; 68];
        let err = quantize(QuantType::Q8_0, &x, 64, &mut dst).unwrap_err();
        assert!(
            matches!(
                err,
                QuantError::SourceLength {
                    len: 96,
                    row_len: 64
                }
            ),
            "{err}"
        );
        let err = dequantize(QuantType::Q8_0, &dst, 64, &mut vec![0.0; 96]).unwrap_err();
        assert!(
            matches!(
                err,
                QuantError::SourceLength {
                    len: 96,
                    row_len: 64
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn wrong_buffer_size_is_an_error() {
        let x = vec![0.0f32; 64];
        let mut dst = vec![0u8; 67];
        let err = quantize_reference(QuantType::Q8_0, &x, 64, &mut dst).unwrap_err();
        assert!(
            matches!(
                err,
                QuantError::BufferSize {
                    expected: 68,
                    actual: 67
                }
            ),
            "{err}"
        );
        let err = dequantize(QuantType::Q8_0, &dst, 64, &mut vec![0.0; 64]).unwrap_err();
        assert!(
            matches!(
                err,
                QuantError::BufferSize {
                    expected: 68,
                    actual: 67
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn empty_input_is_fine() {
        quantize(QuantType::Q6_K, &[], 256, &mut []).unwrap();
        dequantize(QuantType::Q6_K, &[], 256, &mut []).unwrap();
    }
}
