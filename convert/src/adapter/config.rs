//! `adapter_config.json` of a PEFT LoRA adapter, and peft's rules for which modules it targets
//! and with which rank and alpha.
//!
//! The rules are those of peft 0.21 (`tuners_utils.check_target_module_exists`,
//! `utils.other.get_pattern_key`, `tuners.lora.LoraLayer.update_layer`), applied to module
//! names as peft sees them in `FalconForCausalLM` (`transformer.h.3.mlp.dense_h_to_4h`):
//!
//! - `target_modules` as a list: a module is targeted when its name equals an entry or ends
//!   with `.` + entry; as a string: when the regex matches the whole name; `"all-linear"`:
//!   every linear layer but the output layer. `exclude_modules` (same two forms) and
//!   `modules_to_save` take precedence. `layers_to_transform` filters list targets only.
//! - `rank_pattern` / `alpha_pattern`: the value of the **first** key, in the order of the
//!   file, whose regex `(.*\.)?(KEY)$` matches the name from its start; `r` / `lora_alpha`
//!   when none does.
//! - scale `s = alpha / r`, or `alpha / sqrt(r)` with `use_rslora`.
//!
//! Keys are Python regexes; they are compiled with the `regex` crate, which reads the common
//! syntax the same way and refuses look-around and back-references (an error names the key).

use std::fmt;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value as Json;

use super::error::AdapterError;

/// A JSON object read in the order of the file (serde_json's own map sorts its keys, and the
/// order of `rank_pattern` and `alpha_pattern` matters: the first matching key wins).
#[derive(Clone, Debug, Default)]
struct Ordered(Vec<(String, Json)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Ordered, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                let mut items = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Json>()? {
                    items.push((k, v));
                }
                Ok(Ordered(items))
            }
            fn visit_unit<E>(self) -> Result<Ordered, E> {
                Ok(Ordered::default())
            }
        }
        d.deserialize_any(V)
    }
}

/// The keys read; the others (peft writes about fifty) are ignored.
#[derive(Deserialize)]
struct Raw {
    peft_type: Option<Json>,
    r: Option<Json>,
    lora_alpha: Option<Json>,
    use_rslora: Option<Json>,
    rank_pattern: Option<Ordered>,
    alpha_pattern: Option<Ordered>,
    target_modules: Option<Json>,
    exclude_modules: Option<Json>,
    modules_to_save: Option<Json>,
    layers_to_transform: Option<Json>,
    layers_pattern: Option<Json>,
    fan_in_fan_out: Option<Json>,
    use_dora: Option<Json>,
    bias: Option<Json>,
    base_model_name_or_path: Option<Json>,
    init_lora_weights: Option<Json>,
    #[serde(flatten)]
    rest: serde_json::Map<String, Json>,
}

/// A set of module names given as peft gives them: a list of names (exact or `.`-suffix) or
/// one regex for the whole name.
#[derive(Clone, Debug)]
pub enum ModuleSet {
    Names(Vec<String>),
    Regex(String, Regex),
    /// `"all-linear"`: every linear layer but the output layer.
    AllLinear,
}

impl ModuleSet {
    /// Whether the module `name` is in the set (`layers_to_transform` aside).
    pub fn contains(&self, name: &str, is_output_layer: bool, is_linear: bool) -> bool {
        match self {
            ModuleSet::Names(names) => names.iter().any(|n| {
                name == n
                    || (name.ends_with(n.as_str()) && name[..name.len() - n.len()].ends_with('.'))
            }),
            ModuleSet::Regex(_, re) => re.is_match(name),
            ModuleSet::AllLinear => is_linear && !is_output_layer,
        }
    }

    /// As written in adapter_config.json, for messages.
    pub fn describe(&self) -> String {
        match self {
            ModuleSet::Names(n) => format!("{n:?}"),
            ModuleSet::Regex(s, _) => format!("{s:?}"),
            ModuleSet::AllLinear => "\"all-linear\"".into(),
        }
    }
}

/// One key of `rank_pattern` or `alpha_pattern` with its value.
#[derive(Clone, Debug)]
pub struct Pattern<T> {
    pub key: String,
    matcher: Regex,
    pub value: T,
}

impl<T> Pattern<T> {
    pub fn matches(&self, module: &str) -> bool {
        self.matcher.is_match(module)
    }
}

