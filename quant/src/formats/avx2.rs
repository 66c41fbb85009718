//! AVX2 building blocks of the 32-element formats' fast paths. Every function here is exact
//! (loads, comparisons, min/max, integer packing), so the callers stay byte-identical with
//! their scalar references.

use std::arch::x86_64::*;

/// The 32 values of a block in four registers.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn load32(x: &[f32; 32]) -> [__m256; 4] {
    // SAFETY: the four unaligned loads read exactly the 32 values of `x`.
    unsafe {
        let p = x.as_ptr();
        [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ]
    }
}

/// Horizontal maximum of eight lanes.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn hmax(v: __m256) -> f32 {
    // SAFETY: register-only intrinsics; AVX2 is enabled. (Rust ≥ 1.87 deems these calls safe
    // here; the block keeps the declared rust-version building.)
    #[allow(unused_unsafe)]
    unsafe {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
    }
}

/// Horizontal minimum of eight lanes.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn hmin(v: __m256) -> f32 {
    // SAFETY: as in `hmax`.
    #[allow(unused_unsafe)]
    unsafe {
        let m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_min_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_min_ss(m, _mm_movehdup_ps(m)))
    }
}

/// Absolute values of the four registers.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn abs4(v: &[__m256; 4]) -> [__m256; 4] {
    // SAFETY: register-only intrinsics; AVX2 is enabled.
    #[allow(unused_unsafe)]
    unsafe {
        let sign = _mm256_set1_ps(-0.0);
        [
            _mm256_andnot_ps(sign, v[0]),
            _mm256_andnot_ps(sign, v[1]),
            _mm256_andnot_ps(sign, v[2]),
            _mm256_andnot_ps(sign, v[3]),
        ]
    }
}

/// Largest value of the four registers (no NaN may be present).
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn max4(v: &[__m256; 4]) -> f32 {
    // SAFETY: register-only intrinsics; AVX2 is enabled.
    #[allow(unused_unsafe)]
    unsafe {
        hmax(_mm256_max_ps(
            _mm256_max_ps(v[0], v[1]),
            _mm256_max_ps(v[2], v[3]),
        ))
    }
}

/// Smallest value of the four registers (no NaN may be present).
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn min4(v: &[__m256; 4]) -> f32 {
    // SAFETY: register-only intrinsics; AVX2 is enabled.
    #[allow(unused_unsafe)]
    unsafe {
        hmin(_mm256_min_ps(
            _mm256_min_ps(v[0], v[1]),
            _mm256_min_ps(v[2], v[3]),
        ))
    }
}

/// The signed value of the first element whose magnitude is `amax` (the scalar loop's
/// `if (amax < fabsf(v))` choice), or +0.0 when `amax` is zero.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn first_with_magnitude(x: &[f32; 32], a: &[__m256; 4], amax: f32) -> f32 {
    if amax == 0.0 {
        return 0.0;
    }
    // SAFETY: register-only intrinsics; AVX2 is enabled.
    #[allow(unused_unsafe)]
    unsafe {
        let m = _mm256_set1_ps(amax);
        let mut hits = 0u32;
        for (k, a) in a.iter().enumerate() {
            let eq = _mm256_cmp_ps::<_CMP_EQ_OQ>(*a, m);
            hits |= (_mm256_movemask_ps(eq) as u32) << (8 * k);
        }
        x[hits.trailing_zeros() as usize]
    }
}

/// Packs 32 levels in `0..=15` (i32 lanes, elements 0..32 in order) into ggml's nibble
/// layout: element j in the low half of byte j, element j + 16 in the high half.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn pack_nibbles(l: [__m256i; 4], qs: &mut [u8; 16]) {
    // SAFETY: the store writes exactly the 16 bytes of `qs`; the rest is register-only.
    unsafe {
        let lo = _mm256_packs_epi32(l[0], l[1]);
        let hi = _mm256_packs_epi32(l[2], l[3]);
        let both = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(hi));
        let ordered = _mm256_permute4x64_epi64::<0b11_01_10_00>(both);
        let bytes = _mm_packus_epi16(
            _mm256_castsi256_si128(ordered),
            _mm256_extracti128_si256::<1>(ordered),
        );
        _mm_storeu_si128(qs.as_mut_ptr().cast(), bytes);
    }
}

/// Bit 4 of each of 32 levels (i32 lanes), element k at bit k: the Q5 formats' `qh`.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn fifth_bits(l: &[__m256i; 4]) -> u32 {
    // SAFETY: register-only intrinsics; AVX2 is enabled.
    #[allow(unused_unsafe)]
    unsafe {
        let mut bits = 0u32;
        for (k, l) in l.iter().enumerate() {
            let top = _mm256_castsi256_ps(_mm256_slli_epi32::<27>(*l));
            bits |= (_mm256_movemask_ps(top) as u32) << (8 * k);
        }
        bits
    }
}

/// The low four bits of each lane.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn low_nibbles(l: [__m256i; 4]) -> [__m256i; 4] {
    // SAFETY: register-only intrinsics; AVX2 is enabled.
    #[allow(unused_unsafe)]
    unsafe {
        let m = _mm256_set1_epi32(0x0F);
        [
            _mm256_and_si256(l[0], m),
            _mm256_and_si256(l[1], m),
            _mm256_and_si256(l[2], m),
            _mm256_and_si256(l[3], m),
        ]
    }
}

/// `min(cap, trunc(x · id + bias))` per lane, for the legacy formats' levels. Exact when the
/// truncated values fit in i32, which a normal scale guarantees.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn trunc_levels(
    v: &[__m256; 4],
    sub: f32,
    id: f32,
    bias: f32,
    cap: i32,
) -> [__m256i; 4] {
    // SAFETY: register-only intrinsics; AVX2 is enabled.
    #[allow(unused_unsafe)]
    unsafe {
        let (subv, idv, biasv, capv) = (
            _mm256_set1_ps(sub),
            _mm256_set1_ps(id),
            _mm256_set1_ps(bias),
            _mm256_set1_epi32(cap),
        );
        let mut out = [_mm256_setzero_si256(); 4];
        for (o, v) in out.iter_mut().zip(v) {
            let p = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(*v, subv), idv), biasv);
            *o = _mm256_min_epi32(_mm256_cvttps_epi32(p), capv);
        }
        out
    }
}
