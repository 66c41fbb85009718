//! One module per block format, each byte-identical with the ggml function it names.
//!
//! A block is a `#[repr(C)]` struct of byte arrays with ggml's field names, so it has
//! alignment 1, no padding and no invalid bit patterns; [`as_blocks`] and [`as_blocks_mut`]
//! view checked byte slices as blocks. Multi-byte fields are little-endian, as in GGUF.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
pub(crate) mod float;
pub(crate) mod kquants;
#[cfg(target_arch = "x86_64")]
pub(crate) mod kquants_avx2;
pub(crate) mod q4_0;
pub(crate) mod q4_1;
pub(crate) mod q4_k;
pub(crate) mod q5_0;
pub(crate) mod q5_1;
pub(crate) mod q5_k;
pub(crate) mod q6_k;
pub(crate) mod q8_0;

use std::mem::{align_of, size_of};

use crate::QuantType;

/// A ggml block struct.
///
/// # Safety
/// Implementors are `#[repr(C)]` structs made only of `u8`/`i8` arrays: alignment 1, no
/// padding, every bit pattern valid, and `size_of::<Self>() == Self::TYPE.type_size()`.
pub(crate) unsafe trait Block: Copy + 'static {
    const TYPE: QuantType;
    /// Compile-time proof of the layout promises above; referenced by every view.
    const LAYOUT_OK: () = assert!(
        align_of::<Self>() == 1 && size_of::<Self>() == Self::TYPE.type_size(),
        "block layout does not match ggml"
    );
}

/// Views `bytes` (a whole number of blocks) as blocks.
pub(crate) fn as_blocks<B: Block>(bytes: &[u8]) -> &[B] {
    let () = B::LAYOUT_OK;
    assert_eq!(bytes.len() % size_of::<B>(), 0, "partial {} block", B::TYPE);
    // SAFETY: `B` has alignment 1 and no invalid bit patterns (the `Block` contract, checked
    // by LAYOUT_OK), and the length is a whole number of `B`s inside `bytes`.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<B>(), bytes.len() / size_of::<B>()) }
}

/// Views `bytes` (a whole number of blocks) as mutable blocks.
pub(crate) fn as_blocks_mut<B: Block>(bytes: &mut [u8]) -> &mut [B] {
    let () = B::LAYOUT_OK;
    assert_eq!(bytes.len() % size_of::<B>(), 0, "partial {} block", B::TYPE);
    // SAFETY: as in `as_blocks`; the exclusive borrow of `bytes` moves to the returned slice.
    unsafe {
        std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<B>(), bytes.len() / size_of::<B>())
    }
}

/// Reference quantization of whole blocks: `src` holds `dst.len()` blocks' worth of values.
pub(crate) fn quantize_blocks<B: Block, const N: usize>(
    src: &[f32],
    dst: &mut [u8],
    quantize_block: impl Fn(&[f32; N], &mut B),
) {
    let blocks = as_blocks_mut::<B>(dst);
    assert_eq!(src.len(), blocks.len() * N);
    for (x, y) in src.chunks_exact(N).zip(blocks) {
        quantize_block(x.try_into().expect("chunks_exact yields N values"), y);
    }
}

/// Dequantization of whole blocks: `dst` holds `src.len()` blocks' worth of values.
pub(crate) fn dequantize_blocks<B: Block, const N: usize>(
    src: &[u8],
    dst: &mut [f32],
    dequantize_block: impl Fn(&B, &mut [f32; N]),
) {
    let blocks = as_blocks::<B>(src);
    assert_eq!(dst.len(), blocks.len() * N);
    for (x, y) in blocks.iter().zip(dst.chunks_exact_mut(N)) {
        dequantize_block(x, y.try_into().expect("chunks_exact_mut yields N values"));
    }
}

/// Reference quantization of `src` (whole blocks) into `dst`, single-threaded.
pub(crate) fn quantize_ref(ty: QuantType, src: &[f32], dst: &mut [u8]) {
    match ty {
        QuantType::F32 => float::quantize_f32(src, dst),
        QuantType::F16 => float::quantize_f16_ref(src, dst),
        QuantType::BF16 => float::quantize_bf16(src, dst),
        QuantType::Q4_0 => quantize_blocks(src, dst, q4_0::quantize_block),
        QuantType::Q4_1 => quantize_blocks(src, dst, q4_1::quantize_block),
        QuantType::Q5_0 => quantize_blocks(src, dst, q5_0::quantize_block),
        QuantType::Q5_1 => quantize_blocks(src, dst, q5_1::quantize_block),
        QuantType::Q8_0 => quantize_blocks(src, dst, q8_0::quantize_block),
        QuantType::Q4_K => quantize_blocks(src, dst, q4_k::quantize_block),
        QuantType::Q5_K => quantize_blocks(src, dst, q5_k::quantize_block),
        QuantType::Q6_K => quantize_blocks(src, dst, q6_k::quantize_block),
    }
}

