//! `falcon-infer chat`: a conversation, one message per line of stdin.

use std::io::{BufRead, Write};

use anyhow::Context as _;
use clap::Args;

use falcon::infer::chat::History;
use falcon::infer::generate::{complete, Counters};
use falcon::infer::InferError;

use falcon::serve::template::TemplateSpec;

use crate::args::{DeviceArgs, ModelArgs, SamplingArgs};

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// A system message put before the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Chat template: `falcon-instruct` (User:/Assistant:, Falcon-7B/40B-instruct),
    /// `falcon-180b-chat` (System:/User:/Falcon:) or a Jinja file. Default: the model's own
    /// (tokenizer.chat_template), else the family's format chosen from the model's name.
    #[arg(long, value_name = "NAME|FILE")]
    pub chat_template: Option<String>,
}

pub fn run(c: ChatArgs) -> anyhow::Result<()> {
    let load = c.device.load_options()?;
    let sampling = c.sampling.params()?;
    let rt = crate::runtime(&c.model, &c.device, &load)?;
    let (model, _) = rt.load()?;
    let mut session = rt.session(&model)?;
    let n_ctx = session.n_ctx();
    let spec = c.chat_template.as_deref().map(TemplateSpec::parse);
    let template = falcon::infer::chat::template(&model, spec.as_ref())
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    let mut stops = c.sampling.stop.clone();
    stops.extend(template.stop().iter().cloned());
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
        let (prompt, ids) = loop {
            let prompt = template
                .render(&history.messages(first, &line), true)
                .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
            let ids = model.tokenize(&prompt, true);
            if ids.len() + reserve <= n_ctx || first == history.turns.len() {
                break (prompt, ids);
            }
            first += 1;
        };
        // The answer's label: the generation prompt's last line (`Assistant:`, `Falcon:`).
        let label = prompt.rsplit('\n').next().unwrap_or("").trim_end();
        if ids.len() >= n_ctx {
            eprintln!(
                "error: this message is {} tokens with the system line; the context holds {n_ctx} \
                 (--ctx-size). Send something shorter.",
                ids.len()
            );
            continue;
        }
        let mut out = std::io::stdout().lock();
        write!(out, "{label}").map_err(InferError::Output)?;
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
