//! Reader for GGUF model files (llama.cpp / ggml format, versions 2 and 3).
//!
//! Layout of a GGUF file (all integers little-endian):
//! `"GGUF"`, version `u32`, tensor count `u64`, metadata count `u64`, the metadata
//! key/value pairs, one info record per tensor (name, dims, ggml type, offset), padding to
//! `general.alignment` (default 32), then the tensor data. Tensor offsets are relative to
//! the start of that data section.
//!
//! The file is memory-mapped; [`Gguf::tensor_f32`] dequantizes one tensor at a time, so a
//! loader can quantize layer by layer without the whole model ever sitting in memory.
//! Shapes are reported in PyTorch/HF order (`[out, in]`), the reverse of ggml's `ne`.
//!
//! Everything read from the file is bounds-checked: malformed input is an error that names
//! the file (and the key or tensor), never a panic.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml supports at most 4 dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal; deeper nesting than this is treated as a corrupt file.
const MAX_ARRAY_DEPTH: u32 = 8;

// ---------------------------------------------------------------------------------------
// Metadata values
// ---------------------------------------------------------------------------------------

/// One metadata value. The variant is the GGUF value type it was stored with.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// The GGUF type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "uint8",
            MetaValue::I8(_) => "int8",
            MetaValue::U16(_) => "uint16",
            MetaValue::I16(_) => "int16",
            MetaValue::U32(_) => "uint32",
            MetaValue::I32(_) => "int32",
            MetaValue::F32(_) => "float32",
            MetaValue::Bool(_) => "bool",
            MetaValue::Str(_) => "string",
            MetaValue::Array(_) => "array",
            MetaValue::U64(_) => "uint64",
            MetaValue::I64(_) => "int64",
            MetaValue::F64(_) => "float64",
        }
    }

    /// Any integer type, as i128 so every GGUF integer fits without loss.
    fn as_int(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => v.into(),
            MetaValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// An integer of any width that is non-negative and fits in u64.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_int().and_then(|v| u64::try_from(v).ok())
    }

    /// An integer of any width that fits in i64.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_int().and_then(|v| i64::try_from(v).ok())
    }

    /// A float, or an integer (converters are not consistent about which they write).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_int().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The value as JSON (for dumps and debugging).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            MetaValue::F32(v) => json!(v),
            MetaValue::F64(v) => json!(v),
            MetaValue::Bool(v) => json!(v),
            MetaValue::Str(s) => json!(s),
            MetaValue::Array(a) => a.iter().map(MetaValue::to_json).collect(),
            other => match other.as_int() {
                Some(v) if v < 0 => json!(v as i64),
                Some(v) => json!(v as u64),
                None => serde_json::Value::Null,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tensor types
// ---------------------------------------------------------------------------------------

/// ggml tensor element types, with the ids used on disk (ids 4, 5, 31-33, 36-38 were removed
/// from ggml and never appear in current files).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

/// Elements per super-block of the k-quants.
const QK_K: usize = 256;

impl GgmlType {
    /// The type with on-disk id `id`, if ggml defines it.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
        }
    }

    /// `(elements per block, bytes per block)`; needed to size every tensor, including the
    /// types this module cannot dequantize.
    pub fn block(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            I8 => (1, 1),
            I64 | F64 => (1, 8),
            Q4_0 | IQ4_NL => (32, 2 + 16),
            Q4_1 => (32, 2 + 2 + 16),
            Q5_0 => (32, 2 + 4 + 16),
            Q5_1 => (32, 2 + 2 + 4 + 16),
            Q8_0 => (32, 2 + 32),
            Q8_1 => (32, 4 + 4 + 32),
            MXFP4 => (32, 1 + 16),
            Q2_K => (QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),
            Q3_K => (QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
            Q4_K => (QK_K, 2 + 2 + QK_K / 2 + 12),
            Q5_K => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12),
            Q6_K => (QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16),
            Q8_K => (QK_K, 4 + QK_K + QK_K / 8),
            IQ2_XXS => (QK_K, 2 + QK_K / 4),
            IQ2_XS => (QK_K, 2 + QK_K / 4 + QK_K / 32),
            IQ3_XXS => (QK_K, 2 + QK_K / 4 + QK_K / 8),
            IQ1_S => (QK_K, 2 + QK_K / 8 + QK_K / 16),
            IQ3_S => (QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
            IQ2_S => (QK_K, 2 + QK_K / 4 + QK_K / 16),
            IQ4_XS => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 64),
            IQ1_M => (QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
            TQ1_0 => (QK_K, 2 + 4 * 13),
            TQ2_0 => (QK_K, 2 + 64),
        }
    }

    /// Whether [`dequantize`] handles this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16
                | BF16
                | F64
                | Q4_0
                | Q4_1
                | Q5_0
                | Q5_1
                | Q8_0
                | Q2_K
                | Q3_K
                | Q4_K
                | Q5_K
                | Q6_K
        )
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where one tensor lives in the file and what it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order (`ne[0]` is the contiguous, innermost dimension).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Size of the tensor's data in bytes.
    pub n_bytes: usize,
}

impl TensorInfo {
    /// Shape in PyTorch/HF order (ggml's `ne` reversed): a `[out, in]` weight has
    /// `ne = [in, out]` in the file.
    pub fn shape(&self) -> Vec<usize> {
        // Every dim was checked to fit in usize when the file was opened.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn n_elements(&self) -> usize {
        self.dims.iter().map(|&d| d as usize).product()
    }
}

// ---------------------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------------------

/// An open, memory-mapped GGUF file.
pub struct Gguf {
    path: PathBuf,
    mmap: memmap2::Mmap,
    version: u32,
    alignment: u64,
    /// Absolute file offset of the tensor data section.
    data_start: usize,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Gguf {
    /// Opens and validates `path`: header, metadata, tensor infos, and that every tensor's
    /// bytes lie inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)
            .with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        // SAFETY: the map is read-only; like every mmap-based model loader we rely on the file
        // not being truncated by another process while it is open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map GGUF file {}", path.display()))?;
        let parsed = parse(&mmap, &path)?;
        Ok(Gguf {
            path,
            mmap,
            version: parsed.version,
            alignment: parsed.alignment,
            data_start: parsed.data_start,
            metadata: parsed.metadata,
            tensor_index: parsed
                .tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), i))
                .collect(),
            tensors: parsed.tensors,
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

    /// All metadata, sorted by key.
    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&MetaValue> {
        self.get(key).ok_or_else(|| {
            anyhow!(
                "GGUF file {}: missing metadata key `{key}`",
                self.path.display()
            )
        })
    }

    fn wrong_type(&self, key: &str, expected: &str, got: &MetaValue) -> anyhow::Error {
        anyhow!(
            "GGUF file {}: metadata key `{key}` should be {expected}, found {}",
            self.path.display(),
            got.type_name()
        )
    }

