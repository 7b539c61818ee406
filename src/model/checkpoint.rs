//! Gradient checkpointing at block level.
//!
//! burn's autodiff keeps every op's inputs until backward: for a decoder block that is ~40
//! tensors per token (activations, attention probabilities, LoRA inputs), which made a 0.5B DPO
//! step peak at 16.5 GiB. Here a block is one autodiff node instead: its forward runs on the
//! backend without autodiff and the node keeps only the block's input (plus handles to frozen
//! weights); backward recomputes the block's forward once and applies a hand-written backward
//! (`block_backward`, the MLP part a chunk of rows at a time), whose results are checked against
//! burn's autodiff in the tests.
//! LoRA dropout masks are reproduced by seeding the backend's RNG per block.
//!
//! Log-probs get the same treatment (`model::logps`).

use super::autodiff_op::{ad, float, from_ad, record};
use super::config::LlamaConfig;
use super::llama::{
    attention_probs, expand_kv, from_heads, to_heads, AttnInputs, Batch, Block, BlockTrace, Llama,
    Prepared,
};
use super::lora::{Adapter, LoraPair, LoraTrace};
use super::ops::{matmul, matmul_acc};
use super::row_chunks::in_row_chunks;
use burn::tensor::{
    activation,
    backend::{AutodiffBackend, Backend},
    FloatDType, Tensor,
};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Seeds for LoRA dropout in checkpointed blocks: forward and recomputation draw the same masks.
static DROPOUT_SEEDS: AtomicU64 = AtomicU64::new(0x5EED_D80F);

// ---------------------------------------------------------------------------------------------
// Block checkpointing.

/// How a checkpointed block keeps its input until backward: bf16 on CUDA, the largest thing a
/// training step holds (one `[tokens, hidden]` per layer: 352 MB in f32 for a 0.5b DPO batch of
/// 16 x 256), halved. The forward ran on the f32 value; only the recomputation in backward
/// starts from the rounded one, and it runs its GEMMs in bf16 anyway. f32 on the CPU backends,
/// and with `RLHF_F32_CHECKPOINTS=1`.
fn stash<IB: Backend>(h: Tensor<IB, 3>) -> Tensor<IB, 3> {
    #[cfg(feature = "cuda")]
    if crate::cuda::is_cuda::<IB>() && !crate::switches::switches().f32_checkpoints {
        return crate::cuda::contiguous_bf16(h).unwrap_or_else(|h| h.cast(FloatDType::BF16));
    }
    h
}

/// What a checkpointed block keeps until backward: its input and handles to what it read.
#[derive(Debug, Clone)]
struct BlockState<IB: Backend> {
    cfg: LlamaConfig,
    layer: usize,
    block: Block<IB>,
    /// The adapter's tensors of this layer as they were in the forward.
    adapter: Adapter<IB>,
    h: Tensor<IB, 3>,
    inputs: AttnInputs<IB>,
    seed: Option<u64>,
}

#[derive(Debug)]
struct BlockBackward<IB>(PhantomData<IB>);

impl<IB: Backend, const N: usize> Backward<IB, N> for BlockBackward<IB> {
    type State = BlockState<IB>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout = float::<IB, 3>(grads.consume::<IB>(&ops.node));
        let mut st = ops.state;
        st.h = st.h.cast(FloatDType::F32);
        if let Some(seed) = st.seed {
            IB::seed(&st.h.device(), seed);
        }
        let trace = st.block.forward_traced(
            &st.cfg,
            st.layer,
            st.h.clone(),
            &st.inputs,
            Some(&st.adapter),
        );
        crate::devmem::note::<IB>(&st.h.device(), "block recompute");
        let (dh, dparams) = block_backward(
            &st.cfg,
            &st.block,
            st.layer,
            &st.h,
            &st.inputs,
            &st.adapter,
            trace,
            dout,
        );
        crate::devmem::note::<IB>(&st.h.device(), "block backward");
        let mut values = vec![dh.into_primitive().tensor()];
        for (da, db) in dparams {
            values.push(da.into_primitive().tensor());
            values.push(db.into_primitive().tensor());
        }
        for (parent, value) in ops.parents.into_iter().zip(values) {
            if let Some(node) = parent {
                grads.register::<IB>(node.id, value);
            }
        }
    }
}

