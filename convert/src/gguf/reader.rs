//! A GGUF reader that trusts nothing: every count, string length, type id, dimension, offset
//! and size is checked against the file length before it is used.
//!
//! Memory is bounded by the metadata's size: arrays are kept typed (one `Vec` per element type,
//! strings as one buffer), so validating a file takes about one byte per byte of array, and at
//! most about six per byte of metadata of any shape (a million one-byte values or tensor infos),
//! never anything in proportion to a count the file merely claims.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use quant::QuantType;

use super::keys;
use super::value::{Array, Strings, Value, ValueType};
use super::{align_up, DEFAULT_ALIGNMENT, MAGIC};

/// Limits that keep a hostile header from making us allocate without bound.
const MAX_DIMS: u32 = 4;
const MAX_STRING: u64 = 1 << 24;
/// ggml's `GGML_MAX_NAME`: tensor names are at most 63 bytes.
const MAX_NAME: u64 = 63;

/// Why a GGUF file was refused.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a GGUF file (it does not start with the bytes 'GGUF')")]
    BadMagic { path: PathBuf },
    #[error("{path}: GGUF version {version} is not supported (versions 2 and 3 are)")]
    BadVersion { path: PathBuf, version: u32 },
    #[error("{path} is truncated or corrupt: {what} at byte {offset} runs past the end of the file ({len} bytes); re-create or re-download it")]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        len: u64,
    },
    #[error("{path} is corrupt: {what}; re-create or re-download it")]
    Invalid { path: PathBuf, what: String },
}

/// Block facts of every ggml type a GGUF file may hold (not only those this project writes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GgmlTypeInfo {
    pub id: u32,
    pub name: &'static str,
    pub block_size: u64,
    pub type_size: u64,
}

/// ggml types that the quant crate does not produce but llama.cpp files may contain.
const OTHER_TYPES: &[(u32, &str, u64, u64)] = &[
    (9, "q8_1", 32, 36),
    (10, "q2_K", 256, 84),
    (11, "q3_K", 256, 110),
    (15, "q8_K", 256, 292),
    (16, "iq2_xxs", 256, 66),
    (17, "iq2_xs", 256, 74),
    (18, "iq3_xxs", 256, 98),
    (19, "iq1_s", 256, 50),
    (20, "iq4_nl", 32, 18),
    (21, "iq3_s", 256, 110),
    (22, "iq2_s", 256, 82),
    (23, "iq4_xs", 256, 136),
    (24, "i8", 1, 1),
    (25, "i16", 1, 2),
    (26, "i32", 1, 4),
    (27, "i64", 1, 8),
    (28, "f64", 1, 8),
    (29, "iq1_m", 256, 56),
    (34, "tq1_0", 256, 54),
    (35, "tq2_0", 256, 66),
    (39, "mxfp4", 32, 17),
    (40, "nvfp4", 64, 36),
    (41, "q1_0", 128, 18),
    (42, "q2_0", 64, 18),
];

impl GgmlTypeInfo {
    pub fn from_id(id: u32) -> Option<GgmlTypeInfo> {
        if let Some(t) = QuantType::from_ggml_id(id) {
            return Some(GgmlTypeInfo {
                id,
                name: t.name(),
                block_size: t.block_size() as u64,
                type_size: t.type_size() as u64,
            });
        }
        OTHER_TYPES
            .iter()
            .find(|(i, ..)| *i == id)
            .map(|&(id, name, block_size, type_size)| GgmlTypeInfo {
                id,
                name,
                block_size,
                type_size,
            })
    }

    /// The same type in the quant crate, when it is one of ours.
    pub fn quant_type(&self) -> Option<QuantType> {
        QuantType::from_ggml_id(self.id)
    }
}

/// One tensor's description, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    pub ty: GgmlTypeInfo,
    /// Absolute offset of the data in the file.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A validated GGUF file, memory-mapped.
#[derive(Debug)]
pub struct GgufReader {
    path: PathBuf,
    map: Mmap,
    version: u32,
    kvs: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
}

