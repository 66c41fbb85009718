//! `falcon-infer eval`: the Open LLM Leaderboard's multiple-choice tasks, scored as
//! lm-evaluation-harness scores them, on the model at hand.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use clap::builder::TypedValueParser as _;
use clap::Args;

use falcon::eval::data;
use falcon::eval::metrics::Metric;
use falcon::eval::report::{check_comparable, compare, read_report, Comparison, Report};
use falcon::eval::tasks::{build_items, Fewshot, Item, Scoring, Setup, Unscorable};
use falcon::eval::{TaskKind, HARNESS_COMMIT};
use falcon::infer::eval::{score, tokenize, EvalContext, DEFAULT_CELLS, MAX_SEQS};
use falcon::infer::InferError;

use crate::args::{DeviceArgs, ModelArgs};
use crate::Usage;

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// The task.
    #[arg(long, value_name = "TASK", value_parser = clap::builder::PossibleValuesParser::new(TaskKind::ALL.map(TaskKind::name)).map(|s| s.parse::<TaskKind>().expect("a listed task")))]
    pub task: TaskKind,
    /// The split to evaluate (arc, mmlu: test; hellaswag, truthfulqa, winogrande: validation).
    #[arg(long, value_name = "PATH")]
    pub data: PathBuf,
    /// The split few-shot examples come from (arc, hellaswag, winogrande: train; mmlu: dev;
    /// truthfulqa: none).
    #[arg(long, value_name = "PATH")]
    pub fewshot_data: Option<PathBuf>,
    /// Few-shot examples per item (default: the leaderboard's: arc 25, hellaswag 10, mmlu 5,
    /// truthfulqa 0, winogrande 5).
    #[arg(long, value_name = "K")]
    pub shots: Option<usize>,
    /// Evaluate only the first N items after the seeded shuffle (per subject for mmlu).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Seed of the shuffle and the few-shot draws (the harness's: 42).
    #[arg(long, value_name = "S", default_value_t = 42)]
    pub seed: u64,
    /// Write the report (metrics, and per item the prediction and each choice's
    /// log-likelihood) as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// A report written earlier with --json (e.g. of the f32 model): also print how often the
    /// predictions agree and the mean |difference| of the log-likelihoods.
    #[arg(long, value_name = "REPORT")]
    pub reference: Option<PathBuf>,
    /// Fail on an item that cannot be scored instead of skipping it.
    #[arg(long)]
    pub strict: bool,
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    let task = a.task;
    let shots = a.shots.unwrap_or_else(|| task.leaderboard_shots());
    let mut load = a.device.load_options()?;
    a.model.spec()?;
    if a.limit == Some(0) {
        return Err(Usage("--limit must be positive".into()).into());
    }
    match (task.fewshot_split(), &a.fewshot_data) {
        (None, Some(_)) => {
            return Err(Usage(format!(
                "{task} is evaluated zero-shot: it takes no --fewshot-data"
            ))
            .into())
        }
        (Some(split), None) if shots > 0 => {
            return Err(Usage(format!(
                "{shots}-shot {task} draws its examples from the {split} split: give it with \
                 --fewshot-data PATH, or pass --shots 0"
            ))
            .into())
        }
        _ => {}
    }
    if task == TaskKind::Truthfulqa && shots > 0 {
        return Err(Usage(format!(
            "truthfulqa is evaluated zero-shot only (the harness refuses --shots {shots})"
        ))
        .into());
    }

    // Everything that can be wrong with the inputs is found before the model is loaded.
    let records = data::load(task, &a.data)?;
    let fewshot_records = a
        .fewshot_data
        .as_ref()
        .map(|p| data::load(task, p))
        .transpose()?;
    let setup = Setup {
        task,
        shots,
        seed: a.seed,
        limit: a.limit,
    };
    let fewshot = match &fewshot_records {
        Some(r) => Fewshot::Split(r),
        None => Fewshot::Split(&[]),
    };
    let items = build_items(&setup, &records, fewshot)?;
    let reference = a.reference.as_deref().map(read_report).transpose()?;
    if let (Some(r), Some(path)) = (&reference, &a.reference) {
        check_comparable(r, &setup, path)?;
    }

    // The KV cells of a round also size llama.cpp's fitting of layers to GPU memory.
    let cells = a.device.ctx_size.unwrap_or(DEFAULT_CELLS);
    load.context.n_ctx = Some(cells);
    load.context.n_batch = Some(a.device.batch_size.unwrap_or(cells));
    load.context.n_seq_max = MAX_SEQS;
    load.context.kv_unified = true;
    let rt = crate::runtime(&a.model, &a.device, &load)?;
    let (model, _) = rt.load()?;
    let max_length = model.n_ctx_train() as usize;
    let tokenized = tokenize(&model, &items)?;
    let unscorable: Vec<(&Item, String)> = items
        .iter()
        .zip(&tokenized)
        .filter_map(|(item, t)| t.as_ref().err().map(|e| (item, describe(task, item, e))))
        .collect();
    if let Some((item, reason)) = unscorable.first() {
        let at = &records[item.doc].location;
        if a.strict {
            anyhow::bail!("{at}: {reason} (--strict; without it such items are skipped)");
        }
        eprintln!(
            "warning: {} of {} items cannot be scored and are skipped, the first: {at}: {reason}",
            unscorable.len(),
            items.len()
        );
    }

    let sizing = EvalContext {
        cells: a.device.ctx_size.or(model.fitted_ctx()),
        batch: a.device.batch_size,
        seqs: None,
        threads: a.device.threads,
    };
    let bar = progress_bar();
    let started = Instant::now();
    let report = score(
        &model,
        &sizing,
        &setup,
        &items,
        tokenized,
        Some(crate::interrupt_flag()),
        &mut |done, total| {
            if let Some(b) = &bar {
                b.set_length(total as u64);
                b.set_position(done as u64);
            }
        },
    );
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if crate::interrupted() {
        return Err(InferError::Interrupted.into());
    }
    let report = report?;
    let elapsed = started.elapsed().as_secs_f64();
    let requests: usize = report.items.iter().map(|i| i.requests.len()).sum();
    eprintln!(
        "scored {} items ({requests} requests) in {elapsed:.2} s: {:.1} items/s",
        report.items.len(),
        report.items.len() as f64 / elapsed.max(1e-9)
    );
    if let Some(path) = &a.json {
        write_json(path, &report)?;
    }
    let comparison = match (&reference, &a.reference) {
        (Some(r), Some(path)) => Some(compare(&report, r, path)?),
        _ => None,
    };
    let mut out = std::io::stdout().lock();
    print_table(&mut out, &report, max_length)?;
    if let (Some(c), Some(path)) = (&comparison, &a.reference) {
        print_comparison(&mut out, c, path)?;
    }
    out.flush()?;
    Ok(())
}

