//! AVX2 versions of the K-format searches, byte-identical with the scalar ones in `kquants`.
//!
//! The searches are chains of float sums whose order decides the result, so they cannot be
//! vectorized along a sub-block. They are vectorized *across* sub-blocks instead: lane j of
//! every vector follows sub-block j through exactly the scalar sequence of operations, and
//! data-dependent branches become per-lane blends. Each lane is therefore the scalar code.

use std::arch::x86_64::*;

use super::kquants::{pack_scales, sub_block_scale, ScaledLevels, GROUP_MAX_EPS};
use crate::types::QK_K;

/// ggml's `nearest_int` on eight lanes.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn nearest(v: __m256) -> __m256i {
    // SAFETY: register-only intrinsics; AVX2 is enabled. (Rust ≥ 1.87 deems these calls safe
    // here; the block keeps the declared rust-version building.)
    #[allow(unused_unsafe)]
    unsafe {
        let bits = _mm256_castps_si256(_mm256_add_ps(v, _mm256_set1_ps(12_582_912.0)));
        let low = _mm256_and_si256(bits, _mm256_set1_epi32(0x007f_ffff));
        _mm256_sub_epi32(low, _mm256_set1_epi32(0x0040_0000))
    }
}

/// Lane `j` of vector `i` = `x[stride * j + i]`, for `N` vectors.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn transpose<const N: usize>(x: &[f32], stride: usize) -> [__m256; N] {
    assert!(x.len() >= 7 * stride + N);
    // SAFETY: the gathers read x[stride * j + i] for j < 8, i < N, inside `x` (asserted);
    // AVX2 is enabled.
    unsafe {
        let s = stride as i32;
        let idx = _mm256_setr_epi32(0, s, 2 * s, 3 * s, 4 * s, 5 * s, 6 * s, 7 * s);
        std::array::from_fn(|i| _mm256_i32gather_ps::<4>(x.as_ptr().add(i), idx))
    }
}

