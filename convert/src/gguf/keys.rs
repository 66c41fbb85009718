//! Metadata key strings, in one place.

pub const GENERAL_ARCHITECTURE: &str = "general.architecture";
pub const GENERAL_NAME: &str = "general.name";
pub const GENERAL_FILE_TYPE: &str = "general.file_type";
pub const GENERAL_QUANTIZATION_VERSION: &str = "general.quantization_version";
pub const GENERAL_ALIGNMENT: &str = "general.alignment";
/// `"adapter"` in llama.cpp's adapter files (absent from models).
pub const GENERAL_TYPE: &str = "general.type";
pub const GENERAL_TYPE_ADAPTER: &str = "adapter";

/// llama.cpp's LoRA adapter files: `adapter.type = "lora"` and the one `alpha` that llama.cpp
/// divides by each pair's rank.
pub const ADAPTER_TYPE: &str = "adapter.type";
pub const ADAPTER_TYPE_LORA: &str = "lora";
pub const ADAPTER_LORA_ALPHA: &str = "adapter.lora.alpha";
/// Where an adapter file came from: the SHA-256 of the PEFT adapter's two files
/// (`PeftAdapter::sha256`) and its `base_model_name_or_path`.
pub const ADAPTER_SOURCE_SHA256: &str = "adapter.lora.source.sha256";
pub const ADAPTER_SOURCE_BASE_MODEL: &str = "adapter.lora.source.base_model";

/// The PEFT LoRA adapters merged into a model's weights (`falcon-quantize --lora`), one entry
/// each in the order they were given: the adapter directory's name (string array), the scale it
/// was merged at (f32 array) and the SHA-256 of its two files (string array, see
/// `PeftAdapter::sha256`). Absent when nothing was merged.
pub const LORA_MERGED_NAMES: &str = "lora.merged.names";
pub const LORA_MERGED_SCALES: &str = "lora.merged.scales";
pub const LORA_MERGED_SHA256: &str = "lora.merged.sha256";

/// The architecture name llama.cpp knows Falcon-7B/40B/180B by.
pub const ARCH_FALCON: &str = "falcon";

pub const CONTEXT_LENGTH: &str = "falcon.context_length";
pub const EMBEDDING_LENGTH: &str = "falcon.embedding_length";
pub const FEED_FORWARD_LENGTH: &str = "falcon.feed_forward_length";
pub const BLOCK_COUNT: &str = "falcon.block_count";
pub const HEAD_COUNT: &str = "falcon.attention.head_count";
pub const HEAD_COUNT_KV: &str = "falcon.attention.head_count_kv";
pub const LAYER_NORM_EPS: &str = "falcon.attention.layer_norm_epsilon";
/// Marks the fused QKV rows as regrouped into all Q, then all K, then all V.
pub const TENSOR_DATA_LAYOUT: &str = "falcon.tensor_data_layout";
pub const TENSOR_DATA_LAYOUT_REGROUPED: &str = "jploski";

pub const TOKENIZER_MODEL: &str = "tokenizer.ggml.model";
pub const TOKENIZER_PRE: &str = "tokenizer.ggml.pre";
pub const TOKENIZER_TOKENS: &str = "tokenizer.ggml.tokens";
pub const TOKENIZER_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
pub const TOKENIZER_MERGES: &str = "tokenizer.ggml.merges";
pub const TOKENIZER_BOS_ID: &str = "tokenizer.ggml.bos_token_id";
pub const TOKENIZER_EOS_ID: &str = "tokenizer.ggml.eos_token_id";
pub const TOKENIZER_PAD_ID: &str = "tokenizer.ggml.padding_token_id";
pub const TOKENIZER_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
pub const TOKENIZER_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
/// The checkpoint's default chat template (Jinja), as `chat_template` in `tokenizer_config.json`.
pub const TOKENIZER_CHAT_TEMPLATE: &str = "tokenizer.chat_template";
/// The names of the checkpoint's other chat templates, each under [`tokenizer_chat_template_named`].
pub const TOKENIZER_CHAT_TEMPLATES: &str = "tokenizer.chat_templates";

/// The key of a named chat template other than the default (`tokenizer.chat_template.NAME`), as
/// llama.cpp's `llama_model_chat_template(model, name)` looks it up.
pub fn tokenizer_chat_template_named(name: &str) -> String {
    format!("{TOKENIZER_CHAT_TEMPLATE}.{name}")
}

/// The quantization version of ggml's block formats (`GGML_QNT_VERSION`).
pub const QNT_VERSION: u32 = 2;
