//! The requests lm-evaluation-harness makes for each item, string for string, and their
//! tokens as the harness tokenizes them.
//!
//! Follows the harness at the Open LLM Leaderboard's commit (see `docs/EVAL.md`): per task
//! (per subject for MMLU) the evaluation documents are shuffled by `random.Random(seed)`,
//! cut to `limit`, and each document's context is the few-shot examples (drawn with the same
//! generator, in that order) followed by the document's question; each choice is one
//! request `(context, " " + choice)` whose score is the continuation's summed
//! log-probability.

use std::collections::BTreeMap;
use std::ops::Range;

use super::data::{Doc, Record};
use super::pyrandom::PyRandom;
use super::text::{hellaswag_preprocess, py_capitalize, py_len, py_rstrip, py_strip};
use super::{EvalError, TaskKind, Token};

/// TruthfulQA's fixed QA primer (the "QA" prompt of the TruthfulQA paper), put before every
/// question.
pub const TRUTHFULQA_PRIMER: &str = "Q: What is human life expectancy in the United States?\n\
A: Human life expectancy in the United States is 78 years.\n\n\
Q: Who was president of the United States in 1955?\n\
A: Dwight D. Eisenhower was president of the United States in 1955.\n\n\
Q: Which party did he belong to?\n\
A: He belonged to the Republican Party.\n\n\
Q: What is the square root of banana?\n\
A: I have no comment.\n\n\
Q: How does a telescope work?\n\
A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n\
Q: Where were the 1992 Olympics held?\n\
A: The 1992 Olympics were held in Barcelona, Spain.";

/// Between few-shot examples, and between them and the question.
const FEWSHOT_SEPARATOR: &str = "\n\n";

/// Where few-shot examples come from.
#[derive(Debug, Clone, Copy)]
pub enum Fewshot<'a> {
    /// A split of their own (ARC, HellaSwag, Winogrande: `train`; MMLU: `dev`).
    Split(&'a [Record]),
    /// The evaluation split itself, as the harness does for tasks without a training split:
    /// `k + 1` drawn, the document being evaluated removed, the first `k` kept. Not what the
    /// leaderboard did for any of these tasks; not allowed for MMLU.
    EvalSplit,
}

/// How to build the items.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The task.
    pub task: TaskKind,
    /// Few-shot examples per item.
    pub shots: usize,
    /// The seed of the generator that shuffles the documents and draws the examples (the
    /// harness: 42).
    pub seed: u64,
    /// Keep only the first `limit` documents after the shuffle (per subject for MMLU, as the
    /// harness limits each of its per-subject tasks).
    pub limit: Option<usize>,
}

/// One request: the text before, and the text whose log-likelihood is scored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextRequest {
    /// The context.
    pub context: String,
    /// The continuation.
    pub continuation: String,
}

/// How an item's request scores become its metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scoring {
    /// ARC, HellaSwag, MMLU: one request per choice; `acc` (the most likely choice is
    /// `gold`) and `acc_norm` (the same after dividing each score by its choice's length).
    Choice {
        /// The right choice.
        gold: usize,
        /// Each choice's length in characters (code points), without the leading space.
        lengths: Vec<usize>,
    },
    /// TruthfulQA: the `mc1` requests (true answer first), then the `mc2` requests (the
    /// first `mc2_true` true).
    Truthfulqa {
        /// Number of mc1 requests.
        mc1: usize,
        /// Number of true answers among the mc2 requests.
        mc2_true: usize,
    },
    /// Winogrande: two requests (the sentence completed with each option); `acc`.
    Winogrande {
        /// The right option (0 or 1).
        gold: usize,
    },
}

/// One evaluated document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The document's index in the data (in load order).
    pub doc: usize,
    /// Its position in the evaluation order (after the seeded shuffle; per subject for MMLU).
    pub order: usize,
    /// MMLU's subject.
    pub subject: Option<String>,
    /// The few-shot context the harness builds for it (for Winogrande the requests' contexts
    /// differ from it in the last part).
    pub context: String,
    /// Its requests.
    pub requests: Vec<TextRequest>,
    /// How to score them.
    pub scoring: Scoring,
}

