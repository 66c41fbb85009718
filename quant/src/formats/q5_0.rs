//! Q5_0: 32 five-bit quants around 16 and one f16 scale; the fifth bits live in `qh`.
//! Byte-identical with ggml's `quantize_row_q5_0_ref` / `dequantize_row_q5_0`.

use super::{as_blocks_mut, Block};
use crate::numeric::{c_f32_to_i32, fp16_to_fp32, fp32_to_fp16};
use crate::QuantType;

pub(crate) const QK5_0: usize = 32;

/// ggml's `block_q5_0`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockQ5_0 {
    /// Scale, f16.
    pub d: [u8; 2],
    /// Fifth bit of element j at bit j (little-endian u32).
    pub qh: [u8; 4],
    /// Low nibbles: element j in the low half of byte j, element j + 16 in the high half.
    pub qs: [u8; QK5_0 / 2],
}

const _: () = assert!(
    std::mem::size_of::<BlockQ5_0>() == 22,
    "ggml's sizeof(block_q5_0)"
);

// SAFETY: repr(C) byte arrays only; size 22 checked by Block::LAYOUT_OK.
unsafe impl Block for BlockQ5_0 {
    const TYPE: QuantType = QuantType::Q5_0;
}

/// `MIN(31, (int8_t)(v + 16.5f))` as C computes it on x86-64.
#[inline(always)]
fn level(v: f32) -> u8 {
    (c_f32_to_i32(v + 16.5) as i8).min(31) as u8
}

pub(crate) fn quantize_block(x: &[f32; QK5_0], y: &mut BlockQ5_0) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y.d = fp32_to_fp16(d).to_le_bytes();
    let mut qh = 0u32;
    for j in 0..QK5_0 / 2 {
        let x0 = level(x[j] * id);
        let x1 = level(x[j + QK5_0 / 2] * id);
        y.qs[j] = (x0 & 0x0F) | ((x1 & 0x0F) << 4);
        qh |= u32::from((x0 & 0x10) >> 4) << j;
        qh |= u32::from((x1 & 0x10) >> 4) << (j + QK5_0 / 2);
    }
    y.qh = qh.to_le_bytes();
}

pub(crate) fn dequantize_block(x: &BlockQ5_0, y: &mut [f32; QK5_0]) {
    let d = fp16_to_fp32(u16::from_le_bytes(x.d));
    let qh = u32::from_le_bytes(x.qh);
    for j in 0..QK5_0 / 2 {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = i32::from((x.qs[j] & 0x0F) | xh0) - 16;
        let x1 = i32::from((x.qs[j] >> 4) | xh1) - 16;
        y[j] = x0 as f32 * d;
        y[j + QK5_0 / 2] = x1 as f32 * d;
    }
}

/// Q5_0 with AVX2 where the CPU has it, else the reference.
pub(crate) fn quantize_fast(src: &[f32], dst: &mut [u8]) {
    let blocks = as_blocks_mut::<BlockQ5_0>(dst);
    assert_eq!(src.len(), blocks.len() * QK5_0);
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { avx2::quantize(src, blocks) };
        return;
    }
    for (x, y) in src.chunks_exact(QK5_0).zip(blocks) {
        quantize_block(x.try_into().expect("whole blocks"), y);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockQ5_0, QK5_0};
    use crate::formats::avx2::*;
    use crate::numeric::fp32_to_fp16;

    /// Same bytes as the reference, block by block.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize(src: &[f32], blocks: &mut [BlockQ5_0]) {
        for (x, y) in src.chunks_exact(QK5_0).zip(blocks) {
            // SAFETY: AVX2 is enabled for this function.
            unsafe { quantize_block(x.try_into().expect("whole blocks"), y) };
        }
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn quantize_block(x: &[f32; QK5_0], y: &mut BlockQ5_0) {
        // SAFETY: AVX2 is enabled; the helpers read `x` and write `y` only.
        unsafe {
            let v = load32(x);
            let a = abs4(&v);
            let max = first_with_magnitude(x, &a, max4(&a));
            let d = max / -16.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            if d.is_subnormal() {
                // `x * id` may leave the range where SIMD conversion matches C's.
                return super::quantize_block(x, y);
            }
            y.d = fp32_to_fp16(d).to_le_bytes();
            let l = trunc_levels(&v, 0.0, id, 16.5, 31);
            y.qh = fifth_bits(&l).to_le_bytes();
            pack_nibbles(low_nibbles(l), &mut y.qs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::testing::{max_err, values};
    use crate::formats::{dequantize_blocks, quantize_blocks};

    #[test]
    fn round_trip_error_is_within_one_step() {
        let x = values(32 * 8, 4.0, 31);
        let mut bytes = vec![0u8; 22 * 8];
        quantize_blocks(&x, &mut bytes, quantize_block);
        let mut back = vec![0f32; x.len()];
        dequantize_blocks(&bytes, &mut back, dequantize_block);
        assert!(max_err(&x, &back) <= 4.0 / 16.0);
    }

    #[test]
    fn fifth_bits_land_in_qh() {
        let mut x = [0.0f32; 32];
        x[0] = -16.0; // scale 1, level 0
        x[20] = 15.0; // level 31: fifth bit set at bit 20
        let mut y = BlockQ5_0 {
            d: [0; 2],
            qh: [0; 4],
            qs: [0; 16],
        };
        quantize_block(&x, &mut y);
        let qh = u32::from_le_bytes(y.qh);
        assert_eq!(qh & 1, 0);
        assert_ne!(qh & (1 << 20), 0);
        assert_eq!(y.qs[4] >> 4, 15);
    }
}
