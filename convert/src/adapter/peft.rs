//! A PEFT LoRA adapter directory, read and checked against the base model's config.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use super::config::{LoraConfig, ModuleScale, ModuleSet};
use super::error::AdapterError;
use super::modules::{index, module_name, parse_module, OTHER_MODULES};
use crate::checkpoint::{to_f32, SourceDtype};
use crate::config::FalconConfig;
use crate::layout::{block_linears, BlockLinear};

/// The config file of an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file of an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The pickle file older peft versions (or `safe_serialization=False`) write.
const PICKLE_FILE: &str = "adapter_model.bin";
/// peft's prefix of every saved tensor name (`PeftModelForCausalLM.base_model.model`).
const PREFIX: &str = "base_model.model.";

/// Where one tensor of the weights file is.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    /// The name in adapter_model.safetensors.
    pub name: String,
    pub dtype: SourceDtype,
    /// PyTorch order.
    pub shape: Vec<u64>,
    range: Range<usize>,
}

impl TensorRef {
    /// Elements per row (the last dimension).
    pub fn row_len(&self) -> usize {
        *self.shape.last().expect("2-D") as usize
    }
}

/// One LoRA pair: `W += scale · B · A` on a linear layer of one block.
#[derive(Clone, Debug)]
pub struct LoraModule {
    pub layer: u64,
    pub linear: BlockLinear,
    /// `[rank, in_features]`.
    pub a: TensorRef,
    /// `[out_features, rank]`, rows in the checkpoint's order (QKV not regrouped).
    pub b: TensorRef,
    /// Rank, alpha and the scale peft applies.
    pub scale: ModuleScale,
}

impl LoraModule {
    pub fn rank(&self) -> u64 {
        self.scale.rank
    }
}

/// A module of the base whose weights the adapter replaces (`modules_to_save`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SavedModule {
    /// `lm_head`: llama.cpp's `output.weight`.
    LmHead,
    /// `transformer.word_embeddings`: llama.cpp's `token_embd.weight`.
    WordEmbeddings,
}

impl SavedModule {
    /// The module's name in `FalconForCausalLM`.
    pub fn module_name(&self) -> &'static str {
        match self {
            SavedModule::LmHead => "lm_head",
            SavedModule::WordEmbeddings => "transformer.word_embeddings",
        }
    }

    /// The name of the base weight it replaces in llama.cpp's files.
    pub fn gguf_name(&self) -> &'static str {
        match self {
            SavedModule::LmHead => "output.weight",
            SavedModule::WordEmbeddings => "token_embd.weight",
        }
    }
}

/// A full replacement weight, `[vocab, hidden]`.
#[derive(Clone, Debug)]
pub struct SavedTensor {
    pub module: SavedModule,
    pub tensor: TensorRef,
}

/// A PEFT LoRA adapter, validated against a base model's hyper-parameters: every tensor of
/// its weights file is a LoRA pair of a targeted Falcon linear layer (or a `modules_to_save`
/// weight) with the shapes the base and the config imply.
#[derive(Debug)]
pub struct PeftAdapter {
    pub dir: PathBuf,
    pub config: LoraConfig,
    /// By block, then by layer kind.
    pub modules: Vec<LoraModule>,
    pub saved: Vec<SavedTensor>,
    weights_path: PathBuf,
    map: Mmap,
}

