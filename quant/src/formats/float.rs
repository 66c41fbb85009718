//! F32, F16 and BF16 rows, as ggml's `ggml_quantize_chunk` writes them: a copy for F32,
//! `ggml_fp32_to_fp16_row` for F16 and `ggml_fp32_to_bf16_row_ref` for BF16; and back as
//! `ggml_fp16_to_fp32_row` / `ggml_bf16_to_fp32_row`.

use crate::numeric::{all_finite, bf16_to_fp32, fp16_to_fp32, fp32_to_bf16, fp32_to_fp16};

pub(crate) fn quantize_f32(src: &[f32], dst: &mut [u8]) {
    assert_eq!(dst.len(), src.len() * 4);
    #[cfg(target_endian = "little")]
    {
        // SAFETY: f32 has no padding and every byte of it is initialized; u8 has alignment 1;
        // the view covers exactly the memory of `src`, borrowed for the copy only.
        let bytes = unsafe { std::slice::from_raw_parts(src.as_ptr().cast::<u8>(), dst.len()) };
        dst.copy_from_slice(bytes);
    }
    #[cfg(not(target_endian = "little"))]
    for (x, y) in src.iter().zip(dst.chunks_exact_mut(4)) {
        y.copy_from_slice(&x.to_le_bytes());
    }
}

pub(crate) fn dequantize_f32(src: &[u8], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len() * 4);
    for (x, y) in src.chunks_exact(4).zip(dst) {
        *y = f32::from_le_bytes(x.try_into().expect("4 bytes"));
    }
}

/// Byte-identical with `ggml_fp32_to_fp16_row`.
pub(crate) fn quantize_f16_ref(src: &[f32], dst: &mut [u8]) {
    assert_eq!(dst.len(), src.len() * 2);
    for (x, y) in src.iter().zip(dst.chunks_exact_mut(2)) {
        y.copy_from_slice(&fp32_to_fp16(*x).to_le_bytes());
    }
}

/// F16 with the F16C conversion instruction where the CPU has it, checking for NaN and
/// infinity in the same pass; `false` (with `dst` unspecified) when there was one. For finite
/// input the instruction's round-to-nearest-even equals ggml's software conversion.
pub(crate) fn quantize_f16_checked(src: &[f32], dst: &mut [u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU supports AVX2 and F16C, checked just above.
        return unsafe { x86::quantize_f16(src, dst) };
    }
    quantize_f16_ref(src, dst);
    all_finite(src)
}

pub(crate) fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len() * 2);
    for (x, y) in src.chunks_exact(2).zip(dst) {
        *y = fp16_to_fp32(u16::from_le_bytes([x[0], x[1]]));
    }
}

/// Byte-identical with `ggml_fp32_to_bf16_row_ref`.
pub(crate) fn quantize_bf16(src: &[f32], dst: &mut [u8]) {
    assert_eq!(dst.len(), src.len() * 2);
    for (x, y) in src.iter().zip(dst.chunks_exact_mut(2)) {
        y.copy_from_slice(&fp32_to_bf16(*x).to_le_bytes());
    }
}

/// BF16 checking for NaN and infinity in the same pass; `false` (with `dst` unspecified)
/// when there was one. Without NaN, ggml's rounding needs no branch, and the loop vectorizes;
/// it is compiled for AVX2 too and picked at run time.
pub(crate) fn quantize_bf16_checked(src: &[f32], dst: &mut [u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { quantize_bf16_avx2(src, dst) };
    }
    quantize_bf16_no_nan(src, dst)
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_bf16_avx2(src: &[f32], dst: &mut [u8]) -> bool {
    quantize_bf16_no_nan(src, dst)
}

#[inline(always)]
fn quantize_bf16_no_nan(src: &[f32], dst: &mut [u8]) -> bool {
    assert_eq!(dst.len(), src.len() * 2);
    let mut bad = 0u32;
    for (x, y) in src.iter().zip(dst.chunks_exact_mut(2)) {
        let u = x.to_bits();
        bad |= u32::from(u & 0x7f80_0000 == 0x7f80_0000);
        let h = (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16;
        y.copy_from_slice(&h.to_le_bytes());
    }
    bad == 0
}

pub(crate) fn dequantize_bf16(src: &[u8], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len() * 2);
    for (x, y) in src.chunks_exact(2).zip(dst) {
        *y = bf16_to_fp32(u16::from_le_bytes([x[0], x[1]]));
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::numeric::all_finite;

    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn quantize_f16(src: &[f32], dst: &mut [u8]) -> bool {
        assert_eq!(dst.len(), src.len() * 2);
        let whole = src.len() / 8 * 8;
        // SAFETY: register-only intrinsics; AVX2 is enabled.
        #[allow(unused_unsafe)]
        let (exponent, mut bad) =
            unsafe { (_mm256_set1_epi32(0x7f80_0000), _mm256_setzero_si256()) };
        for (x, y) in src[..whole].chunks_exact(8).zip(dst.chunks_exact_mut(16)) {
            // SAFETY: `x` holds 8 f32 and `y` 16 bytes; unaligned loads and stores are used.
            unsafe {
                let v = _mm256_loadu_ps(x.as_ptr());
                let e = _mm256_and_si256(_mm256_castps_si256(v), exponent);
                bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(e, exponent));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm_storeu_si128(y.as_mut_ptr().cast(), h);
            }
        }
        super::quantize_f16_ref(&src[whole..], &mut dst[whole * 2..]);
        // SAFETY: register-only intrinsic; AVX is enabled.
        #[allow(unused_unsafe)]
        let body_ok = unsafe { _mm256_testz_si256(bad, bad) == 1 };
        body_ok && all_finite(&src[whole..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::testing::values;

    #[test]
    fn f16_fast_equals_reference_and_flags_non_finite() {
        let mut x = values(1003, 70000.0, 1);
        x.extend(values(500, 1e-6, 2));
        x.extend([
            1.0 + f32::powi(2.0, -11),
            f32::powi(2.0, -25),
            -f32::powi(2.0, -25),
            65519.0,
        ]);
        let (mut a, mut b) = (vec![0u8; x.len() * 2], vec![0u8; x.len() * 2]);
        quantize_f16_ref(&x, &mut a);
        assert!(quantize_f16_checked(&x, &mut b));
        assert_eq!(a, b);
        x[1001] = f32::NAN;
        assert!(!quantize_f16_checked(&x, &mut b));
    }

    #[test]
    fn bf16_fast_equals_reference_and_flags_non_finite() {
        let mut x = values(3001, 3e38, 4);
        x.extend(values(100, 1e-39, 5));
        x.extend([
            f32::MAX,
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
        ]);
        let (mut a, mut b) = (vec![0u8; x.len() * 2], vec![0u8; x.len() * 2]);
        quantize_bf16(&x, &mut a);
        assert!(quantize_bf16_checked(&x, &mut b));
        assert_eq!(a, b);
        x[7] = f32::NEG_INFINITY;
        assert!(!quantize_bf16_checked(&x, &mut b));
    }

    #[test]
    fn float_round_trips() {
        let x = values(64, 3.0, 3);
        let mut bytes = vec![0u8; 256];
        let mut back = vec![0f32; 64];
        quantize_f32(&x, &mut bytes);
        dequantize_f32(&bytes, &mut back);
        assert_eq!(x, back);
        quantize_bf16(&x, &mut bytes[..128]);
        dequantize_bf16(&bytes[..128], &mut back);
        assert!(x
            .iter()
            .zip(&back)
            .all(|(a, b)| (a - b).abs() <= a.abs() / 128.0));
    }
}