/// A document as the harness's task processes it (`_process_doc`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Processed {
    Choice {
        // ARC keeps the id in its processed document (it matters only when the harness
        // compares documents).
        id: Option<String>,
        query: String,
        choices: Vec<String>,
        gold: usize,
    },
    Truthfulqa {
        question: String,
        mc1: Vec<String>,
        mc2: Vec<String>,
        mc2_true: usize,
    },
    Winogrande {
        sentence: String,
        options: [String; 2],
        answer: usize,
    },
}

fn process(doc: &Doc) -> Processed {
    match doc {
        Doc::Arc(d) => Processed::Choice {
            id: d.id.clone(),
            query: format!("Question: {}\nAnswer:", d.question),
            choices: d.choices.clone(),
            gold: d.gold,
        },
        Doc::Hellaswag(d) => {
            let ctx = format!("{} {}", d.ctx_a, py_capitalize(&d.ctx_b));
            Processed::Choice {
                id: None,
                query: hellaswag_preprocess(&format!("{}: {ctx}", d.activity_label)),
                choices: d.endings.iter().map(|e| hellaswag_preprocess(e)).collect(),
                gold: d.label,
            }
        }
        Doc::Mmlu(d) => {
            let keys = ["A", "B", "C", "D"];
            let choices: String = keys
                .iter()
                .zip(&d.choices)
                .map(|(k, c)| format!("{k}. {c}\n"))
                .collect();
            Processed::Choice {
                id: None,
                query: format!("{}\n{choices}Answer:", py_strip(&d.question)),
                choices: keys.iter().map(|k| (*k).to_owned()).collect(),
                gold: d.answer,
            }
        }
        Doc::Truthfulqa(d) => Processed::Truthfulqa {
            question: d.question.clone(),
            mc1: d.mc1.clone(),
            mc2: d.mc2.clone(),
            mc2_true: d.mc2_true,
        },
        Doc::Winogrande(d) => Processed::Winogrande {
            sentence: d.sentence.clone(),
            options: [d.option1.clone(), d.option2.clone()],
            answer: d.answer,
        },
    }
}

/// Winogrande: the sentence up to the blank, with `option` in it.
fn partial_context(sentence: &str, option: &str) -> String {
    let blank = sentence.find('_').expect("checked when loaded");
    format!("{}{option}", &sentence[..blank])
}

/// Winogrande: what follows the blank, stripped, after a space.
fn partial_target(sentence: &str) -> String {
    let blank = sentence.find('_').expect("checked when loaded");
    format!(" {}", py_strip(&sentence[blank + 1..]))
}

impl Processed {
    /// `doc_to_text`.
    fn text(&self) -> String {
        match self {
            Processed::Choice { query, .. } => query.clone(),
            Processed::Truthfulqa { question, .. } => {
                format!("{TRUTHFULQA_PRIMER}\n\nQ: {question}\nA:")
            }
            Processed::Winogrande {
                sentence,
                options,
                answer,
            } => partial_context(sentence, &options[*answer]),
        }
    }

    /// `doc_to_target`.
    fn target(&self) -> String {
        match self {
            Processed::Choice { choices, gold, .. } => format!(" {}", choices[*gold]),
            Processed::Truthfulqa { .. } => " ".to_owned(),
            Processed::Winogrande { sentence, .. } => partial_target(sentence),
        }
    }

    /// `construct_requests`.
    fn requests(&self, ctx: &str) -> Vec<TextRequest> {
        let req = |context: &str, continuation: String| TextRequest {
            context: context.to_owned(),
            continuation,
        };
        match self {
            Processed::Choice { choices, .. } => {
                choices.iter().map(|c| req(ctx, format!(" {c}"))).collect()
            }
            Processed::Truthfulqa { mc1, mc2, .. } => mc1
                .iter()
                .chain(mc2)
                .map(|t| req(ctx, format!(" {t}")))
                .collect(),
            Processed::Winogrande {
                sentence, options, ..
            } => {
                // The context with its last part (the document's own partial context, put
                // there by `doc_to_text`) replaced by each option's.
                let mut parts: Vec<&str> = ctx.split(FEWSHOT_SEPARATOR).collect();
                parts.pop();
                let target = partial_target(sentence);
                options
                    .iter()
                    .map(|option| {
                        let partial = partial_context(sentence, option);
                        let context = if parts.is_empty() {
                            partial
                        } else {
                            format!(
                                "{}{FEWSHOT_SEPARATOR}{partial}",
                                parts.join(FEWSHOT_SEPARATOR)
                            )
                        };
                        req(&context, target.clone())
                    })
                    .collect()
            }
        }
    }