/// A validated `adapter_config.json`.
#[derive(Clone, Debug)]
pub struct LoraConfig {
    pub path: PathBuf,
    pub r: u64,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    /// In the order of the file: the first match wins.
    pub rank_pattern: Vec<Pattern<u64>>,
    pub alpha_pattern: Vec<Pattern<f64>>,
    pub target_modules: ModuleSet,
    pub exclude_modules: Option<ModuleSet>,
    /// Module names whose full weights the adapter replaces (`lm_head`, ...).
    pub modules_to_save: Vec<String>,
    modules_to_save_re: Vec<Regex>,
    /// `None`: every layer.
    pub layers_to_transform: Option<Vec<u64>>,
    layers_re: Vec<Regex>,
    pub bias: String,
    pub base_model_name_or_path: Option<String>,
}

/// The rank, alpha and scale peft gives one module, and which keys they came from.
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleScale {
    pub rank: u64,
    pub alpha: f64,
    /// `alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA.
    pub scale: f64,
    /// `r` or `rank_pattern["KEY"]`, for messages.
    pub rank_from: String,
}

/// Keys whose truthy value asks for something this tool does not do, and what to say.
const REFUSED: &[(&str, &str)] = &[
    ("use_dora", "DoRA adapters (use_dora: true) are not supported: they rescale each weight column by a learned magnitude, which neither a LoRA merge nor llama.cpp's LoRA adapters express; merge it with peft (merge_and_unload) and convert the merged checkpoint"),
    ("fan_in_fan_out", "fan_in_fan_out: true is for models with transposed (Conv1D, GPT-2 style) weights; Falcon's linear layers are nn.Linear, so this adapter was made for another model"),
    ("lora_bias", "lora_bias: true adds a bias to lora_B, which Falcon's bias-free layers and llama.cpp's LoRA adapters cannot hold; retrain without it or merge it with peft"),
    ("layer_replication", "layer_replication duplicates base layers, which this tool does not do; merge it with peft and convert the merged checkpoint"),
    ("target_parameters", "target_parameters (LoRA on raw parameters) is not supported; target Falcon's linear layers instead"),
    ("trainable_token_indices", "trainable_token_indices changes embedding rows, which this tool does not apply; merge it with peft and convert the merged checkpoint"),
    ("use_qalora", "QA-LoRA (use_qalora: true) is not supported; merge it with peft and convert the merged checkpoint"),
    ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens) is not supported"),
];

fn truthy(v: &Json) -> bool {
    match v {
        Json::Null => false,
        Json::Bool(b) => *b,
        Json::Number(n) => n.as_f64() != Some(0.0),
        Json::String(s) => !s.is_empty(),
        Json::Array(a) => !a.is_empty(),
        Json::Object(o) => !o.is_empty(),
    }
}

