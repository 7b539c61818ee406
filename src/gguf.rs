//! Reader for GGUF model files (llama.cpp / ggml format, versions 2 and 3); `write` writes v3.
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

mod dequant;
mod names;
mod types;
mod write;

pub use dequant::dequantize;
pub use names::{arch_permutes_qk, gguf_to_hf_name, hf_to_gguf_name, permute_qk, unpermute_qk};
pub use types::{GgmlType, MetaValue, TensorInfo};
pub use write::{encode, quantize_q8_0, write_gguf, TensorSpec};

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

#[cfg(test)]
mod tests;
