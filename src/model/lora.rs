//! LoRA adapters on the frozen base, and the small heads (value, reward score) that ride with
//! them. Adapters are saved and loaded in PEFT's layout (`adapter_config.json` +
//! `adapter_model.safetensors`, PEFT key names) so `PeftModel.from_pretrained` reads them.

use super::ops::{matmul, matmul_acc};
use crate::config::{LoraConfig, ALL_TARGETS};
use crate::model::config::LlamaConfig;
use anyhow::{bail, ensure, Context, Result};
use burn::tensor::{backend::Backend, Distribution, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::Path;

/// One adapted linear: `delta(x) = dropout(x) A^T B^T * alpha / r`.
#[derive(Debug, Clone)]
pub struct LoraPair<B: Backend> {
    /// `[r, in]`
    pub a: Tensor<B, 2>,
    /// `[out, r]`
    pub b: Tensor<B, 2>,
}

/// A named adapter: one `LoraPair` per (layer, target module).
#[derive(Debug, Clone)]
pub struct Adapter<B: Backend> {
    pub name: String,
    pub cfg: LoraConfig,
    /// `layers[i][module]`
    pub layers: Vec<BTreeMap<String, LoraPair<B>>>,
    /// Dropout is applied only while training.
    pub training: bool,
}

/// One LoRA delta's forward values, kept for a hand-written backward (see `checkpoint`).
#[derive(Debug, Clone)]
pub struct LoraTrace<B: Backend> {
    /// The adapter's input after dropout, `[rows, in]`.
    pub x: Tensor<B, 2>,
    /// `x A^T`, `[rows, r]`.
    pub z: Tensor<B, 2>,
    /// The dropout keep mask scaled by `1 / (1 - p)`, when dropout was applied.
    pub keep: Option<Tensor<B, 2>>,
}

/// `x @ w^T`, through the CUDA few-row kernel when sampling on the GPU.
fn matmul_t<B: Backend>(x: Tensor<B, 2>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
    matmul(&x, w, false, true, 1.0)
}

/// The module path PEFT uses for a target inside a Llama block.
fn module_path(layer: usize, module: &str) -> String {
    let group = match module {
        "q_proj" | "k_proj" | "v_proj" | "o_proj" => "self_attn",
        _ => "mlp",
    };
    format!("base_model.model.model.layers.{layer}.{group}.{module}")
}

/// The LoRA shape of a PEFT adapter folder, from its `adapter_config.json` alone (no weights
/// read): what `PeftModel.from_pretrained` takes the shape from.
pub fn read_peft_config(dir: &Path) -> Result<LoraConfig> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("{}: cannot read adapter config", cfg_path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", cfg_path.display()))?;
    let peft_type = v.get("peft_type").and_then(|x| x.as_str()).unwrap_or("");
    if peft_type != "LORA" {
        bail!(
            "{}: peft_type `{peft_type}` is not supported: expected LORA",
            cfg_path.display()
        );
    }
    let r = v
        .get("r")
        .and_then(|x| x.as_u64())
        .with_context(|| format!("{}: `r` missing", cfg_path.display()))? as usize;
    ensure!(r > 0, "{}: `r` must be positive", cfg_path.display());
    let alpha = v
        .get("lora_alpha")
        .and_then(|x| x.as_f64())
        .unwrap_or(r as f64) as f32;
    let dropout = v
        .get("lora_dropout")
        .and_then(|x| x.as_f64())
        .unwrap_or(0.0) as f32;
    let targets: Vec<String> = match v.get("target_modules") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        _ => bail!("{}: `target_modules` missing", cfg_path.display()),
    };
    for t in &targets {
        if !ALL_TARGETS.contains(&t.as_str()) {
            bail!(
                "{}: target module `{t}` is not a Llama linear",
                cfg_path.display()
            );
        }
    }
    Ok(LoraConfig {
        r,
        alpha,
        dropout,
        target_modules: targets,
    })
}

