//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2), written to match Hugging Face
//! transformers' `LlamaForCausalLM` forward op for op: RMSNorm in f32, rotate-half RoPE, grouped
//! query attention, SwiGLU MLP. The base weights are frozen; LoRA deltas come from an optional
//! adapter chosen per call, so one base serves every role.

use super::config::{LlamaConfig, RopeScaling};
use super::linear::{BaseLinear, DenseCache};
use crate::model::lora::{Adapter, LoraTrace};
use burn::tensor::{
    activation,
    backend::{AutodiffBackend, Backend},
    FloatDType, Int, Tensor, TensorData,
};
use std::collections::BTreeMap;

pub use super::attn_inputs::{AttnInputs, KeyMask};
use super::row_chunks::{in_row_chunks, mlp_forward_rows};

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
    /// A tied head's `embed^T`, kept off CUDA (see [`OutputHead::forward`]).
    pub embed_t: DenseCache,
}

impl<B: AutodiffBackend> Block<B> {
    /// The same block on the backend without autodiff (tensors shared, nothing copied).
    pub fn inner(&self) -> Block<B::InnerBackend> {
        Block {
            input_norm: self.input_norm.clone().inner(),
            post_norm: self.post_norm.clone().inner(),
            q_proj: self.q_proj.inner(),
            k_proj: self.k_proj.inner(),
            v_proj: self.v_proj.inner(),
            o_proj: self.o_proj.inner(),
            gate_proj: self.gate_proj.inner(),
            up_proj: self.up_proj.inner(),
            down_proj: self.down_proj.inner(),
        }
    }
}

impl<B: AutodiffBackend> Llama<B> {
    /// The same model on the backend without autodiff (tensors shared, nothing copied), for
    /// sampling: a KV cache built on the autodiff backend would chain every decode step into
    /// one ever-growing graph.
    pub fn inner(&self) -> Llama<B::InnerBackend> {
        Llama {
            cfg: self.cfg.clone(),
            embed: self.embed.clone().inner(),
            layers: self.layers.iter().map(Block::inner).collect(),
            norm: self.norm.clone().inner(),
            lm_head: self.lm_head.as_ref().map(|h| h.inner()),
            inv_freq: self.inv_freq.clone(),
            device: self.device.clone(),
            embed_t: self.embed_t.clone(),
        }
    }
}

/// Per-layer keys and values of the tokens seen so far (`[batch, kv_heads, len, head_dim]`).
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

/// transformers' `rotate_half` RoPE: `x*cos + rotate_half(x)*sin`, cos/sin of shape `[b,1,t,d/2]`.
pub(crate) fn rope<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Tensor<B, 4> {
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

/// The output projection `[vocab, hidden]`: an LM head of its own, or the tied embeddings (with
/// the cache of their transposed form).
#[derive(Debug, Clone)]
pub enum OutputHead<B: Backend> {
    Own(BaseLinear<B>),
    Tied(Tensor<B, 2>, DenseCache),
}

impl<B: Backend> OutputHead<B> {
    /// `x [n, hidden] -> logits [n, vocab]`. Off CUDA a tied head multiplies by a kept
    /// row-major `embed^T`: burn-ndarray copies a transposed operand element by element, and
    /// computing `(embed x^T)^T` instead left logits in a transposed layout that every later
    /// read copied the same way (~13% of a SmolLM2 DPO step on 2 cores).
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Self::Own(head) => head.forward(x),
            Self::Tied(embed, cache) => match cache.kept(true, || row_major_t(embed)) {
                Some(t) if !super::ops::is_cuda::<B>() => x.matmul(t),
                _ => super::ops::matmul_wt(x, embed),
            },
        }
    }

    /// `dz [n, vocab] -> dz W [n, hidden]` (the projection is frozen).
    pub fn backward_input(&self, dz: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Self::Own(head) => head.backward_input(dz),
            Self::Tied(embed, _) => dz.matmul(embed.clone()),
        }
    }
}

/// `w^T` in row-major order (one strided copy, made once).
fn row_major_t<B: Backend>(w: &Tensor<B, 2>) -> Tensor<B, 2> {
    let data = w.clone().transpose().into_data();
    Tensor::<B, 2>::from_data(data.convert::<f32>(), &w.device())
}

impl<B: AutodiffBackend> OutputHead<B> {
    pub fn inner(&self) -> OutputHead<B::InnerBackend> {
        match self {
            Self::Own(head) => OutputHead::Own(head.inner()),
            Self::Tied(embed, cache) => OutputHead::Tied(embed.clone().inner(), cache.clone()),
        }
    }
}

