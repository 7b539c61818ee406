//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2), written to match Hugging Face
//! transformers' `LlamaForCausalLM` forward op for op: RMSNorm in f32, rotate-half RoPE, grouped
//! query attention, SwiGLU MLP. The base weights are frozen; LoRA deltas come from an optional
//! adapter chosen per call, so one base serves every role.

use super::config::{LlamaConfig, RopeScaling};
use crate::lora::Adapter;
use crate::quant::BaseLinear;
use burn::tensor::{
    activation,
    backend::{AutodiffBackend, Backend},
    Bool, Int, Tensor, TensorData,
};

/// One decoder block's frozen weights.
#[derive(Debug, Clone)]
pub struct Block<B: Backend> {
    pub input_norm: Tensor<B, 1>,
    pub post_norm: Tensor<B, 1>,
    pub q_proj: BaseLinear<B>,
    pub k_proj: BaseLinear<B>,
    pub v_proj: BaseLinear<B>,
    pub o_proj: BaseLinear<B>,
    pub gate_proj: BaseLinear<B>,
    pub up_proj: BaseLinear<B>,
    pub down_proj: BaseLinear<B>,
}

impl<B: Backend> Block<B> {
    /// The linear named by its PEFT target name.
    pub fn linear(&self, name: &str) -> Option<&BaseLinear<B>> {
        Some(match name {
            "q_proj" => &self.q_proj,
            "k_proj" => &self.k_proj,
            "v_proj" => &self.v_proj,
            "o_proj" => &self.o_proj,
            "gate_proj" => &self.gate_proj,
            "up_proj" => &self.up_proj,
            "down_proj" => &self.down_proj,
            _ => return None,
        })
    }
}

/// The frozen base model.
#[derive(Debug, Clone)]
pub struct Llama<B: Backend> {
    pub cfg: LlamaConfig,
    pub embed: Tensor<B, 2>,
    pub layers: Vec<Block<B>>,
    pub norm: Tensor<B, 1>,
    /// `None` when the output projection is tied to the embeddings.
    pub lm_head: Option<BaseLinear<B>>,
    /// RoPE inverse frequencies (after any scaling), computed once in f32 as transformers does.
    pub inv_freq: Vec<f32>,
    pub device: B::Device,
}

