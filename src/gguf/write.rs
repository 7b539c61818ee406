//! Writer for GGUF v3 files: metadata, tensor infos, then each tensor's data, aligned.
//!
//! The header (every tensor's name, shape, type and offset) comes first in a GGUF file, but the
//! offsets depend only on the shapes and types, so the header is written up front and the
//! tensors are then produced and encoded one at a time: a caller never holds more than one
//! tensor's values. The file is written under a temporary name and renamed when complete.

use super::types::{GgmlType, MetaValue};
use super::DEFAULT_ALIGNMENT;
use anyhow::{bail, ensure, Context, Result};
use std::io::Write;
use std::path::Path;

/// One tensor to write: its name, its shape in PyTorch/HF order (`[out, in]`; the file stores
/// ggml's reversed `ne`) and the type it is stored as.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
}

impl TensorSpec {
    fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the stored tensor; the row (innermost dimension) must hold whole blocks.
    fn n_bytes(&self) -> Result<usize> {
        let (block_elems, block_bytes) = self.ggml_type.block();
        let row = self.shape.last().copied().unwrap_or(1);
        ensure!(
            row.is_multiple_of(block_elems),
            "tensor `{}`: rows of {row} values are not whole {} blocks of {block_elems}",
            self.name,
            self.ggml_type
        );
        Ok(self.n_elements() / block_elems * block_bytes)
    }
}

/// The GGUF value type id of a metadata value.
fn value_type(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::Str(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A value's bytes without its type id (arrays: element type, count, elements).
fn put_value(out: &mut Vec<u8>, key: &str, v: &MetaValue) -> Result<()> {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::Str(s) => put_str(out, s),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Array(items) => {
            // GGUF arrays are homogeneous; an empty one is written as an array of u8.
            let ty = items.first().map_or(0, value_type);
            if let Some(i) = items.iter().position(|x| value_type(x) != ty) {
                bail!(
                    "metadata `{key}`: element {i} is {}, the first is {}",
                    items[i].type_name(),
                    items[0].type_name()
                );
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for x in items {
                put_value(out, key, x)?;
            }
        }
    }
    Ok(())
}

/// Q8_0 blocks of `values` (a whole number of 32-value blocks), as llama.cpp's
/// `quantize_row_q8_0_ref`: scale `d = max|x| / 127` stored as f16, `q = roundf(x / d)`
/// (half away from zero, computed as `x * (1 / d)` in f32 like the reference).
pub fn quantize_q8_0(values: &[f32], out: &mut Vec<u8>) {
    debug_assert!(values.len().is_multiple_of(32));
    for block in values.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&x| (x * id).round() as i8 as u8));
    }
}

