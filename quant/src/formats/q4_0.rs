//! Q4_0: 32 four-bit quants around 8 and one f16 scale. Byte-identical with ggml's
//! `quantize_row_q4_0_ref` / `dequantize_row_q4_0`.

use super::{as_blocks_mut, Block};
use crate::numeric::{c_f32_to_i32, fp16_to_fp32, fp32_to_fp16};
use crate::QuantType;

pub(crate) const QK4_0: usize = 32;

/// ggml's `block_q4_0`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockQ4_0 {
    /// Scale, f16.
    pub d: [u8; 2],
    /// Nibbles: element j in the low half of byte j, element j + 16 in the high half.
    pub qs: [u8; QK4_0 / 2],
}

const _: () = assert!(
    std::mem::size_of::<BlockQ4_0>() == 18,
    "ggml's sizeof(block_q4_0)"
);

// SAFETY: repr(C) byte arrays only; size 18 checked by Block::LAYOUT_OK.
unsafe impl Block for BlockQ4_0 {
    const TYPE: QuantType = QuantType::Q4_0;
}

/// `MIN(15, (int8_t)(v + 8.5f))` as C computes it on x86-64.
#[inline(always)]
fn level(v: f32) -> u8 {
    (c_f32_to_i32(v + 8.5) as i8).min(15) as u8
}

/// The signed value of largest magnitude (the first one on ties, +0.0 for an all-zero block)
/// becomes −8 · d; the scale is therefore negative when that value is positive.
#[inline(always)]
fn scale(max: f32) -> (f32, f32) {
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    (d, id)
}

pub(crate) fn quantize_block(x: &[f32; QK4_0], y: &mut BlockQ4_0) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let (d, id) = scale(max);
    y.d = fp32_to_fp16(d).to_le_bytes();
    for j in 0..QK4_0 / 2 {
        let x0 = level(x[j] * id);
        let x1 = level(x[j + QK4_0 / 2] * id);
        y.qs[j] = x0 | (x1 << 4);
    }
}

pub(crate) fn dequantize_block(x: &BlockQ4_0, y: &mut [f32; QK4_0]) {
    let d = fp16_to_fp32(u16::from_le_bytes(x.d));
    for j in 0..QK4_0 / 2 {
        let x0 = i32::from(x.qs[j] & 0x0F) - 8;
        let x1 = i32::from(x.qs[j] >> 4) - 8;
        y[j] = x0 as f32 * d;
        y[j + QK4_0 / 2] = x1 as f32 * d;
    }
}

/// Q4_0 with AVX2 where the CPU has it, else the reference.
pub(crate) fn quantize_fast(src: &[f32], dst: &mut [u8]) {
    let blocks = as_blocks_mut::<BlockQ4_0>(dst);
    assert_eq!(src.len(), blocks.len() * QK4_0);
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { avx2::quantize(src, blocks) };
        return;
    }
    for (x, y) in src.chunks_exact(QK4_0).zip(blocks) {
        quantize_block(x.try_into().expect("whole blocks"), y);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{scale, BlockQ4_0, QK4_0};
    use crate::formats::avx2::*;
    use crate::numeric::fp32_to_fp16;

    /// Same bytes as the reference, block by block.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize(src: &[f32], blocks: &mut [BlockQ4_0]) {
        for (x, y) in src.chunks_exact(QK4_0).zip(blocks) {
            // SAFETY: AVX2 is enabled for this function.
            unsafe { quantize_block(x.try_into().expect("whole blocks"), y) };
        }
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn quantize_block(x: &[f32; QK4_0], y: &mut BlockQ4_0) {
        // SAFETY: AVX2 is enabled; the helpers read `x` and write `y` only.
        unsafe {
            let v = load32(x);
            let a = abs4(&v);
            let max = first_with_magnitude(x, &a, max4(&a));
            let (d, id) = scale(max);
            if d.is_subnormal() {
                // `x * id` may leave the range where SIMD conversion matches C's.
                return super::quantize_block(x, y);
            }
            y.d = fp32_to_fp16(d).to_le_bytes();
            pack_nibbles(trunc_levels(&v, 0.0, id, 8.5, 15), &mut y.qs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::testing::{half, max_err, values};
    use crate::formats::{dequantize_blocks, quantize_blocks};

    #[test]
    fn round_trip_error_is_within_one_step() {
        let x = values(32 * 8, 4.0, 11);
        let mut bytes = vec![0u8; 18 * 8];
        quantize_blocks(&x, &mut bytes, quantize_block);
        let mut back = vec![0f32; x.len()];
        dequantize_blocks(&bytes, &mut back, dequantize_block);
        assert!(max_err(&x, &back) <= 4.0 / 8.0);
    }

    #[test]
    fn all_zero_block_stores_negative_zero_scale() {
        let mut y = BlockQ4_0 {
            d: [0; 2],
            qs: [0; 16],
        };
        quantize_block(&[0.0; 32], &mut y);
        assert_eq!(u16::from_le_bytes(y.d), 0x8000);
        assert_eq!(y.qs, [0x88; 16]);
    }

    #[test]
    fn first_of_equal_magnitudes_sets_the_sign() {
        let mut x = [0.0f32; 32];
        x[3] = -2.0;
        x[9] = 2.0;
        let mut y = BlockQ4_0 {
            d: [0; 2],
            qs: [0; 16],
        };
        quantize_block(&x, &mut y);
        assert_eq!(half(y.d), 0.25);
        assert_eq!(y.qs[3] & 0xF, 0);
        assert_eq!(y.qs[9] & 0xF, 15); // +2 / 0.25 + 8 = 16, clamped
    }

    #[test]
    fn fast_path_equals_reference() {
        let mut x = values(32 * 64, 10.0, 13);
        x.extend(values(32 * 8, 1e-38, 14));
        x.extend([0.0; 32]);
        x.extend([-0.0; 32]);
        x.extend((0..32).map(|i| if i % 2 == 0 { 3.0 } else { -3.0 }));
        for v in x.iter_mut().step_by(7) {
            *v = (*v * 4.0).round() / 4.0 + 0.125;
        }
        let mut a = vec![0u8; x.len() / 32 * 18];
        let mut b = a.clone();
        quantize_blocks(&x, &mut a, quantize_block);
        quantize_fast(&x, &mut b);
        assert_eq!(a, b);
    }
}
