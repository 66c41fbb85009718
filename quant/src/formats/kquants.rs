//! Helpers shared by the K formats, each byte-identical with the static ggml function it names
//! (`make_qkx2_quants`, `make_qx_quants`, `get_scale_min_k4`), and the scale search common to
//! Q4_K and Q5_K.
//!
//! Every expression keeps C's operand order and uses no fused multiply-add: ggml's reference
//! quantizers are compiled without contraction, and the searches below compare float errors
//! where one rounding difference changes the chosen levels.

use crate::numeric::{fp16_to_fp32, fp32_to_fp16, nearest_int};
use crate::types::QK_K;

/// ggml's `GROUP_MAX_EPS`: below this largest magnitude a group counts as all zero.
pub(crate) const GROUP_MAX_EPS: f32 = 1e-15;

/// `make_qkx2_quants` for a group of 32 with `use_mad = false`: levels in `0..=nmax` for
/// `x ≈ scale · L − the_min`, searching `nstep + 1` candidate scales.
/// Returns `(scale, the_min)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn make_qkx2_quants(
    nmax: i32,
    x: &[f32; 32],
    weights: &[f32; 32],
    l_out: &mut [u8; 32],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..32 {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out.fill(0);
        return (0.0, -min);
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..32 {
        let l = nearest_int(iscale * (x[i] - min));
        l_out[i] = l.clamp(0, nmax) as u8;
        let diff = scale * f32::from(l_out[i]) + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..32 {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = l as u8;
            let (w, lf) = (weights[i], l as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..32 {
                let diff = this_scale * f32::from(laux[i]) + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                *l_out = laux;
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// `make_qx_quants` for a group of 16 with `rmse_type = 1` and no importance weights (the only
/// use the reference Q6_K makes of it): signed levels `L − nmax` in `-nmax..nmax`, weighted by
/// x². Returns the scale.
pub(crate) fn make_qx_quants(nmax: i32, x: &[f32; 16], l_out: &mut [i8; 16]) -> f32 {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let nmax_f = nmax as f32;
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let l = level(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let iscale = -nmax_f / max;
    for (q, &v) in l_out.iter_mut().zip(x) {
        *q = (level(iscale, v) + nmax) as i8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax_f + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (q, &v) in l_out.iter_mut().zip(x) {
                *q = (level(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `get_scale_min_k4`: the 6-bit scale and minimum of sub-block `j` from the packed 12 bytes.
#[inline]
pub(crate) fn get_scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The header and levels Q4_K and Q5_K share: f16 `d` and `dmin`, the packed 6-bit
/// sub-block scales and minimums, and one level in `0..=nmax` per element.
pub(crate) struct ScaledLevels {
    pub d: [u8; 2],
    pub dmin: [u8; 2],
    pub scales: [u8; 12],
    pub levels: [u8; QK_K],
}

/// [`quantize_scaled`] through its AVX2 twin where the CPU has AVX2 (same bytes; the twin runs
/// one sub-block per lane through the same sequence of float operations), else the reference.
pub(crate) fn quantize_scaled_fast(
    x: &[f32; QK_K],
    nmax: i32,
    rmin: f32,
    nstep: i32,
) -> ScaledLevels {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { super::kquants_avx2::quantize_scaled(x, nmax, rmin, nstep) };
    }
    quantize_scaled(x, nmax, rmin, nstep)
}

/// The common body of `quantize_row_q4_K_ref` (`nmax` 15, `rmin` −1, 20 steps) and
/// `quantize_row_q5_K_ref` (`nmax` 31, `rmin` −0.5, 15 steps): per 32-element sub-block
/// search, 6-bit quantization of scales and minimums against their maxima, then requantization
/// of every sub-block with the f16-rounded scales. A sub-block whose scale rounds to zero keeps
/// its first-pass levels.
pub(crate) fn quantize_scaled(x: &[f32; QK_K], nmax: i32, rmin: f32, nstep: i32) -> ScaledLevels {
    let mut out = ScaledLevels {
        d: [0; 2],
        dmin: [0; 2],
        scales: [0; 12],
        levels: [0; QK_K],
    };
    let mut scales = [0.0f32; QK_K / 32];
    let mut mins = [0.0f32; QK_K / 32];
    for j in 0..QK_K / 32 {
        let xs: &[f32; 32] = x[32 * j..32 * j + 32].try_into().expect("32 values");
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights = xs.map(|v| av_x + v.abs());
        let ls: &mut [u8; 32] = (&mut out.levels[32 * j..32 * j + 32])
            .try_into()
            .expect("32 levels");
        (scales[j], mins[j]) = make_qkx2_quants(nmax, xs, &weights, ls, rmin, 0.1, nstep);
    }
    pack_scales(&scales, &mins, &mut out);
    for j in 0..QK_K / 32 {
        if let Some((d, dm)) = sub_block_scale(&out, j) {
            for ii in 0..32 {
                let l = nearest_int((x[32 * j + ii] + dm) / d);
                out.levels[32 * j + ii] = l.clamp(0, nmax) as u8;
            }
        }
    }
    out
}

/// Quantizes the sub-block scales and minimums to 6 bits against their maxima and stores
/// them, with the f16 super-scales, in `out`.
pub(crate) fn pack_scales(scales: &[f32; 8], mins: &[f32; 8], out: &mut ScaledLevels) {
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..QK_K / 32 {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    for j in 0..QK_K / 32 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            out.scales[j] = ls;
            out.scales[j + 4] = lm;
        } else {
            out.scales[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            out.scales[j - 4] |= (ls >> 4) << 6;
            out.scales[j] |= (lm >> 4) << 6;
        }
    }
    out.d = fp32_to_fp16(max_scale / 63.0).to_le_bytes();
    out.dmin = fp32_to_fp16(max_min / 63.0).to_le_bytes();
}

/// The f16-rounded scale and minimum of sub-block `j`, or `None` when the scale is zero and
/// the sub-block keeps its first-pass levels.
#[inline]
pub(crate) fn sub_block_scale(out: &ScaledLevels, j: usize) -> Option<(f32, f32)> {
    let (sc, m) = get_scale_min_k4(j, &out.scales);
    let d = fp16_to_fp32(u16::from_le_bytes(out.d)) * f32::from(sc);
    if d == 0.0 {
        return None;
    }
    Some((d, fp16_to_fp32(u16::from_le_bytes(out.dmin)) * f32::from(m)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::testing::values;

    #[test]
    fn scale_min_packing_round_trips() {
        // Pack as quantize_scaled does, unpack with get_scale_min_k4.
        let pairs: Vec<(u8, u8)> = (0..8)
            .map(|j| ((j * 9 + 5) % 64, (j * 23 + 40) % 64))
            .collect();
        let mut q = [0u8; 12];
        for (j, &(ls, lm)) in pairs.iter().enumerate() {
            if j < 4 {
                q[j] = ls;
                q[j + 4] = lm;
            } else {
                q[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
                q[j - 4] |= (ls >> 4) << 6;
                q[j] |= (lm >> 4) << 6;
            }
        }
        for (j, &pair) in pairs.iter().enumerate() {
            assert_eq!(get_scale_min_k4(j, &q), pair, "sub-block {j}");
        }
    }

    #[test]
    fn qkx2_fits_an_affine_grid_exactly() {
        // x = 0.25·L − 1 for L = 0..31 cycled through 0..=15.
        let x: [f32; 32] = std::array::from_fn(|i| 0.25 * (i % 16) as f32 - 1.0);
        let w = [1.0f32; 32];
        let mut l = [0u8; 32];
        let (scale, the_min) = make_qkx2_quants(15, &x, &w, &mut l, -1.0, 0.1, 20);
        assert!(
            (scale - 0.25).abs() < 1e-6 && (the_min - 1.0).abs() < 1e-6,
            "{scale} {the_min}"
        );
        assert!(l.iter().enumerate().all(|(i, &q)| usize::from(q) == i % 16));
    }

    #[test]
    fn qx_zero_group_gives_zero_scale() {
        let mut l = [5i8; 16];
        assert_eq!(make_qx_quants(32, &[0.0; 16], &mut l), 0.0);
        assert_eq!(l, [0; 16]);
        let x: [f32; 16] = values(16, 1.0, 5).try_into().unwrap();
        let s = make_qx_quants(32, &x, &mut l);
        assert!(s != 0.0 && l.iter().all(|&q| (0..64).contains(&q)));
    }
}