/// `values` stored as `ty` (F32, F16 or Q8_0: the types this writer produces).
pub fn encode(ty: GgmlType, values: &[f32], out: &mut Vec<u8>) -> Result<()> {
    match ty {
        GgmlType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        // Round to nearest even, as ggml's f32 -> f16 conversion.
        GgmlType::F16 => {
            for (i, &v) in values.iter().enumerate() {
                let h = half::f16::from_f32(v);
                ensure!(h.is_finite(), "value {i} ({v}) is beyond f16's range");
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        GgmlType::Q8_0 => {
            ensure!(
                values.len().is_multiple_of(32),
                "{} values are not whole Q8_0 blocks of 32",
                values.len()
            );
            // The block scale max|x| / 127 is stored as f16.
            if let Some(v) = values
                .iter()
                .find(|v| v.abs() / 127.0 > f32::from(half::f16::MAX))
            {
                bail!("value {v} is beyond the range of a Q8_0 block scale");
            }
            quantize_q8_0(values, out)
        }
        other => bail!("writing {other} tensors is not supported (F32, F16, Q8_0)"),
    }
    Ok(())
}

/// Writes a GGUF v3 file at `path`: `metadata` in order, then `tensors`, whose values
/// `values(i)` produces one at a time (HF order, row-major). The alignment is
/// `general.alignment` when `metadata` sets it, else 32.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, MetaValue)],
    tensors: &[TensorSpec],
    mut values: impl FnMut(usize) -> Result<Vec<f32>>,
) -> Result<()> {
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT as usize,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a.is_power_of_two() => a as usize,
            _ => bail!("`general.alignment` must be a power of two, found {v:?}"),
        },
    };
    let mut header = Vec::new();
    header.extend_from_slice(b"GGUF");
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (i, (key, v)) in metadata.iter().enumerate() {
        if metadata[..i].iter().any(|(k, _)| k == key) {
            bail!("metadata key `{key}` given twice");
        }
        put_str(&mut header, key);
        header.extend_from_slice(&value_type(v).to_le_bytes());
        put_value(&mut header, key, v)?;
    }
    let mut offset = 0usize;
    let mut sizes = Vec::with_capacity(tensors.len());
    for t in tensors {
        ensure!(
            (1..=4).contains(&t.shape.len()),
            "tensor `{}`: {} dimensions (1 to 4 allowed)",
            t.name,
            t.shape.len()
        );
        put_str(&mut header, &t.name);
        header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            header.extend_from_slice(&(d as u64).to_le_bytes());
        }
        header.extend_from_slice(&ggml_type_id(t.ggml_type).to_le_bytes());
        header.extend_from_slice(&(offset as u64).to_le_bytes());
        let n = t.n_bytes()?;
        sizes.push(n);
        offset = (offset + n).next_multiple_of(alignment);
    }
    header.resize(header.len().next_multiple_of(alignment), 0);

    let tmp = path.with_extension("gguf.tmp");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let written = (|| -> Result<()> {
        let mut w = std::io::BufWriter::new(file);
        w.write_all(&header)?;
        let mut buf = Vec::new();
        for (i, (t, &size)) in tensors.iter().zip(&sizes).enumerate() {
            let v = values(i)?;
            ensure!(
                v.len() == t.n_elements(),
                "tensor `{}`: {} values for shape {:?}",
                t.name,
                v.len(),
                t.shape
            );
            buf.clear();
            encode(t.ggml_type, &v, &mut buf).with_context(|| format!("tensor `{}`", t.name))?;
            debug_assert_eq!(buf.len(), size);
            drop(v);
            buf.resize(size.next_multiple_of(alignment), 0);
            w.write_all(&buf)?;
        }
        w.into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()
            .with_context(|| format!("{}: cannot write", tmp.display()))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))
}