    /// An unsigned integer of any stored width that fits in u64.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    /// An unsigned integer of any stored width that fits in u32.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let v = self.get_u64(key)?;
        u32::try_from(v).map_err(|_| {
            anyhow!(
                "GGUF file {}: metadata key `{key}` = {v} does not fit in u32",
                self.path.display()
            )
        })
    }

    /// A signed integer of any stored width that fits in i64.
    pub fn get_i64(&self, key: &str) -> Result<i64> {
        let v = self.require(key)?;
        v.as_i64()
            .ok_or_else(|| self.wrong_type(key, "an integer", v))
    }

    /// A float (f32/f64, or an integer) as f32.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        let v = self.require(key)?;
        v.as_f64()
            .map(|x| x as f32)
            .ok_or_else(|| self.wrong_type(key, "a number", v))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| self.wrong_type(key, "a bool", v))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str()
            .ok_or_else(|| self.wrong_type(key, "a string", v))
    }

    fn get_array(&self, key: &str) -> Result<&[MetaValue]> {
        let v = self.require(key)?;
        v.as_array()
            .ok_or_else(|| self.wrong_type(key, "an array", v))
    }

    /// An array of strings (e.g. `tokenizer.ggml.tokens`).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.get_array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .ok_or_else(|| self.wrong_type(&format!("{key}[{i}]"), "a string", v))
            })
            .collect()
    }

    /// An array of numbers as f32 (e.g. `tokenizer.ggml.scores`).
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        self.get_array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| self.wrong_type(&format!("{key}[{i}]"), "a number", v))
            })
            .collect()
    }

    /// An array of integers that fit in i32 (e.g. `tokenizer.ggml.token_type`).
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        self.get_array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i64()
                    .and_then(|x| i32::try_from(x).ok())
                    .ok_or_else(|| self.wrong_type(&format!("{key}[{i}]"), "an int32", v))
            })
            .collect()
    }

    /// `Ok(None)` when `key` is absent, an error when it is present with the wrong type.
    /// Use with a getter: `g.opt("llama.attention.head_count_kv", Gguf::get_u32)?`.
    pub fn opt<'a, T>(
        &'a self,
        key: &str,
        get: impl Fn(&'a Self, &str) -> Result<T>,
    ) -> Result<Option<T>> {
        if self.metadata.contains_key(key) {
            get(self, key).map(Some)
        } else {
            Ok(None)
        }
    }

    /// `general.architecture` (e.g. "llama", "qwen2").
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensor_index.contains_key(name)
    }

    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor_index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| {
                anyhow!(
                    "GGUF file {}: no tensor named `{name}` ({} tensors in the file)",
                    self.path.display(),
                    self.tensors.len()
                )
            })
    }

    /// The raw (possibly quantized) bytes of a tensor, straight from the mmap.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.tensor_info(name)?;
        // Checked in `parse`: the range lies inside the file.
        let start = self.data_start + info.offset as usize;
        Ok(&self.mmap[start..start + info.n_bytes])
    }

    /// Dequantizes a tensor to f32. Returns the values (row-major, last dim contiguous) and
    /// the shape in PyTorch/HF order. The Llama q/k row permutation is *not* undone here;
    /// see [`Gguf::tensor_f32_hf`].
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self.tensor_info(name)?;
        let bytes = self.tensor_bytes(name)?;
        let values = dequantize(info.ggml_type, bytes, info.n_elements()).with_context(|| {
            format!(
                "GGUF file {}: cannot dequantize tensor `{name}`",
                self.path.display()
            )
        })?;
        Ok((values, info.shape()))
    }

    /// Like [`Gguf::tensor_f32`], but in the layout of the original HF checkpoint: for
    /// architectures whose converter permuted the rows of `attn_q`/`attn_k` (Llama), the
    /// permutation is undone.
    pub fn tensor_f32_hf(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let (values, shape) = self.tensor_f32(name)?;
        let arch = self.architecture()?;
        if !arch_permutes_qk(arch) {
            return Ok((values, shape));
        }
        let is_q = name.ends_with(".attn_q.weight") || name.ends_with(".attn_q.bias");
        let is_k = name.ends_with(".attn_k.weight") || name.ends_with(".attn_k.bias");
        if !is_q && !is_k {
            return Ok((values, shape));
        }
        let n_head = self.get_u32(&format!("{arch}.attention.head_count"))? as usize;
        let heads = if is_k {
            self.opt(&format!("{arch}.attention.head_count_kv"), Self::get_u32)?
                .map_or(n_head, |v| v as usize)
        } else {
            n_head
        };
        let rows = shape[0];
        let cols = shape.get(1).copied().unwrap_or(1);
        let values = unpermute_qk(&values, heads, rows, cols)
            .with_context(|| format!("GGUF file {}: tensor `{name}`", self.path.display()))?;
        Ok((values, shape))
    }

    /// Model hyper-parameters as the fields of an HF `config.json`, so one config parser
    /// serves both formats. Supports the `llama`, `qwen2` and `qwen3` architectures.
    ///
    /// Non-HF extra: when the file has a `rope_freqs.weight` tensor (Llama 3.x rope scaling,
    /// which llama.cpp stores as per-dimension frequency divisors rather than as
    /// `rope_scaling` parameters), `"gguf_rope_freqs": "rope_freqs.weight"` is set; the
    /// model must then divide its inverse frequencies by that tensor's values.
    pub fn model_config(&self) -> Result<serde_json::Value> {
        let arch = self.architecture()?;
        let (hf_arch, model_type) = match arch {
            "llama" => ("LlamaForCausalLM", "llama"),
            "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
            "qwen3" => ("Qwen3ForCausalLM", "qwen3"),
            other => bail!(
                "GGUF file {}: unsupported architecture `{other}` (supported: llama, qwen2, qwen3)",
                self.path.display()
            ),
        };
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = self.get_u64(&key("embedding_length"))?;
        let n_head = self.get_u64(&key("attention.head_count"))?;
        if n_head == 0 || !hidden.is_multiple_of(n_head) {
            bail!(
                "GGUF file {}: {} = {hidden} is not a multiple of {} = {n_head}",
                self.path.display(),
                key("embedding_length"),
                key("attention.head_count")
            );
        }
        let n_kv = self
            .opt(&key("attention.head_count_kv"), Self::get_u64)?
            .unwrap_or(n_head);
        let head_dim = self
            .opt(&key("attention.key_length"), Self::get_u64)?
            .unwrap_or(hidden / n_head);
        let vocab_size = match self.opt(&key("vocab_size"), Self::get_u64)? {
            Some(v) => v,
            None => match self
                .get("tokenizer.ggml.tokens")
                .and_then(MetaValue::as_array)
            {
                Some(tokens) => tokens.len() as u64,
                None => *self
                    .tensor_info("token_embd.weight")?
                    .shape()
                    .first()
                    .unwrap_or(&0) as u64,
            },
        };
        let rope_theta = self
            .opt(&key("rope.freq_base"), Self::get_f32)?
            .unwrap_or(10000.0);
        let rms_eps = self.get_f32(&key("attention.layer_norm_rms_epsilon"))?;
        let blocks = self.get_u64(&key("block_count"))?;
        // The tensors say how many blocks there are: a block count that disagrees is corruption,
        // not a model too large for the budget.
        let stored = self
            .tensors()
            .iter()
            .filter_map(|t| {
                t.name
                    .strip_prefix("blk.")?
                    .split('.')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .map(|i| i + 1)
            .max()
            .unwrap_or(0);
        if !self.tensors().is_empty() && blocks != stored {
            bail!(
                "GGUF file {}: corrupt file: {} = {blocks} but its tensors hold {stored} blocks",
                self.path.display(),
                key("block_count")
            );
        }

        let mut cfg = json!({
            "architectures": [hf_arch],
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": self.get_u64(&key("feed_forward_length"))?,
            "num_hidden_layers": blocks,
            "num_attention_heads": n_head,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            // f32 -> f64 through the shortest decimal, so 1e-5 stays 1e-5 rather than
            // 9.999999747378752e-6.
            "rms_norm_eps": f32_to_f64_decimal(rms_eps),
            "rope_theta": f32_to_f64_decimal(rope_theta),
            "vocab_size": vocab_size,
            "max_position_embeddings": self.get_u64(&key("context_length"))?,
            "tie_word_embeddings": !self.has_tensor("output.weight"),
            "attention_bias": self.has_tensor("blk.0.attn_q.bias"),
            "hidden_act": "silu",
        });
        let obj = cfg.as_object_mut().expect("json! object");
        for (hf, gguf) in [
            ("bos_token_id", "tokenizer.ggml.bos_token_id"),
            ("eos_token_id", "tokenizer.ggml.eos_token_id"),
            ("pad_token_id", "tokenizer.ggml.padding_token_id"),
        ] {
            if let Some(id) = self.opt(gguf, Self::get_u64)? {
                obj.insert(hf.into(), json!(id));
            }
        }
        if let Some(scaling) = self.rope_scaling(arch)? {
            obj.insert("rope_scaling".into(), scaling);
        }
        if self.has_tensor("rope_freqs.weight") {
            obj.insert("gguf_rope_freqs".into(), json!("rope_freqs.weight"));
        }
        if let Some(dims) = self.opt(&key("rope.dimension_count"), Self::get_u64)? {
            if dims != head_dim {
                bail!(
                    "GGUF file {}: partial rotary embeddings ({} = {dims}, head dim {head_dim}) are not supported",
                    self.path.display(),
                    key("rope.dimension_count")
                );
            }
        }
        Ok(cfg)
    }

    /// HF `rope_scaling` from `{arch}.rope.scaling.*` (or the older `rope.scale_linear`).
    fn rope_scaling(&self, arch: &str) -> Result<Option<serde_json::Value>> {
        let key = |k: &str| format!("{arch}.{k}");
        let factor = self.opt(&key("rope.scaling.factor"), Self::get_f32)?;
        let kind = self.opt(&key("rope.scaling.type"), Self::get_str)?;
        let orig_ctx = self.opt(&key("rope.scaling.original_context_length"), Self::get_u64)?;
        let scaling = match (kind, factor) {
            (None | Some("none"), _) => match self.opt(&key("rope.scale_linear"), Self::get_f32)? {
                Some(f) if f != 1.0 => {
                    json!({"rope_type": "linear", "factor": f32_to_f64_decimal(f)})
                }
                _ => return Ok(None),
            },
            (Some("linear"), Some(f)) => {
                json!({"rope_type": "linear", "factor": f32_to_f64_decimal(f)})
            }
            (Some("yarn"), Some(f)) => {
                let mut v = json!({"rope_type": "yarn", "factor": f32_to_f64_decimal(f)});
                if let Some(n) = orig_ctx {
                    v["original_max_position_embeddings"] = json!(n);
                }
                v
            }
            (Some(other), _) => bail!(
                "GGUF file {}: rope scaling `{other}` (with factor {factor:?}) is not supported",
                self.path.display()
            ),
        };
        Ok(Some(scaling))
    }
}

/// The f64 that prints like the f32 does (`1e-5f32` becomes `1e-5`, not `9.99999974e-6`).
fn f32_to_f64_decimal(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(v as f64)
}

// ---------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------

struct Parsed {
    version: u32,
    alignment: u64,
    data_start: usize,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
}

/// A bounds-checked little-endian reader over the mapped file.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => bail!(
                "truncated GGUF file {}: {} needs {n} bytes at offset {}, but the file has {} bytes",
                self.path.display(),
                what(),
                self.pos,
                self.buf.len()
            ),
        }
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(&|| format!("length of {}", what()))?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= self.remaining())
            .ok_or_else(|| {
                anyhow!(
                    "corrupt or truncated GGUF file {}: {} claims a length of {len} bytes at offset {}, but only {} bytes remain",
                    self.path.display(),
                    what(),
                    self.pos,
                    self.remaining()
                )
            })?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| {
            anyhow!(
                "GGUF file {}: {} is not valid UTF-8 ({e})",
                self.path.display(),
                what()
            )
        })
    }

    /// Reads one value of GGUF value type `ty`.
    fn value(&mut self, ty: u32, depth: u32, what: &dyn Fn() -> String) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(u8::from_le_bytes(self.array(what)?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.array(what)?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.array(what)?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => MetaValue::Bool(self.array::<1>(what)?[0] != 0),
            8 => MetaValue::Str(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    bail!(
                        "corrupt GGUF file {}: {} nests arrays more than {MAX_ARRAY_DEPTH} deep",
                        self.path.display(),
                        what()
                    );
                }
                let elem_ty = self.u32(&|| format!("element type of {}", what()))?;
                let count = self.u64(&|| format!("length of {}", what()))?;
                // Every element takes at least one byte (a string or array at least 8): a
                // count beyond what is left in the file is corruption, not a huge allocation.
                let min_size = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    _ => bail!(
                        "corrupt GGUF file {}: {} has unknown element type {elem_ty}",
                        self.path.display(),
                        what()
                    ),
                };
                let count = usize::try_from(count)
                    .ok()
                    .filter(|&c| c.checked_mul(min_size).is_some_and(|b| b <= self.remaining()))
                    .ok_or_else(|| {
                        anyhow!(
                            "corrupt or truncated GGUF file {}: {} claims {count} elements but only {} bytes remain",
                            self.path.display(),
                            what(),
                            self.remaining()
                        )
                    })?;
                let mut items = Vec::with_capacity(count);
                for i in 0..count {
                    items.push(self.value(elem_ty, depth + 1, &|| format!("{}[{i}]", what()))?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(u64::from_le_bytes(self.array(what)?)),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => bail!(
                "corrupt GGUF file {}: {} has unknown value type {other}",
                self.path.display(),
                what()
            ),
        })
    }
}