/// `make_qkx2_quants` (use_mad false) for eight groups of 32 at once; lane j of `x[i]` is
/// element i of group j. Returns the per-lane `(scale, the_min)` and writes the levels.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn make_qkx2_quants_x8(
    nmax: i32,
    x: &[__m256; 32],
    w: &[__m256; 32],
    l_out: &mut [__m256i; 32],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (__m256, __m256) {
    // SAFETY: register-only intrinsics; AVX2 is enabled.
    #[allow(unused_unsafe)]
    unsafe {
        let zero = _mm256_setzero_ps();
        let zero_i = _mm256_setzero_si256();
        let nmax_i = _mm256_set1_epi32(nmax);
        let level = |iscale: __m256, min: __m256, x: __m256| {
            _mm256_max_epi32(
                zero_i,
                _mm256_min_epi32(
                    nmax_i,
                    nearest(_mm256_mul_ps(iscale, _mm256_sub_ps(x, min))),
                ),
            )
        };
        let mut min = x[0];
        let mut max = x[0];
        let mut sum_w = w[0];
        let mut sum_x = _mm256_mul_ps(sum_w, x[0]);
        for i in 1..32 {
            min = _mm256_min_ps(x[i], min); // x < min ? x : min
            max = _mm256_max_ps(x[i], max); // x > max ? x : max
            sum_w = _mm256_add_ps(sum_w, w[i]);
            sum_x = _mm256_add_ps(sum_x, _mm256_mul_ps(w[i], x[i]));
        }
        min = _mm256_blendv_ps(min, zero, _mm256_cmp_ps::<_CMP_GT_OQ>(min, zero));
        let flat = _mm256_cmp_ps::<_CMP_EQ_OQ>(max, min);
        let flat_min = min;

        let iscale = _mm256_div_ps(_mm256_set1_ps(nmax as f32), _mm256_sub_ps(max, min));
        let mut scale = _mm256_div_ps(_mm256_set1_ps(1.0), iscale);
        let mut best_error = zero;
        for i in 0..32 {
            l_out[i] = level(iscale, min, x[i]);
            let diff = _mm256_sub_ps(
                _mm256_add_ps(_mm256_mul_ps(scale, _mm256_cvtepi32_ps(l_out[i])), min),
                x[i],
            );
            best_error = _mm256_add_ps(best_error, _mm256_mul_ps(w[i], _mm256_mul_ps(diff, diff)));
        }
        let mut laux = [zero_i; 32];
        for is in 0..=nstep {
            // `min` moves with every improvement, and the range with it, as in the scalar code.
            let numerator = _mm256_set1_ps(rmin + rdelta * is as f32 + nmax as f32);
            let iscale = _mm256_div_ps(numerator, _mm256_sub_ps(max, min));
            let (mut sum_l, mut sum_l2, mut sum_xl) = (zero, zero, zero);
            for i in 0..32 {
                laux[i] = level(iscale, min, x[i]);
                let wl = _mm256_mul_ps(w[i], _mm256_cvtepi32_ps(laux[i]));
                sum_l = _mm256_add_ps(sum_l, wl);
                sum_l2 = _mm256_add_ps(sum_l2, _mm256_mul_ps(wl, _mm256_cvtepi32_ps(laux[i])));
                sum_xl = _mm256_add_ps(sum_xl, _mm256_mul_ps(wl, x[i]));
            }
            let det = _mm256_sub_ps(_mm256_mul_ps(sum_w, sum_l2), _mm256_mul_ps(sum_l, sum_l));
            let mut this_scale = _mm256_div_ps(
                _mm256_sub_ps(_mm256_mul_ps(sum_w, sum_xl), _mm256_mul_ps(sum_x, sum_l)),
                det,
            );
            let mut this_min = _mm256_div_ps(
                _mm256_sub_ps(_mm256_mul_ps(sum_l2, sum_x), _mm256_mul_ps(sum_l, sum_xl)),
                det,
            );
            let positive = _mm256_cmp_ps::<_CMP_GT_OQ>(this_min, zero);
            this_min = _mm256_blendv_ps(this_min, zero, positive);
            this_scale = _mm256_blendv_ps(this_scale, _mm256_div_ps(sum_xl, sum_l2), positive);
            let mut cur_error = zero;
            for i in 0..32 {
                let diff = _mm256_sub_ps(
                    _mm256_add_ps(
                        _mm256_mul_ps(this_scale, _mm256_cvtepi32_ps(laux[i])),
                        this_min,
                    ),
                    x[i],
                );
                cur_error =
                    _mm256_add_ps(cur_error, _mm256_mul_ps(w[i], _mm256_mul_ps(diff, diff)));
            }
            let better = _mm256_and_ps(
                _mm256_cmp_ps::<_CMP_GT_OQ>(det, zero),
                _mm256_cmp_ps::<_CMP_LT_OQ>(cur_error, best_error),
            );
            if _mm256_movemask_ps(better) != 0 {
                let better_i = _mm256_castps_si256(better);
                for i in 0..32 {
                    l_out[i] = _mm256_blendv_epi8(l_out[i], laux[i], better_i);
                }
                best_error = _mm256_blendv_ps(best_error, cur_error, better);
                scale = _mm256_blendv_ps(scale, this_scale, better);
                min = _mm256_blendv_ps(min, this_min, better);
            }
        }
        // Groups with max == min: all levels 0, scale 0, the_min = -min.
        let flat_i = _mm256_castps_si256(flat);
        for l in l_out.iter_mut() {
            *l = _mm256_andnot_si256(flat_i, *l);
        }
        scale = _mm256_blendv_ps(scale, zero, flat);
        min = _mm256_blendv_ps(min, flat_min, flat);
        (scale, _mm256_xor_ps(min, _mm256_set1_ps(-0.0)))
    }
}

