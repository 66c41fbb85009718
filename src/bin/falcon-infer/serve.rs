//! `falcon-infer serve`: the OpenAI and TGI HTTP APIs over one model, many users at once.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::Args;

use falcon::engine::{Adapter, Model, Token};
use falcon::infer::lora::{resolve_adapter, LoraArg};
use falcon::infer::{format_memory, human_bytes, memory_use, plan};
use falcon::serve::batch::{self, LoopOptions};
use falcon::serve::http::{self, AppState, HttpOptions};
use falcon::serve::metrics::Metrics;
use falcon::serve::queue::{self, Health};
use falcon::serve::template::TemplateSpec;
use falcon::serve::validation::{Limits, ModelCard, Tokenize, Validator};

use crate::args::{DeviceArgs, ModelArgs};
use crate::Usage;

/// Serve the model over HTTP: OpenAI's `/v1/chat/completions`, `/v1/completions` and
/// `/v1/models`; TGI's `/generate`, `/generate_stream`, `/info` and `/health`; `/metrics`
/// (Prometheus), `/tokenize` and `/detokenize`.
///
/// Up to --parallel requests generate at once in one batch (continuous batching), each with the
/// full --ctx-size; more wait in a queue of --max-queue, beyond which requests get 503. Chat
/// prompts use the model's own chat template, else the Falcon family's format (see
/// --chat-template). Listens on 127.0.0.1 unless --host says otherwise. Ctrl-C or SIGTERM stops
/// taking requests, lets running ones finish for --shutdown-timeout seconds, and exits 0.
///
/// LoRA adapters: `--lora NAME=PATH[:SCALE]` serves an adapter that requests choose by name
/// (OpenAI's `model`, TGI's `adapter_id`; the base model alone by default, and /v1/models lists
/// them all); `--lora PATH[:SCALE]` without a name applies to every request.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Address to listen on. Anything but loopback exposes the model to the network: set
    /// --api-key then.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences generated at once, each with the full --ctx-size (the KV cache grows with both;
    /// `falcon-infer plan --parallel N` shows how much).
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub parallel: u32,
    /// Requests allowed to wait for a free sequence; more get 503 with Retry-After.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_queue: usize,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(
        long,
        env = "FALCON_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,
    /// Chat template: `falcon-instruct` (User:/Assistant:, Falcon-7B/40B-instruct),
    /// `falcon-180b-chat` (System:/User:/Falcon:) or a Jinja file. Default: the model's own
    /// (tokenizer.chat_template), else the family's format chosen from the model's name.
    #[arg(long, value_name = "NAME|FILE")]
    pub chat_template: Option<String>,
    /// Seconds that running requests may go on after Ctrl-C or SIGTERM before they are cut.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub shutdown_timeout: u64,
    /// The one origin browsers may call from (no CORS headers without it).
    #[arg(long, value_name = "ORIGIN")]
    pub cors_origin: Option<String>,
    /// The model's name in answers and /v1/models (default: the file or directory name).
    #[arg(long, value_name = "NAME")]
    pub alias: Option<String>,
}

/// The engine's tokenizer, as the HTTP side uses it.
struct Vocab(&'static Model<'static>);

impl Tokenize for Vocab {
    fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<Token> {
        self.0.tokenize_with(text, add_special, parse_special)
    }

    fn token_bytes(&self, token: Token) -> Option<Vec<u8>> {
        (token >= 0 && (token as usize) < self.0.n_vocab()).then(|| self.0.token_bytes(token))
    }

    fn is_special(&self, token: Token) -> bool {
        self.0.is_special(token)
    }

    fn n_vocab(&self) -> usize {
        self.0.n_vocab()
    }
}