/// One block with only `layer`'s adapter tensors (the recomputation needs no others).
fn one_layer<B: AutodiffBackend>(adapter: &Adapter<B>, layer: usize) -> Adapter<B::InnerBackend> {
    let mut layers = vec![BTreeMap::new(); layer + 1];
    layers[layer] = adapter.layers[layer]
        .iter()
        .map(|(k, p)| {
            let pair = LoraPair {
                a: p.a.clone().inner(),
                b: p.b.clone().inner(),
            };
            (k.clone(), pair)
        })
        .collect();
    Adapter {
        name: adapter.name.clone(),
        cfg: adapter.cfg.clone(),
        layers,
        training: adapter.training,
    }
}

/// Block `layer` as one autodiff node that keeps only its input; see the module doc.
/// `inner_inputs` are `inputs` on the plain backend (made once per forward, not per block).
pub fn checkpointed_block<B: AutodiffBackend>(
    cfg: &LlamaConfig,
    block: &Block<B>,
    layer: usize,
    h: Tensor<B, 3>,
    inputs: &AttnInputs<B>,
    inner_inputs: &AttnInputs<B::InnerBackend>,
    adapter: &Adapter<B>,
) -> Tensor<B, 3> {
    // Parents: the block input, then A and B of each adapted module in the adapter's order.
    let mut nodes = Vec::new();
    nodes.push(ad::<B, 3>(&h));
    for p in adapter.layers[layer].values() {
        nodes.push(ad::<B, 2>(&p.a));
        nodes.push(ad::<B, 2>(&p.b));
    }
    let Some(nodes) = nodes.into_iter().collect::<Option<Vec<_>>>() else {
        return block.forward(cfg, layer, h, inputs, Some(adapter), None);
    };
    let ih = h.inner();
    let seed = (adapter.training && adapter.cfg.dropout > 0.0)
        .then(|| splitmix(DROPOUT_SEEDS.fetch_add(1, Ordering::Relaxed)));
    if let Some(seed) = seed {
        B::InnerBackend::seed(&ih.device(), seed);
    }
    let state = BlockState {
        cfg: cfg.clone(),
        layer,
        block: block.inner(),
        adapter: one_layer(adapter, layer),
        h: stash(ih.clone()),
        inputs: inner_inputs.clone(),
        seed,
    };
    let out = state
        .block
        .forward(cfg, layer, ih, &state.inputs, Some(&state.adapter), None)
        .into_primitive()
        .tensor();
    let op = BlockBackward(PhantomData);
    let out = match nodes.len() {
        1 => record::<_, _, 1>(op, &nodes, state, out),
        3 => record::<_, _, 3>(op, &nodes, state, out),
        5 => record::<_, _, 5>(op, &nodes, state, out),
        7 => record::<_, _, 7>(op, &nodes, state, out),
        9 => record::<_, _, 9>(op, &nodes, state, out),
        11 => record::<_, _, 11>(op, &nodes, state, out),
        13 => record::<_, _, 13>(op, &nodes, state, out),
        15 => record::<_, _, 15>(op, &nodes, state, out),
        n => unreachable!("{n} parents: a block has at most 7 adapted modules"),
    };
    from_ad::<B, 3>(out).expect("same backend as the input")
}

/// A well-mixed 64-bit seed from a counter.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `res` plus the RMSNorm backward of `dy` (`y = w * x * inv`, `inv = 1 / sqrt(mean(x^2) + eps)`).
fn rms_backward<B: Backend>(
    res: Tensor<B, 3>,
    dy: Tensor<B, 3>,
    x: &Tensor<B, 3>,
    inv: &Tensor<B, 3>,
    w: &Tensor<B, 1>,
) -> Tensor<B, 3> {
    #[cfg(feature = "cuda")]
    if let Some(dx) = crate::cuda::train_ops::try_rms_backward(&res, &dy, x, inv, w) {
        return dx;
    }
    let xn = x.clone() * inv.clone();
    let dxn = dy * w.clone().unsqueeze_dim::<2>(0).unsqueeze_dim::<3>(0);
    let dot = (dxn.clone() * xn.clone()).mean_dim(2);
    res + (dxn - xn * dot) * inv.clone()
}

