//! A PEFT adapter → a GGUF LoRA adapter that llama.cpp applies at run time
//! (`llama_adapter_lora_init`), the format of llama.cpp's `convert_lora_to_gguf.py`:
//!
//! - metadata `general.architecture = falcon`, `general.type = adapter`,
//!   `adapter.type = lora`, `adapter.lora.alpha` (f32), plus `general.name`,
//!   `general.file_type`, and where the adapter came from (`adapter.lora.source.*`);
//! - for each LoRA pair on block N, `blk.N.<attn_qkv|attn_output|ffn_up|ffn_down>.weight.lora_a`
//!   with ggml dims `[in_features, rank]` (PEFT's `lora_A` `[rank, in]`, unchanged) and
//!   `….lora_b` with dims `[rank, out_features]` (PEFT's `lora_B` `[out, rank]`), whose QKV rows
//!   are regrouped as the base's are (all Q, then K, then V on grouped-KV layouts).
//!
//! llama.cpp adds `scale · k · B·A·x` with `k = alpha / rank` (rank = lora_b's `ne[0]`, alpha
//! the file's one `adapter.lora.alpha`), or `k = 1` when alpha is 0, and `scale` the user's
//! adapter scale. PEFT's per-module scale `s` (rsLoRA's `alpha / sqrt(r)`, `rank_pattern`,
//! `alpha_pattern`) need not equal that `k`: the file keeps `adapter.lora.alpha = lora_alpha` and
//! multiplies each module's lora_b by `s / k` where that differs from 1, so that llama.cpp's
//! own formula gives `scale · s · B·A` for every module.
//!
//! A `modules_to_save` copy of `lm_head` (a full replacement of the output layer) becomes a
//! LoRA pair of rank `hidden`: `output.weight.lora_a` the identity and `output.weight.lora_b`
//! the difference from the base's output weight (times `hidden / alpha`, so that `k` cancels).
//! It needs a base whose output layer is its own tensor (not tied to the embeddings); a
//! replacement of the embeddings cannot be applied at run time (merge such adapters instead).

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use quant::QuantType;

use super::base::BaseModel;
use super::error::AdapterError;
use super::peft::{LoraModule, PeftAdapter, SavedModule};
use crate::error::ConvertError;
use crate::gguf::{keys, GgufPlan, GgufWriter, PlannedTensor, Value};
use crate::output::Output;
use crate::rules::FileType;

/// Options of [`export_lora`].
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// f32 (the default), f16, bf16 or q8_0 (tensors whose rows are not a multiple of 32
    /// elements, such as lora_b of a small rank, are written f16).
    pub file_type: FileType,
    /// Set from another thread to stop; nothing is left at the destination.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            file_type: FileType::F32,
            cancel: None,
        }
    }
}

/// What [`export_lora`] wrote.
#[derive(Clone, Debug)]
pub struct ExportSummary {
    pub path: PathBuf,
    pub bytes: u64,
    pub n_tensors: usize,
    /// LoRA pairs on linear layers.
    pub n_modules: usize,
    /// The value of `adapter.lora.alpha`.
    pub alpha: f32,
    /// Modules whose lora_b carries a correction of llama.cpp's `alpha / rank` (rsLoRA,
    /// `rank_pattern`, `alpha_pattern`).
    pub n_rescaled: usize,
    /// Base weights the adapter replaces, expressed as a LoRA pair (`output.weight`).
    pub replaced: Vec<String>,
}

/// The file types an adapter can be written in.
pub const EXPORT_TYPES: [FileType; 4] =
    [FileType::F32, FileType::F16, FileType::BF16, FileType::Q8_0];