/// Takes the `--lora NAME=PATH[:SCALE]` values out of `loras` (those that the server serves by
/// name), leaving the unnamed ones, which apply to every request.
fn take_named_adapters(loras: &mut Vec<LoraArg>) -> Result<Vec<(String, LoraArg)>, Usage> {
    let mut named: Vec<(String, LoraArg)> = Vec::new();
    let mut rest = Vec::new();
    for l in loras.drain(..) {
        let text = l.path.to_string_lossy().into_owned();
        match text.split_once('=') {
            Some((name, path)) if !l.path.exists() && !name.contains('/') => {
                if name.is_empty() {
                    return Err(Usage(format!("--lora {text}: the adapter's name is empty")));
                }
                if named.iter().any(|(n, _)| n == name) {
                    return Err(Usage(format!("--lora: two adapters are named {name:?}")));
                }
                let arg = LoraArg::parse(path).map_err(|e| Usage(format!("--lora {text}: {e}")))?;
                let arg = LoraArg {
                    scale: arg.scale * l.scale,
                    ..arg
                };
                named.push((name.to_string(), arg));
            }
            _ => rest.push(l),
        }
    }
    *loras = rest;
    Ok(named)
}

fn model_name(path: &std::path::Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    name.strip_suffix(".gguf").unwrap_or(&name).to_string()
}

pub fn run(s: ServeArgs) -> anyhow::Result<()> {
    let mut load = s.device.load_options()?;
    if s.parallel == 0 || s.max_queue == 0 {
        return Err(Usage("--parallel and --max-queue must be positive".into()).into());
    }
    let spec = s.chat_template.as_deref().map(TemplateSpec::parse);
    if let Some(TemplateSpec::File(p)) = &spec {
        if !p.is_file() {
            return Err(Usage(format!(
                "--chat-template {}: neither falcon-instruct, falcon-180b-chat nor a file",
                p.display()
            ))
            .into());
        }
    }
    if s.api_key.as_deref() == Some("") {
        return Err(Usage("--api-key is empty".into()).into());
    }
    let model_path: PathBuf = s.model.spec()?.path;
    load.context.n_seq_max = s.parallel;
    let mut s = s;
    let named = take_named_adapters(&mut s.model.lora)?;

    // The server lives until the process exits: its runtime and model are leaked, so that the
    // HTTP side and the batching loop can share them without lifetimes.
    let rt: &'static falcon::infer::Runtime =
        Box::leak(Box::new(crate::runtime(&s.model, &s.device, &load)?));
    let (model, _) = rt.load()?;
    let model: &'static Model<'static> = Box::leak(Box::new(model));
    let mut ctx_opts = rt.context_options(model);
    ctx_opts.n_seq_max = s.parallel;
    ctx_opts.kv_unified = false;
    let n_ctx = ctx_opts.n_ctx.unwrap_or(2048);
    let mut served = Vec::new();
    for (name, arg) in &named {
        let path = resolve_adapter(&arg.path, &rt.gguf, None)?;
        let adapter: &'static Adapter<'static> = Box::leak(Box::new(model.lora(&path)?));
        tracing::info!("adapter {name}: {} (scale {})", path.display(), arg.scale);
        served.push((adapter, arg.scale));
    }
    check_kv_fits(rt, model, n_ctx, s.parallel)?;
    let mut ctx = model.context(&ctx_opts).with_context(|| {
        format!(
            "making room for {} sequences of {n_ctx} tokens; lower --parallel or --ctx-size",
            s.parallel
        )
    })?;
    // Prompts are read in chunks of at most one physical batch per step, so that running
    // streams go on between the chunks of a long prompt.
    let n_batch = ctx.n_batch().min(512);

    let template = falcon::infer::chat::template(model, spec.as_ref())
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    let id = s.alias.clone().unwrap_or_else(|| model_name(&model_path));
    let created = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let validator = Validator {
        vocab: Arc::new(Vocab(model)),
        template: Arc::new(template),
        limits: Limits::new(n_ctx, s.parallel),
        model: ModelCard {
            id: id.clone(),
            adapters: named.iter().map(|(n, _)| n.clone()).collect(),
            created,
        },
    };
    let template_origin = validator.template.origin().to_string();

    let (q, jobs) = queue::queue(s.max_queue);
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let state = AppState::new(validator, q, metrics.clone(), health.clone());
    install_fatal_handler(Arc::downgrade(&state));
    let app = http::router(
        state.clone(),
        &HttpOptions {
            api_key: s.api_key.clone(),
            cors_origin: s.cors_origin.clone(),
            ..HttpOptions::default()
        },
    )?;

    if named.iter().any(|(n, _)| *n == id) {
        return Err(Usage(format!(
            "an adapter is named {id:?} like the model; name it otherwise, or set --alias"
        ))
        .into());
    }
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let loop_metrics = metrics.clone();
    std::thread::Builder::new()
        .name("batching".into())
        .spawn(move || {
            batch::run(
                model,
                &mut ctx,
                &served,
                jobs,
                &LoopOptions { n_batch },
                &loop_metrics,
            );
            let _ = done_tx.send(());
        })
        .context("starting the batching thread")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("http")
        .build()
        .context("starting the HTTP runtime")?;
    let addr = SocketAddr::new(s.host, s.port);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .with_context(|| {
            format!("cannot listen on {addr}: is another server on that port? choose --port")
        })?;
    let local = listener.local_addr().unwrap_or(addr);
    if !s.host.is_loopback() && s.api_key.is_none() {
        tracing::warn!(
            "listening on {} without --api-key: anyone who can reach this address can use the model",
            s.host
        );
    }
    eprintln!(
        "serving {id} on http://{local} ({} sequences of {n_ctx} tokens, chat template {template_origin}); memory: {}",
        s.parallel,
        format_memory(&memory_use(model))
    );
    let grace = Duration::from_secs(s.shutdown_timeout);
    let stop = async {
        while !crate::interrupted() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    runtime
        .block_on(http::serve(listener, app, state.clone(), stop, grace))
        .context("serving HTTP")?;
    // No more requests: closing the queue ends the loop once its sequences are done (cut
    // requests are cancelled at its next step).
    drop(state);
    runtime.shutdown_timeout(Duration::from_secs(1));
    if done_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        tracing::warn!("the batching loop did not stop within 10 s; exiting anyway");
    }
    eprintln!("stopped");
    Ok(())
}