impl LoraConfig {
    /// Reads and validates `<dir>/adapter_config.json`.
    pub fn from_file(path: &Path) -> Result<LoraConfig, AdapterError> {
        let text = std::fs::read_to_string(path).map_err(|source| AdapterError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses the text of an adapter_config.json; `path` is only for messages.
    pub fn parse(path: &Path, text: &str) -> Result<LoraConfig, AdapterError> {
        let bad = |key: &str, why: String| AdapterError::BadConfig {
            path: path.to_path_buf(),
            key: key.into(),
            why,
        };
        let unsupported = |key: &str, why: String| AdapterError::Unsupported {
            path: path.to_path_buf(),
            key: key.into(),
            why,
        };
        let raw: Raw = serde_json::from_str(text)
            .map_err(|e| bad("(file)", format!("not a valid adapter_config.json: {e}")))?;

        match raw.peft_type.as_ref().and_then(Json::as_str) {
            Some("LORA") => {}
            Some(other) => {
                return Err(unsupported(
                    "peft_type",
                    format!(
                        "'{other}' adapters are not supported: only LoRA (peft_type \"LORA\") is"
                    ),
                ))
            }
            None => {
                return Err(bad(
                    "peft_type",
                    "missing: a PEFT LoRA adapter_config.json has \"peft_type\": \"LORA\"".into(),
                ))
            }
        }
        let flags = [
            ("use_dora", &raw.use_dora),
            ("fan_in_fan_out", &raw.fan_in_fan_out),
        ];
        for (key, why) in REFUSED {
            let v = flags
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_ref())
                .unwrap_or_else(|| raw.rest.get(*key));
            if v.is_some_and(truthy) {
                return Err(unsupported(key, (*why).into()));
            }
        }
        // Initialisations that change the base weights as well: the adapter then only fits the
        // changed base, unless peft converted it to a plain LoRA when saving.
        if let Some(init) = raw.init_lora_weights.as_ref().and_then(Json::as_str) {
            let plain = matches!(
                init.to_ascii_lowercase().as_str(),
                "gaussian" | "true" | "false"
            );
            if !plain {
                return Err(unsupported("init_lora_weights", format!(
                    "'{init}' initialisation changes the base weights too, so the adapter only fits that changed base; save it again with peft's path_initial_model_for_weight_conversion, which turns it into a LoRA of the original base"
                )));
            }
        }

        let r = match raw.r.as_ref().and_then(Json::as_u64) {
            Some(r) if r > 0 => r,
            _ => return Err(bad("r", "missing or not a positive integer".into())),
        };
        let lora_alpha = raw
            .lora_alpha
            .as_ref()
            .and_then(Json::as_f64)
            .filter(|a| a.is_finite())
            .ok_or_else(|| bad("lora_alpha", "missing or not a number".into()))?;
        let use_rslora = match &raw.use_rslora {
            None | Some(Json::Null) => false,
            Some(Json::Bool(b)) => *b,
            Some(v) => return Err(bad("use_rslora", format!("{v} is not true or false"))),
        };
        let bias = match &raw.bias {
            None | Some(Json::Null) => "none".to_string(),
            Some(Json::String(s)) => s.clone(),
            Some(v) => return Err(bad("bias", format!("{v} is not a string"))),
        };
        match bias.as_str() {
            // Falcon's linear layers have no biases: "lora_only" trains nothing more.
            "none" | "lora_only" => {}
            "all" => return Err(unsupported("bias", "\"all\" trains every bias of the model (Falcon's LayerNorm biases), which this tool does not apply; retrain with bias \"none\", or merge the adapter with peft and convert the merged checkpoint".into())),
            other => return Err(bad("bias", format!("'{other}' is not one of \"none\", \"all\", \"lora_only\""))),
        }

        let rank_pattern = patterns(path, "rank_pattern", raw.rank_pattern, |v| {
            v.as_u64().filter(|&r| r > 0)
        })?;
        let alpha_pattern = patterns(path, "alpha_pattern", raw.alpha_pattern, |v| {
            v.as_f64().filter(|a| a.is_finite())
        })?;

        let target_modules =
            match &raw.target_modules {
                None | Some(Json::Null) => return Err(bad(
                    "target_modules",
                    "missing: peft fills it in when it saves an adapter; is this file complete?"
                        .into(),
                )),
                Some(v) => module_set(path, "target_modules", v)?,
            };
        let exclude_modules = match &raw.exclude_modules {
            None | Some(Json::Null) => None,
            Some(v) => Some(module_set(path, "exclude_modules", v)?),
        };
        let modules_to_save: Vec<String> = match &raw.modules_to_save {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad("modules_to_save", format!("{v} is not a string")))
                })
                .collect::<Result<_, _>>()?,
            Some(v) => return Err(bad("modules_to_save", format!("{v} is not a list"))),
        };
        let modules_to_save_re = modules_to_save
            .iter()
            .map(|m| {
                compile(
                    path,
                    "modules_to_save",
                    m,
                    &format!(r"^(?:.*\.)?{m}(?:$|\..*)"),
                )
            })
            .collect::<Result<_, _>>()?;
        let layers_to_transform = match &raw.layers_to_transform {
            None | Some(Json::Null) => None,
            Some(Json::Array(a)) if a.is_empty() => None,
            Some(Json::Array(a)) => Some(
                a.iter()
                    .map(|v| {
                        v.as_u64().ok_or_else(|| {
                            bad("layers_to_transform", format!("{v} is not a layer index"))
                        })
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(v) => Some(vec![v.as_u64().ok_or_else(|| {
                bad("layers_to_transform", format!("{v} is not a layer index"))
            })?]),
        };
        let layer_pattern_strs: Vec<String> = match &raw.layers_pattern {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::String(s)) if s.is_empty() => Vec::new(),
            Some(Json::String(s)) => vec![s.clone()],
            Some(Json::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad("layers_pattern", format!("{v} is not a string")))
                })
                .collect::<Result<_, _>>()?,
            Some(v) => {
                return Err(bad(
                    "layers_pattern",
                    format!("{v} is not a string or list"),
                ))
            }
        };
        // peft: the first `.NAME.N.` of the module name, or `.PATTERN.N.` when given.
        let layers_re = if layer_pattern_strs.is_empty() {
            vec![compile(
                path,
                "layers_pattern",
                "",
                r"^.*?\.[^.]*\.(?P<idx>\d+)\.",
            )?]
        } else {
            layer_pattern_strs
                .iter()
                .map(|p| {
                    compile(
                        path,
                        "layers_pattern",
                        p,
                        &format!(r"^(?:^|.*?\.){p}\.(?P<idx>\d+)\."),
                    )
                })
                .collect::<Result<_, _>>()?
        };

        let base_model_name_or_path = raw
            .base_model_name_or_path
            .as_ref()
            .and_then(Json::as_str)
            .map(str::to_string);

        Ok(LoraConfig {
            path: path.to_path_buf(),
            r,
            lora_alpha,
            use_rslora,
            rank_pattern,
            alpha_pattern,
            target_modules,
            exclude_modules,
            modules_to_save,
            modules_to_save_re,
            layers_to_transform,
            layers_re,
            bias,
            base_model_name_or_path,
        })
    }

    /// Whether peft puts a LoRA on the module `name` of the base model.
    pub fn targets(&self, name: &str, is_output_layer: bool, is_linear: bool) -> bool {
        if let Some(ex) = &self.exclude_modules {
            if ex.contains(name, is_output_layer, is_linear) {
                return false;
            }
        }
        if self.is_saved_module(name) {
            return false;
        }
        if !self
            .target_modules
            .contains(name, is_output_layer, is_linear)
        {
            return false;
        }
        match (&self.target_modules, &self.layers_to_transform) {
            (ModuleSet::Names(_), Some(layers)) => self
                .layers_re
                .iter()
                .find_map(|re| re.captures(name))
                .and_then(|c| c.name("idx")?.as_str().parse::<u64>().ok())
                .is_some_and(|i| layers.contains(&i)),
            _ => true,
        }
    }

    /// Whether `name` is (inside) a `modules_to_save` module.
    pub fn is_saved_module(&self, name: &str) -> bool {
        self.modules_to_save_re.iter().any(|re| re.is_match(name))
    }

    /// Rank, alpha and scale of the module `name`.
    pub fn scale_of(&self, name: &str) -> ModuleScale {
        let (rank, rank_from) = match self.rank_pattern.iter().find(|p| p.matches(name)) {
            Some(p) => (p.value, format!("rank_pattern {:?}", p.key)),
            None => (self.r, "r".to_string()),
        };
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|p| p.matches(name))
            .map_or(self.lora_alpha, |p| p.value);
        let scale = if self.use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        };
        ModuleScale {
            rank,
            alpha,
            scale,
            rank_from,
        }
    }
}

