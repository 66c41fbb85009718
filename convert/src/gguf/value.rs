//! Metadata values and their GGUF type ids.
//!
//! Arrays are typed: one `Vec` per element type, and string arrays as one buffer of text with
//! the end of each string, so that an array costs about what it takes in the file (a `Value`
//! per element would cost 32 bytes for each one-byte element).

use std::io::{self, Write};

use byteorder::{WriteBytesExt, LE};

/// GGUF metadata value type ids (`gguf_type` in ggml).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    pub fn from_id(id: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Size in bytes of a scalar of this type; `None` for strings and arrays.
    pub fn scalar_size(self) -> Option<usize> {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            String | Array => None,
        }
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// An array of scalars or strings (GGUF readers, llama.cpp's included, refuse arrays of
    /// arrays).
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// Strings stored back to back: the text of all of them and where each ends.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Strings {
    text: String,
    ends: Vec<usize>,
}

impl Strings {
    pub fn new() -> Strings {
        Strings::default()
    }

    /// Room for `n` strings of `bytes` bytes in all.
    pub fn with_capacity(n: usize, bytes: usize) -> Strings {
        Strings {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(n),
        }
    }

    pub fn push(&mut self, s: &str) {
        self.text.push_str(s);
        self.ends.push(self.text.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The `i`-th string.
    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.text[start..end])
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i).expect("in range"))
    }

    /// Bytes of text in all the strings.
    pub fn text_len(&self) -> usize {
        self.text.len()
    }
}

impl std::fmt::Debug for Strings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<S: AsRef<str>> FromIterator<S> for Strings {
    fn from_iter<I: IntoIterator<Item = S>>(items: I) -> Strings {
        let mut s = Strings::new();
        for item in items {
            s.push(item.as_ref());
        }
        s
    }
}

/// A metadata array: its elements in one `Vec` of their type.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Strings),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

/// Runs `$body` with `$v` bound to the `Vec` of whichever numeric variant `$a` is, or `$s` for
/// strings.
macro_rules! each_array {
    ($a:expr, $v:ident => $body:expr, $s:ident => $strings:expr) => {
        match $a {
            Array::U8($v) => $body,
            Array::I8($v) => $body,
            Array::U16($v) => $body,
            Array::I16($v) => $body,
            Array::U32($v) => $body,
            Array::I32($v) => $body,
            Array::F32($v) => $body,
            Array::Bool($v) => $body,
            Array::U64($v) => $body,
            Array::I64($v) => $body,
            Array::F64($v) => $body,
            Array::String($s) => $strings,
        }
    };
}

impl Array {
    /// An empty array of `ty`; `None` for arrays of arrays.
    pub fn empty(ty: ValueType) -> Option<Array> {
        Some(match ty {
            ValueType::U8 => Array::U8(Vec::new()),
            ValueType::I8 => Array::I8(Vec::new()),
            ValueType::U16 => Array::U16(Vec::new()),
            ValueType::I16 => Array::I16(Vec::new()),
            ValueType::U32 => Array::U32(Vec::new()),
            ValueType::I32 => Array::I32(Vec::new()),
            ValueType::F32 => Array::F32(Vec::new()),
            ValueType::Bool => Array::Bool(Vec::new()),
            ValueType::String => Array::String(Strings::new()),
            ValueType::U64 => Array::U64(Vec::new()),
            ValueType::I64 => Array::I64(Vec::new()),
            ValueType::F64 => Array::F64(Vec::new()),
            ValueType::Array => return None,
        })
    }

    /// The type of the elements.
    pub fn element_type(&self) -> ValueType {
        match self {
            Array::U8(_) => ValueType::U8,
            Array::I8(_) => ValueType::I8,
            Array::U16(_) => ValueType::U16,
            Array::I16(_) => ValueType::I16,
            Array::U32(_) => ValueType::U32,
            Array::I32(_) => ValueType::I32,
            Array::F32(_) => ValueType::F32,
            Array::Bool(_) => ValueType::Bool,
            Array::String(_) => ValueType::String,
            Array::U64(_) => ValueType::U64,
            Array::I64(_) => ValueType::I64,
            Array::F64(_) => ValueType::F64,
        }
    }