struct Cursor<'a> {
    path: &'a Path,
    buf: &'a [u8],
    pos: u64,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        let len = self.buf.len() as u64;
        match self.pos.checked_add(n) {
            Some(end) if end <= len => {
                let s = &self.buf[self.pos as usize..end as usize];
                self.pos = end;
                Ok(s)
            }
            _ => Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what(),
                offset: self.pos,
                len,
            }),
        }
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let n = self.u64(what)?;
        if n > MAX_STRING {
            return Err(self.invalid(format!("{} has a string length of {n} bytes", what())));
        }
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.invalid(format!("{} is not valid UTF-8", what())))
    }

    fn invalid(&self, what: String) -> GgufError {
        GgufError::Invalid {
            path: self.path.to_path_buf(),
            what,
        }
    }

    fn value(&mut self, ty: ValueType, what: &dyn Fn() -> String) -> Result<Value, GgufError> {
        if let Some(size) = ty.scalar_size() {
            let b = self.take(size as u64, what)?;
            return Ok(match ty {
                ValueType::U8 => Value::U8(b[0]),
                ValueType::I8 => Value::I8(b[0] as i8),
                ValueType::Bool => match b[0] {
                    0 | 1 => Value::Bool(b[0] == 1),
                    v => return Err(self.invalid(format!("{} is a bool of value {v}", what()))),
                },
                ValueType::U16 => Value::U16(u16::from_le_bytes([b[0], b[1]])),
                ValueType::I16 => Value::I16(i16::from_le_bytes([b[0], b[1]])),
                ValueType::U32 => Value::U32(u32::from_le_bytes(b.try_into().expect("4"))),
                ValueType::I32 => Value::I32(i32::from_le_bytes(b.try_into().expect("4"))),
                ValueType::F32 => Value::F32(f32::from_le_bytes(b.try_into().expect("4"))),
                ValueType::U64 => Value::U64(u64::from_le_bytes(b.try_into().expect("8"))),
                ValueType::I64 => Value::I64(i64::from_le_bytes(b.try_into().expect("8"))),
                ValueType::F64 => Value::F64(f64::from_le_bytes(b.try_into().expect("8"))),
                ValueType::String | ValueType::Array => unreachable!("not scalars"),
            });
        }
        match ty {
            ValueType::String => Ok(Value::String(self.string(what)?)),
            ValueType::Array => Ok(Value::Array(self.array(what)?)),
            _ => unreachable!("scalars handled above"),
        }
    }

    /// An array, kept typed: its elements cost what they take in the file (a string array, the
    /// text plus one `usize` per string where the file has a `u64` length).
    fn array(&mut self, what: &dyn Fn() -> String) -> Result<Array, GgufError> {
        let elem_id = self.u32(what)?;
        let elem = ValueType::from_id(elem_id).ok_or_else(|| {
            self.invalid(format!("{} has an unknown element type {elem_id}", what()))
        })?;
        let count = self.u64(what)?;
        // Every element takes at least its scalar size (a string or array, its 8-byte length):
        // a count larger than what is left is a lie.
        let left = self.buf.len() as u64 - self.pos;
        let min_elem = elem.scalar_size().unwrap_or(8) as u64;
        if count.saturating_mul(min_elem) > left {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: format!("{} (an array of {count} elements)", what()),
                offset: self.pos,
                len: self.buf.len() as u64,
            });
        }
        // Fits in memory: `count` elements of at least one byte each are in the file.
        let n = count as usize;
        let Some(size) = elem.scalar_size() else {
            return match elem {
                ValueType::String => Ok(Array::String(self.strings(n, what)?)),
                _ => Err(self.invalid(format!(
                    "{} is an array of arrays, which GGUF readers (llama.cpp's included) refuse",
                    what()
                ))),
            };
        };
        let b = self.take(count * size as u64, what)?;
        macro_rules! le {
            ($t:ty, $variant:ident) => {
                Array::$variant(
                    b.chunks_exact(std::mem::size_of::<$t>())
                        .map(|c| <$t>::from_le_bytes(c.try_into().expect("element size")))
                        .collect(),
                )
            };
        }
        Ok(match elem {
            ValueType::U8 => Array::U8(b.to_vec()),
            ValueType::I8 => Array::I8(b.iter().map(|&x| x as i8).collect()),
            ValueType::Bool => {
                if let Some(i) = b.iter().position(|&x| x > 1) {
                    return Err(self.invalid(format!(
                        "{} holds a bool of value {} at index {i}",
                        what(),
                        b[i]
                    )));
                }
                Array::Bool(b.iter().map(|&x| x == 1).collect())
            }
            ValueType::U16 => le!(u16, U16),
            ValueType::I16 => le!(i16, I16),
            ValueType::U32 => le!(u32, U32),
            ValueType::I32 => le!(i32, I32),
            ValueType::F32 => le!(f32, F32),
            ValueType::U64 => le!(u64, U64),
            ValueType::I64 => le!(i64, I64),
            ValueType::F64 => le!(f64, F64),
            ValueType::String | ValueType::Array => unreachable!("not scalars"),
        })
    }

    /// `n` strings, into one buffer sized by a first pass over their lengths.
    fn strings(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<Strings, GgufError> {
        let start = self.pos;
        let mut text_len = 0u64;
        for _ in 0..n {
            let len = self.u64(what)?;
            if len > MAX_STRING {
                return Err(self.invalid(format!("{} has a string length of {len} bytes", what())));
            }
            self.take(len, what)?;
            text_len += len;
        }
        self.pos = start;
        // Both fit: the text and the lengths are in the file.
        let mut out = Strings::with_capacity(n, text_len as usize);
        for i in 0..n {
            let len = self.u64(what)?;
            let bytes = self.take(len, what)?;
            let s = std::str::from_utf8(bytes)
                .map_err(|_| self.invalid(format!("{}: string {i} is not valid UTF-8", what())))?;
            out.push(s);
        }
        Ok(out)
    }
}