/// What every block of one forward call shares: the embedded tokens, the attention inputs, and
/// (for a KV cache) the positions and key validity after the call.
#[derive(Debug, Clone)]
pub struct Prepared<B: Backend> {
    pub h: Tensor<B, 3>,
    pub inputs: AttnInputs<B>,
    pub positions: Vec<Vec<i64>>,
    pub key_valid: Vec<Vec<bool>>,
}

/// The intermediates of a block's forward up to its MLP input that a hand-written backward
/// needs ([`Block::forward_traced`]; the plain forward keeps none of them). The MLP's own are
/// recomputed a chunk of rows at a time ([`Block::mlp_traced`]).
#[derive(Debug)]
pub struct BlockTrace<B: Backend> {
    pub x1: Tensor<B, 3>,
    pub inv1: Tensor<B, 3>,
    /// After RoPE, `[b, nh, t, d]`; keys and values before the GQA expansion, `[b, nkv, T, d]`.
    pub q: Tensor<B, 4>,
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
    /// Softmax of the masked scores, `[b, nh, t, T]`; `None` on CUDA, where the attention's
    /// backward recomputes it from `q` and `k` (`cuda::attention`) instead of holding it through
    /// the MLP's backward (0.5b DPO: 56 MiB, 8b: 256 MiB a layer).
    pub probs: Option<Tensor<B, 4>>,
    pub attn: Tensor<B, 3>,
    pub h2: Tensor<B, 3>,
    pub x2: Tensor<B, 3>,
    pub inv2: Tensor<B, 3>,
    /// The attention's projections (q, k, v, o).
    pub lora: BTreeMap<&'static str, LoraTrace<B>>,
}

/// The MLP's intermediates for some rows ([`Block::mlp_traced`]).
#[derive(Debug)]
pub struct MlpTrace<B: Backend> {
    pub gate: Tensor<B, 3>,
    pub up: Tensor<B, 3>,
    /// The gate, up and down projections'.
    pub lora: BTreeMap<&'static str, LoraTrace<B>>,
}

/// HF's RMSNorm `w * x / sqrt(mean(x^2) + eps)`, also returning `1 / sqrt(mean(x^2) + eps)`.
fn rms_norm_inv<B: Backend>(
    x: Tensor<B, 3>,
    w: &Tensor<B, 1>,
    eps: f64,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    #[cfg(feature = "cuda")]
    if let Some(r) = crate::cuda::train_ops::try_rms_norm(&x, w, eps) {
        return r;
    }
    let inv = (x.clone().powi_scalar(2).mean_dim(2) + eps).sqrt().recip();
    let y = x * inv.clone() * w.clone().unsqueeze_dim::<2>(0).unsqueeze_dim::<3>(0);
    (y, inv)
}

/// Grouped-query attention: each of the `nkv` heads serves `rep` query heads.
pub(crate) fn expand_kv<B: Backend>(x: Tensor<B, 4>, rep: usize) -> Tensor<B, 4> {
    if rep == 1 {
        return x;
    }
    let [b, nkv, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, nkv, rep, t, d])
        .reshape([b, nkv * rep, t, d])
}

/// The projections' `[b, t, heads * d]` as attention heads `[b, heads, t, d]`, RoPE-rotated
/// when `rope` gives the `(cos, sin)` tables.
pub(crate) fn to_heads<B: Backend>(
    x: Tensor<B, 3>,
    heads: usize,
    rope_tables: Option<(&Tensor<B, 4>, &Tensor<B, 4>)>,
) -> Tensor<B, 4> {
    #[cfg(feature = "cuda")]
    if let Some(y) = crate::cuda::train_ops::try_to_heads(&x, heads, rope_tables) {
        return y;
    }
    let [b, t, w] = x.dims();
    let x = x.reshape([b, t, heads, w / heads]).swap_dims(1, 2);
    match rope_tables {
        Some((cos, sin)) => rope(x, cos, sin),
        None => x,
    }
}

/// The inverse layout change of [`to_heads`], `[b, heads, t, d] -> [b, t, heads * d]`; with
/// `rope` it rotates back by minus the angle (the transpose of the rotation, for gradients).
pub(crate) fn from_heads<B: Backend>(
    x: Tensor<B, 4>,
    rope_tables: Option<(&Tensor<B, 4>, &Tensor<B, 4>)>,
) -> Tensor<B, 3> {
    #[cfg(feature = "cuda")]
    if let Some(y) = crate::cuda::train_ops::try_from_heads(&x, rope_tables) {
        return y;
    }
    let [b, h, t, d] = x.dims();
    let x = match rope_tables {
        Some((cos, sin)) => rope(x, cos, &sin.clone().neg()),
        None => x,
    };
    x.swap_dims(1, 2).reshape([b, t, h * d])
}