/// Fastest available quantization of `src` (whole blocks) into `dst`, single-threaded, with
/// the check for NaN and infinity. Returns `false`, leaving `dst` unspecified, when `src` holds
/// one; otherwise the bytes are those of [`quantize_ref`]. The float types check while
/// converting, in one pass over memory; the block formats check first, then work on the input
/// from cache.
pub(crate) fn quantize_fast(ty: QuantType, src: &[f32], dst: &mut [u8]) -> bool {
    match ty {
        QuantType::F32 => return crate::numeric::copy_f32_checked(src, dst),
        QuantType::F16 => return float::quantize_f16_checked(src, dst),
        QuantType::BF16 => return float::quantize_bf16_checked(src, dst),
        _ => {}
    }
    if !crate::numeric::all_finite(src) {
        return false;
    }
    match ty {
        QuantType::Q4_0 => q4_0::quantize_fast(src, dst),
        QuantType::Q4_1 => q4_1::quantize_fast(src, dst),
        QuantType::Q5_0 => q5_0::quantize_fast(src, dst),
        QuantType::Q5_1 => q5_1::quantize_fast(src, dst),
        QuantType::Q8_0 => q8_0::quantize_fast(src, dst),
        QuantType::Q4_K => q4_k::quantize_fast(src, dst),
        QuantType::Q5_K => q5_k::quantize_fast(src, dst),
        QuantType::Q6_K => q6_k::quantize_fast(src, dst),
        QuantType::F32 | QuantType::F16 | QuantType::BF16 => unreachable!("handled above"),
    }
    true
}

/// Dequantization of `src` (whole blocks) into `dst`, as ggml's `to_float`.
pub(crate) fn dequantize(ty: QuantType, src: &[u8], dst: &mut [f32]) {
    match ty {
        QuantType::F32 => float::dequantize_f32(src, dst),
        QuantType::F16 => float::dequantize_f16(src, dst),
        QuantType::BF16 => float::dequantize_bf16(src, dst),
        QuantType::Q4_0 => dequantize_blocks(src, dst, q4_0::dequantize_block),
        QuantType::Q4_1 => dequantize_blocks(src, dst, q4_1::dequantize_block),
        QuantType::Q5_0 => dequantize_blocks(src, dst, q5_0::dequantize_block),
        QuantType::Q5_1 => dequantize_blocks(src, dst, q5_1::dequantize_block),
        QuantType::Q8_0 => dequantize_blocks(src, dst, q8_0::dequantize_block),
        QuantType::Q4_K => dequantize_blocks(src, dst, q4_k::dequantize_block),
        QuantType::Q5_K => dequantize_blocks(src, dst, q5_k::dequantize_block),
        QuantType::Q6_K => dequantize_blocks(src, dst, q6_k::dequantize_block),
    }
}

/// Test helpers shared by the format modules.
#[cfg(test)]
pub(crate) mod testing {
    use crate::numeric::fp16_to_fp32;

    /// Deterministic pseudo-random values in [-scale, scale) (xorshift; no dependency).
    pub(crate) fn values(n: usize, scale: f32, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// Largest |a - b| over the two slices.
    pub(crate) fn max_err(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    pub(crate) fn half(bytes: [u8; 2]) -> f32 {
        fp16_to_fp32(u16::from_le_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::values;
    use super::*;

    /// Blocks that reach every fallback of the fast paths: signed-zero extremes, subnormal
    /// and infinite scales, exact ties, constant blocks.
    fn tricky_rows() -> Vec<f32> {
        let mut x = values(256 * 8, 5.0, 1);
        let mut mixed_zeros = values(256, 1.0, 2);
        for (i, v) in mixed_zeros.iter_mut().enumerate() {
            *v = match i % 3 {
                0 => 0.0,
                1 => -0.0,
                _ => v.abs(), // min is a zero of either sign
            };
        }
        x.extend(&mixed_zeros);
        x.extend(mixed_zeros.iter().map(|v| -v)); // max is a zero of either sign
        x.extend(values(256, 1e-39, 3));
        x.extend(values(256, 3e38, 4)); // max − min overflows
        x.extend(values(256, 1.0, 6).iter().map(|v| v * 65504.0)); // f16 overflow to infinity
        x.extend(values(256, 8.0, 5).iter().map(|v| (v * 2.0).round() * 0.5));
        x.extend([7.25; 256]);
        x.extend([-0.0; 256]);
        x
    }

    #[test]
    fn every_fast_path_equals_its_reference() {
        let x = tricky_rows();
        for ty in QuantType::ALL {
            let bytes = x.len() / ty.block_size() * ty.type_size();
            let (mut a, mut b) = (vec![0u8; bytes], vec![0u8; bytes]);
            quantize_ref(ty, &x, &mut a);
            assert!(quantize_fast(ty, &x, &mut b), "{ty}: finite input");
            if let Some(at) = a.iter().zip(&b).position(|(p, q)| p != q) {
                panic!(
                    "{ty}: fast path differs at byte {at} (block {})",
                    at / ty.type_size()
                );
            }
        }
    }

    #[test]
    fn every_fast_path_flags_non_finite_input() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 255, 1000, 2047] {
                let mut x = values(2048, 1.0, 7);
                x[at] = bad;
                for ty in QuantType::ALL {
                    let mut y = vec![0u8; x.len() / ty.block_size() * ty.type_size()];
                    assert!(!quantize_fast(ty, &x, &mut y), "{ty}: {bad} at {at}");
                }
            }
        }
    }
}