/// `(dgate, dup)` of `act = silu(gate) * up`.
fn swiglu_backward<B: Backend>(
    dact: Tensor<B, 3>,
    gate: Tensor<B, 3>,
    up: Tensor<B, 3>,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    #[cfg(feature = "cuda")]
    let (gate, up) = match crate::cuda::train_ops::try_swiglu_backward(&dact, gate, up) {
        Ok(r) => return r,
        Err(inputs) => inputs,
    };
    let sig = activation::sigmoid(gate.clone());
    let silu = gate.clone() * sig.clone();
    let dsilu = sig.clone() * (gate * (sig.neg() + 1.0) + 1.0);
    (dact.clone() * up * dsilu, dact * silu)
}

/// What the attention's backward reads of a block's trace.
struct AttnTrace<B: Backend> {
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    /// Kept by the reference forward; the fused CUDA backward recomputes them.
    probs: Option<Tensor<B, 4>>,
}

/// Gradients of `llama::attention` from `dout [b, nh, t, d]`: `(dq, dk, dv)`, the key and value
/// gradients summed over the query heads sharing them (`[b, nkv, total, d]`).
#[allow(clippy::type_complexity)]
fn attention_backward<B: Backend>(
    dout: Tensor<B, 4>,
    tr: AttnTrace<B>,
    inputs: &AttnInputs<B>,
    scale: f64,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    #[cfg(feature = "cuda")]
    if let Some(bias) = &inputs.bias {
        let device = dout.device();
        let ([b, nh, t, _], [_, nkv, total, _]) = (dout.dims(), tr.k.dims());
        let block = super::ops::attention_query_block(b, nh, nkv, t, total);
        let slice = super::ops::attention_backward_slice(b * nkv);
        let mut at_high = || crate::devmem::note::<B>(&device, "attention backward (score slice)");
        if let Some(r) = crate::cuda::attention::try_attention_backward(
            &dout,
            (&tr.q, &tr.k, &tr.v),
            (bias, inputs.rule()),
            scale,
            (block, slice, &mut at_high),
        ) {
            return r;
        }
    }
    let probs = tr
        .probs
        .unwrap_or_else(|| attention_probs(&tr.q, &tr.k, inputs, scale));
    let mask = inputs.mask();
    let [b, nh, t, _] = dout.dims();
    let [_, nkv, total, _] = tr.k.dims();
    let rep = nh / nkv;
    let ke = expand_kv(tr.k, rep);
    let ve = expand_kv(tr.v, rep);
    let dve = probs.clone().swap_dims(2, 3).matmul(dout.clone());
    let dp = dout.matmul(ve.swap_dims(2, 3));
    let row = (dp.clone() * probs.clone()).sum_dim(3);
    let ds = (probs * (dp - row)).mask_fill(mask.expand([b, nh, t, total]), 0.0) * scale;
    let dq = ds.clone().matmul(ke);
    let dke = ds.swap_dims(2, 3).matmul(tr.q);
    (dq, reduce_kv(dke, rep), reduce_kv(dve, rep))
}

/// Input gradients through one adapted linear, collecting the LoRA factors' gradients.
struct LinearGrads<'a, B: Backend> {
    block: &'a Block<B>,
    pairs: &'a BTreeMap<String, LoraPair<B>>,
    /// Each module's trace, dropped once its backward ran (its input is released then).
    traces: BTreeMap<&'static str, LoraTrace<B>>,
    scaling: f64,
    grads: GradMap<B>,
}

impl<B: Backend> LinearGrads<'_, B> {
    /// `dy [b, t, out] -> dx [b, t, in]` for `y = x W^T + s * drop(x) A^T B^T`.
    fn backward(&mut self, name: &'static str, dy: Tensor<B, 3>) -> Tensor<B, 3> {
        let base = self.block.linear(name).expect("known module name");
        let dx = base.backward_input(dy.clone());
        let (Some(pair), Some(tr)) = (self.pairs.get(name), self.traces.remove(name)) else {
            return dx;
        };
        let [b, t, out] = dy.dims();
        let dy = dy.reshape([b * t, out]);
        let s = self.scaling;
        // dB = s dy^T z, dz = s dy B, dA = dz^T x, dx = dz A (times the dropout mask).
        let db = matmul(&dy, &tr.z, true, false, s);
        let dz = matmul(&dy, &pair.b, false, false, s);
        let da = matmul(&dz, &tr.x, true, false, 1.0);
        self.grads.insert(name, (da, db));
        let dx = dx.reshape([b * t, base.in_features]);
        let dx = match &tr.keep {
            Some(keep) => dx + matmul(&dz, &pair.a, false, false, 1.0) * keep.clone(),
            // The base's fresh input gradient takes `dz A` in place.
            None => matmul_acc(dx, &dz, &pair.a, false, false, 1.0),
        };
        dx.reshape([b, t, base.in_features])
    }
}

