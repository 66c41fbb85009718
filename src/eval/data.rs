//! Reading a task's data as its public release gives it: JSON Lines or Parquet files (one
//! file, or a directory of them read in name order), one item per line or row.
//!
//! Every item is checked as it is read; a bad one stops the load with an error that names
//! the file, the line (JSON Lines, from 1) or row (Parquet, from 1) and the field.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use serde_json::{Map, Value};

use super::{EvalError, TaskKind};

/// Where an item came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file.
    pub path: PathBuf,
    /// The line (JSON Lines) or row (Parquet), counted from 1.
    pub at: Position,
}

/// A line of a JSON Lines file or a row of a Parquet file, counted from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// A line of a JSON Lines file.
    Line(usize),
    /// A row of a Parquet file.
    Row(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Position::Line(n) => write!(f, "{} line {n}", self.path.display()),
            Position::Row(n) => write!(f, "{} row {n}", self.path.display()),
        }
    }
}

/// An ARC question (ARC-Challenge and ARC-Easy have one format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArcDoc {
    /// `id`, where given.
    pub id: Option<String>,
    /// `question`.
    pub question: String,
    /// `choices.text`.
    pub choices: Vec<String>,
    /// `choices.label`.
    pub labels: Vec<String>,
    /// `answerKey` as given.
    pub answer_key: String,
    /// The index of the answer, as the harness finds it: an `answerKey` of "1".."5" is read
    /// as "A".."E", then its position in A..E (the labels themselves are not consulted).
    pub gold: usize,
}

/// A HellaSwag item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HellaswagDoc {
    /// `activity_label`.
    pub activity_label: String,
    /// `ctx_a`.
    pub ctx_a: String,
    /// `ctx_b`.
    pub ctx_b: String,
    /// `endings`.
    pub endings: Vec<String>,
    /// `label` (a digit string in the Hugging Face release, a number in the original).
    pub label: usize,
}

/// An MMLU question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MmluDoc {
    /// `question`.
    pub question: String,
    /// `subject`, e.g. `high_school_biology`.
    pub subject: String,
    /// `choices` (four).
    pub choices: Vec<String>,
    /// `answer`: 0..3.
    pub answer: usize,
}

/// A TruthfulQA multiple-choice item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruthfulqaDoc {
    /// `question`.
    pub question: String,
    /// `mc1_targets.choices`: the true answer first.
    pub mc1: Vec<String>,
    /// `mc2_targets.choices`: the true answers first.
    pub mc2: Vec<String>,
    /// How many of `mc2` are true (`mc2_targets.labels` has that many 1s, then 0s).
    pub mc2_true: usize,
}

/// A Winogrande item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WinograndeDoc {
    /// `sentence`, with one `_` where an option goes.
    pub sentence: String,
    /// `option1`.
    pub option1: String,
    /// `option2`.
    pub option2: String,
    /// `answer`: 0 for "1", 1 for "2".
    pub answer: usize,
}

/// One item of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Doc {
    /// ARC.
    Arc(ArcDoc),
    /// HellaSwag.
    Hellaswag(HellaswagDoc),
    /// MMLU.
    Mmlu(MmluDoc),
    /// TruthfulQA (multiple choice).
    Truthfulqa(TruthfulqaDoc),
    /// Winogrande.
    Winogrande(WinograndeDoc),
}

/// An item and where it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The file and line or row.
    pub location: Location,
    /// The item.
    pub doc: Doc,
}

