//! A run's report (what `--json` writes): the setup, the task's metrics (and MMLU's per
//! subject), and per item its prediction, metrics and every request's log-likelihood; and
//! the comparison of two reports of the same items (what quantization changed).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::metrics::{score_item, summarize, Metric, Scored};
use super::tasks::{flatten, Item, Request, Setup, Unscorable};
use super::{EvalError, Scorer, TaskKind, HARNESS_COMMIT};

/// One request's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestReport {
    /// The continuation text.
    pub continuation: String,
    /// Context tokens fed (after left truncation).
    pub context_tokens: usize,
    /// Continuation tokens scored.
    pub continuation_tokens: usize,
    /// Summed log-probability of the continuation.
    pub loglikelihood: f64,
    /// Whether greedy decoding would produce the continuation.
    pub is_greedy: bool,
}

/// One item's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemReport {
    /// The document's index in the data.
    pub doc: usize,
    /// MMLU's subject.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subject: Option<String>,
    /// The right choice.
    pub gold: usize,
    /// The most likely choice (TruthfulQA: among the mc1 answers).
    pub pred: usize,
    /// The most likely choice by log-likelihood per character (ARC, HellaSwag, MMLU).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pred_norm: Option<usize>,
    /// This item's metric values.
    pub metrics: BTreeMap<String, f64>,
    /// Its requests, in the harness's order.
    pub requests: Vec<RequestReport>,
}

/// An item that could not be scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    /// The document's index in the data.
    pub doc: usize,
    /// MMLU's subject.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subject: Option<String>,
    /// Why.
    pub reason: String,
}

/// One MMLU subject's metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubjectReport {
    /// The subject.
    pub subject: String,
    /// Items scored.
    pub n: usize,
    /// Its metrics.
    pub metrics: BTreeMap<String, Metric>,
}

/// A run's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The task.
    pub task: TaskKind,
    /// Whose scoring is followed: lm-evaluation-harness and its commit.
    pub harness: String,
    /// Few-shot examples per item.
    pub shots: usize,
    /// The seed of the shuffle and the draws.
    pub seed: u64,
    /// The limit on documents (per subject for MMLU).
    pub limit: Option<usize>,
    /// The model's context length the requests were cut to.
    pub max_length: usize,
    /// The task's metrics (MMLU: means over subjects; the leaderboard's score is `acc`).
    pub metrics: BTreeMap<String, Metric>,
    /// MMLU's subjects.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub subjects: Vec<SubjectReport>,
    /// Scored items, in evaluation order.
    pub items: Vec<ItemReport>,
    /// Items that could not be scored.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub skipped: Vec<Skipped>,
}

