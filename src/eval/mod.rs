//! The Open LLM Leaderboard's multiple-choice tasks (ARC, HellaSwag, MMLU, TruthfulQA,
//! Winogrande), scored exactly as lm-evaluation-harness scores them.
//!
//! The pieces, in the order a run uses them:
//! - [`data`] reads a task's items from JSON Lines or Parquet and checks every field;
//! - [`tasks`] builds each item's requests — context and continuation strings — as the
//!   harness does (its prompts, few-shot examples drawn with a port of CPython's
//!   [`pyrandom`]), and tokenizes them by the harness's rule;
//! - a [`Scorer`] gives each request its summed log-likelihood; [`pack::PackedScorer`] does
//!   it over any [`pack::Decoder`] (a multi-sequence KV cache), evaluating each distinct
//!   prefix of the requests once;
//! - [`metrics`] turns scores into `acc`, `acc_norm`, `mc1`, `mc2` and their standard errors
//!   with the harness's arithmetic; [`report`] assembles the JSON report and compares two.
//!
//! The version followed, and every difference from it, is in `docs/EVAL.md`.
//!
//! ```
//! use falcon::eval::{data, tasks, TaskKind};
//! # let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/eval/arc");
//! let test = data::load(TaskKind::Arc, &dir.join("test.jsonl"))?;
//! let train = data::load(TaskKind::Arc, &dir.join("train.jsonl"))?;
//! let setup = tasks::Setup { task: TaskKind::Arc, shots: 3, seed: 42, limit: None };
//! let items = tasks::build_items(&setup, &test, tasks::Fewshot::Split(&train))?;
//! assert!(items[0].requests[0].context.ends_with("\nAnswer:"));
//! # Ok::<(), falcon::eval::EvalError>(())
//! ```

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub mod data;
#[cfg(test)]
pub(crate) mod hexfloat;
pub mod metrics;
pub mod pack;
pub mod pyrandom;
pub mod report;
pub mod tasks;
pub mod text;

pub use metrics::Scored;
pub use tasks::Request;

/// A token id (as the engine's).
pub type Token = i32;

/// The lm-evaluation-harness commit the (v1) Open LLM Leaderboard used, whose prompts,
/// sampling and metrics these follow.
pub const HARNESS_COMMIT: &str = "b281b0921b636bc36ad05c0b0b0763bd6dd43463";

/// Gives each request the summed log-probability of its continuation after its context, and
/// whether the continuation is what greedy decoding would produce.
pub trait Scorer {
    /// Its error.
    type Error;
    /// One result per request, in order.
    ///
    /// # Errors
    /// As the implementation has them.
    fn score(&mut self, requests: &[Request]) -> Result<Vec<Scored>, Self::Error>;
}

/// A task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// AI2 Reasoning Challenge (Challenge and Easy share the format).
    Arc,
    /// HellaSwag.
    Hellaswag,
    /// MMLU (the harness's `hendrycksTest-*` tasks).
    Mmlu,
    /// TruthfulQA, multiple choice (mc1 and mc2).
    Truthfulqa,
    /// Winogrande.
    Winogrande,
}