/// Reads `path` (a file, or a directory of `.jsonl` and `.parquet` files read in name
/// order) as items of `task`. A `.parquet` file is read as Parquet, any other file as JSON
/// Lines; blank lines are skipped.
///
/// # Errors
/// Unreadable files, a directory without data files, malformed JSON or Parquet, a missing or
/// mistyped field, a label outside the choices, or no items at all.
pub fn load(task: TaskKind, path: &Path) -> Result<Vec<Record>, EvalError> {
    let io = |source| EvalError::Io {
        path: path.to_owned(),
        source,
    };
    let files = if path.is_dir() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).map_err(io)? {
            let p = entry.map_err(io)?.path();
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            if p.is_file() && matches!(ext, "jsonl" | "parquet") {
                files.push(p);
            }
        }
        if files.is_empty() {
            return Err(EvalError::NoDataFiles {
                path: path.to_owned(),
            });
        }
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    let mut records = Vec::new();
    for file in &files {
        let mut add = |location: Location, value: Value| -> Result<(), EvalError> {
            let doc = parse_doc(task, &value, &location)?;
            records.push(Record { location, doc });
            Ok(())
        };
        if file.extension().and_then(|e| e.to_str()) == Some("parquet") {
            read_parquet(file, &mut add)?;
        } else {
            read_jsonl(file, &mut add)?;
        }
    }
    if records.is_empty() {
        return Err(EvalError::NoItems {
            path: path.to_owned(),
        });
    }
    Ok(records)
}

type Sink<'a> = dyn FnMut(Location, Value) -> Result<(), EvalError> + 'a;

fn read_jsonl(path: &Path, add: &mut Sink<'_>) -> Result<(), EvalError> {
    let io = |source| EvalError::Io {
        path: path.to_owned(),
        source,
    };
    let reader = BufReader::new(File::open(path).map_err(io)?);
    for (i, line) in reader.lines().enumerate() {
        let location = Location {
            path: path.to_owned(),
            at: Position::Line(i + 1),
        };
        let line = line.map_err(|e| EvalError::Data {
            location: location.clone(),
            problem: format!("could not read the line: {e}"),
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(&line).map_err(|e| EvalError::Data {
            location: location.clone(),
            problem: format!("not valid JSON ({e}); expected one JSON object per line"),
        })?;
        add(location, value)?;
    }
    Ok(())
}

fn read_parquet(path: &Path, add: &mut Sink<'_>) -> Result<(), EvalError> {
    let io = |source| EvalError::Io {
        path: path.to_owned(),
        source,
    };
    let bad = |n: usize, e: parquet::errors::ParquetError| EvalError::Data {
        location: Location {
            path: path.to_owned(),
            at: Position::Row(n),
        },
        problem: format!("could not read Parquet: {e}"),
    };
    let reader = SerializedFileReader::new(File::open(path).map_err(io)?).map_err(|e| bad(1, e))?;
    let rows = reader.get_row_iter(None).map_err(|e| bad(1, e))?;
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| bad(i + 1, e))?;
        let location = Location {
            path: path.to_owned(),
            at: Position::Row(i + 1),
        };
        add(location, row_to_json(&row))?;
    }
    Ok(())
}

/// A Parquet record as the JSON value the same item has in JSON Lines: groups (structs) as
/// objects, lists as arrays.
fn row_to_json(row: &Row) -> Value {
    Value::Object(
        row.get_column_iter()
            .map(|(name, field)| (name.clone(), field_to_json(field)))
            .collect(),
    )
}

fn field_to_json(field: &Field) -> Value {
    match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(n) => Value::from(*n),
        Field::Short(n) => Value::from(*n),
        Field::Int(n) => Value::from(*n),
        Field::Long(n) => Value::from(*n),
        Field::UByte(n) => Value::from(*n),
        Field::UShort(n) => Value::from(*n),
        Field::UInt(n) => Value::from(*n),
        Field::ULong(n) => Value::from(*n),
        Field::Float(x) => Value::from(f64::from(*x)),
        Field::Double(x) => Value::from(*x),
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_owned()),
            Err(_) => Value::String(field.to_string()),
        },
        Field::Group(row) => row_to_json(row),
        Field::ListInternal(list) => {
            Value::Array(list.elements().iter().map(field_to_json).collect())
        }
        // Dates, times, decimals, maps: not in any of these tasks' data; kept as text so that
        // a field of that type is reported as mistyped.
        other => Value::String(other.to_string()),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The fields of one item, with errors that name the item's location and the field.