fn parse(buf: &[u8], path: &Path) -> Result<Parsed> {
    let mut r = Reader { buf, pos: 0, path };
    let magic = r.array::<4>(&|| "the magic number".into())?;
    if &magic != b"GGUF" {
        bail!(
            "{} is not a GGUF file: it starts with {:?}, expected \"GGUF\"",
            path.display(),
            String::from_utf8_lossy(&magic)
        );
    }
    let version = r.u32(&|| "the version".into())?;
    match version {
        2 | 3 => {}
        1 => bail!(
            "GGUF file {}: version 1 is not supported (re-convert it with a current llama.cpp)",
            path.display()
        ),
        v if v.swap_bytes() <= 3 => bail!(
            "GGUF file {}: big-endian GGUF files are not supported",
            path.display()
        ),
        v => bail!(
            "GGUF file {}: unsupported version {v} (supported: 2, 3)",
            path.display()
        ),
    }
    let n_tensors = r.u64(&|| "the tensor count".into())?;
    let n_kv = r.u64(&|| "the metadata count".into())?;

    // Each key/value takes at least 8 (key length) + 4 (type) + 1 bytes; each tensor info at
    // least 8 + 4 + 8 + 4 + 8. Larger counts cannot be real.
    let fits = |count: u64, min: u64| {
        count
            .checked_mul(min)
            .is_some_and(|b| b <= buf.len() as u64)
    };
    if !fits(n_kv, 13) || !fits(n_tensors, 32) {
        bail!(
            "corrupt or truncated GGUF file {}: header claims {n_kv} metadata entries and {n_tensors} tensors, more than a {}-byte file can hold",
            path.display(),
            buf.len()
        );
    }

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r.string(&|| format!("metadata key #{i}"))?;
        let ty = r.u32(&|| format!("the type of metadata `{key}`"))?;
        let value = r.value(ty, 0, &|| format!("metadata `{key}`"))?;
        if metadata.insert(key.clone(), value).is_some() {
            bail!(
                "corrupt GGUF file {}: metadata key `{key}` appears twice",
                path.display()
            );
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            _ => bail!(
                "GGUF file {}: `general.alignment` must be a power of two, found {v:?}",
                path.display()
            ),
        },
    };

    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut seen = HashMap::new();
    for i in 0..n_tensors {
        let name = r.string(&|| format!("the name of tensor #{i}"))?;
        let what = |field: &str| format!("the {field} of tensor `{name}`");
        let n_dims = r.u32(&|| what("dimension count"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            bail!(
                "corrupt GGUF file {}: tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)",
                path.display()
            );
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&|| what("dimensions"))?);
        }
        let type_id = r.u32(&|| what("type"))?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
            anyhow!(
                "GGUF file {}: tensor `{name}` has unknown ggml type id {type_id}",
                path.display()
            )
        })?;
        let offset = r.u64(&|| what("offset"))?;
        let n_bytes = tensor_n_bytes(&dims, ggml_type)
            .with_context(|| format!("GGUF file {}: tensor `{name}`", path.display()))?;
        if !offset.is_multiple_of(alignment) {
            bail!(
                "corrupt GGUF file {}: tensor `{name}` starts at data offset {offset}, not a multiple of the alignment {alignment}",
                path.display()
            );
        }
        if seen.insert(name.clone(), i).is_some() {
            bail!(
                "corrupt GGUF file {}: tensor `{name}` appears twice",
                path.display()
            );
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            n_bytes,
        });
    }

    let data_start = (r.pos as u64)
        .checked_next_multiple_of(alignment)
        .and_then(|p| usize::try_from(p).ok())
        .ok_or_else(|| anyhow!("corrupt GGUF file {}", path.display()))?;
    for t in &tensors {
        let end = (data_start as u64)
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.n_bytes as u64));
        if end.is_none_or(|e| e > buf.len() as u64) {
            bail!(
                "truncated GGUF file {}: tensor `{}` ({} bytes at data offset {}) ends past the end of the file ({} bytes, data starts at {data_start})",
                path.display(),
                t.name,
                t.n_bytes,
                t.offset,
                buf.len()
            );
        }
    }

    Ok(Parsed {
        version,
        alignment,
        data_start,
        metadata,
        tensors,
    })
}