/// Why an item cannot be scored, naming the field of the choice at fault.
fn describe(task: TaskKind, item: &Item, e: &Unscorable) -> String {
    let choice = match e {
        Unscorable::EmptyContinuation { choice, .. }
        | Unscorable::ContinuationTooLong { choice, .. }
        | Unscorable::EmptyContext { choice } => *choice,
    };
    let field = match (task, &item.scoring) {
        (TaskKind::Truthfulqa, Scoring::Truthfulqa { mc1, .. }) if choice >= *mc1 => {
            format!("mc2_targets.choices[{}]", choice - mc1)
        }
        (TaskKind::Truthfulqa, _) => format!("mc1_targets.choices[{choice}]"),
        (TaskKind::Arc, _) => format!("choices.text[{choice}]"),
        (TaskKind::Hellaswag, _) => format!("endings[{choice}]"),
        (TaskKind::Mmlu, _) => "question".to_owned(),
        (TaskKind::Winogrande, _) => "sentence".to_owned(),
    };
    format!("field `{field}`: {e}")
}

fn progress_bar() -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} requests {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(bar)
}

fn write_json(path: &Path, report: &Report) -> anyhow::Result<()> {
    let out = convert::partial::PartialFile::create(path)
        .with_context(|| format!("writing {}", path.display()))?;
    let mut w = std::io::BufWriter::new(out.file());
    serde_json::to_writer_pretty(&mut w, report)
        .map_err(std::io::Error::from)
        .and_then(|()| w.write_all(b"\n"))
        .and_then(|()| w.flush())
        .with_context(|| format!("writing {}", path.display()))?;
    drop(w);
    out.persist()
        .with_context(|| format!("writing {}", path.display()))
}