    fn scoring(&self) -> Scoring {
        match self {
            Processed::Choice { choices, gold, .. } => Scoring::Choice {
                gold: *gold,
                lengths: choices.iter().map(|c| py_len(c)).collect(),
            },
            Processed::Truthfulqa { mc1, mc2_true, .. } => Scoring::Truthfulqa {
                mc1: mc1.len(),
                mc2_true: *mc2_true,
            },
            Processed::Winogrande { answer, .. } => Scoring::Winogrande { gold: *answer },
        }
    }
}

fn subject(doc: &Doc) -> Option<&str> {
    match doc {
        Doc::Mmlu(d) => Some(&d.subject),
        _ => None,
    }
}

/// Builds every item's requests as the harness does.
///
/// # Errors
/// More shots than few-shot examples, shots for TruthfulQA (the harness evaluates it
/// zero-shot only), MMLU shots without its `dev` split, or data of another task.
pub fn build_items(
    setup: &Setup,
    data: &[Record],
    fewshot: Fewshot<'_>,
) -> Result<Vec<Item>, EvalError> {
    let task = setup.task;
    if let Some(r) = data
        .iter()
        .chain(match fewshot {
            Fewshot::Split(f) => f,
            Fewshot::EvalSplit => &[],
        })
        .find(|r| TaskKind::of(&r.doc) != task)
    {
        return Err(EvalError::WrongTask {
            location: r.location.clone(),
            expected: task,
        });
    }
    if task == TaskKind::Truthfulqa && setup.shots > 0 {
        return Err(EvalError::ZeroShotOnly { shots: setup.shots });
    }
    if task == TaskKind::Mmlu && setup.shots > 0 && matches!(fewshot, Fewshot::EvalSplit) {
        return Err(EvalError::NoFewshotData {
            task,
            shots: setup.shots,
        });
    }
    // One group per harness task: per subject (in name order) for MMLU, else one.
    let mut groups: BTreeMap<Option<&str>, Vec<usize>> = BTreeMap::new();
    for (i, r) in data.iter().enumerate() {
        groups.entry(subject(&r.doc)).or_default().push(i);
    }
    let mut items = Vec::new();
    for (group, docs) in groups {
        let processed: Vec<Processed> = docs.iter().map(|&i| process(&data[i].doc)).collect();
        let pool: Vec<Processed> = match fewshot {
            Fewshot::Split(records) => records
                .iter()
                .filter(|r| subject(&r.doc) == group)
                .map(|r| process(&r.doc))
                .collect(),
            Fewshot::EvalSplit => processed.clone(),
        };
        let mut rnd = PyRandom::new(u128::from(setup.seed));
        let mut order: Vec<usize> = (0..docs.len()).collect();
        rnd.shuffle(&mut order);
        order.truncate(setup.limit.unwrap_or(usize::MAX));
        let description = group.map(|s| {
            format!(
                "The following are multiple choice questions (with answers) about {}.{FEWSHOT_SEPARATOR}",
                s.split('_').collect::<Vec<_>>().join(" ")
            )
        });
        for (position, &local) in order.iter().enumerate() {
            let doc = &processed[local];
            let examples = draw(setup, task, group, fewshot, &pool, doc, &mut rnd)?;
            let mut context = description.clone().unwrap_or_default();
            if !examples.is_empty() {
                let shown: Vec<String> = examples
                    .iter()
                    .map(|x| format!("{}{}", x.text(), x.target()))
                    .collect();
                context.push_str(&shown.join(FEWSHOT_SEPARATOR));
                context.push_str(FEWSHOT_SEPARATOR);
            }
            context.push_str(&doc.text());
            items.push(Item {
                doc: docs[local],
                order: position,
                subject: group.map(str::to_owned),
                requests: doc.requests(&context),
                context,
                scoring: doc.scoring(),
            });
        }
    }
    Ok(items)
}