/// Bytes taken by a tensor of ggml dims `dims` and type `ty`, with overflow checks.
fn tensor_n_bytes(dims: &[u64], ty: GgmlType) -> Result<usize> {
    let (block_elems, block_bytes) = ty.block();
    let mut n: usize = 1;
    for &d in dims {
        n = usize::try_from(d)
            .ok()
            .and_then(|d| n.checked_mul(d))
            .ok_or_else(|| anyhow!("dims {dims:?} overflow"))?;
    }
    let inner = dims[0] as usize;
    if !inner.is_multiple_of(block_elems) {
        bail!("innermost dimension {inner} is not a multiple of the {ty} block size {block_elems}");
    }
    (n / block_elems)
        .checked_mul(block_bytes)
        .ok_or_else(|| anyhow!("dims {dims:?} overflow"))
}

// ---------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------

/// Dequantizes `n_elements` values of type `ty` from `bytes` (which must be exactly their
/// size). Large tensors are split across threads.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    if !ty.can_dequantize() {
        bail!("dequantizing {ty} is not supported (supported: F32, F16, BF16, F64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)");
    }
    let (block_elems, block_bytes) = ty.block();
    if !n_elements.is_multiple_of(block_elems) {
        bail!("{n_elements} elements is not a whole number of {ty} blocks of {block_elems}");
    }
    let n_blocks = n_elements / block_elems;
    if n_blocks.checked_mul(block_bytes) != Some(bytes.len()) {
        bail!(
            "{n_elements} {ty} values take {} bytes, got {}",
            n_blocks.saturating_mul(block_bytes),
            bytes.len()
        );
    }
    let mut out = vec![0f32; n_elements];
    let threads = if n_elements < (1 << 20) {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(16))
    };
    let blocks_per_chunk = n_blocks.div_ceil(threads).max(1);
    if threads == 1 {
        decode_blocks(ty, bytes, &mut out);
    } else {
        std::thread::scope(|s| {
            for (dst, src) in out
                .chunks_mut(blocks_per_chunk * block_elems)
                .zip(bytes.chunks(blocks_per_chunk * block_bytes))
            {
                s.spawn(move || decode_blocks(ty, src, dst));
            }
        });
    }
    Ok(out)
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Decodes whole blocks; `src` and `dst` hold the same number of blocks.
fn decode_blocks(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let (be, bb) = ty.block();
    let blocks = src.chunks_exact(bb).zip(dst.chunks_exact_mut(be));
    match ty {
        GgmlType::F32 => {
            blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = f16_at(b, 0)),
        GgmlType::BF16 => {
            blocks.for_each(|(b, y)| y[0] = half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
        }
        GgmlType::F64 => blocks.for_each(|(b, y)| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            y[0] = f64::from_le_bytes(a) as f32;
        }),
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| dequant_q4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| dequant_q4_1(b, y)),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| dequant_q5_0(b, y)),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| dequant_q5_1(b, y)),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| dequant_q8_0(b, y)),
        GgmlType::Q2_K => blocks.for_each(|(b, y)| dequant_q2_k(b, y)),
        GgmlType::Q3_K => blocks.for_each(|(b, y)| dequant_q3_k(b, y)),
        GgmlType::Q4_K => blocks.for_each(|(b, y)| dequant_q4_k(b, y)),
        GgmlType::Q5_K => blocks.for_each(|(b, y)| dequant_q5_k(b, y)),
        GgmlType::Q6_K => blocks.for_each(|(b, y)| dequant_q6_k(b, y)),
        // `dequantize` rejects every other type before getting here.
        _ => unreachable!("decode_blocks called for {ty}"),
    }
}

// Block layouts (ggml-common.h). 32-element blocks store element j in the low nibble of
// byte j and element j+16 in the high nibble.

/// Q4_0: f16 d, 16 bytes of nibbles; x = (q - 8) * d.
fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: f16 d, f16 m, 16 bytes of nibbles; x = q * d + m.
fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// Q5_0: f16 d, 32 high bits (u32), 16 bytes of low nibbles; x = (q - 16) * d.
fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = (((qs[j] & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

/// Q5_1: f16 d, f16 m, 32 high bits, 16 bytes of low nibbles; x = q * d + m.
fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = ((qs[j] & 0x0F) as u32 | h0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
    }
}

/// Q8_0: f16 d, 32 signed bytes; x = q * d.
fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (yj, &q) in y.iter_mut().zip(&b[2..34]) {
        *yj = q as i8 as f32 * d;
    }
}

/// Q2_K (256 values): 16 bytes of 4-bit scale/min pairs, 64 bytes of 2-bit quants, f16 d,
/// f16 dmin. Sub-block i (16 values) is x = d * (sc & 15) * q - dmin * (sc >> 4).
fn dequant_q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    for (e, ye) in y.iter_mut().enumerate() {
        // Each 128-value half uses 32 bytes; the 2-bit field moves up every 32 values.
        let half = e / 128;
        let shift = 2 * ((e % 128) / 32);
        let q = (qs[half * 32 + e % 32] >> shift) & 3;
        let sc = scales[e / 16];
        *ye = d * (sc & 0x0F) as f32 * q as f32 - dmin * (sc >> 4) as f32;
    }
}

/// 6-bit scale of Q3_K sub-block `i`: low 4 bits from bytes 0..8, high 2 from bytes 8..12.
fn q3_k_scale(scales: &[u8], i: usize) -> i32 {
    let low = if i < 8 {
        scales[i] & 0x0F
    } else {
        scales[i - 8] >> 4
    };
    let high = (scales[8 + i % 4] >> (2 * (i / 4))) & 3;
    (low | (high << 4)) as i32 - 32
}

/// Q3_K (256 values): 32 bytes of high-bit mask, 64 bytes of 2-bit quants, 12 bytes of 6-bit
/// signed scales, f16 d. x = d * scale * (q - (high bit set ? 0 : 4)).
fn dequant_q3_k(b: &[u8], y: &mut [f32]) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let scales = &b[96..108];
    let d = f16_at(b, 108);
    for (e, ye) in y.iter_mut().enumerate() {
        let half = e / 128;
        let shift = 2 * ((e % 128) / 32);
        let low = ((qs[half * 32 + e % 32] >> shift) & 3) as i32;
        let high_set = (hmask[e % 32] >> (e / 32)) & 1 == 1;
        let q = low - if high_set { 0 } else { 4 };
        *ye = d * q3_k_scale(scales, e / 16) as f32 * q as f32;
    }
}

