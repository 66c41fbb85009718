//! Scalar conversions exactly as ggml performs them, bit for bit.
//!
//! ggml converts f32 → f16 in software (`ggml_compute_fp32_to_fp16` in `ggml-impl.h`) with
//! round-to-nearest-even and NaN → 0x7E00; f32 → bf16 rounds to nearest even and quiets NaN
//! (`ggml_compute_fp32_to_bf16`). The K formats round with `nearest_int`, a magic-number trick
//! that equals round-half-to-even inside its domain and wraps outside it; it is reproduced
//! literally so that the two agree even where ggml's assertion is compiled out.

/// `ggml_compute_fp32_to_fp16`: round to nearest even, overflow to ±inf, any NaN to 0x7E00.
#[inline]
pub(crate) fn fp32_to_fp16(f: f32) -> u16 {
    let scale_to_inf = f32::from_bits(0x7780_0000); // 2^112
    let scale_to_zero = f32::from_bits(0x0880_0000); // 2^-110
    let base = (f.abs() * scale_to_inf) * scale_to_zero;

    let w = f.to_bits();
    let shl1_w = w.wrapping_add(w);
    let sign = w & 0x8000_0000;
    let bias = (shl1_w & 0xFF00_0000).max(0x7100_0000);

    let bits = (f32::from_bits((bias >> 1) + 0x0780_0000) + base).to_bits();
    let exp_bits = (bits >> 13) & 0x0000_7C00;
    let mantissa_bits = bits & 0x0000_0FFF;
    let nonsign = exp_bits + mantissa_bits;
    ((sign >> 16)
        | if shl1_w > 0xFF00_0000 {
            0x7E00
        } else {
            nonsign
        }) as u16
}

/// `ggml_compute_fp16_to_fp32`: exact; NaN payloads are kept as ggml keeps them.
#[inline]
pub(crate) fn fp16_to_fp32(h: u16) -> f32 {
    let w = u32::from(h) << 16;
    let sign = w & 0x8000_0000;
    let two_w = w.wrapping_add(w);

    let exp_offset = 0xE0u32 << 23;
    let exp_scale = f32::from_bits(0x0780_0000); // 2^-112
    let normalized = f32::from_bits((two_w >> 4) + exp_offset) * exp_scale;

    let magic_mask = 126u32 << 23;
    let denormalized = f32::from_bits((two_w >> 17) | magic_mask) - 0.5;

    let denormalized_cutoff = 1u32 << 27;
    let bits = if two_w < denormalized_cutoff {
        denormalized.to_bits()
    } else {
        normalized.to_bits()
    };
    f32::from_bits(sign | bits)
}

/// `ggml_compute_fp32_to_bf16`: round to nearest even; NaN keeps its top bits and is quieted.
#[inline]
pub(crate) fn fp32_to_bf16(f: f32) -> u16 {
    let u = f.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// `ggml_compute_bf16_to_fp32`: exact.
#[inline]
pub(crate) fn bf16_to_fp32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// ggml's `nearest_int`: adds 1.5·2^23 and reads the low mantissa bits. Inside |x| ≤ 4194303
/// this is `round_ties_even`; outside it wraps the same way ggml's release build does.
#[inline(always)]
pub(crate) fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0;
    (val.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// C's float → integer conversion as x86-64 executes it (`cvttss2si`): truncate toward zero,
/// and give `i32::MIN` for NaN and out-of-range values, where C leaves the result undefined.
/// Narrower C targets (`int8_t`, `uint8_t`) then keep the low byte: use `as i8` / `as u8`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn c_f32_to_i32(f: f32) -> i32 {
    use std::arch::x86_64::{_mm_cvttss_si32, _mm_set_ss};
    // SAFETY: SSE is part of the x86-64 baseline; this is the instruction C compiles to.
    // (Rust ≥ 1.87 deems these calls safe; the block keeps the declared rust-version building.)
    #[allow(unused_unsafe)]
    unsafe {
        _mm_cvttss_si32(_mm_set_ss(f))
    }
}

/// The same conversion elsewhere, emulated.
#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
pub(crate) fn c_f32_to_i32(f: f32) -> i32 {
    if f.is_nan() || !(-2_147_483_648.0..2_147_483_648.0).contains(&f) {
        i32::MIN
    } else {
        f as i32
    }
}

/// Index of the first NaN or infinity in `x`, if any.
#[inline]
pub(crate) fn first_non_finite(x: &[f32]) -> Option<usize> {
    if all_finite(x) {
        None
    } else {
        x.iter().position(|v| !v.is_finite())
    }
}

/// Whether no value of `x` is NaN or infinite: a branch-free pass the compiler vectorizes,
/// compiled for AVX2 as well and picked at run time.
#[inline]
pub(crate) fn all_finite(x: &[f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { all_finite_avx2(x) };
    }
    all_finite_generic(x)
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn all_finite_avx2(x: &[f32]) -> bool {
    all_finite_generic(x)
}

#[inline(always)]
fn all_finite_generic(x: &[f32]) -> bool {
    // An all-ones exponent marks NaN and infinity alike.
    let mut bad = 0u32;
    for v in x {
        bad |= u32::from(v.to_bits() & 0x7f80_0000 == 0x7f80_0000);
    }
    bad == 0
}

/// Copies `src` into `dst` as little-endian bytes and reports whether every value was
/// finite, in one pass (F32 "quantization" is a copy; checking first would read twice).
#[inline]
pub(crate) fn copy_f32_checked(src: &[f32], dst: &mut [u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { copy_f32_checked_avx2(src, dst) };
    }
    copy_f32_checked_generic(src, dst)
}

/// The copy with streaming stores: the output is not read again soon, so writing around the
/// cache saves the read-for-ownership traffic a plain copy pays (as glibc's large memcpy does).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_f32_checked_avx2(src: &[f32], dst: &mut [u8]) -> bool {
    use std::arch::x86_64::*;
    assert_eq!(dst.len(), src.len() * 4);
    let misalign = dst.as_ptr() as usize % 32;
    if misalign % 4 != 0 {
        return copy_f32_checked_generic(src, dst);
    }
    // Elements before the first 32-byte aligned output address, then whole vectors.
    let head = ((32 - misalign) % 32 / 4).min(src.len());
    let body = (src.len() - head) / 8 * 8;
    let (src_head, rest) = src.split_at(head);
    let (src_body, src_tail) = rest.split_at(body);
    let (dst_head, rest) = dst.split_at_mut(head * 4);
    let (dst_body, dst_tail) = rest.split_at_mut(body * 4);
    let mut ok = copy_f32_checked_generic(src_head, dst_head);
    ok &= copy_f32_checked_generic(src_tail, dst_tail);
    // SAFETY: `dst_body` starts 32-byte aligned (by construction of `head`) and holds 32
    // bytes per 8 floats of `src_body`; loads are unaligned; the fence orders the streaming
    // stores before the caller's later accesses.
    unsafe {
        let exponent = _mm256_set1_epi32(0x7f80_0000);
        let mut bad = _mm256_setzero_si256();
        for (x, y) in src_body.chunks_exact(8).zip(dst_body.chunks_exact_mut(32)) {
            let v = _mm256_loadu_si256(x.as_ptr().cast());
            let e = _mm256_and_si256(v, exponent);
            bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(e, exponent));
            _mm256_stream_si256(y.as_mut_ptr().cast(), v);
        }
        _mm_sfence();
        ok &= _mm256_testz_si256(bad, bad) == 1;
    }
    ok
}

