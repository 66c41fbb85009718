//! Scores to metrics, computed as lm-evaluation-harness computes them: the same
//! predictions (numpy's `argmax`: the first maximum), the same float operations in the same
//! order (Python's `sum` left to right, `mean` as `sum / len`, the standard error of a mean
//! as the sample standard deviation over `sqrt(n)`), and MMLU's leaderboard score as numpy's
//! mean (pairwise summation) of the subjects' accuracies.

use serde::{Deserialize, Serialize};

use super::tasks::{Item, Scoring};

/// A request's result: the summed log-probability of its continuation and whether every
/// continuation token was the most likely one (`is_greedy`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// Sum of the continuation tokens' log-probabilities (natural log).
    pub loglikelihood: f64,
    /// Every continuation token was the argmax of its distribution.
    pub is_greedy: bool,
}

/// One item's metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemResult {
    /// The document's index in the data.
    pub doc: usize,
    /// MMLU's subject.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subject: Option<String>,
    /// The right choice (TruthfulQA: 0, the true mc1 answer).
    pub gold: usize,
    /// The most likely choice (TruthfulQA: among the mc1 answers).
    pub pred: usize,
    /// The most likely choice after dividing by the choices' lengths (ARC, HellaSwag, MMLU).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pred_norm: Option<usize>,
    /// `acc`, `acc_norm`, `mc1`, `mc2`: this item's values.
    pub metrics: Vec<(String, f64)>,
}

/// numpy's `argmax`: the index of the first maximum (of the first NaN if there is one).
pub fn argmax(values: impl IntoIterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in values.into_iter().enumerate() {
        if x.is_nan() {
            return i;
        }
        if i == 0 || x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// Python's `sum` of floats: left to right from 0.
fn py_sum(values: impl IntoIterator<Item = f64>) -> f64 {
    values.into_iter().fold(0.0, |acc, x| acc + x)
}

fn indicator(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// The harness's TruthfulQA mc2: the probability mass of the true answers, normalised over
/// all mc2 answers (`p = exp(ll)`, summed with Python's `sum`).
///
/// numpy computes `exp` with its own vector code on some CPUs, which can differ from the C
/// library's in the last bit; mc2 can therefore differ from the harness's by a few units in
/// the last place.
pub fn mc2(lls: &[f64], n_true: usize) -> f64 {
    let p: Vec<f64> = lls.iter().map(|&l| l.exp()).collect();
    let (p_true, p_false) = p.split_at(n_true);
    let total = py_sum(p_true.iter().copied()) + py_sum(p_false.iter().copied());
    py_sum(p_true.iter().map(|&x| x / total))
}

/// One item's metrics from its requests' results (in request order).
///
/// # Panics
/// If `scored` does not have one result per request of the item.
pub fn score_item(item: &Item, scored: &[Scored]) -> ItemResult {
    assert_eq!(scored.len(), item.requests.len(), "one result per request");
    let lls: Vec<f64> = scored.iter().map(|s| s.loglikelihood).collect();
    let (gold, pred, pred_norm, metrics) = match &item.scoring {
        Scoring::Choice { gold, lengths } => {
            let pred = argmax(lls.iter().copied());
            let pred_norm = argmax(lls.iter().zip(lengths).map(|(&l, &n)| l / n as f64));
            let metrics = vec![
                ("acc".to_owned(), indicator(pred == *gold)),
                ("acc_norm".to_owned(), indicator(pred_norm == *gold)),
            ];
            (*gold, pred, Some(pred_norm), metrics)
        }
        Scoring::Truthfulqa { mc1, mc2_true } => {
            let pred = argmax(lls[..*mc1].iter().copied());
            let metrics = vec![
                ("mc1".to_owned(), indicator(pred == 0)),
                ("mc2".to_owned(), mc2(&lls[*mc1..], *mc2_true)),
            ];
            (0, pred, None, metrics)
        }
        Scoring::Winogrande { gold } => {
            let pred = argmax(lls.iter().copied());
            (
                *gold,
                pred,
                None,
                vec![("acc".to_owned(), indicator(pred == *gold))],
            )
        }
    };
    ItemResult {
        doc: item.doc,
        subject: item.subject.clone(),
        gold,
        pred,
        pred_norm,
        metrics,
    }
}

/// A metric over a set of items.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// The value.
    pub value: f64,
    /// Its standard error (`None` for fewer than two items, where the harness divides by
    /// zero).
    pub stderr: Option<f64>,
}

/// The harness's `mean`: `sum(arr) / len(arr)`.
pub fn mean(values: &[f64]) -> f64 {
    py_sum(values.iter().copied()) / values.len() as f64
}

/// The harness's `mean_stderr`: the sample standard deviation (n - 1) over `sqrt(n)`.
pub fn mean_stderr(values: &[f64]) -> Option<f64> {
    let n = values.len();
    if n < 2 {
        return None;
    }
    let mu = mean(values);
    let var = py_sum(values.iter().map(|&x| (x - mu) * (x - mu))) / (n - 1) as f64;
    Some(var.sqrt() / (n as f64).sqrt())
}

/// numpy's sum of a contiguous float64 array: pairwise, in blocks of 128 with eight
/// accumulators.
fn numpy_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        py_sum(a.iter().copied())
    } else if n <= 128 {
        let mut r = [0.0; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for (j, acc) in r.iter_mut().enumerate() {
                *acc += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &a[i..] {
            res += x;
        }
        res
    } else {
        let mut half = n / 2;
        half -= half % 8;
        numpy_sum(&a[..half]) + numpy_sum(&a[half..])
    }
}

/// `np.mean` of a float64 array.
pub fn numpy_mean(values: &[f64]) -> f64 {
    numpy_sum(values) / values.len() as f64
}

/// The metrics of one of the harness's tasks (one subject of MMLU).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupSummary {
    /// MMLU's subject.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subject: Option<String>,
    /// Items scored.
    pub n: usize,
    /// `acc`, `acc_norm`, `mc1`, `mc2` as the task has them.
    pub metrics: Vec<(String, Metric)>,
}

/// A task's metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Per harness task: one, or one per MMLU subject (in name order).
    pub groups: Vec<GroupSummary>,
    /// The task's metrics: the group's, or for MMLU the mean over subjects (the
    /// leaderboard's MMLU score is its `acc`), with the standard error of that mean taken as
    /// `sqrt(sum of the subjects' squared standard errors) / subjects`.
    pub metrics: Vec<(String, Metric)>,
}