/// Scale and min (6 bits each) of Q4_K/Q5_K sub-block `j` (0..8), packed in 12 bytes:
/// j < 4 in the low 6 bits of bytes j and j+4; j >= 4 in the nibbles of byte j+4 plus the
/// top 2 bits of bytes j-4 (scale) and j (min).
fn k4_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// Q4_K (256 values): f16 d, f16 dmin, 12 bytes of scales/mins, 128 bytes of nibbles.
/// Sub-block j (32 values): x = d * sc_j * q - dmin * m_j. Each 64-value chunk uses 32
/// bytes: the first 32 values in the low nibbles, the next 32 in the high nibbles.
fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (e, ye) in y.iter_mut().enumerate() {
        let j = e / 32;
        let (sc, m) = k4_scale_min(scales, j);
        let byte = qs[(e / 64) * 32 + e % 32];
        let q = if j % 2 == 0 { byte & 0x0F } else { byte >> 4 };
        *ye = d * sc as f32 * q as f32 - dmin * m as f32;
    }
}

/// Q5_K (256 values): like Q4_K plus 32 bytes of fifth bits (bit j of byte l belongs to
/// value 32 * j + l).
fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (e, ye) in y.iter_mut().enumerate() {
        let j = e / 32;
        let (sc, m) = k4_scale_min(scales, j);
        let byte = qs[(e / 64) * 32 + e % 32];
        let low = if j % 2 == 0 { byte & 0x0F } else { byte >> 4 };
        let high = (qh[e % 32] >> j) & 1;
        let q = low | (high << 4);
        *ye = d * sc as f32 * q as f32 - dmin * m as f32;
    }
}

/// Q6_K (256 values): 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 signed
/// 8-bit scales, f16 d. x = d * scale[e / 16] * (q - 32). Per 128-value half, low nibbles
/// come from 64 bytes (values 0..64 low nibbles, 64..128 high nibbles) and the high bits
/// from 32 bytes (2 bits per 32-value group).
fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = f16_at(b, 208);
    for (e, ye) in y.iter_mut().enumerate() {
        let half = e / 128;
        let r = e % 128;
        let lbyte = ql[half * 64 + r % 64];
        let low = if r < 64 { lbyte & 0x0F } else { lbyte >> 4 };
        let high = (qh[half * 32 + r % 32] >> (2 * (r / 32))) & 3;
        let q = (low | (high << 4)) as i32 - 32;
        *ye = d * (scales[e / 16] as i8) as f32 * q as f32;
    }
}

// ---------------------------------------------------------------------------------------
// Llama q/k permutation and tensor names
// ---------------------------------------------------------------------------------------

/// Whether llama.cpp's converter permuted the `attn_q`/`attn_k` rows for this architecture
/// (it does for Llama, whose ggml RoPE rotates adjacent pairs; Qwen2/3 use the NeoX rotation
/// and are stored unpermuted).
pub fn arch_permutes_qk(arch: &str) -> bool {
    arch == "llama"
}

fn check_qk_dims(len: usize, n_head: usize, rows: usize, cols: usize) -> Result<usize> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        bail!("cannot (un)permute {rows} rows into {n_head} heads of an even size");
    }
    if rows.checked_mul(cols) != Some(len) {
        bail!("data has {len} values, expected {rows} x {cols}");
    }
    Ok(rows / n_head / 2)
}