/// One tensor of the output and how to make its rows.
enum Source<'a> {
    A(&'a LoraModule),
    /// lora_b times a factor, rows regrouped when the layer is QKV.
    B(&'a LoraModule, f32),
    Identity,
    /// (replacement − base) × factor.
    Delta(&'a SavedModule, f32),
}

/// Converts the PEFT adapter in `adapter_dir` for the base at `base` (checkpoint directory or
/// GGUF file) into a GGUF LoRA adapter at `out`.
pub fn export_lora(
    adapter_dir: &Path,
    base: &Path,
    out: &Path,
    opts: &ExportOptions,
) -> Result<ExportSummary, ConvertError> {
    if !EXPORT_TYPES.contains(&opts.file_type) {
        return Err(ConvertError::BadConfig {
            path: out.to_path_buf(),
            why: format!(
                "an adapter cannot be written as {}: use f32, f16, bf16 or q8_0",
                opts.file_type.name()
            ),
        });
    }
    let base = BaseModel::open(base)?;
    let adapter = PeftAdapter::open(adapter_dir, &base.config)?;
    let cfg = &base.config;
    let unsupported = |why: String| -> ConvertError {
        AdapterError::Unsupported {
            path: adapter.config.path.clone(),
            key: "modules_to_save".into(),
            why,
        }
        .into()
    };
    for s in &adapter.saved {
        match s.module {
            SavedModule::WordEmbeddings => return Err(unsupported(
                "the adapter replaces the token embeddings, which llama.cpp cannot do at run time; merge it instead (falcon-quantize CHECKPOINT --lora ADAPTER_DIR)".into(),
            )),
            SavedModule::LmHead if !base.has_output => return Err(unsupported(format!(
                "the adapter replaces lm_head, but {} ties its output layer to the token embeddings, so llama.cpp cannot replace one without the other at run time; merge it instead (falcon-quantize CHECKPOINT --lora ADAPTER_DIR)",
                base.path.display()
            ))),
            SavedModule::LmHead => {}
        }
    }

    let alpha = adapter.config.lora_alpha as f32;
    // llama.cpp's multiplier for a pair of rank `rank`.
    let k = |rank: u64| -> f64 {
        if alpha != 0.0 {
            f64::from(alpha) / rank as f64
        } else {
            1.0
        }
    };
    let ft = opts.file_type;
    let ty_for = |row_len: u64| -> QuantType {
        match ft {
            FileType::F32 => QuantType::F32,
            FileType::BF16 => QuantType::BF16,
            FileType::Q8_0 if row_len % 32 == 0 => QuantType::Q8_0,
            _ => QuantType::F16,
        }
    };

    let mut plan = GgufPlan::new();
    plan.set(
        keys::GENERAL_ARCHITECTURE,
        Value::String(keys::ARCH_FALCON.into()),
    );
    plan.set(
        keys::GENERAL_TYPE,
        Value::String(keys::GENERAL_TYPE_ADAPTER.into()),
    );
    plan.set(keys::GENERAL_NAME, Value::String(adapter.name()));
    plan.set(keys::GENERAL_FILE_TYPE, Value::U32(ft.llama_ftype()));
    plan.set(
        keys::GENERAL_QUANTIZATION_VERSION,
        Value::U32(keys::QNT_VERSION),
    );
    plan.set(
        keys::ADAPTER_TYPE,
        Value::String(keys::ADAPTER_TYPE_LORA.into()),
    );
    plan.set(keys::ADAPTER_LORA_ALPHA, Value::F32(alpha));
    plan.set(
        keys::ADAPTER_SOURCE_SHA256,
        Value::String(adapter.sha256()?),
    );
    if let Some(b) = &adapter.config.base_model_name_or_path {
        plan.set(keys::ADAPTER_SOURCE_BASE_MODEL, Value::String(b.clone()));
    }

    let mut sources: Vec<Source<'_>> = Vec::new();
    let mut n_rescaled = 0;
    let mut replaced = Vec::new();
    let h = cfg.hidden_size;
    for s in &adapter.saved {
        // A replacement of [vocab, hidden] as identity [hidden × hidden] and delta [vocab × hidden].
        let name = s.module.gguf_name();
        let identity_ty = if ft == FileType::F32 {
            QuantType::F32
        } else {
            QuantType::F16
        };
        plan.add_tensor(PlannedTensor {
            name: format!("{name}.lora_a"),
            dims: vec![h, h],
            ty: identity_ty,
        });
        plan.add_tensor(PlannedTensor {
            name: format!("{name}.lora_b"),
            dims: vec![h, cfg.vocab_size],
            ty: ty_for(h),
        });
        sources.push(Source::Identity);
        sources.push(Source::Delta(&s.module, (1.0 / k(h)) as f32));
        replaced.push(name.to_string());
    }
    let mut modules: Vec<&LoraModule> = adapter.modules.iter().collect();
    modules.sort_by_key(|m| (m.layer, m.linear.gguf_name(m.layer)));
    for m in modules {
        let name = m.linear.gguf_name(m.layer);
        let (out_f, in_f) = m.linear.shape(cfg);
        let fold = m.scale.scale / k(m.rank());
        let fold = if (fold - 1.0).abs() < 1e-9 {
            1.0
        } else {
            n_rescaled += 1;
            fold as f32
        };
        plan.add_tensor(PlannedTensor {
            name: format!("{name}.lora_a"),
            dims: vec![in_f, m.rank()],
            ty: ty_for(in_f),
        });
        plan.add_tensor(PlannedTensor {
            name: format!("{name}.lora_b"),
            dims: vec![m.rank(), out_f],
            ty: ty_for(m.rank()),
        });
        sources.push(Source::A(m));
        sources.push(Source::B(m, fold));
    }

    let len = plan.file_len();
    let output = Output::create(out, len)?;
    let mut w = GgufWriter::new(
        BufWriter::with_capacity(4 << 20, output.file()?),
        plan.clone(),
    )
    .map_err(|e| ConvertError::write(out, e))?;
    let cancelled = || {
        opts.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    };
    for (t, src) in plan.tensors.iter().zip(&sources) {
        let row_len = t.dims[0] as usize;
        let n_rows: usize = t.dims[1..].iter().product::<u64>() as usize;
        let per = ((4 << 20) / row_len).max(1);
        let mut r0 = 0;
        while r0 < n_rows {
            if cancelled() {
                return Err(ConvertError::Interrupted {
                    path: out.to_path_buf(),
                });
            }
            let r1 = (r0 + per).min(n_rows);
            let rows = match src {
                Source::A(m) => adapter.rows_f32(&m.a, r0..r1)?,
                Source::B(m, fold) => {
                    let mut rows = Vec::with_capacity((r1 - r0) * row_len);
                    // lora_b's rows are output rows: regrouped like the base weight's.
                    let transform = m.linear.transform(cfg);
                    for r in r0..r1 {
                        let s = transform.source_row(cfg, r as u64) as usize;
                        rows.extend(adapter.rows_f32(&m.b, s..s + 1)?);
                    }
                    if *fold != 1.0 {
                        rows.iter_mut().for_each(|v| *v *= fold);
                    }
                    rows
                }
                Source::Identity => {
                    let mut rows = vec![0f32; (r1 - r0) * row_len];
                    for r in r0..r1 {
                        rows[(r - r0) * row_len + r] = 1.0;
                    }
                    rows
                }
                Source::Delta(module, fold) => {
                    let saved = adapter.saved(module).expect("planned from the adapter");
                    let mut rows = adapter.rows_f32(&saved.tensor, r0..r1)?;
                    let base_rows = base.embedding_rows(module.gguf_name(), r0..r1)?;
                    for (v, b) in rows.iter_mut().zip(base_rows) {
                        *v = (*v - b) * fold;
                    }
                    rows
                }
            };
            let mut q = vec![0u8; t.ty.row_bytes(row_len)? * (r1 - r0)];
            quant::quantize(t.ty, &rows, row_len, &mut q).map_err(|e| match e {
                quant::QuantError::NonFinite { row, index, value } => ConvertError::NonFinite {
                    tensor: t.name.clone(),
                    file: adapter.weights_path().to_path_buf(),
                    row: r0 + row,
                    column: index,
                    value,
                },
                e => ConvertError::Quant(e),
            })?;
            w.write_tensor_bytes(&q)
                .map_err(|e| ConvertError::write(out, e))?;
            r0 = r1;
        }
    }
    let buf = w.finish().map_err(|e| ConvertError::write(out, e))?;
    buf.into_inner()
        .map_err(|e| ConvertError::write(out, e.into_error()))?;
    if cancelled() {
        return Err(ConvertError::Interrupted {
            path: out.to_path_buf(),
        });
    }
    output.commit()?;
    Ok(ExportSummary {
        path: out.to_path_buf(),
        bytes: len,
        n_tensors: plan.tensors.len(),
        n_modules: adapter.modules.len(),
        alpha,
        n_rescaled,
        replaced,
    })
}