/// Sums the `rep` query heads' gradients back onto their shared key/value head.
fn reduce_kv<B: Backend>(x: Tensor<B, 4>, rep: usize) -> Tensor<B, 4> {
    if rep == 1 {
        return x;
    }
    let [b, nh, t, d] = x.dims();
    x.reshape([b, nh / rep, rep, t, d])
        .sum_dim(2)
        .reshape([b, nh / rep, t, d])
}

/// `(dA, dB)` of each adapted module of a layer.
type FactorGrads<B> = Vec<(Tensor<B, 2>, Tensor<B, 2>)>;

/// `(dA, dB)` per adapted module, as the block backward collects them.
type GradMap<B> = BTreeMap<&'static str, (Tensor<B, 2>, Tensor<B, 2>)>;

/// Rows of a block's MLP recomputed and differentiated at once: few enough that a `[rows,
/// intermediate]` f32 tensor stays within [`MLP_CHUNK_BYTES`] (the MLP's tensors were the block
/// backward's high point: 0.5b DPO, 4,096 tokens x 4,864, 76 MiB each), all rows when LoRA
/// dropout is on (its masks are drawn as the forward drew them, whole projections at a time).
fn mlp_chunk_rows(rows: usize, inter: usize, dropout: bool) -> usize {
    let bound = MLP_CHUNK_BYTES.load(Ordering::Relaxed);
    super::row_chunks::rows_within(rows, inter, bound, dropout)
}

/// The default bound of [`mlp_chunk_rows`] (32 MiB: with 64, the 8b DPO step's MLP backward
/// was its high point, 43 MiB above the logits pass; each extra chunk costs a few dozen
/// launches). The planner counts the same chunks.
pub const MLP_CHUNK_BOUND: usize = 32 << 20;

/// The bound in force; a test lowers it to chunk a tiny model's MLP.
static MLP_CHUNK_BYTES: AtomicUsize = AtomicUsize::new(MLP_CHUNK_BOUND);

/// The MLP's part of the block backward: recomputes `gate`, `up` and the activation from the
/// MLP input `x2` ([`mlp_chunk_rows`] rows at a time) and returns `dx2` from `dout`, adding the
/// gate/up/down LoRA factors' gradients into `grads`.
fn mlp_backward<B: Backend>(
    block: &Block<B>,
    layer: usize,
    adapter: &Adapter<B>,
    x2: Tensor<B, 3>,
    dout: Tensor<B, 3>,
    grads: &mut GradMap<B>,
) -> Tensor<B, 3> {
    let [b, t, _] = dout.dims();
    let inter = block
        .linear("gate_proj")
        .expect("known module name")
        .out_features;
    let dropout = adapter.training && adapter.cfg.dropout > 0.0;
    let chunk = mlp_chunk_rows(b * t, inter, dropout);
    in_row_chunks([x2, dout], chunk, |[x, d]| {
        mlp_chunk_backward(block, layer, adapter, x, d, grads)
    })
}

/// [`mlp_backward`] for one chunk of rows.
fn mlp_chunk_backward<B: Backend>(
    block: &Block<B>,
    layer: usize,
    adapter: &Adapter<B>,
    x2: Tensor<B, 3>,
    dout: Tensor<B, 3>,
    grads: &mut GradMap<B>,
) -> Tensor<B, 3> {
    let device = dout.device();
    let empty = BTreeMap::new();
    let tr = block.mlp_traced(layer, x2, Some(adapter));
    let mut lin = LinearGrads {
        block,
        pairs: adapter.layers.get(layer).unwrap_or(&empty),
        traces: tr.lora,
        scaling: adapter.scaling(),
        grads: BTreeMap::new(),
    };
    let dact = lin.backward("down_proj", dout);
    let (dgate, dup) = swiglu_backward(dact, tr.gate, tr.up);
    crate::devmem::note::<B>(&device, "block backward (MLP)");
    let dx2 = lin.backward("gate_proj", dgate) + lin.backward("up_proj", dup);
    for (name, (da, db)) in lin.grads {
        let sum = match grads.remove(name) {
            Some((a, b)) => (a + da, b + db),
            None => (da, db),
        };
        grads.insert(name, sum);
    }
    dx2
}

