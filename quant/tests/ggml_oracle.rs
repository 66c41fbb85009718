//! Byte-identity with ggml itself, linked through `llama-cpp-sys-2`.
//!
//! For every type, on rows built to hit each edge ggml's code has (random rows at several
//! scales, exact rounding ties, all-zero rows, a single huge outlier, subnormals, one block and
//! many blocks), `quantize` and `quantize_reference` must give exactly the bytes of
//! `ggml_quantize_chunk` with no importance matrix, and `dequantize` exactly the floats of the
//! type's `to_float`, compared bit for bit.

use std::ffi::CStr;

use llama_cpp_sys_2::{ggml_get_type_traits, ggml_quantize_chunk, ggml_row_size, ggml_type};
use quant::{dequantize, quantize, quantize_reference, QuantType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// ggml's bytes for `src`, rows of `row_len`.
fn ggml_quantize(ty: QuantType, src: &[f32], row_len: usize) -> Vec<u8> {
    let rows = src.len() / row_len;
    let mut dst = vec![0u8; rows * ty.row_bytes(row_len).unwrap()];
    // SAFETY: `src` holds rows × row_len floats and `dst` rows × row_size bytes, which is all
    // ggml_quantize_chunk reads and writes from start 0; a null imatrix is allowed for these
    // types.
    let written = unsafe {
        ggml_quantize_chunk(
            ty.ggml_id() as ggml_type,
            src.as_ptr(),
            dst.as_mut_ptr().cast(),
            0,
            rows as i64,
            row_len as i64,
            std::ptr::null(),
        )
    };
    assert_eq!(written, dst.len(), "{ty}");
    dst
}

/// ggml's floats for `bytes` holding `n` elements.
fn ggml_dequantize(ty: QuantType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    // SAFETY: every supported id has an entry in ggml's static type-traits table.
    let traits = unsafe { &*ggml_get_type_traits(ty.ggml_id() as ggml_type) };
    match traits.to_float {
        // SAFETY: `bytes` holds n elements' blocks and `out` n floats.
        Some(to_float) => unsafe { to_float(bytes.as_ptr().cast(), out.as_mut_ptr(), n as i64) },
        None => {
            assert_eq!(ty, QuantType::F32, "only f32 has no to_float");
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes(b.try_into().unwrap());
            }
        }
    }
    out
}

/// Asserts that both quantize paths give ggml's bytes and that dequantizing gives ggml's
/// floats, bit for bit.
fn check(ty: QuantType, src: &[f32], row_len: usize, what: &str) {
    let expected = ggml_quantize(ty, src, row_len);
    let mut ours = vec![0u8; expected.len()];
    quantize_reference(ty, src, row_len, &mut ours).unwrap();
    if let Some(at) = expected.iter().zip(&ours).position(|(a, b)| a != b) {
        let block = at / ty.type_size();
        panic!(
            "{ty} {what}: reference differs from ggml at byte {at} (block {block})\n ggml: {:?}\n ours: {:?}\n input: {:?}",
            &expected[block * ty.type_size()..(block + 1) * ty.type_size()],
            &ours[block * ty.type_size()..(block + 1) * ty.type_size()],
            &src[block * ty.block_size()..(block + 1) * ty.block_size()],
        );
    }
    ours.fill(0);
    quantize(ty, src, row_len, &mut ours).unwrap();
    assert!(ours == expected, "{ty} {what}: fast path differs from ggml");

    let want = ggml_dequantize(ty, &expected, src.len());
    let mut got = vec![0f32; src.len()];
    dequantize(ty, &expected, row_len, &mut got).unwrap();
    let same = want
        .iter()
        .zip(&got)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(
        same,
        "{ty} {what}: dequantized floats differ from ggml's to_float"
    );
}

fn random_rows(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    // Sum of uniforms: bell-shaped like trained weights, with occasional larger values.
    (0..n)
        .map(|_| (rng.random::<f32>() + rng.random::<f32>() - 1.0) * scale)
        .collect()
}

/// Row lengths: one block, a few blocks, and a long row of many blocks.
fn row_lens(ty: QuantType) -> [usize; 3] {
    let b = ty.block_size().max(32);
    [ty.block_size(), 3 * b, 32 * 256]
}