fn compile(path: &Path, key: &str, shown: &str, re: &str) -> Result<Regex, AdapterError> {
    Regex::new(re).map_err(|e| AdapterError::BadConfig {
        path: path.to_path_buf(),
        key: key.into(),
        why: format!(
            "{shown:?} is not a regex this tool can read ({}); use plain module names or simple regexes",
            e.to_string().lines().last().unwrap_or("invalid").trim()
        ),
    })
}

fn patterns<T>(
    path: &Path,
    key: &str,
    raw: Option<Ordered>,
    value: impl Fn(&Json) -> Option<T>,
) -> Result<Vec<Pattern<T>>, AdapterError> {
    raw.unwrap_or_default()
        .0
        .into_iter()
        .map(|(k, v)| {
            let value = value(&v).ok_or_else(|| AdapterError::BadConfig {
                path: path.to_path_buf(),
                key: format!("{key}[{k:?}]"),
                why: format!("{v} is not a positive number"),
            })?;
            // peft: re.match(rf"(.*\.)?({key})$", name)
            let matcher = compile(path, key, &k, &format!(r"^(?:.*\.)?(?:{k})$"))?;
            Ok(Pattern {
                key: k,
                matcher,
                value,
            })
        })
        .collect()
}

fn module_set(path: &Path, key: &str, v: &Json) -> Result<ModuleSet, AdapterError> {
    match v {
        Json::String(s) if s.eq_ignore_ascii_case("all-linear") => Ok(ModuleSet::AllLinear),
        // peft: re.fullmatch(target_modules, name)
        Json::String(s) => Ok(ModuleSet::Regex(
            s.clone(),
            compile(path, key, s, &format!("^(?:{s})$"))?,
        )),
        Json::Array(items) => Ok(ModuleSet::Names(
            items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| AdapterError::BadConfig {
                            path: path.to_path_buf(),
                            key: key.into(),
                            why: format!("{v} is not a module name"),
                        })
                })
                .collect::<Result<_, _>>()?,
        )),
        other => Err(AdapterError::BadConfig {
            path: path.to_path_buf(),
            key: key.into(),
            why: format!("{other} is neither a list of module names nor a regex string"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config with r 8, alpha 16 and two targets, with the keys of `extra` (`"key": value`
    /// pairs as JSON text) added or replaced, written in the order given.
    fn cfg(extra: &str) -> Result<LoraConfig, AdapterError> {
        let mut pairs: Vec<(String, String)> = [
            ("peft_type", r#""LORA""#),
            ("r", "8"),
            ("lora_alpha", "16"),
            ("target_modules", r#"["query_key_value", "dense"]"#),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        // Split `, "k": v, "k2": v2` at the top-level commas.
        let (mut depth, mut start, mut parts) = (0i32, 0, Vec::new());
        let extra = extra.trim_start_matches(',');
        for (i, ch) in extra.char_indices() {
            match ch {
                '[' | '{' => depth += 1,
                ']' | '}' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&extra[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&extra[start..]);
        for part in parts.into_iter().filter(|p| !p.trim().is_empty()) {
            let (k, v) = part.split_once(':').unwrap();
            let k = k.trim().trim_matches('"').to_string();
            match pairs.iter_mut().find(|(pk, _)| *pk == k) {
                Some(slot) => slot.1 = v.trim().to_string(),
                None => pairs.push((k, v.trim().to_string())),
            }
        }
        let body: Vec<String> = pairs.iter().map(|(k, v)| format!("{k:?}: {v}")).collect();
        let text = format!("{{{}}}", body.join(", "));
        LoraConfig::parse(Path::new("adapter_config.json"), &text)
    }

    const QKV1: &str = "transformer.h.1.self_attention.query_key_value";
    const DENSE0: &str = "transformer.h.0.self_attention.dense";
    const UP1: &str = "transformer.h.1.mlp.dense_h_to_4h";

    #[test]
    fn list_targets_match_whole_dot_separated_tails() {
        let c = cfg("").unwrap();
        assert!(c.targets(QKV1, false, true));
        assert!(c.targets(DENSE0, false, true));
        // "dense" is not a tail of dense_h_to_4h.
        assert!(!c.targets(UP1, false, true));
        assert!(!c.targets("transformer.h.0.self_attention.xdense", false, true));
    }

    #[test]
    fn regex_targets_match_the_whole_name() {
        let c =
            cfg(r#", "target_modules": ".*\\.h\\.1\\..*(query_key_value|dense_h_to_4h)""#).unwrap();
        assert!(c.targets(QKV1, false, true));
        assert!(c.targets(UP1, false, true));
        assert!(!c.targets(DENSE0, false, true));
        // fullmatch: a regex matching only a part of the name does not target it.
        let c = cfg(r#", "target_modules": "dense""#).unwrap();
        assert!(!c.targets(DENSE0, false, true));
    }

    #[test]
    fn all_linear_leaves_out_the_output_layer() {
        let c = cfg(r#", "target_modules": "all-linear""#).unwrap();
        assert!(c.targets(UP1, false, true));
        assert!(!c.targets("lm_head", true, true));
        assert!(!c.targets("transformer.word_embeddings", false, false));
    }

    #[test]
    fn layers_to_transform_filters_list_targets_but_not_a_regex() {
        let c = cfg(r#", "layers_to_transform": [0, 2]"#).unwrap();
        assert!(c.targets(DENSE0, false, true));
        assert!(!c.targets(QKV1, false, true));
        let c = cfg(r#", "layers_to_transform": 1, "layers_pattern": "h""#).unwrap();
        assert!(c.targets(QKV1, false, true));
        assert!(!c.targets(DENSE0, false, true));
        let c = cfg(r#", "target_modules": ".*dense", "layers_to_transform": [1]"#).unwrap();
        assert!(c.targets(DENSE0, false, true));
    }

    #[test]
    fn exclude_modules_and_modules_to_save_win_over_targets() {
        let c = cfg(r#", "exclude_modules": ["h.1.self_attention.query_key_value"]"#).unwrap();
        assert!(!c.targets(QKV1, false, true));
        assert!(c.targets(
            "transformer.h.0.self_attention.query_key_value",
            false,
            true
        ));
        let c = cfg(r#", "exclude_modules": ".*\\.h\\.0\\..*""#).unwrap();
        assert!(!c.targets(DENSE0, false, true));
        let c = cfg(r#", "target_modules": "all-linear", "modules_to_save": ["dense"]"#).unwrap();
        assert!(!c.targets(DENSE0, false, true));
        assert!(c.is_saved_module(DENSE0));
        assert!(c.targets(UP1, false, true));
    }

    #[test]
    fn first_pattern_in_file_order_wins() {
        // Written unsorted on purpose: the file's order counts, not the sorted order.
        let c = cfg(
            r#", "rank_pattern": {"h.1.mlp.dense_h_to_4h": 2, "dense_h_to_4h": 12},
                 "alpha_pattern": {"mlp.dense_h_to_4h": 4, "h\\.1\\.mlp\\.dense_h_to_4h": 40}"#,
        )
        .unwrap();
        let s = c.scale_of(UP1);
        assert_eq!((s.rank, s.alpha), (2, 4.0));
        assert_eq!(s.scale, 2.0);
        assert_eq!(s.rank_from, "rank_pattern \"h.1.mlp.dense_h_to_4h\"");
        let s = c.scale_of("transformer.h.0.mlp.dense_h_to_4h");
        assert_eq!((s.rank, s.alpha, s.scale), (12, 4.0, 4.0 / 12.0));
        // No key matches: r and lora_alpha.
        let s = c.scale_of(DENSE0);
        assert_eq!((s.rank, s.alpha, s.scale), (8, 16.0, 2.0));
        assert_eq!(s.rank_from, "r");
    }

    #[test]
    fn pattern_keys_match_a_whole_tail_from_a_dot() {
        let c = cfg(r#", "alpha_pattern": {"dense": 3, "h.0.self_attention.dense": 5}"#).unwrap();
        // "dense" matches self_attention.dense (first key) but not dense_4h_to_h.
        assert_eq!(c.scale_of(DENSE0).alpha, 3.0);
        assert_eq!(c.scale_of("transformer.h.0.mlp.dense_4h_to_h").alpha, 16.0);
        // "ense" is not a dot-separated tail.
        let c = cfg(r#", "alpha_pattern": {"ense": 3}"#).unwrap();
        assert_eq!(c.scale_of(DENSE0).alpha, 16.0);
    }

    #[test]
    fn rslora_scales_by_the_square_root_of_the_rank() {
        let c = cfg(r#", "use_rslora": true, "r": 16, "lora_alpha": 8"#).unwrap();
        assert_eq!(c.scale_of(DENSE0).scale, 2.0);
    }

    #[test]
    fn refuses_dora_fan_in_fan_out_and_other_variants() {
        for (extra, key) in [
            (r#", "use_dora": true"#, "use_dora"),
            (r#", "fan_in_fan_out": true"#, "fan_in_fan_out"),
            (r#", "lora_bias": true"#, "lora_bias"),
            (r#", "bias": "all""#, "bias"),
            (r#", "init_lora_weights": "pissa""#, "init_lora_weights"),
            (r#", "layer_replication": [[0, 2]]"#, "layer_replication"),
            (r#", "peft_type": "IA3""#, "peft_type"),
        ] {
            let e = cfg(extra).unwrap_err();
            assert!(
                matches!(&e, AdapterError::Unsupported { key: k, .. } if k == key),
                "{extra}: {e}"
            );
            assert!(e.to_string().starts_with("adapter_config.json: "), "{e}");
        }
        // The defaults peft writes are fine.
        cfg(r#", "use_dora": false, "fan_in_fan_out": false, "bias": "none", "init_lora_weights": true, "layer_replication": null"#).unwrap();
        cfg(r#", "bias": "lora_only", "init_lora_weights": "gaussian""#).unwrap();
    }

    #[test]
    fn bad_values_name_their_key() {
        for (extra, key) in [
            (r#", "r": 0"#, "r"),
            (r#", "lora_alpha": "x""#, "lora_alpha"),
            (r#", "target_modules": 3"#, "target_modules"),
            (
                r#", "rank_pattern": {"dense": -1}"#,
                "rank_pattern[\"dense\"]",
            ),
            (r#", "rank_pattern": {"(?<=x)dense": 2}"#, "rank_pattern"),
        ] {
            let e = cfg(extra).unwrap_err();
            assert!(
                matches!(&e, AdapterError::BadConfig { key: k, .. } if k == key),
                "{extra}: {e}"
            );
        }
        let e = LoraConfig::parse(Path::new("a.json"), "{").unwrap_err();
        assert!(e.to_string().starts_with("a.json: "), "{e}");
    }
}