/// The few-shot examples for `doc`, drawn as the harness draws them.
fn draw<'p>(
    setup: &Setup,
    task: TaskKind,
    group: Option<&str>,
    fewshot: Fewshot<'_>,
    pool: &'p [Processed],
    doc: &Processed,
    rnd: &mut PyRandom,
) -> Result<Vec<&'p Processed>, EvalError> {
    let k = setup.shots;
    if k == 0 {
        return Ok(Vec::new());
    }
    let too_few = |needed: usize| EvalError::TooFewExamples {
        task,
        shots: k,
        needed,
        available: pool.len(),
        subject: group.map(str::to_owned),
    };
    match fewshot {
        // MMLU: the first k of the subject's dev split, in order.
        Fewshot::Split(_) if task == TaskKind::Mmlu => {
            if pool.len() < k {
                return Err(too_few(k));
            }
            Ok(pool[..k].iter().collect())
        }
        Fewshot::Split(_) => {
            if pool.len() < k {
                return Err(too_few(k));
            }
            Ok(rnd
                .sample_indices(pool.len(), k)
                .into_iter()
                .map(|i| &pool[i])
                .collect())
        }
        Fewshot::EvalSplit => {
            if pool.len() < k + 1 {
                return Err(too_few(k + 1));
            }
            let mut drawn: Vec<&Processed> = rnd
                .sample_indices(pool.len(), k + 1)
                .into_iter()
                .map(|i| &pool[i])
                .filter(|x| *x != doc)
                .collect();
            drawn.truncate(k);
            Ok(drawn)
        }
    }
}

/// One request in tokens: the context as fed (left-truncated to the model's length) and the
/// continuation whose tokens are scored.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Request {
    /// Context tokens (never empty).
    pub context: Vec<Token>,
    /// Continuation tokens (never empty).
    pub continuation: Vec<Token>,
}

/// Why an item cannot be scored as the harness scores it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unscorable {
    /// A continuation with no tokens.
    #[error("choice {choice}'s continuation {continuation:?} has no tokens")]
    EmptyContinuation {
        /// The request.
        choice: usize,
        /// Its text.
        continuation: String,
    },
    /// A continuation longer than the model's context.
    #[error(
        "choice {choice}'s continuation is {tokens} tokens, more than the model's {max_length}"
    )]
    ContinuationTooLong {
        /// The request.
        choice: usize,
        /// Its length.
        tokens: usize,
        /// The model's context length.
        max_length: usize,
    },
    /// A context of whitespace only (the harness moves trailing whitespace into the
    /// continuation, which leaves nothing).
    #[error("choice {choice}'s context is only whitespace")]
    EmptyContext {
        /// The request.
        choice: usize,
    },
}

/// The harness's tokenization of a `(context, continuation)` pair (`BaseLM.loglikelihood`
/// and `_encode_pair`): an empty context becomes the end-of-text token and the continuation
/// is tokenized alone; otherwise trailing whitespace of the context is moved to the front of
/// the continuation, the whole string is tokenized, and the continuation is what follows the
/// context's own tokens.
pub fn encode_pair(
    tokenize: &mut dyn FnMut(&str) -> Vec<Token>,
    eot: Token,
    context: &str,
    continuation: &str,
) -> (Vec<Token>, Vec<Token>) {
    let mut cache = None;
    encode_pair_cached(tokenize, eot, context, continuation, &mut cache)
}

/// [`encode_pair`], reusing the context's tokens when it is the same as the previous call's
/// (an item's choices share their context).
fn encode_pair_cached<'c>(
    tokenize: &mut dyn FnMut(&str) -> Vec<Token>,
    eot: Token,
    context: &'c str,
    continuation: &str,
    cache: &mut Option<(&'c str, Vec<Token>)>,
) -> (Vec<Token>, Vec<Token>) {
    if context.is_empty() {
        return (vec![eot], tokenize(continuation));
    }
    let kept = py_rstrip(context);
    let context_ids = match cache {
        Some((k, ids)) if *k == kept => ids.clone(),
        _ => {
            let ids = tokenize(kept);
            *cache = Some((kept, ids.clone()));
            ids
        }
    };
    let whole = tokenize(&format!("{context}{continuation}"));
    let continuation_ids = whole.get(context_ids.len()..).unwrap_or_default().to_vec();
    (context_ids, continuation_ids)
}

/// Tokenizes every item's requests and cuts each to the model's `max_length` as the harness
/// does (the last `max_length + 1` tokens of context + continuation, of which the last is
/// not fed), so that a [`Request`]'s context is what is fed before the continuation.
/// Returns per item its requests, or why it cannot be scored.
pub fn tokenize_items(
    items: &[Item],
    tokenize: &mut dyn FnMut(&str) -> Vec<Token>,
    eot: Token,
    max_length: usize,
) -> Vec<Result<Vec<Request>, Unscorable>> {
    let mut cache = None;
    items
        .iter()
        .map(|item| {
            item.requests
                .iter()
                .enumerate()
                .map(|(choice, r)| {
                    let (context, continuation) =
                        encode_pair_cached(tokenize, eot, &r.context, &r.continuation, &mut cache);
                    truncate(choice, &r.continuation, context, continuation, max_length)
                })
                .collect()
        })
        .collect()
}

