//! Attention on CUDA for the many-row passes (training, scoring, prefill): cuBLASLt GEMMs for
//! the products and two CubeCL row kernels for the masked softmax and its backward, in the
//! kernel's own file as llm.c keeps one family per file.
//!
//! The mask is never a `[T, T]` tensor: the kernels read one additive bias per key (0, or
//! -1e30 for a padding key, `[b, total]`) and apply causality and the sliding window from the
//! positions, so the mask costs `b x total` values however long the rows are.
//!
//! Grouped key/value heads are never expanded: the `rep` query heads sharing one KV head are
//! contiguous in `[b, nh, t, d]`, so a group is one `[rep * t, d]` matrix. Two regimes (the
//! caller picks with `block`: `model::ops::attention_query_block`, which the planner counts):
//! - **whole** (scores up to `ATTENTION_WHOLE_BYTES`): the scores of every head at once, three
//!   batched GEMMs over the `b * nkv` groups; the backward holds the probabilities whole and
//!   makes the score gradient a slice of groups at a time;
//! - **query blocks** (longer rows): one group's `tq` queries of its `rep` heads at a time, the
//!   keys trimmed to the causal reach of the block; the backward recomputes each block's
//!   probabilities, so memory is linear in the row length (two blocks of scores at most).

use super::blas::{GemmIn, GemmShape};
use super::gemm::{gemm, gemm_at};
use super::qlinear::Inner;
use super::train_ops::{arr, empty, enabled, prim, row_cubes, wrap, T};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use cubecl::cuda::CudaRuntime;
use cubecl::prelude::*;
use std::any::TypeId;

/// Keys below this bias are padding (the bias is 0 or -1e30).
const MASKED: f32 = -1.0e29;

/// The additive bias of key `k` for the query at absolute position `q_abs` of the sequence
/// whose key biases start at `kb`: its padding bias, -1e30 for a future key or one outside the
/// sliding window (`window > 0`).
#[cube]
fn key_bias_at(bias: &Array<f32>, kb: usize, k: usize, q_abs: usize, window: usize) -> f32 {
    let mut v = bias[kb + k];
    if k > q_abs {
        v = -1.0e30f32;
    }
    if window > 0 && k + window <= q_abs {
        v = -1.0e30f32;
    }
    v
}

/// Softmax in place over score rows of `width` keys, masked. Row `r` of the buffer is query
/// `i0 + r % tq` of head `unit0 + r / tq` (heads numbered over the batch, `nh` per sequence),
/// at absolute position `past + i0 + r % tq`; `bias` holds `total` keys per sequence.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn masked_softmax(
    s: &mut Array<f32>,
    bias: &Array<f32>,
    rows: usize,
    width: usize,
    tq: usize,
    i0: usize,
    unit0: usize,
    nh: usize,
    past: usize,
    total: usize,
    window: usize,
) {
    let row = CUBE_POS_X as usize * CUBE_DIM_Y as usize + UNIT_POS_Y as usize;
    if row >= rows {
        terminate!();
    }
    let kb = ((unit0 + row / tq) / nh) * total;
    let q_abs = past + i0 + row % tq;
    let srow = row * width;
    let lane = UNIT_POS_X as usize;
    let mut m = f32::min_value();
    let mut k = lane;
    while k < width {
        let v = s[srow + k] + key_bias_at(bias, kb, k, q_abs, window);
        if v > m {
            m = v;
        }
        k += 32;
    }
    let m = plane_max(m);
    let mut sum = 0.0f32;
    let mut k = lane;
    while k < width {
        let e = (s[srow + k] + key_bias_at(bias, kb, k, q_abs, window) - m).exp();
        s[srow + k] = e;
        sum += e;
        k += 32;
    }
    let r = 1.0f32 / plane_sum(sum);
    let mut k = lane;
    while k < width {
        s[srow + k] *= r;
        k += 32;
    }
}