/// The hand-written backward of `Block::forward_traced` (no cache): `dout` -> gradient of the
/// block input, and `(dA, dB)` for each adapted module in the adapter's (sorted) order. The
/// trace is consumed: each recomputed activation is released once the backward no longer
/// needs it. The MLP is recomputed here, a chunk of rows at a time ([`mlp_backward`]).
#[allow(clippy::too_many_arguments)]
pub fn block_backward<B: Backend>(
    cfg: &LlamaConfig,
    block: &Block<B>,
    layer: usize,
    h: &Tensor<B, 3>,
    inputs: &AttnInputs<B>,
    adapter: &Adapter<B>,
    tr: BlockTrace<B>,
    dout: Tensor<B, 3>,
) -> (Tensor<B, 3>, FactorGrads<B>) {
    let (nh, hd) = (cfg.num_attention_heads, cfg.head_dim);
    let device = dout.device();
    let empty = BTreeMap::new();
    let pairs = adapter.layers.get(layer).unwrap_or(&empty);
    let BlockTrace {
        q,
        k,
        v,
        probs,
        h2,
        inv1,
        inv2,
        lora,
        x1,
        attn,
        x2,
    } = tr;
    // Held elsewhere (the LoRA traces keep the projections' inputs) or not needed here.
    drop((x1, attn));
    let mut lin = LinearGrads {
        block,
        pairs,
        traces: lora,
        scaling: adapter.scaling(),
        grads: BTreeMap::new(),
    };

    // MLP: out = h2 + down(silu(gate) * up), recomputed here a chunk of rows at a time.
    let dx2 = mlp_backward(block, layer, adapter, x2, dout.clone(), &mut lin.grads);
    let dh2 = rms_backward(dout, dx2, &h2, &inv2, &block.post_norm);
    drop(h2);

    // Attention: h2 = h + o_proj(softmax(mask(q k^T * scale)) v).
    let dattn = to_heads(lin.backward("o_proj", dh2.clone()), nh, None);
    let scale = 1.0 / (hd as f64).sqrt();
    let attn = AttnTrace { q, k, v, probs };
    let (dq, dk, dv) = attention_backward(dattn, attn, inputs, scale);
    crate::devmem::note::<B>(&device, "block backward (attention)");
    // RoPE is a rotation: its gradient rotates back by minus the angle.
    let tables = Some((&inputs.cos, &inputs.sin));
    let dq = from_heads(dq, tables);
    let dk = from_heads(dk, tables);
    let dv = from_heads(dv, None);
    let dx1 = lin.backward("q_proj", dq) + lin.backward("k_proj", dk) + lin.backward("v_proj", dv);
    let dh = rms_backward(dh2, dx1, h, &inv1, &block.input_norm);

    let mut grads = lin.grads;
    let dparams = pairs
        .keys()
        .map(|k| {
            grads
                .remove(k.as_str())
                .expect("every adapted module of the layer was traced")
        })
        .collect();
    (dh, dparams)
}

impl<B: AutodiffBackend> Llama<B> {
    /// A forward pass of a frozen role (the reference, with or without its adapter): nothing to
    /// differentiate, so it runs on the plain backend, where the fused CUDA ops apply and no
    /// graph is kept; the adapter runs without dropout.
    pub fn forward_hidden_frozen(
        &self,
        batch: &Batch<B>,
        adapter: Option<&Adapter<B>>,
    ) -> Tensor<B, 3> {
        let inner = Batch {
            tokens: batch.tokens.clone().inner(),
            valid: batch.valid.clone(),
        };
        let adapter = adapter.map(|a| a.inner());
        Tensor::from_inner(self.inner().forward_hidden(&inner, adapter.as_ref(), None))
    }

    /// The training forward: with `checkpoint` (and an adapter to train), each block is one
    /// autodiff node that keeps only its input and is recomputed in backward
    /// (`model::checkpoint`); otherwise burn's autodiff keeps every op's inputs.
    pub fn forward_hidden_train(
        &self,
        batch: &Batch<B>,
        adapter: Option<&Adapter<B>>,
        checkpoint: bool,
    ) -> Tensor<B, 3> {
        let Some(adapter) = adapter.filter(|_| checkpoint) else {
            if adapter.is_none() {
                return self.forward_hidden_frozen(batch, None);
            }
            return self.forward_hidden(batch, adapter, None);
        };
        let Prepared { mut h, inputs, .. } = self.prepare(batch, None);
        let inner = AttnInputs::new(
            inputs.cos.clone().inner(),
            inputs.sin.clone().inner(),
            inputs.keys.clone(),
        );
        for (l, block) in self.layers.iter().enumerate() {
            h = checkpointed_block(&self.cfg, block, l, h, &inputs, &inner, adapter);
        }
        self.final_norm(h)
    }
}