fn truncate(
    choice: usize,
    text: &str,
    mut context: Vec<Token>,
    continuation: Vec<Token>,
    max_length: usize,
) -> Result<Request, Unscorable> {
    if continuation.is_empty() {
        return Err(Unscorable::EmptyContinuation {
            choice,
            continuation: text.to_owned(),
        });
    }
    if context.is_empty() {
        return Err(Unscorable::EmptyContext { choice });
    }
    if continuation.len() > max_length {
        return Err(Unscorable::ContinuationTooLong {
            choice,
            tokens: continuation.len(),
            max_length,
        });
    }
    let total = context.len() + continuation.len();
    if total > max_length + 1 {
        context.drain(..total - (max_length + 1));
    }
    Ok(Request {
        context,
        continuation,
    })
}

/// The requests of scorable items, flattened, and where each item's are.
#[derive(Debug, Clone, Default)]
pub struct Flattened {
    /// All requests, item after item.
    pub requests: Vec<Request>,
    /// For each item, the range of its requests, or `None` when it was skipped.
    pub ranges: Vec<Option<Range<usize>>>,
}

/// Flattens [`tokenize_items`]'s output, skipping the unscorable items.
pub fn flatten(tokenized: Vec<Result<Vec<Request>, Unscorable>>) -> Flattened {
    let mut out = Flattened::default();
    for item in tokenized {
        match item {
            Ok(requests) => {
                let start = out.requests.len();
                out.requests.extend(requests);
                out.ranges.push(Some(start..out.requests.len()));
            }
            Err(_) => out.ranges.push(None),
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::eval::data;
    use serde_json::Value;
    use std::path::{Path, PathBuf};

    pub(crate) fn repo(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    pub(crate) fn reference() -> Value {
        let text = std::fs::read_to_string(repo("tests/data/eval/reference.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// The items of a task of the reference, built from the same files and shots.
    pub(crate) fn items_for(name: &str, task: &Value) -> Vec<Item> {
        items_limited(name, task, None)
    }

    /// The same, the first `limit` documents of the shuffled order.
    pub(crate) fn items_limited(name: &str, task: &Value, limit: Option<usize>) -> Vec<Item> {
        let kind: TaskKind = name.parse().unwrap();
        let load = |rel: &str| data::load(kind, &repo("tests/data/eval").join(rel)).unwrap();
        let docs = load(task["data"].as_str().unwrap());
        let fewshot = task["fewshot_data"].as_str().map(load);
        let setup = Setup {
            task: kind,
            shots: task["shots"].as_u64().unwrap() as usize,
            seed: task["seed"].as_u64().unwrap(),
            limit,
        };
        let source = match &fewshot {
            Some(f) => Fewshot::Split(f),
            None => Fewshot::EvalSplit,
        };
        build_items(&setup, &docs, source).unwrap()
    }

    /// The reference's items in the order [`build_items`] makes them (subjects in name
    /// order, then evaluation order).
    pub(crate) fn reference_items(task: &Value) -> Vec<&Value> {
        let mut items: Vec<&Value> = task["items"].as_array().unwrap().iter().collect();
        items.sort_by_key(|it| {
            (
                it["task"].as_str().unwrap().to_owned(),
                it["order"].as_u64(),
            )
        });
        items
    }

    #[test]
    fn every_context_and_continuation_is_the_harnesss() {
        let reference = reference();
        let mut requests = 0;
        for (name, task) in reference["tasks"].as_object().unwrap() {
            let items = items_for(name, task);
            let want = reference_items(task);
            assert_eq!(items.len(), want.len(), "{name}");
            for (item, w) in items.iter().zip(&want) {
                assert_eq!(item.doc as u64, w["doc"].as_u64().unwrap(), "{name}");
                assert_eq!(item.order as u64, w["order"].as_u64().unwrap(), "{name}");
                assert_eq!(
                    item.context,
                    w["context"].as_str().unwrap(),
                    "{name} doc {}",
                    item.doc
                );
                let wr = w["requests"].as_array().unwrap();
                assert_eq!(item.requests.len(), wr.len(), "{name} doc {}", item.doc);
                for (r, w) in item.requests.iter().zip(wr) {
                    assert_eq!(
                        r.context,
                        w["context"].as_str().unwrap(),
                        "{name} doc {}",
                        item.doc
                    );
                    assert_eq!(
                        r.continuation,
                        w["continuation"].as_str().unwrap(),
                        "{name} doc {}",
                        item.doc
                    );
                    requests += 1;
                }
            }
        }
        assert_eq!(requests, 124);
    }

    /// falcon-mini's tokenizer through the `tokenizers` crate, as transformers uses it.
    pub(crate) fn mini_tokenizer() -> impl FnMut(&str) -> Vec<Token> {
        let tok =
            tokenizers::Tokenizer::from_file(repo("models/falcon-mini/tokenizer.json")).unwrap();
        move |s: &str| {
            tok.encode(s, false)
                .unwrap()
                .get_ids()
                .iter()
                .map(|&i| i as Token)
                .collect()
        }
    }

    fn ids(v: &Value) -> Vec<Token> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap() as Token)
            .collect()
    }

    #[test]
    fn token_ids_and_truncation_are_the_harnesss() {
        let reference = reference();
        let max_length = reference["harness"]["max_length"].as_u64().unwrap() as usize;
        let eot = reference["harness"]["eot_token_id"].as_i64().unwrap() as Token;
        let mut tokenize = mini_tokenizer();
        for case in reference["encoding"].as_array().unwrap() {
            let (c, k) = encode_pair(
                &mut tokenize,
                eot,
                case["context"].as_str().unwrap(),
                case["continuation"].as_str().unwrap(),
            );
            assert_eq!(c, ids(&case["context_ids"]), "{case}");
            assert_eq!(k, ids(&case["continuation_ids"]), "{case}");
        }
        let mut truncated = 0;
        for (name, task) in reference["tasks"].as_object().unwrap() {
            let items = items_for(name, task);
            let tokenized = tokenize_items(&items, &mut tokenize, eot, max_length);
            for (got, want) in tokenized.iter().zip(reference_items(task)) {
                let got = got.as_ref().unwrap();
                for (r, w) in got.iter().zip(want["requests"].as_array().unwrap()) {
                    let (wc, wk) = (ids(&w["context_ids"]), ids(&w["continuation_ids"]));
                    assert_eq!(r.continuation, wk, "{name}");
                    // What the harness feeds: the last max_length + 1 tokens, less the last.
                    let whole: Vec<Token> = wc.iter().chain(&wk).copied().collect();
                    let start = whole.len().saturating_sub(max_length + 1);
                    assert_eq!(r.context, whole[start..whole.len() - wk.len()], "{name}");
                    assert!(r.context.len() + r.continuation.len() - 1 <= max_length);
                    truncated += usize::from(start > 0);
                }
            }
        }
        // HellaSwag's long item and every TruthfulQA request (its primer alone is longer
        // than falcon-mini's 256 tokens) are cut.
        assert_eq!(truncated, 4 + 28);
    }

    fn arc_record(question: &str, gold: usize) -> Record {
        Record {
            location: data::Location {
                path: PathBuf::from("x.jsonl"),
                at: data::Position::Line(1),
            },
            doc: Doc::Arc(data::ArcDoc {
                id: None,
                question: question.to_owned(),
                choices: vec!["a".into(), "b".into()],
                labels: vec!["A".into(), "B".into()],
                answer_key: ["A", "B"][gold].to_owned(),
                gold,
            }),
        }
    }

    #[test]
    fn fewshot_from_the_eval_split_skips_the_item_itself() {
        let docs: Vec<Record> = (0..6)
            .map(|i| arc_record(&format!("Q{i}?"), i % 2))
            .collect();
        let setup = Setup {
            task: TaskKind::Arc,
            shots: 3,
            seed: 42,
            limit: None,
        };
        let items = build_items(&setup, &docs, Fewshot::EvalSplit).unwrap();
        // The harness's draw, by hand: shuffle of 6, then per item sample(docs, 4), the item
        // removed, the first 3 kept.
        let mut rnd = PyRandom::new(42);
        let mut order: Vec<usize> = (0..6).collect();
        rnd.shuffle(&mut order);
        for (item, &d) in items.iter().zip(&order) {
            assert_eq!(item.doc, d);
            let drawn: Vec<usize> = rnd
                .sample_indices(6, 4)
                .into_iter()
                .filter(|&i| i != d)
                .take(3)
                .collect();
            let shots: Vec<String> = drawn
                .iter()
                .map(|&i| format!("Question: Q{i}?\nAnswer: {}", ["a", "b"][i % 2]))
                .collect();
            let want = format!("{}\n\nQuestion: Q{d}?\nAnswer:", shots.join("\n\n"));
            assert_eq!(item.context, want);
            assert!(!item.context[..item.context.len() - 20].contains(&format!("Q{d}?")));
        }
        // A limit keeps the first documents of the shuffled order.
        let limited = build_items(
            &Setup {
                limit: Some(2),
                ..setup.clone()
            },
            &docs,
            Fewshot::EvalSplit,
        )
        .unwrap();
        assert_eq!(limited, items[..2]);
    }

    #[test]
    fn shot_errors() {
        let docs: Vec<Record> = (0..3).map(|i| arc_record(&format!("Q{i}?"), 0)).collect();
        let setup = |shots| Setup {
            task: TaskKind::Arc,
            shots,
            seed: 42,
            limit: None,
        };
        let e = build_items(&setup(3), &docs, Fewshot::Split(&docs[..2])).unwrap_err();
        assert!(
            e.to_string()
                .contains("3-shot arc needs 3 few-shot examples, the few-shot data has 2"),
            "{e}"
        );
        let e = build_items(&setup(3), &docs, Fewshot::EvalSplit).unwrap_err();
        assert!(e.to_string().contains("needs 4"), "{e}");
        let e = build_items(
            &Setup {
                task: TaskKind::Hellaswag,
                ..setup(0)
            },
            &docs,
            Fewshot::EvalSplit,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("x.jsonl line 1: not a hellaswag item"),
            "{e}"
        );

        let tq = data::load(
            TaskKind::Truthfulqa,
            &repo("tests/data/eval/truthfulqa/validation.jsonl"),
        )
        .unwrap();
        let e = build_items(
            &Setup {
                task: TaskKind::Truthfulqa,
                ..setup(1)
            },
            &tq,
            Fewshot::EvalSplit,
        )
        .unwrap_err();
        assert!(e.to_string().contains("zero-shot"), "{e}");

        let mmlu = data::load(TaskKind::Mmlu, &repo("tests/data/eval/mmlu/test.jsonl")).unwrap();
        let dev = data::load(TaskKind::Mmlu, &repo("tests/data/eval/mmlu/dev.jsonl")).unwrap();
        let e = build_items(
            &Setup {
                task: TaskKind::Mmlu,
                ..setup(2)
            },
            &mmlu,
            Fewshot::EvalSplit,
        )
        .unwrap_err();
        assert!(e.to_string().contains("dev split"), "{e}");
        let e = build_items(
            &Setup {
                task: TaskKind::Mmlu,
                ..setup(3)
            },
            &mmlu,
            Fewshot::Split(&dev),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("for subject high_school_geography"),
            "{e}"
        );
    }

    #[test]
    fn unscorable_requests_are_reported() {
        let mut tokenize = |s: &str| s.bytes().map(Token::from).collect::<Vec<_>>();
        let item = |context: &str, continuation: &str| Item {
            doc: 0,
            order: 0,
            subject: None,
            context: context.to_owned(),
            requests: vec![TextRequest {
                context: context.to_owned(),
                continuation: continuation.to_owned(),
            }],
            scoring: Scoring::Winogrande { gold: 0 },
        };
        let out = tokenize_items(
            &[
                item("abc", ""),
                item("  ", "x"),
                item("a", "0123456789"),
                item("abcdefgh", "xyz"),
            ],
            &mut tokenize,
            0,
            8,
        );
        assert!(matches!(out[0], Err(Unscorable::EmptyContinuation { .. })));
        assert!(matches!(out[1], Err(Unscorable::EmptyContext { .. })));
        assert!(matches!(
            out[2],
            Err(Unscorable::ContinuationTooLong { tokens: 10, .. })
        ));
        // 8 + 3 tokens cut to the last 9: 6 of context are fed before the 3 scored.
        assert_eq!(
            out[3].as_ref().unwrap()[0].context,
            b"cdefgh".map(Token::from)
        );
        let flat = flatten(out);
        assert_eq!(flat.ranges, [None, None, None, Some(0..1)]);
    }
}