/// Softmax backward through the mask and the score scale, in place on `dp` (which holds `rows`
/// rows): `ds = scale * p * (dp - sum(dp * p))`, 0 where the key is masked. `dp`'s row `r` is
/// row `p_row0 + r` of `p`, numbered as in [`masked_softmax`].
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn softmax_bwd(
    p: &Array<f32>,
    dp: &mut Array<f32>,
    bias: &Array<f32>,
    p_row0: usize,
    rows: usize,
    width: usize,
    tq: usize,
    i0: usize,
    unit0: usize,
    nh: usize,
    past: usize,
    total: usize,
    window: usize,
    scale: f32,
) {
    let local = CUBE_POS_X as usize * CUBE_DIM_Y as usize + UNIT_POS_Y as usize;
    if local >= rows {
        terminate!();
    }
    let row = p_row0 + local;
    let kb = ((unit0 + row / tq) / nh) * total;
    let q_abs = past + i0 + row % tq;
    let prow = row * width;
    let srow = local * width;
    let lane = UNIT_POS_X as usize;
    let mut dot = 0.0f32;
    let mut k = lane;
    while k < width {
        dot += dp[srow + k] * p[prow + k];
        k += 32;
    }
    let dot = plane_sum(dot);
    let mut k = lane;
    while k < width {
        let mut v = scale * p[prow + k] * (dp[srow + k] - dot);
        if key_bias_at(bias, kb, k, q_abs, window) < MASKED {
            v = 0.0f32;
        }
        dp[srow + k] = v;
        k += 32;
    }
}

/// Which keys the queries of one attention call may see, beyond padding: the queries sit at
/// absolute positions `past..past + t` (causal), and `window > 0` is Mistral's sliding window.
#[derive(Debug, Clone, Copy)]
pub struct KeyRule {
    pub past: usize,
    pub window: usize,
}

/// The per-key additive bias `[b, total]` (0, or -1e30 for a padding key) on the plain CUDA
/// backend; `None` elsewhere.
pub fn try_key_bias<B: Backend>(
    key_valid: &[Vec<bool>],
    device: &B::Device,
) -> Option<Tensor<B, 2>> {
    if !enabled() || TypeId::of::<B>() != TypeId::of::<Inner>() {
        return None;
    }
    let b = key_valid.len();
    let total = key_valid.first().map_or(0, Vec::len);
    let v: Vec<f32> = key_valid
        .iter()
        .flat_map(|r| r.iter().map(|&ok| if ok { 0.0 } else { -1.0e30 }))
        .collect();
    Some(Tensor::from_data(TensorData::new(v, [b, total]), device))
}

/// The attention's shapes: `b` sequences, `nkv` groups of `rep` query heads, `t` queries,
/// `total` keys, head width `d`.
struct Dims {
    b: usize,
    nh: usize,
    nkv: usize,
    rep: usize,
    t: usize,
    total: usize,
    d: usize,
}

impl Dims {
    fn of(q: &T, k: &T) -> Self {
        let (qs, ks) = (q.meta.shape(), k.meta.shape());
        let (b, nh, t, d) = (qs[0], qs[1], qs[2], qs[3]);
        let (nkv, total) = (ks[1], ks[2]);
        Self {
            b,
            nh,
            nkv,
            rep: nh / nkv,
            t,
            total,
            d,
        }
    }

    /// Keys a block of queries `i0..i0 + tq` can see: those up to its last query's position.
    fn reach(&self, i0: usize, tq: usize, rule: KeyRule) -> usize {
        (rule.past + i0 + tq).min(self.total)
    }
}

/// One operand of a strided GEMM: buffer, element offset, row length (leading dimension) and
/// the distance between batch members (0: the same matrix for every member).
#[derive(Clone, Copy)]
struct Op<'a> {
    t: &'a T,
    off: usize,
    ld: usize,
    stride: usize,
}

fn op(t: &T, off: usize, ld: usize, stride: usize) -> Op<'_> {
    Op { t, off, ld, stride }
}

/// Row-major `out = alpha op(x) op(y) + beta out` (TF32) over `batch` members laid out as the
/// operands say; `(rows, inner, cols)` of `op(x) op(y)`.
#[allow(clippy::too_many_arguments)]
fn strided_gemm(
    batch: usize,
    dims: (usize, usize, usize),
    (x, tx): (Op, bool),
    (y, ty): (Op, bool),
    out: Op,
    (alpha, beta): (f32, f32),
) {
    let mut shape = GemmShape::row_major(GemmIn::F32Tf32, batch, dims, tx, ty);
    // cuBLAS' A is the row-major right factor (see `GemmShape::row_major`).
    shape.lda = y.ld as i64;
    shape.ldb = x.ld as i64;
    shape.ldd = out.ld as i64;
    shape.stride_a = y.stride as i64;
    shape.stride_b = x.stride as i64;
    shape.stride_d = out.stride as i64;
    gemm_at(
        shape,
        alpha,
        beta,
        (y.t, y.off),
        (x.t, x.off),
        out.t,
        (out.t, out.off),
    )
    .unwrap_or_else(|e| panic!("CUDA GEMM failed: {e:#}"));
}