/// `softmax(mask(q k^T * scale)) v` with grouped key/value heads (`q [b, nh, t, d]`,
/// `k`, `v [b, nkv, total, d]`): the output `[b, nh, t, d]` and, on the reference path, the
/// probabilities (the fused CUDA path keeps none: its backward recomputes them).
pub(crate) fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    inputs: &AttnInputs<B>,
    scale: f64,
) -> (Tensor<B, 4>, Option<Tensor<B, 4>>) {
    #[cfg(feature = "cuda")]
    if let Some(bias) = &inputs.bias {
        let ([b, nh, t, _], [_, nkv, total, _]) = (q.dims(), k.dims());
        let block = super::ops::attention_query_block(b, nh, nkv, t, total);
        if let Some(out) =
            crate::cuda::attention::try_attention(&q, &k, &v, (bias, inputs.rule()), scale, block)
        {
            return (out, None);
        }
    }
    let rep = q.dims()[1] / k.dims()[1];
    let probs = attention_probs(&q, &k, inputs, scale);
    (probs.clone().matmul(expand_kv(v, rep)), Some(probs))
}

/// The probabilities of [`attention`], `softmax(mask(q k^T * scale))` `[b, nh, t, total]`, by
/// the reference ops.
pub(crate) fn attention_probs<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    inputs: &AttnInputs<B>,
    scale: f64,
) -> Tensor<B, 4> {
    let [b, nh, t, _] = q.dims();
    let [_, nkv, total, _] = k.dims();
    let scores = q
        .clone()
        .matmul(expand_kv(k.clone(), nh / nkv).swap_dims(2, 3))
        * scale;
    let scores = scores.mask_fill(inputs.mask().expand([b, nh, t, total]), -1.0e30);
    activation::softmax(scores, 3)
}

/// `silu(gate) * up`.
pub(crate) fn swiglu<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
    #[cfg(feature = "cuda")]
    if let Some(y) = crate::cuda::train_ops::try_swiglu(&gate, &up) {
        return y;
    }
    activation::silu(gate) * up
}

/// What [`Block::forward_traced`] collects while the block runs, each `None` until its step ran.
/// The plain forward records nothing, so it frees every intermediate as soon as it is consumed.
struct Recorder<B: Backend> {
    x1: Option<Tensor<B, 3>>,
    inv1: Option<Tensor<B, 3>>,
    q: Option<Tensor<B, 4>>,
    k: Option<Tensor<B, 4>>,
    v: Option<Tensor<B, 4>>,
    probs: Option<Tensor<B, 4>>,
    attn: Option<Tensor<B, 3>>,
    h2: Option<Tensor<B, 3>>,
    x2: Option<Tensor<B, 3>>,
    inv2: Option<Tensor<B, 3>>,
    lora: BTreeMap<&'static str, LoraTrace<B>>,
}

impl<B: Backend> Recorder<B> {
    fn new() -> Self {
        Self {
            x1: None,
            inv1: None,
            q: None,
            k: None,
            v: None,
            probs: None,
            attn: None,
            h2: None,
            x2: None,
            inv2: None,
            lora: BTreeMap::new(),
        }
    }

    fn finish(self) -> BlockTrace<B> {
        let ran = "every step of Block::run records";
        BlockTrace {
            x1: self.x1.expect(ran),
            inv1: self.inv1.expect(ran),
            q: self.q.expect(ran),
            k: self.k.expect(ran),
            v: self.v.expect(ran),
            probs: self.probs,
            attn: self.attn.expect(ran),
            h2: self.h2.expect(ran),
            x2: self.x2.expect(ran),
            inv2: self.inv2.expect(ran),
            lora: self.lora,
        }
    }
}

impl<B: Backend> Block<B> {
    /// `x @ W^T` plus the adapter's delta for `name`, recording the delta's values when asked.
    fn linear_lora(
        &self,
        layer: usize,
        name: &'static str,
        x: Tensor<B, 3>,
        adapter: Option<&Adapter<B>>,
        rec: Option<&mut Recorder<B>>,
    ) -> Tensor<B, 3> {
        let y = self
            .linear(name)
            .expect("known module name")
            .forward(x.clone());
        let Some(adapter) = adapter else {
            return y;
        };
        let (y, trace) = adapter.add_delta_traced(layer, name, x, y);
        if let (Some(r), Some(trace)) = (rec, trace) {
            r.lora.insert(name, trace);
        }
        y
    }