struct Item<'a> {
    obj: &'a Map<String, Value>,
    location: &'a Location,
}

impl<'a> Item<'a> {
    fn error(&self, field: &str, problem: impl Into<String>) -> EvalError {
        EvalError::Field {
            location: self.location.clone(),
            field: field.to_owned(),
            problem: problem.into(),
        }
    }

    /// A field, `a.b` for field `b` of object `a`.
    fn get(&self, field: &str) -> Result<&'a Value, EvalError> {
        let mut obj = self.obj;
        let mut parts = field.split('.').peekable();
        while let Some(part) = parts.next() {
            let value = obj.get(part).ok_or_else(|| self.error(field, "missing"))?;
            if parts.peek().is_none() {
                return Ok(value);
            }
            obj = value.as_object().ok_or_else(|| {
                self.error(
                    field,
                    format!("`{part}` is {}, expected an object", type_name(value)),
                )
            })?;
        }
        unreachable!("a field name has at least one part")
    }

    fn string(&self, field: &str) -> Result<String, EvalError> {
        match self.get(field)? {
            Value::String(s) => Ok(s.clone()),
            v => Err(self.error(field, format!("expected a string, found {}", type_name(v)))),
        }
    }

    fn list(&self, field: &str) -> Result<&'a Vec<Value>, EvalError> {
        match self.get(field)? {
            Value::Array(a) if a.is_empty() => Err(self.error(field, "empty list")),
            Value::Array(a) => Ok(a),
            v => Err(self.error(field, format!("expected a list, found {}", type_name(v)))),
        }
    }

    fn strings(&self, field: &str) -> Result<Vec<String>, EvalError> {
        self.list(field)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                v => Err(self.error(
                    field,
                    format!("item {i} is {}, expected a string", type_name(v)),
                )),
            })
            .collect()
    }

    fn ints(&self, field: &str) -> Result<Vec<i64>, EvalError> {
        self.list(field)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i64().ok_or_else(|| {
                    self.error(
                        field,
                        format!("item {i} is {}, expected an integer", type_name(v)),
                    )
                })
            })
            .collect()
    }

    /// An index into `n` choices, given as an integer (or, where `digits` allows, a string
    /// of digits as Python's `int()` reads it).
    fn index(&self, field: &str, n: usize, digits: bool) -> Result<usize, EvalError> {
        let value = self.get(field)?;
        let index = match value {
            Value::Number(x) => x.as_i64(),
            Value::String(s) if digits => super::text::py_strip(s).parse::<i64>().ok(),
            _ => None,
        };
        let expected = if digits {
            "an integer or a string of digits"
        } else {
            "an integer"
        };
        let index = index.ok_or_else(|| self.error(field, format!("{value} is not {expected}")))?;
        usize::try_from(index)
            .ok()
            .filter(|&i| i < n)
            .ok_or_else(|| self.error(field, format!("{index} is outside the {n} choices")))
    }
}

fn parse_doc(task: TaskKind, value: &Value, location: &Location) -> Result<Doc, EvalError> {
    let obj = value.as_object().ok_or_else(|| EvalError::Data {
        location: location.clone(),
        problem: format!("{} where an object was expected", type_name(value)),
    })?;
    let item = Item { obj, location };
    Ok(match task {
        TaskKind::Arc => Doc::Arc(parse_arc(&item)?),
        TaskKind::Hellaswag => Doc::Hellaswag(parse_hellaswag(&item)?),
        TaskKind::Mmlu => Doc::Mmlu(parse_mmlu(&item)?),
        TaskKind::Truthfulqa => Doc::Truthfulqa(parse_truthfulqa(&item)?),
        TaskKind::Winogrande => Doc::Winogrande(parse_winogrande(&item)?),
    })
}