    pub fn len(&self) -> usize {
        each_array!(self, v => v.len(), s => s.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The strings of a string array.
    pub fn as_strings(&self) -> Option<&Strings> {
        match self {
            Array::String(s) => Some(s),
            _ => None,
        }
    }

    /// Element `i` as a [`Value`] (strings are copied).
    pub fn get(&self, i: usize) -> Option<Value> {
        Some(match self {
            Array::U8(v) => Value::U8(*v.get(i)?),
            Array::I8(v) => Value::I8(*v.get(i)?),
            Array::U16(v) => Value::U16(*v.get(i)?),
            Array::I16(v) => Value::I16(*v.get(i)?),
            Array::U32(v) => Value::U32(*v.get(i)?),
            Array::I32(v) => Value::I32(*v.get(i)?),
            Array::F32(v) => Value::F32(*v.get(i)?),
            Array::Bool(v) => Value::Bool(*v.get(i)?),
            Array::String(s) => Value::String(s.get(i)?.to_string()),
            Array::U64(v) => Value::U64(*v.get(i)?),
            Array::I64(v) => Value::I64(*v.get(i)?),
            Array::F64(v) => Value::F64(*v.get(i)?),
        })
    }

    /// Bytes of the payload: element type, count, elements.
    fn encoded_len(&self) -> u64 {
        let elements = match self {
            Array::String(s) => 8 * s.len() as u64 + s.text_len() as u64,
            a => {
                a.len() as u64
                    * a.element_type()
                        .scalar_size()
                        .expect("numeric arrays have scalar elements") as u64
            }
        };
        4 + 8 + elements
    }

    fn write_payload<W: Write>(&self, w: &mut W) -> io::Result<()> {
        w.write_u32::<LE>(self.element_type() as u32)?;
        w.write_u64::<LE>(self.len() as u64)?;
        match self {
            Array::U8(v) => w.write_all(v),
            Array::I8(v) => v.iter().try_for_each(|x| w.write_i8(*x)),
            Array::U16(v) => v.iter().try_for_each(|x| w.write_u16::<LE>(*x)),
            Array::I16(v) => v.iter().try_for_each(|x| w.write_i16::<LE>(*x)),
            Array::U32(v) => v.iter().try_for_each(|x| w.write_u32::<LE>(*x)),
            Array::I32(v) => v.iter().try_for_each(|x| w.write_i32::<LE>(*x)),
            Array::F32(v) => v.iter().try_for_each(|x| w.write_f32::<LE>(*x)),
            Array::Bool(v) => v.iter().try_for_each(|x| w.write_u8(u8::from(*x))),
            Array::String(s) => s.iter().try_for_each(|x| write_string(w, x)),
            Array::U64(v) => v.iter().try_for_each(|x| w.write_u64::<LE>(*x)),
            Array::I64(v) => v.iter().try_for_each(|x| w.write_i64::<LE>(*x)),
            Array::F64(v) => v.iter().try_for_each(|x| w.write_f64::<LE>(*x)),
        }
    }
}

macro_rules! from_vec {
    ($($t:ty => $variant:ident),*) => {$(
        impl From<Vec<$t>> for Array {
            fn from(v: Vec<$t>) -> Array {
                Array::$variant(v)
            }
        }
        impl From<Vec<$t>> for Value {
            fn from(v: Vec<$t>) -> Value {
                Value::Array(Array::$variant(v))
            }
        }
    )*};
}

from_vec!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32,
    bool => Bool, u64 => U64, i64 => I64, f64 => F64);

impl From<Strings> for Value {
    fn from(s: Strings) -> Value {
        Value::Array(Array::String(s))
    }
}

impl From<Array> for Value {
    fn from(a: Array) -> Value {
        Value::Array(a)
    }
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// An array of strings.
    pub fn strings<S: AsRef<str>, I: IntoIterator<Item = S>>(items: I) -> Value {
        Value::Array(Array::String(items.into_iter().collect()))
    }

    /// An array of i32.
    pub fn i32s<I: IntoIterator<Item = i32>>(items: I) -> Value {
        Value::Array(Array::I32(items.into_iter().collect()))
    }

    /// The value as an unsigned integer, whatever its integer width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// Number of bytes `write_payload` writes.
    pub(crate) fn encoded_len(&self) -> u64 {
        match self {
            Value::String(s) => 8 + s.len() as u64,
            Value::Array(a) => a.encoded_len(),
            v => v.value_type().scalar_size().unwrap_or(0) as u64,
        }
    }

    /// Writes the value without its leading type id.
    pub(crate) fn write_payload<W: Write>(&self, w: &mut W) -> io::Result<()> {
        match self {
            Value::U8(v) => w.write_u8(*v),
            Value::I8(v) => w.write_i8(*v),
            Value::U16(v) => w.write_u16::<LE>(*v),
            Value::I16(v) => w.write_i16::<LE>(*v),
            Value::U32(v) => w.write_u32::<LE>(*v),
            Value::I32(v) => w.write_i32::<LE>(*v),
            Value::F32(v) => w.write_f32::<LE>(*v),
            Value::Bool(v) => w.write_u8(u8::from(*v)),
            Value::String(s) => write_string(w, s),
            Value::Array(a) => a.write_payload(w),
            Value::U64(v) => w.write_u64::<LE>(*v),
            Value::I64(v) => w.write_i64::<LE>(*v),
            Value::F64(v) => w.write_f64::<LE>(*v),
        }
    }
}

pub(crate) fn write_string<W: Write>(w: &mut W, s: &str) -> io::Result<()> {
    w.write_u64::<LE>(s.len() as u64)?;
    w.write_all(s.as_bytes())
}
