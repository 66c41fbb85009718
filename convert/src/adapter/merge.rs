//! Adapters merged into the base weights while they are converted: each targeted weight
//! becomes `W + Σ scale · s · B·A` in f32, computed for the rows being converted only (never
//! the whole product), with the rows of `B` taken in the same (regrouped) order as the base's.

use std::ops::Range;
use std::path::PathBuf;

use rayon::prelude::*;

use super::error::AdapterError;
use super::peft::{PeftAdapter, SavedModule, SavedTensor, TensorRef};
use crate::config::FalconConfig;
use crate::gguf::{keys, Array, GgufPlan, Value};
use crate::layout::{self, BlockLinear, FalconTensor, Variant, HF_PREFIX};

/// `--lora DIR[:SCALE]`: an adapter directory and the user's scale (1 by default).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub dir: PathBuf,
    pub scale: f32,
}

impl LoraSpec {
    /// Parses `DIR` or `DIR:SCALE` (the part after the last `:` is a scale only when it reads
    /// as a number, so directories whose names hold a colon still work).
    pub fn parse(s: &str) -> Result<LoraSpec, String> {
        if let Some((dir, scale)) = s.rsplit_once(':') {
            if let Ok(scale) = scale.parse::<f32>() {
                if !scale.is_finite() {
                    return Err(format!("the scale of {s:?} is not a finite number"));
                }
                if dir.is_empty() {
                    return Err(format!("{s:?} has a scale but no adapter directory"));
                }
                return Ok(LoraSpec {
                    dir: dir.into(),
                    scale,
                });
            }
        }
        Ok(LoraSpec {
            dir: s.into(),
            scale: 1.0,
        })
    }
}

/// One adapter merged into a model, as recorded in its metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct MergedAdapter {
    /// The adapter directory's name.
    pub name: String,
    pub scale: f32,
    /// [`PeftAdapter::sha256`].
    pub sha256: String,
}

/// The adapters of one conversion, opened and checked against the base.
#[derive(Debug)]
pub struct Merge {
    pub adapters: Vec<(PeftAdapter, f32)>,
}

impl Merge {
    /// Opens every adapter and checks it against `base`.
    pub fn open(specs: &[LoraSpec], base: &FalconConfig) -> Result<Merge, AdapterError> {
        let adapters = specs
            .iter()
            .map(|s| Ok((PeftAdapter::open(&s.dir, base)?, s.scale)))
            .collect::<Result<_, AdapterError>>()?;
        Ok(Merge { adapters })
    }

    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    /// What to record in the output's metadata.
    pub fn records(&self) -> Result<Vec<MergedAdapter>, AdapterError> {
        self.adapters
            .iter()
            .map(|(a, scale)| {
                Ok(MergedAdapter {
                    name: a.name(),
                    scale: *scale,
                    sha256: a.sha256()?,
                })
            })
            .collect()
    }

    /// The adapters that replace `module` (`modules_to_save`), with their scales.
    pub fn replacements(&self, module: &SavedModule) -> Vec<(&PeftAdapter, &SavedTensor, f32)> {
        self.adapters
            .iter()
            .filter_map(|(a, scale)| a.saved(module).map(|s| (a, s, *scale)))
            .collect()
    }

    /// The contributions to `linear` of block `layer`, with each `A` read into memory
    /// (`rank × in_features` floats), or `None` when no adapter targets it.
    pub fn delta(
        &self,
        layer: u64,
        linear: BlockLinear,
    ) -> Result<Option<Delta<'_>>, AdapterError> {
        let mut terms = Vec::new();
        for (adapter, scale) in &self.adapters {
            if let Some(m) = adapter.module(layer, linear) {
                terms.push(Term {
                    adapter,
                    b: &m.b,
                    a: adapter.tensor_f32(&m.a)?,
                    rank: m.rank() as usize,
                    coef: (f64::from(*scale) * m.scale.scale) as f32,
                });
            }
        }
        Ok((!terms.is_empty()).then_some(Delta { terms }))
    }
}

/// The adapters of a conversion and what they do to its tensors: LoRA products added to the
/// block linear layers, `modules_to_save` weights in place of the base's.
#[derive(Debug)]
pub struct MergePlan {
    pub merge: Merge,
}