impl<B: Backend> Adapter<B> {
    /// A fresh adapter initialised as PEFT does: A ~ Kaiming-uniform(a = sqrt(5)), i.e.
    /// U(-1/sqrt(in), 1/sqrt(in)); B = 0, so the adapted model starts equal to the base.
    pub fn new(
        name: &str,
        cfg: &LoraConfig,
        model: &LlamaConfig,
        seed: u64,
        device: &B::Device,
    ) -> Result<Self> {
        ensure!(cfg.r > 0, "LoRA rank r must be positive");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut layers = Vec::with_capacity(model.num_hidden_layers);
        for _ in 0..model.num_hidden_layers {
            let mut m = BTreeMap::new();
            for target in &cfg.target_modules {
                let (out, inp) = model
                    .linear_shape(target)
                    .with_context(|| format!("unknown LoRA target module `{target}`"))?;
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..cfg.r * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                m.insert(
                    target.clone(),
                    LoraPair {
                        a: Tensor::from_data(TensorData::new(a, [cfg.r, inp]), device),
                        b: Tensor::zeros([out, cfg.r], device),
                    },
                );
            }
            layers.push(m);
        }
        Ok(Self {
            name: name.to_string(),
            cfg: cfg.clone(),
            layers,
            training: false,
        })
    }

    pub fn scaling(&self) -> f64 {
        self.cfg.alpha as f64 / self.cfg.r as f64
    }

    /// `base + the LoRA contribution` for `module` of `layer` (`base` is the frozen layer's
    /// output for `x`), with the values a hand-written backward needs (`model::checkpoint`);
    /// `None` as the trace where the module is not adapted.
    pub fn add_delta_traced(
        &self,
        layer: usize,
        module: &str,
        x: Tensor<B, 3>,
        base: Tensor<B, 3>,
    ) -> (Tensor<B, 3>, Option<LoraTrace<B>>) {
        let Some(pair) = self.layers.get(layer).and_then(|m| m.get(module)) else {
            return (base, None);
        };
        let [b, t, i] = x.dims();
        let mut x2: Tensor<B, 2> = x.reshape([b * t, i]);
        let mut keep = None;
        if self.training && self.cfg.dropout > 0.0 {
            let p = self.cfg.dropout as f64;
            let k = x2.random_like(Distribution::Bernoulli(1.0 - p)) / (1.0 - p);
            x2 = x2 * k.clone();
            keep = Some(k);
        }
        let out = pair.b.dims()[0];
        let z = matmul_t(x2.clone(), &pair.a);
        let base = base.reshape([b * t, out]);
        let y = matmul_acc(base, &z, &pair.b, false, true, self.scaling());
        (y.reshape([b, t, out]), Some(LoraTrace { x: x2, z, keep }))
    }

    /// All trainable tensors in a fixed order (layer, module, A then B).
    pub fn tensors(&self) -> Vec<Tensor<B, 2>> {
        self.layers
            .iter()
            .flat_map(|m| m.values().flat_map(|p| [p.a.clone(), p.b.clone()]))
            .collect()
    }

    /// Replaces the tensors in the order `tensors()` returns them.
    pub fn set_tensors(&mut self, mut ts: impl Iterator<Item = Tensor<B, 2>>) {
        for m in &mut self.layers {
            for p in m.values_mut() {
                p.a = ts.next().expect("one tensor per LoRA A");
                p.b = ts.next().expect("one tensor per LoRA B");
            }
        }
    }

