//! The default command: generate from a prompt, streamed to stdout or as one JSON document.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;

use falcon::engine::Token;
use falcon::infer::generate::{complete, rate, Completion, Counters};
use falcon::infer::{memory_use, InferError, MemoryUse};

use crate::args::{DeviceArgs, ModelArgs, SamplingArgs};
use crate::Usage;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// The prompt (default: read stdin).
    #[arg(short, long, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from this file.
    #[arg(short = 'f', long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
    /// Completions to generate, with seeds SEED, SEED+1, ...
    #[arg(long, default_value_t = 1)]
    pub num_return_sequences: usize,
    /// Print one JSON document (model, LoRA adapters, prompt, completions with text, token ids
    /// and finish reason, timings, the devices used) instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct JsonTimings {
    load_s: f64,
    prompt_tokens: usize,
    prompt_s: f64,
    prompt_tokens_per_s: f64,
    generated_tokens: usize,
    generate_s: f64,
    generated_tokens_per_s: f64,
    memory: Vec<MemoryUse>,
}

/// Where the layers went.
#[derive(Debug, Serialize)]
pub struct JsonDevices {
    /// Devices holding offloaded layers (empty: the CPU alone).
    pub offload: Vec<String>,
    /// Layers off the CPU.
    pub offloaded_layers: u32,
    /// Layers in all (the output layer counts as one).
    pub layers: u32,
    /// The no-usable-GPU notice, if any.
    pub notice: Option<String>,
}

impl JsonDevices {
    pub fn of(rt: &falcon::infer::Runtime, model: &falcon::engine::Model<'_>) -> Self {
        JsonDevices {
            offload: model.placement().names.clone(),
            offloaded_layers: model.gpu_layers(),
            layers: model.n_layer() + 1,
            notice: rt.engine().gpu_notice(),
        }
    }
}

/// A LoRA adapter applied at run time.
#[derive(Debug, Serialize)]
struct JsonAdapter {
    /// The GGUF adapter (for a PEFT directory, its converted copy).
    path: String,
    scale: f32,
}

#[derive(Debug, Serialize)]
struct JsonOutput<'a> {
    model: String,
    adapters: Vec<JsonAdapter>,
    prompt: &'a str,
    prompt_ids: &'a [Token],
    seed: u32,
    completions: Vec<Completion>,
    devices: JsonDevices,
    timings: JsonTimings,
}

pub fn run(g: GenerateArgs) -> anyhow::Result<()> {
    if g.num_return_sequences == 0 {
        return Err(Usage("--num-return-sequences must be at least 1".into()).into());
    }
    let load = g.device.load_options()?;
    let sampling = g.sampling.params()?;
    g.model.spec()?;
    let prompt = match (&g.prompt, &g.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the prompt file {}", f.display()))?,
        (None, None) => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the prompt from stdin")?;
            s
        }
    };
    let rt = crate::runtime(&g.model, &g.device, &load)?;
    let (model, load_time) = rt.load()?;
    let mut session = rt.session(&model)?;
    let prompt_ids = model.tokenize(&prompt, true);
    if prompt_ids.is_empty() {
        return Err(InferError::EmptyPrompt.into());
    }
    if prompt_ids.len() >= session.n_ctx() {
        return Err(InferError::PromptTooLong {
            tokens: prompt_ids.len(),
            n_ctx: session.n_ctx(),
            n_ctx_train: model.n_ctx_train(),
        }
        .into());
    }
    let mut counters = Counters::default();
    let mut completions = Vec::new();
    let stdout = std::io::stdout();
    for i in 0..g.num_return_sequences {
        let mut params = sampling.clone();
        params.seed = sampling.seed.wrapping_add(i as u32);
        let mut out = stdout.lock();
        let json = g.json;
        let mut on_text = |s: &str| -> Result<(), InferError> {
            if crate::interrupted() {
                return Err(InferError::Interrupted);
            }
            if !json {
                out.write_all(s.as_bytes()).map_err(InferError::Output)?;
                out.flush().map_err(InferError::Output)?;
            }
            Ok(())
        };
        if !g.json {
            if g.num_return_sequences > 1 {
                on_text(&format!(
                    "--- sequence {} of {} ---\n",
                    i + 1,
                    g.num_return_sequences
                ))?;
            }
            on_text(&prompt)?;
        }
        let c = complete(
            &model,
            &mut session,
            &prompt_ids,
            &params,
            g.sampling.max_new_tokens,
            &g.sampling.stop,
            &mut counters,
            &mut on_text,
        )?;
        if !g.json {
            on_text("\n")?;
        }
        completions.push(c);
    }
    let memory = memory_use(&model);
    if g.json {
        let doc = JsonOutput {
            model: rt.gguf.display().to_string(),
            adapters: rt
                .options()
                .adapters
                .iter()
                .map(|(p, s)| JsonAdapter {
                    path: p.display().to_string(),
                    scale: *s,
                })
                .collect(),
            prompt: &prompt,
            prompt_ids: &prompt_ids,
            seed: sampling.seed,
            completions,
            devices: JsonDevices::of(&rt, &model),
            timings: JsonTimings {
                load_s: load_time.as_secs_f64(),
                prompt_tokens: counters.prompt_tokens,
                prompt_s: counters.prompt_time.as_secs_f64(),
                prompt_tokens_per_s: rate(counters.prompt_tokens, counters.prompt_time),
                generated_tokens: counters.gen_tokens,
                generate_s: counters.gen_time.as_secs_f64(),
                generated_tokens_per_s: rate(counters.gen_tokens, counters.gen_time),
                memory,
            },
        };
        let mut out = stdout.lock();
        serde_json::to_writer_pretty(&mut out, &doc).context("writing JSON to stdout")?;
        writeln!(out).context("writing to stdout")?;
    } else {
        eprintln!(
            "load {:.2} s | prompt {} tokens, {:.1} tokens/s | generated {} tokens, {:.1} tokens/s | {}",
            load_time.as_secs_f64(),
            counters.prompt_tokens,
            rate(counters.prompt_tokens, counters.prompt_time),
            counters.gen_tokens,
            rate(counters.gen_tokens, counters.gen_time),
            falcon::infer::format_memory(&memory),
        );
    }
    Ok(())
}