/// Scores the tokenized items with `scorer` and reports.
///
/// `tokenized` is [`tokenize_items`](super::tasks::tokenize_items)'s output for `items`.
///
/// # Errors
/// The scorer's.
///
/// # Panics
/// If `tokenized` is not one entry per item, or the scorer returns a wrong number of
/// results.
pub fn evaluate<S: Scorer>(
    setup: &Setup,
    max_length: usize,
    items: &[Item],
    tokenized: Vec<Result<Vec<Request>, Unscorable>>,
    scorer: &mut S,
) -> Result<Report, S::Error> {
    assert_eq!(items.len(), tokenized.len(), "one tokenization per item");
    let skipped: Vec<Skipped> = items
        .iter()
        .zip(&tokenized)
        .filter_map(|(item, t)| {
            t.as_ref().err().map(|e| Skipped {
                doc: item.doc,
                subject: item.subject.clone(),
                reason: e.to_string(),
            })
        })
        .collect();
    let flat = flatten(tokenized);
    let scored = if flat.requests.is_empty() {
        Vec::new()
    } else {
        scorer.score(&flat.requests)?
    };
    assert_eq!(scored.len(), flat.requests.len(), "one result per request");
    let mut results = Vec::new();
    let mut reports = Vec::new();
    for (item, range) in items.iter().zip(&flat.ranges) {
        let Some(range) = range else { continue };
        let scores: &[Scored] = &scored[range.clone()];
        let result = score_item(item, scores);
        let requests = item
            .requests
            .iter()
            .zip(&flat.requests[range.clone()])
            .zip(scores)
            .map(|((text, tokens), s)| RequestReport {
                continuation: text.continuation.clone(),
                context_tokens: tokens.context.len(),
                continuation_tokens: tokens.continuation.len(),
                loglikelihood: s.loglikelihood,
                is_greedy: s.is_greedy,
            })
            .collect();
        reports.push(ItemReport {
            doc: item.doc,
            subject: item.subject.clone(),
            gold: result.gold,
            pred: result.pred,
            pred_norm: result.pred_norm,
            metrics: result.metrics.iter().cloned().collect(),
            requests,
        });
        results.push(result);
    }
    let summary = summarize(&results);
    let subjects = summary
        .groups
        .iter()
        .filter_map(|g| {
            g.subject.as_ref().map(|s| SubjectReport {
                subject: s.clone(),
                n: g.n,
                metrics: g.metrics.iter().cloned().collect(),
            })
        })
        .collect();
    Ok(Report {
        task: setup.task,
        harness: format!("lm-evaluation-harness {HARNESS_COMMIT}"),
        shots: setup.shots,
        seed: setup.seed,
        limit: setup.limit,
        max_length,
        metrics: summary.metrics.into_iter().collect(),
        subjects,
        items: reports,
        skipped,
    })
}

/// Reads a report written earlier (the `--json` output).
///
/// # Errors
/// An unreadable file or one that is not a report.
pub fn read_report(path: &Path) -> Result<Report, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| EvalError::Reference {
        path: path.to_owned(),
        problem: format!("not an evaluation report ({e})"),
    })
}

/// How a report differs from a reference report of the same items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Items in both.
    pub items: usize,
    /// Their requests.
    pub requests: usize,
    /// Per prediction, the fraction of items where both predict the same choice: `acc` (the
    /// most likely choice), `acc_norm` (per character), `mc1` (TruthfulQA).
    pub agreement: BTreeMap<String, f64>,
    /// Mean |log-likelihood − reference's| over the requests.
    pub mean_abs_loglikelihood_diff: f64,
    /// The largest such difference.
    pub max_abs_loglikelihood_diff: f64,
}

/// Whether a run of `setup` can be compared with `reference` (read from `path`, named in
/// errors): the same task, shots and seed, so the same prompts. For checking before a run.
///
/// # Errors
/// Another task, other shots or another seed.
pub fn check_comparable(reference: &Report, setup: &Setup, path: &Path) -> Result<(), EvalError> {
    if (reference.task, reference.shots, reference.seed) != (setup.task, setup.shots, setup.seed) {
        return Err(EvalError::Reference {
            path: path.to_owned(),
            problem: format!(
                "a {}-shot {} run with seed {}, not {}-shot {} with seed {}: its prompts differ",
                reference.shots,
                reference.task,
                reference.seed,
                setup.shots,
                setup.task,
                setup.seed
            ),
        });
    }
    Ok(())
}

