//! Q4_K: super-blocks of 256 as eight sub-blocks of 32 four-bit quants, each sub-block with a
//! 6-bit scale and minimum under f16 super-scales. Byte-identical with ggml's
//! `quantize_row_q4_K_ref` / `dequantize_row_q4_K`.

use super::kquants::{get_scale_min_k4, quantize_scaled, quantize_scaled_fast, ScaledLevels};
use super::{as_blocks_mut, Block};
use crate::numeric::fp16_to_fp32;
use crate::types::QK_K;
use crate::QuantType;

/// ggml's `block_q4_K`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockQ4K {
    /// Super-block scale of the sub-block scales, f16.
    pub d: [u8; 2],
    /// Super-block scale of the sub-block minimums, f16.
    pub dmin: [u8; 2],
    /// Eight 6-bit scales and eight 6-bit minimums, packed as `get_scale_min_k4` reads them.
    pub scales: [u8; 12],
    /// Nibbles: per 64 elements, element l in the low half of byte l, l + 32 in the high half.
    pub qs: [u8; QK_K / 2],
}

const _: () = assert!(
    std::mem::size_of::<BlockQ4K>() == 144,
    "ggml's sizeof(block_q4_K)"
);

// SAFETY: repr(C) byte arrays only; size 144 checked by Block::LAYOUT_OK.
unsafe impl Block for BlockQ4K {
    const TYPE: QuantType = QuantType::Q4_K;
}

pub(crate) fn quantize_block(x: &[f32; QK_K], y: &mut BlockQ4K) {
    pack(&quantize_scaled(x, 15, -1.0, 20), y);
}

/// Q4_K with the AVX2 search where the CPU has it, else the reference.
pub(crate) fn quantize_fast(src: &[f32], dst: &mut [u8]) {
    let blocks = as_blocks_mut::<BlockQ4K>(dst);
    assert_eq!(src.len(), blocks.len() * QK_K);
    for (x, y) in src.chunks_exact(QK_K).zip(blocks) {
        pack(
            &quantize_scaled_fast(x.try_into().expect("256 values"), 15, -1.0, 20),
            y,
        );
    }
}

/// Stores the header and packs the levels into ggml's layout.
fn pack(s: &ScaledLevels, y: &mut BlockQ4K) {
    y.d = s.d;
    y.dmin = s.dmin;
    y.scales = s.scales;
    for (q, l) in y.qs.chunks_exact_mut(32).zip(s.levels.chunks_exact(64)) {
        for i in 0..32 {
            q[i] = l[i] | (l[i + 32] << 4);
        }
    }
}

pub(crate) fn dequantize_block(x: &BlockQ4K, y: &mut [f32; QK_K]) {
    let d = fp16_to_fp32(u16::from_le_bytes(x.d));
    let min = fp16_to_fp32(u16::from_le_bytes(x.dmin));
    for (pair, (q, out)) in
        x.qs.chunks_exact(32)
            .zip(y.chunks_exact_mut(64))
            .enumerate()
    {
        let (sc1, m1) = get_scale_min_k4(2 * pair, &x.scales);
        let (sc2, m2) = get_scale_min_k4(2 * pair + 1, &x.scales);
        let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
        for l in 0..32 {
            out[l] = d1 * f32::from(q[l] & 0xF) - m1;
            out[l + 32] = d2 * f32::from(q[l] >> 4) - m2;
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
        let x = values(QK_K * 4, 1.0, 51);
        let mut bytes = vec![0u8; 144 * 4];
        quantize_blocks(&x, &mut bytes, quantize_block);
        let mut back = vec![0f32; x.len()];
        dequantize_blocks(&bytes, &mut back, dequantize_block);
        assert!(
            max_err(&x, &back) < 2.0 / 15.0 * 0.75,
            "{}",
            max_err(&x, &back)
        );
    }

    #[test]
    fn all_zero_block_is_all_zero_bytes() {
        let mut y = BlockQ4K {
            d: [1; 2],
            dmin: [1; 2],
            scales: [1; 12],
            qs: [1; 128],
        };
        quantize_block(&[0.0; QK_K], &mut y);
        assert_eq!((y.d, y.dmin, y.scales), ([0; 2], [0; 2], [0; 12]));
        assert!(y.qs.iter().all(|&q| q == 0));
    }
}