#[cfg(test)]
mod tests {
    //! The checkpointed block and the chunked log-probs against burn's own autodiff of the same
    //! forward (the reference), on the transformers fixtures (Llama 3 RoPE + GQA, Qwen2 biases +
    //! tied embeddings, Mistral sliding window), NF4 and dense, with left padding and dropout.
    use super::*;
    use crate::config::{LoraConfig, ALL_TARGETS};
    use crate::model::logps::token_logps;
    use crate::model::{Batch, LoadOptions};
    use burn::backend::NdArray;
    use burn::tensor::{Int, TensorData};
    use burn_autodiff::Autodiff;
    use std::path::Path;

    type Ad = Autodiff<NdArray<f32>>;

    fn batch(vocab: usize) -> (Vec<Vec<u32>>, Vec<Vec<bool>>) {
        let t = 12;
        let ids: Vec<Vec<u32>> = (0..3)
            .map(|r| {
                (0..t)
                    .map(|i| ((r * 31 + i * 17 + 5) % vocab) as u32)
                    .collect()
            })
            .collect();
        // Row 1 is left-padded by 4, row 2 by 1.
        let valid = (0..3)
            .map(|r| (0..t).map(|i| i >= [0, 4, 1][r]).collect())
            .collect();
        (ids, valid)
    }

    /// `sum(w * log p(token))` and the gradients of every adapter tensor.
    fn loss_and_grads(
        model: &Llama<Ad>,
        adapter: &Adapter<Ad>,
        checkpoint: bool,
        chunk: usize,
    ) -> (f32, Vec<Vec<f32>>) {
        let dev = Default::default();
        let mut adapter = adapter.clone();
        let params: Vec<Tensor<Ad, 2>> = adapter
            .tensors()
            .into_iter()
            .map(|t| t.require_grad())
            .collect();
        adapter.set_tensors(params.clone().into_iter());
        let (ids, valid) = batch(model.cfg.vocab_size);
        let input = Batch::<Ad>::new(&ids, valid, &dev);
        let seed0 = 1000;
        DROPOUT_SEEDS.store(seed0, Ordering::Relaxed);
        let hidden = if checkpoint {
            model.forward_hidden_train(&input, Some(&adapter), true)
        } else {
            // The reference: burn's autodiff through the plain block forward, with the dropout
            // RNG seeded per block exactly as the checkpointed forward seeds it.
            let crate::model::llama::Prepared { mut h, inputs, .. } = model.prepare(&input, None);
            for (l, block) in model.layers.iter().enumerate() {
                if adapter.cfg.dropout > 0.0 {
                    Ad::seed(&dev, splitmix(seed0 + l as u64));
                }
                h = block.forward(&model.cfg, l, h, &inputs, Some(&adapter), None);
            }
            model.final_norm(h)
        };
        let [b, t, h] = hidden.dims();
        let hidden = hidden
            .slice([0..b, 0..t - 1, 0..h])
            .reshape([b * (t - 1), h]);
        let labels: Vec<i64> = ids
            .iter()
            .flat_map(|r| r[1..].iter().map(|&x| x as i64))
            .collect();
        let temperature = 0.7;
        let lp = if checkpoint {
            token_logps(model, hidden, labels, temperature, chunk)
        } else {
            let n = labels.len();
            let labels = Tensor::<Ad, 2, Int>::from_data(TensorData::new(labels, [n, 1]), &dev);
            let z = model.output_head().forward(hidden) / temperature;
            activation::log_softmax(z, 1).gather(1, labels).reshape([n])
        };
        let n = lp.dims()[0];
        let w: Vec<f32> = (0..n).map(|i| ((i * 7) % 5) as f32 - 1.5).collect();
        let loss = (lp * Tensor::<Ad, 1>::from_data(TensorData::new(w, [n]), &dev)).sum();
        let value = loss.clone().into_scalar();
        let grads = loss.backward();
        let g = params
            .iter()
            .map(|p| {
                p.grad(&grads)
                    .expect("every adapter tensor gets a gradient")
                    .into_data()
                    .to_vec::<f32>()
                    .unwrap()
            })
            .collect();
        (value, g)
    }

