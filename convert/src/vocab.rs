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
    }
}