    /// One decoder block. With a cache, the new tokens attend to the cached ones and their keys
    /// and values are appended to it.
    pub fn forward(
        &self,
        cfg: &LlamaConfig,
        layer: usize,
        h: Tensor<B, 3>,
        inputs: &AttnInputs<B>,
        adapter: Option<&Adapter<B>>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        self.run(cfg, layer, h, inputs, adapter, cache, None)
    }

    /// The block (no cache) up to its MLP input, with the intermediates a hand-written backward
    /// needs.
    pub fn forward_traced(
        &self,
        cfg: &LlamaConfig,
        layer: usize,
        h: Tensor<B, 3>,
        inputs: &AttnInputs<B>,
        adapter: Option<&Adapter<B>>,
    ) -> BlockTrace<B> {
        let mut rec = Recorder::new();
        self.run(cfg, layer, h, inputs, adapter, None, Some(&mut rec));
        rec.finish()
    }

    /// The MLP of input `x2` (some rows of the block's) with its intermediates. The down
    /// projection runs for its LoRA trace (and the dropout draw, in the forward's order); its
    /// output is not needed.
    pub fn mlp_traced(
        &self,
        layer: usize,
        x2: Tensor<B, 3>,
        adapter: Option<&Adapter<B>>,
    ) -> MlpTrace<B> {
        let mut rec = Recorder::new();
        let gate = self.linear_lora(layer, "gate_proj", x2.clone(), adapter, Some(&mut rec));
        let up = self.linear_lora(layer, "up_proj", x2, adapter, Some(&mut rec));
        let act = swiglu(gate.clone(), up.clone());
        self.linear_lora(layer, "down_proj", act, adapter, Some(&mut rec));
        MlpTrace {
            gate,
            up,
            lora: rec.lora,
        }
    }

    /// The block's forward; with `rec`, each intermediate up to the MLP input is also recorded
    /// there and the MLP is skipped (`h2` is returned in place of the output: the recording's
    /// consumer recomputes the MLP itself, see [`Self::mlp_traced`]).
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        cfg: &LlamaConfig,
        layer: usize,
        h: Tensor<B, 3>,
        inputs: &AttnInputs<B>,
        adapter: Option<&Adapter<B>>,
        cache: Option<&mut KvCache<B>>,
        mut rec: Option<&mut Recorder<B>>,
    ) -> Tensor<B, 3> {
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let (x1, inv1) = rms_norm_inv(h.clone(), &self.input_norm, cfg.rms_norm_eps);
        if let Some(r) = rec.as_deref_mut() {
            r.x1 = Some(x1.clone());
            r.inv1 = Some(inv1);
        }
        let q = self.linear_lora(layer, "q_proj", x1.clone(), adapter, rec.as_deref_mut());
        let k = self.linear_lora(layer, "k_proj", x1.clone(), adapter, rec.as_deref_mut());
        let v = self.linear_lora(layer, "v_proj", x1, adapter, rec.as_deref_mut());
        let tables = Some((&inputs.cos, &inputs.sin));
        let q = to_heads(q, nh, tables);
        let mut k = to_heads(k, nkv, tables);
        let mut v = to_heads(v, nkv, None);
        if let Some(c) = cache {
            if let Some((pk, pv)) = c.layers[layer].take() {
                k = Tensor::cat(vec![pk, k], 2);
                v = Tensor::cat(vec![pv, v], 2);
            }
            c.layers[layer] = Some((k.clone(), v.clone()));
        }
        if let Some(r) = rec.as_deref_mut() {
            r.q = Some(q.clone());
            r.k = Some(k.clone());
            r.v = Some(v.clone());
        }
        let scale = 1.0 / (hd as f64).sqrt();
        let (attn, probs) = attention(q, k, v, inputs, scale);
        if let Some(r) = rec.as_deref_mut() {
            r.probs = probs;
        }
        let attn = from_heads(attn, None);
        if let Some(r) = rec.as_deref_mut() {
            r.attn = Some(attn.clone());
        }
        let o = self.linear_lora(layer, "o_proj", attn, adapter, rec.as_deref_mut());
        let h2 = h + o;

        let (x2, inv2) = rms_norm_inv(h2.clone(), &self.post_norm, cfg.rms_norm_eps);
        if let Some(r) = rec {
            r.h2 = Some(h2.clone());
            r.x2 = Some(x2);
            r.inv2 = Some(inv2);
            return h2;
        }
        let [b, t, _] = x2.dims();
        let dropout = adapter.is_some_and(|a| a.training && a.cfg.dropout > 0.0);
        let chunk = mlp_forward_rows(b * t, self.gate_proj.out_features, dropout);
        h2 + in_row_chunks([x2], chunk, |[x]| self.mlp(layer, x, adapter))
    }

    /// `down(silu(gate(x2)) * up(x2))` with the adapter's deltas.
    fn mlp(&self, layer: usize, x2: Tensor<B, 3>, adapter: Option<&Adapter<B>>) -> Tensor<B, 3> {
        let gate = self.linear_lora(layer, "gate_proj", x2.clone(), adapter, None);
        let up = self.linear_lora(layer, "up_proj", x2, adapter, None);
        // A block forward's high point, both `[rows, intermediate]` products alive: labelled for
        // the passes without a graph (scoring, prefill), whose backward-side labels never run;
        // the checkpointed training forward passes here too.
        crate::devmem::note::<B>(&up.device(), "block forward (MLP)");
        let act = swiglu(gate, up);
        self.linear_lora(layer, "down_proj", act, adapter, None)
    }
}