/// [`super::kquants::quantize_scaled`] with the first pass across lanes and the
/// requantization eight elements at a time.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn quantize_scaled(
    x: &[f32; QK_K],
    nmax: i32,
    rmin: f32,
    nstep: i32,
) -> ScaledLevels {
    let mut out = ScaledLevels {
        d: [0; 2],
        dmin: [0; 2],
        scales: [0; 12],
        levels: [0; QK_K],
    };
    // SAFETY: AVX2 is enabled; loads read 8 of the 256 values of `x` at offsets below 256;
    // stores write arrays of exactly the stored size.
    unsafe {
        let xt = transpose::<32>(x, 32);
        let mut sum_x2 = _mm256_setzero_ps();
        for v in &xt {
            sum_x2 = _mm256_add_ps(sum_x2, _mm256_mul_ps(*v, *v));
        }
        let av_x = _mm256_sqrt_ps(_mm256_div_ps(sum_x2, _mm256_set1_ps(32.0)));
        let sign = _mm256_set1_ps(-0.0);
        let wt: [__m256; 32] =
            std::array::from_fn(|i| _mm256_add_ps(av_x, _mm256_andnot_ps(sign, xt[i])));
        let mut lt = [_mm256_setzero_si256(); 32];
        let (scale, the_min) = make_qkx2_quants_x8(nmax, &xt, &wt, &mut lt, rmin, 0.1, nstep);
        let (mut scales, mut mins) = ([0.0f32; 8], [0.0f32; 8]);
        _mm256_storeu_ps(scales.as_mut_ptr(), scale);
        _mm256_storeu_ps(mins.as_mut_ptr(), the_min);
        for (i, l) in lt.iter().enumerate() {
            let mut lanes = [0i32; 8];
            _mm256_storeu_si256(lanes.as_mut_ptr().cast(), *l);
            for (j, &q) in lanes.iter().enumerate() {
                out.levels[32 * j + i] = q as u8;
            }
        }
        pack_scales(&scales, &mins, &mut out);

        let (zero_i, nmax_i) = (_mm256_setzero_si256(), _mm256_set1_epi32(nmax));
        for j in 0..QK_K / 32 {
            let Some((d, dm)) = sub_block_scale(&out, j) else {
                continue;
            };
            let (dv, dmv) = (_mm256_set1_ps(d), _mm256_set1_ps(dm));
            let mut q = [zero_i; 4];
            for (k, q) in q.iter_mut().enumerate() {
                let v = _mm256_loadu_ps(x.as_ptr().add(32 * j + 8 * k));
                let l = nearest(_mm256_div_ps(_mm256_add_ps(v, dmv), dv));
                *q = _mm256_max_epi32(zero_i, _mm256_min_epi32(nmax_i, l));
            }
            let packed = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let ordered =
                _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(out.levels.as_mut_ptr().add(32 * j).cast(), ordered);
        }
    }
    out
}

