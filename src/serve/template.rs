//! Chat templates: a conversation → the prompt text, with the output of transformers'
//! `apply_chat_template` for the same messages.
//!
//! Templates are Jinja, rendered by `minijinja` configured as transformers configures Jinja2:
//! `trim_blocks` and `lstrip_blocks` on, loop controls, Python's string and dict methods
//! (`minijinja-contrib`'s pycompat: `.strip()`, `.startswith()`, `.items()`, ...),
//! `raise_exception(message)`, and a `tojson` filter that writes what Python's `json.dumps`
//! writes. The variables are `messages` (`role`, `content` and, when given, `name`),
//! `add_generation_prompt`, and `bos_token` / `eos_token` when the model has them.
//!
//! Which template a server uses ([`ChatTemplate::select`]):
//! 1. the one named on the command line: a family default by name, or a `.jinja` file;
//! 2. else the model's own, `tokenizer.chat_template` in the GGUF (which `falcon-quantize` copies
//!    from the checkpoint's `chat_template`);
//! 3. else the family default chosen by the model's name (`general.name`, the checkpoint's
//!    directory name): a name containing both `180b` and `chat` gets Falcon-180B-chat's format,
//!    any other Falcon-7B/40B-instruct's (which is also the natural continuation for base models).
//!
//! The family defaults ship as `.jinja` files in `src/serve/templates/` and carry their stop
//! strings (`\nUser:` and `<|endoftext|>`), which apply to every chat request on top of the
//! client's own. A model's own template or a file brings no stop strings: generation ends at the
//! model's end-of-generation token.

use std::fmt;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Serde};
use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

/// The family defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Falcon-7B-instruct and Falcon-40B-instruct: `User: {message}\nAssistant:`.
    FalconInstruct,
    /// Falcon-180B-chat: `System: {system}\nUser: {message}\nFalcon:`.
    Falcon180bChat,
}

/// Stop strings of both family formats: the next user turn, and end-of-text written as text.
const FAMILY_STOP: &[&str] = &["\nUser:", "<|endoftext|>"];

impl Family {
    pub const ALL: [Family; 2] = [Family::FalconInstruct, Family::Falcon180bChat];

    /// The name `--chat-template` takes.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Family::FalconInstruct => "falcon-instruct",
            Family::Falcon180bChat => "falcon-180b-chat",
        }
    }

    /// The template's Jinja source.
    #[must_use]
    pub fn source(self) -> &'static str {
        match self {
            Family::FalconInstruct => include_str!("templates/falcon-instruct.jinja"),
            Family::Falcon180bChat => include_str!("templates/falcon-180b-chat.jinja"),
        }
    }

    /// Strings that end an answer in this format.
    #[must_use]
    pub fn stop(self) -> &'static [&'static str] {
        FAMILY_STOP
    }

    #[must_use]
    pub fn from_name(name: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The default for a model without a template of its own, from its name (rule 3 above).
    #[must_use]
    pub fn for_model_name(name: Option<&str>) -> Family {
        let name = name.unwrap_or_default().to_ascii_lowercase();
        if name.contains("180b") && name.contains("chat") {
            Family::Falcon180bChat
        } else {
            Family::FalconInstruct
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A template asked for by name on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateSpec {
    Family(Family),
    File(PathBuf),
}

impl TemplateSpec {
    /// A family name, or else the path of a Jinja file.
    #[must_use]
    pub fn parse(value: &str) -> TemplateSpec {
        match Family::from_name(value) {
            Some(f) => TemplateSpec::Family(f),
            None => TemplateSpec::File(PathBuf::from(value)),
        }
    }
}

/// Where the template in use came from (for the startup message and `/info`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateOrigin {
    /// Named on the command line.
    Named(Family),
    /// A file named on the command line.
    File(PathBuf),
    /// The model's `tokenizer.chat_template`.
    Model,
    /// The family default chosen from the model's name.
    FamilyDefault(Family),
}

impl fmt::Display for TemplateOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateOrigin::Named(fam) => write!(f, "{fam}"),
            TemplateOrigin::File(p) => write!(f, "{}", p.display()),
            TemplateOrigin::Model => f.write_str("the model's own (tokenizer.chat_template)"),
            TemplateOrigin::FamilyDefault(fam) => {
                write!(f, "{fam} (the model has no template of its own)")
            }
        }
    }
}