#[test]
fn facts_match_ggml_type_traits() {
    for ty in QuantType::ALL {
        let id = ty.ggml_id() as ggml_type;
        // SAFETY: every supported id has an entry in ggml's static type-traits table, whose
        // names are static NUL-terminated strings.
        let (traits, name) = unsafe {
            let t = &*ggml_get_type_traits(id);
            (t, CStr::from_ptr(t.type_name).to_str().unwrap())
        };
        assert_eq!(name, ty.name());
        assert_eq!(traits.blck_size as usize, ty.block_size(), "{ty}");
        assert_eq!(traits.type_size, ty.type_size(), "{ty}");
        let n = 256 * 7;
        // SAFETY: a pure function of its arguments.
        let row_size = unsafe { ggml_row_size(id, n as i64) };
        assert_eq!(row_size, ty.row_bytes(n).unwrap(), "{ty}");
    }
}

#[test]
fn random_rows_at_several_scales() {
    let mut rng = StdRng::seed_from_u64(1);
    for ty in QuantType::ALL {
        for row_len in row_lens(ty) {
            for scale in [1e-30, 1e-3, 0.05, 1.0, 30.0, 1e4, 1e30] {
                let rows = (8 * 256 / row_len).max(2);
                let x = random_rows(&mut rng, rows * row_len, scale);
                check(
                    ty,
                    &x,
                    row_len,
                    &format!("random rows {row_len} at scale {scale}"),
                );
            }
        }
    }
}

#[test]
fn many_seeds_of_k_format_rows() {
    // The K formats search over candidate scales; cover many blocks to reach rare branches.
    let mut rng = StdRng::seed_from_u64(2);
    for ty in QuantType::ALL {
        let x = random_rows(&mut rng, 256 * 512, 1.0);
        check(ty, &x, 256 * 8, "many blocks");
        let skewed: Vec<f32> = x.iter().map(|v| v * v * v * 3.0 + 0.2).collect();
        check(ty, &skewed, 256 * 8, "skewed blocks");
    }
}

#[test]
fn exact_rounding_ties() {
    let mut rng = StdRng::seed_from_u64(3);
    for ty in QuantType::ALL {
        let row_len = 256 * 4;
        // Half-integers with the block's extreme at a power-of-two multiple of the level
        // count, so that scaled values land on .5 exactly.
        let mut x: Vec<f32> = (0..row_len * 4)
            .map(|_| rng.random_range(-40i32..=40) as f32 * 0.5)
            .collect();
        for (b, block) in x.chunks_mut(32).enumerate() {
            block[b % 32] = [127.0, -8.0, -16.0, 15.0, 31.0, 63.5, -127.0, 8.0][b % 8];
        }
        check(ty, &x, row_len, "half-integer ties");
        let quarters: Vec<f32> = x.iter().map(|v| v * 0.25 + 0.125).collect();
        check(ty, &quarters, row_len, "quarter ties");
        // f16 ties: values halfway between adjacent halves, and bf16 ties likewise.
        let f16_ties: Vec<f32> = (0..row_len)
            .map(|i| 1.0 + (2 * i + 1) as f32 * f32::powi(2.0, -11))
            .collect();
        check(ty, &f16_ties, row_len, "f16 mantissa ties");
        let bf16_ties: Vec<f32> = (0..row_len as u32)
            .map(|i| f32::from_bits(0x3F80_8000 + (i << 16)))
            .collect();
        check(ty, &bf16_ties, row_len, "bf16 mantissa ties");
    }
}

#[test]
fn all_zero_rows() {
    for ty in QuantType::ALL {
        for row_len in row_lens(ty) {
            check(ty, &vec![0.0; 2 * row_len], row_len, "all zero");
            check(ty, &vec![-0.0; 2 * row_len], row_len, "all negative zero");
        }
    }
}

#[test]
fn constant_rows() {
    for ty in QuantType::ALL {
        for v in [1.0f32, -3.5, 1e-7] {
            check(ty, &vec![v; 512], 256, &format!("constant {v}"));
        }
    }
}