/// `out = alpha op(x) op(y)` per group, batched over all `b * nkv` groups (contiguous).
#[allow(clippy::too_many_arguments)]
fn group_gemm(
    s: &Dims,
    x: &T,
    y: &T,
    out: &T,
    dims: (usize, usize, usize),
    tx: bool,
    ty: bool,
    alpha: f32,
) {
    let shape = GemmShape::row_major(GemmIn::F32Tf32, s.b * s.nkv, dims, tx, ty);
    gemm(shape, alpha, 0.0, y, x, out).unwrap_or_else(|e| panic!("CUDA GEMM failed: {e:#}"));
}

#[allow(clippy::too_many_arguments)]
fn softmax(
    scores: &T,
    bias: &T,
    rows: usize,
    width: usize,
    (tq, i0, unit0): (usize, usize, usize),
    s: &Dims,
    rule: KeyRule,
) {
    let (count, dim) = row_cubes(rows);
    // SAFETY: `scores` holds rows * width values, `bias` b * total; rows are bounds-checked and
    // every key index is below width <= total.
    unsafe {
        masked_softmax::launch_unchecked::<CudaRuntime>(
            &scores.client,
            count,
            dim,
            arr(scores),
            arr(bias),
            rows,
            width,
            tq,
            i0,
            unit0,
            s.nh,
            rule.past,
            s.total,
            rule.window,
        )
    };
}

#[allow(clippy::too_many_arguments)]
fn softmax_backward(
    p: &T,
    ds: &T,
    bias: &T,
    (p_row0, rows, width): (usize, usize, usize),
    (tq, i0, unit0): (usize, usize, usize),
    s: &Dims,
    rule: KeyRule,
    scale: f32,
) {
    let (count, dim) = row_cubes(rows);
    // SAFETY: `ds` holds rows * width values, `p` at least (p_row0 + rows) * width, `bias`
    // b * total; rows are bounds-checked.
    unsafe {
        softmax_bwd::launch_unchecked::<CudaRuntime>(
            &p.client,
            count,
            dim,
            arr(p),
            arr(ds),
            arr(bias),
            p_row0,
            rows,
            width,
            tq,
            i0,
            unit0,
            s.nh,
            rule.past,
            s.total,
            rule.window,
            scale,
        )
    };
}

/// `softmax(mask(q k^T * scale)) v` for `q [b, nh, t, d]`, `k`, `v [b, nkv, total, d]` and the
/// key bias `[b, total]` ([`try_key_bias`]): the output `[b, nh, t, d]`. `block`: query rows
/// per block, `None` for whole scores.
pub fn try_attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    (bias, rule): (&Tensor<B, 2>, KeyRule),
    scale: f64,
    block: Option<usize>,
) -> Option<Tensor<B, 4>> {
    let (qp, kp, vp, bp) = (prim(q)?, prim(k)?, prim(v)?, prim(bias)?);
    let s = Dims::of(&qp, &kp);
    let out = empty(&qp, &[s.b, s.nh, s.t, s.d]);
    let Some(tq) = block else {
        let probs = whole_probs(&s, &qp, &kp, &bp, rule, scale as f32);
        group_gemm(
            &s,
            &probs,
            &vp,
            &out,
            (s.rep * s.t, s.total, s.d),
            false,
            false,
            1.0,
        );
        return Some(wrap(out));
    };
    let scores = empty(&qp, &[s.rep * tq * s.total]);
    for u in 0..s.b * s.nkv {
        for i0 in (0..s.t).step_by(tq) {
            let tq = tq.min(s.t - i0);
            let w = block_probs(
                &s,
                (&qp, &kp, &bp),
                (u, i0, tq),
                &scores,
                rule,
                scale as f32,
            );
            // out block = p v, for the group's rep heads.
            strided_gemm(
                s.rep,
                (tq, w, s.d),
                (op(&scores, 0, w, tq * w), false),
                (op(&vp, u * s.total * s.d, s.d, 0), false),
                op(&out, (u * s.rep * s.t + i0) * s.d, s.d, s.t * s.d),
                (1.0, 0.0),
            );
        }
    }
    Some(wrap(out))
}