impl PeftAdapter {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors` and checks them
    /// against `base`. The first problem found is the error.
    pub fn open(dir: &Path, base: &FalconConfig) -> Result<PeftAdapter, AdapterError> {
        if !dir.is_dir() {
            return Err(AdapterError::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            return Err(AdapterError::MissingConfig {
                dir: dir.to_path_buf(),
            });
        }
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.is_file() {
            let pickle = dir.join(PICKLE_FILE);
            if pickle.is_file() {
                return Err(AdapterError::PickleWeights { path: pickle });
            }
            return Err(AdapterError::MissingWeights {
                dir: dir.to_path_buf(),
            });
        }
        let config = LoraConfig::from_file(&config_path)?;

        let read = |source| AdapterError::Read {
            path: weights_path.clone(),
            source,
        };
        let file = File::open(&weights_path).map_err(read)?;
        // SAFETY: a read-only mapping of the adapter's weights; if another process truncates
        // the file while it is read we may fault, as every mmap-based safetensors reader would.
        let map = unsafe { Mmap::map(&file) }.map_err(read)?;
        let tensors = index_tensors(&weights_path, &map)?;

        let (modules, saved) = check(&config, &weights_path, &tensors, base)?;
        Ok(PeftAdapter {
            dir: dir.to_path_buf(),
            config,
            modules,
            saved,
            weights_path,
            map,
        })
    }

    /// The adapter's name for messages and metadata: its directory's name.
    pub fn name(&self) -> String {
        self.dir
            .canonicalize()
            .ok()
            .as_deref()
            .and_then(Path::file_name)
            .map_or_else(
                || self.dir.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            )
    }

    pub fn weights_path(&self) -> &Path {
        &self.weights_path
    }

    /// Rows `rows` of a tensor, as f32 (row-major, `rows.len() × row_len`). NaN and infinities
    /// are refused, naming the tensor and the element.
    pub fn rows_f32(&self, t: &TensorRef, rows: Range<usize>) -> Result<Vec<f32>, AdapterError> {
        let n = t.row_len();
        let es = t.dtype.size();
        let bytes = &self.map[t.range.clone()][rows.start * n * es..rows.end * n * es];
        let mut out = vec![0f32; rows.len() * n];
        to_f32(t.dtype, bytes, &mut out);
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(AdapterError::NonFinite {
                path: self.weights_path.clone(),
                tensor: t.name.clone(),
                row: rows.start + i / n,
                column: i % n,
                value: out[i],
            });
        }
        Ok(out)
    }

    /// A whole tensor as f32.
    pub fn tensor_f32(&self, t: &TensorRef) -> Result<Vec<f32>, AdapterError> {
        self.rows_f32(t, 0..t.shape[0] as usize)
    }

    /// The LoRA pair on `linear` of block `layer`, if the adapter has one.
    pub fn module(&self, layer: u64, linear: BlockLinear) -> Option<&LoraModule> {
        self.modules
            .iter()
            .find(|m| m.layer == layer && m.linear.module() == linear.module())
    }

    /// The replacement weight of `module`, if the adapter has one.
    pub fn saved(&self, module: &SavedModule) -> Option<&SavedTensor> {
        self.saved.iter().find(|s| s.module == *module)
    }

    /// A digest of the adapter's two files, hex: SHA-256 over, for adapter_config.json then
    /// adapter_model.safetensors, the file's length as a little-endian u64 followed by its bytes.
    pub fn sha256(&self) -> Result<String, AdapterError> {
        let mut h = Sha256::new();
        let config_path = self.dir.join(CONFIG_FILE);
        let mut config = Vec::new();
        File::open(&config_path)
            .and_then(|mut f| f.read_to_end(&mut config))
            .map_err(|source| AdapterError::Read {
                path: config_path,
                source,
            })?;
        h.update((config.len() as u64).to_le_bytes());
        h.update(&config);
        h.update((self.map.len() as u64).to_le_bytes());
        h.update(&self.map[..]);
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// Name → location of every tensor of the weights file.
fn index_tensors(path: &Path, map: &[u8]) -> Result<BTreeMap<String, TensorRef>, AdapterError> {
    let st = SafeTensors::deserialize(map).map_err(|e| AdapterError::BadSafetensors {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    let base = map.as_ptr() as usize;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            Dtype::BF16 => SourceDtype::BF16,
            Dtype::F16 => SourceDtype::F16,
            Dtype::F32 => SourceDtype::F32,
            other => {
                return Err(AdapterError::Dtype {
                    path: path.to_path_buf(),
                    tensor: name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        let start = view.data().as_ptr() as usize - base;
        let range = start..start + view.data().len();
        let shape = view.shape().iter().map(|&d| d as u64).collect();
        out.insert(
            name.clone(),
            TensorRef {
                name,
                dtype,
                shape,
                range,
            },
        );
    }
    Ok(out)
}

/// What a tensor name of the weights file stands for.
enum Key {
    /// `<module>.lora_A.weight` / `.lora_B.weight`.
    Lora { module: String, b: bool },
    /// A full weight of a `modules_to_save` module.
    Saved(SavedModule),
}

fn parse_key(config: &LoraConfig, path: &Path, name: &str) -> Result<Key, AdapterError> {
    let unexpected = |why: String| AdapterError::UnexpectedTensor {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        why,
    };
    let Some(rest) = name.strip_prefix(PREFIX) else {
        return Err(unexpected(format!(
            "tensor names of a PEFT causal-LM adapter start with '{PREFIX}'; save the adapter with peft's save_pretrained"
        )));
    };
    for (b, suffix) in [(false, ".lora_A.weight"), (true, ".lora_B.weight")] {
        if let Some(module) = rest.strip_suffix(suffix) {
            return Ok(Key::Lora {
                module: module.to_string(),
                b,
            });
        }
    }
    for saved in [SavedModule::LmHead, SavedModule::WordEmbeddings] {
        if rest == format!("{}.weight", saved.module_name())
            && config.is_saved_module(saved.module_name())
        {
            return Ok(Key::Saved(saved));
        }
    }
    let why = if rest.contains("lora_embedding_") {
        "a LoRA on the token embeddings: only Falcon's linear layers (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) are supported".to_string()
    } else if rest.contains("lora_magnitude_vector") {
        "a DoRA magnitude: DoRA adapters are not supported".to_string()
    } else if rest.ends_with(".bias") {
        "a bias: adapters that train biases are not supported; retrain with bias \"none\""
            .to_string()
    } else if config
        .modules_to_save
        .iter()
        .any(|m| rest.starts_with(m.as_str()) || rest.contains(&format!(".{m}")))
    {
        format!(
            "a modules_to_save weight of a module this tool does not replace (only {} and {} are)",
            SavedModule::LmHead.module_name(),
            SavedModule::WordEmbeddings.module_name()
        )
    } else {
        "not a LoRA weight (lora_A / lora_B) nor a modules_to_save weight of a Falcon model"
            .to_string()
    };
    Err(unexpected(why))
}

type Checked = (Vec<LoraModule>, Vec<SavedTensor>);

fn check(
    config: &LoraConfig,
    path: &Path,
    tensors: &BTreeMap<String, TensorRef>,
    base: &FalconConfig,
) -> Result<Checked, AdapterError> {
    let config_path = &config.path;
    let bad_target = |entry: &str, why: String| AdapterError::Unsupported {
        path: config_path.clone(),
        key: "target_modules".into(),
        why: format!("{entry:?} {why}"),
    };
    // Every entry of a list of targets names one of Falcon's linear layers.
    let linears: Vec<String> = (0..base.n_layer)
        .flat_map(|l| block_linears().map(move |k| module_name(k, l)))
        .collect();
    let known =
        "Falcon's linear layers are query_key_value, dense, dense_h_to_4h and dense_4h_to_h";
    match &config.target_modules {
        ModuleSet::Names(names) => {
            for n in names {
                let one = ModuleSet::Names(vec![n.clone()]);
                if let Some((other, _)) = OTHER_MODULES
                    .iter()
                    .find(|(m, out)| one.contains(m, *out, *out))
                {
                    return Err(bad_target(n, format!("targets {other}, which this tool does not take as a LoRA target ({known}); list it in modules_to_save to replace it instead")));
                }
                if !linears.iter().any(|m| one.contains(m, false, true)) {
                    return Err(bad_target(n, format!("is not one of Falcon's linear layers ({known}): the adapter was made for another model")));
                }
            }
        }
        ModuleSet::Regex(src, _) => {
            for (m, out) in OTHER_MODULES {
                if config.targets(m, out, out) {
                    return Err(bad_target(
                        src,
                        format!(
                            "matches {m}, which this tool does not take as a LoRA target ({known})"
                        ),
                    ));
                }
            }
            if !linears
                .iter()
                .any(|m| config.target_modules.contains(m, false, true))
            {
                return Err(bad_target(src, format!("matches none of Falcon's linear layers ({known}): the adapter was made for another model")));
            }
        }
        ModuleSet::AllLinear => {}
    }
    for m in &config.modules_to_save {
        if !["lm_head", "word_embeddings", "transformer.word_embeddings"].contains(&m.as_str()) {
            return Err(AdapterError::Unsupported {
                path: config_path.clone(),
                key: "modules_to_save".into(),
                why: format!("{m:?} is not supported: only lm_head and word_embeddings can be replaced; merge the adapter with peft and convert the merged checkpoint"),
            });
        }
    }

    // Sort the file's tensors into pairs and saved weights.
    let mut pairs: BTreeMap<(u64, usize), [Option<&TensorRef>; 2]> = BTreeMap::new();
    let mut saved = Vec::new();
    let mut beyond = None;
    for (name, t) in tensors {
        match parse_key(config, path, name)? {
            Key::Saved(module) => saved.push(SavedTensor {
                module,
                tensor: t.clone(),
            }),
            Key::Lora { module, b } => {
                let Some((layer, linear)) = parse_module(&module) else {
                    let why = if OTHER_MODULES.iter().any(|(m, _)| *m == module) {
                        format!("a LoRA on {module}: only Falcon's linear layers ({known}) are supported")
                    } else {
                        format!("{module} is not one of Falcon's linear layers ({known}): the adapter was made for another model")
                    };
                    return Err(AdapterError::UnexpectedTensor {
                        path: path.to_path_buf(),
                        tensor: name.clone(),
                        why,
                    });
                };
                if layer >= base.n_layer {
                    // Reported after the blocks the base has, so that the first mismatch in
                    // block order is the one named.
                    beyond.get_or_insert_with(|| AdapterError::UnexpectedTensor {
                        path: path.to_path_buf(),
                        tensor: name.clone(),
                        why: format!("block {layer} does not exist: the base model has {} blocks, so the adapter was made for another base model", base.n_layer),
                    });
                    continue;
                }
                if !config.targets(&module, false, true) {
                    return Err(AdapterError::UnexpectedTensor {
                        path: path.to_path_buf(),
                        tensor: name.clone(),
                        why: format!("adapter_config.json does not target {module} (target_modules {}); the files do not belong together", config.target_modules.describe()),
                    });
                }
                pairs.entry((layer, index(linear))).or_default()[usize::from(b)] = Some(t);
            }
        }
    }

    // Every targeted module has its pair, with the shapes of the base and the config's rank.
    let mut modules = Vec::new();
    for layer in 0..base.n_layer {
        for linear in block_linears() {
            let module = module_name(linear, layer);
            if !config.targets(&module, false, true) {
                continue;
            }
            let pair = pairs
                .get(&(layer, index(linear)))
                .copied()
                .unwrap_or_default();
            let scale = config.scale_of(&module);
            let (out, inp) = linear.shape(base);
            let mut ab = Vec::new();
            for (i, t) in pair.into_iter().enumerate() {
                let suffix = ["lora_A", "lora_B"][i];
                let t = t.ok_or_else(|| AdapterError::MissingTensor {
                    path: path.to_path_buf(),
                    tensor: format!("{PREFIX}{module}.{suffix}.weight"),
                    module: module.clone(),
                })?;
                // A is [rank, in], B is [out, rank].
                let (base_dim, rank_dim) = if i == 0 { (1, 0) } else { (0, 1) };
                let want_base = if i == 0 { inp } else { out };
                if t.shape.len() != 2 || t.shape[base_dim] != want_base {
                    let mut expected = vec![scale.rank; 2];
                    expected[base_dim] = want_base;
                    return Err(AdapterError::Shape {
                        path: path.to_path_buf(),
                        tensor: t.name.clone(),
                        expected,
                        actual: t.shape.clone(),
                        base_model: config.base_model_name_or_path.clone(),
                    });
                }
                if t.shape[rank_dim] != scale.rank {
                    return Err(AdapterError::Rank {
                        path: path.to_path_buf(),
                        tensor: t.name.clone(),
                        expected: scale.rank,
                        actual: t.shape[rank_dim],
                        source_key: scale.rank_from.clone(),
                    });
                }
                ab.push(t.clone());
            }
            let b = ab.pop().expect("two");
            let a = ab.pop().expect("two");
            modules.push(LoraModule {
                layer,
                linear,
                a,
                b,
                scale,
            });
        }
    }
    if let Some(e) = beyond {
        return Err(e);
    }
    if modules.is_empty() && saved.is_empty() {
        return Err(AdapterError::BadConfig {
            path: config_path.clone(),
            key: "target_modules".into(),
            why: format!(
                "{} targets none of the base's {} blocks' linear layers: the adapter does nothing",
                config.target_modules.describe(),
                base.n_layer
            ),
        });
    }

    // Saved weights: the base's [vocab, hidden].
    let mut seen = BTreeSet::new();
    for s in &saved {
        seen.insert(s.module.clone());
        let want = vec![base.vocab_size, base.hidden_size];
        if s.tensor.shape != want {
            return Err(AdapterError::Shape {
                path: path.to_path_buf(),
                tensor: s.tensor.name.clone(),
                expected: want,
                actual: s.tensor.shape.clone(),
                base_model: config.base_model_name_or_path.clone(),
            });
        }
    }
    for m in &config.modules_to_save {
        let module = if m == "lm_head" {
            SavedModule::LmHead
        } else {
            SavedModule::WordEmbeddings
        };
        if !seen.contains(&module) {
            return Err(AdapterError::MissingTensor {
                path: path.to_path_buf(),
                tensor: format!("{PREFIX}{}.weight", module.module_name()),
                module: format!("{} (modules_to_save)", module.module_name()),
            });
        }
    }
    saved.sort_by(|a, b| a.module.cmp(&b.module));
    Ok((modules, saved))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
    }

    fn open(adapter: &str, base: &str) -> PeftAdapter {
        let cfg = FalconConfig::from_dir(&models().join(base)).unwrap();
        PeftAdapter::open(&models().join(adapter), &cfg).unwrap()
    }

    /// (layer, llama.cpp name, rank, scale) of every pair.
    fn table(a: &PeftAdapter) -> Vec<(u64, &'static str, u64, f64)> {
        a.modules
            .iter()
            .map(|m| (m.layer, m.linear.gguf(), m.rank(), m.scale.scale))
            .collect()
    }

    fn linear(gguf: &str) -> BlockLinear {
        crate::layout::block_linear_by_gguf(gguf).unwrap()
    }

    // The expected ranks and scales are those peft 0.21.2 gives the loaded fixtures
    // (`LoraLayer.r` and `.scaling`), listed in models/README.md.

    #[test]
    fn every_linear_layer_of_every_block() {
        let a = open("lora-tiny-7b-all", "tiny-7b-style");
        assert_eq!(a.modules.len(), 12);
        assert!(table(&a).iter().all(|&(_, _, r, s)| r == 8 && s == 2.0));
        assert!(a.saved.is_empty());
        let m = a.module(2, linear("attn_qkv")).unwrap();
        assert_eq!(m.a.shape, vec![8, 192]);
        assert_eq!(m.b.shape, vec![256, 8]);
        assert_eq!(
            a.config.base_model_name_or_path.as_deref(),
            Some("tiny-7b-style")
        );
    }

    #[test]
    fn rslora_on_two_layers() {
        let a = open("lora-tiny-7b-rslora", "tiny-7b-style");
        assert_eq!(
            table(&a),
            vec![
                (0, "attn_qkv", 16, 2.0),
                (0, "ffn_down", 16, 2.0),
                (2, "attn_qkv", 16, 2.0),
                (2, "ffn_down", 16, 2.0),
            ]
        );
    }

    #[test]
    fn rank_and_alpha_patterns_and_lm_head() {
        let a = open("lora-tiny-40b-patterns", "tiny-40b-style");
        assert_eq!(
            table(&a),
            vec![
                (0, "attn_qkv", 6, 8.0 / 6.0),
                (0, "attn_output", 4, 0.75),
                (0, "ffn_up", 12, 8.0 / 12.0),
                (0, "ffn_down", 4, 5.0),
                (1, "attn_qkv", 6, 8.0 / 6.0),
                (1, "attn_output", 4, 0.75),
                (1, "ffn_up", 2, 4.0),
                (1, "ffn_down", 4, 1.25),
            ]
        );
        assert_eq!(a.saved.len(), 1);
        assert_eq!(a.saved[0].module, SavedModule::LmHead);
        assert_eq!(a.saved[0].tensor.shape, vec![1024, 256]);
        assert_eq!(a.saved[0].tensor.dtype, SourceDtype::BF16);
        // bf16 values read as f32.
        let head = a.tensor_f32(&a.saved[0].tensor).unwrap();
        assert_eq!(head.len(), 1024 * 256);
        assert!(head.iter().all(|v| v.is_finite()) && head.iter().any(|&v| v != 0.0));
    }

    #[test]
    fn digest_covers_both_files() {
        let a = open("lora-tiny-40b-all", "tiny-40b-style");
        let h = a.sha256().unwrap();
        assert_eq!(h.len(), 64);
        assert_eq!(h, a.sha256().unwrap());
        assert_ne!(
            h,
            open("lora-tiny-7b-all", "tiny-7b-style").sha256().unwrap()
        );
    }

    #[test]
    fn another_base_is_named() {
        let cfg = FalconConfig::from_dir(&models().join("tiny-40b-style")).unwrap();
        let e = PeftAdapter::open(&models().join("lora-tiny-7b-all"), &cfg).unwrap_err();
        assert!(
            matches!(&e, AdapterError::Shape { tensor, expected, actual, .. }
                if tensor.ends_with("h.0.self_attention.query_key_value.lora_A.weight")
                    && expected == &[8, 256] && actual == &[8, 192]),
            "{e}"
        );
    }
}