/// `make_qx_quants` (rmse_type 1, no weights) for eight groups of 16 at once; lane j of
/// `x[i]` is element i of group j. Returns the per-lane scale and writes the levels.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn make_qx_quants_x8(
    nmax: i32,
    x: &[__m256; 16],
    l_out: &mut [__m256i; 16],
) -> __m256 {
    // SAFETY: register-only intrinsics; AVX2 is enabled.
    #[allow(unused_unsafe)]
    unsafe {
        let zero = _mm256_setzero_ps();
        let sign = _mm256_set1_ps(-0.0);
        let (lo, hi, bias) = (
            _mm256_set1_epi32(-nmax),
            _mm256_set1_epi32(nmax - 1),
            _mm256_set1_epi32(nmax),
        );
        let level = |iscale: __m256, x: __m256| {
            _mm256_max_epi32(lo, _mm256_min_epi32(hi, nearest(_mm256_mul_ps(iscale, x))))
        };
        let (mut amax, mut max) = (zero, zero);
        for v in x {
            let ax = _mm256_andnot_ps(sign, *v);
            let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(ax, amax);
            amax = _mm256_blendv_ps(amax, ax, gt);
            max = _mm256_blendv_ps(max, *v, gt);
        }
        let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(amax, _mm256_set1_ps(GROUP_MAX_EPS));

        let mut laux = [_mm256_setzero_si256(); 16];
        let sums = |iscale: __m256, laux: &mut [__m256i; 16]| {
            let (mut sumlx, mut suml2) = (zero, zero);
            for i in 0..16 {
                laux[i] = level(iscale, x[i]);
                let l = _mm256_cvtepi32_ps(laux[i]);
                let w = _mm256_mul_ps(x[i], x[i]);
                sumlx = _mm256_add_ps(sumlx, _mm256_mul_ps(_mm256_mul_ps(w, x[i]), l));
                suml2 = _mm256_add_ps(suml2, _mm256_mul_ps(_mm256_mul_ps(w, l), l));
            }
            (sumlx, suml2)
        };
        let iscale = _mm256_div_ps(_mm256_set1_ps(-nmax as f32), max);
        let (sumlx, suml2) = sums(iscale, l_out);
        let nonzero = _mm256_cmp_ps::<_CMP_NEQ_UQ>(suml2, zero);
        let mut scale = _mm256_and_ps(nonzero, _mm256_div_ps(sumlx, suml2));
        let mut best = _mm256_mul_ps(scale, sumlx);
        for is in (-9..=9).filter(|&is| is != 0) {
            let iscale = _mm256_div_ps(_mm256_set1_ps(-(nmax as f32 + 0.1 * is as f32)), max);
            let (sumlx, suml2) = sums(iscale, &mut laux);
            let better = _mm256_and_ps(
                _mm256_cmp_ps::<_CMP_GT_OQ>(suml2, zero),
                _mm256_cmp_ps::<_CMP_GT_OQ>(
                    _mm256_mul_ps(sumlx, sumlx),
                    _mm256_mul_ps(best, suml2),
                ),
            );
            if _mm256_movemask_ps(better) != 0 {
                let better_i = _mm256_castps_si256(better);
                for i in 0..16 {
                    l_out[i] = _mm256_blendv_epi8(l_out[i], laux[i], better_i);
                }
                scale = _mm256_blendv_ps(scale, _mm256_div_ps(sumlx, suml2), better);
                best = _mm256_blendv_ps(best, _mm256_mul_ps(scale, sumlx), better);
            }
        }
        // Levels are stored offset by nmax; all-zero groups store 0 and scale 0.
        let tiny_i = _mm256_castps_si256(tiny);
        for l in l_out.iter_mut() {
            *l = _mm256_andnot_si256(tiny_i, _mm256_add_epi32(*l, bias));
        }
        _mm256_andnot_ps(tiny, scale)
    }
}

/// The first pass of `quantize_row_q6_K_ref` for one super-block: the sixteen group scales
/// and levels (offset by 32), as [`super::kquants::make_qx_quants`] gives them.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn q6_first_pass(x: &[f32; QK_K], levels: &mut [i8; QK_K]) -> [f32; 16] {
    let mut scales = [0.0f32; 16];
    // SAFETY: AVX2 is enabled; stores write arrays of exactly the stored size.
    unsafe {
        for half in 0..2 {
            let xt = transpose::<16>(&x[128 * half..], 16);
            let mut lt = [_mm256_setzero_si256(); 16];
            let s = make_qx_quants_x8(32, &xt, &mut lt);
            _mm256_storeu_ps(scales.as_mut_ptr().add(8 * half), s);
            for (i, l) in lt.iter().enumerate() {
                let mut lanes = [0i32; 8];
                _mm256_storeu_si256(lanes.as_mut_ptr().cast(), *l);
                for (j, &q) in lanes.iter().enumerate() {
                    levels[128 * half + 16 * j + i] = q as i8;
                }
            }
        }
    }
    scales
}