/// The probabilities of every head at once, `[b, nh, t, total]` (the whole regime).
fn whole_probs(s: &Dims, qp: &T, kp: &T, bp: &T, rule: KeyRule, scale: f32) -> T {
    let probs = empty(qp, &[s.b, s.nh, s.t, s.total]);
    let rt = s.rep * s.t;
    group_gemm(s, qp, kp, &probs, (rt, s.d, s.total), false, true, scale);
    softmax(&probs, bp, s.b * s.nh * s.t, s.total, (s.t, 0, 0), s, rule);
    probs
}

/// The probabilities of queries `i0..i0 + tq` of group `u`'s `rep` heads into `scores`
/// (`[rep, tq, w]`), `w` the keys they can reach, which is returned.
fn block_probs(
    s: &Dims,
    (qp, kp, bp): (&T, &T, &T),
    (u, i0, tq): (usize, usize, usize),
    scores: &T,
    rule: KeyRule,
    scale: f32,
) -> usize {
    let w = s.reach(i0, tq, rule);
    strided_gemm(
        s.rep,
        (tq, s.d, w),
        (op(qp, (u * s.rep * s.t + i0) * s.d, s.d, s.t * s.d), false),
        (op(kp, u * s.total * s.d, s.d, 0), true),
        op(scores, 0, w, tq * w),
        (scale, 0.0),
    );
    softmax(scores, bp, s.rep * tq, w, (tq, i0, u * s.rep), s, rule);
    w
}