impl MergePlan {
    /// Opens the adapters against `config` and adjusts `tensors` (the checkpoint's, in file
    /// order) for their replacements: a model whose output layer is tied to the token embedding
    /// gets its own `output.weight`, converted from the embedding, when an adapter replaces
    /// either (peft copies the tied weight into the module it replaces and leaves the other
    /// one as it was).
    pub fn prepare(
        specs: &[LoraSpec],
        config: &FalconConfig,
        tensors: &mut Vec<FalconTensor>,
    ) -> Result<MergePlan, AdapterError> {
        let merge = Merge::open(specs, config)?;
        let lm_head = !merge.replacements(&SavedModule::LmHead).is_empty();
        let embeddings = !merge.replacements(&SavedModule::WordEmbeddings).is_empty();
        let has_output = tensors.iter().any(|t| t.name == OUTPUT);
        if !has_output && (lm_head || embeddings) {
            let variant = Variant {
                two_norms: tensors.iter().any(|t| t.name == "blk.0.attn_norm_2.weight"),
                output: true,
                hf_prefix: tensors.iter().any(|t| t.hf_name.starts_with(HF_PREFIX)),
            };
            // The untied output layer starts from the tied weight: the token embedding.
            let mut untied = layout::tensors(config, variant);
            let embd = untied
                .iter()
                .find(|t| t.name == EMBEDDINGS)
                .map(|t| t.hf_name.clone())
                .expect("every model has a token embedding");
            if let Some(out) = untied.iter_mut().find(|t| t.name == OUTPUT) {
                out.hf_name = embd;
            }
            *tensors = untied;
        }
        Ok(MergePlan { merge })
    }

    /// Whether adapters replace the tensor `gguf_name` (`modules_to_save`).
    pub fn replaces(&self, gguf_name: &str) -> bool {
        saved_module(gguf_name).is_some_and(|m| !self.merge.replacements(&m).is_empty())
    }

    /// Applies the replacements of the tensor `gguf_name` to `rows`, its rows `out_rows` as
    /// converted from the base: each adapter adds `scale · (its weight − the base's)`, so that
    /// one adapter at scale 1 gives its weight (exactly), scale 0 the base, and several adapters
    /// add up as their LoRA products do (and as llama.cpp applies them at run time).
    pub fn replace_rows(
        &self,
        gguf_name: &str,
        rows: &mut [f32],
        out_rows: Range<usize>,
    ) -> Result<(), AdapterError> {
        let Some(module) = saved_module(gguf_name) else {
            return Ok(());
        };
        let reps = self.merge.replacements(&module);
        if let [(adapter, saved, scale)] = reps[..] {
            if scale == 1.0 {
                rows.copy_from_slice(&adapter.rows_f32(&saved.tensor, out_rows)?);
                return Ok(());
            }
        }
        let base = rows.to_vec();
        for (adapter, saved, scale) in reps {
            let new = adapter.rows_f32(&saved.tensor, out_rows.clone())?;
            rows.par_iter_mut()
                .zip(new.par_iter().zip(&base))
                .for_each(|(w, (n, b))| *w += scale * (n - b));
        }
        Ok(())
    }

    /// The LoRA contributions to the tensor `t`, if it is a targeted block linear layer.
    pub fn delta_for(&self, t: &FalconTensor) -> Result<Option<Delta<'_>>, AdapterError> {
        let Some(layer) = t.layer else {
            return Ok(None);
        };
        let gguf = t
            .name
            .strip_prefix(&format!("blk.{layer}."))
            .and_then(|n| n.strip_suffix(".weight"));
        match gguf.and_then(layout::block_linear_by_gguf) {
            Some(linear) => self.merge.delta(layer, linear),
            None => Ok(None),
        }
    }

    /// Records the merged adapters in the file's metadata (see [`keys::LORA_MERGED_NAMES`]).
    pub fn add_metadata(&self, plan: &mut GgufPlan) -> Result<Vec<MergedAdapter>, AdapterError> {
        let records = self.merge.records()?;
        plan.set(
            keys::LORA_MERGED_NAMES,
            Value::strings(records.iter().map(|r| r.name.clone())),
        );
        plan.set(
            keys::LORA_MERGED_SCALES,
            Value::Array(Array::F32(records.iter().map(|r| r.scale).collect())),
        );
        plan.set(
            keys::LORA_MERGED_SHA256,
            Value::strings(records.iter().map(|r| r.sha256.clone())),
        );
        Ok(records)
    }
}

const OUTPUT: &str = "output.weight";
const EMBEDDINGS: &str = "token_embd.weight";

fn saved_module(gguf_name: &str) -> Option<SavedModule> {
    match gguf_name {
        OUTPUT => Some(SavedModule::LmHead),
        EMBEDDINGS => Some(SavedModule::WordEmbeddings),
        _ => None,
    }
}

#[derive(Debug)]
struct Term<'a> {
    adapter: &'a PeftAdapter,
    b: &'a TensorRef,
    /// `[rank, in_features]`, row-major.
    a: Vec<f32>,
    rank: usize,
    /// The user's scale times peft's.
    coef: f32,
}

/// The adapters' contribution to one weight.
#[derive(Debug)]
pub struct Delta<'a> {
    terms: Vec<Term<'a>>,
}

