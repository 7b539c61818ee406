//! Fused decode on CUDA: one sampling step of the whole model in 9 kernel launches per block
//! (12 with an adapter).
//!
//! Through burn's tensor ops a decode step of a 24-layer model is ~2,400 small launches (RMSNorm
//! alone is six, each LoRA delta four, RoPE ten, the growing KV cache a concatenation per layer
//! and step), and at a few rows the host cost of each launch, not the GPU, sets the step time.
//! Here the prompt is prefilled by the ordinary forward, its keys and values are copied once into
//! a preallocated cache, and every later token runs, per group of modules that share an input
//! (q/k/v, o, gate/up, down), one launch of `nf4_mma::nf4_mma_group`: the group's NF4 weights
//! read once and multiplied with tensor cores (the residual added there), and on extra cubes the
//! group's LoRA down-projection `z = x A^T`. The up-projection `z B^T` of the gate/up group is
//! added by SwiGLU as it reads the group's output; the other groups' is one launch each
//! (`decode_kernels::lora_up_add`: RoPE and the RMSNorms have too few units to read B quickly). Then
//! RoPE + cache append, attention over the cache, SwiGLU, the RMSNorms, the vocabulary
//! projection, and (for plain temperature or greedy sampling) the draw of the next tokens.
//! `decode_check` with `ABLATE=1` times the step without each kind of launch.
//! `RLHF_DECODE_DEQUANT=1` (or a shape `nf4_mma::covers` does not take) keeps the earlier form:
//! the group dequantized to a bf16 workspace by one launch, one cuBLASLt GEMM, the LoRA
//! down-projection as a launch of its own (`decode_kernels::lora_down`); the up-projections as on the
//! MMA path.
//!
//! Every buffer a step touches is allocated once, and nothing that changes from step to step is
//! a launch argument (tokens, positions, the cache slot and the sampling seed are read from a
//! small device buffer written before the step). So after one ordinary step the whole step is
//! captured once into a CUDA graph on cubecl's stream and replayed: one launch per token instead
//! of ~450, whose host cost (~20 us each through cubecl) was the step time.
//! `RLHF_NO_DECODE_GRAPH=1` keeps the per-kernel launches. `examples/decode_check.rs` compares the logits with the ordinary
//! forward's step by step.

use crate::cuda::blas::{GemmIn, GemmShape};
use crate::cuda::decode_kernels::{
    decode_attention, embed_rows, lora_down, lora_up_add, rms_norm_rows, rope_append, sample_rows,
    silu_mul, step_words, DECODE_MAX_HEAD_DIM, DECODE_MAX_KEYS,
};
use crate::cuda::gemm::gemm_at;
use crate::cuda::nf4_mma::{self, MMA_ROWS};
use crate::cuda::qlinear::{GpuLinear, Inner, GEMV_MAX_ROWS};
use crate::model::llama::OutputHead;
use crate::model::lora::Adapter;
use crate::model::{KvCache, Llama};
use anyhow::{anyhow, ensure, Result};
use burn::tensor::{backend::Backend, DType, Shape, Tensor, TensorData};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::prelude::*;
use cubecl::server::Handle;
use cudarc::driver::{result as drv, sys as cu};
use rlhf_algorithms::trainer::SamplingParams;
use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

type T = CubeTensor<CudaRuntime>;

/// A kernel's LoRA arguments: `z`, B^T, width, outputs, scale, on ([`FusedDecode::lora_args`]).
type LoraArgs = (
    ArrayArg<CudaRuntime>,
    ArrayArg<CudaRuntime>,
    usize,
    usize,
    f32,
    bool,
);

