//! `falcon-infer perplexity`: perplexity over a text, and with a reference model also the KL
//! divergence and top-1 agreement.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use falcon::infer::perplexity::measure;
use falcon::infer::source::resolve;
use falcon::infer::{InferError, ModelSpec};

use crate::args::{DeviceArgs, ModelArgs};

#[derive(Debug, Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// The text to score.
    #[arg(short, long, value_name = "TEXT")]
    pub file: PathBuf,
    /// A reference model (e.g. the f16 or f32 GGUF): adds mean KL divergence and top-1 agreement.
    #[arg(long, value_name = "PATH")]
    pub reference: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(p: PerplexityArgs) -> anyhow::Result<()> {
    let mut load = p.device.load_options()?;
    load.context.all_logits = true;
    p.model.spec()?;
    let text = std::fs::read_to_string(&p.file)
        .with_context(|| format!("reading {}", p.file.display()))?;
    let rt = crate::runtime(&p.model, &p.device, &load)?;
    let reference_path = p
        .reference
        .as_ref()
        .map(|path| {
            resolve(
                &ModelSpec::new(path.clone(), p.model.bits()),
                crate::progress_bar(),
                None,
            )
            .map(|s| s.path)
        })
        .transpose()?;
    let (model, _) = rt.load()?;
    let mut ctx = rt.context_options(&model);
    let n_ctx = ctx.n_ctx.unwrap_or(512);
    // One batch per chunk keeps every logit of the chunk available at once.
    ctx.n_batch = Some(ctx.n_batch.unwrap_or(n_ctx).min(n_ctx));
    let mut session = model.session(&ctx)?;
    let tokens = model.tokenize(&text, true);
    let reference = match &reference_path {
        Some(path) => {
            let (m, _) = rt.load_other(path)?;
            if m.n_vocab() != model.n_vocab() || m.tokenize(&text, true) != tokens {
                return Err(InferError::VocabularyMismatch {
                    a: rt.gguf.clone(),
                    b: path.clone(),
                }
                .into());
            }
            Some(m)
        }
        None => None,
    };
    let mut ref_session = reference.as_ref().map(|m| m.session(&ctx)).transpose()?;
    let json = p.json;
    let report = measure(
        &mut session,
        ref_session.as_mut(),
        &tokens,
        &mut |k, n, ppl| {
            if !json {
                eprintln!("[{k}/{n}] perplexity so far {ppl:.4}");
            }
        },
    )?;
    if p.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "perplexity {:.4} over {} tokens ({} chunks of {})",
            report.perplexity, report.tokens, report.chunks, report.n_ctx
        );
        if let (Some(kl), Some(a)) = (report.mean_kl_divergence, report.top1_agreement) {
            println!(
                "mean KL divergence {kl:.6} nats | top-1 agreement {:.2}%",
                100.0 * a
            );
        }
    }
    Ok(())
}