impl Delta<'_> {
    /// Adds `Σ coef · B[src(r)] · A` to `rows`, the output rows `out_rows` of the weight
    /// (`row_len` = in_features values each); `src` maps an output row to the checkpoint row it
    /// is converted from (the QKV regrouping). Reads only the rows of `B` needed.
    pub fn add_to(
        &self,
        rows: &mut [f32],
        row_len: usize,
        out_rows: Range<usize>,
        src: impl Fn(usize) -> usize + Sync,
    ) -> Result<(), AdapterError> {
        debug_assert_eq!(rows.len(), out_rows.len() * row_len);
        for t in &self.terms {
            debug_assert_eq!(t.a.len(), t.rank * row_len);
            // B's rows for these output rows, scaled: small (rows × rank).
            let mut b = Vec::with_capacity(out_rows.len() * t.rank);
            for r in out_rows.clone() {
                let s = src(r);
                b.extend(t.adapter.rows_f32(t.b, s..s + 1)?);
            }
            b.iter_mut().for_each(|v| *v *= t.coef);
            // rows += b · A, in blocks of rows spread over the pool.
            const BLOCK: usize = 64;
            rows.par_chunks_mut(row_len * BLOCK)
                .zip(b.par_chunks(t.rank * BLOCK))
                .for_each(|(c, bb)| {
                    let m = c.len() / row_len;
                    debug_assert_eq!(bb.len(), m * t.rank);
                    // SAFETY: row-major operands whose extents match the strides given: `bb` is
                    // m × rank, `t.a` rank × row_len, `c` m × row_len; `c` does not alias them.
                    unsafe {
                        matrixmultiply::sgemm(
                            m,
                            t.rank,
                            row_len,
                            1.0,
                            bb.as_ptr(),
                            t.rank as isize,
                            1,
                            t.a.as_ptr(),
                            row_len as isize,
                            1,
                            1.0,
                            c.as_mut_ptr(),
                            row_len as isize,
                            1,
                        );
                    }
                });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn spec_parsing() {
        assert_eq!(
            LoraSpec::parse("a/b").unwrap(),
            LoraSpec {
                dir: "a/b".into(),
                scale: 1.0
            }
        );
        assert_eq!(
            LoraSpec::parse("a/b:0.5").unwrap(),
            LoraSpec {
                dir: "a/b".into(),
                scale: 0.5
            }
        );
        assert_eq!(
            LoraSpec::parse("c:d").unwrap(),
            LoraSpec {
                dir: "c:d".into(),
                scale: 1.0
            }
        );
        assert_eq!(LoraSpec::parse("x:-2").unwrap().scale, -2.0);
        assert!(LoraSpec::parse(":2").is_err());
        assert!(LoraSpec::parse("x:inf").is_err());
    }

    /// The merged rows equal W + scale·s·B·A computed naively, with B's rows regrouped.
    #[test]
    fn delta_rows_are_the_product_of_regrouped_b_rows_and_a() {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let cfg = FalconConfig::from_dir(&models.join("tiny-40b-style")).unwrap();
        let specs = [LoraSpec {
            dir: models.join("lora-tiny-40b-patterns"),
            scale: 0.5,
        }];
        let merge = Merge::open(&specs, &cfg).unwrap();
        let (adapter, _) = &merge.adapters[0];
        let l = |g| crate::layout::block_linear_by_gguf(g).unwrap();
        let m = adapter.module(1, l("attn_qkv")).unwrap();
        let a = adapter.tensor_f32(&m.a).unwrap();
        let b = adapter.tensor_f32(&m.b).unwrap();
        let (out, inp, rank) = (
            m.b.shape[0] as usize,
            m.a.shape[1] as usize,
            m.rank() as usize,
        );
        let transform = l("attn_qkv").transform(&cfg);
        assert_eq!(transform, crate::layout::Transform::RegroupQkv);
        let src = |r: usize| transform.source_row(&cfg, r as u64) as usize;
        let delta = merge.delta(1, l("attn_qkv")).unwrap().unwrap();
        // Rows 100..300 of the output, starting from ones.
        let rows = 100..300;
        let mut got = vec![1f32; rows.len() * inp];
        delta.add_to(&mut got, inp, rows.clone(), src).unwrap();
        let coef = 0.5 * m.scale.scale;
        for (i, r) in rows.enumerate() {
            for j in 0..inp {
                let want = 1.0
                    + coef
                        * (0..rank)
                            .map(|k| f64::from(b[src(r) * rank + k]) * f64::from(a[k * inp + j]))
                            .sum::<f64>();
                let g = f64::from(got[i * inp + j]);
                assert!(
                    (g - want).abs() < 1e-5 * want.abs().max(1.0),
                    "row {r} col {j}: {g} vs {want}"
                );
            }
        }
        assert!(out > 300);
        // Untargeted modules have no delta.
        let specs = [LoraSpec {
            dir: models.join("lora-tiny-7b-rslora"),
            scale: 1.0,
        }];
        let cfg7 = FalconConfig::from_dir(&models.join("tiny-7b-style")).unwrap();
        let merge = Merge::open(&specs, &cfg7).unwrap();
        assert!(merge.delta(1, l("attn_qkv")).unwrap().is_none());
        assert!(merge.delta(2, l("attn_output")).unwrap().is_none());
        assert!(merge.delta(2, l("ffn_down")).unwrap().is_some());
    }
}
