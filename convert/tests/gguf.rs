//! The GGUF writer and reader through their public API: a write → read round trip, the writer's
//! refusals, one test per way the reader refuses a hostile file, and the reader's table of ggml
//! types checked against ggml itself.

use std::path::Path;

use byteorder::{WriteBytesExt, LE};
use convert::gguf::{
    keys, validate_bytes, Array, GgmlTypeInfo, GgufError, GgufPlan, GgufReader, GgufWriter,
    PlannedTensor, Strings, Value, ValueType, DEFAULT_ALIGNMENT,
};
use quant::QuantType;

// ---------------------------------------------------------------------------------------------
// Helpers

/// Deterministic bytes that differ from tensor to tensor (a 64-bit LCG; the reader does not
/// look inside tensor data, so any bytes do).
fn pattern(seed: u64, n: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 56) as u8
        })
        .collect()
}

fn tensor(name: &str, dims: &[u64], ty: QuantType) -> PlannedTensor {
    PlannedTensor {
        name: name.into(),
        dims: dims.to_vec(),
        ty,
    }
}

/// Writes `plan` into memory, feeding each tensor's `data` in chunks of 1, 7, 64, 3, 250, ...
/// bytes (never crossing a tensor boundary, as the writer requires).
fn write_in_chunks(plan: &GgufPlan, data: &[Vec<u8>]) -> Vec<u8> {
    const CHUNKS: [usize; 6] = [1, 7, 64, 3, 250, 33];
    let mut w = GgufWriter::new(Vec::new(), plan.clone()).unwrap();
    let mut k = 0;
    for bytes in data {
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let n = CHUNKS[k % CHUNKS.len()].min(rest.len());
            k += 1;
            w.write_tensor_bytes(&rest[..n]).unwrap();
            rest = &rest[n..];
        }
    }
    w.finish().unwrap()
}

/// Every metadata value type, arrays included.
fn all_value_types() -> Vec<(String, Value)> {
    vec![
        ("t.u8".into(), Value::U8(0xAB)),
        ("t.i8".into(), Value::I8(-128)),
        ("t.u16".into(), Value::U16(0xBEEF)),
        ("t.i16".into(), Value::I16(-12345)),
        ("t.u32".into(), Value::U32(0xDEAD_BEEF)),
        ("t.i32".into(), Value::I32(i32::MIN)),
        ("t.f32".into(), Value::F32(-1.5e-7)),
        ("t.bool_true".into(), Value::Bool(true)),
        ("t.bool_false".into(), Value::Bool(false)),
        (
            "t.string".into(),
            Value::String("Falcon — ünïcödé 🦅".into()),
        ),
        ("t.empty_string".into(), Value::String(String::new())),
        ("t.u64".into(), Value::U64(u64::MAX - 1)),
        ("t.i64".into(), Value::I64(i64::MIN + 7)),
        ("t.f64".into(), Value::F64(std::f64::consts::PI)),
        (
            "t.strings".into(),
            Value::strings(["<|endoftext|>", "", "Ġthe", "日本"].map(String::from)),
        ),
        ("t.i32s".into(), Value::i32s([0, -1, i32::MAX, 42])),
        ("t.empty_array".into(), Value::from(Vec::<u8>::new())),
        ("t.empty_strings".into(), Value::from(Strings::new())),
        ("t.f32s".into(), Value::from(vec![0.5f32, -0.0])),
        ("t.bools".into(), Value::from(vec![false, true])),
        ("t.u8s".into(), Value::from(vec![0u8, 1, 255])),
        ("t.i8s".into(), Value::from(vec![i8::MIN, -1, 7])),
        ("t.u16s".into(), Value::from(vec![0xBEEFu16, 1])),
        ("t.i16s".into(), Value::from(vec![i16::MIN, 2])),
        ("t.u32s".into(), Value::from(vec![u32::MAX, 3])),
        ("t.u64s".into(), Value::from(vec![u64::MAX, 4])),
        ("t.i64s".into(), Value::from(vec![i64::MIN, 5])),
        ("t.f64s".into(), Value::from(vec![f64::MIN_POSITIVE, -6.5])),
    ]
}

/// A plan with every value type and tensors of several types and ranks.
fn rich_plan() -> GgufPlan {
    let mut plan = GgufPlan::new();
    plan.set(
        keys::GENERAL_ARCHITECTURE,
        Value::String(keys::ARCH_FALCON.into()),
    );
    for (k, v) in all_value_types() {
        plan.set(&k, v);
    }
    // Sizes chosen so that most tensors end off the alignment and need padding.
    plan.add_tensor(tensor("a.f32", &[7], QuantType::F32));
    plan.add_tensor(tensor("b.f16", &[5, 3], QuantType::F16));
    plan.add_tensor(tensor("c.q8_0", &[64, 2, 3], QuantType::Q8_0));
    plan.add_tensor(tensor("d.q4_k", &[256, 3], QuantType::Q4_K));
    plan.add_tensor(tensor("e.bf16", &[3, 1, 2], QuantType::BF16));
    plan.add_tensor(tensor("f.q6_k", &[512], QuantType::Q6_K));
    plan.add_tensor(tensor("g.q4_0", &[32, 1, 1, 5], QuantType::Q4_0));
    plan
}

fn plan_data(plan: &GgufPlan) -> Vec<Vec<u8>> {
    plan.tensors
        .iter()
        .enumerate()
        .map(|(i, t)| pattern(i as u64 + 1, t.n_bytes()))
        .collect()
}

/// A small valid file with one metadata pair and two tensors.
fn small_file() -> Vec<u8> {
    let mut plan = GgufPlan::new();
    plan.set(keys::GENERAL_ARCHITECTURE, Value::String("falcon".into()));
    plan.set("t.tokens", Value::strings(["a", "bc"].map(String::from)));
    plan.add_tensor(tensor("x", &[3], QuantType::F32));
    plan.add_tensor(tensor("y", &[32, 2], QuantType::Q8_0));
    let data = plan_data(&plan);
    write_in_chunks(&plan, &data)
}