/// Per-layer keys and values of the tokens seen so far (`[batch, kv_heads, len, head_dim]`).
impl<B: AutodiffBackend> Llama<B> {
    /// The same model on the backend without autodiff (tensors shared, nothing copied), for
    /// sampling: a KV cache built on the autodiff backend would chain every decode step into
    /// one ever-growing graph.
    pub fn inner(&self) -> Llama<B::InnerBackend> {
        Llama {
            cfg: self.cfg.clone(),
            embed: self.embed.clone().inner(),
            layers: self
                .layers
                .iter()
                .map(|l| Block {
                    input_norm: l.input_norm.clone().inner(),
                    post_norm: l.post_norm.clone().inner(),
                    q_proj: l.q_proj.inner(),
                    k_proj: l.k_proj.inner(),
                    v_proj: l.v_proj.inner(),
                    o_proj: l.o_proj.inner(),
                    gate_proj: l.gate_proj.inner(),
                    up_proj: l.up_proj.inner(),
                    down_proj: l.down_proj.inner(),
                })
                .collect(),
            norm: self.norm.clone().inner(),
            lm_head: self.lm_head.as_ref().map(|h| h.inner()),
            inv_freq: self.inv_freq.clone(),
            device: self.device.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    /// Which cached positions are real tokens (false = left padding), per sequence.
    pub key_valid: Vec<Vec<bool>>,
    /// Next RoPE position per sequence.
    pub next_pos: Vec<i64>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(layers: usize, batch: usize) -> Self {
        Self {
            layers: vec![None; layers],
            key_valid: vec![Vec::new(); batch],
            next_pos: vec![0; batch],
        }
    }

    pub fn len(&self) -> usize {
        self.key_valid.first().map(|v| v.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which tokens of a `[batch, seq]` input are real (false = padding).
#[derive(Debug, Clone)]
pub struct Batch<B: Backend> {
    pub tokens: Tensor<B, 2, Int>,
    pub valid: Vec<Vec<bool>>,
}

impl<B: Backend> Batch<B> {
    /// Builds a batch from rows of token ids that are already padded to one length.
    pub fn new(rows: &[Vec<u32>], valid: Vec<Vec<bool>>, device: &B::Device) -> Self {
        let b = rows.len();
        let t = rows.first().map(|r| r.len()).unwrap_or(0);
        let flat: Vec<i64> = rows.iter().flatten().map(|&x| x as i64).collect();
        Self {
            tokens: Tensor::from_data(TensorData::new(flat, [b, t]), device),
            valid,
        }
    }

    /// A batch with no padding.
    pub fn dense(rows: &[Vec<u32>], device: &B::Device) -> Self {
        let valid = rows.iter().map(|r| vec![true; r.len()]).collect();
        Self::new(rows, valid, device)
    }
}

/// HF's RMSNorm: `w * x / sqrt(mean(x^2) + eps)`.
fn rms_norm<B: Backend>(x: Tensor<B, 3>, w: &Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    let var = x.clone().powi_scalar(2).mean_dim(2);
    let x = x * (var + eps).sqrt().recip();
    x * w.clone().unsqueeze_dim::<2>(0).unsqueeze_dim::<3>(0)
}

/// transformers' `rotate_half` RoPE: `x*cos + rotate_half(x)*sin`, cos/sin of shape `[b,1,t,d/2]`.
fn rope<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, t, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
    let x2 = x.slice([0..b, 0..h, 0..t, d / 2..d]);
    let a = x1.clone() * cos.clone() - x2.clone() * sin.clone();
    let c = x2 * cos.clone() + x1 * sin.clone();
    Tensor::cat(vec![a, c], 3)
}

/// Inverse RoPE frequencies as transformers computes them (in f32), with Llama 3 or linear scaling.
pub fn rope_inv_freq(cfg: &LlamaConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let base = cfg.rope_theta as f32;
    let mut inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32))
        .collect();
    match &cfg.rope_scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => {
            for f in &mut inv {
                *f /= *factor as f32;
            }
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let (factor, lo, hi) = (
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
            );
            let old = *original_max_position_embeddings as f32;
            let low_wavelen = old / lo;
            let high_wavelen = old / hi;
            for f in &mut inv {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                let scaled = if wavelen > low_wavelen {
                    *f / factor
                } else {
                    *f
                };
                let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                *f = if medium {
                    let smooth = (old / wavelen - lo) / (hi - lo);
                    (1.0 - smooth) * scaled / factor + smooth * scaled
                } else {
                    scaled
                };
            }
        }
    }
    inv
}

impl<B: Backend> Llama<B> {
    fn linear_with_lora(
        &self,
        layer: usize,
        name: &str,
        x: Tensor<B, 3>,
        adapter: Option<&Adapter<B>>,
    ) -> Tensor<B, 3> {
        let base = self.layers[layer].linear(name).expect("known module name");
        let y = base.forward(x.clone());
        match adapter.and_then(|a| a.delta(layer, name, x)) {
            Some(d) => y + d,
            None => y,
        }
    }