impl TaskKind {
    /// Every task.
    pub const ALL: [TaskKind; 5] = [
        TaskKind::Arc,
        TaskKind::Hellaswag,
        TaskKind::Mmlu,
        TaskKind::Truthfulqa,
        TaskKind::Winogrande,
    ];

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Arc => "arc",
            TaskKind::Hellaswag => "hellaswag",
            TaskKind::Mmlu => "mmlu",
            TaskKind::Truthfulqa => "truthfulqa",
            TaskKind::Winogrande => "winogrande",
        }
    }

    /// The split the harness evaluates.
    pub fn eval_split(self) -> &'static str {
        match self {
            TaskKind::Arc | TaskKind::Mmlu => "test",
            _ => "validation",
        }
    }

    /// The split the harness draws few-shot examples from (`None`: zero-shot only).
    pub fn fewshot_split(self) -> Option<&'static str> {
        match self {
            TaskKind::Arc | TaskKind::Hellaswag | TaskKind::Winogrande => Some("train"),
            TaskKind::Mmlu => Some("dev"),
            TaskKind::Truthfulqa => None,
        }
    }

    /// The leaderboard's number of shots.
    pub fn leaderboard_shots(self) -> usize {
        match self {
            TaskKind::Arc => 25,
            TaskKind::Hellaswag => 10,
            TaskKind::Mmlu | TaskKind::Winogrande => 5,
            TaskKind::Truthfulqa => 0,
        }
    }

    /// The metric the leaderboard shows.
    pub fn leaderboard_metric(self) -> &'static str {
        match self {
            TaskKind::Arc | TaskKind::Hellaswag => "acc_norm",
            TaskKind::Mmlu | TaskKind::Winogrande => "acc",
            TaskKind::Truthfulqa => "mc2",
        }
    }

    /// The task an item belongs to.
    pub fn of(doc: &data::Doc) -> TaskKind {
        match doc {
            data::Doc::Arc(_) => TaskKind::Arc,
            data::Doc::Hellaswag(_) => TaskKind::Hellaswag,
            data::Doc::Mmlu(_) => TaskKind::Mmlu,
            data::Doc::Truthfulqa(_) => TaskKind::Truthfulqa,
            data::Doc::Winogrande(_) => TaskKind::Winogrande,
        }
    }
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TaskKind {
    type Err = EvalError;

    fn from_str(s: &str) -> Result<Self, EvalError> {
        TaskKind::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| EvalError::UnknownTask(s.to_owned()))
    }
}

/// Errors of loading, preparing and comparing evaluations.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A task name that is not one of the five.
    #[error("unknown task `{0}`: expected one of arc, hellaswag, mmlu, truthfulqa, winogrande")]
    UnknownTask(String),
    /// A file or directory that cannot be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A directory without data files.
    #[error("{}: no .jsonl or .parquet files in this directory", path.display())]
    NoDataFiles {
        /// The directory.
        path: PathBuf,
    },
    /// Data without items.
    #[error("{}: no items", path.display())]
    NoItems {
        /// The file or directory.
        path: PathBuf,
    },
    /// A line or row that is not an item.
    #[error("{location}: {problem}")]
    Data {
        /// Where.
        location: data::Location,
        /// What is wrong.
        problem: String,
    },
    /// A missing or mistyped field, or a label outside the choices.
    #[error("{location}: field `{field}`: {problem}")]
    Field {
        /// Where.
        location: data::Location,
        /// The field (`a.b` for field `b` of `a`).
        field: String,
        /// What is wrong.
        problem: String,
    },
    /// An item of another task (data read for one task, used for another).
    #[error("{location}: not a{} {expected} item", if *expected == TaskKind::Arc { "n" } else { "" })]
    WrongTask {
        /// Where.
        location: data::Location,
        /// The task being evaluated.
        expected: TaskKind,
    },
    /// Shots for TruthfulQA.
    #[error("truthfulqa is evaluated zero-shot only (the harness refuses {shots} shots)")]
    ZeroShotOnly {
        /// The shots asked for.
        shots: usize,
    },
    /// MMLU shots without its `dev` split.
    #[error("{shots}-shot {task} draws its examples from the dev split, which was not given")]
    NoFewshotData {
        /// The task.
        task: TaskKind,
        /// The shots asked for.
        shots: usize,
    },
    /// Fewer few-shot examples than the draw needs.
    #[error(
        "{shots}-shot {task} needs {needed} few-shot examples, the few-shot data has {available}{}",
        subject.as_ref().map(|s| format!(" for subject {s}")).unwrap_or_default()
    )]
    TooFewExamples {
        /// The task.
        task: TaskKind,
        /// The shots asked for.
        shots: usize,
        /// Examples the draw needs.
        needed: usize,
        /// Examples there are.
        available: usize,
        /// MMLU's subject.
        subject: Option<String>,
    },
    /// A report to compare with that cannot be used.
    #[error("{}: {problem}", path.display())]
    Reference {
        /// The report file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}
