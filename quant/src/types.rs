//! The one table of per-type facts. Everything else (names, ids, sizes, test loops) reads it.

use std::fmt;
use std::str::FromStr;

use crate::QuantError;

/// A ggml tensor data type this crate can produce and read back.
// Variant names follow ggml's spelling (`GGML_TYPE_Q4_K`), which every user of the formats knows.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
}

/// The facts ggml's type-traits table holds for one type.
struct Facts {
    ty: QuantType,
    ggml_id: u32,
    name: &'static str,
    block_size: usize,
    type_size: usize,
}

/// Elements per super-block of the K formats (ggml's `QK_K`).
pub(crate) const QK_K: usize = 256;

/// One row per type, in the order of `QuantType`'s variants (checked by a test).
/// Ids, names and sizes are ggml's (`ggml.h` enum `ggml_type`, `ggml.c` `type_traits`).
#[rustfmt::skip]
const TABLE: [Facts; 11] = [
    Facts { ty: QuantType::F32, ggml_id: 0, name: "f32", block_size: 1, type_size: 4 },
    Facts { ty: QuantType::F16, ggml_id: 1, name: "f16", block_size: 1, type_size: 2 },
    Facts { ty: QuantType::BF16, ggml_id: 30, name: "bf16", block_size: 1, type_size: 2 },
    Facts { ty: QuantType::Q4_0, ggml_id: 2, name: "q4_0", block_size: 32, type_size: 18 },
    Facts { ty: QuantType::Q4_1, ggml_id: 3, name: "q4_1", block_size: 32, type_size: 20 },
    Facts { ty: QuantType::Q5_0, ggml_id: 6, name: "q5_0", block_size: 32, type_size: 22 },
    Facts { ty: QuantType::Q5_1, ggml_id: 7, name: "q5_1", block_size: 32, type_size: 24 },
    Facts { ty: QuantType::Q8_0, ggml_id: 8, name: "q8_0", block_size: 32, type_size: 34 },
    Facts { ty: QuantType::Q4_K, ggml_id: 12, name: "q4_K", block_size: QK_K, type_size: 144 },
    Facts { ty: QuantType::Q5_K, ggml_id: 13, name: "q5_K", block_size: QK_K, type_size: 176 },
    Facts { ty: QuantType::Q6_K, ggml_id: 14, name: "q6_K", block_size: QK_K, type_size: 210 },
];

impl QuantType {
    /// Every type, in declaration order.
    pub const ALL: [QuantType; 11] = {
        let mut all = [QuantType::F32; 11];
        let mut i = 0;
        while i < TABLE.len() {
            all[i] = TABLE[i].ty;
            i += 1;
        }
        all
    };

    /// ggml's `GGML_TYPE_*` value, as written in GGUF tensor infos.
    pub const fn ggml_id(self) -> u32 {
        TABLE[self as usize].ggml_id
    }

    /// The type with ggml id `id`, if this crate supports it.
    pub fn from_ggml_id(id: u32) -> Option<QuantType> {
        TABLE.iter().find(|f| f.ggml_id == id).map(|f| f.ty)
    }

    /// ggml's name for the type (`"q4_K"`, `"bf16"`, ...).
    pub const fn name(self) -> &'static str {
        TABLE[self as usize].name
    }

    /// The type whose ggml name is `name`, ignoring ASCII case.
    pub fn from_name(name: &str) -> Option<QuantType> {
        TABLE
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(name))
            .map(|f| f.ty)
    }

    /// Elements per block: 1 for the float types, 32 for the legacy formats, 256 for K formats.
    pub const fn block_size(self) -> usize {
        TABLE[self as usize].block_size
    }

    /// Bytes per block.
    pub const fn type_size(self) -> usize {
        TABLE[self as usize].type_size
    }

    /// Average storage cost of one weight, in bits.
    pub fn bits_per_weight(self) -> f64 {
        (self.type_size() * 8) as f64 / self.block_size() as f64
    }

    /// Bytes taken by a row of `n` elements.
    ///
    /// # Errors
    /// [`QuantError::RowLength`] when `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Result<usize, QuantError> {
        let block = self.block_size();
        if n % block != 0 {
            return Err(QuantError::RowLength {
                ty: self,
                len: n,
                block,
            });
        }
        Ok(n / block * self.type_size())
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for QuantType {
    type Err = QuantError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        QuantType::from_name(s).ok_or_else(|| QuantError::UnknownType { name: s.to_owned() })
    }
}

/// The supported names, comma-separated, for error messages and help text.
pub(crate) fn all_names() -> String {
    TABLE.iter().map(|f| f.name).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_follow_variant_order() {
        for (i, facts) in TABLE.iter().enumerate() {
            assert_eq!(facts.ty as usize, i, "{}", facts.name);
        }
        assert_eq!(QuantType::ALL.len(), TABLE.len());
    }

    #[test]
    fn ids_and_names_round_trip() {
        for ty in QuantType::ALL {
            assert_eq!(QuantType::from_ggml_id(ty.ggml_id()), Some(ty));
            assert_eq!(QuantType::from_name(ty.name()), Some(ty));
            assert_eq!(ty.name().to_uppercase().parse::<QuantType>().unwrap(), ty);
            assert_eq!(ty.to_string(), ty.name());
        }
        assert_eq!(QuantType::from_ggml_id(4), None); // q4_2, removed from ggml
        assert!(matches!(
            "q3_K".parse::<QuantType>(),
            Err(QuantError::UnknownType { .. })
        ));
    }

    #[test]
    fn bits_per_weight_matches_ggml() {
        let expect = [32.0, 16.0, 16.0, 4.5, 5.0, 5.5, 6.0, 8.5, 4.5, 5.5, 6.5625];
        for (ty, bpw) in QuantType::ALL.into_iter().zip(expect) {
            assert_eq!(ty.bits_per_weight(), bpw, "{ty}");
        }
    }

    #[test]
    fn row_bytes_rejects_partial_blocks() {
        assert_eq!(QuantType::Q4_K.row_bytes(512).unwrap(), 288);
        assert_eq!(QuantType::F16.row_bytes(3).unwrap(), 6);
        let err = QuantType::Q8_0.row_bytes(33).unwrap_err();
        assert!(
            matches!(
                err,
                QuantError::RowLength {
                    len: 33,
                    block: 32,
                    ..
                }
            ),
            "{err}"
        );
    }
}
