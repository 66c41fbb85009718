//! `falcon-infer bench`: prompt processing and generation speed (mean ± standard deviation over
//! repetitions, like llama-bench), and the memory-bandwidth ceiling of generation: each generated
//! token reads every weight on the CPU once, so tokens/s cannot beat bandwidth / those bytes.

use clap::Args;
use serde::Serialize;

use falcon::infer::bench::{copy_bandwidth, measure, Stat};
use falcon::infer::human_bytes;

use crate::args::{DeviceArgs, ModelArgs};
use crate::generate::JsonDevices;
use crate::Usage;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Prompt tokens for the prompt-processing test.
    #[arg(short = 'p', long, default_value_t = 512)]
    pub n_prompt: usize,
    /// Tokens for the generation test.
    #[arg(short = 'n', long, default_value_t = 128)]
    pub n_gen: usize,
    /// Repetitions of each test.
    #[arg(short, long, default_value_t = 5)]
    pub repetitions: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Results.
#[derive(Debug, Clone, Serialize)]
struct BenchReport {
    model: String,
    model_bytes: u64,
    gpu_layers: u32,
    devices: Vec<String>,
    n_prompt: usize,
    n_gen: usize,
    pp_tokens_per_s: Stat,
    tg_tokens_per_s: Stat,
    /// Measured host copy bandwidth, bytes/s (read + write).
    copy_bandwidth: f64,
    /// Generation ceiling from bandwidth (CPU-resident weights only; `None` when none are).
    tg_ceiling_tokens_per_s: Option<f64>,
    fraction_of_ceiling: Option<f64>,
}

pub fn run(b: BenchArgs) -> anyhow::Result<()> {
    if b.repetitions == 0 || b.n_prompt == 0 || b.n_gen == 0 {
        return Err(Usage("--repetitions, --n-prompt and --n-gen must be positive".into()).into());
    }
    let mut load = b.device.load_options()?;
    let need = (b.n_prompt + b.n_gen) as u32;
    load.context.n_ctx = Some(load.context.n_ctx.unwrap_or(need).max(need));
    let rt = crate::runtime(&b.model, &b.device, &load)?;
    let (model, _) = rt.load()?;
    let mut session = rt.session(&model)?;
    let json = b.json;
    let reps = b.repetitions;
    let (pp, tg) = measure(
        &mut session,
        model.n_vocab(),
        b.n_prompt,
        b.n_gen,
        b.repetitions,
        &mut |r, pp, tg| {
            if !json {
                eprintln!(
                    "repetition {}/{reps}: pp {pp:.1} t/s, tg {tg:.1} t/s",
                    r + 1
                );
            }
        },
    )?;
    let threads = load.context.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        |t| t as usize,
    );
    let bw = copy_bandwidth(threads);
    let bytes = model.size_bytes();
    let n_off = u64::from(model.n_layer()) + 1;
    let cpu_share = 1.0 - f64::from(model.gpu_layers()) / n_off as f64;
    let cpu_bytes = bytes as f64 * cpu_share;
    let ceiling = (cpu_bytes > 0.0).then(|| bw / cpu_bytes);
    let devices = JsonDevices::of(&rt, &model);
    let report = BenchReport {
        model: rt.gguf.display().to_string(),
        model_bytes: bytes,
        gpu_layers: model.gpu_layers(),
        devices: devices.offload,
        n_prompt: b.n_prompt,
        n_gen: b.n_gen,
        pp_tokens_per_s: pp,
        tg_tokens_per_s: tg,
        copy_bandwidth: bw,
        tg_ceiling_tokens_per_s: ceiling,
        fraction_of_ceiling: ceiling.map(|c| tg.mean / c),
    };
    if b.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let on = if report.devices.is_empty() {
        String::new()
    } else {
        format!(" ({})", report.devices.join(", "))
    };
    println!(
        "model {} ({}), {} of {n_off} layers offloaded{on}",
        report.model,
        human_bytes(bytes),
        report.gpu_layers,
    );
    println!(
        "pp{:<5} {:>10.2} ± {:.2} tokens/s",
        b.n_prompt, pp.mean, pp.std
    );
    println!(
        "tg{:<5} {:>10.2} ± {:.2} tokens/s",
        b.n_gen, tg.mean, tg.std
    );
    match (ceiling, report.fraction_of_ceiling) {
        (Some(ceil), Some(f)) => println!(
            "copy bandwidth {:.1} GB/s -> generation ceiling {:.2} tokens/s ({} of weights read per token); reached {:.0}%",
            bw / 1e9,
            ceil,
            human_bytes(cpu_bytes as u64),
            100.0 * f
        ),
        _ => println!(
            "copy bandwidth {:.1} GB/s; all weights are off the CPU, so the host ceiling does not apply",
            bw / 1e9
        ),
    }
    Ok(())
}
