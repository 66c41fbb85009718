//! `falcon-infer plan`: what goes where and how much memory each device needs.

use clap::Args;

use falcon::engine::{DeviceKind, Engine};
use falcon::infer::plan::{model_sizes, plan, DeviceSpec, Plan, PlanInput};
use falcon::infer::Bits;

use crate::args::{gpu_layers, parse_size};
use crate::Usage;

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// GGUF file, checkpoint directory, or a named shape: falcon-7b, falcon-40b, falcon-180b.
    #[arg(short, long, value_name = "PATH|NAME")]
    pub model: String,
    /// Bits per weight for a checkpoint or a named shape: 4 or 8.
    #[arg(long, default_value = "4", value_parser = ["4", "8"])]
    pub bits: String,
    /// Context window in tokens, per sequence.
    #[arg(short, long, default_value_t = 2048)]
    pub ctx_size: u32,
    /// Sequences served at once (the server's --parallel), each with the full --ctx-size.
    #[arg(long, default_value_t = 1)]
    pub parallel: u32,
    /// Tokens per batch (sizes the compute buffers).
    #[arg(short, long, default_value_t = 512)]
    pub batch_size: u32,
    /// Free memory of each local GPU, e.g. `24GiB,24GiB`, or `none` to plan for no GPU
    /// (default: the GPUs found, if any).
    #[arg(long, value_name = "SIZE,...", value_delimiter = ',')]
    pub vram: Option<Vec<String>>,
    /// Memory of each RPC worker, e.g. `48GiB,48GiB`: plan over machines that are not running.
    #[arg(
        long,
        value_name = "SIZE,...",
        value_delimiter = ',',
        conflicts_with = "rpc"
    )]
    pub rpc_memory: Option<Vec<String>>,
    /// Running RPC workers to plan over (their free memory is asked for).
    #[arg(long, value_name = "HOST:PORT,...", value_delimiter = ',')]
    pub rpc: Vec<String>,
    /// Memory of this machine's CPU, to check that its share fits (default: not checked).
    #[arg(long, value_name = "SIZE")]
    pub cpu_memory: Option<String>,
    /// Layers off the CPU: a number, `auto` or `all`.
    #[arg(long, value_name = "N|auto|all", default_value = "auto")]
    pub gpu_layers: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn gb(b: u64) -> String {
    format!("{:.2} GB", b as f64 / 1e9)
}

pub fn run(p: PlanArgs) -> anyhow::Result<()> {
    if p.ctx_size == 0 || p.parallel == 0 || p.batch_size == 0 {
        return Err(
            Usage("--ctx-size, --parallel and --batch-size must be positive".into()).into(),
        );
    }
    let bits = Bits::from_u32(p.bits.parse().unwrap_or(4)).unwrap_or(Bits::Four);
    let layers = gpu_layers(&p.gpu_layers)?;
    let sizes = model_sizes(&p.model, bits)?;
    let mut devices: Vec<DeviceSpec> = Vec::new();
    let needs_engine = p.vram.is_none() || !p.rpc.is_empty();
    let engine = if needs_engine {
        Some(Engine::init()?)
    } else {
        None
    };
    match &p.vram {
        Some(v) if v.len() == 1 && v[0] == "none" => {}
        Some(v) => {
            for (i, s) in v.iter().enumerate() {
                devices.push(DeviceSpec {
                    name: format!("GPU{i}"),
                    capacity: parse_size("--vram", s)?,
                    remote: false,
                });
            }
        }
        None => {
            for d in engine.as_ref().map(Engine::gpus).unwrap_or_default() {
                devices.push(DeviceSpec {
                    name: d.name,
                    capacity: d.free,
                    remote: false,
                });
            }
        }
    }
    if let Some(mem) = &p.rpc_memory {
        for (i, s) in mem.iter().enumerate() {
            devices.push(DeviceSpec {
                name: format!("RPC{i}"),
                capacity: parse_size("--rpc-memory", s)?,
                remote: true,
            });
        }
    }
    if !p.rpc.is_empty() {
        for r in &p.rpc {
            falcon::engine::parse_endpoint(r).map_err(|e| Usage(format!("--rpc: {e}")))?;
        }
        let engine = engine.as_ref().expect("made above when --rpc is given");
        for d in engine.add_rpc_workers(&p.rpc, std::time::Duration::from_secs(10))? {
            debug_assert_eq!(d.kind, DeviceKind::Remote);
            devices.push(DeviceSpec {
                name: d.name,
                capacity: d.free,
                remote: true,
            });
        }
    }
    let cpu_capacity = p
        .cpu_memory
        .as_deref()
        .map(|s| parse_size("--cpu-memory", s))
        .transpose()?;
    let result = plan(
        &sizes,
        &PlanInput {
            n_ctx: p.ctx_size,
            n_seq: p.parallel,
            n_batch: p.batch_size,
            devices: &devices,
            cpu_capacity,
            gpu_layers: layers,
        },
    );
    if p.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print_plan(&result);
    }
    Ok(())
}

