//! `falcon-infer rpc-server`: a worker that serves this machine's devices to other machines.

use std::net::IpAddr;

use anyhow::Context as _;
use clap::Args;

use falcon::engine::{Engine, RpcServerOptions, RPC_PROTOCOL};

use crate::Usage;

#[derive(Debug, Args)]
pub struct RpcServerArgs {
    /// Address to listen on. Anything but loopback exposes this machine's devices, unencrypted
    /// and without authentication, to everyone who can reach the port.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(short, long, default_value_t = 50052)]
    pub port: u16,
    /// CPU threads for the CPU device (default: all cores).
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Devices to serve, by name (see -v or `falcon-infer plan`; default: every GPU, or the CPU
    /// when there is none). Repeatable or comma-separated.
    #[arg(long, value_name = "NAME", value_delimiter = ',')]
    pub device: Vec<String>,
    /// Keep large tensors in a local cache (under the user cache directory), so that a client
    /// loading the same model again sends hashes instead of the weights.
    #[arg(long)]
    pub cache: bool,
    /// Print llama.cpp's own log on stderr.
    #[arg(short, long)]
    pub verbose: bool,
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

pub fn run(r: RpcServerArgs) -> anyhow::Result<()> {
    if r.port == 0 {
        return Err(Usage("--port must be between 1 and 65535".into()).into());
    }
    if r.threads == Some(0) {
        return Err(Usage("--threads must be positive".into()).into());
    }
    let endpoint = format!("{}:{}", r.host, r.port);
    falcon::engine::parse_endpoint(&endpoint).map_err(|e| Usage(format!("--host/--port: {e}")))?;
    if !is_loopback(&r.host) {
        eprintln!(
            "warning: listening on {}: the RPC protocol has no authentication and no encryption; \
             anyone who can reach this port can use this machine's devices and read what runs on \
             them. Use it only inside a trusted network (a VPN or an SSH tunnel).",
            r.host
        );
    }
    let cache_dir = if r.cache {
        let dir = dirs::cache_dir()
            .context("there is no user cache directory for --cache")?
            .join("falcon")
            .join("rpc");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the cache directory {}", dir.display()))?;
        Some(dir)
    } else {
        None
    };
    let engine = Engine::init()?;
    if !engine.has_rpc() {
        return Err(falcon::engine::EngineError::NoRpc.into());
    }
    if let Some(notice) = engine.gpu_notice() {
        eprintln!("warning: {notice}");
    }
    let opts = RpcServerOptions {
        endpoint: endpoint.clone(),
        threads: r.threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        }),
        devices: (!r.device.is_empty()).then(|| r.device.clone()),
        cache_dir,
    };
    eprintln!(
        "falcon-infer rpc-server: protocol {}.{}.{}, listening on {endpoint}; Ctrl-C stops it",
        RPC_PROTOCOL.0, RPC_PROTOCOL.1, RPC_PROTOCOL.2
    );
    // ggml's server loop never returns while it serves: run it on its own thread and stop the
    // process when asked.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(engine.serve_rpc(&opts));
    });
    loop {
        if crate::interrupted() {
            eprintln!("falcon-infer rpc-server: stopped");
            return Ok(());
        }
        match rx.recv_timeout(std::time::Duration::from_millis(100)) {
            Ok(result) => return result.map_err(Into::into),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                anyhow::bail!("the RPC worker thread ended unexpectedly")
            }
        }
    }
}
