//! Q6_K: super-blocks of 256 as sixteen sub-blocks of 16 six-bit quants, each sub-block with
//! a signed 8-bit scale under an f16 super-scale. Byte-identical with ggml's
//! `quantize_row_q6_K_ref` / `dequantize_row_q6_K`.

use super::kquants::{make_qx_quants, GROUP_MAX_EPS};
use super::{as_blocks_mut, Block};
use crate::numeric::{fp16_to_fp32, fp32_to_fp16, nearest_int};
use crate::types::QK_K;
use crate::QuantType;

/// ggml's `block_q6_K`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockQ6K {
    /// Low four bits of the quants.
    pub ql: [u8; QK_K / 2],
    /// High two bits of the quants.
    pub qh: [u8; QK_K / 4],
    /// Sub-block scales, signed 8-bit.
    pub scales: [i8; QK_K / 16],
    /// Super-block scale, f16.
    pub d: [u8; 2],
}

const _: () = assert!(
    std::mem::size_of::<BlockQ6K>() == 210,
    "ggml's sizeof(block_q6_K)"
);

// SAFETY: repr(C) byte arrays only; size 210 checked by Block::LAYOUT_OK.
unsafe impl Block for BlockQ6K {
    const TYPE: QuantType = QuantType::Q6_K;
}

pub(crate) fn quantize_block(x: &[f32; QK_K], y: &mut BlockQ6K) {
    let mut levels = [0i8; QK_K];
    let mut scales = [0.0f32; QK_K / 16];
    for ib in 0..QK_K / 16 {
        let xs: &[f32; 16] = x[16 * ib..16 * ib + 16].try_into().expect("16 values");
        let ls: &mut [i8; 16] = (&mut levels[16 * ib..16 * ib + 16]).try_into().expect("16");
        scales[ib] = make_qx_quants(32, xs, ls);
    }
    finish(x, &scales, &mut levels, y);
}

/// Q6_K with the AVX2 first pass where the CPU has it, else the reference.
pub(crate) fn quantize_fast(src: &[f32], dst: &mut [u8]) {
    let blocks = as_blocks_mut::<BlockQ6K>(dst);
    assert_eq!(src.len(), blocks.len() * QK_K);
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        for (x, y) in src.chunks_exact(QK_K).zip(blocks) {
            let x = x.try_into().expect("256 values");
            let mut levels = [0i8; QK_K];
            // SAFETY: the CPU supports AVX2, checked above.
            let scales = unsafe { super::kquants_avx2::q6_first_pass(x, &mut levels) };
            finish(x, &scales, &mut levels, y);
        }
        return;
    }
    for (x, y) in src.chunks_exact(QK_K).zip(blocks) {
        quantize_block(x.try_into().expect("256 values"), y);
    }
}

/// Everything after the per-group search: the 8-bit group scales under the f16 super-scale,
/// requantization with them (groups whose scale is zero keep their levels), and packing.
fn finish(x: &[f32; QK_K], scales: &[f32; QK_K / 16], levels: &mut [i8; QK_K], y: &mut BlockQ6K) {
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for &scale in scales {
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }

    if max_abs_scale < GROUP_MAX_EPS {
        *y = BlockQ6K {
            ql: [0; QK_K / 2],
            qh: [0; QK_K / 4],
            scales: [0; QK_K / 16],
            d: [0; 2],
        };
        y.d = fp32_to_fp16(0.0).to_le_bytes();
        return;
    }

    let iscale = -128.0 / max_scale;
    y.d = fp32_to_fp16(1.0 / iscale).to_le_bytes();
    for (s, &scale) in y.scales.iter_mut().zip(scales) {
        *s = nearest_int(iscale * scale).min(127) as i8;
    }

    let d_all = fp16_to_fp32(u16::from_le_bytes(y.d));
    for j in 0..QK_K / 16 {
        let d = d_all * f32::from(y.scales[j]);
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let l = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
            levels[16 * j + ii] = (l + 32) as i8;
        }
    }

    for (half, l) in levels.chunks_exact(128).enumerate() {
        let ql = &mut y.ql[64 * half..64 * half + 64];
        let qh = &mut y.qh[32 * half..32 * half + 32];
        for i in 0..32 {
            let [q1, q2, q3, q4] = [l[i], l[i + 32], l[i + 64], l[i + 96]].map(|q| q as u8);
            ql[i] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            ql[i + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            qh[i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
}

pub(crate) fn dequantize_block(x: &BlockQ6K, y: &mut [f32; QK_K]) {
    let d = fp16_to_fp32(u16::from_le_bytes(x.d));
    for (half, out) in y.chunks_exact_mut(128).enumerate() {
        let ql = &x.ql[64 * half..64 * half + 64];
        let qh = &x.qh[32 * half..32 * half + 32];
        let sc = &x.scales[8 * half..8 * half + 8];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            out[l] = d * f32::from(sc[is]) * f32::from(q1);
            out[l + 32] = d * f32::from(sc[is + 2]) * f32::from(q2);
            out[l + 64] = d * f32::from(sc[is + 4]) * f32::from(q3);
            out[l + 96] = d * f32::from(sc[is + 6]) * f32::from(q4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::testing::{max_err, values};
    use crate::formats::{dequantize_blocks, quantize_blocks};

    #[test]
    fn round_trip_error_is_small() {
        let x = values(QK_K * 4, 1.0, 71);
        let mut bytes = vec![0u8; 210 * 4];
        quantize_blocks(&x, &mut bytes, quantize_block);
        let mut back = vec![0f32; x.len()];
        dequantize_blocks(&bytes, &mut back, dequantize_block);
        assert!(max_err(&x, &back) < 1.0 / 32.0, "{}", max_err(&x, &back));
    }

    #[test]
    fn all_zero_block_is_all_zero_bytes() {
        let mut y = BlockQ6K {
            ql: [1; 128],
            qh: [1; 64],
            scales: [1; 16],
            d: [1; 2],
        };
        quantize_block(&[0.0; QK_K], &mut y);
        assert!(y.ql.iter().chain(&y.qh).all(|&q| q == 0));
        assert_eq!((y.scales, y.d), ([0; 16], [0; 2]));
    }
}