/// llama.cpp's `permute` (convert_hf_to_gguf.py): within each head, row `i * half + j`
/// (HF, first and second rotary halves) moves to row `2 * j + i` (interleaved pairs).
/// `data` is `[rows, cols]` row-major. Kept public for tests and for writing GGUF files.
pub fn permute_qk(data: &[f32], n_head: usize, rows: usize, cols: usize) -> Result<Vec<f32>> {
    let half = check_qk_dims(data.len(), n_head, rows, cols)?;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                let src = h * 2 * half + i * half + j;
                let dst = h * 2 * half + 2 * j + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// Inverse of [`permute_qk`]: restores the HF row order of a GGUF `attn_q` (with `n_head`)
/// or `attn_k` (with the KV head count) weight `[rows, cols]`, or of a bias (`cols = 1`).
pub fn unpermute_qk(data: &[f32], n_head: usize, rows: usize, cols: usize) -> Result<Vec<f32>> {
    let half = check_qk_dims(data.len(), n_head, rows, cols)?;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                let hf = h * 2 * half + i * half + j;
                let gguf = h * 2 * half + 2 * j + i;
                out[hf * cols..(hf + 1) * cols]
                    .copy_from_slice(&data[gguf * cols..(gguf + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// The HF checkpoint name of a GGUF tensor (`blk.3.attn_q.weight` ->
/// `model.layers.3.self_attn.q_proj.weight`), or `None` for tensors with no HF counterpart
/// (e.g. `rope_freqs.weight`) or unknown names.
pub fn gguf_to_hf_name(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let (module, param) = rest.rsplit_once('.')?;
    if param != "weight" && param != "bias" {
        return None;
    }
    let hf_module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{param}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const SMOLLM: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    const QUANT_FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/gguf_quants/quants.gguf"
    );

    fn smollm() -> Option<Gguf> {
        if !Path::new(SMOLLM).exists() {
            eprintln!("note: {SMOLLM} is absent (run scripts/fetch_assets.sh); skipping");
            return None;
        }
        Some(Gguf::open(SMOLLM).expect("open SmolLM2 GGUF"))
    }

    /// Deterministic pseudo-random numbers (splitmix64) so tests need no extra crate.
    struct Rng(u64);
    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Uniform in [-1, 1).
        fn next_f32(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    // --- a minimal GGUF writer, following the format description ------------------------

    enum W {
        U32(u32),
        F32(f32),
        Str(&'static str),
        StrArray(Vec<&'static str>),
        I32Array(Vec<i32>),
        Raw(u32, Vec<u8>),
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    struct TestTensor {
        name: &'static str,
        ne: Vec<u64>,
        ty: u32,
        data: Vec<u8>,
    }

    fn write_gguf(
        version: u32,
        kv: &[(&str, W)],
        tensors: &[TestTensor],
        alignment: u64,
    ) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(version.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((kv.len() as u64).to_le_bytes());
        for (k, v) in kv {
            put_str(&mut out, k);
            match v {
                W::U32(x) => {
                    out.extend(4u32.to_le_bytes());
                    out.extend(x.to_le_bytes());
                }
                W::F32(x) => {
                    out.extend(6u32.to_le_bytes());
                    out.extend(x.to_le_bytes());
                }
                W::Str(s) => {
                    out.extend(8u32.to_le_bytes());
                    put_str(&mut out, s);
                }
                W::StrArray(a) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(8u32.to_le_bytes());
                    out.extend((a.len() as u64).to_le_bytes());
                    a.iter().for_each(|s| put_str(&mut out, s));
                }
                W::I32Array(a) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(5u32.to_le_bytes());
                    out.extend((a.len() as u64).to_le_bytes());
                    a.iter().for_each(|x| out.extend(x.to_le_bytes()));
                }
                W::Raw(ty, bytes) => {
                    out.extend(ty.to_le_bytes());
                    out.extend(bytes);
                }
            }
        }
        let mut offset = 0u64;
        let mut offsets = vec![];
        for t in tensors {
            put_str(&mut out, t.name);
            out.extend((t.ne.len() as u32).to_le_bytes());
            t.ne.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(t.ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len() as u64).next_multiple_of(alignment);
        }
        let start = (out.len() as u64).next_multiple_of(alignment);
        out.resize(start as usize, 0);
        for (t, off) in tensors.iter().zip(offsets) {
            out.resize((start + off) as usize, 0);
            out.extend(&t.data);
        }
        out
    }

    fn write_tmp(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        f
    }

    // --- quantizers written from the ggml format definitions ----------------------------

    fn f16_bytes(x: f32) -> [u8; 2] {
        half::f16::from_f32(x).to_le_bytes()
    }
    fn f16_round(x: f32) -> f32 {
        half::f16::from_f32(x).to_f32()
    }

    /// Q8_0: d = max|x| / 127, q = round(x / d). Returns (bytes, expected dequantized).
    fn quantize_q8_0(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
        let (mut bytes, mut expect) = (vec![], vec![]);
        for blk in x.chunks(32) {
            let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            bytes.extend(f16_bytes(d));
            for &v in blk {
                let q = (v * id).round() as i8;
                bytes.push(q as u8);
                expect.push(q as f32 * f16_round(d));
            }
        }
        (bytes, expect)
    }

    /// Q4_0: d = (signed value of largest magnitude) / -8, q = clamp(round(x / d) + 8, 0, 15),
    /// element j in the low nibble of byte j, element j + 16 in its high nibble.
    fn quantize_q4_0(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
        let (mut bytes, mut expect) = (vec![], vec![0f32; x.len()]);
        for (b, blk) in x.chunks(32).enumerate() {
            let max = blk
                .iter()
                .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            bytes.extend(f16_bytes(d));
            let q: Vec<u8> = blk
                .iter()
                .map(|&v| ((v * id + 8.5) as i32).clamp(0, 15) as u8)
                .collect();
            for j in 0..16 {
                bytes.push(q[j] | (q[j + 16] << 4));
            }
            for (j, &qj) in q.iter().enumerate() {
                expect[b * 32 + j] = (qj as f32 - 8.0) * f16_round(d);
            }
        }
        (bytes, expect)
    }

    #[test]
    fn synthetic_file_all_paths() {
        let mut rng = Rng(7);
        // [out = 3, in = 64]: ne = [64, 3].
        let x: Vec<f32> = (0..192).map(|_| rng.next_f32() * 2.0).collect();
        let f32_bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f16_data: Vec<u8> = x.iter().flat_map(|&v| f16_bytes(v)).collect();
        let bf16_data: Vec<u8> = x
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let (q8, q8_expect) = quantize_q8_0(&x);
        let (q4, q4_expect) = quantize_q4_0(&x);
        let t = |name, ty, data: &Vec<u8>| TestTensor {
            name,
            ne: vec![64, 3],
            ty,
            data: data.clone(),
        };
        let bytes = write_gguf(
            3,
            &[
                ("general.architecture", W::Str("llama")),
                ("general.alignment", W::U32(64)),
                ("llama.embedding_length", W::U32(64)),
                ("llama.rope.freq_base", W::F32(500000.0)),
                ("tokenizer.ggml.tokens", W::StrArray(vec!["a", "b", "ü"])),
                ("tokenizer.ggml.token_type", W::I32Array(vec![1, 3, -2])),
                // nested array: [[1u8, 2u8], []]
                (
                    "nested",
                    W::Raw(9, {
                        let mut v = 9u32.to_le_bytes().to_vec();
                        v.extend(2u64.to_le_bytes());
                        v.extend(0u32.to_le_bytes());
                        v.extend(2u64.to_le_bytes());
                        v.extend([1u8, 2u8]);
                        v.extend(0u32.to_le_bytes());
                        v.extend(0u64.to_le_bytes());
                        v
                    }),
                ),
                ("i64", W::Raw(11, (-5i64).to_le_bytes().to_vec())),
                ("f64", W::Raw(12, 0.25f64.to_le_bytes().to_vec())),
                ("flag", W::Raw(7, vec![1])),
            ],
            &[
                t("f32", 0, &f32_bytes),
                t("f16", 1, &f16_data),
                t("bf16", 30, &bf16_data),
                t("q8_0", 8, &q8),
                t("q4_0", 2, &q4),
            ],
            64,
        );
        let file = write_tmp(&bytes);
        let g = Gguf::open(file.path()).unwrap();
        assert_eq!(g.version(), 3);
        assert_eq!(g.alignment(), 64);
        assert_eq!(g.get_u32("llama.embedding_length").unwrap(), 64);
        assert_eq!(g.get_u64("llama.embedding_length").unwrap(), 64);
        assert_eq!(g.get_f32("llama.rope.freq_base").unwrap(), 500000.0);
        assert_eq!(
            g.get_str_array("tokenizer.ggml.tokens").unwrap(),
            ["a", "b", "ü"]
        );
        assert_eq!(
            g.get_i32_array("tokenizer.ggml.token_type").unwrap(),
            [1, 3, -2]
        );
        assert_eq!(
            g.get("nested").unwrap(),
            &MetaValue::Array(vec![
                MetaValue::Array(vec![MetaValue::U8(1), MetaValue::U8(2)]),
                MetaValue::Array(vec![]),
            ])
        );
        assert_eq!(g.get_i64("i64").unwrap(), -5);
        assert!(g.get_u64("i64").is_err(), "negative value is not a u64");
        assert_eq!(g.get_f32("f64").unwrap(), 0.25);
        assert!(g.get_bool("flag").unwrap());
        let err = g.get_str("llama.embedding_length").unwrap_err().to_string();
        assert!(
            err.contains("should be a string") && err.contains("llama.embedding_length"),
            "{err}"
        );
        let err = g.get_u32("missing.key").unwrap_err().to_string();
        assert!(err.contains("missing metadata key `missing.key`"), "{err}");
        assert_eq!(g.opt("missing.key", Gguf::get_u32).unwrap(), None);

        for t in g.tensors() {
            assert_eq!(t.offset % 64, 0);
            assert_eq!(t.shape(), [3, 64]);
        }
        let (v, shape) = g.tensor_f32("f32").unwrap();
        assert_eq!((v, shape), (x.clone(), vec![3, 64]));
        let (v, _) = g.tensor_f32("f16").unwrap();
        assert_eq!(v, x.iter().map(|&a| f16_round(a)).collect::<Vec<_>>());
        let (v, _) = g.tensor_f32("bf16").unwrap();
        assert_eq!(
            v,
            x.iter()
                .map(|&a| half::bf16::from_f32(a).to_f32())
                .collect::<Vec<_>>()
        );
        let (v, _) = g.tensor_f32("q8_0").unwrap();
        assert_eq!(v, q8_expect);
        // Round trip error bounded by half a quantization step.
        for (blk, vb) in x.chunks(32).zip(v.chunks(32)) {
            let step = blk.iter().fold(0f32, |a, b| a.max(b.abs())) / 127.0;
            for (a, b) in blk.iter().zip(vb) {
                // Half a step, plus the f16 rounding of d (127 * 2^-11 steps at most).
                assert!((a - b).abs() <= step * 0.57, "{a} vs {b}");
            }
        }
        let (v, _) = g.tensor_f32("q4_0").unwrap();
        assert_eq!(v, q4_expect);
        for (blk, vb) in x.chunks(32).zip(v.chunks(32)) {
            let step = blk.iter().fold(0f32, |a, b| a.max(b.abs())) / 8.0;
            for (a, b) in blk.iter().zip(vb) {
                // One step at most: the value opposite the largest one clamps at q = 15.
                assert!((a - b).abs() <= step * 1.01, "{a} vs {b}");
            }
        }
        let err = format!("{:#}", g.tensor_f32("nope").unwrap_err());
        assert!(
            err.contains("no tensor named `nope`")
                && err.contains(&file.path().display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn malformed_files_are_errors_not_panics() {
        let good = write_gguf(
            3,
            &[("general.architecture", W::Str("llama"))],
            &[TestTensor {
                name: "w",
                ne: vec![32, 2],
                ty: 8,
                data: vec![0; 68],
            }],
            32,
        );
        let open = |bytes: &[u8]| {
            Gguf::open(write_tmp(bytes).path())
                .map(|_| ())
                .map_err(|e| anyhow!("{e:#}"))
        };
        open(&good).unwrap();

        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(open(&bad)
            .unwrap_err()
            .to_string()
            .contains("not a GGUF file"));

        // Every truncation of the file is a clean error.
        for cut in 0..good.len() {
            let err = open(&good[..cut]).unwrap_err().to_string();
            assert!(
                err.contains("truncated") || err.contains("not a GGUF"),
                "cut {cut}: {err}"
            );
        }
        let err = open(&good[..good.len() - 1]).unwrap_err().to_string();
        assert!(err.contains("tensor `w`"), "{err}");

        // Version 1 and big-endian files.
        let mut v1 = good.clone();
        v1[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(open(&v1).unwrap_err().to_string().contains("version 1"));
        let mut be = good.clone();
        be[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert!(open(&be).unwrap_err().to_string().contains("big-endian"));

        // Absurd counts and lengths do not allocate or panic.
        let mut huge = good.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(open(&huge).unwrap_err().to_string().contains("corrupt"));
        let mut long_key = good.clone();
        long_key[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        assert!(open(&long_key).is_err());
        let huge_array = write_gguf(
            3,
            &[(
                "a",
                W::Raw(
                    9,
                    [8u32.to_le_bytes().to_vec(), u64::MAX.to_le_bytes().to_vec()].concat(),
                ),
            )],
            &[],
            32,
        );
        assert!(open(&huge_array)
            .unwrap_err()
            .to_string()
            .contains("claims"));

        // Unknown tensor type and value type.
        let bad_type = write_gguf(
            3,
            &[],
            &[TestTensor {
                name: "w",
                ne: vec![32],
                ty: 99,
                data: vec![0; 4],
            }],
            32,
        );
        assert!(open(&bad_type)
            .unwrap_err()
            .to_string()
            .contains("unknown ggml type id 99"));
        let bad_value = write_gguf(3, &[("k", W::Raw(77, vec![]))], &[], 32);
        assert!(open(&bad_value)
            .unwrap_err()
            .to_string()
            .contains("unknown value type 77"));
        // Rows not a whole number of blocks.
        let ragged = write_gguf(
            3,
            &[],
            &[TestTensor {
                name: "w",
                ne: vec![33, 1],
                ty: 8,
                data: vec![0; 68],
            }],
            32,
        );
        assert!(open(&ragged)
            .unwrap_err()
            .to_string()
            .contains("block size"));
        // Unsupported type: opens, but dequantizing names the tensor and the type.
        let iq = write_gguf(
            3,
            &[],
            &[TestTensor {
                name: "w",
                ne: vec![256],
                ty: 16,
                data: vec![0; 66],
            }],
            32,
        );
        let file = write_tmp(&iq);
        let g = Gguf::open(file.path()).unwrap();
        let err = format!("{:#}", g.tensor_f32("w").unwrap_err());
        assert!(err.contains("`w`") && err.contains("IQ2_XXS"), "{err}");
    }

    /// Checks the dequantizers against llama.cpp's own Python reference (gguf-py
    /// `gguf.quants.dequantize`), through a file written by gguf-py's `GGUFWriter`:
    /// see scripts/fixtures/gguf_quants.py.
    #[test]
    fn dequant_matches_gguf_py_reference() {
        let g = Gguf::open(QUANT_FIXTURE).expect("fixture tests/fixtures/gguf_quants/quants.gguf");
        // Metadata of every scalar type written by gguf-py.
        assert_eq!(g.get("test.u8"), Some(&MetaValue::U8(200)));
        assert_eq!(g.get("test.i8"), Some(&MetaValue::I8(-100)));
        assert_eq!(g.get("test.u16"), Some(&MetaValue::U16(60000)));
        assert_eq!(g.get("test.i16"), Some(&MetaValue::I16(-30000)));
        assert_eq!(g.get("test.u32"), Some(&MetaValue::U32(4_000_000_000)));
        assert_eq!(g.get("test.i32"), Some(&MetaValue::I32(-2_000_000_000)));
        assert_eq!(g.get("test.u64"), Some(&MetaValue::U64(1 << 40)));
        assert_eq!(g.get("test.i64"), Some(&MetaValue::I64(-(1 << 40))));
        assert_eq!(g.get("test.f32"), Some(&MetaValue::F32(1.5)));
        assert_eq!(g.get("test.f64"), Some(&MetaValue::F64(-2.25)));
        assert_eq!(g.get("test.bool"), Some(&MetaValue::Bool(true)));
        assert_eq!(g.get_str("test.str").unwrap(), "héllo wörld");
        assert_eq!(g.get_str_array("test.str_array").unwrap(), ["a", "", "ü"]);
        assert_eq!(g.get_f32_array("test.f32_array").unwrap(), [0.5, -1.0]);
        assert_eq!(g.get_i32_array("test.i32_array").unwrap(), [1, -2, 3]);

        let mut checked = vec![];
        for t in g.tensors() {
            let Some(ty) = t.name.strip_prefix("q.") else {
                continue;
            };
            let (got, shape) = g.tensor_f32(&t.name).unwrap();
            let (want, want_shape) = g.tensor_f32(&format!("ref.{ty}")).unwrap();
            assert_eq!(shape, want_shape, "{ty}");
            assert_eq!(t.ggml_type.name(), ty);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                // gguf-py computes in f32 too; allow one rounding of difference in the order
                // of operations.
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                    "{ty}[{i}]: {a} vs {b}"
                );
            }
            checked.push(ty.to_string());
        }
        checked.sort();
        assert_eq!(
            checked,
            [
                "BF16", "F16", "Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K",
                "Q6_K", "Q8_0"
            ]
        );
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let mut rng = Rng(42);
        for &(n_head, head_dim, cols) in &[(1, 2, 1), (9, 64, 5), (3, 8, 7), (4, 16, 1), (2, 6, 3)]
        {
            let rows = n_head * head_dim;
            let x: Vec<f32> = (0..rows * cols).map(|_| rng.next_f32()).collect();
            let p = permute_qk(&x, n_head, rows, cols).unwrap();
            assert_eq!(unpermute_qk(&p, n_head, rows, cols).unwrap(), x);
            assert_eq!(
                permute_qk(
                    &unpermute_qk(&x, n_head, rows, cols).unwrap(),
                    n_head,
                    rows,
                    cols
                )
                .unwrap(),
                x
            );
        }
        // llama.cpp: w.reshape(n_head, 2, half, cols).swapaxes(1, 2).reshape(rows, cols).
        // Rows of one head [a0 a1 a2 b0 b1 b2] become [a0 b0 a1 b1 a2 b2].
        let x: Vec<f32> = (0..12).map(|i| i as f32).collect();
        assert_eq!(
            permute_qk(&x, 2, 12, 1).unwrap(),
            [0., 3., 1., 4., 2., 5., 6., 9., 7., 10., 8., 11.]
        );
        assert!(unpermute_qk(&x, 5, 12, 1).is_err());
        assert!(unpermute_qk(&x, 2, 6, 3).is_err());
    }

    #[test]
    fn hf_names() {
        let cases = [
            ("token_embd.weight", Some("model.embed_tokens.weight")),
            ("output_norm.weight", Some("model.norm.weight")),
            ("output.weight", Some("lm_head.weight")),
            (
                "blk.0.attn_q.weight",
                Some("model.layers.0.self_attn.q_proj.weight"),
            ),
            (
                "blk.12.attn_k.bias",
                Some("model.layers.12.self_attn.k_proj.bias"),
            ),
            (
                "blk.3.attn_v.weight",
                Some("model.layers.3.self_attn.v_proj.weight"),
            ),
            (
                "blk.3.attn_output.weight",
                Some("model.layers.3.self_attn.o_proj.weight"),
            ),
            (
                "blk.3.attn_norm.weight",
                Some("model.layers.3.input_layernorm.weight"),
            ),
            (
                "blk.3.ffn_norm.weight",
                Some("model.layers.3.post_attention_layernorm.weight"),
            ),
            (
                "blk.3.ffn_gate.weight",
                Some("model.layers.3.mlp.gate_proj.weight"),
            ),
            (
                "blk.3.ffn_up.weight",
                Some("model.layers.3.mlp.up_proj.weight"),
            ),
            (
                "blk.3.ffn_down.weight",
                Some("model.layers.3.mlp.down_proj.weight"),
            ),
            (
                "blk.3.attn_q_norm.weight",
                Some("model.layers.3.self_attn.q_norm.weight"),
            ),
            ("rope_freqs.weight", None),
            ("blk.x.attn_q.weight", None),
            ("blk.1.attn_q.scale", None),
            ("blk.1.mystery.weight", None),
        ];
        for (g, hf) in cases {
            assert_eq!(gguf_to_hf_name(g).as_deref(), hf, "{g}");
        }
    }

    #[test]
    fn smollm_metadata_and_config() {
        let Some(g) = smollm() else { return };
        assert_eq!(g.version(), 3);
        assert_eq!(g.architecture().unwrap(), "llama");
        assert_eq!(g.get_u32("llama.block_count").unwrap(), 30);
        assert_eq!(g.get_u32("llama.embedding_length").unwrap(), 576);
        assert_eq!(g.get_u32("llama.feed_forward_length").unwrap(), 1536);
        assert_eq!(g.get_u32("llama.attention.head_count").unwrap(), 9);
        assert_eq!(g.get_u32("llama.attention.head_count_kv").unwrap(), 3);
        assert_eq!(g.get_u32("llama.context_length").unwrap(), 8192);
        assert_eq!(g.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
        assert_eq!(
            g.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(),
            1e-5
        );
        assert_eq!(g.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
        assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
        let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap();
        assert_eq!(tokens.len(), 49152);
        assert_eq!(
            &tokens[..3],
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        );
        assert_eq!(g.get_str_array("tokenizer.ggml.merges").unwrap()[0], "Ġ t");
        assert!(g
            .get_str("tokenizer.chat_template")
            .unwrap()
            .starts_with("{% for message in messages %}"));

        let cfg = g.model_config().unwrap();
        let want = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "head_dim": 64,
            "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0,
            "vocab_size": 49152,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": true,
            "attention_bias": false,
            "hidden_act": "silu",
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
        });
        assert_eq!(cfg, want);
    }

    #[test]
    fn smollm_tensor_shapes() {
        let Some(g) = smollm() else { return };
        assert_eq!(g.tensors().len(), 272);
        let shape = |n: &str| g.tensor_info(n).unwrap().shape();
        assert_eq!(shape("token_embd.weight"), [49152, 576]);
        assert_eq!(shape("output_norm.weight"), [576]);
        assert_eq!(shape("blk.0.attn_q.weight"), [576, 576]);
        assert_eq!(shape("blk.0.attn_k.weight"), [192, 576]);
        assert_eq!(shape("blk.0.attn_v.weight"), [192, 576]);
        assert_eq!(shape("blk.29.ffn_gate.weight"), [1536, 576]);
        assert_eq!(shape("blk.29.ffn_down.weight"), [576, 1536]);
        assert_eq!(
            g.tensor_info("token_embd.weight").unwrap().ggml_type,
            GgmlType::Q8_0
        );
        assert_eq!(
            g.tensor_info("blk.0.attn_q.weight").unwrap().ggml_type,
            GgmlType::Q4_1
        );
        assert!(!g.has_tensor("output.weight"));
        for t in g.tensors() {
            assert!(gguf_to_hf_name(&t.name).is_some(), "{}", t.name);
        }
        let (v, shape) = g.tensor_f32("blk.0.attn_norm.weight").unwrap();
        assert_eq!(shape, [576]);
        assert!(v.iter().all(|x| x.is_finite()) && v.iter().any(|&x| x != 0.0));
    }

    /// Q4_1 block 0 of `blk.0.attn_q.weight`, decoded by hand from the raw bytes: f16 d at
    /// bytes 0..2, f16 m at 2..4, then 16 bytes whose low nibble is element j and high nibble
    /// element j + 16; value = d * q + m.
    #[test]
    fn smollm_q4_1_by_hand() {
        let Some(g) = smollm() else { return };
        let info = g.tensor_info("blk.0.attn_q.weight").unwrap().clone();
        // Read the block with plain file I/O rather than through the mmap.
        let raw = std::fs::read(SMOLLM).unwrap();
        let data_start = g.data_start;
        let b = &raw[data_start + info.offset as usize..][..40];
        let d = half::f16::from_bits(u16::from(b[0]) | (u16::from(b[1]) << 8)).to_f32();
        let m = half::f16::from_bits(u16::from(b[2]) | (u16::from(b[3]) << 8)).to_f32();
        let (v, _) = g.tensor_f32("blk.0.attn_q.weight").unwrap();
        for (j, &byte) in b[4..20].iter().enumerate() {
            assert_eq!(v[j], d * f32::from(byte % 16) + m, "element {j}");
            assert_eq!(
                v[j + 16],
                d * f32::from(byte / 16) + m,
                "element {}",
                j + 16
            );
        }
        // Second block (bytes 20..40) continues the same row.
        let d2 = half::f16::from_bits(u16::from(b[20]) | (u16::from(b[21]) << 8)).to_f32();
        let m2 = half::f16::from_bits(u16::from(b[22]) | (u16::from(b[23]) << 8)).to_f32();
        assert_eq!(v[32 + 5], d2 * f32::from(b[24 + 5] % 16) + m2);
        assert_eq!(v[32 + 21], d2 * f32::from(b[24 + 5] / 16) + m2);
        // Weights of a trained model: small, finite, not all equal.
        assert!(v.iter().all(|x| x.is_finite() && x.abs() < 10.0));
        let (vk, _) = g.tensor_f32("token_embd.weight").unwrap();
        assert_eq!(vk.len(), 49152 * 576);
    }

    #[test]
    fn smollm_hf_layout_unpermutes_q_and_k_only() {
        let Some(g) = smollm() else { return };
        let (q, _) = g.tensor_f32("blk.0.attn_q.weight").unwrap();
        let (q_hf, shape) = g.tensor_f32_hf("blk.0.attn_q.weight").unwrap();
        assert_eq!(q_hf, unpermute_qk(&q, 9, 576, 576).unwrap());
        assert_eq!(shape, [576, 576]);
        let (k, _) = g.tensor_f32("blk.0.attn_k.weight").unwrap();
        let (k_hf, _) = g.tensor_f32_hf("blk.0.attn_k.weight").unwrap();
        assert_eq!(k_hf, unpermute_qk(&k, 3, 192, 576).unwrap());
        assert_ne!(k_hf, k);
        let (v, _) = g.tensor_f32("blk.0.attn_v.weight").unwrap();
        assert_eq!(g.tensor_f32_hf("blk.0.attn_v.weight").unwrap().0, v);
    }

    #[test]
    fn a_block_count_its_tensors_contradict_is_a_corrupt_file() {
        let kv = |blocks: u32| {
            vec![
                ("general.architecture", W::Str("llama")),
                ("llama.block_count", W::U32(blocks)),
                ("llama.embedding_length", W::U32(8)),
                ("llama.feed_forward_length", W::U32(16)),
                ("llama.attention.head_count", W::U32(2)),
                ("llama.context_length", W::U32(64)),
                ("llama.vocab_size", W::U32(4)),
                ("llama.attention.layer_norm_rms_epsilon", W::F32(1e-5)),
            ]
        };
        let norm = |name| TestTensor {
            name,
            ne: vec![8],
            ty: 0,
            data: vec![0; 32],
        };
        let tensors = [
            norm("blk.0.attn_norm.weight"),
            norm("blk.1.attn_norm.weight"),
        ];
        let ok = write_tmp(&write_gguf(3, &kv(2), &tensors, 32));
        let cfg = Gguf::open(ok.path()).unwrap().model_config().unwrap();
        assert_eq!(cfg["num_hidden_layers"], 2);
        let bad = write_tmp(&write_gguf(3, &kv(3_000_000), &tensors, 32));
        let e = Gguf::open(bad.path()).unwrap().model_config().unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("corrupt") && e.contains("block_count"), "{e}");
    }
}
