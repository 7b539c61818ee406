//! Fused decode on CUDA: one sampling step of the whole model in ~16 kernel launches per block.
//!
//! Through burn's tensor ops a decode step of a 24-layer model is ~2,400 small launches (RMSNorm
//! alone is six, each LoRA delta four, RoPE ten, the growing KV cache a concatenation per layer
//! and step), and at a few rows the host cost of each launch, not the GPU, sets the step time.
//! Here the prompt is prefilled by the ordinary forward, its keys and values are copied once into
//! a preallocated cache, and every later token runs: RMSNorm, one `x A^T` for the LoRA factors
//! of a group of modules, the NF4 GEMVs with the LoRA up-projection (and the residual add) fused
//! in, RoPE + cache append, attention over the cache, SwiGLU. Only the vocabulary projection goes
//! back through the ordinary path. `examples/decode_check.rs` compares its logits with the
//! ordinary forward's step by step.

use super::kernels::{
    decode_attention, embed_rows, f32_gemv, rms_norm_rows, rope_append, silu_mul, DECODE_MAX_KEYS,
};
use super::qlinear::{GpuLinear, Inner, LoraUp, GEMV_MAX_ROWS};
use crate::lora::Adapter;
use crate::model::llama::OutputHead;
use crate::model::{KvCache, Llama};
use anyhow::{ensure, Result};
use burn::tensor::{backend::Backend, DType, Shape, Tensor, TensorData, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::prelude::*;
use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

type T = CubeTensor<CudaRuntime>;

/// Switch for A/B measurements (`RLHF_NO_FUSED_DECODE=1` or [`set_enabled`]).
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the fused decode on or off for later `generate` calls.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// The seven projections in the order the groups below index them (q, k, v, o, gate, up, down).
const MODULES: [&str; 7] = crate::config::ALL_TARGETS;
/// Modules that read the same input, so their LoRA `x A^T` is one GEMV.
const GROUPS: [&[usize]; 4] = [&[0, 1, 2], &[3], &[4, 5], &[6]];

/// One group's stacked LoRA A `[sum of ranks, in]`, and each member's slice of `x A^T` and B.
struct Group {
    a: T,
    width: usize,
    /// Per module of the group: (module index, offset in `z`, rank, B `[out, rank]`).
    members: Vec<(usize, usize, usize, T)>,
}

struct Layer {
    input_norm: T,
    post_norm: T,
    lin: Vec<Arc<GpuLinear>>,
    groups: Vec<Option<Group>>,
}

/// The state of one batch being sampled: caches, the per-layer weights' GPU forms.
pub struct FusedDecode {
    client: ComputeClient<CudaRuntime>,
    device: CudaDevice,
    layers: Vec<Layer>,
    k_cache: Vec<T>,
    v_cache: Vec<T>,
    valid: T,
    inv_freq: T,
    embed: T,
    final_norm: T,
    head: OutputHead<Inner>,
    scale: f32,
    rows: usize,
    cap: usize,
    len: usize,
    next_pos: Vec<i64>,
    hidden: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    inter: usize,
    eps: f32,
    window: usize,
}

fn prim<const D: usize>(t: Tensor<Inner, D>) -> T {
    into_contiguous(t.into_primitive().tensor())
}

impl FusedDecode {
    /// Takes over after the prompt was prefilled into `cache` by the ordinary forward. `None`
    /// when `B` is not the plain CUDA backend, or the model is outside what the kernels cover
    /// (more than 16 rows, dense or biased projections, caches beyond 4,096 slots, odd head
    /// dims); the caller keeps the ordinary path then.
    pub fn try_new<B: Backend>(
        model: &Llama<B>,
        adapter: Option<&Adapter<B>>,
        cache: &KvCache<B>,
        cap: usize,
    ) -> Option<Self> {
        if !ENABLED.load(Ordering::Relaxed) || std::env::var_os("RLHF_NO_FUSED_DECODE").is_some() {
            return None;
        }
        let model = (model as &dyn Any).downcast_ref::<Llama<Inner>>()?;
        let adapter = match adapter {
            Some(a) => Some((a as &dyn Any).downcast_ref::<Adapter<Inner>>()?),
            None => None,
        };
        let cache = (cache as &dyn Any).downcast_ref::<KvCache<Inner>>()?;
        Self::new(model, adapter, cache, cap)
    }

    fn new(
        model: &Llama<Inner>,
        adapter: Option<&Adapter<Inner>>,
        cache: &KvCache<Inner>,
        cap: usize,
    ) -> Option<Self> {
        let cfg = &model.cfg;
        let rows = cache.key_valid.len();
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        if rows == 0
            || rows > GEMV_MAX_ROWS
            || cap > DECODE_MAX_KEYS
            || cache.len() >= cap
            || hd % 2 != 0
            || nkv == 0
            || nh % nkv != 0
        {
            return None;
        }
        if adapter.is_some_and(|a| a.training && a.cfg.dropout > 0.0) {
            return None;
        }
        let device = model.device.clone();
        let client = CudaRuntime::client(&device);
        let mut layers = Vec::with_capacity(model.layers.len());
        for (l, block) in model.layers.iter().enumerate() {
            let mut lin = Vec::with_capacity(7);
            for name in MODULES {
                let base = block.linear(name)?;
                if base.bias.is_some() {
                    return None;
                }
                let gpu = base
                    .gpu
                    .get_or_init(|| super::build(base, &device))
                    .clone()?;
                if !gpu.is_nf4() {
                    return None;
                }
                lin.push(gpu);
            }
            let mut groups = Vec::with_capacity(GROUPS.len());
            for members in GROUPS {
                let pairs: Vec<_> = members
                    .iter()
                    .filter_map(|&m| {
                        let pair = adapter?.layers.get(l)?.get(MODULES[m])?;
                        Some((m, pair))
                    })
                    .collect();
                if pairs.is_empty() {
                    groups.push(None);
                    continue;
                }
                let a = Tensor::cat(pairs.iter().map(|(_, p)| p.a.clone()).collect(), 0);
                let width = a.dims()[0];
                let mut off = 0;
                let mut group_members = Vec::new();
                for (m, p) in &pairs {
                    let rank = p.a.dims()[0];
                    group_members.push((*m, off, rank, prim(p.b.clone())));
                    off += rank;
                }
                groups.push(Some(Group {
                    a: prim(a),
                    width,
                    members: group_members,
                }));
            }
            layers.push(Layer {
                input_norm: prim(block.input_norm.clone()),
                post_norm: prim(block.post_norm.clone()),
                lin,
                groups,
            });
        }
        // The prefilled keys and values, copied once into caches of `cap` slots.
        let past = cache.len();
        let mut k_cache = Vec::with_capacity(layers.len());
        let mut v_cache = Vec::with_capacity(layers.len());
        for entry in &cache.layers {
            let (k, v) = entry.as_ref()?;
            let full = |x: &Tensor<Inner, 4>| {
                Tensor::<Inner, 4>::zeros([rows, nkv, cap, hd], &device)
                    .slice_assign([0..rows, 0..nkv, 0..past, 0..hd], x.clone())
            };
            k_cache.push(prim(full(k)));
            v_cache.push(prim(full(v)));
        }
        let valid: Vec<u32> = cache
            .key_valid
            .iter()
            .flat_map(|r| (0..cap).map(move |j| r.get(j).copied().unwrap_or(false) as u32))
            .collect();
        let valid = Tensor::<Inner, 1, burn::tensor::Int>::from_data(
            TensorData::new(
                valid.iter().map(|&v| v as i32).collect::<Vec<_>>(),
                [rows * cap],
            ),
            &device,
        );
        let valid = into_contiguous(valid.into_primitive());
        let f = |v: &[f32]| {
            prim(Tensor::<Inner, 1>::from_data(
                TensorData::new(v.to_vec(), [v.len()]),
                &device,
            ))
        };
        Some(Self {
            inv_freq: f(&model.inv_freq),
            embed: prim(model.embed.clone()),
            final_norm: prim(model.norm.clone()),
            head: model.output_head(),
            scale: adapter.map(|a| a.scaling() as f32).unwrap_or(0.0),
            client,
            device,
            layers,
            k_cache,
            v_cache,
            valid,
            rows,
            cap,
            len: past,
            next_pos: cache.next_pos.clone(),
            hidden: cfg.hidden_size,
            nh,
            nkv,
            hd,
            inter: cfg.intermediate_size,
            eps: cfg.rms_norm_eps as f32,
            window: cfg.sliding_window.unwrap_or(0),
        })
    }

    fn empty(&self, n: usize) -> T {
        empty_device_contiguous_dtype(
            self.client.clone(),
            self.device.clone(),
            Shape::new([n]),
            DType::F32,
        )
    }

    fn rms(&self, x: &T, w: &T) -> T {
        let y = self.empty(self.rows * self.hidden);
        // SAFETY: x and y hold rows x hidden values, w hidden.
        unsafe {
            rms_norm_rows::launch_unchecked::<CudaRuntime>(
                &self.client,
                CubeCount::Static(self.rows as u32, 1, 1),
                CubeDim::new_1d(256),
                ArrayArg::from_raw_parts(x.handle.clone(), self.rows * self.hidden),
                ArrayArg::from_raw_parts(w.handle.clone(), self.hidden),
                self.eps,
                self.hidden,
                ArrayArg::from_raw_parts(y.handle.clone(), self.rows * self.hidden),
                8,
            )
        };
        y
    }

    /// `x A^T` for every adapted module of group `g` of layer `l`.
    fn lora_z(&self, l: usize, g: usize, x: &T, width_in: usize) -> Option<T> {
        let group = self.layers[l].groups[g].as_ref()?;
        let z = self.empty(self.rows * group.width);
        // SAFETY: x is rows x in, A width x in, z rows x width.
        unsafe {
            f32_gemv::launch_unchecked::<CudaRuntime>(
                &self.client,
                CubeCount::Static(group.width as u32, 1, 1),
                CubeDim::new_2d(32, 8),
                ArrayArg::from_raw_parts(x.handle.clone(), self.rows * width_in),
                ArrayArg::from_raw_parts(group.a.handle.clone(), group.width * width_in),
                width_in,
                group.width,
                ArrayArg::from_raw_parts(z.handle.clone(), self.rows * group.width),
                self.rows,
                8,
            )
        };
        Some(z)
    }

    /// Module `m` of layer `l` on `x`, with its LoRA delta (from `z` of its group) and an
    /// optional residual.
    fn linear(&self, l: usize, g: usize, m: usize, x: &T, z: Option<&T>, res: Option<&T>) -> T {
        let layer = &self.layers[l];
        let up = z.and_then(|z| {
            let group = layer.groups[g].as_ref()?;
            let (_, off, rank, b) = group.members.iter().find(|e| e.0 == m)?;
            Some(LoraUp {
                z,
                z_stride: group.width,
                z_offset: *off,
                rank: *rank,
                b,
                scale: self.scale,
            })
        });
        layer.lin[m]
            .gemv_fused(x, self.rows, up.as_ref(), res)
            .expect("checked NF4 at construction")
    }

    /// Feeds one token per row (`valid` false for rows that already stopped) and returns the
    /// next-token logits, `[rows, vocab]` row-major.
    pub fn step(&mut self, tokens: &[u32], valid: &[bool]) -> Result<Vec<f32>> {
        ensure!(
            tokens.len() == self.rows && valid.len() == self.rows,
            "fused decode: expected {} rows",
            self.rows
        );
        ensure!(self.len < self.cap, "fused decode: the cache is full");
        let rows = self.rows;
        // Positions count real tokens only, as in `Llama::prepare`.
        let mut pos = Vec::with_capacity(rows);
        for (i, &v) in valid.iter().enumerate() {
            if v {
                pos.push(self.next_pos[i] as u32);
                self.next_pos[i] += 1;
            } else {
                pos.push(0);
            }
        }
        let step: Vec<u32> = tokens
            .iter()
            .copied()
            .chain(valid.iter().map(|&v| v as u32))
            .chain(pos)
            .collect();
        let step = self.client.create_from_slice(u32::as_bytes(&step));
        let (h_dim, q_dim, kv_dim) = (self.hidden, self.nh * self.hd, self.nkv * self.hd);
        let mut h = self.empty(rows * h_dim);
        // SAFETY (all launches below): every array length is the size of its buffer.
        unsafe {
            embed_rows::launch_unchecked::<CudaRuntime>(
                &self.client,
                CubeCount::Static(rows as u32, 1, 1),
                CubeDim::new_1d(256),
                ArrayArg::from_raw_parts(step.clone(), 3 * rows),
                ArrayArg::from_raw_parts(self.embed.handle.clone(), self.embed_len()),
                ArrayArg::from_raw_parts(h.handle.clone(), rows * h_dim),
                h_dim,
            )
        };
        let slot = self.len;
        for l in 0..self.layers.len() {
            let x = self.rms(&h, &self.layers[l].input_norm);
            let z = self.lora_z(l, 0, &x, h_dim);
            let q = self.linear(l, 0, 0, &x, z.as_ref(), None);
            let k = self.linear(l, 0, 1, &x, z.as_ref(), None);
            let v = self.linear(l, 0, 2, &x, z.as_ref(), None);
            unsafe {
                rope_append::launch_unchecked::<CudaRuntime>(
                    &self.client,
                    CubeCount::Static(rows as u32, 1, 1),
                    CubeDim::new_1d(256),
                    ArrayArg::from_raw_parts(q.handle.clone(), rows * q_dim),
                    ArrayArg::from_raw_parts(k.handle.clone(), rows * kv_dim),
                    ArrayArg::from_raw_parts(v.handle.clone(), rows * kv_dim),
                    ArrayArg::from_raw_parts(step.clone(), 3 * rows),
                    ArrayArg::from_raw_parts(self.inv_freq.handle.clone(), self.hd / 2),
                    ArrayArg::from_raw_parts(self.k_cache[l].handle.clone(), self.cache_len()),
                    ArrayArg::from_raw_parts(self.v_cache[l].handle.clone(), self.cache_len()),
                    ArrayArg::from_raw_parts(self.valid.handle.clone(), rows * self.cap),
                    rows,
                    self.nh,
                    self.nkv,
                    self.hd,
                    self.cap,
                    slot,
                )
            };
            let attn = self.empty(rows * q_dim);
            unsafe {
                decode_attention::launch_unchecked::<CudaRuntime>(
                    &self.client,
                    CubeCount::Static((rows * self.nh) as u32, 1, 1),
                    CubeDim::new_1d(128),
                    ArrayArg::from_raw_parts(q.handle.clone(), rows * q_dim),
                    ArrayArg::from_raw_parts(self.k_cache[l].handle.clone(), self.cache_len()),
                    ArrayArg::from_raw_parts(self.v_cache[l].handle.clone(), self.cache_len()),
                    ArrayArg::from_raw_parts(self.valid.handle.clone(), rows * self.cap),
                    ArrayArg::from_raw_parts(attn.handle.clone(), rows * q_dim),
                    self.nh,
                    self.nkv,
                    self.hd,
                    self.cap,
                    slot + 1,
                    self.window,
                    1.0 / (self.hd as f32).sqrt(),
                    4,
                )
            };
            let z = self.lora_z(l, 1, &attn, q_dim);
            let h2 = self.linear(l, 1, 3, &attn, z.as_ref(), Some(&h));
            let x = self.rms(&h2, &self.layers[l].post_norm);
            let z = self.lora_z(l, 2, &x, h_dim);
            let g = self.linear(l, 2, 4, &x, z.as_ref(), None);
            let u = self.linear(l, 2, 5, &x, z.as_ref(), None);
            let n = rows * self.inter;
            let act = self.empty(n);
            unsafe {
                silu_mul::launch_unchecked::<CudaRuntime>(
                    &self.client,
                    CubeCount::Static((n as u32).div_ceil(256), 1, 1),
                    CubeDim::new_1d(256),
                    ArrayArg::from_raw_parts(g.handle.clone(), n),
                    ArrayArg::from_raw_parts(u.handle.clone(), n),
                    ArrayArg::from_raw_parts(act.handle.clone(), n),
                    n,
                )
            };
            let z = self.lora_z(l, 3, &act, self.inter);
            h = self.linear(l, 3, 6, &act, z.as_ref(), Some(&h2));
        }
        self.len += 1;
        let h = self.rms(&h, &self.final_norm);
        let h =
            Tensor::<Inner, 2>::from_primitive(TensorPrimitive::Float(CubeTensor::new_contiguous(
                self.client.clone(),
                self.device.clone(),
                Shape::new([rows, h_dim]),
                h.handle,
                DType::F32,
            )));
        let logits = self.head.forward(h).into_data();
        logits
            .to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("reading logits: {e:?}"))
    }

    fn embed_len(&self) -> usize {
        self.embed.meta.shape().iter().product()
    }

    fn cache_len(&self) -> usize {
        self.rows * self.nkv * self.cap * self.hd
    }
}
