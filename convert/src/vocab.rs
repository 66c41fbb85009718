//! `tokenizer.json` (byte-level BPE) → llama.cpp's `tokenizer.ggml.*` metadata.

use std::path::Path;

use serde::Deserialize;

use crate::config::FalconConfig;
use crate::error::ConvertError;
use crate::gguf::{keys, GgufPlan, Value};

/// llama.cpp's token types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum TokenType {
    Normal = 1,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
}

/// The vocabulary as llama.cpp stores it.
#[derive(Clone, Debug)]
pub struct Vocab {
    pub tokens: Vec<String>,
    pub types: Vec<TokenType>,
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: Option<bool>,
    /// The checkpoint's chat templates, written as `tokenizer.chat_template[.NAME]`.
    pub chat_templates: ChatTemplates,
}

/// A checkpoint's chat templates (Jinja source), as transformers reads them: the files
/// `chat_template.jinja` and `chat_templates/NAME.jinja` when present, otherwise `chat_template`
/// in `tokenizer_config.json`, either one string or a list of `{"name", "template"}` entries of
/// which the one named `default` is the default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChatTemplates {
    pub default: Option<String>,
    /// Other named templates (e.g. `tool_use`), names restricted to `[A-Za-z0-9_]` as llama.cpp's
    /// converter writes them.
    pub named: Vec<(String, String)>,
}

impl ChatTemplates {
    /// Reads the templates of the checkpoint in `dir`; `config` is `tokenizer_config.json`'s
    /// `chat_template` value, if any.
    fn read(
        dir: &Path,
        config: Option<&serde_json::Value>,
        config_path: &Path,
    ) -> Result<ChatTemplates, ConvertError> {
        let read =
            |path: &Path| std::fs::read_to_string(path).map_err(|e| ConvertError::io(path, e));
        let mut out = ChatTemplates::default();
        // transformers gives the separate files priority over the tokenizer config.
        let file = dir.join("chat_template.jinja");
        let named_dir = dir.join("chat_templates");
        if file.is_file() || named_dir.is_dir() {
            if file.is_file() {
                out.default = Some(read(&file)?);
            }
            if named_dir.is_dir() {
                let entries =
                    std::fs::read_dir(&named_dir).map_err(|e| ConvertError::io(&named_dir, e))?;
                for entry in entries {
                    let path = entry.map_err(|e| ConvertError::io(&named_dir, e))?.path();
                    if path.extension().is_some_and(|e| e == "jinja") {
                        let stem = path.file_stem().unwrap_or_default().to_string_lossy();
                        out.add(&stem, read(&path)?);
                    }
                }
                out.named.sort();
            }
            return Ok(out);
        }
        let bad = |why: &str| ConvertError::Tokenizer {
            path: config_path.to_path_buf(),
            why: format!("chat_template: {why}"),
        };
        match config {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(t)) => out.default = Some(t.clone()),
            Some(serde_json::Value::Array(list)) => {
                for (i, entry) in list.iter().enumerate() {
                    let field = |k: &str| entry.get(k).and_then(serde_json::Value::as_str);
                    let (Some(name), Some(template)) = (field("name"), field("template")) else {
                        return Err(bad(&format!(
                            "entry {i} is not an object with string fields \"name\" and \"template\""
                        )));
                    };
                    out.add(name, template.to_string());
                }
            }
            Some(_) => {
                return Err(bad(
                    "must be a string or a list of {\"name\", \"template\"} objects",
                ))
            }
        }
        Ok(out)
    }

    fn add(&mut self, name: &str, template: String) {
        let name: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        if name == "default" {
            self.default = Some(template);
        } else if !name.is_empty() {
            self.named.retain(|(n, _)| *n != name);
            self.named.push((name, template));
        }
    }

    /// Adds `tokenizer.chat_template`, `tokenizer.chat_template.NAME` and
    /// `tokenizer.chat_templates` (the other names) as llama.cpp's converter writes them.
    pub fn add_to(&self, plan: &mut GgufPlan) {
        if let Some(t) = &self.default {
            plan.set(keys::TOKENIZER_CHAT_TEMPLATE, Value::String(t.clone()));
        }
        for (name, t) in &self.named {
            plan.set(
                &keys::tokenizer_chat_template_named(name),
                Value::String(t.clone()),
            );
        }
        if !self.named.is_empty() {
            plan.set(
                keys::TOKENIZER_CHAT_TEMPLATES,
                Value::strings(self.named.iter().map(|(n, _)| n.clone())),
            );
        }
    }
}