/// Gradients of [`try_attention`] from `dout [b, nh, t, d]`: `(dq, dk, dv)`, the key and value
/// gradients summed over each group (`[b, nkv, total, d]`). The whole regime holds the
/// probabilities (recomputed unless given) and makes the score gradient `slice` of the
/// `b * nkv` groups at a time (`model::ops::attention_backward_slice`); the query-block regime
/// recomputes each block's probabilities beside its score gradient (`block` as in
/// [`try_attention`]). `at_high` is called once, when the op's largest set of buffers is live
/// (its memory high point).
#[allow(clippy::type_complexity)]
pub fn try_attention_backward<B: Backend>(
    dout: &Tensor<B, 4>,
    (q, k, v): (&Tensor<B, 4>, &Tensor<B, 4>, &Tensor<B, 4>),
    (bias, rule): (&Tensor<B, 2>, KeyRule),
    scale: f64,
    (block, slice, at_high): (Option<usize>, usize, &mut dyn FnMut()),
) -> Option<(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> {
    let (dop, qp, kp, vp, bp) = (prim(dout)?, prim(q)?, prim(k)?, prim(v)?, prim(bias)?);
    let s = Dims::of(&qp, &kp);
    let dq = empty(&qp, &[s.b, s.nh, s.t, s.d]);
    let dk = empty(&qp, &[s.b, s.nkv, s.total, s.d]);
    let dv = empty(&qp, &[s.b, s.nkv, s.total, s.d]);
    let scale = scale as f32;
    match block {
        None => whole_backward(
            &s,
            (&dop, &qp, &kp, &vp, &bp),
            (&dq, &dk, &dv),
            rule,
            scale,
            (slice, at_high),
        ),
        Some(tq) => {
            let chunk = s.rep * tq * s.total;
            let (p, ds) = (empty(&qp, &[chunk]), empty(&qp, &[chunk]));
            let mut first = true;
            for u in 0..s.b * s.nkv {
                // The last block first: it reaches every key, so its key and value gradients
                // (beta = 0) initialise every row the earlier blocks then add to.
                let starts: Vec<usize> = (0..s.t).step_by(tq).collect();
                for (n, &i0) in starts.iter().rev().enumerate() {
                    let tq = tq.min(s.t - i0);
                    let w = block_probs(&s, (&qp, &kp, &bp), (u, i0, tq), &p, rule, scale);
                    let (qo, ko) = ((u * s.rep * s.t + i0) * s.d, u * s.total * s.d);
                    // dp = dout v^T.
                    strided_gemm(
                        s.rep,
                        (tq, s.d, w),
                        (op(&dop, qo, s.d, s.t * s.d), false),
                        (op(&vp, ko, s.d, 0), true),
                        op(&ds, 0, w, tq * w),
                        (1.0, 0.0),
                    );
                    let rows = s.rep * tq;
                    softmax_backward(
                        &p,
                        &ds,
                        &bp,
                        (0, rows, w),
                        (tq, i0, u * s.rep),
                        &s,
                        rule,
                        scale,
                    );
                    if first {
                        at_high();
                        first = false;
                    }
                    // dq = ds k.
                    strided_gemm(
                        s.rep,
                        (tq, w, s.d),
                        (op(&ds, 0, w, tq * w), false),
                        (op(&kp, ko, s.d, 0), false),
                        op(&dq, qo, s.d, s.t * s.d),
                        (1.0, 0.0),
                    );
                    // dk += ds^T q and dv += p^T dout, one query head of the group at a time.
                    for h in 0..s.rep {
                        let beta = if n == 0 && h == 0 { 0.0 } else { 1.0 };
                        let ho = qo + h * s.t * s.d;
                        for (src, x, out) in [(&ds, &qp, &dk), (&p, &dop, &dv)] {
                            strided_gemm(
                                1,
                                (w, tq, s.d),
                                (op(src, h * tq * w, w, 0), true),
                                (op(x, ho, s.d, 0), false),
                                op(out, ko, s.d, 0),
                                (1.0, beta),
                            );
                        }
                    }
                }
            }
        }
    }
    Some((wrap(dq), wrap(dk), wrap(dv)))
}

/// The whole regime's backward (see [`try_attention_backward`]).
#[allow(clippy::type_complexity)]
fn whole_backward(
    s: &Dims,
    (dop, qp, kp, vp, bp): (&T, &T, &T, &T, &T),
    (dq, dk, dv): (&T, &T, &T),
    rule: KeyRule,
    scale: f32,
    (slice, at_high): (usize, &mut dyn FnMut()),
) {
    let pp = whole_probs(s, qp, kp, bp, rule, scale);
    let rt = s.rep * s.t;
    // dv = p^T dout, per group, all groups at once.
    group_gemm(s, &pp, dop, dv, (s.total, rt, s.d), true, false, 1.0);
    // The score gradient, a second `[rows, heads, T, T]` tensor if made whole, is made `slice`
    // groups at a time in one reused buffer: the groups are contiguous blocks of every operand.
    let units = s.b * s.nkv;
    let slice = slice.clamp(1, units);
    let ds = empty(qp, &[slice * rt, s.total]);
    // Elements per group of q/dout/dq and of k/v/dk.
    let (qs, ks) = (rt * s.d, s.total * s.d);
    let mut u0 = 0;
    while u0 < units {
        let n = slice.min(units - u0);
        // dp = dout v^T.
        strided_gemm(
            n,
            (rt, s.d, s.total),
            (op(dop, u0 * qs, s.d, qs), false),
            (op(vp, u0 * ks, s.d, ks), true),
            op(&ds, 0, s.total, rt * s.total),
            (1.0, 0.0),
        );
        softmax_backward(
            &pp,
            &ds,
            bp,
            (u0 * rt, n * rt, s.total),
            (s.t, 0, 0),
            s,
            rule,
            scale,
        );
        if u0 == 0 {
            at_high();
        }
        // dq = ds k, dk = ds^T q (summing the group's query heads).
        strided_gemm(
            n,
            (rt, s.total, s.d),
            (op(&ds, 0, s.total, rt * s.total), false),
            (op(kp, u0 * ks, s.d, ks), false),
            op(dq, u0 * qs, s.d, qs),
            (1.0, 0.0),
        );
        strided_gemm(
            n,
            (s.total, rt, s.d),
            (op(&ds, 0, s.total, rt * s.total), true),
            (op(qp, u0 * qs, s.d, qs), false),
            op(dk, u0 * ks, s.d, ks),
            (1.0, 0.0),
        );
        u0 += n;
    }
}