/// The first item (in file order) whose name an earlier item already has, found by sorting
/// indices (8 bytes each) rather than building a set of copies of the names.
fn first_duplicate<T>(items: &[T], name: impl Fn(&T) -> &str) -> Option<&T> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_unstable_by(|&a, &b| name(&items[a]).cmp(name(&items[b])).then(a.cmp(&b)));
    order
        .windows(2)
        .filter(|w| name(&items[w[0]]) == name(&items[w[1]]))
        .map(|w| w[1])
        .min()
        .map(|i| &items[i])
}

impl GgufReader {
    /// Opens and validates a GGUF file.
    pub fn open(path: &Path) -> Result<GgufReader, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a file changed under us by another process can at worst
        // give wrong bytes, which the validation below or the consumer rejects, as with read(2).
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, map)
    }

    fn parse(path: &Path, map: Mmap) -> Result<GgufReader, GgufError> {
        let mut c = Cursor {
            path,
            buf: &map,
            pos: 0,
        };
        let magic = c
            .take(4, &|| "the magic number".into())
            .map_err(|_| GgufError::BadMagic { path: path.into() })?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic { path: path.into() });
        }
        let version = c.u32(&|| "the version".into())?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::BadVersion {
                path: path.into(),
                version,
            });
        }
        let n_tensors = c.u64(&|| "the tensor count".into())?;
        let n_kv = c.u64(&|| "the metadata count".into())?;
        let len = map.len() as u64;
        // Each metadata pair takes at least 8+4 bytes, each tensor info at least 8+4+8+4+8.
        if n_kv.saturating_mul(12) > len || n_tensors.saturating_mul(32) > len {
            return Err(c.invalid(format!("it claims {n_kv} metadata pairs and {n_tensors} tensors, more than {len} bytes can hold")));
        }

        let mut kvs: Vec<(String, Value)> = Vec::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let key = c.string(&|| format!("the key of metadata pair {i}"))?;
            if key.is_empty() {
                return Err(c.invalid(format!("metadata pair {i} has an empty key")));
            }
            let what = || format!("metadata value '{key}'");
            let ty_id = c.u32(&what)?;
            let ty = ValueType::from_id(ty_id).ok_or_else(|| {
                c.invalid(format!("metadata '{key}' has an unknown type id {ty_id}"))
            })?;
            let value = c.value(ty, &what)?;
            kvs.push((key, value));
        }
        if let Some((key, _)) = first_duplicate(&kvs, |(k, _)| k) {
            return Err(c.invalid(format!("metadata key '{key}' appears twice")));
        }

        let alignment = match kvs.iter().find(|(k, _)| k == keys::GENERAL_ALIGNMENT) {
            None => DEFAULT_ALIGNMENT,
            Some((_, Value::U32(a))) if *a > 0 && a.is_power_of_two() => u64::from(*a),
            Some((_, v)) => {
                return Err(c.invalid(format!(
                    "general.alignment is {v:?}, not a power of two u32"
                )))
            }
        };

        let mut raw = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(&|| format!("the name of tensor {i}"))?;
            if name.len() as u64 > MAX_NAME {
                return Err(c.invalid(format!(
                    "the name of tensor {i} is {} bytes long; ggml takes at most {MAX_NAME}",
                    name.len()
                )));
            }
            let what = || format!("the info of tensor '{name}'");
            let n_dims = c.u32(&what)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(c.invalid(format!(
                    "tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&what)?);
            }
            let ty_id = c.u32(&what)?;
            let offset = c.u64(&what)?;
            let ty = GgmlTypeInfo::from_id(ty_id).ok_or_else(|| {
                c.invalid(format!("tensor '{name}' has an unknown type id {ty_id}"))
            })?;
            if dims.iter().any(|&d| d == 0 || d > i64::MAX as u64) {
                return Err(c.invalid(format!("tensor '{name}' has an invalid shape {dims:?}")));
            }
            let n_elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let n_elements = n_elements
                .ok_or_else(|| c.invalid(format!("tensor '{name}' shape {dims:?} overflows")))?;
            if dims[0] % ty.block_size != 0 {
                return Err(c.invalid(format!(
                    "tensor '{name}' has rows of {} elements, not a multiple of {}'s block of {}",
                    dims[0], ty.name, ty.block_size
                )));
            }
            let n_bytes = (n_elements / ty.block_size)
                .checked_mul(ty.type_size)
                .ok_or_else(|| c.invalid(format!("tensor '{name}' is too large")))?;
            if offset % alignment != 0 {
                return Err(c.invalid(format!(
                    "tensor '{name}' starts at offset {offset}, not a multiple of {alignment}"
                )));
            }
            raw.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                n_bytes,
            });
        }

        let data_offset = align_up(c.pos, alignment);
        if data_offset > len && n_tensors > 0 {
            return Err(GgufError::Truncated {
                path: path.into(),
                what: "the tensor data".into(),
                offset: data_offset,
                len,
            });
        }
        let mut tensors = raw;
        for t in &mut tensors {
            let start = data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.n_bytes));
            match (start, end) {
                (Some(s), Some(e)) if e <= len => t.offset = s,
                _ => {
                    return Err(GgufError::Truncated {
                        path: path.into(),
                        what: format!("the data of tensor '{}' ({} bytes)", t.name, t.n_bytes),
                        offset: start.unwrap_or(u64::MAX),
                        len,
                    })
                }
            }
        }
        if let Some(t) = first_duplicate(&tensors, |t| &t.name) {
            return Err(c.invalid(format!("tensor '{}' appears twice", t.name)));
        }
        check_layout(path, &tensors, alignment, data_offset)?;
        Ok(GgufReader {
            path: path.to_path_buf(),
            map,
            version,
            kvs,
            tensors,
            alignment,
            data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    pub fn metadata(&self) -> &[(String, Value)] {
        &self.kvs
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kvs.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn architecture(&self) -> Option<&str> {
        self.get(keys::GENERAL_ARCHITECTURE).and_then(Value::as_str)
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of a tensor (bounds were checked when the file was opened).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.offset as usize..(t.offset + t.n_bytes) as usize]
    }

    /// Total bytes of tensor data.
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.n_bytes).sum()
    }
}