/// Aggregates item results (in evaluation order, grouped by subject as [`build_items`]
/// makes them) into the harness's task metrics.
///
/// [`build_items`]: super::tasks::build_items
pub fn summarize(results: &[ItemResult]) -> Summary {
    let mut groups: Vec<GroupSummary> = Vec::new();
    let mut start = 0;
    while start < results.len() {
        let subject = &results[start].subject;
        let end = start
            + results[start..]
                .iter()
                .take_while(|r| &r.subject == subject)
                .count();
        let group = &results[start..end];
        let names: Vec<String> = group[0].metrics.iter().map(|(k, _)| k.clone()).collect();
        let metrics = names
            .iter()
            .enumerate()
            .map(|(m, name)| {
                let values: Vec<f64> = group.iter().map(|r| r.metrics[m].1).collect();
                let metric = Metric {
                    value: mean(&values),
                    stderr: mean_stderr(&values),
                };
                (name.clone(), metric)
            })
            .collect();
        groups.push(GroupSummary {
            subject: subject.clone(),
            n: group.len(),
            metrics,
        });
        start = end;
    }
    let metrics = match groups.as_slice() {
        [] => Vec::new(),
        [one] if one.subject.is_none() => one.metrics.clone(),
        many => many[0]
            .metrics
            .iter()
            .enumerate()
            .map(|(m, (name, _))| {
                let values: Vec<f64> = many.iter().map(|g| g.metrics[m].1.value).collect();
                let errors: Option<Vec<f64>> = many.iter().map(|g| g.metrics[m].1.stderr).collect();
                let stderr =
                    errors.map(|e| py_sum(e.iter().map(|&x| x * x)).sqrt() / e.len() as f64);
                (
                    name.clone(),
                    Metric {
                        value: numpy_mean(&values),
                        stderr,
                    },
                )
            })
            .collect(),
    };
    Summary { groups, metrics }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::hexfloat;
    use crate::eval::pyrandom::PyRandom;
    use crate::eval::tasks::tests::{items_for, reference, reference_items};
    use serde_json::Value;

    fn hex(v: &Value) -> f64 {
        hexfloat::parse(v["hex"].as_str().unwrap()).unwrap()
    }

    /// Exactly, except mc2 (numpy's exp): within a few units in the last place.
    fn same(name: &str, got: f64, want: f64, what: &str) {
        if name.starts_with("mc2") {
            assert!(
                (got - want).abs() <= 4.0 * f64::EPSILON,
                "{what}: {got:e} vs {want:e}"
            );
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "{what}: {got:e} vs {want:e}");
        }
    }

    #[test]
    fn metrics_from_the_harnesss_loglikelihoods_are_the_harnesss() {
        let reference = reference();
        for (name, task) in reference["tasks"].as_object().unwrap() {
            let items = items_for(name, task);
            let want_items = reference_items(task);
            let results: Vec<ItemResult> = items
                .iter()
                .zip(&want_items)
                .map(|(item, w)| {
                    let scored: Vec<Scored> = w["requests"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| Scored {
                            loglikelihood: hex(&r["loglikelihood"]),
                            is_greedy: r["is_greedy"].as_bool().unwrap(),
                        })
                        .collect();
                    let result = score_item(item, &scored);
                    for (k, v) in w["metrics"].as_object().unwrap() {
                        let got = result.metrics.iter().find(|(n, _)| n == k).unwrap().1;
                        same(k, got, hex(v), &format!("{name} doc {} {k}", item.doc));
                    }
                    result
                })
                .collect();
            let summary = summarize(&results);
            let harness = task["metrics"].as_object().unwrap();
            assert_eq!(summary.groups.len(), harness.len(), "{name}");
            for (group, (harness_task, want)) in summary.groups.iter().zip(harness) {
                if let Some(s) = &group.subject {
                    assert_eq!(harness_task, &format!("hendrycksTest-{s}"));
                }
                let want = want.as_object().unwrap();
                assert_eq!(want.len(), 2 * group.metrics.len(), "{name}");
                for (k, m) in &group.metrics {
                    same(k, m.value, hex(&want[k]), &format!("{harness_task} {k}"));
                    let se = m.stderr.expect("several items");
                    same(
                        k,
                        se,
                        hex(&want[&format!("{k}_stderr")]),
                        &format!("{harness_task} {k}_stderr"),
                    );
                }
            }
            if name == "mmlu" {
                let acc = summary.metrics.iter().find(|(k, _)| k == "acc").unwrap().1;
                same(
                    "acc",
                    acc.value,
                    hex(&task["leaderboard_mean_acc"]),
                    "mmlu leaderboard mean",
                );
            }
        }
    }

    #[test]
    fn numpy_mean_is_numpys() {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/eval/python.json"),
        )
        .unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        let cases = v["numpy_mean"].as_array().unwrap();
        assert!(cases.len() >= 10);
        for case in cases {
            let n = case["n"].as_u64().unwrap() as usize;
            // The values are random.Random(n).random() * 10 ** (i % 7 - 3).
            let mut rnd = PyRandom::new(n as u128);
            let values: Vec<f64> = (0..n)
                .map(|i| rnd.random() * 10f64.powi((i % 7) as i32 - 3))
                .collect();
            let want = hexfloat::parse(case["mean"].as_str().unwrap()).unwrap();
            assert_eq!(numpy_mean(&values).to_bits(), want.to_bits(), "n = {n}");
        }
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax([1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax([f64::NEG_INFINITY, f64::NEG_INFINITY]), 0);
        assert_eq!(argmax([1.0, f64::NAN, 5.0]), 1);
    }

    #[test]
    fn one_item_has_no_standard_error() {
        assert_eq!(mean_stderr(&[1.0]), None);
        assert_eq!(mean_stderr(&[1.0, 0.0]), Some(0.5));
    }
}