fn print_plan(p: &Plan) {
    let m = &p.model;
    println!(
        "{} ({}): {} layers, hidden {}, {} heads ({} KV), ffn {}, vocab {}",
        m.name, m.file_type, m.n_layer, m.n_embd, m.n_head, m.n_head_kv, m.n_ff, m.n_vocab
    );
    let seqs = if p.n_seq > 1 {
        format!(" × {} sequences", p.n_seq)
    } else {
        String::new()
    };
    println!(
        "weights {} | context {} tokens{seqs} | {} of {} layers off the CPU",
        gb(m.total_weights()),
        p.n_ctx,
        p.gpu_layers,
        m.n_layer + 1
    );
    let width = p
        .devices
        .iter()
        .map(|d| d.device.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!(
        "{:<width$} {:>12} {:>12} {:>10} {:>10} {:>12} {:>12}",
        "device", "layers", "weights", "KV cache", "compute", "total", "capacity"
    );
    for d in &p.devices {
        let layers = match (d.layers, d.output) {
            (Some((a, b)), true) => format!("{a}-{}+out", b - 1),
            (Some((a, b)), false) => format!("{a}-{}", b - 1),
            (None, true) => "out".into(),
            (None, false) => "-".into(),
        };
        println!(
            "{:<width$} {:>12} {:>12} {:>10} {:>10} {:>12} {:>12}{}",
            d.device,
            layers,
            gb(d.weights),
            gb(d.kv_cache),
            gb(d.compute),
            gb(d.total()),
            d.capacity.map_or_else(|| "-".into(), gb),
            if d.fits() { "" } else { "  does not fit" }
        );
    }
    println!("total  {}", gb(p.total));
    if let Some(n) = p.network {
        println!(
            "network: {:.1} KB per generated token, {:.1} KB per prompt token (hidden states at each \
             device boundary with a worker, and the logits of a remote output layer)",
            n.per_generated_token as f64 / 1e3,
            n.per_prompt_token as f64 / 1e3
        );
    }
    if !p.fits() {
        let over: Vec<String> = p
            .devices
            .iter()
            .filter(|d| !d.fits())
            .map(|d| {
                format!(
                    "{} needs {} of {}",
                    d.device,
                    gb(d.total()),
                    d.capacity.map_or_else(|| "?".into(), gb)
                )
            })
            .collect();
        println!("does not fit: {}", over.join("; "));
    } else if p.gpu_layers < m.n_layer + 1 && p.devices.len() > 1 {
        let by_memory = p.devices[0].capacity.is_some() && p.devices[1..].iter().all(|d| d.remote);
        println!(
            "{} layers stay on the CPU: {}",
            m.n_layer + 1 - p.gpu_layers,
            if by_memory {
                "its share by memory, as runs with --rpc place them"
            } else {
                "the other devices cannot hold more"
            }
        );
    }
}