/// Switch for A/B measurements (`RLHF_NO_FUSED_DECODE=1` or [`set_enabled`]).
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Whether steps are captured into a CUDA graph (off after a failed capture, or with
/// `RLHF_NO_DECODE_GRAPH=1`).
static GRAPHS: AtomicBool = AtomicBool::new(true);

fn graphs_enabled() -> bool {
    GRAPHS.load(Ordering::Relaxed) && !crate::switches::switches().no_decode_graph
}

/// Turns the fused decode on or off for later `generate` calls.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

mod build;

/// Launch classes of a step, for [`FusedDecode::ablate`].
pub mod skip {
    /// RMSNorms (each also writes the next GEMM's bf16 input).
    pub const NORM: u32 = 1;
    /// The LoRA down-projections (`x A^T`) and up-projections.
    pub const LORA: u32 = 2;
    /// The NF4 dequantizations into the workspace.
    pub const DEQUANT: u32 = 4;
    /// The projections' base GEMMs.
    pub const GEMM: u32 = 8;
    /// RoPE + cache append.
    pub const ROPE: u32 = 16;
    /// Attention over the cache.
    pub const ATTN: u32 = 32;
    /// SwiGLU.
    pub const SILU: u32 = 64;
    /// The LM head and the sampling kernel.
    pub const HEAD: u32 = 128;
    /// The names of the classes above, by bit.
    pub const NAMES: [&str; 8] = [
        "norm", "lora", "dequant", "gemm", "rope", "attn", "silu", "head",
    ];
}

/// The seven projections in the order the groups below index them (q, k, v, o, gate, up, down).
const MODULES: [&str; 7] = crate::config::ALL_TARGETS;
/// Modules that read the same input: their weights are dequantized side by side and multiplied
/// by one GEMM (outputs concatenated: `[q | k | v]`, `[gate | up]`), their LoRA down-projections
/// by one kernel.
const GROUPS: [&[usize]; 4] = [&[0, 1, 2], &[3], &[4, 5], &[6]];
/// The gate/up group's index in [`GROUPS`] (SwiGLU adds its LoRA up-projection itself).
const GATE_UP: usize = 2;

/// One group's LoRA: the members' A stacked `[width, in]` (`x A^T` of all of them is one kernel
/// into `z [rows, width]`) and their B block-diagonal `[group out, width]` (member m's B at its
/// output rows and its columns of `z`; zeros elsewhere), kept transposed, so the up-projection of
/// any of the group's output values is one dot product over `z`'s row (`decode_kernels::lora_up`).
struct GroupLora {
    a: T,
    width: usize,
    /// The group's output features.
    outs: usize,
    /// B transposed, `[width, outs]` (contiguous): consecutive outputs read consecutive values.
    bt: T,
}

struct Layer {
    input_norm: T,
    post_norm: T,
    lin: Vec<Arc<GpuLinear>>,
    lora: Vec<Option<GroupLora>>,
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
    head: Head,
    vocab: usize,
    bufs: StepBufs,
    /// Sampling on the GPU, when the caller's sampling parameters allow it.
    sampler: Option<Sampler>,
    /// The step inputs as last written (kept alive until the copy to `bufs.step` has run).
    host_step: Vec<u32>,
    graph: Option<Graph>,
    /// Launch classes left out of the step ([`skip`]); measurement only, see [`Self::ablate`].
    skip: u32,
    /// Ordinary steps run so far (the first compiles the kernels; capture comes after).
    plain_steps: usize,
    /// Whether the projections read NF4 directly with tensor cores (`nf4_mma`: one launch per
    /// group, LoRA down-projection included); otherwise dequantize + cuBLASLt
    /// (`RLHF_DECODE_DEQUANT=1`, or a shape `nf4_mma::covers` does not).
    mma: bool,
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

/// The vocabulary projection in the form the step can run without allocating.
enum Head {
    /// NF4 weight: the fused GEMV.
    Nf4(Arc<GpuLinear>),
    /// Dense bf16 weight `[vocab, hidden]`: the hidden rows cast to bf16, one cuBLASLt GEMM.
    Bf16(Arc<GpuLinear>),
    /// Tied f32 embeddings `[vocab, hidden]`: one TF32 cuBLASLt GEMM.
    Tied(Box<T>),
}

/// Plain temperature (or greedy) sampling inside the step (`decode_kernels::sample_rows`): the step
/// returns one token id per row instead of `rows x vocab` logits for the host to sample from.
struct Sampler {
    /// The stop ids, banned while `min_new_tokens` is not reached (at least one u32).
    banned: Handle,
    n_banned: usize,
    inv_temp: f32,
    greedy: bool,
    /// u32 `[rows]`: the drawn tokens.
    picks: Handle,
}

/// Every buffer one step reads or writes besides the weights and caches.
struct StepBufs {
    /// u32 `[tokens; rows] ++ [valid; rows] ++ [positions; rows] ++ [slot] ++ [seed] ++ [ban]`.
    step: Handle,
    h: T,
    h2: T,
    x: T,
    /// `[rows, q | k | v]`: the attention's projections, one GEMM.
    qkv: T,
    /// The rotated queries `[rows, nh * d]`.
    q: T,
    attn: T,
    /// `[rows, gate | up]`: the MLP's first projections, one GEMM.
    gu: T,
    act: T,
    /// `x A^T` of the current module group (the widest group's size).
    z: T,
    /// The current linear input as bf16 (pairs of values per f32 slot).
    xb: T,
    /// One group's NF4 weights dequantized to bf16, side by side (the largest group's size).
    ws: T,
    logits: T,
}

/// A captured step, replayed with one launch.
struct Graph {
    exec: cu::CUgraphExec,
    stream: cu::CUstream,
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: the handle came from a successful instantiate and is destroyed once.
        unsafe {
            let _ = drv::graph::exec_destroy(self.exec);
        }
    }
}

fn prim<const D: usize>(t: Tensor<Inner, D>) -> T {
    into_contiguous(t.into_primitive().tensor())
}

/// Most rows (sequences) one fused decode samples: the projections are GEMMs and the kernels
/// take the row count at run time, but more rows than this were never measured. Beyond it the
/// ordinary KV-cache path runs (a 32-row GRPO step took 10-12 s there; H200, 2026-12-01).
pub const DECODE_MAX_ROWS: usize = 64;

impl FusedDecode {
    /// Takes over after the prompt was prefilled into `cache` by the ordinary forward. `None`
    /// when `B` is not the plain CUDA backend, or the model is outside what the kernels cover
    /// (more than [`DECODE_MAX_ROWS`] rows, or more than 16 with an NF4 LM head; dense or biased
    /// projections, caches beyond 4,096 slots, odd head dims or head dims above 256); the caller
    /// keeps the ordinary path then.
    ///
    /// With `sampling` given and free of top-k / top-p filters, every step also draws the next
    /// tokens on the GPU ([`Self::step_sample`]).
    pub fn try_new<B: Backend>(
        model: &Llama<B>,
        adapter: Option<&Adapter<B>>,
        cache: &KvCache<B>,
        cap: usize,
        sampling: Option<&SamplingParams>,
    ) -> Option<Self> {
        if !ENABLED.load(Ordering::Relaxed) || crate::switches::switches().no_fused_decode {
            return None;
        }
        let model = (model as &dyn Any).downcast_ref::<Llama<Inner>>()?;
        let adapter = match adapter {
            Some(a) => Some((a as &dyn Any).downcast_ref::<Adapter<Inner>>()?),
            None => None,
        };
        let cache = (cache as &dyn Any).downcast_ref::<KvCache<Inner>>()?;
        Self::new(model, adapter, cache, cap, sampling)
    }

    /// Leaves the launch classes in `mask` ([`skip`]) out of later steps, so that timing a step
    /// with and without a class gives that class's share of the step (`decode_check` with
    /// `ABLATE=1`). The logits are then wrong: for measurement only. Drops a captured graph.
    pub fn ablate(&mut self, mask: u32) {
        self.skip = mask;
        self.graph = None;
    }

    fn runs(&self, class: u32) -> bool {
        self.skip & class == 0
    }

    /// The LoRA arguments of a kernel that completes a projection group's output with its
    /// up-projection (`decode_kernels::lora_up`): `z`, the group's B transposed, its width and outputs,
    /// the scale, and whether to (placeholders and `false` without a group).
    fn lora_args(&self, group: Option<&GroupLora>) -> LoraArgs {
        // SAFETY: z holds rows x width (written by `lora_z` for this group), B outs x width; the
        // placeholders are never read when the flag is off.
        unsafe {
            match group {
                Some(g) => (
                    ArrayArg::from_raw_parts(self.bufs.z.handle.clone(), self.rows * g.width),
                    ArrayArg::from_raw_parts(g.bt.handle.clone(), g.width * g.outs),
                    g.width,
                    g.outs,
                    self.scale,
                    true,
                ),
                None => (
                    ArrayArg::from_raw_parts(self.bufs.z.handle.clone(), 1),
                    ArrayArg::from_raw_parts(self.bufs.z.handle.clone(), 1),
                    0,
                    0,
                    0.0,
                    false,
                ),
            }
        }
    }

    /// RMSNorm of `x` into `y`, and as bf16 into `bufs.xb` (the next GEMM's input).
    fn rms(&self, x: &T, w: &T, y: &T) {
        if !self.runs(skip::NORM) {
            return;
        }
        // SAFETY: x and y hold rows x hidden values, w hidden, xb at least rows x hidden / 2 u32.
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
                ArrayArg::from_raw_parts(self.bufs.xb.handle.clone(), self.rows * self.hidden / 2),
                8,
            )
        };
    }

    /// Group `g` of layer `l` applied to its input `x` (f32 `[rows, in]`; its bf16 copy in
    /// `bufs.xb`, written by the kernel that produced it) into `out` (`[rows, group out]`), plus
    /// the residual `res`, LoRA included, except for gate/up: then the group's LoRA is returned
    /// and SwiGLU adds its up-projection (`decode_kernels::lora_up`) from the `z = x A^T` written here.
    fn group(
        &self,
        l: usize,
        g: usize,
        x: &T,
        res: Option<&T>,
        out: &T,
    ) -> Result<Option<&GroupLora>> {
        let lora = if self.mma {
            self.layers[l].lora[g]
                .as_ref()
                .filter(|_| self.runs(skip::LORA))
        } else {
            let in_f = self.layers[l].lin[GROUPS[g][0]].in_features();
            let lora = self.lora_z(l, g, x, in_f);
            self.project_group(l, g, res, out)?;
            lora
        };
        if self.mma && self.runs(skip::GEMM) {
            let lins: Vec<&GpuLinear> =
                GROUPS[g].iter().map(|&m| &*self.layers[l].lin[m]).collect();
            nf4_mma::group_into(
                &lins,
                self.rows,
                &self.bufs.xb.handle,
                &x.handle,
                res.map(|r| &r.handle),
                &out.handle,
                lora.map(|lg| nf4_mma::LoraDown {
                    a: &lg.a.handle,
                    z: &self.bufs.z.handle,
                    width: lg.width,
                }),
            );
        }
        // SwiGLU adds the gate/up group's up-projection itself (one unit per output pair, cheap);
        // the others get a launch of their own (`decode_kernels::lora_up_add`): the kernels reading
        // those groups' outputs (RoPE, RMSNorm) have too few units to read B quickly.
        match lora {
            Some(lg) if g != GATE_UP => {
                // SAFETY: out holds rows x outs, z rows x width, bt width x outs.
                unsafe {
                    lora_up_add::launch_unchecked::<CudaRuntime>(
                        &self.client,
                        CubeCount::Static((self.rows * lg.outs).div_ceil(256) as u32, 1, 1),
                        CubeDim::new_1d(256),
                        ArrayArg::from_raw_parts(out.handle.clone(), self.rows * lg.outs),
                        ArrayArg::from_raw_parts(self.bufs.z.handle.clone(), self.rows * lg.width),
                        ArrayArg::from_raw_parts(lg.bt.handle.clone(), lg.width * lg.outs),
                        self.rows,
                        lg.outs,
                        self.scale,
                        lg.width,
                    )
                };
                Ok(None)
            }
            _ => Ok(lora),
        }
    }

    /// `x A^T` for every adapted module of group `g` of layer `l`, into `bufs.z`; returns the
    /// group (its up-projection still owed).
    fn lora_z(&self, l: usize, g: usize, x: &T, width_in: usize) -> Option<&GroupLora> {
        let group = self.layers[l].lora[g].as_ref()?;
        if !self.runs(skip::LORA) {
            return None;
        }
        // SAFETY: x is rows x in, A width x in, z at least rows x width.
        unsafe {
            lora_down::launch_unchecked::<CudaRuntime>(
                &self.client,
                CubeCount::Static(group.width as u32, self.rows as u32, 1),
                CubeDim::new_1d(128),
                ArrayArg::from_raw_parts(x.handle.clone(), self.rows * width_in),
                ArrayArg::from_raw_parts(group.a.handle.clone(), group.width * width_in),
                width_in,
                group.width,
                ArrayArg::from_raw_parts(self.bufs.z.handle.clone(), self.rows * group.width),
                4,
            )
        };
        Some(group)
    }

    /// Group `g` of layer `l` (its input's bf16 copy in `bufs.xb`, written by the kernel that
    /// produced it) into `out` (`[rows, group out]`), plus the residual `res`: the members' NF4
    /// weights dequantized side by side into the workspace and one bf16 cuBLASLt GEMM (the
    /// residual as its C term); LoRA is [`Self::group`]'s part.
    fn project_group(&self, l: usize, g: usize, res: Option<&T>, out: &T) -> Result<()> {
        let layer = &self.layers[l];
        let members = GROUPS[g];
        let in_f = layer.lin[members[0]].in_features();
        let lins: Vec<&GpuLinear> = members.iter().map(|&m| &*layer.lin[m]).collect();
        let o: usize = lins.iter().map(|l| l.out_features()).sum();
        // One launch for the group (every decode weight is NF4: `new` checks).
        if self.runs(skip::DEQUANT) {
            ensure!(
                GpuLinear::dequant_group_into(&lins, &self.bufs.ws, 0),
                "fused decode: a group's weights are not NF4"
            );
        }
        if !self.runs(skip::GEMM) {
            return Ok(());
        }
        // out [rows, o] = x [rows, in] · W^T (W row-major [o, in]).
        let shape = GemmShape::row_major(GemmIn::Bf16, 1, (self.rows, in_f, o), false, true);
        let (c, beta) = match res {
            Some(r) => (r, 1.0),
            None => (out, 0.0),
        };
        gemm_at(
            shape,
            1.0,
            beta,
            (&self.bufs.ws, 0),
            (&self.bufs.xb, 0),
            c,
            (out, 0),
        )
    }

    /// Whether steps draw the next tokens on the GPU ([`Self::step_sample`]).
    pub fn samples(&self) -> bool {
        self.sampler.is_some()
    }

    /// Feeds one token per row (`valid` false for rows that already stopped) and returns the
    /// next-token logits, `[rows, vocab]` row-major.
    pub fn step(&mut self, tokens: &[u32], valid: &[bool]) -> Result<Vec<f32>> {
        self.run(tokens, valid, 0, false)?;
        self.logits()
    }

    /// The last step's logits, `[rows, vocab]` row-major (also after [`Self::step_sample`]).
    pub fn logits(&self) -> Result<Vec<f32>> {
        let logits = Tensor::<Inner, 1>::from_primitive(burn::tensor::TensorPrimitive::Float(
            self.bufs.logits.clone(),
        ));
        logits
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| anyhow!("reading logits: {e:?}"))
    }

    /// [`Self::step`], returning the tokens drawn on the GPU instead of the logits: one per row
    /// (meaningless for rows fed `valid = false`). `seed` picks the draw; `ban` excludes the
    /// stop ids (before `min_new_tokens`). Needs [`Self::samples`].
    pub fn step_sample(
        &mut self,
        tokens: &[u32],
        valid: &[bool],
        seed: u32,
        ban: bool,
    ) -> Result<Vec<u32>> {
        let picks = self
            .sampler
            .as_ref()
            .map(|s| s.picks.clone())
            .ok_or_else(|| anyhow!("fused decode: sampling on the GPU was not set up"))?;
        self.run(tokens, valid, seed, ban)?;
        let bytes = self
            .client
            .read_one(picks)
            .map_err(|e| anyhow!("reading sampled tokens: {e:?}"))?;
        Ok(bytes
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect())
    }

    /// Uploads the step's inputs and runs the step (the graph once captured).
    fn run(&mut self, tokens: &[u32], valid: &[bool], seed: u32, ban: bool) -> Result<()> {
        ensure!(
            tokens.len() == self.rows && valid.len() == self.rows,
            "fused decode: expected {} rows",
            self.rows
        );
        ensure!(self.len < self.cap, "fused decode: the cache is full");
        // Positions count real tokens only, as in `Llama::prepare`.
        let mut pos = Vec::with_capacity(self.rows);
        for (i, &v) in valid.iter().enumerate() {
            if v {
                pos.push(self.next_pos[i] as u32);
                self.next_pos[i] += 1;
            } else {
                pos.push(0);
            }
        }
        self.host_step = tokens
            .iter()
            .copied()
            .chain(valid.iter().map(|&v| v as u32))
            .chain(pos)
            .chain([self.len as u32, seed, ban as u32])
            .collect();
        let res = self
            .client
            .get_resource(self.bufs.step.clone())
            .map_err(|e| anyhow!("fused decode buffer: {e:?}"))?;
        let (ptr, stream) = (res.resource().ptr, res.resource().stream);
        crate::cuda::blas::ensure_context(self.device.index)?;
        // SAFETY: `ptr` is the step buffer (`step_words(rows)` u32); the copy is ordered on cubecl's
        // stream before this step's kernels, and `host_step` lives until the next step, by which
        // time the logits read below has synchronized the stream.
        unsafe { drv::memcpy_htod_async(ptr, &self.host_step, stream) }
            .map_err(|e| anyhow!("fused decode step upload: {e:?}"))?;
        drop(res);
        if self.graph.is_none() && self.plain_steps >= 1 && graphs_enabled() {
            self.graph = self.capture(stream);
        }
        match &self.graph {
            // SAFETY: the graph was captured from this object's launches on this stream, over
            // buffers it still owns.
            Some(g) => unsafe { drv::graph::launch(g.exec, g.stream) }
                .map_err(|e| anyhow!("fused decode graph launch: {e:?}"))?,
            None => {
                self.launch_step()?;
                self.plain_steps += 1;
            }
        }
        self.len += 1;
        Ok(())
    }

    /// Captures [`Self::launch_step`] on `stream` into a graph; `None` (after running the step
    /// the ordinary way) when capture fails.
    fn capture(&mut self, stream: cu::CUstream) -> Option<Graph> {
        let mode = cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
        // SAFETY: `stream` is cubecl's live stream; capture ends below on every path.
        if unsafe { drv::stream::begin_capture(stream, mode) }.is_err() {
            return None;
        }
        // cubecl hands launches to its device thread; a blocking call returns once every launch
        // before it reached the stream, so the capture ends after the whole step.
        let launched = self.launch_step().and_then(|()| {
            self.client
                .get_resource(self.bufs.step.clone())
                .map(drop)
                .map_err(|e| anyhow!("fused decode: draining cubecl's queue: {e:?}"))
        });
        // SAFETY: ends the capture begun above.
        let graph = unsafe { drv::stream::end_capture(stream) };
        let exec = match (launched, graph) {
            (Ok(()), Ok(graph)) => {
                // SAFETY: `graph` is the captured graph; it is destroyed once instantiated.
                let exec = unsafe {
                    let e = drv::graph::instantiate(graph, cu::CUgraphInstantiate_flags(0));
                    let _ = drv::graph::destroy(graph);
                    e
                };
                exec.ok()
            }
            (_, Ok(graph)) => {
                // SAFETY: as above.
                unsafe {
                    let _ = drv::graph::destroy(graph);
                }
                None
            }
            _ => None,
        };
        match exec {
            Some(exec) => Some(Graph { exec, stream }),
            None => {
                eprintln!("fused decode: CUDA graph capture failed; launching kernels per step");
                GRAPHS.store(false, Ordering::Relaxed);
                None
            }
        }
    }

    /// Enqueues one whole step (every layer, the final norm and the vocabulary projection) over
    /// the preallocated buffers.
    fn launch_step(&self) -> Result<()> {
        let rows = self.rows;
        let b = &self.bufs;
        let (h_dim, q_dim, kv_dim) = (self.hidden, self.nh * self.hd, self.nkv * self.hd);
        // SAFETY: the step buffer holds `step_words(rows)` u32.
        let step = || unsafe { ArrayArg::from_raw_parts(b.step.clone(), step_words(rows)) };
        // SAFETY (all launches below): every array length is the size of its buffer.
        unsafe {
            embed_rows::launch_unchecked::<CudaRuntime>(
                &self.client,
                CubeCount::Static(rows as u32, 1, 1),
                CubeDim::new_1d(256),
                step(),
                ArrayArg::from_raw_parts(self.embed.handle.clone(), self.embed_words()),
                ArrayArg::from_raw_parts(b.h.handle.clone(), rows * h_dim),
                h_dim,
                self.embed.dtype == DType::BF16,
            )
        };
        for l in 0..self.layers.len() {
            self.rms(&b.h, &self.layers[l].input_norm, &b.x);
            self.group(l, 0, &b.x, None, &b.qkv)?;
            if self.runs(skip::ROPE) {
                unsafe {
                    rope_append::launch_unchecked::<CudaRuntime>(
                        &self.client,
                        CubeCount::Static((rows * (self.nh + self.nkv)) as u32, 1, 1),
                        CubeDim::new_1d(32),
                        ArrayArg::from_raw_parts(b.qkv.handle.clone(), rows * (q_dim + 2 * kv_dim)),
                        ArrayArg::from_raw_parts(b.q.handle.clone(), rows * q_dim),
                        step(),
                        ArrayArg::from_raw_parts(self.inv_freq.handle.clone(), self.hd / 2),
                        ArrayArg::from_raw_parts(self.k_cache[l].handle.clone(), self.cache_len()),
                        ArrayArg::from_raw_parts(self.v_cache[l].handle.clone(), self.cache_len()),
                        ArrayArg::from_raw_parts(self.valid.handle.clone(), rows * self.cap),
                        rows,
                        self.nh,
                        self.nkv,
                        self.hd,
                        self.cap,
                    )
                };
            }
            if self.runs(skip::ATTN) {
                unsafe {
                    decode_attention::launch_unchecked::<CudaRuntime>(
                        &self.client,
                        CubeCount::Static((rows * self.nh) as u32, 1, 1),
                        CubeDim::new_1d(256),
                        ArrayArg::from_raw_parts(b.q.handle.clone(), rows * q_dim),
                        ArrayArg::from_raw_parts(self.k_cache[l].handle.clone(), self.cache_len()),
                        ArrayArg::from_raw_parts(self.v_cache[l].handle.clone(), self.cache_len()),
                        ArrayArg::from_raw_parts(self.valid.handle.clone(), rows * self.cap),
                        step(),
                        ArrayArg::from_raw_parts(b.attn.handle.clone(), rows * q_dim),
                        ArrayArg::from_raw_parts(b.xb.handle.clone(), rows * q_dim / 2),
                        rows,
                        self.nh,
                        self.nkv,
                        self.hd,
                        self.cap,
                        self.window,
                        1.0 / (self.hd as f32).sqrt(),
                        8,
                    )
                };
            }
            self.group(l, 1, &b.attn, Some(&b.h), &b.h2)?;
            self.rms(&b.h2, &self.layers[l].post_norm, &b.x);
            let lora = self.group(l, 2, &b.x, None, &b.gu)?;
            let n = rows * self.inter;
            // SAFETY: gu holds rows x 2 inter values (gate then up per row), act rows x inter.
            if self.runs(skip::SILU) {
                let (z, lb, width, outs, scale, on) = self.lora_args(lora);
                unsafe {
                    silu_mul::launch_unchecked::<CudaRuntime>(
                        &self.client,
                        CubeCount::Static((n as u32 / 2).div_ceil(256), 1, 1),
                        CubeDim::new_1d(256),
                        ArrayArg::from_raw_parts(b.gu.handle.clone(), 2 * n),
                        ArrayArg::from_raw_parts(b.gu.handle.clone(), 2 * n),
                        ArrayArg::from_raw_parts(b.act.handle.clone(), n),
                        ArrayArg::from_raw_parts(b.xb.handle.clone(), n / 2),
                        n / 2,
                        self.inter,
                        2 * self.inter,
                        self.inter,
                        z,
                        lb,
                        width,
                        outs,
                        scale,
                        true,
                        on,
                    )
                };
            }
            // The block output overwrites `h`, which nothing reads any more this layer.
            self.group(l, 3, &b.act, Some(&b.h2), &b.h)?;
        }
        self.rms(&b.h, &self.final_norm, &b.x);
        if self.runs(skip::HEAD) {
            self.project(&b.x)?;
        }
        if let Some(smp) = &self.sampler {
            // SAFETY: logits hold rows x vocab f32, picks rows u32, banned n_banned + 1 u32.
            if self.runs(skip::HEAD) {
                unsafe {
                    sample_rows::launch_unchecked::<CudaRuntime>(
                        &self.client,
                        CubeCount::Static(rows as u32, 1, 1),
                        CubeDim::new_1d(256),
                        ArrayArg::from_raw_parts(b.logits.handle.clone(), rows * self.vocab),
                        step(),
                        ArrayArg::from_raw_parts(smp.banned.clone(), smp.n_banned + 1),
                        ArrayArg::from_raw_parts(smp.picks.clone(), rows),
                        rows,
                        self.vocab,
                        smp.n_banned,
                        smp.inv_temp,
                        smp.greedy,
                        8,
                    )
                };
            }
        }
        Ok(())
    }

    /// The vocabulary projection of the final hidden rows `x` into `bufs.logits`.
    fn project(&self, x: &T) -> Result<()> {
        let (rows, h) = (self.rows, self.hidden);
        let logits = &self.bufs.logits;
        match &self.head {
            Head::Nf4(lin) => {
                lin.gemv_into(x, rows, logits);
                Ok(())
            }
            Head::Bf16(lin) => {
                // The final RMSNorm wrote x's bf16 copy into xb.
                let w = lin.bf16_weight().expect("a dense head is stored in bf16");
                let (v, hh, n) = (self.vocab as u64, h as u64, rows as u64);
                // Column-major: logits^T [vocab, rows] = W^T-of-its-layout · x^T.
                let shape = GemmShape::bf16(true, false, v, n, hh, hh as i64, hh as i64, v as i64);
                crate::cuda::gemm::gemm(shape, 1.0, 0.0, w, &self.bufs.xb, logits)
            }
            Head::Tied(embed) => {
                let shape =
                    GemmShape::row_major(GemmIn::F32Tf32, 1, (rows, h, self.vocab), false, true);
                crate::cuda::gemm::gemm(shape, 1.0, 0.0, embed, x, logits)
            }
        }
    }

    /// The embedding table's size in u32 words (bf16 tables: two values per word).
    fn embed_words(&self) -> usize {
        let n: usize = self.embed.meta.shape().iter().product();
        if self.embed.dtype == DType::BF16 {
            n.div_ceil(2)
        } else {
            n
        }
    }

    fn cache_len(&self) -> usize {
        self.rows * self.nkv * self.cap * self.hd
    }
}