impl<B: Backend> Llama<B> {
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

    /// The embedded tokens and the per-call attention inputs, with the positions and the key
    /// validity after this call for the cache's bookkeeping.
    pub fn prepare(&self, batch: &Batch<B>, cache: Option<&KvCache<B>>) -> Prepared<B> {
        let [b, t] = batch.tokens.dims();
        let past = cache.map(|c| c.len()).unwrap_or(0);
        // Positions count real tokens only (left padding gets position 0, as HF does with
        // position_ids = cumsum(mask) - 1 clamped).
        let mut positions = Vec::with_capacity(b);
        let mut key_valid = Vec::with_capacity(b);
        for i in 0..b {
            let mut p = cache.map(|c| c.next_pos[i]).unwrap_or(0);
            let mut row = Vec::with_capacity(t);
            for &v in &batch.valid[i] {
                row.push(if v { p } else { 0 });
                if v {
                    p += 1;
                }
            }
            positions.push(row);
            let mut kv = cache.map(|c| c.key_valid[i].clone()).unwrap_or_default();
            kv.extend_from_slice(&batch.valid[i]);
            key_valid.push(kv);
        }
        let keys = KeyMask {
            key_valid: key_valid.clone(),
            past,
            window: self.cfg.sliding_window,
        };
        let (cos, sin) = self.rope_tables(&positions);
        let flat = batch.tokens.clone().reshape([b * t]);
        let h = self
            .embed
            .clone()
            .select(0, flat)
            .cast(FloatDType::F32)
            .reshape([b, t, self.cfg.hidden_size]);
        Prepared {
            h,
            inputs: AttnInputs::new(cos, sin, keys),
            positions,
            key_valid,
        }
    }

    /// Decoder forward: token ids `[b, t]` -> final hidden states `[b, t, hidden]` (after the
    /// last RMSNorm). With a cache, the new tokens attend to the cached ones and are appended.
    pub fn forward_hidden(
        &self,
        batch: &Batch<B>,
        adapter: Option<&Adapter<B>>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let Prepared {
            mut h,
            inputs,
            positions,
            key_valid,
        } = self.prepare(batch, cache.as_deref());
        for (l, block) in self.layers.iter().enumerate() {
            h = block.forward(&self.cfg, l, h, &inputs, adapter, cache.as_deref_mut());
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
        self.final_norm(h)
    }

    /// The last RMSNorm.
    pub fn final_norm(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        rms_norm_inv(h, &self.norm, self.cfg.rms_norm_eps).0
    }

    /// Projects hidden states to vocabulary logits `[b, t, vocab]`.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, h] = hidden.dims();
        self.output_head()
            .forward(hidden.reshape([b * t, h]))
            .reshape([b, t, self.cfg.vocab_size])
    }

    /// The output projection (its own weight, or the tied embeddings).
    pub fn output_head(&self) -> OutputHead<B> {
        match &self.lm_head {
            Some(head) => OutputHead::Own(head.clone()),
            None => OutputHead::Tied(self.embed.clone(), self.embed_t.clone()),
        }
    }

    /// Convenience: logits for a batch.
    pub fn forward(&self, batch: &Batch<B>, adapter: Option<&Adapter<B>>) -> Tensor<B, 3> {
        self.logits(self.forward_hidden(batch, adapter, None))
    }
}