    /// cos/sin tables `[b, 1, t, d/2]` for the given absolute positions.
    fn rope_tables(&self, positions: &[Vec<i64>]) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let b = positions.len();
        let t = positions.first().map(|p| p.len()).unwrap_or(0);
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(b * t * half);
        let mut sin = Vec::with_capacity(b * t * half);
        for row in positions {
            for &p in row {
                for &f in &self.inv_freq {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let mk = |v: Vec<f32>| Tensor::from_data(TensorData::new(v, [b, 1, t, half]), &self.device);
        (mk(cos), mk(sin))
    }

    /// Decoder forward: token ids `[b, t]` -> final hidden states `[b, t, hidden]` (after the
    /// last RMSNorm). With a cache, the new tokens attend to the cached ones and are appended.
    pub fn forward_hidden(
        &self,
        batch: &Batch<B>,
        adapter: Option<&Adapter<B>>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let cfg = &self.cfg;
        let [b, t] = batch.tokens.dims();
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);

        // Positions count real tokens only (left padding gets position 0, as HF does with
        // position_ids = cumsum(mask) - 1 clamped).
        let mut positions = Vec::with_capacity(b);
        let mut key_valid = Vec::with_capacity(b);
        for i in 0..b {
            let mut p = cache.as_ref().map(|c| c.next_pos[i]).unwrap_or(0);
            let mut row = Vec::with_capacity(t);
            for &v in &batch.valid[i] {
                row.push(if v { p } else { 0 });
                if v {
                    p += 1;
                }
            }
            positions.push(row);
            let mut kv = cache
                .as_ref()
                .map(|c| c.key_valid[i].clone())
                .unwrap_or_default();
            kv.extend_from_slice(&batch.valid[i]);
            key_valid.push(kv);
        }
        let total = past + t;
        let mask = self.attention_mask(&key_valid, past, t);
        let (cos, sin) = self.rope_tables(&positions);

        let flat = batch.tokens.clone().reshape([b * t]);
        let mut h: Tensor<B, 3> =
            self.embed
                .clone()
                .select(0, flat)
                .reshape([b, t, cfg.hidden_size]);
        let scale = 1.0 / (hd as f64).sqrt();

        for (l, block) in self.layers.iter().enumerate() {
            let x = rms_norm(h.clone(), &block.input_norm, cfg.rms_norm_eps);
            let q = self.linear_with_lora(l, "q_proj", x.clone(), adapter);
            let k = self.linear_with_lora(l, "k_proj", x.clone(), adapter);
            let v = self.linear_with_lora(l, "v_proj", x, adapter);
            let q = rope(q.reshape([b, t, nh, hd]).swap_dims(1, 2), &cos, &sin);
            let mut k = rope(k.reshape([b, t, nkv, hd]).swap_dims(1, 2), &cos, &sin);
            let mut v = v.reshape([b, t, nkv, hd]).swap_dims(1, 2);
            if let Some(c) = cache.as_deref_mut() {
                if let Some((pk, pv)) = c.layers[l].take() {
                    k = Tensor::cat(vec![pk, k], 2);
                    v = Tensor::cat(vec![pv, v], 2);
                }
                c.layers[l] = Some((k.clone(), v.clone()));
            }
            // Grouped-query attention: each KV head serves nh / nkv query heads.
            let rep = nh / nkv;
            let k = k
                .unsqueeze_dim::<5>(2)
                .expand([b, nkv, rep, total, hd])
                .reshape([b, nh, total, hd]);
            let v = v
                .unsqueeze_dim::<5>(2)
                .expand([b, nkv, rep, total, hd])
                .reshape([b, nh, total, hd]);
            let scores = q.matmul(k.swap_dims(2, 3)) * scale;
            let scores = scores.mask_fill(mask.clone().expand([b, nh, t, total]), -1.0e30);
            let probs = activation::softmax(scores, 3);
            let attn = probs.matmul(v).swap_dims(1, 2).reshape([b, t, nh * hd]);
            let o = self.linear_with_lora(l, "o_proj", attn, adapter);
            h = h + o;

            let x = rms_norm(h.clone(), &block.post_norm, cfg.rms_norm_eps);
            let g = self.linear_with_lora(l, "gate_proj", x.clone(), adapter);
            let u = self.linear_with_lora(l, "up_proj", x, adapter);
            let m = self.linear_with_lora(l, "down_proj", activation::silu(g) * u, adapter);
            h = h + m;
        }
        if let Some(c) = cache {
            c.key_valid = key_valid;
            for (i, row) in positions.iter().enumerate() {
                if let Some(&last) = row
                    .iter()
                    .zip(&batch.valid[i])
                    .filter(|(_, v)| **v)
                    .map(|(p, _)| p)
                    .next_back()
                {
                    c.next_pos[i] = last + 1;
                }
            }
        }
        rms_norm(h, &self.norm, cfg.rms_norm_eps)
    }

    /// `[b, 1, t, past+t]` boolean mask, true where attention is forbidden: future tokens,
    /// padding keys, and keys outside Mistral's sliding window.
    fn attention_mask(&self, key_valid: &[Vec<bool>], past: usize, t: usize) -> Tensor<B, 4, Bool> {
        let b = key_valid.len();
        let total = past + t;
        let window = self.cfg.sliding_window;
        let mut m = Vec::with_capacity(b * t * total);
        for kv in key_valid {
            for qi in 0..t {
                let q_abs = past + qi;
                for (k_abs, &valid) in kv.iter().enumerate() {
                    let future = k_abs > q_abs;
                    let outside = window
                        .map(|w| q_abs - k_abs.min(q_abs) >= w)
                        .unwrap_or(false);
                    m.push(future || !valid || outside);
                }
            }
        }
        Tensor::from_data(TensorData::new(m, [b, 1, t, total]), &self.device)
    }

    /// Projects hidden states to vocabulary logits `[b, t, vocab]`.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [b, t, h] = hidden.dims();
                let v = self.cfg.vocab_size;
                hidden
                    .reshape([b * t, h])
                    .matmul(self.embed.clone().transpose())
                    .reshape([b, t, v])
            }
        }
    }

    /// Convenience: logits for a batch.
    pub fn forward(&self, batch: &Batch<B>, adapter: Option<&Adapter<B>>) -> Tensor<B, 3> {
        self.logits(self.forward_hidden(batch, adapter, None))
    }
}