fn metric_row(name: &str, m: &Metric) -> String {
    let stderr = m
        .stderr
        .map_or_else(|| "-".to_owned(), |s| format!("{s:.4}"));
    format!("{name:<10} {:>8.4} {stderr:>8}", m.value)
}

fn print_table(out: &mut impl Write, r: &Report, max_length: usize) -> std::io::Result<()> {
    writeln!(
        out,
        "{}, {}-shot, seed {}: {} items scored, {} skipped (model context {max_length} tokens; \
         lm-evaluation-harness {})",
        r.task,
        r.shots,
        r.seed,
        r.items.len(),
        r.skipped.len(),
        &HARNESS_COMMIT[..7]
    )?;
    writeln!(out, "{:<10} {:>8} {:>8}", "metric", "value", "stderr")?;
    for (name, m) in &r.metrics {
        let mark = if name == r.task.leaderboard_metric() {
            "  (leaderboard)"
        } else {
            ""
        };
        writeln!(out, "{}{mark}", metric_row(name, m))?;
    }
    if !r.subjects.is_empty() {
        writeln!(out)?;
        writeln!(
            out,
            "{:<40} {:>5} {:>8} {:>8}",
            "subject", "n", "acc", "stderr"
        )?;
        for s in &r.subjects {
            if let Some(m) = s.metrics.get("acc") {
                let stderr = m
                    .stderr
                    .map_or_else(|| "-".to_owned(), |e| format!("{e:.4}"));
                writeln!(
                    out,
                    "{:<40} {:>5} {:>8.4} {stderr:>8}",
                    s.subject, s.n, m.value
                )?;
            }
        }
    }
    Ok(())
}

fn print_comparison(out: &mut impl Write, c: &Comparison, path: &Path) -> std::io::Result<()> {
    writeln!(out)?;
    writeln!(
        out,
        "against {}: {} items, {} requests",
        path.display(),
        c.items,
        c.requests
    )?;
    for (name, a) in &c.agreement {
        writeln!(out, "agreement {name:<10} {:>7.2}%", 100.0 * a)?;
    }
    writeln!(
        out,
        "mean |Δ loglik| {:.6} (largest {:.6})",
        c.mean_abs_loglikelihood_diff, c.max_abs_loglikelihood_diff
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_help_names_each_tasks_splits_and_shots() {
        let help = crate::Cli::command()
            .find_subcommand_mut("eval")
            .expect("eval")
            .render_long_help()
            .to_string();
        for task in TaskKind::ALL {
            let line = help
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{task} ")))
                .unwrap_or_else(|| panic!("no line for {task} in:\n{help}"));
            let words: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(words[1], task.eval_split(), "{line}");
            match task.fewshot_split() {
                Some(split) => assert_eq!(words[2], split, "{line}"),
                None => assert!(line.contains("zero-shot"), "{line}"),
            }
            assert!(
                words.contains(&task.leaderboard_shots().to_string().as_str()),
                "{line}"
            );
            assert!(words.contains(&task.leaderboard_metric()), "{line}");
        }
    }
}