/// The on-disk id of a type (the inverse of [`GgmlType::from_id`]).
fn ggml_type_id(ty: GgmlType) -> u32 {
    (0..64)
        .find(|&id| GgmlType::from_id(id) == Some(ty))
        .expect("every GgmlType has an id")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::Gguf;

    #[test]
    fn q8_0_rounds_half_away_from_zero_and_scales_by_max_over_127() {
        // max |x| = 127 gives d = 1 exactly: q = roundf(x), and 2.5 -> 3, -2.5 -> -3 (a
        // round-half-to-even quantizer would give 2 and -2).
        let mut x = vec![0f32; 32];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -2.5;
        x[3] = 0.49;
        x[4] = -126.6;
        let mut out = Vec::new();
        quantize_q8_0(&x, &mut out);
        assert_eq!(out.len(), 34);
        assert_eq!(half::f16::from_le_bytes([out[0], out[1]]).to_f32(), 1.0);
        let q: Vec<i8> = out[2..].iter().map(|&b| b as i8).collect();
        assert_eq!(&q[..6], &[127, 3, -3, 0, -127, 0]);
        // An all-zero block has scale 0 and zero quants.
        let mut out = Vec::new();
        quantize_q8_0(&[0.0; 32], &mut out);
        assert!(out.iter().all(|&b| b == 0));
    }

    #[test]
    fn written_file_reads_back_with_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let meta: Vec<(String, MetaValue)> = vec![
            (
                "general.architecture".into(),
                MetaValue::Str("llama".into()),
            ),
            ("general.alignment".into(), MetaValue::U32(64)),
            ("a.u8".into(), MetaValue::U8(7)),
            ("a.i64".into(), MetaValue::I64(-5)),
            ("a.f64".into(), MetaValue::F64(0.25)),
            ("a.bool".into(), MetaValue::Bool(true)),
            (
                "a.strs".into(),
                MetaValue::Array(vec![
                    MetaValue::Str("x y".into()),
                    MetaValue::Str("".into()),
                ]),
            ),
            (
                "a.nested".into(),
                MetaValue::Array(vec![MetaValue::Array(vec![MetaValue::I32(-1)])]),
            ),
        ];
        let vals: Vec<Vec<f32>> = vec![
            (0..3).map(|i| i as f32 * 0.1).collect(),
            (0..2 * 64)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect(),
            (0..3 * 5).map(|i| i as f32 / 3.0).collect(),
        ];
        let specs = vec![
            TensorSpec {
                name: "norm".into(),
                shape: vec![3],
                ggml_type: GgmlType::F32,
            },
            TensorSpec {
                name: "w8".into(),
                shape: vec![2, 64],
                ggml_type: GgmlType::Q8_0,
            },
            TensorSpec {
                name: "w16".into(),
                shape: vec![3, 5],
                ggml_type: GgmlType::F16,
            },
        ];
        write_gguf(&path, &meta, &specs, |i| Ok(vals[i].clone())).unwrap();
        let g = Gguf::open(&path).unwrap();
        assert_eq!(g.version(), 3);
        assert_eq!(g.alignment(), 64);
        for (k, v) in &meta {
            assert_eq!(g.get(k), Some(v), "{k}");
        }
        let (norm, shape) = g.tensor_f32("norm").unwrap();
        assert_eq!((norm, shape), (vals[0].clone(), vec![3]));
        assert_eq!(g.tensor_info("w8").unwrap().ggml_type, GgmlType::Q8_0);
        assert_eq!(g.tensor_info("w8").unwrap().dims, vec![64, 2]);
        let (w8, shape) = g.tensor_f32("w8").unwrap();
        assert_eq!(shape, vec![2, 64]);
        // Each value is within half a quantization step of its block's scale max|x|/127 (plus
        // the f16 rounding of that scale, relative 2^-11, times |q| <= 127).
        for (blk, (got, want)) in w8.chunks(32).zip(vals[1].chunks(32)).enumerate() {
            let d = want.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g - w).abs() <= d * (0.5 + 127.0 / 2048.0),
                    "block {blk}: {g} vs {w}"
                );
            }
        }
        let (w16, _) = g.tensor_f32("w16").unwrap();
        for (g, w) in w16.iter().zip(&vals[2]) {
            assert!((g - w).abs() <= w.abs() / 2048.0, "{g} vs {w}");
        }
        for t in g.tensors() {
            assert_eq!(t.offset % 64, 0, "{}", t.name);
        }
    }

    #[test]
    fn bad_inputs_are_errors_and_leave_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let spec = |shape: Vec<usize>, ggml_type| TensorSpec {
            name: "w".into(),
            shape,
            ggml_type,
        };
        let e = write_gguf(&path, &[], &[spec(vec![2, 40], GgmlType::Q8_0)], |_| {
            Ok(vec![0.0; 80])
        });
        assert!(format!("{:#}", e.unwrap_err()).contains("Q8_0"));
        let e = write_gguf(&path, &[], &[spec(vec![2, 3], GgmlType::F16)], |_| {
            Ok(vec![0.0; 5])
        });
        assert!(format!("{:#}", e.unwrap_err()).contains("5 values"));
        let e = write_gguf(&path, &[], &[spec(vec![1, 2], GgmlType::F16)], |_| {
            Ok(vec![0.5, 1e6])
        });
        assert!(format!("{:#}", e.unwrap_err()).contains("f16"));
        let mixed = MetaValue::Array(vec![MetaValue::U8(1), MetaValue::Str("a".into())]);
        let e = write_gguf(&path, &[("m".into(), mixed)], &[], |_| Ok(vec![]));
        assert!(format!("{:#}", e.unwrap_err()).contains("`m`"));
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    }
}