/// Compares `report` with `reference` (read from `path`, named in errors) over the items
/// both have.
///
/// # Errors
/// Another task, other shots or seed (other prompts), an item whose requests differ, or no
/// items in common.
pub fn compare(report: &Report, reference: &Report, path: &Path) -> Result<Comparison, EvalError> {
    let problem = |problem: String| EvalError::Reference {
        path: path.to_owned(),
        problem,
    };
    check_comparable(
        reference,
        &Setup {
            task: report.task,
            shots: report.shots,
            seed: report.seed,
            limit: report.limit,
        },
        path,
    )?;
    let theirs: BTreeMap<(Option<&str>, usize), &ItemReport> = reference
        .items
        .iter()
        .map(|i| ((i.subject.as_deref(), i.doc), i))
        .collect();
    let pred_name = match report.task {
        TaskKind::Truthfulqa => "mc1",
        _ => "acc",
    };
    let (mut items, mut requests, mut same_pred, mut same_norm, mut with_norm) = (0, 0, 0, 0, 0);
    let (mut sum, mut max) = (0.0f64, 0.0f64);
    for mine in &report.items {
        let Some(other) = theirs.get(&(mine.subject.as_deref(), mine.doc)) else {
            continue;
        };
        let same_requests = mine.requests.len() == other.requests.len()
            && mine
                .requests
                .iter()
                .zip(&other.requests)
                .all(|(a, b)| a.continuation == b.continuation);
        if !same_requests {
            return Err(problem(format!(
                "item {} has other requests there: not the same data",
                mine.doc
            )));
        }
        items += 1;
        same_pred += usize::from(mine.pred == other.pred);
        if let (Some(a), Some(b)) = (mine.pred_norm, other.pred_norm) {
            with_norm += 1;
            same_norm += usize::from(a == b);
        }
        for (a, b) in mine.requests.iter().zip(&other.requests) {
            let d = (a.loglikelihood - b.loglikelihood).abs();
            sum += d;
            max = max.max(d);
            requests += 1;
        }
    }
    if items == 0 {
        return Err(problem("no items in common with this run".to_owned()));
    }
    let mut agreement = BTreeMap::new();
    agreement.insert(pred_name.to_owned(), same_pred as f64 / items as f64);
    if with_norm > 0 {
        agreement.insert("acc_norm".to_owned(), same_norm as f64 / with_norm as f64);
    }
    Ok(Comparison {
        items,
        requests,
        agreement,
        mean_abs_loglikelihood_diff: sum / requests as f64,
        max_abs_loglikelihood_diff: max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::hexfloat;
    use crate::eval::tasks::tests::{
        items_for, items_limited, mini_tokenizer, reference, reference_items,
    };
    use crate::eval::tasks::tokenize_items;
    use serde_json::Value;
    use std::collections::HashMap;

    /// Answers every request with the harness's own result for it.
    struct Replay(HashMap<(Vec<i32>, Vec<i32>), Scored>);

    impl Scorer for Replay {
        type Error = std::convert::Infallible;
        fn score(&mut self, requests: &[Request]) -> Result<Vec<Scored>, Self::Error> {
            Ok(requests
                .iter()
                .map(|r| self.0[&(r.context.clone(), r.continuation.clone())])
                .collect())
        }
    }

    fn replay(task: &Value) -> Replay {
        let ids = |v: &Value| -> Vec<i32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap() as i32)
                .collect()
        };
        let mut map = HashMap::new();
        for item in task["items"].as_array().unwrap() {
            for r in item["requests"].as_array().unwrap() {
                let (mut c, k) = (ids(&r["context_ids"]), ids(&r["continuation_ids"]));
                let total = c.len() + k.len();
                if total > 257 {
                    c.drain(..total - 257);
                }
                let s = Scored {
                    loglikelihood: hexfloat::parse(r["loglikelihood"]["hex"].as_str().unwrap())
                        .unwrap(),
                    is_greedy: r["is_greedy"].as_bool().unwrap(),
                };
                map.insert((c, k), s);
            }
        }
        Replay(map)
    }

    fn run(name: &str, task: &Value, limit: Option<usize>) -> Report {
        let items = items_limited(name, task, limit);
        let setup = Setup {
            task: name.parse().unwrap(),
            shots: task["shots"].as_u64().unwrap() as usize,
            seed: 42,
            limit,
        };
        let tokenized = tokenize_items(&items, &mut mini_tokenizer(), 11, 256);
        evaluate(&setup, 256, &items, tokenized, &mut replay(task)).unwrap()
    }

    #[test]
    fn the_report_holds_the_harnesss_numbers_and_round_trips() {
        let reference = reference();
        for (name, task) in reference["tasks"].as_object().unwrap() {
            let report = run(name, task, None);
            let want = reference_items(task);
            assert_eq!(report.items.len(), want.len());
            for (item, w) in report.items.iter().zip(&want) {
                assert_eq!(item.doc as u64, w["doc"].as_u64().unwrap());
                for (r, wr) in item.requests.iter().zip(w["requests"].as_array().unwrap()) {
                    assert_eq!(r.continuation, wr["continuation"].as_str().unwrap());
                    let want =
                        hexfloat::parse(wr["loglikelihood"]["hex"].as_str().unwrap()).unwrap();
                    assert_eq!(r.loglikelihood.to_bits(), want.to_bits());
                }
            }
            let key = report.task.leaderboard_metric();
            assert!(report.metrics.contains_key(key), "{name}: {key}");
            if name == "mmlu" {
                assert_eq!(report.subjects.len(), 2);
            }
            let json = serde_json::to_string(&report).unwrap();
            let back: Report = serde_json::from_str(&json).unwrap();
            assert_eq!(back.items.len(), report.items.len());
            let same = compare(&report, &back, Path::new("r.json")).unwrap();
            assert_eq!(
                same.agreement[if name == "truthfulqa" { "mc1" } else { "acc" }],
                1.0
            );
            // serde_json's default float parser may be off by one unit in the last place.
            assert!(same.max_abs_loglikelihood_diff < 1e-12);
        }
    }

    #[test]
    fn comparison_counts_changed_predictions_and_differences() {
        let reference = reference();
        let task = &reference["tasks"]["hellaswag"];
        let a = run("hellaswag", task, None);
        let mut b = a.clone();
        // Another "model": every log-likelihood 0.5 lower, and one prediction changed.
        for item in &mut b.items {
            for r in &mut item.requests {
                r.loglikelihood -= 0.5;
            }
        }
        b.items[0].pred = (b.items[0].pred + 1) % 4;
        let c = compare(&b, &a, Path::new("ref.json")).unwrap();
        assert_eq!(c.items, 6);
        assert_eq!(c.requests, 24);
        assert_eq!(c.agreement["acc"], 5.0 / 6.0);
        assert_eq!(c.agreement["acc_norm"], 1.0);
        assert!((c.mean_abs_loglikelihood_diff - 0.5).abs() < 1e-12);

        let mut other = a.clone();
        other.shots = 0;
        let e = compare(&a, &other, Path::new("ref.json"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("ref.json: a 0-shot hellaswag run"), "{e}");
        let mut other = a.clone();
        other.items[1].requests[2].continuation.push('!');
        let e = compare(&a, &other, Path::new("ref.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("other requests there"), "{e}");
        let mut other = a.clone();
        other.items.clear();
        let e = compare(&a, &other, Path::new("ref.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no items in common"), "{e}");
    }

    #[test]
    fn a_limited_run_compares_on_the_common_items() {
        let reference = reference();
        let task = &reference["tasks"]["truthfulqa"];
        let all = run("truthfulqa", task, None);
        let two = run("truthfulqa", task, Some(2));
        assert_eq!(two.items.len(), 2);
        assert_eq!(two.items[..], all.items[..2]);
        let c = compare(&two, &all, Path::new("r.json")).unwrap();
        assert_eq!((c.items, c.agreement["mc1"]), (2, 1.0));
    }

    #[test]
    fn unscorable_items_are_listed_and_left_out() {
        let reference = reference();
        let task = &reference["tasks"]["arc"];
        let items = items_for("arc", task);
        let mut tokenized = tokenize_items(&items, &mut mini_tokenizer(), 11, 256);
        tokenized[1] = Err(Unscorable::EmptyContext { choice: 0 });
        let setup = Setup {
            task: TaskKind::Arc,
            shots: 3,
            seed: 42,
            limit: None,
        };
        let report = evaluate(&setup, 256, &items, tokenized, &mut replay(task)).unwrap();
        assert_eq!(report.items.len(), items.len() - 1);
        assert_eq!(report.skipped.len(), 1);
        assert_eq!(report.skipped[0].doc, items[1].doc);
        let e = read_report(Path::new("/nonexistent/r.json"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/nonexistent/r.json: "), "{e}");
    }
}
