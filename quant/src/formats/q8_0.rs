//! Q8_0: 32 signed bytes and one f16 scale. Byte-identical with ggml's
//! `quantize_row_q8_0_ref` / `dequantize_row_q8_0`.

use super::{as_blocks_mut, Block};
use crate::numeric::{c_f32_to_i32, fp16_to_fp32, fp32_to_fp16};
use crate::QuantType;

pub(crate) const QK8_0: usize = 32;

/// ggml's `block_q8_0`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockQ8_0 {
    /// Scale, f16.
    pub d: [u8; 2],
    /// Quants.
    pub qs: [i8; QK8_0],
}

const _: () = assert!(
    std::mem::size_of::<BlockQ8_0>() == 34,
    "ggml's sizeof(block_q8_0)"
);

// SAFETY: repr(C) byte arrays only; size 34 checked by Block::LAYOUT_OK.
unsafe impl Block for BlockQ8_0 {
    const TYPE: QuantType = QuantType::Q8_0;
}

/// The scale ggml derives from a block's largest magnitude, and its inverse.
#[inline(always)]
fn scale(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    (d, id)
}

pub(crate) fn quantize_block(x: &[f32; QK8_0], y: &mut BlockQ8_0) {
    let amax = x
        .iter()
        .fold(0.0f32, |m, v| if m > v.abs() { m } else { v.abs() });
    let (d, id) = scale(amax);
    y.d = fp32_to_fp16(d).to_le_bytes();
    for (q, &v) in y.qs.iter_mut().zip(x) {
        // roundf: half away from zero; then C's float → int8_t conversion.
        *q = c_f32_to_i32((v * id).round()) as i8;
    }
}

pub(crate) fn dequantize_block(x: &BlockQ8_0, y: &mut [f32; QK8_0]) {
    let d = fp16_to_fp32(u16::from_le_bytes(x.d));
    for (v, &q) in y.iter_mut().zip(&x.qs) {
        *v = f32::from(q) * d;
    }
}

/// Q8_0 with AVX2 where the CPU has it, else the reference.
pub(crate) fn quantize_fast(src: &[f32], dst: &mut [u8]) {
    let blocks = as_blocks_mut::<BlockQ8_0>(dst);
    assert_eq!(src.len(), blocks.len() * QK8_0);
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { avx2::quantize(src, blocks) };
        return;
    }
    for (x, y) in src.chunks_exact(QK8_0).zip(blocks) {
        quantize_block(x.try_into().expect("whole blocks"), y);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{scale, BlockQ8_0, QK8_0};
    use crate::formats::avx2::{abs4, load32, max4};
    use crate::numeric::fp32_to_fp16;

    /// Same bytes as the reference, block by block.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize(src: &[f32], blocks: &mut [BlockQ8_0]) {
        for (x, y) in src.chunks_exact(QK8_0).zip(blocks) {
            // SAFETY: AVX2 is enabled for this function.
            unsafe { quantize_block(x.try_into().expect("whole blocks"), y) };
        }
    }

    /// `roundf(v * id)` in each lane, converted to i32.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn round(v: __m256, idv: __m256) -> __m256i {
        // SAFETY: register-only intrinsics; AVX2 is enabled for this function. (Rust ≥ 1.87
        // deems these calls safe here; the block keeps the declared rust-version building.)
        #[allow(unused_unsafe)]
        unsafe {
            let sign = _mm256_set1_ps(-0.0);
            let p = _mm256_mul_ps(v, idv);
            // Truncate, then step away from zero when the dropped part is at least one half.
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
            let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(p, t));
            let step = _mm256_or_ps(_mm256_and_ps(p, sign), _mm256_set1_ps(1.0));
            let away = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5));
            _mm256_cvtps_epi32(_mm256_add_ps(t, _mm256_and_ps(away, step)))
        }
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn quantize_block(x: &[f32; QK8_0], y: &mut BlockQ8_0) {
        // SAFETY: AVX2 is enabled; the store writes exactly the 32 bytes of `y.qs`.
        unsafe {
            let v = load32(x);
            let (d, id) = scale(max4(&abs4(&v)));
            if d.is_subnormal() {
                // `x * id` may leave the int8 range, where only the scalar path reproduces
                // C's conversion.
                return super::quantize_block(x, y);
            }
            y.d = fp32_to_fp16(d).to_le_bytes();
            let idv = _mm256_set1_ps(id);
            let (i0, i1, i2, i3) = (
                round(v[0], idv),
                round(v[1], idv),
                round(v[2], idv),
                round(v[3], idv),
            );
            let packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
            let ordered =
                _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(y.qs.as_mut_ptr().cast(), ordered);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::testing::{half, max_err, values};
    use crate::formats::{dequantize_blocks, quantize_blocks};

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        let x = values(32 * 8, 4.0, 7);
        let mut bytes = vec![0u8; 34 * 8];
        quantize_blocks(&x, &mut bytes, quantize_block);
        let mut back = vec![0f32; x.len()];
        dequantize_blocks(&bytes, &mut back, dequantize_block);
        assert!(max_err(&x, &back) <= 4.0 / 127.0 * 0.51);
    }

    #[test]
    fn ties_round_away_from_zero() {
        let mut x = [0.0f32; 32];
        x[0] = 127.0; // scale exactly 1
        x[1] = 2.5;
        x[2] = -2.5;
        x[3] = 0.5;
        let mut y = BlockQ8_0 {
            d: [0; 2],
            qs: [0; 32],
        };
        quantize_block(&x, &mut y);
        assert_eq!(half(y.d), 1.0);
        assert_eq!(&y.qs[..4], &[127, 3, -3, 1]);
    }

    #[test]
    fn fast_path_equals_reference() {
        let mut x = values(32 * 64, 10.0, 9);
        x.extend(values(32 * 4, 1e-38, 10)); // subnormal scales
        x.extend([0.0; 32]);
        for v in x.iter_mut().step_by(5) {
            *v = (*v * 8.0).round() / 8.0 + 0.5; // exact ties after scaling by powers of two
        }
        let mut a = vec![0u8; x.len() / 32 * 34];
        let mut b = a.clone();
        quantize_blocks(&x, &mut a, quantize_block);
        quantize_fast(&x, &mut b);
        assert_eq!(a, b);
    }
}