fn parse_arc(item: &Item<'_>) -> Result<ArcDoc, EvalError> {
    let question = item.string("question")?;
    let choices = item.strings("choices.text")?;
    let labels = item.strings("choices.label")?;
    if labels.len() != choices.len() {
        return Err(item.error(
            "choices.label",
            format!("{} labels for {} choices", labels.len(), choices.len()),
        ));
    }
    let answer_key = item.string("answerKey")?;
    // lm-evaluation-harness (ARC `_process_doc`): a few rows give the key as "1".."5"; it is
    // read as "A".."E", and the answer is the key's position in A..E.
    let letter = match answer_key.as_str() {
        "1" => "A",
        "2" => "B",
        "3" => "C",
        "4" => "D",
        "5" => "E",
        other => other,
    };
    let gold = ["A", "B", "C", "D", "E"]
        .iter()
        .position(|&l| l == letter)
        .ok_or_else(|| {
            item.error(
                "answerKey",
                format!("{answer_key:?} is not one of A..E or 1..5"),
            )
        })?;
    if gold >= choices.len() {
        return Err(item.error(
            "answerKey",
            format!("{answer_key:?} is outside the {} choices", choices.len()),
        ));
    }
    let id = match item.obj.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => {
            return Err(item.error("id", format!("expected a string, found {}", type_name(v))))
        }
    };
    Ok(ArcDoc {
        id,
        question,
        choices,
        labels,
        answer_key,
        gold,
    })
}

fn parse_hellaswag(item: &Item<'_>) -> Result<HellaswagDoc, EvalError> {
    let endings = item.strings("endings")?;
    Ok(HellaswagDoc {
        activity_label: item.string("activity_label")?,
        ctx_a: item.string("ctx_a")?,
        ctx_b: item.string("ctx_b")?,
        label: item.index("label", endings.len(), true)?,
        endings,
    })
}

fn parse_mmlu(item: &Item<'_>) -> Result<MmluDoc, EvalError> {
    let choices = item.strings("choices")?;
    if choices.len() != 4 {
        return Err(item.error(
            "choices",
            format!("{} choices; MMLU items have four (A-D)", choices.len()),
        ));
    }
    let subject = item.string("subject")?;
    if subject.is_empty() {
        return Err(item.error("subject", "empty"));
    }
    Ok(MmluDoc {
        question: item.string("question")?,
        subject,
        answer: item.index("answer", choices.len(), false)?,
        choices,
    })
}

fn parse_truthfulqa(item: &Item<'_>) -> Result<TruthfulqaDoc, EvalError> {
    let targets = |name: &str| -> Result<(Vec<String>, Vec<i64>), EvalError> {
        let choices = item.strings(&format!("{name}.choices"))?;
        let field = format!("{name}.labels");
        let labels = item.ints(&field)?;
        if labels.len() != choices.len() {
            return Err(item.error(
                &field,
                format!("{} labels for {} choices", labels.len(), choices.len()),
            ));
        }
        if let Some(bad) = labels.iter().find(|&&l| l != 0 && l != 1) {
            return Err(item.error(&field, format!("{bad} is not 0 or 1")));
        }
        Ok((choices, labels))
    };
    let (mc1, mc1_labels) = targets("mc1_targets")?;
    // The harness scores mc1 as "the first choice is the most likely": it must be the one
    // true answer.
    if mc1_labels[0] != 1 || mc1_labels[1..].contains(&1) {
        return Err(item.error(
            "mc1_targets.labels",
            "expected the true answer first and only there (1, 0, 0, ...)",
        ));
    }
    let (mc2, mc2_labels) = targets("mc2_targets")?;
    // The harness splits mc2 at the first 0: the true answers must come first, and there
    // must be a false one.
    let mc2_true = mc2_labels.iter().position(|&l| l == 0).ok_or_else(|| {
        item.error(
            "mc2_targets.labels",
            "no false answer (0); the harness needs one",
        )
    })?;
    if mc2_labels[mc2_true..].contains(&1) {
        return Err(item.error(
            "mc2_targets.labels",
            "a true answer (1) after a false one (0): the true answers must come first",
        ));
    }
    Ok(TruthfulqaDoc {
        question: item.string("question")?,
        mc1,
        mc2,
        mc2_true,
    })
}