/// Hand-built GGUF bytes, for headers the writer would never produce.
struct Raw(Vec<u8>);

impl Raw {
    fn new(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        let mut b = b"GGUF".to_vec();
        b.write_u32::<LE>(version).unwrap();
        b.write_u64::<LE>(n_tensors).unwrap();
        b.write_u64::<LE>(n_kv).unwrap();
        Raw(b)
    }

    fn v3(n_tensors: u64, n_kv: u64) -> Raw {
        Raw::new(3, n_tensors, n_kv)
    }

    fn u32(mut self, v: u32) -> Raw {
        self.0.write_u32::<LE>(v).unwrap();
        self
    }

    fn u64(mut self, v: u64) -> Raw {
        self.0.write_u64::<LE>(v).unwrap();
        self
    }

    fn bytes(mut self, b: &[u8]) -> Raw {
        self.0.extend_from_slice(b);
        self
    }

    fn string(self, s: &str) -> Raw {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }

    /// A metadata pair of type u32.
    fn kv_u32(self, key: &str, v: u32) -> Raw {
        self.string(key).u32(ValueType::U32 as u32).u32(v)
    }

    /// A tensor info.
    fn tensor(self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Raw {
        let mut r = self.string(name).u32(dims.len() as u32);
        for &d in dims {
            r = r.u64(d);
        }
        r.u32(ty).u64(offset)
    }

    /// Zero padding up to `align`.
    fn pad_to(mut self, align: usize) -> Raw {
        let n = self.0.len().div_ceil(align) * align;
        self.0.resize(n, 0);
        self
    }

    fn pad(self) -> Raw {
        self.pad_to(DEFAULT_ALIGNMENT as usize)
    }

    /// `n` bytes of tensor data.
    fn data(self, n: usize) -> Raw {
        self.bytes(&vec![0x5A; n])
    }
}

fn write_temp(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut f, bytes).unwrap();
    f
}

/// Checks that both entry points refuse `bytes` and returns the error of the file reader, which
/// names the file.
fn refuse(bytes: &[u8]) -> GgufError {
    let mem = validate_bytes(bytes).expect_err("validate_bytes accepted a hostile file");
    let f = write_temp(bytes);
    let err = GgufReader::open(f.path()).expect_err("GgufReader::open accepted a hostile file");
    // Both paths reach the same verdict.
    assert_eq!(
        std::mem::discriminant(&mem),
        std::mem::discriminant(&err),
        "{mem} vs {err}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&f.path().display().to_string()), "{msg}");
    err
}

/// Asserts `err` is `Invalid` and its message contains every one of `words`.
fn assert_invalid(err: &GgufError, words: &[&str]) {
    assert!(matches!(err, GgufError::Invalid { .. }), "{err:?}");
    let msg = err.to_string();
    for w in words {
        assert!(msg.contains(w), "{msg:?} should mention {w:?}");
    }
}

/// Asserts `err` is `Truncated` and its message contains every one of `words`.
fn assert_truncated(err: &GgufError, words: &[&str]) {
    assert!(matches!(err, GgufError::Truncated { .. }), "{err:?}");
    let msg = err.to_string();
    for w in words {
        assert!(msg.contains(w), "{msg:?} should mention {w:?}");
    }
}

/// Position of the first tensor info in a file written from `plan` (computed from the layout:
/// 24 bytes of fixed header, then each pair as key string, type id and payload).
fn tensor_infos_start(bytes: &[u8]) -> usize {
    let mut pos = 16;
    let n_kv = u64::from_le_bytes(bytes[pos..pos + 8].try_into().unwrap());
    pos += 8;
    for _ in 0..n_kv {
        let klen = u64::from_le_bytes(bytes[pos..pos + 8].try_into().unwrap()) as usize;
        pos += 8 + klen;
        let ty = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap());
        pos += 4;
        pos += value_len(&bytes[pos..], ty);
    }
    pos
}

