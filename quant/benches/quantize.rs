//! Throughput of `quant::quantize` against ggml's `ggml_quantize_chunk` on the same data in
//! the same run, in GB/s of f32 input, single-threaded and with every core.
//!
//! Run with `cargo bench -p quant`; `QUANT_BENCH=f16,q4_K cargo bench -p quant` measures only
//! those types. Ours single-threaded runs in a one-thread rayon pool; ggml on all cores gets
//! one contiguous slice of rows per thread.

use std::time::{Duration, Instant};

use llama_cpp_sys_2::{ggml_quantize_chunk, ggml_type};
use quant::{quantize, QuantType};

const ROW_LEN: usize = 4096;
/// 64 MiB of input: more than the last-level cache of the machines measured, so the figures
/// include memory traffic as converting a real model does.
const ROWS: usize = 4096;

/// ggml quantizing the rows of `src` into `dst`.
fn ggml_rows(ty: QuantType, src: &[f32], dst: &mut [u8]) {
    let rows = src.len() / ROW_LEN;
    assert_eq!(
        dst.len(),
        rows * ty.row_bytes(ROW_LEN).expect("whole blocks")
    );
    // SAFETY: `src` holds `rows` rows of ROW_LEN floats and `dst` exactly their bytes, all
    // that ggml reads and writes from start 0; these types need no importance matrix.
    unsafe {
        ggml_quantize_chunk(
            ty.ggml_id() as ggml_type,
            src.as_ptr(),
            dst.as_mut_ptr().cast(),
            0,
            rows as i64,
            ROW_LEN as i64,
            std::ptr::null(),
        );
    }
}

fn main() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("thread pool");
    // Bell-shaped values like trained weights (deterministic LCG; no dependency needed).
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let src: Vec<f32> = (0..ROW_LEN * ROWS)
        .map(|_| {
            let mut u = || {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (s >> 40) as f32 / (1u64 << 24) as f32
            };
            (u() + u() + u() - 1.5) * 0.04
        })
        .collect();
    let gb = (src.len() * 4) as f64 / 1e9;
    let budget = Duration::from_secs(3);

    println!(
        "quantizing {ROWS} rows × {ROW_LEN} f32 ({:.0} MiB), {threads} threads",
        gb * 1e9 / 1048576.0
    );
    println!(
        "| type | ggml 1T GB/s | ours 1T GB/s | ours/ggml 1T | ggml {threads}T GB/s | ours {threads}T GB/s | ours {threads}T / ggml 1T |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    // QUANT_BENCH=q8_0,q4_K limits the run to those types.
    let only = std::env::var("QUANT_BENCH").unwrap_or_default();
    let wanted = |ty: QuantType| only.is_empty() || only.split(',').any(|n| n == ty.name());
    for ty in QuantType::ALL.into_iter().filter(|&ty| wanted(ty)) {
        let mut ours = vec![0u8; ROWS * ty.row_bytes(ROW_LEN).expect("whole blocks")];
        let mut theirs = ours.clone();

        // The four measurements take turns, so that load from elsewhere on the machine falls
        // on all of them alike; each keeps its best time.
        let per = ROWS.div_ceil(threads);
        let chunk_bytes = theirs.len() / ROWS * per;
        let mut best = [Duration::MAX; 4];
        let start = Instant::now();
        let mut rounds = 0;
        while rounds < 4 || start.elapsed() < budget {
            for (k, best) in best.iter_mut().enumerate() {
                let t = Instant::now();
                match k {
                    0 => ggml_rows(ty, &src, &mut theirs),
                    1 => one
                        .install(|| quantize(ty, &src, ROW_LEN, &mut ours))
                        .expect("finite"),
                    2 => std::thread::scope(|scope| {
                        let dsts = theirs.chunks_mut(chunk_bytes);
                        for (x, y) in src.chunks(ROW_LEN * per).zip(dsts) {
                            scope.spawn(move || ggml_rows(ty, x, y));
                        }
                    }),
                    _ => quantize(ty, &src, ROW_LEN, &mut ours).expect("finite input"),
                }
                // The first round only warms up: pages the buffers in, starts the threads.
                if rounds > 0 {
                    *best = (*best).min(t.elapsed());
                }
            }
            rounds += 1;
        }
        let [ggml_1, ours_1, ggml_n, ours_n] = best;
        assert!(ours == theirs, "{ty}: bytes differ from ggml");

        let rate = |t: Duration| gb / t.as_secs_f64();
        println!(
            "| {ty} | {:.2} | {:.2} | {:.2}× | {:.2} | {:.2} | {:.2}× |",
            rate(ggml_1),
            rate(ours_1),
            rate(ours_1) / rate(ggml_1),
            rate(ggml_n),
            rate(ours_n),
            rate(ours_n) / rate(ggml_1),
        );
    }
}
