//! Two-phase GGUF writer: plan the whole layout first, then stream the tensor bytes.

use std::io::{self, Write};

use byteorder::{WriteBytesExt, LE};
use quant::QuantType;

use super::value::{write_string, Value};
use super::{align_up, DEFAULT_ALIGNMENT, MAGIC, VERSION};

/// A tensor as it will be written: name, dims in ggml order (`dims[0]` is the row length) and type.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: QuantType,
}

impl PlannedTensor {
    /// Bytes of this tensor's data.
    pub fn n_bytes(&self) -> u64 {
        let rows: u64 = self.dims[1..].iter().product();
        let row = self
            .ty
            .row_bytes(self.dims[0] as usize)
            .expect("row length checked when planned");
        row as u64 * rows
    }
}

/// The complete layout of a GGUF file: metadata, tensor infos, offsets.
#[derive(Clone, Debug)]
pub struct GgufPlan {
    pub kvs: Vec<(String, Value)>,
    pub tensors: Vec<PlannedTensor>,
    alignment: u64,
}

impl Default for GgufPlan {
    fn default() -> Self {
        GgufPlan {
            kvs: Vec::new(),
            tensors: Vec::new(),
            alignment: DEFAULT_ALIGNMENT,
        }
    }
}

impl GgufPlan {
    pub fn new() -> GgufPlan {
        GgufPlan::default()
    }

    /// Adds (or replaces) a metadata value.
    pub fn set(&mut self, key: &str, value: Value) {
        match self.kvs.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.kvs.push((key.to_string(), value)),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kvs.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn add_tensor(&mut self, tensor: PlannedTensor) {
        self.tensors.push(tensor);
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Size of everything before the tensor data, padding included.
    pub fn header_len(&self) -> u64 {
        let mut n = 4 + 4 + 8 + 8;
        for (k, v) in &self.kvs {
            n += 8 + k.len() as u64 + 4 + v.encoded_len();
        }
        for t in &self.tensors {
            n += 8 + t.name.len() as u64 + 4 + 8 * t.dims.len() as u64 + 4 + 8;
        }
        align_up(n, self.alignment)
    }

    /// Offset of each tensor's data relative to the start of the data section.
    pub fn offsets(&self) -> Vec<u64> {
        let mut offset = 0;
        self.tensors
            .iter()
            .map(|t| {
                let this = offset;
                offset = align_up(offset + t.n_bytes(), self.alignment);
                this
            })
            .collect()
    }

    /// Size of the whole file: the header, then every tensor padded to the alignment, the last
    /// one included (as llama.cpp's writers do).
    pub fn file_len(&self) -> u64 {
        let data: u64 = match self.tensors.last() {
            Some(last) => align_up(
                self.offsets().last().copied().unwrap_or(0) + last.n_bytes(),
                self.alignment,
            ),
            None => 0,
        };
        self.header_len() + data
    }

    fn write_header<W: Write>(&self, w: &mut W) -> io::Result<u64> {
        let mut header = Vec::with_capacity(self.header_len() as usize);
        header.write_all(&MAGIC)?;
        header.write_u32::<LE>(VERSION)?;
        header.write_u64::<LE>(self.tensors.len() as u64)?;
        header.write_u64::<LE>(self.kvs.len() as u64)?;
        for (k, v) in &self.kvs {
            write_string(&mut header, k)?;
            header.write_u32::<LE>(v.value_type() as u32)?;
            v.write_payload(&mut header)?;
        }
        for (t, offset) in self.tensors.iter().zip(self.offsets()) {
            write_string(&mut header, &t.name)?;
            header.write_u32::<LE>(t.dims.len() as u32)?;
            for &d in &t.dims {
                header.write_u64::<LE>(d)?;
            }
            header.write_u32::<LE>(t.ty.ggml_id())?;
            header.write_u64::<LE>(offset)?;
        }
        header.resize(align_up(header.len() as u64, self.alignment) as usize, 0);
        w.write_all(&header)?;
        Ok(header.len() as u64)
    }
}

/// Streams tensor data, in plan order, after the planned header.
#[derive(Debug)]
pub struct GgufWriter<W: Write> {
    out: W,
    plan: GgufPlan,
    /// Index of the tensor being written.
    current: usize,
    /// Bytes of the current tensor still to come.
    remaining: u64,
    written: u64,
}

impl<W: Write> GgufWriter<W> {
    /// Writes the header of `plan` and gets ready for the first tensor's bytes.
    pub fn new(mut out: W, plan: GgufPlan) -> io::Result<GgufWriter<W>> {
        let written = plan.write_header(&mut out)?;
        let remaining = plan.tensors.first().map_or(0, PlannedTensor::n_bytes);
        Ok(GgufWriter {
            out,
            plan,
            current: 0,
            remaining,
            written,
        })
    }

    pub fn plan(&self) -> &GgufPlan {
        &self.plan
    }

    /// Appends bytes of the current tensor; pads it to the alignment and moves to the next tensor
    /// when it is complete. Bytes beyond the current tensor are an error: each call feeds one
    /// tensor.
    pub fn write_tensor_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.len() as u64 > self.remaining {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "tensor {} got {} more bytes than planned",
                    self.plan.tensors.get(self.current).map_or("?", |t| &t.name),
                    bytes.len() as u64 - self.remaining
                ),
            ));
        }
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        self.remaining -= bytes.len() as u64;
        while self.remaining == 0 && self.current < self.plan.tensors.len() {
            let pad = align_up(self.written, self.plan.alignment) - self.written;
            self.out.write_all(&vec![0u8; pad as usize])?;
            self.written += pad;
            self.current += 1;
            if let Some(next) = self.plan.tensors.get(self.current) {
                self.remaining = next.n_bytes();
            }
        }
        Ok(())
    }

    /// Checks that every planned byte was written and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        if self.current < self.plan.tensors.len() {
            return Err(io::Error::other(format!(
                "tensor {} is missing {} bytes",
                self.plan.tensors[self.current].name, self.remaining
            )));
        }
        self.out.flush()?;
        debug_assert_eq!(self.written, self.plan.file_len());
        Ok(self.out)
    }
}