// The `tokenizers` crate loads and runs a tokenizer but does not hand out its merge list, so the
// few fields the GGUF needs are read from the same JSON with serde; `tokenizers` still validates
// the file (see `Vocab::from_dir`).
#[derive(Deserialize)]
struct TokenizerJson {
    model: ModelJson,
    #[serde(default)]
    added_tokens: Vec<AddedToken>,
}

#[derive(Deserialize)]
struct ModelJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    vocab: std::collections::HashMap<String, u32>,
    #[serde(default)]
    merges: Vec<Merge>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Merge {
    Joined(String),
    Pair(String, String),
}

#[derive(Deserialize)]
struct AddedToken {
    id: u32,
    content: String,
    #[serde(default)]
    special: bool,
}

#[derive(Deserialize, Default)]
struct TokenizerConfig {
    add_bos_token: Option<bool>,
    bos_token: Option<TokenRef>,
    eos_token: Option<TokenRef>,
    chat_template: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TokenRef {
    Plain(String),
    Object { content: String },
}

impl TokenRef {
    fn text(&self) -> &str {
        match self {
            TokenRef::Plain(s) | TokenRef::Object { content: s } => s,
        }
    }
}

/// Tokens llama.cpp's converter treats as control tokens even when not marked special.
fn looks_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<｜") && token.ends_with("｜>"))
        || (token.starts_with("<unused") && token.ends_with('>'))
}