    /// This adapter on the backend without autodiff, in eval mode (no dropout), for sampling.
    pub fn inner(&self) -> Adapter<B::InnerBackend>
    where
        B: burn::tensor::backend::AutodiffBackend,
    {
        Adapter {
            name: self.name.clone(),
            cfg: self.cfg.clone(),
            layers: self
                .layers
                .iter()
                .map(|m| {
                    m.iter()
                        .map(|(k, p)| {
                            let pair = LoraPair {
                                a: p.a.clone().inner(),
                                b: p.b.clone().inner(),
                            };
                            (k.clone(), pair)
                        })
                        .collect()
                })
                .collect(),
            training: false,
        }
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        self.tensors()
            .iter()
            .map(|t| t.shape().num_elements())
            .sum()
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` in PEFT's layout into `dir`.
    /// Files are written to temporary names and renamed, so a crash never leaves half a file.
    pub fn save_peft(
        &self,
        dir: &Path,
        base_model: &str,
        extra: &[(String, Tensor<B, 2>)],
    ) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut push = |name: String, t: &Tensor<B, 2>| -> Result<()> {
            let data = t.to_data().convert::<f32>();
            let shape = data.shape.to_vec();
            let values = data
                .to_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("tensor {name}: {e:?}"))?;
            crate::finite::ensure_finite(&name, &values)?;
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((name, shape, bytes));
            Ok(())
        };
        for (l, m) in self.layers.iter().enumerate() {
            for (module, p) in m {
                let path = module_path(l, module);
                push(format!("{path}.lora_A.weight"), &p.a)?;
                push(format!("{path}.lora_B.weight"), &p.b)?;
            }
        }
        for (name, t) in extra {
            push(name.clone(), t)?;
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, s, b)| {
                Ok((
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?,
                ))
            })
            .collect::<Result<_, safetensors::SafeTensorError>>()?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let bytes = safetensors::serialize(views, &Some(meta))?;
        // A score head makes the folder a reward or value model: PEFT loads it only onto a
        // `*ForSequenceClassification` base as task SEQ_CLS, with the head as its `score` module
        // (as TRL's reward models are saved); CAUSAL_LM there fails in `PeftModel.from_pretrained`.
        let head = extra.iter().any(|(n, _)| n.ends_with(".score.weight"));
        let (task, modules_to_save) = match head {
            true => ("SEQ_CLS", serde_json::json!(["score"])),
            false => ("CAUSAL_LM", serde_json::Value::Null),
        };
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": task,
            "base_model_name_or_path": base_model,
            "r": self.cfg.r,
            // PEFT writes an integer alpha when it is one; match it so configs compare equal.
            "lora_alpha": if self.cfg.alpha.fract() == 0.0 {
                serde_json::json!(self.cfg.alpha as i64)
            } else {
                serde_json::json!(self.cfg.alpha)
            },
            "lora_dropout": self.cfg.dropout,
            "target_modules": self.cfg.target_modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "lora_bias": false,
            "modules_to_save": modules_to_save,
            "layers_to_transform": serde_json::Value::Null,
            "layers_pattern": serde_json::Value::Null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": serde_json::Value::Null,
        });
        crate::util::write_atomic(&dir.join("adapter_model.safetensors"), &bytes)?;
        crate::util::write_atomic(
            &dir.join("adapter_config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        Ok(())
    }

    /// Reads a PEFT LoRA adapter written by rlhf or PEFT; checks every shape against the model.
    /// Returns the adapter and any non-LoRA tensors in the file (heads), by name.
    pub fn load_peft(
        dir: &Path,
        name: &str,
        model: &LlamaConfig,
        device: &B::Device,
    ) -> Result<(Self, BTreeMap<String, Tensor<B, 2>>)> {
        let cfg = read_peft_config(dir)?;
        let (r, targets) = (cfg.r, cfg.target_modules.clone());
        let st_path = dir.join("adapter_model.safetensors");
        let bytes = std::fs::read(&st_path)
            .with_context(|| format!("{}: cannot read adapter weights", st_path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: not a valid safetensors file", st_path.display()))?;
        let read = |key: &str, shape: [usize; 2]| -> Result<Tensor<B, 2>> {
            let view = st
                .tensor(key)
                .with_context(|| format!("{}: tensor `{key}` missing", st_path.display()))?;
            let values = crate::model::weights::view_to_f32(&view)
                .with_context(|| format!("{}: tensor `{key}`", st_path.display()))?;
            ensure!(
                view.shape() == shape,
                "{}: tensor `{key}` has shape {:?}, expected {:?}",
                st_path.display(),
                view.shape(),
                shape
            );
            Ok(Tensor::from_data(TensorData::new(values, shape), device))
        };
        let mut layers = Vec::with_capacity(model.num_hidden_layers);
        for l in 0..model.num_hidden_layers {
            let mut m = BTreeMap::new();
            for t in &targets {
                let (out, inp) = model.linear_shape(t).expect("validated above");
                let p = module_path(l, t);
                let a = read(&format!("{p}.lora_A.weight"), [r, inp])?;
                let b = read(&format!("{p}.lora_B.weight"), [out, r])?;
                m.insert(t.clone(), LoraPair { a, b });
            }
            layers.push(m);
        }
        let mut extra = BTreeMap::new();
        for (key, view) in st.tensors() {
            if key.contains(".lora_A.") || key.contains(".lora_B.") {
                continue;
            }
            let shape = view.shape().to_vec();
            ensure!(
                shape.len() == 2,
                "{}: tensor `{key}` is not 2-D",
                st_path.display()
            );
            let values = crate::model::weights::view_to_f32(&view)?;
            extra.insert(
                key.clone(),
                Tensor::from_data(TensorData::new(values, [shape[0], shape[1]]), device),
            );
        }
        Ok((
            Self {
                name: name.to_string(),
                cfg,
                layers,
                training: false,
            },
            extra,
        ))
    }
}
