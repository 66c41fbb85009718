//! `falcon-infer chat`: a conversation, one message per line of stdin.

use std::io::{BufRead, Write};

use anyhow::Context as _;
use clap::Args;

use falcon::infer::chat::History;
use falcon::infer::generate::{complete, Counters};
use falcon::infer::InferError;

use crate::args::{DeviceArgs, ModelArgs, SamplingArgs};

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// A system line put before the conversation.
    #[arg(long)]
    pub system: Option<String>,
}

pub fn run(c: ChatArgs) -> anyhow::Result<()> {
    let load = c.device.load_options()?;
    let sampling = c.sampling.params()?;
    let rt = crate::runtime(&c.model, &c.device, &load)?;
    let (model, _) = rt.load()?;
    let mut session = rt.session(&model)?;
    let n_ctx = session.n_ctx();
    let mut stops = c.sampling.stop.clone();
    stops.push("User:".into());
    let max_new = c.sampling.max_new_tokens;
    let reserve = max_new.min(n_ctx / 2);
    let mut history = History {
        system: c.system.clone(),
        turns: Vec::new(),
    };
    let mut first = 0;
    let stdin = std::io::stdin();
    let mut counters = Counters::default();
    eprintln!("chat with the model; an empty line or end of input (Ctrl-D) ends the conversation");
    loop {
        eprint!("User: ");
        std::io::stderr().flush().ok();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).context("reading stdin")? == 0
            || line.trim().is_empty()
            || crate::interrupted()
        {
            break;
        }
        // Drop the oldest turns until the prompt and room for an answer fit.
        let ids = loop {
            let ids = model.tokenize(&history.prompt(first, &line), true);
            if ids.len() + reserve <= n_ctx || first == history.turns.len() {
                break ids;
            }
            first += 1;
        };
        if ids.len() >= n_ctx {
            eprintln!(
                "error: this message is {} tokens with the system line; the context holds {n_ctx} \
                 (--ctx-size). Send something shorter.",
                ids.len()
            );
            continue;
        }
        let mut out = std::io::stdout().lock();
        write!(out, "Falcon:").map_err(InferError::Output)?;
        let mut on_text = |s: &str| -> Result<(), InferError> {
            if crate::interrupted() {
                return Err(InferError::Interrupted);
            }
            out.write_all(s.as_bytes()).map_err(InferError::Output)?;
            out.flush().map_err(InferError::Output)
        };
        let mut params = sampling.clone();
        params.seed = sampling.seed.wrapping_add(history.turns.len() as u32);
        let answer = complete(
            &model,
            &mut session,
            &ids,
            &params,
            max_new,
            &stops,
            &mut counters,
            &mut on_text,
        )?;
        writeln!(out).map_err(InferError::Output)?;
        history
            .turns
            .push((line.trim().to_string(), answer.text.trim().to_string()));
    }
    Ok(())
}