#[inline(always)]
fn copy_f32_checked_generic(src: &[f32], dst: &mut [u8]) -> bool {
    assert_eq!(dst.len(), src.len() * 4);
    let mut bad = 0u32;
    for (x, y) in src.iter().zip(dst.chunks_exact_mut(4)) {
        let bits = x.to_bits();
        bad |= u32::from(bits & 0x7f80_0000 == 0x7f80_0000);
        y.copy_from_slice(&bits.to_le_bytes());
    }
    bad == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp16_round_trips_every_non_nan_half() {
        for h in 0..=u16::MAX {
            let f = fp16_to_fp32(h);
            if f.is_nan() {
                assert_eq!(fp32_to_fp16(f) & 0x7fff, 0x7E00);
            } else {
                assert_eq!(fp32_to_fp16(f), h, "{h:#06x} -> {f}");
            }
        }
    }

    #[test]
    fn fp16_rounds_half_to_even() {
        // 1 + 2^-11 lies halfway between 1 and 1 + 2^-10: ties go to the even mantissa (1).
        assert_eq!(fp32_to_fp16(1.0 + f32::powi(2.0, -11)), 0x3C00);
        assert_eq!(fp32_to_fp16(1.0 + 3.0 * f32::powi(2.0, -11)), 0x3C02);
        assert_eq!(fp32_to_fp16(65520.0), 0x7C00); // rounds up to infinity
        assert_eq!(fp32_to_fp16(-0.0), 0x8000);
        assert_eq!(fp32_to_fp16(f32::powi(2.0, -25)), 0); // tie between 0 and the least subnormal
        assert_eq!(fp32_to_fp16(f32::from_bits(0x3380_0001)), 1);
    }

    #[test]
    fn bf16_rounds_half_to_even_and_quiets_nan() {
        assert_eq!(fp32_to_bf16(f32::from_bits(0x3F80_8000)), 0x3F80);
        assert_eq!(fp32_to_bf16(f32::from_bits(0x3F81_8000)), 0x3F82);
        assert_eq!(fp32_to_bf16(f32::from_bits(0x7F80_0001)), 0x7FC0);
        assert_eq!(bf16_to_fp32(0x3F80), 1.0);
    }

    #[test]
    fn nearest_int_is_ties_to_even_in_range() {
        for v in [-2.5f32, -1.5, -0.5, 0.5, 1.5, 2.5, 3.49, -7.51, 4_194_303.0] {
            assert_eq!(nearest_int(v), v.round_ties_even() as i32, "{v}");
        }
    }

    #[test]
    fn c_conversion_follows_x86() {
        assert_eq!(c_f32_to_i32(-1.9), -1);
        assert_eq!(c_f32_to_i32(f32::NAN), i32::MIN);
        assert_eq!(c_f32_to_i32(f32::INFINITY), i32::MIN);
        assert_eq!(c_f32_to_i32(3e9), i32::MIN);
    }

    #[test]
    fn checked_copy_reports_non_finite() {
        let x: Vec<f32> = (0..300).map(|i| i as f32 * 0.5).collect();
        let mut y = vec![0u8; 1300];
        for offset in [0, 1, 4, 12, 32] {
            // Every alignment of the output, including ones the streaming path cannot take.
            let out = &mut y[offset..offset + 1200];
            assert!(copy_f32_checked(&x, out));
            assert!(out.chunks(4).zip(&x).all(|(b, v)| b == v.to_le_bytes()));
            for bad in [0, 7, 150, 299] {
                let mut x = x.clone();
                x[bad] = f32::NAN;
                assert!(!copy_f32_checked(&x, out), "NaN at {bad}, offset {offset}");
            }
        }
    }

    #[test]
    fn finds_first_non_finite() {
        let mut x = vec![1.0f32; 1000];
        assert_eq!(first_non_finite(&x), None);
        x[700] = f32::NEG_INFINITY;
        x[900] = f32::NAN;
        assert_eq!(first_non_finite(&x), Some(700));
    }
}