/// A chat template failure.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot read the chat template {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the chat template ({origin}) is not valid Jinja: {detail}")]
    Syntax {
        origin: TemplateOrigin,
        detail: String,
    },
    /// The template refused the conversation (`raise_exception`) or failed while rendering it.
    #[error("the chat template cannot render these messages: {0}")]
    Render(String),
}

impl TemplateError {
    /// For [`TemplateError::Render`], the template's own message (e.g. `raise_exception`'s).
    #[must_use]
    pub fn message(&self) -> String {
        match self {
            TemplateError::Render(m) => m.clone(),
            other => other.to_string(),
        }
    }
}

/// One message of a conversation, as templates see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    #[must_use]
    pub fn new(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            name: None,
        }
    }
}

const NAME: &str = "chat";

/// A compiled chat template with the model's special tokens and the format's stop strings.
pub struct ChatTemplate {
    env: Environment<'static>,
    origin: TemplateOrigin,
    stop: Vec<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("stop", &self.stop)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`.
    pub fn new(
        source: &str,
        origin: TemplateOrigin,
        stop: Vec<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<ChatTemplate, TemplateError> {
        let mut env = environment();
        // transformers' `{% generation %}` marks assistant text for training masks and renders
        // its body unchanged; minijinja does not know the tag.
        let mut source = source.to_string();
        for tag in ["generation", "endgeneration"] {
            for (open, close) in [("{%", "%}"), ("{%-", "%}"), ("{%", "-%}"), ("{%-", "-%}")] {
                source = source.replace(&format!("{open} {tag} {close}"), "");
            }
        }
        env.add_template_owned(NAME, source)
            .map_err(|e| TemplateError::Syntax {
                origin: origin.clone(),
                detail: detail(&e),
            })?;
        Ok(ChatTemplate {
            env,
            origin,
            stop,
            bos_token,
            eos_token,
        })
    }

    /// A family default.
    #[must_use]
    pub fn family(
        family: Family,
        origin: TemplateOrigin,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> ChatTemplate {
        let stop = family.stop().iter().map(|s| s.to_string()).collect();
        ChatTemplate::new(family.source(), origin, stop, bos_token, eos_token)
            .expect("the built-in templates compile (tested)")
    }

    /// The server's template, by the rule in the module documentation: `spec` from the command
    /// line, else the model's `tokenizer.chat_template`, else the family default for
    /// `model_name`.
    pub fn select(
        spec: Option<&TemplateSpec>,
        model_template: Option<&str>,
        model_name: Option<&str>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<ChatTemplate, TemplateError> {
        match (spec, model_template) {
            (Some(TemplateSpec::Family(f)), _) => Ok(ChatTemplate::family(
                *f,
                TemplateOrigin::Named(*f),
                bos_token,
                eos_token,
            )),
            (Some(TemplateSpec::File(path)), _) => {
                let source = read(path)?;
                ChatTemplate::new(
                    &source,
                    TemplateOrigin::File(path.clone()),
                    Vec::new(),
                    bos_token,
                    eos_token,
                )
            }
            (None, Some(t)) if !t.trim().is_empty() => {
                ChatTemplate::new(t, TemplateOrigin::Model, Vec::new(), bos_token, eos_token)
            }
            (None, _) => {
                let f = Family::for_model_name(model_name);
                Ok(ChatTemplate::family(
                    f,
                    TemplateOrigin::FamilyDefault(f),
                    bos_token,
                    eos_token,
                ))
            }
        }
    }

    /// The prompt for `messages`; with `add_generation_prompt` it ends where the answer begins.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| TemplateError::Render(detail(&e)))?;
        let mut ctx = vec![
            ("messages", Value::from(Serde(messages))),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ];
        if let Some(b) = &self.bos_token {
            ctx.push(("bos_token", Value::from(b.as_str())));
        }
        if let Some(e) = &self.eos_token {
            ctx.push(("eos_token", Value::from(e.as_str())));
        }
        let ctx = Value::from_pairs(ctx);
        template
            .render(ctx)
            .map_err(|e| TemplateError::Render(detail(&e)))
    }

    /// Stop strings of the format (empty for a model's own template or a file).
    #[must_use]
    pub fn stop(&self) -> &[String] {
        &self.stop
    }

    #[must_use]
    pub fn origin(&self) -> &TemplateOrigin {
        &self.origin
    }
}

fn read(path: &Path) -> Result<String, TemplateError> {
    std::fs::read_to_string(path).map_err(|source| TemplateError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The message of a minijinja error without its kind's boilerplate (`raise_exception`'s
/// message verbatim).
fn detail(e: &minijinja::Error) -> String {
    match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(d)) => d.to_string(),
        (_, Some(d)) => format!("{}: {d}", e.kind()),
        (_, None) => e.to_string(),
    }
}

/// An environment set up as transformers sets up Jinja2 for chat templates.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("the default delimiters are valid");
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_filter("tojson", tojson);
    env
}

/// transformers' `raise_exception(message)`: refuses the conversation with the template's
/// message.
fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `tojson`: Python's `json.dumps(value, ensure_ascii=False, indent=indent)`
/// (Jinja's own escapes HTML characters, transformers' does not).
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let result = match indent {
        Some(n) => {
            let spaces = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&spaces);
            value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, fmt))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            PythonCompact,
        )),
    };
    result.map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    // serde_json writes UTF-8 only.
    Ok(Value::from(String::from_utf8(out).unwrap_or_default()))
}

/// `json.dumps`'s default separators, `", "` and `": "`.
struct PythonCompact;

impl serde_json::ser::Formatter for PythonCompact {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Fixtures {
        bos_token: Option<String>,
        eos_token: Option<String>,
        features_template: String,
        cases: Vec<Case>,
    }

    #[derive(Deserialize)]
    struct Case {
        template: String,
        conversation: String,
        add_generation_prompt: bool,
        messages: Vec<FixtureMessage>,
        rendered: Option<String>,
        error: Option<String>,
    }

    #[derive(Deserialize)]
    struct FixtureMessage {
        role: String,
        content: String,
    }

    fn repo(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
    }

    fn fixtures() -> Fixtures {
        let text = std::fs::read_to_string(repo("models/chat-templates.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// The checkpoint's template, read from the fixture's tokenizer_config.json.
    fn checkpoint_template() -> String {
        let text =
            std::fs::read_to_string(repo("models/tiny-7b-style/tokenizer_config.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["chat_template"].as_str().unwrap().to_string()
    }

    #[test]
    fn every_transformers_rendering_is_reproduced_exactly() {
        let fx = fixtures();
        let templates: Vec<(&str, ChatTemplate)> = vec![
            (
                "checkpoint",
                ChatTemplate::select(
                    None,
                    Some(&checkpoint_template()),
                    Some("tiny-7b-style"),
                    fx.bos_token.clone(),
                    fx.eos_token.clone(),
                )
                .unwrap(),
            ),
            (
                "falcon-instruct",
                ChatTemplate::family(
                    Family::FalconInstruct,
                    TemplateOrigin::Named(Family::FalconInstruct),
                    fx.bos_token.clone(),
                    fx.eos_token.clone(),
                ),
            ),
            (
                "falcon-180b-chat",
                ChatTemplate::family(
                    Family::Falcon180bChat,
                    TemplateOrigin::Named(Family::Falcon180bChat),
                    fx.bos_token.clone(),
                    fx.eos_token.clone(),
                ),
            ),
            (
                "features",
                ChatTemplate::new(
                    &fx.features_template,
                    TemplateOrigin::Model,
                    Vec::new(),
                    fx.bos_token.clone(),
                    fx.eos_token.clone(),
                )
                .unwrap(),
            ),
        ];
        let mut checked = 0;
        for case in &fx.cases {
            let t = &templates
                .iter()
                .find(|(n, _)| *n == case.template)
                .unwrap_or_else(|| panic!("no template {}", case.template))
                .1;
            let messages: Vec<ChatMessage> = case
                .messages
                .iter()
                .map(|m| ChatMessage::new(&m.role, &m.content))
                .collect();
            let what = format!(
                "{} / {} / add_generation_prompt={}",
                case.template, case.conversation, case.add_generation_prompt
            );
            let got = t.render(&messages, case.add_generation_prompt);
            match (&case.rendered, &case.error) {
                (Some(want), _) => {
                    let got = got.unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_eq!(&got, want, "{what}");
                }
                (None, Some(want)) => {
                    let e = got.expect_err(&what);
                    assert_eq!(&e.message(), want, "{what}");
                }
                (None, None) => panic!("{what}: fixture has neither rendering nor error"),
            }
            checked += 1;
        }
        assert!(checked >= 60, "{checked} cases");
    }

    #[test]
    fn shipped_templates_are_the_fixture_sources() {
        for f in Family::ALL {
            let on_disk =
                std::fs::read_to_string(repo(&format!("src/serve/templates/{}.jinja", f.name())))
                    .unwrap();
            assert_eq!(f.source(), on_disk);
            assert_eq!(f.stop(), ["\nUser:", "<|endoftext|>"]);
        }
    }

    #[test]
    fn selection_rule() {
        let pick = |spec: Option<&TemplateSpec>, model: Option<&str>, name: Option<&str>| {
            ChatTemplate::select(spec, model, name, None, None)
                .unwrap()
                .origin()
                .clone()
        };
        let instruct = TemplateSpec::parse("falcon-instruct");
        assert_eq!(instruct, TemplateSpec::Family(Family::FalconInstruct));
        // 1. the command line wins over the model's own template
        assert_eq!(
            pick(Some(&instruct), Some("{{ 'x' }}"), None),
            TemplateOrigin::Named(Family::FalconInstruct)
        );
        // 2. the model's own template over the family default
        assert_eq!(
            pick(None, Some("{{ 'x' }}"), Some("falcon-180B-chat")),
            TemplateOrigin::Model
        );
        // 3. the family default by name
        for (name, family) in [
            ("falcon-180B-chat", Family::Falcon180bChat),
            ("Falcon 180B Chat Q4_K_M", Family::Falcon180bChat),
            ("falcon-40b-instruct", Family::FalconInstruct),
            ("falcon-7b", Family::FalconInstruct),
            ("falcon-180B", Family::FalconInstruct),
        ] {
            assert_eq!(
                pick(None, None, Some(name)),
                TemplateOrigin::FamilyDefault(family),
                "{name}"
            );
        }
        assert_eq!(
            pick(None, Some("  "), None),
            TemplateOrigin::FamilyDefault(Family::FalconInstruct)
        );
    }

    #[test]
    fn family_templates_carry_their_stop_strings_and_others_none() {
        let t = ChatTemplate::select(None, None, Some("falcon-180b-chat"), None, None).unwrap();
        assert_eq!(t.stop(), ["\nUser:", "<|endoftext|>"]);
        let t = ChatTemplate::select(None, Some("{{ 'x' }}"), None, None, None).unwrap();
        assert!(t.stop().is_empty());
    }

    #[test]
    fn template_file_is_read_and_a_missing_one_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mine.jinja");
        std::fs::write(
            &path,
            "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
        )
        .unwrap();
        let spec = TemplateSpec::parse(path.to_str().unwrap());
        let t = ChatTemplate::select(Some(&spec), None, None, None, None).unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("user", "hi")], true).unwrap(),
            "<user>hi"
        );
        let missing = TemplateSpec::parse("/nonexistent/x.jinja");
        let e = ChatTemplate::select(Some(&missing), None, None, None, None).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.jinja"), "{e}");
    }

    #[test]
    fn syntax_error_is_reported_with_the_origin() {
        let e = ChatTemplate::select(None, Some("{% for %}"), None, None, None).unwrap_err();
        assert!(matches!(e, TemplateError::Syntax { .. }), "{e}");
        assert!(e.to_string().contains("tokenizer.chat_template"), "{e}");
    }

    #[test]
    fn generation_tags_render_their_body() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",
            TemplateOrigin::Model,
            Vec::new(),
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("assistant", "ok")], false)
                .unwrap(),
            "ok"
        );
    }

    #[test]
    fn tojson_indent_matches_python() {
        // json.dumps({"a": [1, "é"], "b": {}}, ensure_ascii=False, indent=2)
        let t = ChatTemplate::new(
            "{{ {'a': [1, 'é'], 'b': {}} | tojson(indent=2) }}",
            TemplateOrigin::Model,
            Vec::new(),
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            t.render(&[], false).unwrap(),
            "{\n  \"a\": [\n    1,\n    \"é\"\n  ],\n  \"b\": {}\n}"
        );
    }
}