/// Refuses to start when the KV cache of `parallel` sequences cannot fit in this machine's
/// memory (checked for models that run on the CPU; GPU contexts fail to allocate on their own).
fn check_kv_fits(
    rt: &falcon::infer::Runtime,
    model: &Model<'_>,
    n_ctx: u32,
    parallel: u32,
) -> anyhow::Result<()> {
    if model.gpu_layers() > 0 {
        return Ok(());
    }
    let Ok(sizes) = plan::model_sizes(&rt.gguf.to_string_lossy(), falcon::infer::Bits::Four) else {
        return Ok(());
    };
    let kv = plan::kv_per_layer(&sizes, u64::from(n_ctx)) * sizes.n_layer * u64::from(parallel);
    if let Some(avail) = falcon::engine::available_memory() {
        if kv > avail {
            anyhow::bail!(
                "the KV cache of --parallel {parallel} sequences of --ctx-size {n_ctx} needs {}, but {} of memory is available; lower --parallel or --ctx-size",
                human_bytes(kv),
                human_bytes(avail)
            );
        }
    }
    Ok(())
}

/// When ggml gives up (an RPC worker holding some layers died), the server stays up to say so:
/// `/health` answers 503 with the reason, running requests end with an error, new ones get 503.
fn install_fatal_handler(state: std::sync::Weak<AppState>) {
    falcon::engine::on_fatal(move |f| {
        let why = if f.dead_workers.is_empty() {
            f.reason()
        } else {
            format!("{}; restart it and this server", f.reason())
        };
        tracing::error!("{why}");
        // A weak reference: the handler must not keep the queue open after shutdown.
        if let Some(state) = state.upgrade() {
            state.health.set_failed(why);
            state.cut_requests();
        }
        // ggml aborts the process when this returns; the thread that called it owned the model's
        // context, which is unusable now. Keep it parked so that the HTTP side goes on answering.
        loop {
            std::thread::park();
        }
    });
}