/// Tensor data must follow one another in the order of the tensor infos, each padded to the
/// alignment: what llama.cpp's `gguf_init_from_file` requires (its data section is the padded
/// sizes added up). A gap, an overlap or a tensor out of order is refused, naming the tensors.
/// The last tensor's padding may be missing (older writers left it out; llama.cpp maps the file
/// and does not read it).
fn check_layout(
    path: &Path,
    tensors: &[TensorInfo],
    alignment: u64,
    data_offset: u64,
) -> Result<(), GgufError> {
    let invalid = |what: String| GgufError::Invalid {
        path: path.into(),
        what,
    };
    // Overlaps first, in offset order, so that two tensors sharing bytes are named as such
    // whatever order they are listed in.
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
    by_offset.sort_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        // Both ends were checked against the file length: no overflow.
        if pair[0].offset + pair[0].n_bytes > pair[1].offset {
            return Err(invalid(format!(
                "the data of tensors '{}' and '{}' overlap",
                pair[0].name, pair[1].name
            )));
        }
    }
    for pair in tensors.windows(2) {
        let (p, t) = (&pair[0], &pair[1]);
        if t.offset < p.offset {
            return Err(invalid(format!(
                "tensor '{}' is out of order: its data (at byte {}) comes before that of '{}' (at byte {}), which is listed before it",
                t.name, t.offset, p.name, p.offset
            )));
        }
    }
    let mut expected = data_offset;
    let mut previous: Option<&TensorInfo> = None;
    for t in tensors {
        if t.offset != expected {
            let gap = t.offset - expected;
            return Err(invalid(match previous {
                Some(p) => format!(
                    "{gap} bytes lie between the data of tensors '{}' and '{}' (at byte {expected}): tensor data must follow one another",
                    p.name, t.name
                ),
                None => format!(
                    "{gap} bytes lie between the start of the data section (byte {data_offset}) and tensor '{}': tensor data must follow one another",
                    t.name
                ),
            }));
        }
        expected = align_up(t.offset + t.n_bytes, alignment);
        previous = Some(t);
    }
    Ok(())
}

/// Parses GGUF bytes already in memory (used by the fuzz target and tests).
pub fn validate_bytes(bytes: &[u8]) -> Result<(), GgufError> {
    let mut anon =
        memmap2::MmapMut::map_anon(bytes.len().max(1)).map_err(|source| GgufError::Io {
            path: "<memory>".into(),
            source,
        })?;
    anon[..bytes.len()].copy_from_slice(bytes);
    let map = anon.make_read_only().map_err(|source| GgufError::Io {
        path: "<memory>".into(),
        source,
    })?;
    let map_len = bytes.len();
    // An empty input still maps one page: parse only the bytes given.
    if map_len == 0 {
        return Err(GgufError::BadMagic {
            path: "<memory>".into(),
        });
    }
    GgufReader::parse(Path::new("<memory>"), map).map(|_| ())
}