#[test]
fn single_huge_outlier() {
    let mut rng = StdRng::seed_from_u64(4);
    for ty in QuantType::ALL {
        for outlier in [1e3f32, -6e4, 1e6, 1e20, -3e38] {
            let row_len = 256 * 2;
            let mut x = random_rows(&mut rng, row_len * 2, 1.0);
            x[row_len + 77] = outlier;
            check(ty, &x, row_len, &format!("outlier {outlier}"));
        }
    }
}

#[test]
fn subnormal_values() {
    let mut rng = StdRng::seed_from_u64(5);
    for ty in QuantType::ALL {
        let row_len = 256 * 2;
        for scale in [1e-45f32, 1e-42, 1e-39, 1e-38, 2e-38] {
            let x = random_rows(&mut rng, row_len * 4, scale);
            check(ty, &x, row_len, &format!("subnormal scale {scale}"));
        }
        // Subnormals next to normal values in the same block.
        let mut x = random_rows(&mut rng, row_len * 2, 1e-40);
        for v in x.iter_mut().step_by(37) {
            *v = 0.75;
        }
        check(ty, &x, row_len, "subnormals mixed with normals");
        let tiny: Vec<f32> = (0..row_len as u32).map(f32::from_bits).collect();
        check(ty, &tiny, row_len, "smallest subnormals");
    }
}

#[test]
fn dequantize_arbitrary_bytes_like_ggml() {
    // Any bit pattern, including NaN and infinite f16 scales, converts exactly as ggml does.
    let mut rng = StdRng::seed_from_u64(6);
    for ty in QuantType::ALL {
        let n = 256 * 64;
        let mut bytes = vec![0u8; ty.row_bytes(n).unwrap()];
        rng.fill(&mut bytes[..]);
        let want = ggml_dequantize(ty, &bytes, n);
        let mut got = vec![0f32; n];
        dequantize(ty, &bytes, 256, &mut got).unwrap();
        let same = want
            .iter()
            .zip(&got)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{ty}: dequantizing random bytes differs from ggml");
    }
}

#[test]
fn every_half_converts_like_ggml() {
    let bytes: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
    for ty in [QuantType::F16, QuantType::BF16] {
        let want = ggml_dequantize(ty, &bytes, 65536);
        let mut got = vec![0f32; 65536];
        dequantize(ty, &bytes, 65536, &mut got).unwrap();
        assert!(
            want.iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{ty}"
        );
        // Every finite value that round-trips must quantize back to the same bits.
        let finite: Vec<f32> = want.iter().copied().filter(|v| v.is_finite()).collect();
        let n = finite.len() / 32 * 32;
        check(ty, &finite[..n], 32, "every finite half");
    }
}

#[test]
fn sub_blocks_whose_scale_rounds_to_zero() {
    // One loud sub-block beside quiet ones: the quiet sub-blocks' 6-bit (or 8-bit) scales
    // round to zero and keep their first-pass levels.
    let mut rng = StdRng::seed_from_u64(7);
    for ty in QuantType::ALL {
        let mut x = random_rows(&mut rng, 256 * 16, 1e-4);
        for (b, block) in x.chunks_mut(256).enumerate() {
            let loud = 16 * (b % 16);
            for v in &mut block[loud..loud + 16] {
                *v *= 1e5;
            }
            if b % 3 == 0 {
                block[200..232].fill(0.0); // and an all-zero sub-block
            }
        }
        check(ty, &x, 256 * 4, "quiet sub-blocks");
    }
}

#[test]
fn weight_like_distributions_at_volume() {
    // Heavy-tailed, sparse, one-signed and uniform rows, many super-blocks each.
    let mut rng = StdRng::seed_from_u64(8);
    let n = 256 * 2048;
    let normal = random_rows(&mut rng, n, 0.02);
    let heavy: Vec<f32> = normal.iter().map(|v| v * v * v * 2500.0).collect();
    let sparse: Vec<f32> = normal
        .iter()
        .enumerate()
        .map(|(i, v)| if i % 5 == 0 { *v } else { 0.0 })
        .collect();
    let positive: Vec<f32> = normal.iter().map(|v| v.abs() + 0.001).collect();
    let uniform: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    for ty in QuantType::ALL {
        for (what, x) in [
            ("normal", &normal),
            ("heavy-tailed", &heavy),
            ("sparse", &sparse),
            ("positive", &positive),
            ("uniform", &uniform),
        ] {
            check(ty, x, 4096, what);
        }
    }
}