fn parse_winogrande(item: &Item<'_>) -> Result<WinograndeDoc, EvalError> {
    let sentence = item.string("sentence")?;
    if !sentence.contains('_') {
        return Err(item.error("sentence", "no `_` where the options go"));
    }
    let answer = match item.get("answer")? {
        Value::String(s) if s == "1" => 0,
        Value::String(s) if s == "2" => 1,
        v => {
            return Err(item.error(
                "answer",
                format!("{v} is not \"1\" or \"2\" (the option that fills the blank)"),
            ))
        }
    };
    Ok(WinograndeDoc {
        sentence,
        option1: item.string("option1")?,
        option2: item.string("option2")?,
        answer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/eval")
            .join(rel)
    }

    /// Writes `lines` to a JSON Lines file in a fresh directory and loads it.
    fn load_lines(task: TaskKind, lines: &[&str]) -> (Result<Vec<Record>, EvalError>, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("items.jsonl");
        std::fs::write(&path, lines.join("\n")).unwrap();
        let result = load(task, &path);
        // Keep the directory alive for the message check by leaking it.
        std::mem::forget(dir);
        (result, path)
    }

    fn error(task: TaskKind, lines: &[&str]) -> String {
        let (result, _) = load_lines(task, lines);
        result.expect_err("should fail").to_string()
    }

    #[test]
    fn every_task_file_loads() {
        for (task, files) in [
            (TaskKind::Arc, &["arc/test.jsonl", "arc/train.jsonl"][..]),
            (
                TaskKind::Hellaswag,
                &["hellaswag/validation.jsonl", "hellaswag/train.jsonl"],
            ),
            (TaskKind::Mmlu, &["mmlu/test.jsonl", "mmlu/dev.jsonl"]),
            (TaskKind::Truthfulqa, &["truthfulqa/validation.jsonl"]),
            (
                TaskKind::Winogrande,
                &["winogrande/validation.jsonl", "winogrande/train.jsonl"],
            ),
        ] {
            for f in files {
                let records = load(task, &data(f)).unwrap();
                assert!(records.len() >= 4, "{f}");
                assert_eq!(records[0].location.at, Position::Line(1));
            }
        }
    }

    #[test]
    fn parquet_gives_the_same_items_as_json_lines() {
        for (task, stem) in [
            (TaskKind::Arc, "arc/test"),
            (TaskKind::Truthfulqa, "truthfulqa/validation"),
        ] {
            let jsonl = load(task, &data(&format!("{stem}.jsonl"))).unwrap();
            let parquet = load(task, &data(&format!("{stem}.parquet"))).unwrap();
            assert_eq!(
                jsonl.iter().map(|r| &r.doc).collect::<Vec<_>>(),
                parquet.iter().map(|r| &r.doc).collect::<Vec<_>>()
            );
            assert_eq!(parquet[2].location.at, Position::Row(3));
        }
    }

    #[test]
    fn a_directory_is_read_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let arc = std::fs::read_to_string(data("arc/test.jsonl")).unwrap();
        let lines: Vec<&str> = arc.lines().collect();
        std::fs::write(dir.path().join("b.jsonl"), lines[2..].join("\n")).unwrap();
        std::fs::write(dir.path().join("a.jsonl"), lines[..2].join("\n")).unwrap();
        std::fs::copy(data("arc/test.parquet"), dir.path().join("c.parquet")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not data").unwrap();
        let records = load(TaskKind::Arc, dir.path()).unwrap();
        let all = load(TaskKind::Arc, &data("arc/test.jsonl")).unwrap();
        assert_eq!(records.len(), 2 * all.len());
        for (r, a) in records.iter().zip(all.iter().chain(all.iter())) {
            assert_eq!(r.doc, a.doc);
        }
        assert!(records[0].location.path.ends_with("a.jsonl"));
        assert_eq!(records[2].location.at, Position::Line(1));
        assert!(records[7].location.path.ends_with("c.parquet"));

        let empty = tempfile::tempdir().unwrap();
        let e = load(TaskKind::Arc, empty.path()).unwrap_err().to_string();
        assert!(e.contains("no .jsonl or .parquet files"), "{e}");
    }

    #[test]
    fn arc_numeric_answer_keys_are_read_as_letters() {
        let records = load(TaskKind::Arc, &data("arc/test.jsonl")).unwrap();
        let Doc::Arc(doc) = &records[1].doc else {
            panic!()
        };
        assert_eq!((doc.answer_key.as_str(), doc.gold), ("3", 2));
        let Doc::Arc(doc) = &records[3].doc else {
            panic!()
        };
        assert_eq!(
            (doc.answer_key.as_str(), doc.gold, doc.choices.len()),
            ("E", 4, 5)
        );
    }

    #[test]
    fn hellaswag_labels_may_be_digit_strings_or_numbers() {
        let records = load(TaskKind::Hellaswag, &data("hellaswag/validation.jsonl")).unwrap();
        let labels: Vec<usize> = records
            .iter()
            .map(|r| match &r.doc {
                Doc::Hellaswag(d) => d.label,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(labels, [0, 0, 0, 1, 0, 0]);
    }

    const ARC_OK: &str = r#"{"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}"#;

    #[test]
    fn bad_items_name_the_file_line_and_field() {
        let e = error(
            TaskKind::Arc,
            &[ARC_OK, r#"{"question": "Q?", "answerKey": "A"}"#],
        );
        assert!(
            e.contains("items.jsonl line 2: field `choices.text`: missing"),
            "{e}"
        );
        let e = error(
            TaskKind::Arc,
            &[r#"{"question": 3, "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "A"}"#],
        );
        assert!(
            e.contains("line 1: field `question`: expected a string, found a number"),
            "{e}"
        );
        let e = error(
            TaskKind::Arc,
            &[
                ARC_OK,
                "",
                r#"{"question": "Q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}"#,
            ],
        );
        assert!(
            e.contains("line 3: field `answerKey`: \"C\" is outside the 2 choices"),
            "{e}"
        );
        let e = error(
            TaskKind::Arc,
            &[
                r#"{"question": "Q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "Z"}"#,
            ],
        );
        assert!(e.contains("\"Z\" is not one of A..E or 1..5"), "{e}");
        let e = error(
            TaskKind::Arc,
            &[
                r#"{"question": "Q", "choices": {"text": ["a", 2], "label": ["A", "B"]}, "answerKey": "A"}"#,
            ],
        );
        assert!(
            e.contains("field `choices.text`: item 1 is a number, expected a string"),
            "{e}"
        );
        let e = error(
            TaskKind::Arc,
            &[
                r#"{"question": "Q", "choices": {"text": ["a", "b"], "label": ["A"]}, "answerKey": "A"}"#,
            ],
        );
        assert!(
            e.contains("field `choices.label`: 1 labels for 2 choices"),
            "{e}"
        );
        let e = error(TaskKind::Arc, &["{not json"]);
        assert!(e.contains("line 1: not valid JSON"), "{e}");
        let e = error(TaskKind::Arc, &["[1, 2]"]);
        assert!(
            e.contains("line 1: a list where an object was expected"),
            "{e}"
        );

        let hs = r#"{"activity_label": "A", "ctx_a": "x", "ctx_b": "y", "endings": ["a", "b"], "label": "#;
        let e = error(TaskKind::Hellaswag, &[&format!("{hs}\"2\"}}")]);
        assert!(
            e.contains("field `label`: 2 is outside the 2 choices"),
            "{e}"
        );
        let e = error(TaskKind::Hellaswag, &[&format!("{hs}\"one\"}}")]);
        assert!(
            e.contains("field `label`: \"one\" is not an integer or a string of digits"),
            "{e}"
        );
        let e = error(TaskKind::Hellaswag, &[&format!("{hs}-1}}")]);
        assert!(
            e.contains("field `label`: -1 is outside the 2 choices"),
            "{e}"
        );

        let e = error(
            TaskKind::Mmlu,
            &[
                r#"{"question": "Q", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": "B"}"#,
            ],
        );
        assert!(e.contains("field `answer`: \"B\" is not an integer"), "{e}");
        let e = error(
            TaskKind::Mmlu,
            &[r#"{"question": "Q", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": 4}"#],
        );
        assert!(
            e.contains("field `answer`: 4 is outside the 4 choices"),
            "{e}"
        );
        let e = error(
            TaskKind::Mmlu,
            &[r#"{"question": "Q", "subject": "s", "choices": ["a", "b", "c"], "answer": 0}"#],
        );
        assert!(e.contains("field `choices`: 3 choices"), "{e}");

        let tq = |mc1: &str, mc2: &str| {
            format!(
                r#"{{"question": "Q", "mc1_targets": {{"choices": ["a", "b"], "labels": {mc1}}}, "mc2_targets": {{"choices": ["a", "b", "c"], "labels": {mc2}}}}}"#
            )
        };
        let e = error(TaskKind::Truthfulqa, &[&tq("[0, 1]", "[1, 0, 0]")]);
        assert!(
            e.contains("field `mc1_targets.labels`: expected the true answer first"),
            "{e}"
        );
        let e = error(TaskKind::Truthfulqa, &[&tq("[1, 0]", "[1, 0, 1]")]);
        assert!(
            e.contains("field `mc2_targets.labels`: a true answer (1) after a false one"),
            "{e}"
        );
        let e = error(TaskKind::Truthfulqa, &[&tq("[1, 0]", "[1, 1, 1]")]);
        assert!(
            e.contains("field `mc2_targets.labels`: no false answer"),
            "{e}"
        );
        let e = error(TaskKind::Truthfulqa, &[&tq("[1, 0]", "[1, 0]")]);
        assert!(
            e.contains("field `mc2_targets.labels`: 2 labels for 3 choices"),
            "{e}"
        );
        let e = error(TaskKind::Truthfulqa, &[&tq("[1, 0]", "[1, 2, 0]")]);
        assert!(
            e.contains("field `mc2_targets.labels`: 2 is not 0 or 1"),
            "{e}"
        );
        let e = error(TaskKind::Truthfulqa, &[&tq("[1, \"0\"]", "[1, 0, 0]")]);
        assert!(
            e.contains("field `mc1_targets.labels`: item 1 is a string, expected an integer"),
            "{e}"
        );

        let w = r#"{"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "#;
        let e = error(TaskKind::Winogrande, &[&format!("{w}\"3\"}}")]);
        assert!(
            e.contains("field `answer`: \"3\" is not \"1\" or \"2\""),
            "{e}"
        );
        let e = error(TaskKind::Winogrande, &[&format!("{w}1}}")]);
        assert!(e.contains("field `answer`: 1 is not \"1\" or \"2\""), "{e}");
        let e = error(
            TaskKind::Winogrande,
            &[r#"{"sentence": "No blank.", "option1": "x", "option2": "y", "answer": "1"}"#],
        );
        assert!(e.contains("field `sentence`: no `_`"), "{e}");

        let (result, _) = load_lines(TaskKind::Arc, &["", "  "]);
        assert!(result.unwrap_err().to_string().contains("no items"));
    }

    #[test]
    fn a_bad_parquet_row_names_the_row() {
        // The TruthfulQA Parquet file read as Winogrande: row 1 lacks `sentence`.
        let e = load(TaskKind::Winogrande, &data("truthfulqa/validation.parquet"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("validation.parquet row 1: field `sentence`: missing"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.parquet");
        std::fs::write(&p, "not parquet").unwrap();
        let e = load(TaskKind::Arc, &p).unwrap_err().to_string();
        assert!(e.contains("x.parquet row 1: could not read Parquet"), "{e}");
    }
}
