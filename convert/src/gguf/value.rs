//! Metadata values and their GGUF type ids.

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
    /// An array whose elements all have the given type (nested arrays are not used by GGUF tools).
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
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
    pub fn strings<I: IntoIterator<Item = String>>(items: I) -> Value {
        Value::Array(
            ValueType::String,
            items.into_iter().map(Value::String).collect(),
        )
    }

    /// An array of i32.
    pub fn i32s<I: IntoIterator<Item = i32>>(items: I) -> Value {
        Value::Array(ValueType::I32, items.into_iter().map(Value::I32).collect())
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

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, items) => Some(items),
            _ => None,
        }
    }

    /// Number of bytes `write_payload` writes.
    pub(crate) fn encoded_len(&self) -> u64 {
        match self {
            Value::String(s) => 8 + s.len() as u64,
            Value::Array(_, items) => 4 + 8 + items.iter().map(Value::encoded_len).sum::<u64>(),
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
            Value::Array(ty, items) => {
                w.write_u32::<LE>(*ty as u32)?;
                w.write_u64::<LE>(items.len() as u64)?;
                for item in items {
                    debug_assert_eq!(item.value_type(), *ty, "mixed GGUF array");
                    item.write_payload(w)?;
                }
                Ok(())
            }
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
