//! Loading a base model, layer by layer, from a Hugging Face folder (safetensors, sharded or not)
//! or a GGUF file. Each linear of a block is quantized as soon as it is read, so the
//! full-precision weights of the whole model never coexist in memory.

use super::config::LlamaConfig;
use super::linear::BaseLinear;
use super::llama::{rope_inv_freq, Block, Llama};
use super::weights::view_to_f32;
use anyhow::{bail, ensure, Context, Result};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where tensors come from, by their Hugging Face names.
pub trait TensorSource {
    /// The tensor's f32 values and shape (HF order, `[out, in]` for linears).
    fn read(&mut self, name: &str) -> Result<(Vec<f32>, Vec<usize>)>;
    fn contains(&self, name: &str) -> bool;
}

/// A Hugging Face model folder: `model.safetensors` or shards listed in
/// `model.safetensors.index.json`, each memory-mapped.
pub struct SafetensorsSource {
    shards: Vec<(PathBuf, memmap2::Mmap)>,
    /// tensor name -> shard index
    index: BTreeMap<String, usize>,
}

impl SafetensorsSource {
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("{}: cannot read", index_path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", index_path.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{}: `weight_map` missing", index_path.display()))?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|x| x.as_str().map(String::from))
                .collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let single = dir.join("model.safetensors");
            ensure!(
                single.exists(),
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            );
            vec![single]
        };
        let mut shards = Vec::new();
        let mut index = BTreeMap::new();
        for (i, f) in files.into_iter().enumerate() {
            let file =
                std::fs::File::open(&f).with_context(|| format!("{}: cannot open", f.display()))?;
            // Safety: the file is opened read-only and not modified while mapped.
            let mmap = unsafe { memmap2::Mmap::map(&file) }
                .with_context(|| format!("{}: cannot map", f.display()))?;
            let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
                anyhow::anyhow!("{}: not a valid safetensors file ({e})", f.display())
            })?;
            for name in st.names() {
                index.insert(name.to_string(), i);
            }
            shards.push((f, mmap));
        }
        Ok(Self { shards, index })
    }
}

impl TensorSource for SafetensorsSource {
    fn read(&mut self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let &i = self
            .index
            .get(name)
            .with_context(|| format!("tensor `{name}` missing"))?;
        let (path, mmap) = &self.shards[i];
        let st = safetensors::SafeTensors::deserialize(mmap)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let view = st.tensor(name)?;
        let values =
            view_to_f32(&view).with_context(|| format!("{}: tensor `{name}`", path.display()))?;
        Ok((values, view.shape().to_vec()))
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}

/// Options for building the base.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Store the seven linears of every block as NF4 (double-quantized).
    pub quantize: bool,
}

fn read_shaped(src: &mut dyn TensorSource, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let (v, s) = src.read(name)?;
    ensure!(
        s == shape,
        "tensor `{name}` has shape {s:?}, expected {shape:?}"
    );
    // A NaN or infinity in a base weight poisons every forward pass: the file is corrupt.
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        bail!(
            "tensor `{name}`: value {i} is {} (the weights hold NaN/inf: the file is corrupt)",
            v[i]
        );
    }
    Ok(v)
}

fn vec1<B: Backend>(v: Vec<f32>, device: &B::Device) -> Tensor<B, 1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

impl<B: Backend> Llama<B> {
    /// Builds the model from any tensor source, one block at a time.
    pub fn load(
        cfg: LlamaConfig,
        src: &mut dyn TensorSource,
        opts: LoadOptions,
        device: &B::Device,
    ) -> Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = read_shaped(src, "model.embed_tokens.weight", &[v, h])?;
        let embed = Tensor::from_data(TensorData::new(embed, [v, h]), device);
        // An untied table is only looked up (its rows cast to f32): bf16 on CUDA, as the dense
        // weights (`model::ops::dense_at_rest`). A tied one is also the LM head's f32 matmul operand.
        let embed = if cfg.tie_word_embeddings {
            embed
        } else {
            super::ops::dense_at_rest(embed)
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut lin = |module: &str| -> Result<BaseLinear<B>> {
                let group = if module.ends_with("_proj")
                    && ["q_proj", "k_proj", "v_proj", "o_proj"].contains(&module)
                {
                    "self_attn"
                } else {
                    "mlp"
                };
                let (out, inp) = cfg.linear_shape(module).expect("known module");
                let name = format!("{p}.{group}.{module}");
                let w = read_shaped(src, &format!("{name}.weight"), &[out, inp])?;
                let bias_name = format!("{name}.bias");
                // Qwen2's q/k/v biases are required; any other bias is read when present.
                let required =
                    cfg.attention_bias && ["q_proj", "k_proj", "v_proj"].contains(&module);
                let bias = if required || src.contains(&bias_name) {
                    Some(read_shaped(src, &bias_name, &[out])?)
                } else {
                    None
                };
                BaseLinear::new(w, out, inp, bias, opts.quantize, device)
                    .with_context(|| format!("tensor `{name}.weight`"))
            };
            let block = Block {
                q_proj: lin("q_proj")?,
                k_proj: lin("k_proj")?,
                v_proj: lin("v_proj")?,
                o_proj: lin("o_proj")?,
                gate_proj: lin("gate_proj")?,
                up_proj: lin("up_proj")?,
                down_proj: lin("down_proj")?,
                input_norm: vec1(
                    read_shaped(src, &format!("{p}.input_layernorm.weight"), &[h])?,
                    device,
                ),
                post_norm: vec1(
                    read_shaped(src, &format!("{p}.post_attention_layernorm.weight"), &[h])?,
                    device,
                ),
            };
            layers.push(block);
        }
        let norm = vec1(read_shaped(src, "model.norm.weight", &[h])?, device);
        let lm_head = if !cfg.tie_word_embeddings && src.contains("lm_head.weight") {
            // The output projection stays at full precision, as bitsandbytes' QLoRA setup keeps it.
            let w = read_shaped(src, "lm_head.weight", &[v, h])?;
            Some(BaseLinear::new(w, v, h, None, false, device)?)
        } else if !cfg.tie_word_embeddings {
            bail!("tensor `lm_head.weight` missing and tie_word_embeddings is false");
        } else {
            None
        };
        let inv_freq = rope_inv_freq(&cfg);
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            device: device.clone(),
            embed_t: Default::default(),
        })
    }

    /// Loads a Hugging Face folder (`config.json` + safetensors).
    pub fn from_hf_dir(dir: &Path, opts: LoadOptions, device: &B::Device) -> Result<Self> {
        ensure!(dir.is_dir(), "{}: model folder not found", dir.display());
        let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
        let mut src = SafetensorsSource::open(dir)?;
        Self::load(cfg, &mut src, opts, device).with_context(|| format!("{}", dir.display()))
    }

    /// Bytes of the frozen base at rest.
    pub fn storage_bytes(&self) -> usize {
        let dense = |t: &Tensor<B, 2>| t.shape().num_elements() * t.dtype().size();
        let mut n = dense(&self.embed) + self.norm.dims()[0] * 4;
        for b in &self.layers {
            n += b.input_norm.dims()[0] * 8;
            for m in crate::config::ALL_TARGETS {
                n += b.linear(m).expect("known").storage_bytes();
            }
        }
        n + self
            .lm_head
            .as_ref()
            .map(|l| l.storage_bytes())
            .unwrap_or(0)
    }
}
