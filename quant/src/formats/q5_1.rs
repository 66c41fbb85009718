//! Q5_1: 32 five-bit quants above a minimum, with f16 scale and minimum; the fifth bits live
//! in `qh`. Byte-identical with ggml's `quantize_row_q5_1_ref` / `dequantize_row_q5_1`.

use super::{as_blocks_mut, Block};
use crate::numeric::{c_f32_to_i32, fp16_to_fp32, fp32_to_fp16};
use crate::QuantType;

pub(crate) const QK5_1: usize = 32;

/// ggml's `block_q5_1`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockQ5_1 {
    /// Scale, f16.
    pub d: [u8; 2],
    /// Minimum, f16.
    pub m: [u8; 2],
    /// Fifth bit of element j at bit j (little-endian u32).
    pub qh: [u8; 4],
    /// Low nibbles: element j in the low half of byte j, element j + 16 in the high half.
    pub qs: [u8; QK5_1 / 2],
}

const _: () = assert!(
    std::mem::size_of::<BlockQ5_1>() == 24,
    "ggml's sizeof(block_q5_1)"
);

// SAFETY: repr(C) byte arrays only; size 24 checked by Block::LAYOUT_OK.
unsafe impl Block for BlockQ5_1 {
    const TYPE: QuantType = QuantType::Q5_1;
}

/// `(uint8_t)(v + 0.5f)` as C computes it on x86-64 (no clamp in ggml for this format).
#[inline(always)]
fn level(v: f32) -> u8 {
    c_f32_to_i32(v + 0.5) as u8
}

pub(crate) fn quantize_block(x: &[f32; QK5_1], y: &mut BlockQ5_1) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y.d = fp32_to_fp16(d).to_le_bytes();
    y.m = fp32_to_fp16(min).to_le_bytes();
    let mut qh = 0u32;
    for j in 0..QK5_1 / 2 {
        let x0 = level((x[j] - min) * id);
        let x1 = level((x[j + QK5_1 / 2] - min) * id);
        y.qs[j] = (x0 & 0x0F) | ((x1 & 0x0F) << 4);
        qh |= u32::from((x0 & 0x10) >> 4) << j;
        qh |= u32::from((x1 & 0x10) >> 4) << (j + QK5_1 / 2);
    }
    y.qh = qh.to_le_bytes();
}

pub(crate) fn dequantize_block(x: &BlockQ5_1, y: &mut [f32; QK5_1]) {
    let d = fp16_to_fp32(u16::from_le_bytes(x.d));
    let m = fp16_to_fp32(u16::from_le_bytes(x.m));
    let qh = u32::from_le_bytes(x.qh);
    for j in 0..QK5_1 / 2 {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = f32::from((x.qs[j] & 0x0F) | xh0) * d + m;
        y[j + QK5_1 / 2] = f32::from((x.qs[j] >> 4) | xh1) * d + m;
    }
}

/// Q5_1 with AVX2 where the CPU has it, else the reference.
pub(crate) fn quantize_fast(src: &[f32], dst: &mut [u8]) {
    let blocks = as_blocks_mut::<BlockQ5_1>(dst);
    assert_eq!(src.len(), blocks.len() * QK5_1);
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { avx2::quantize(src, blocks) };
        return;
    }
    for (x, y) in src.chunks_exact(QK5_1).zip(blocks) {
        quantize_block(x.try_into().expect("whole blocks"), y);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockQ5_1, QK5_1};
    use crate::formats::avx2::*;
    use crate::numeric::fp32_to_fp16;

    /// Same bytes as the reference, block by block.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize(src: &[f32], blocks: &mut [BlockQ5_1]) {
        for (x, y) in src.chunks_exact(QK5_1).zip(blocks) {
            // SAFETY: AVX2 is enabled for this function.
            unsafe { quantize_block(x.try_into().expect("whole blocks"), y) };
        }
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn quantize_block(x: &[f32; QK5_1], y: &mut BlockQ5_1) {
        // SAFETY: AVX2 is enabled; the helpers read `x` and write `y` only.
        unsafe {
            let v = load32(x);
            let (min, max) = (min4(&v), max4(&v));
            let d = (max - min) / 31.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            // A zero extreme's sign depends on which zero the scalar scan met first; a
            // non-normal scale puts levels out of the range where SIMD conversion matches C's.
            if min == 0.0 || max == 0.0 || !(d == 0.0 || d.is_normal()) {
                return super::quantize_block(x, y);
            }
            y.d = fp32_to_fp16(d).to_le_bytes();
            y.m = fp32_to_fp16(min).to_le_bytes();
            // No cap, as in ggml: levels stay in 0..=31 for a normal scale.
            let l = trunc_levels(&v, min, id, 0.5, i32::MAX);
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
        let x: Vec<f32> = values(32 * 8, 2.0, 41).iter().map(|v| v - 3.0).collect();
        let mut bytes = vec![0u8; 24 * 8];
        quantize_blocks(&x, &mut bytes, quantize_block);
        let mut back = vec![0f32; x.len()];
        dequantize_blocks(&bytes, &mut back, dequantize_block);
        assert!(max_err(&x, &back) <= 4.0 / 31.0);
    }

    #[test]
    fn extremes_map_to_levels_zero_and_31() {
        let mut x = [0.5f32; 32];
        x[0] = 0.0;
        x[31] = 31.0;
        let mut y = BlockQ5_1 {
            d: [0; 2],
            m: [0; 2],
            qh: [0; 4],
            qs: [0; 16],
        };
        quantize_block(&x, &mut y);
        assert_eq!(y.qs[0] & 0xF, 0);
        assert_eq!(y.qs[15] >> 4, 15);
        assert_ne!(u32::from_le_bytes(y.qh) & (1 << 31), 0);
    }
}