    /// The backend RNG and the seed counter are global: these checks run one at a time.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn check(name: &str, quantize: bool, dropout: f32, chunk: usize) {
        check_with(
            name,
            quantize,
            dropout,
            chunk,
            crate::model::row_chunks::MLP_FORWARD_BOUND,
        );
    }

    /// [`check`] with the checkpointed path's block forward chunking its MLP at `forward_bound`
    /// bytes (the reference keeps the default).
    fn check_with(name: &str, quantize: bool, dropout: f32, chunk: usize, forward_bound: usize) {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hf")
            .join(name);
        let dev = Default::default();
        let model = Llama::<Ad>::from_hf_dir(&dir, LoadOptions { quantize }, &dev).unwrap();
        let cfg = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout,
            target_modules: ALL_TARGETS.iter().map(|s| s.to_string()).collect(),
        };
        let mut adapter = Adapter::<Ad>::new("policy", &cfg, &model.cfg, 7, &dev).unwrap();
        adapter.training = true;
        // B starts at zero (PEFT's init), which would hide A's gradient: make it non-zero.
        let ts: Vec<Tensor<Ad, 2>> = adapter
            .tensors()
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let dims = t.dims();
                let v: Vec<f32> = (0..dims[0] * dims[1])
                    .map(|k| (((k * 7 + i * 13) % 17) as f32 - 8.0) * 0.02)
                    .collect();
                Tensor::from_data(TensorData::new(v, dims), &dev)
            })
            .collect();
        adapter.set_tensors(ts.into_iter());
        let (l_ref, g_ref) = loss_and_grads(&model, &adapter, false, 0);
        crate::model::row_chunks::set_mlp_forward_bound(forward_bound);
        let (l_ck, g_ck) = loss_and_grads(&model, &adapter, true, chunk);
        crate::model::row_chunks::set_mlp_forward_bound(
            crate::model::row_chunks::MLP_FORWARD_BOUND,
        );
        assert!(
            (l_ref - l_ck).abs() <= 1e-4 * l_ref.abs().max(1.0),
            "{name}: loss {l_ck} vs reference {l_ref}"
        );
        let scale = g_ref
            .iter()
            .flatten()
            .fold(0f32, |m, v| m.max(v.abs()))
            .max(1e-6);
        for (i, (a, b)) in g_ref.iter().zip(&g_ck).enumerate() {
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= 2e-4 * scale,
                "{name}: adapter tensor {i}: max |grad diff| {diff} (largest grad {scale})"
            );
        }
    }

    #[test]
    fn checkpointed_llama_matches_autodiff() {
        check("llama", false, 0.0, 0);
    }

    #[test]
    fn checkpointed_nf4_llama_with_dropout_and_chunked_logits_matches_autodiff() {
        check("llama", true, 0.1, 7);
    }

    #[test]
    fn checkpointed_llama_with_mlp_row_chunks_matches_autodiff() {
        // A few hundred bytes per chunk: the fixture's MLP is recomputed in many row chunks
        // (other tests running meanwhile may chunk too, which they must survive as well).
        MLP_CHUNK_BYTES.store(512, Ordering::Relaxed);
        assert!(mlp_chunk_rows(16, 64, false) < 16);
        check("llama", true, 0.0, 3);
        MLP_CHUNK_BYTES.store(MLP_CHUNK_BOUND, Ordering::Relaxed);
    }

    #[test]
    fn checkpointed_llama_with_forward_mlp_row_chunks_matches_autodiff() {
        // The block forward (which makes the checkpoints) runs its MLP in row chunks of a few
        // rows, as long rows do; the reference runs it whole.
        crate::model::row_chunks::set_mlp_forward_bound(1024);
        assert!(crate::model::row_chunks::mlp_forward_rows(16, 64, false) < 16);
        crate::model::row_chunks::set_mlp_forward_bound(
            crate::model::row_chunks::MLP_FORWARD_BOUND,
        );
        check_with("llama", true, 0.0, 3, 1024);
    }

    #[test]
    fn checkpointed_qwen2_tied_embeddings_matches_autodiff() {
        check("qwen2", false, 0.0, 5);
    }

    #[test]
    fn checkpointed_mistral_sliding_window_matches_autodiff() {
        check("mistral", false, 0.05, 0);
    }
}