impl Vocab {
    /// Reads `<dir>/tokenizer.json` (and `tokenizer_config.json` when present).
    pub fn from_dir(dir: &Path, cfg: &FalconConfig) -> Result<Vocab, ConvertError> {
        let path = dir.join("tokenizer.json");
        let err = |why: String| ConvertError::Tokenizer {
            path: path.clone(),
            why,
        };
        if !path.is_file() {
            return Err(err(
                "missing: the checkpoint must include its tokenizer.json".into(),
            ));
        }
        tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| err(format!("not a valid tokenizer: {e}")))?;
        let text = std::fs::read_to_string(&path).map_err(|e| ConvertError::io(&path, e))?;
        let json: TokenizerJson =
            serde_json::from_str(&text).map_err(|e| err(format!("unexpected layout: {e}")))?;
        if json.model.kind.as_deref().is_some_and(|k| k != "BPE") {
            return Err(err(format!(
                "a {} tokenizer; Falcon uses byte-level BPE",
                json.model.kind.unwrap_or_default()
            )));
        }
        let tc_path = dir.join("tokenizer_config.json");
        let tc: TokenizerConfig = match std::fs::read_to_string(&tc_path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| ConvertError::Tokenizer {
                path: tc_path.clone(),
                why: format!("invalid: {e}"),
            })?,
            Err(_) => TokenizerConfig::default(),
        };

        let mut by_id: std::collections::HashMap<u32, &str> = json
            .model
            .vocab
            .iter()
            .map(|(t, &i)| (i, t.as_str()))
            .collect();
        for a in &json.added_tokens {
            by_id.insert(a.id, &a.content);
        }
        let n_vocab = cfg
            .vocab_size
            .max(by_id.keys().max().map_or(0, |&m| u64::from(m) + 1));
        if n_vocab > cfg.vocab_size {
            return Err(err(format!(
                "it has token ids up to {} but config.json's vocab_size is {}",
                n_vocab - 1,
                cfg.vocab_size
            )));
        }
        let mut tokens = Vec::with_capacity(n_vocab as usize);
        let mut types = Vec::with_capacity(n_vocab as usize);
        for id in 0..n_vocab as u32 {
            match by_id.get(&id) {
                None => {
                    tokens.push(format!("[PAD{id}]"));
                    types.push(TokenType::Unused);
                }
                Some(tok) => {
                    let added = json.added_tokens.iter().find(|a| a.id == id);
                    types.push(match added {
                        Some(a) if a.special || looks_special(&a.content) => TokenType::Control,
                        Some(_) => TokenType::UserDefined,
                        None => TokenType::Normal,
                    });
                    tokens.push(tok.to_string());
                }
            }
        }
        let merges = json
            .model
            .merges
            .into_iter()
            .map(|m| match m {
                Merge::Joined(s) => s,
                Merge::Pair(a, b) => format!("{a} {b}"),
            })
            .collect();
        let id_of = |t: &Option<TokenRef>| {
            t.as_ref().and_then(|r| {
                json.model.vocab.get(r.text()).copied().or_else(|| {
                    json.added_tokens
                        .iter()
                        .find(|a| a.content == r.text())
                        .map(|a| a.id)
                })
            })
        };
        Ok(Vocab {
            tokens,
            types,
            merges,
            bos: cfg.bos_token_id.or_else(|| id_of(&tc.bos_token)),
            eos: cfg.eos_token_id.or_else(|| id_of(&tc.eos_token)),
            add_bos: tc.add_bos_token,
            chat_templates: ChatTemplates::read(dir, tc.chat_template.as_ref(), &tc_path)?,
        })
    }

    /// Adds the `tokenizer.ggml.*` keys.
    pub fn add_to(&self, plan: &mut GgufPlan) {
        plan.set(keys::TOKENIZER_MODEL, Value::String("gpt2".into()));
        plan.set(keys::TOKENIZER_PRE, Value::String("falcon".into()));
        plan.set(keys::TOKENIZER_TOKENS, Value::strings(&self.tokens));
        plan.set(
            keys::TOKENIZER_TOKEN_TYPE,
            Value::i32s(self.types.iter().map(|&t| t as i32)),
        );
        plan.set(keys::TOKENIZER_MERGES, Value::strings(&self.merges));
        if let Some(b) = self.bos {
            plan.set(keys::TOKENIZER_BOS_ID, Value::U32(b));
        }
        if let Some(e) = self.eos {
            plan.set(keys::TOKENIZER_EOS_ID, Value::U32(e));
        }
        if let Some(a) = self.add_bos {
            plan.set(keys::TOKENIZER_ADD_BOS, Value::Bool(a));
        }
        self.chat_templates.add_to(plan);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = "{% for m in messages %}{{ m['content'].strip() }}{% endfor %}";

    /// A checkpoint directory with the tiny fixtures' tokenizer and the given tokenizer config.
    fn checkpoint(tokenizer_config: &serde_json::Value) -> (tempfile::TempDir, FalconConfig) {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-k256");
        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "tokenizer.json"] {
            std::fs::copy(fixture.join(f), dir.path().join(f)).unwrap();
        }
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::to_string(tokenizer_config).unwrap(),
        )
        .unwrap();
        let cfg = FalconConfig::from_dir(dir.path()).unwrap();
        (dir, cfg)
    }

    fn templates(tokenizer_config: serde_json::Value) -> Result<ChatTemplates, ConvertError> {
        let (dir, cfg) = checkpoint(&tokenizer_config);
        Vocab::from_dir(dir.path(), &cfg).map(|v| v.chat_templates)
    }

    fn string(plan: &GgufPlan, key: &str) -> Option<String> {
        plan.get(key).and_then(|v| v.as_str()).map(str::to_string)
    }

    #[test]
    fn no_template_writes_no_key() {
        let t = templates(serde_json::json!({"eos_token": "<|endoftext|>"})).unwrap();
        assert_eq!(t, ChatTemplates::default());
        let mut plan = GgufPlan::new();
        t.add_to(&mut plan);
        assert!(plan.get(keys::TOKENIZER_CHAT_TEMPLATE).is_none());
        assert!(plan.get(keys::TOKENIZER_CHAT_TEMPLATES).is_none());
    }

    #[test]
    fn string_template_becomes_tokenizer_chat_template() {
        let t = templates(serde_json::json!({"chat_template": TEMPLATE})).unwrap();
        assert_eq!(t.default.as_deref(), Some(TEMPLATE));
        assert!(t.named.is_empty());
        let mut plan = GgufPlan::new();
        t.add_to(&mut plan);
        assert_eq!(
            string(&plan, keys::TOKENIZER_CHAT_TEMPLATE).as_deref(),
            Some(TEMPLATE)
        );
        assert!(plan.get(keys::TOKENIZER_CHAT_TEMPLATES).is_none());
    }

    #[test]
    fn named_templates_take_default_and_keep_the_others() {
        let t = templates(serde_json::json!({"chat_template": [
            {"name": "tool use", "template": "TOOLS"},
            {"name": "default", "template": TEMPLATE},
            {"name": "rag", "template": "RAG"},
        ]}))
        .unwrap();
        assert_eq!(t.default.as_deref(), Some(TEMPLATE));
        assert_eq!(
            t.named,
            vec![
                ("tool_use".to_string(), "TOOLS".to_string()),
                ("rag".to_string(), "RAG".to_string())
            ]
        );
        let mut plan = GgufPlan::new();
        t.add_to(&mut plan);
        assert_eq!(
            string(&plan, keys::TOKENIZER_CHAT_TEMPLATE).as_deref(),
            Some(TEMPLATE)
        );
        assert_eq!(
            string(&plan, "tokenizer.chat_template.tool_use").as_deref(),
            Some("TOOLS")
        );
        assert_eq!(
            string(&plan, "tokenizer.chat_template.rag").as_deref(),
            Some("RAG")
        );
        let names: Vec<&str> = plan
            .get(keys::TOKENIZER_CHAT_TEMPLATES)
            .and_then(Value::as_array)
            .and_then(|a| a.as_strings())
            .unwrap()
            .iter()
            .collect();
        assert_eq!(names, ["tool_use", "rag"]);
    }

    #[test]
    fn named_templates_without_default_write_no_default() {
        let t = templates(serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
        ]}))
        .unwrap();
        assert_eq!(t.default, None);
        assert_eq!(t.named.len(), 1);
    }

    #[test]
    fn jinja_files_win_over_the_tokenizer_config() {
        let (dir, cfg) = checkpoint(&serde_json::json!({"chat_template": "FROM CONFIG"}));
        std::fs::write(dir.path().join("chat_template.jinja"), TEMPLATE).unwrap();
        std::fs::create_dir(dir.path().join("chat_templates")).unwrap();
        std::fs::write(dir.path().join("chat_templates/tool_use.jinja"), "TOOLS").unwrap();
        let t = Vocab::from_dir(dir.path(), &cfg).unwrap().chat_templates;
        assert_eq!(t.default.as_deref(), Some(TEMPLATE));
        assert_eq!(t.named, vec![("tool_use".into(), "TOOLS".into())]);
    }

    #[test]
    fn malformed_template_is_refused_naming_the_key() {
        for bad in [
            serde_json::json!({"chat_template": 3}),
            serde_json::json!({"chat_template": [{"name": "default"}]}),
        ] {
            let e = templates(bad).unwrap_err().to_string();
            assert!(
                e.contains("tokenizer_config.json") && e.contains("chat_template"),
                "{e}"
            );
        }
    }

    #[test]
    fn the_fixture_template_is_read_as_transformers_reads_it() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-7b-style");
        let cfg = FalconConfig::from_dir(&dir).unwrap();
        let tc: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        let want = tc["chat_template"].as_str().expect("the fixture has one");
        let v = Vocab::from_dir(&dir, &cfg).unwrap();
        assert_eq!(v.chat_templates.default.as_deref(), Some(want));
    }
}
