//! Q5_K: super-blocks of 256 as eight sub-blocks of 32 five-bit quants, each sub-block with a
//! 6-bit scale and minimum under f16 super-scales. Byte-identical with ggml's
//! `quantize_row_q5_K_ref` / `dequantize_row_q5_K`.

use super::kquants::{get_scale_min_k4, quantize_scaled, quantize_scaled_fast, ScaledLevels};
use super::{as_blocks_mut, Block};
use crate::numeric::fp16_to_fp32;
use crate::types::QK_K;
use crate::QuantType;

/// ggml's `block_q5_K`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockQ5K {
    /// Super-block scale of the sub-block scales, f16.
    pub d: [u8; 2],
    /// Super-block scale of the sub-block minimums, f16.
    pub dmin: [u8; 2],
    /// Eight 6-bit scales and eight 6-bit minimums, packed as `get_scale_min_k4` reads them.
    pub scales: [u8; 12],
    /// Fifth bits: bit 2k of byte l for element 64k + l, bit 2k + 1 for element 64k + 32 + l.
    pub qh: [u8; QK_K / 8],
    /// Low nibbles, laid out as in Q4_K.
    pub qs: [u8; QK_K / 2],
}

const _: () = assert!(
    std::mem::size_of::<BlockQ5K>() == 176,
    "ggml's sizeof(block_q5_K)"
);

// SAFETY: repr(C) byte arrays only; size 176 checked by Block::LAYOUT_OK.
unsafe impl Block for BlockQ5K {
    const TYPE: QuantType = QuantType::Q5_K;
}

pub(crate) fn quantize_block(x: &[f32; QK_K], y: &mut BlockQ5K) {
    pack(&quantize_scaled(x, 31, -0.5, 15), y);
}

/// Q5_K with the AVX2 search where the CPU has it, else the reference.
pub(crate) fn quantize_fast(src: &[f32], dst: &mut [u8]) {
    let blocks = as_blocks_mut::<BlockQ5K>(dst);
    assert_eq!(src.len(), blocks.len() * QK_K);
    for (x, y) in src.chunks_exact(QK_K).zip(blocks) {
        pack(
            &quantize_scaled_fast(x.try_into().expect("256 values"), 31, -0.5, 15),
            y,
        );
    }
}

/// Stores the header and packs the levels into ggml's layout.
fn pack(s: &ScaledLevels, y: &mut BlockQ5K) {
    y.d = s.d;
    y.dmin = s.dmin;
    y.scales = s.scales;
    y.qh = [0; QK_K / 8];
    for (k, (ql, l)) in
        y.qs.chunks_exact_mut(32)
            .zip(s.levels.chunks_exact(64))
            .enumerate()
    {
        let (m1, m2) = (1u8 << (2 * k), 2u8 << (2 * k));
        for j in 0..32 {
            let (mut l1, mut l2) = (l[j], l[j + 32]);
            if l1 > 15 {
                l1 -= 16;
                y.qh[j] |= m1;
            }
            if l2 > 15 {
                l2 -= 16;
                y.qh[j] |= m2;
            }
            ql[j] = l1 | (l2 << 4);
        }
    }
}

pub(crate) fn dequantize_block(x: &BlockQ5K, y: &mut [f32; QK_K]) {
    let d = fp16_to_fp32(u16::from_le_bytes(x.d));
    let min = fp16_to_fp32(u16::from_le_bytes(x.dmin));
    for (pair, (ql, out)) in
        x.qs.chunks_exact(32)
            .zip(y.chunks_exact_mut(64))
            .enumerate()
    {
        let (sc1, m1) = get_scale_min_k4(2 * pair, &x.scales);
        let (sc2, m2) = get_scale_min_k4(2 * pair + 1, &x.scales);
        let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
        let (u1, u2) = (1u8 << (2 * pair), 2u8 << (2 * pair));
        for l in 0..32 {
            let h1 = if x.qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if x.qh[l] & u2 != 0 { 16 } else { 0 };
            out[l] = d1 * f32::from((ql[l] & 0xF) + h1) - m1;
            out[l + 32] = d2 * f32::from((ql[l] >> 4) + h2) - m2;
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
        let x = values(QK_K * 4, 1.0, 61);
        let mut bytes = vec![0u8; 176 * 4];
        quantize_blocks(&x, &mut bytes, quantize_block);
        let mut back = vec![0f32; x.len()];
        dequantize_blocks(&bytes, &mut back, dequantize_block);
        assert!(
            max_err(&x, &back) < 2.0 / 31.0 * 0.75,
            "{}",
            max_err(&x, &back)
        );
    }

    #[test]
    fn high_levels_set_qh_bits() {
        let x: [f32; QK_K] = std::array::from_fn(|i| (i % 32) as f32);
        let mut y = BlockQ5K {
            d: [0; 2],
            dmin: [0; 2],
            scales: [0; 12],
            qh: [0; 32],
            qs: [0; 128],
        };
        quantize_block(&x, &mut y);
        let mut back = [0f32; QK_K];
        dequantize_block(&y, &mut back);
        assert!(max_err(&x, &back) < 0.05, "{}", max_err(&x, &back));
        assert_eq!(y.qh[31], 0xFF); // element 31 of every sub-block is level 31
    }
}