fn value_len(b: &[u8], ty: u32) -> usize {
    let ty = ValueType::from_id(ty).unwrap();
    if let Some(n) = ty.scalar_size() {
        return n;
    }
    let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap()) as usize;
    match ty {
        ValueType::String => 8 + u64_at(0),
        _ => {
            let elem = u32::from_le_bytes(b[..4].try_into().unwrap());
            let count = u64_at(4);
            let mut pos = 12;
            for _ in 0..count {
                pos += value_len(&b[pos..], elem);
            }
            pos
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Round trip

#[test]
fn round_trip_keeps_every_value_tensor_and_byte() {
    let plan = rich_plan();
    let data = plan_data(&plan);
    let bytes = write_in_chunks(&plan, &data);
    assert_eq!(bytes.len() as u64, plan.file_len());
    validate_bytes(&bytes).unwrap();

    let f = write_temp(&bytes);
    let r = GgufReader::open(f.path()).unwrap();
    assert_eq!(r.path(), f.path());
    assert_eq!(r.version(), 3);
    assert_eq!(r.alignment(), 32);
    assert_eq!(r.data_offset(), plan.header_len());
    assert_eq!(r.data_offset() % 32, 0);

    // Metadata: the same pairs in the same order, bit for bit.
    assert_eq!(r.metadata(), &plan.kvs[..]);
    for (k, v) in &plan.kvs {
        assert_eq!(r.get(k), Some(v), "{k}");
        assert_eq!(r.get(k).unwrap().value_type(), v.value_type());
    }
    assert_eq!(r.architecture(), Some("falcon"));
    assert_eq!(r.get("no.such.key"), None);
    assert_eq!(r.get("t.f32").and_then(Value::as_f32), Some(-1.5e-7));
    assert_eq!(r.get("t.u16").and_then(Value::as_u64), Some(0xBEEF));
    assert_eq!(r.get("t.i8").and_then(Value::as_u64), None);
    assert_eq!(
        r.get("t.i32s").and_then(Value::as_array).map(Array::len),
        Some(4)
    );
    assert_eq!(
        r.get("t.i32s")
            .and_then(Value::as_array)
            .and_then(|a| a.get(2)),
        Some(Value::I32(i32::MAX))
    );
    let strings = r.get("t.strings").and_then(Value::as_array).unwrap();
    assert_eq!(strings.element_type(), ValueType::String);
    assert_eq!(
        strings.as_strings().unwrap().iter().collect::<Vec<_>>(),
        ["<|endoftext|>", "", "Ġthe", "日本"]
    );
    assert_eq!(strings.as_strings().unwrap().get(3), Some("日本"));
    assert_eq!(strings.as_strings().unwrap().get(4), None);
    assert_eq!(
        r.get("t.empty_array").and_then(Value::as_array),
        Some(&Array::U8(vec![]))
    );

    // Tensors: names, shapes, types, aligned offsets and data.
    assert_eq!(r.tensors().len(), plan.tensors.len());
    let offsets = plan.offsets();
    for ((info, planned), (want, rel)) in r
        .tensors()
        .iter()
        .zip(&plan.tensors)
        .zip(data.iter().zip(offsets))
    {
        assert_eq!(info.name, planned.name);
        assert_eq!(info.dims, planned.dims);
        assert_eq!(info.ty.id, planned.ty.ggml_id());
        assert_eq!(info.ty.name, planned.ty.name());
        assert_eq!(info.ty.quant_type(), Some(planned.ty));
        assert_eq!(info.n_bytes, planned.n_bytes());
        assert_eq!(info.n_elements(), planned.dims.iter().product::<u64>());
        assert_eq!(info.offset % 32, 0, "{}", info.name);
        assert_eq!(info.offset, plan.header_len() + rel, "{}", info.name);
        assert_eq!(r.tensor_data(info), &want[..], "{}", info.name);
        assert_eq!(r.tensor(&info.name), Some(info));
    }
    assert_eq!(r.tensor("missing"), None);
    assert_eq!(
        r.tensor_bytes(),
        data.iter().map(|d| d.len() as u64).sum::<u64>()
    );
}

#[test]
fn round_trip_of_metadata_only_and_empty_plans() {
    let mut plan = GgufPlan::new();
    let bytes = write_in_chunks(&plan, &[]);
    assert_eq!(bytes.len() as u64, plan.file_len());
    assert_eq!(bytes.len(), 32, "24 header bytes padded to 32");
    validate_bytes(&bytes).unwrap();

    for (k, v) in all_value_types() {
        plan.set(&k, v);
    }
    let bytes = write_in_chunks(&plan, &[]);
    assert_eq!(bytes.len() as u64, plan.file_len());
    let f = write_temp(&bytes);
    let r = GgufReader::open(f.path()).unwrap();
    assert_eq!(r.metadata(), &plan.kvs[..]);
    assert!(r.tensors().is_empty());
    assert_eq!(r.tensor_bytes(), 0);
}

#[test]
fn plan_set_replaces_a_key_in_place() {
    let mut plan = GgufPlan::new();
    plan.set("a", Value::U32(1));
    plan.set("b", Value::U32(2));
    plan.set("a", Value::String("x".into()));
    assert_eq!(plan.kvs.len(), 2);
    assert_eq!(plan.kvs[0].0, "a");
    assert_eq!(plan.get("a"), Some(&Value::String("x".into())));
}

#[test]
fn reader_accepts_a_larger_power_of_two_alignment() {
    // general.alignment = 64: the data section and every offset are multiples of 64.
    let raw = Raw::v3(2, 1)
        .kv_u32(keys::GENERAL_ALIGNMENT, 64)
        .tensor("a", &[4], QuantType::F32.ggml_id(), 0)
        .tensor("b", &[2], QuantType::F32.ggml_id(), 64)
        .pad_to(64)
        .data(64 + 8);
    let r = validate_bytes(&raw.0);
    assert!(r.is_ok(), "{r:?}");
    let f = write_temp(&raw.0);
    let r = GgufReader::open(f.path()).unwrap();
    assert_eq!(r.alignment(), 64);
    assert_eq!(r.data_offset() % 64, 0);
    assert_eq!(r.tensor("b").unwrap().offset, r.data_offset() + 64);
}

#[test]
fn reader_accepts_version_2() {
    let mut bytes = small_file();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    validate_bytes(&bytes).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Writer refusals

#[test]
fn writer_refuses_more_bytes_than_planned() {
    let mut plan = GgufPlan::new();
    plan.add_tensor(tensor("only", &[7], QuantType::F32));
    let mut w = GgufWriter::new(Vec::new(), plan).unwrap();
    w.write_tensor_bytes(&[0; 20]).unwrap();
    let err = w.write_tensor_bytes(&[0; 9]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    let msg = err.to_string();
    assert!(
        msg.contains("only") && msg.contains("1 more bytes"),
        "{msg}"
    );

    // A call may not run from one tensor into the next.
    let mut plan = GgufPlan::new();
    plan.add_tensor(tensor("first", &[2], QuantType::F32));
    plan.add_tensor(tensor("second", &[2], QuantType::F32));
    let mut w = GgufWriter::new(Vec::new(), plan).unwrap();
    let err = w.write_tensor_bytes(&[0; 16]).unwrap_err();
    assert!(err.to_string().contains("first"), "{err}");

    // Nothing may follow the last tensor.
    w.write_tensor_bytes(&[0; 8]).unwrap();
    w.write_tensor_bytes(&[0; 8]).unwrap();
    assert!(w.write_tensor_bytes(&[0]).is_err());
    let out = w.finish().unwrap();
    assert_eq!(out.len() as u64, {
        let mut p = GgufPlan::new();
        p.add_tensor(tensor("first", &[2], QuantType::F32));
        p.add_tensor(tensor("second", &[2], QuantType::F32));
        p.file_len()
    });
}

#[test]
fn writer_finish_refuses_missing_bytes() {
    let mut plan = GgufPlan::new();
    plan.add_tensor(tensor("a", &[32], QuantType::Q8_0));
    plan.add_tensor(tensor("b", &[4], QuantType::F16));

    // Part of the first tensor.
    let mut w = GgufWriter::new(Vec::new(), plan.clone()).unwrap();
    w.write_tensor_bytes(&[1; 33]).unwrap();
    let msg = w.finish().unwrap_err().to_string();
    assert!(msg.contains("a is missing 1 bytes"), "{msg}");

    // The first tensor whole, none of the second.
    let mut w = GgufWriter::new(Vec::new(), plan.clone()).unwrap();
    w.write_tensor_bytes(&[1; 34]).unwrap();
    let msg = w.finish().unwrap_err().to_string();
    assert!(msg.contains("b is missing 8 bytes"), "{msg}");

    // Nothing at all.
    let w = GgufWriter::new(Vec::new(), plan).unwrap();
    assert!(w.finish().is_err());
}

// ---------------------------------------------------------------------------------------------
// Reader refusals, one per error path

#[test]
fn refuses_bad_magic() {
    let mut bytes = small_file();
    bytes[0] = b'g';
    let err = refuse(&bytes);
    assert!(matches!(err, GgufError::BadMagic { .. }), "{err:?}");
    assert!(err.to_string().contains("not a GGUF file"), "{err}");

    assert!(matches!(
        validate_bytes(b"GGML\x03\0\0\0"),
        Err(GgufError::BadMagic { .. })
    ));
    assert!(matches!(
        validate_bytes(b""),
        Err(GgufError::BadMagic { .. })
    ));
    assert!(matches!(
        validate_bytes(b"GG"),
        Err(GgufError::BadMagic { .. })
    ));
}

#[test]
fn refuses_versions_1_and_4() {
    for version in [0, 1, 4, u32::MAX, 0x0300_0000] {
        let mut bytes = small_file();
        bytes[4..8].copy_from_slice(&version.to_le_bytes());
        let err = refuse(&bytes);
        match &err {
            GgufError::BadVersion { version: v, .. } => assert_eq!(*v, version),
            e => panic!("version {version}: {e:?}"),
        }
        assert!(
            err.to_string()
                .contains(&format!("GGUF version {version} is not supported")),
            "{err}"
        );
    }
}

#[test]
fn refuses_every_truncation_of_a_small_file() {
    let bytes = small_file();
    validate_bytes(&bytes).unwrap();
    // The last tensor's data ends before the end of the file: its padding to 32 follows.
    let f = write_temp(&bytes);
    let r = GgufReader::open(f.path()).unwrap();
    let last = r.tensors().last().unwrap();
    let data_end = (last.offset + last.n_bytes) as usize;
    assert_eq!((bytes.len() - data_end, bytes.len() % 32), (28, 0));
    assert!(bytes[data_end..].iter().all(|&b| b == 0));
    // Without that padding the file is still valid: llama.cpp maps files and reads no further
    // than the last tensor's data, and files from writers that left it out still load.
    for len in data_end..bytes.len() {
        validate_bytes(&bytes[..len]).unwrap();
    }
    for len in 0..data_end {
        let err = validate_bytes(&bytes[..len])
            .err()
            .unwrap_or_else(|| panic!("a prefix of {len} of {} bytes was accepted", bytes.len()));
        if len < 4 {
            assert!(matches!(err, GgufError::BadMagic { .. }), "{len}: {err:?}");
        } else {
            // Either the read that ran off the end, or the counts that cannot fit.
            let fits = matches!(err, GgufError::Truncated { .. })
                || matches!(&err, GgufError::Invalid { what, .. } if what.contains("more than"));
            assert!(fits, "{len}: {err:?}");
        }
    }
}

#[test]
fn refuses_every_truncation_of_a_metadata_only_file() {
    let mut plan = GgufPlan::new();
    plan.set("k", Value::strings(["x", "yz"].map(String::from)));
    plan.set("n", Value::U8(1));
    let bytes = write_in_chunks(&plan, &[]);
    validate_bytes(&bytes).unwrap();
    // Header: 24 bytes; "k": 8+1 key, 4 type, 4+8 array head, 8+1 and 8+2 strings; "n": 8+1
    // key, 4 type, 1 byte. The writer pads that to 96.
    let header_end = 24 + (9 + 4 + 12 + 9 + 10) + (9 + 4 + 1);
    assert_eq!(bytes.len(), 96);
    for len in 0..header_end {
        assert!(
            validate_bytes(&bytes[..len]).is_err(),
            "a prefix of {len} of {} bytes was accepted",
            bytes.len()
        );
    }
    // With no tensors, the padding after the metadata is optional: llama.cpp's own vocab-only
    // files (convert_hf_to_gguf.py --vocab-only) end right after the last value, and gguf.cpp
    // reads them.
    for len in header_end..bytes.len() {
        validate_bytes(&bytes[..len]).unwrap();
    }
}

#[test]
fn accepts_an_unpadded_metadata_only_file() {
    let raw = Raw::v3(0, 1).kv_u32("a", 1);
    assert_eq!(raw.0.len(), 24 + 9 + 4 + 4);
    validate_bytes(&raw.0).unwrap();
    // With a tensor, the data section must exist.
    let raw = Raw::v3(1, 1).kv_u32("a", 1).tensor("w", &[1], 0, 0);
    assert_truncated(&refuse(&raw.0), &["the tensor data"]);
}

#[test]
fn refuses_a_string_longer_than_the_file() {
    // A key.
    let raw = Raw::v3(0, 1).u64(1000).bytes(b"general").pad();
    let err = refuse(&raw.0);
    assert_truncated(&err, &["the key of metadata pair 0", "runs past the end"]);

    // A string value.
    let raw = Raw::v3(0, 1)
        .string("name")
        .u32(ValueType::String as u32)
        .u64(1 << 20)
        .bytes(b"abc")
        .pad();
    let err = refuse(&raw.0);
    assert_truncated(&err, &["metadata value 'name'"]);

    // A tensor name.
    let raw = Raw::v3(1, 0).u64(64).bytes(b"tok").pad();
    let err = refuse(&raw.0);
    assert_truncated(&err, &["the name of tensor 0"]);

    // A length so large it is refused before any arithmetic on it.
    let raw = Raw::v3(0, 1)
        .string("name")
        .u32(ValueType::String as u32)
        .u64(u64::MAX)
        .pad();
    let err = refuse(&raw.0);
    assert_invalid(&err, &["metadata value 'name'", "string length"]);
}

#[test]
fn refuses_an_array_count_larger_than_the_file() {
    for (elem, count) in [
        (ValueType::U8, 1u64 << 40),
        (ValueType::U64, u64::MAX),
        (ValueType::String, 1 << 20),
        (ValueType::Array, u64::MAX / 2),
        (ValueType::U8, 100),
    ] {
        let raw = Raw::v3(0, 1)
            .string("tokenizer.ggml.tokens")
            .u32(ValueType::Array as u32)
            .u32(elem as u32)
            .u64(count)
            .bytes(&[0; 40]);
        let err = refuse(&raw.0);
        assert_truncated(
            &err,
            &[
                "tokenizer.ggml.tokens",
                &format!("an array of {count} elements"),
            ],
        );
    }
}

#[test]
fn refuses_unknown_value_type_ids() {
    let raw = Raw::v3(0, 1).string("k").u32(13).u32(0).pad();
    let err = refuse(&raw.0);
    assert_invalid(&err, &["metadata 'k'", "unknown type id 13"]);

    // An array element type.
    let raw = Raw::v3(0, 1)
        .string("arr")
        .u32(ValueType::Array as u32)
        .u32(0xFFFF_FFFF)
        .u64(1)
        .pad();
    let err = refuse(&raw.0);
    assert_invalid(&err, &["'arr'", "unknown element type 4294967295"]);
}

#[test]
fn refuses_malformed_metadata_values() {
    // A bool that is neither 0 nor 1.
    let raw = Raw::v3(0, 1)
        .string("b")
        .u32(ValueType::Bool as u32)
        .bytes(&[2])
        .pad();
    assert_invalid(&refuse(&raw.0), &["'b'", "bool of value 2"]);

    // A key that is not UTF-8.
    let raw = Raw::v3(0, 1)
        .u64(2)
        .bytes(&[0xC3, 0x28])
        .u32(ValueType::U8 as u32)
        .bytes(&[0])
        .pad();
    assert_invalid(&refuse(&raw.0), &["metadata pair 0", "not valid UTF-8"]);

    // Arrays of arrays, which llama.cpp refuses.
    let raw = Raw::v3(0, 1)
        .string("deep")
        .u32(ValueType::Array as u32)
        .u32(ValueType::Array as u32)
        .u64(1)
        .u32(ValueType::U8 as u32)
        .u64(0)
        .pad();
    assert_invalid(&refuse(&raw.0), &["'deep'", "array of arrays"]);

    // A bool in an array that is neither 0 nor 1.
    let raw = Raw::v3(0, 1)
        .string("bools")
        .u32(ValueType::Array as u32)
        .u32(ValueType::Bool as u32)
        .u64(3)
        .bytes(&[1, 0, 7])
        .pad();
    assert_invalid(&refuse(&raw.0), &["'bools'", "bool of value 7 at index 2"]);

    // A string of a string array that is not UTF-8.
    let raw = Raw::v3(0, 1)
        .string("tokens")
        .u32(ValueType::Array as u32)
        .u32(ValueType::String as u32)
        .u64(2)
        .string("ok")
        .u64(2)
        .bytes(&[0xC3, 0x28])
        .pad();
    assert_invalid(
        &refuse(&raw.0),
        &["'tokens'", "string 1 is not valid UTF-8"],
    );

    // One string of a string array longer than the file.
    let raw = Raw::v3(0, 1)
        .string("tokens")
        .u32(ValueType::Array as u32)
        .u32(ValueType::String as u32)
        .u64(2)
        .string("ok")
        .u64(1000)
        .bytes(b"abc")
        .pad();
    assert_truncated(&refuse(&raw.0), &["'tokens'"]);

    // An empty key, which llama.cpp refuses.
    let raw = Raw::v3(0, 2).kv_u32("a", 1).kv_u32("", 2).pad();
    assert_invalid(&refuse(&raw.0), &["metadata pair 1 has an empty key"]);
}

#[test]
fn refuses_a_tensor_name_longer_than_ggml_takes() {
    let f32 = QuantType::F32.ggml_id();
    let long = "x".repeat(64);
    let bytes = one_tensor(&long, &[8], f32, 0, 32);
    assert_invalid(
        &refuse(&bytes),
        &["tensor 0", "64 bytes long", "at most 63"],
    );
    let bytes = one_tensor(&long[..63], &[8], f32, 0, 32);
    validate_bytes(&bytes).unwrap();
}

#[test]
fn refuses_counts_the_file_cannot_hold() {
    let raw = Raw::v3(0, u64::MAX).pad();
    assert_invalid(&refuse(&raw.0), &["metadata pairs", "more than 32 bytes"]);
    let raw = Raw::v3(1 << 40, 0).pad();
    assert_invalid(&refuse(&raw.0), &["1099511627776 tensors"]);
}

#[test]
fn refuses_a_duplicate_key() {
    let raw = Raw::v3(0, 3)
        .kv_u32("a", 1)
        .kv_u32("b", 2)
        .kv_u32("a", 3)
        .pad();
    assert_invalid(&refuse(&raw.0), &["metadata key 'a' appears twice"]);
}

#[test]
fn refuses_an_alignment_that_is_not_a_power_of_two() {
    for a in [0, 3, 48, 100] {
        let raw = Raw::v3(0, 1).kv_u32(keys::GENERAL_ALIGNMENT, a).pad();
        assert_invalid(&refuse(&raw.0), &["general.alignment", &a.to_string()]);
    }
    // The right number in the wrong type.
    let raw = Raw::v3(0, 1)
        .string(keys::GENERAL_ALIGNMENT)
        .u32(ValueType::U64 as u32)
        .u64(32)
        .pad();
    assert_invalid(&refuse(&raw.0), &["general.alignment", "U64(32)"]);
}

/// A file holding one tensor info and `data` bytes of tensor data.
fn one_tensor(name: &str, dims: &[u64], ty: u32, offset: u64, data: usize) -> Vec<u8> {
    Raw::v3(1, 0)
        .tensor(name, dims, ty, offset)
        .pad()
        .data(data)
        .0
}

#[test]
fn one_tensor_helper_makes_a_valid_file() {
    let bytes = one_tensor("w", &[8, 2], QuantType::F32.ggml_id(), 0, 64);
    validate_bytes(&bytes).unwrap();
}

#[test]
fn refuses_unknown_tensor_type_ids() {
    // 4 and 31 are ids ggml removed, 43 is past its last type.
    for id in [4, 5, 31, 36, 43, 1000, u32::MAX] {
        let bytes = one_tensor("w", &[256], id, 0, 4096);
        assert_invalid(
            &refuse(&bytes),
            &["tensor 'w'", &format!("unknown type id {id}")],
        );
    }
}

#[test]
fn refuses_zero_or_more_than_four_dimensions() {
    for n in [0u32, 5, 1000, u32::MAX] {
        let raw = Raw::v3(1, 0).string("w").u32(n).bytes(&[0; 64]);
        assert_invalid(
            &refuse(&raw.0),
            &["tensor 'w'", &format!("has {n} dimensions")],
        );
    }
}

#[test]
fn refuses_a_zero_dimension() {
    for dims in [&[0u64][..], &[4, 0], &[4, 1, 1, 0]] {
        let bytes = one_tensor("w", dims, QuantType::F32.ggml_id(), 0, 64);
        assert_invalid(&refuse(&bytes), &["tensor 'w'", "invalid shape"]);
    }
    // A dimension that does not fit ggml's int64_t.
    let bytes = one_tensor("w", &[1 << 63], QuantType::F32.ggml_id(), 0, 64);
    assert_invalid(&refuse(&bytes), &["tensor 'w'", "invalid shape"]);
}

#[test]
fn refuses_dims_whose_product_overflows() {
    let f32 = QuantType::F32.ggml_id();
    let bytes = one_tensor("w", &[1 << 32, 1 << 32], f32, 0, 64);
    assert_invalid(&refuse(&bytes), &["tensor 'w'", "overflows"]);
    let bytes = one_tensor("w", &[5, 1 << 62, 1, 1], f32, 0, 64);
    assert_invalid(&refuse(&bytes), &["tensor 'w'", "overflows"]);
    // The element count fits but the byte count does not (f64, 8 bytes each).
    let f64_id = 28;
    let bytes = one_tensor("w", &[1 << 62], f64_id, 0, 64);
    assert_invalid(&refuse(&bytes), &["tensor 'w'", "too large"]);
}

#[test]
fn refuses_a_row_that_is_not_whole_blocks() {
    let bytes = one_tensor("w", &[33, 2], QuantType::Q8_0.ggml_id(), 0, 4096);
    assert_invalid(
        &refuse(&bytes),
        &["tensor 'w'", "rows of 33 elements", "q8_0's block of 32"],
    );
    let bytes = one_tensor("w", &[128], QuantType::Q4_K.ggml_id(), 0, 4096);
    assert_invalid(&refuse(&bytes), &["q4_K's block of 256"]);
}

#[test]
fn refuses_a_misaligned_offset() {
    // Patch the offset of the second tensor of a valid file: it is the last 8 bytes of the
    // tensor infos, which end where the header padding starts.
    let bytes = small_file();
    let infos = tensor_infos_start(&bytes);
    // Tensor "x": name (8+1), n_dims (4), one dim (8), type (4), offset (8).
    let second = infos + 8 + 1 + 4 + 8 + 4 + 8;
    // Tensor "y": name (8+1), n_dims (4), two dims (16), type (4), then the offset.
    let at = second + 8 + 1 + 4 + 16 + 4;
    assert_eq!(
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()),
        32
    );
    for offset in [33u64, 16, 1, 31] {
        let mut b = bytes.clone();
        b[at..at + 8].copy_from_slice(&offset.to_le_bytes());
        assert_invalid(
            &refuse(&b),
            &[
                "tensor 'y'",
                &format!("offset {offset}, not a multiple of 32"),
            ],
        );
    }
}

#[test]
fn refuses_data_past_the_end() {
    let f32 = QuantType::F32.ggml_id();
    // 64 bytes of data in the file, the tensor needs 68.
    let bytes = one_tensor("w", &[17], f32, 0, 64);
    assert_truncated(&refuse(&bytes), &["the data of tensor 'w' (68 bytes)"]);
    // An offset far past the end, and one where offset + size overflows u64.
    for offset in [1 << 40, u64::MAX - 63, u64::MAX - 31] {
        let bytes = one_tensor("w", &[4], f32, offset, 64);
        assert_truncated(&refuse(&bytes), &["the data of tensor 'w'"]);
    }
    // A size far past the end.
    let bytes = one_tensor("w", &[1 << 40], f32, 0, 64);
    assert_truncated(&refuse(&bytes), &["the data of tensor 'w'"]);
    // Tensor infos whose data section would start past the end.
    let raw = Raw::v3(1, 0).tensor("w", &[1], f32, 0);
    assert_truncated(&refuse(&raw.0), &["the tensor data"]);
}

#[test]
fn refuses_overlapping_tensors() {
    let f32 = QuantType::F32.ggml_id();
    // 16 floats at 0 and 16 floats at 32: bytes 32..64 are shared.
    let raw = Raw::v3(2, 0)
        .tensor("a", &[16], f32, 0)
        .tensor("b", &[16], f32, 32)
        .pad()
        .data(96);
    assert_invalid(&refuse(&raw.0), &["tensors 'a' and 'b' overlap"]);
    // The same offset, listed in the opposite order.
    let raw = Raw::v3(3, 0)
        .tensor("c", &[8], f32, 64)
        .tensor("a", &[8], f32, 0)
        .tensor("b", &[8], f32, 64)
        .pad()
        .data(96);
    assert_invalid(&refuse(&raw.0), &["overlap"]);
    // Back to back is fine.
    let raw = Raw::v3(2, 0)
        .tensor("a", &[8], f32, 0)
        .tensor("b", &[8], f32, 32)
        .pad()
        .data(64);
    validate_bytes(&raw.0).unwrap();
}

#[test]
fn refuses_a_gap_before_or_between_tensors() {
    let f32 = QuantType::F32.ggml_id();
    // 8 floats (32 bytes) at 0, the next at 64: 32 bytes of nothing between them.
    let raw = Raw::v3(3, 0)
        .tensor("a", &[8], f32, 0)
        .tensor("b", &[8], f32, 64)
        .tensor("c", &[8], f32, 96)
        .pad()
        .data(128);
    assert_invalid(
        &refuse(&raw.0),
        &["32 bytes lie between the data of tensors 'a' and 'b'"],
    );
    // The first tensor not at the start of the data section.
    let raw = Raw::v3(1, 0).tensor("a", &[8], f32, 32).pad().data(64);
    assert_invalid(
        &refuse(&raw.0),
        &[
            "32 bytes lie between the start of the data section",
            "tensor 'a'",
        ],
    );
    // A row of padding more than the alignment needs.
    let raw = Raw::v3(2, 0)
        .tensor("a", &[3], f32, 0)
        .tensor("b", &[8], f32, 64)
        .pad()
        .data(96);
    assert_invalid(&refuse(&raw.0), &["tensors 'a' and 'b'"]);
}

#[test]
fn refuses_tensors_out_of_order() {
    let f32 = QuantType::F32.ggml_id();
    // Back to back, but listed in the opposite order of their data.
    let raw = Raw::v3(2, 0)
        .tensor("a", &[8], f32, 32)
        .tensor("b", &[8], f32, 0)
        .pad()
        .data(64);
    assert_invalid(
        &refuse(&raw.0),
        &["tensor 'b' is out of order", "before that of 'a'"],
    );
}

#[test]
fn writer_pads_the_last_tensor() {
    let mut plan = GgufPlan::new();
    plan.add_tensor(tensor("a", &[3], QuantType::F32));
    plan.add_tensor(tensor("b", &[5], QuantType::F32));
    let bytes = write_in_chunks(&plan, &plan_data(&plan));
    let data = plan.header_len() as usize;
    // a: 12 bytes, 20 of padding; b: 20 bytes, 12 of padding.
    assert_eq!(bytes.len(), data + 64);
    assert_eq!(bytes.len() as u64, plan.file_len());
    assert!(bytes[data + 12..data + 32].iter().all(|&b| b == 0));
    assert!(bytes[data + 52..].iter().all(|&b| b == 0));
    let f = write_temp(&bytes);
    let r = GgufReader::open(f.path()).unwrap();
    assert_eq!(r.tensor_data(r.tensor("b").unwrap()).len(), 20);
}

#[test]
fn refuses_a_duplicate_tensor_name() {
    let f32 = QuantType::F32.ggml_id();
    let raw = Raw::v3(2, 0)
        .tensor("w", &[8], f32, 0)
        .tensor("w", &[8], f32, 32)
        .pad()
        .data(64);
    assert_invalid(&refuse(&raw.0), &["tensor 'w' appears twice"]);
}

#[test]
fn refuses_a_missing_file_with_io_error() {
    let err = GgufReader::open(Path::new("/nonexistent/dir/model.gguf")).unwrap_err();
    assert!(matches!(err, GgufError::Io { .. }), "{err:?}");
    assert!(
        err.to_string().contains("/nonexistent/dir/model.gguf"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// The reader's type table against ggml's

#[test]
fn ggml_type_table_matches_ggml() {
    use std::ffi::CStr;

    let mut checked = 0;
    for id in 0..llama_cpp_sys_2::GGML_TYPE_COUNT {
        // SAFETY: ggml_type_size reads ggml's static type-traits table; `id` is below
        // GGML_TYPE_COUNT, the table's length.
        let type_size = unsafe { llama_cpp_sys_2::ggml_type_size(id) } as u64;
        if type_size == 0 {
            // A type ggml removed: no file may hold it.
            assert_eq!(GgmlTypeInfo::from_id(id), None, "removed type {id}");
            continue;
        }
        // SAFETY: as above.
        let block_size = unsafe { llama_cpp_sys_2::ggml_blck_size(id) } as u64;
        // SAFETY: as above; for a type ggml knows, the name is a static NUL-terminated string.
        let name = unsafe { CStr::from_ptr(llama_cpp_sys_2::ggml_type_name(id)) }
            .to_str()
            .unwrap();
        let ours = GgmlTypeInfo::from_id(id)
            .unwrap_or_else(|| panic!("ggml type {id} ({name}) is missing from the reader"));
        assert_eq!(
            (ours.id, ours.name, ours.block_size, ours.type_size),
            (id, name, block_size, type_size),
            "ggml type {id}"
        );
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} ggml types checked");
    for id in llama_cpp_sys_2::GGML_TYPE_COUNT..llama_cpp_sys_2::GGML_TYPE_COUNT + 64 {
        assert_eq!(GgmlTypeInfo::from_id(id), None, "{id}");
    }
}

/// Regression: duplicate keys and names were found by scanning everything read so far, so a
/// 10 MB file of 100,000 keys and 100,000 tensors took 140 s to refuse or accept (hours for
/// 100 MB). With sets it takes milliseconds.
#[test]
fn many_keys_and_tensors_are_checked_in_linear_time() {
    let n = 100_000u64;
    let mut raw = Raw::v3(n, n);
    for i in 0..n {
        raw = raw.kv_u32(&format!("key.{i:08}"), 1);
    }
    for i in 0..n {
        raw = raw.tensor(&format!("t.{i:08}"), &[8], QuantType::F32.ggml_id(), i * 32);
    }
    let raw = raw.pad().data(n as usize * 32);
    let start = std::time::Instant::now();
    validate_bytes(&raw.0).unwrap();
    let took = start.elapsed();
    assert!(took.as_secs() < 20, "{} bytes took {took:?}", raw.0.len());
}

// ---------------------------------------------------------------------------------------------
// Memory

/// Set in the child processes of `validating_takes_memory_in_proportion_to_the_metadata`: the
/// file to validate.
const MEMORY_CHILD: &str = "CONVERT_GGUF_MEMORY_CHILD";

/// What the test process takes before validating anything: code, thread stacks, buffers.
const BASE_MEMORY: u64 = 64 << 20;

/// Validates `path` in a child process (this test binary, running only the memory test) whose
/// data segment (heap and private writable mappings; not the read-only mapping of the file) is
/// limited to `limit` bytes. Returns whether it succeeded, and what it printed.
fn validate_within(path: &Path, limit: u64) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "validating_takes_memory_in_proportion_to_the_metadata",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(MEMORY_CHILD, path)
    // One malloc arena: the limit then measures the reader, not per-thread reserves.
    .env("MALLOC_ARENA_MAX", "1");
    // SAFETY: the closure runs in the forked child before exec and only calls setrlimit, which
    // is async-signal-safe, with a struct on its own stack.
    unsafe {
        cmd.pre_exec(move || {
            let rl = libc::rlimit {
                rlim_cur: limit as libc::rlim_t,
                rlim_max: limit as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_DATA, &rl) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

/// The peak of this process's data segment, from /proc/self/status, in bytes.
fn peak_data() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            .unwrap_or(0)
    };
    kb("VmData:") * 1024
}

/// Regression: every array element became a 32-byte `Value`, so a file with a 1 GB `u8` array
/// cost 32 GB before validation ended. Hostile files of three shapes (arrays of 10^8 elements,
/// a million metadata pairs, a million tensors) are validated under a memory limit of a small
/// multiple of their metadata.
#[test]
fn validating_takes_memory_in_proportion_to_the_metadata() {
    if let Some(path) = std::env::var_os(MEMORY_CHILD) {
        let r = GgufReader::open(Path::new(&path)).unwrap();
        println!(
            "validated {} pairs and {} tensors; data segment {} MB",
            r.metadata().len(),
            r.tensors().len(),
            peak_data() >> 20
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f32 = QuantType::F32.ggml_id();

    // 10^8 one-byte elements and 10^7 two-byte strings: 200 MB of metadata, which took 3.8 GB.
    let mut arrays = GgufPlan::new();
    arrays.set("big.u8", Value::from(vec![7u8; 100_000_000]));
    arrays.set(
        "big.strings",
        Value::strings((0..10_000_000).map(|i| ["ab", "cd"][i % 2])),
    );
    let arrays = write_in_chunks(&arrays, &[]);

    // A million one-byte metadata values and a million tensor infos.
    let n = 1_000_000u64;
    let mut keys = Raw::v3(0, n);
    for i in 0..n {
        keys = keys
            .string(&format!("k.{i:07}"))
            .u32(ValueType::U8 as u32)
            .bytes(&[1]);
    }
    let keys = keys.pad().0;
    let mut tensors = Raw::v3(n, 0);
    for i in 0..n {
        tensors = tensors.tensor(&format!("t.{i:07}"), &[8], f32, i * 32);
    }
    let tensors = tensors.pad().data(n as usize * 32).0;

    // Measured: arrays take 1.0 byte per byte of metadata, pairs 5, tensor infos 4.1.
    for (what, bytes, metadata, times_ten) in [
        ("arrays", &arrays, arrays.len() as u64, 15),
        ("metadata pairs", &keys, keys.len() as u64, 60),
        ("tensors", &tensors, tensors.len() as u64 - n * 32, 60),
    ] {
        let path = dir.path().join("hostile.gguf");
        std::fs::write(&path, bytes).unwrap();
        let limit = BASE_MEMORY + metadata * times_ten / 10;
        let (ok, out) = validate_within(&path, limit);
        assert!(
            ok,
            "{what}: {metadata} bytes of metadata did not validate within {limit} bytes: {out}"
        );
        println!(
            "{what}: {} MB of metadata validated within a limit of {} MB: {}",
            metadata >> 20,
            limit >> 20,
            out.lines()
                .find_map(|l| l.split_once("validated ").map(|x| x.1))
                .unwrap_or("")
        );
    }
    // The limit is real: the arrays do not fit in less than their size.
    let path = dir.path().join("hostile.gguf");
    std::fs::write(&path, &arrays).unwrap();
    let (ok, _) = validate_within(&path, BASE_MEMORY + arrays.len() as u64 / 4);
    assert!(!ok, "validated 200 MB of arrays within 114 MB");
}

// ---------------------------------------------------------------------------------------------
// Fuzzing seeds

/// Writes the small valid files that seed the fuzzer (`fuzz/corpus/gguf_reader`, see
/// docs/FUZZING.md): `cargo test --release -p convert --test gguf -- --ignored write_fuzz_seeds`.
#[test]
#[ignore = "writes files into fuzz/corpus/gguf_reader"]
fn write_fuzz_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/gguf_reader");
    std::fs::create_dir_all(&dir).unwrap();

    let rich = rich_plan();
    let mut metadata_only = GgufPlan::new();
    for (k, v) in all_value_types() {
        metadata_only.set(&k, v);
    }
    let f32 = QuantType::F32.ggml_id();
    let seeds = [
        ("small.gguf", small_file()),
        ("all-types.gguf", write_in_chunks(&rich, &plan_data(&rich))),
        ("empty.gguf", write_in_chunks(&GgufPlan::new(), &[])),
        ("metadata-only.gguf", write_in_chunks(&metadata_only, &[])),
        (
            "align-64.gguf",
            Raw::v3(2, 1)
                .kv_u32(keys::GENERAL_ALIGNMENT, 64)
                .tensor("a", &[4], f32, 0)
                .tensor("b", &[2], f32, 64)
                .pad_to(64)
                .data(64 + 8)
                .0,
        ),
        ("unpadded.gguf", Raw::v3(0, 1).kv_u32("a", 1).0),
    ];
    for (name, bytes) in seeds {
        validate_bytes(&bytes).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
