//! Per-tensor type choices, kept as data: an ordered list of rules, the first that applies wins,
//! then a fallback for rows that the chosen block format cannot take.
//!
//! They reproduce `llama_tensor_get_type` of llama.cpp's quantizer (`src/llama-quant.cpp` of the
//! llama.cpp that `llama-cpp-sys-2` 0.1.161 vendors) for the `falcon` architecture, with no
//! importance matrix and no overrides, so that our files hold the same types as its files.

use quant::QuantType;

/// A whole-file quantization choice (`llama_ftype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4_K_M,
    Q5_K_M,
    Q6_K,
}

impl FileType {
    pub const ALL: [FileType; 11] = [
        FileType::F32,
        FileType::F16,
        FileType::BF16,
        FileType::Q8_0,
        FileType::Q4_0,
        FileType::Q4_1,
        FileType::Q5_0,
        FileType::Q5_1,
        FileType::Q4_K_M,
        FileType::Q5_K_M,
        FileType::Q6_K,
    ];

    /// The name users type (`--type`), lower case.
    pub fn name(self) -> &'static str {
        match self {
            FileType::F32 => "f32",
            FileType::F16 => "f16",
            FileType::BF16 => "bf16",
            FileType::Q8_0 => "q8_0",
            FileType::Q4_0 => "q4_0",
            FileType::Q4_1 => "q4_1",
            FileType::Q5_0 => "q5_0",
            FileType::Q5_1 => "q5_1",
            FileType::Q4_K_M => "q4_k_m",
            FileType::Q5_K_M => "q5_k_m",
            FileType::Q6_K => "q6_k",
        }
    }

    pub fn from_name(name: &str) -> Option<FileType> {
        FileType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`).
    pub fn llama_ftype(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q4_1 => 3,
            FileType::Q8_0 => 7,
            FileType::Q5_0 => 8,
            FileType::Q5_1 => 9,
            FileType::Q4_K_M => 15,
            FileType::Q5_K_M => 17,
            FileType::Q6_K => 18,
            FileType::BF16 => 32,
        }
    }

    /// The type most matrices get.
    pub fn default_type(self) -> QuantType {
        match self {
            FileType::F32 => QuantType::F32,
            FileType::F16 => QuantType::F16,
            FileType::BF16 => QuantType::BF16,
            FileType::Q8_0 => QuantType::Q8_0,
            FileType::Q4_0 => QuantType::Q4_0,
            FileType::Q4_1 => QuantType::Q4_1,
            FileType::Q5_0 => QuantType::Q5_0,
            FileType::Q5_1 => QuantType::Q5_1,
            FileType::Q4_K_M => QuantType::Q4_K,
            FileType::Q5_K_M => QuantType::Q5_K,
            FileType::Q6_K => QuantType::Q6_K,
        }
    }

    fn is_quantized(self) -> bool {
        !matches!(self, FileType::F32 | FileType::F16 | FileType::BF16)
    }

    /// What `--bits` means for a model whose matrices have rows of `row_len` elements: the best
    /// 4-bit mix the shapes allow (Q4_K_M when rows are multiples of 256, else Q4_0), or Q8_0.
    pub fn for_bits(bits: u32, row_len: u64) -> Option<FileType> {
        match bits {
            8 => Some(FileType::Q8_0),
            4 if row_len % 256 == 0 => Some(FileType::Q4_K_M),
            4 => Some(FileType::Q4_0),
            _ => None,
        }
    }
}

/// What the rules look at.
#[derive(Clone, Copy, Debug)]
pub struct TensorCtx<'a> {
    pub name: &'a str,
    pub dims: &'a [u64],
    pub layer: Option<u64>,
    pub n_layer: u64,
    /// The file has no `output.weight`: the token embedding is also the output matrix.
    pub tied: bool,
    pub file_type: FileType,
}

impl TensorCtx<'_> {
    fn is(&self, suffix: &str) -> bool {
        self.name.ends_with(suffix)
    }

    /// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third between.
    fn more_bits(&self) -> bool {
        let (i, n) = (self.layer.unwrap_or(0) as i64, self.n_layer as i64);
        i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
    }

    fn k_mix(&self) -> bool {
        matches!(self.file_type, FileType::Q4_K_M | FileType::Q5_K_M)
    }
}

/// One rule: when it applies and what it picks.
#[derive(Debug)]
pub struct Rule {
    pub what: &'static str,
    pub applies: fn(&TensorCtx) -> bool,
    pub choose: fn(&TensorCtx) -> QuantType,
}

/// The rules, in order.
pub const RULES: &[Rule] = &[
    Rule {
        what: "1-D tensors, norms and biases stay F32",
        applies: |t| t.dims.len() < 2 || !t.is("weight") || t.is("_norm.weight"),
        choose: |_| QuantType::F32,
    },
    Rule {
        what: "unquantized file types store every matrix in their type",
        applies: |t| !t.file_type.is_quantized(),
        choose: |t| t.file_type.default_type(),
    },
    Rule {
        what: "Falcon's output matrix (and the token embedding when tied to it) is Q8_0",
        applies: |t| t.name == "output.weight" || (t.tied && t.name == "token_embd.weight"),
        choose: |_| QuantType::Q8_0,
    },
    Rule {
        what: "k-quant mixes give attn_qkv Q6_K on the layers that get more bits",
        applies: |t| t.k_mix() && t.is("attn_qkv.weight") && t.more_bits(),
        choose: |_| QuantType::Q6_K,
    },
    Rule {
        what: "Q4_K_M gives ffn_down Q6_K on the first sixteenth of Falcon's layers",
        applies: |t| {
            t.file_type == FileType::Q4_K_M
                && t.is("ffn_down.weight")
                && t.layer.unwrap_or(0) < t.n_layer / 16
        },
        choose: |_| QuantType::Q6_K,
    },
    Rule {
        what: "Q4_K_M gives ffn_down Q5_K on Falcon's layers that get more bits",
        applies: |t| t.file_type == FileType::Q4_K_M && t.is("ffn_down.weight") && t.more_bits(),
        choose: |_| QuantType::Q5_K,
    },
    Rule {
        what: "Q5_K_M gives ffn_down Q6_K on the layers that get more bits",
        applies: |t| t.file_type == FileType::Q5_K_M && t.is("ffn_down.weight") && t.more_bits(),
        choose: |_| QuantType::Q6_K,
    },
    Rule {
        what: "everything else takes the file type's default",
        applies: |_| true,
        choose: |t| t.file_type.default_type(),
    },
];

/// The block format to fall back on when rows are not a multiple of the chosen format's block.
pub fn fallback(ty: QuantType) -> QuantType {
    match ty {
        QuantType::Q4_K => QuantType::Q5_0,
        QuantType::Q5_K => QuantType::Q5_1,
        QuantType::Q6_K => QuantType::Q8_0,
        other => other,
    }
}

/// The type a tensor is stored in, and the rule that chose it.
pub fn choose(t: &TensorCtx) -> (QuantType, &'static str) {
    let rule = RULES
        .iter()
        .find(|r| (r.applies)(t))
        .expect("the last rule always applies");
    let mut ty = (rule.choose)(t);
    let row = t.dims[0] as usize;
    if t.file_type.is_quantized() && ty != QuantType::F32 && row % ty.block_size() != 0 {
        ty = fallback(ty);
        if row % ty.block_size() != 0 {
            ty = QuantType::F16;
        }
    }
    (ty, rule.what)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(name: &'a str, dims: &'a [u64], layer: Option<u64>, ft: FileType) -> TensorCtx<'a> {
        TensorCtx {
            name,
            dims,
            layer,
            n_layer: 60,
            tied: true,
            file_type: ft,
        }
    }

    #[test]
    fn norms_and_biases_stay_f32() {
        assert_eq!(
            choose(&ctx(
                "blk.0.attn_norm.weight",
                &[8192],
                Some(0),
                FileType::Q4_0
            ))
            .0,
            QuantType::F32
        );
        assert_eq!(
            choose(&ctx("output_norm.bias", &[8192], None, FileType::Q8_0)).0,
            QuantType::F32
        );
        assert_eq!(
            choose(&ctx(
                "blk.0.attn_norm.bias",
                &[8192],
                Some(0),
                FileType::F16
            ))
            .0,
            QuantType::F32
        );
    }

    #[test]
    fn unquantized_types_apply_to_every_matrix() {
        assert_eq!(
            choose(&ctx(
                "token_embd.weight",
                &[8192, 65024],
                None,
                FileType::F16
            ))
            .0,
            QuantType::F16
        );
        assert_eq!(
            choose(&ctx(
                "blk.0.attn_qkv.weight",
                &[4544, 4672],
                Some(0),
                FileType::BF16
            ))
            .0,
            QuantType::BF16
        );
    }

    #[test]
    fn output_and_tied_embedding_are_q8_0() {
        assert_eq!(
            choose(&ctx(
                "output.weight",
                &[8192, 65024],
                None,
                FileType::Q4_K_M
            ))
            .0,
            QuantType::Q8_0
        );
        assert_eq!(
            choose(&ctx(
                "token_embd.weight",
                &[8192, 65024],
                None,
                FileType::Q4_0
            ))
            .0,
            QuantType::Q8_0
        );
        let untied = TensorCtx {
            tied: false,
            ..ctx("token_embd.weight", &[8192, 65024], None, FileType::Q4_0)
        };
        assert_eq!(choose(&untied).0, QuantType::Q4_0);
    }

    #[test]
    fn qkv_more_bits_in_k_mixes() {
        // n_layer 60: more bits for layers < 7, >= 52, and (i - 7) % 3 == 2.
        let qkv = |l, ft| choose(&ctx("blk.x.attn_qkv.weight", &[8192, 9216], Some(l), ft)).0;
        assert_eq!(qkv(0, FileType::Q4_K_M), QuantType::Q6_K);
        assert_eq!(qkv(7, FileType::Q4_K_M), QuantType::Q4_K);
        assert_eq!(qkv(9, FileType::Q4_K_M), QuantType::Q6_K);
        assert_eq!(qkv(59, FileType::Q5_K_M), QuantType::Q6_K);
        assert_eq!(qkv(8, FileType::Q5_K_M), QuantType::Q5_K);
        assert_eq!(qkv(0, FileType::Q6_K), QuantType::Q6_K);
        assert_eq!(qkv(0, FileType::Q4_0), QuantType::Q4_0);
    }

    #[test]
    fn ffn_down_in_q4_k_m() {
        let down = |l| {
            choose(&ctx(
                "blk.x.ffn_down.weight",
                &[32768, 8192],
                Some(l),
                FileType::Q4_K_M,
            ))
            .0
        };
        assert_eq!(down(0), QuantType::Q6_K); // < 60/16 = 3
        assert_eq!(down(3), QuantType::Q5_K); // < 60/8: more bits
        assert_eq!(down(8), QuantType::Q4_K);
        assert_eq!(down(9), QuantType::Q5_K);
    }

    #[test]
    fn ffn_down_in_q5_k_m() {
        let down = |l| {
            choose(&ctx(
                "blk.x.ffn_down.weight",
                &[32768, 8192],
                Some(l),
                FileType::Q5_K_M,
            ))
            .0
        };
        assert_eq!(down(0), QuantType::Q6_K);
        assert_eq!(down(8), QuantType::Q5_K);
    }

    #[test]
    fn other_matrices_take_the_default() {
        assert_eq!(
            choose(&ctx(
                "blk.1.ffn_up.weight",
                &[8192, 32768],
                Some(1),
                FileType::Q4_K_M
            ))
            .0,
            QuantType::Q4_K
        );
        assert_eq!(
            choose(&ctx(
                "blk.1.attn_output.weight",
                &[8192, 8192],
                Some(1),
                FileType::Q5_1
            ))
            .0,
            QuantType::Q5_1
        );
    }

    #[test]
    fn k_quants_fall_back_on_rows_not_multiple_of_256() {
        // Falcon-7B: width 4544.
        let t = |name, l, ft| choose(&ctx(name, &[4544, 18176], Some(l), ft)).0;
        assert_eq!(
            t("blk.1.ffn_up.weight", 8, FileType::Q4_K_M),
            QuantType::Q5_0
        );
        assert_eq!(
            t("blk.1.attn_qkv.weight", 0, FileType::Q4_K_M),
            QuantType::Q8_0
        );
        assert_eq!(
            t("blk.1.ffn_up.weight", 8, FileType::Q5_K_M),
            QuantType::Q5_1
        );
        assert_eq!(t("blk.1.ffn_up.weight", 8, FileType::Q6_K), QuantType::Q8_0);
        // Rows not even a multiple of 32 end in F16.
        assert_eq!(
            choose(&ctx(
                "blk.1.ffn_up.weight",
                &[100, 400],
                Some(1),
                FileType::Q4_0
            ))
            .0,
            QuantType::F16
        );
    }

    #[test]
    fn bits_pick_the_best_mix_the_shapes_allow() {
        assert_eq!(FileType::for_bits(4, 8192), Some(FileType::Q4_K_M));
        assert_eq!(FileType::for_bits(4, 4544), Some(FileType::Q4_0));
        assert_eq!(FileType::for_bits(8, 4544), Some(FileType::Q8_0));
        assert_eq!(FileType::for_bits(5, 4544), None);
    }

    #[test]
    fn names_round_trip() {
        for t in FileType::ALL {
            assert_eq!(FileType::from_name(t.name()), Some(t));
        }
        assert_eq!(FileType::from_name("Q4_K_M"), Some(FileType::Q4_K_M));
    }
}
