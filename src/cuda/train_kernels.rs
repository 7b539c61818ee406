//! CubeCL kernels for the many-row (training, prefill) block: each replaces a chain of burn
//! tensor ops (one launch and one full read and write of the tensor per op) with one pass.
//! Row kernels give each row to one plane of 32 lanes, `CUBE_DIM_Y` rows per cube; a whole plane
//! leaves together, so the plane reductions never see a missing lane.

use super::decode_kernels::{cube_max, cube_sum};
use cubecl::prelude::*;

/// The row this plane works on.
#[cube]
fn plane_row() -> usize {
    CUBE_POS_X as usize * CUBE_DIM_Y as usize + UNIT_POS_Y as usize
}

/// HF's RMSNorm per row, `y = x * inv * w` with `inv = 1 / sqrt(mean(x^2) + eps)`, also
/// writing `inv` (one per row) for the backward.
#[cube(launch_unchecked)]
pub fn rms_norm_fwd(
    x: &Array<f32>,
    w: &Array<f32>,
    y: &mut Array<f32>,
    inv: &mut Array<f32>,
    rows: usize,
    width: usize,
    eps: f32,
) {
    let row = plane_row();
    if row >= rows {
        terminate!();
    }
    let base = row * width;
    let lane = UNIT_POS_X as usize;
    let mut ss = 0.0f32;
    let mut k = lane;
    while k < width {
        let v = x[base + k];
        ss += v * v;
        k += 32;
    }
    let r = 1.0f32 / (plane_sum(ss) / (width as f32) + eps).sqrt();
    let mut k = lane;
    while k < width {
        y[base + k] = x[base + k] * r * w[k];
        k += 32;
    }
    if lane == 0 {
        inv[row] = r;
    }
}

/// RMSNorm backward plus a residual: `dx = res + (dxn - xn * mean(dxn * xn)) * inv` with
/// `xn = x * inv`, `dxn = dy * w`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_bwd(
    dy: &Array<f32>,
    x: &Array<f32>,
    inv: &Array<f32>,
    w: &Array<f32>,
    res: &Array<f32>,
    dx: &mut Array<f32>,
    rows: usize,
    width: usize,
) {
    let row = plane_row();
    if row >= rows {
        terminate!();
    }
    let base = row * width;
    let lane = UNIT_POS_X as usize;
    let r = inv[row];
    let mut dot = 0.0f32;
    let mut k = lane;
    while k < width {
        dot += dy[base + k] * w[k] * x[base + k] * r;
        k += 32;
    }
    let mean = plane_sum(dot) / (width as f32);
    let mut k = lane;
    while k < width {
        let xn = x[base + k] * r;
        let dxn = dy[base + k] * w[k];
        dx[base + k] = res[base + k] + (dxn - xn * mean) * r;
        k += 32;
    }
}

/// SwiGLU backward in place: from `dact` for `act = silu(gate) * up`, `gate` becomes `dgate` and
/// `up` becomes `dup` (the recomputed block keeps neither afterwards, and two fresh
/// `[tokens, intermediate]` buffers were the largest part of a block's backward).
#[cube(launch_unchecked)]
pub fn swiglu_bwd(dact: &Array<f32>, gate: &mut Array<f32>, up: &mut Array<f32>, n: usize) {
    let i = ABSOLUTE_POS;
    if i < n {
        let g = gate[i];
        let u = up[i];
        let sig = 1.0f32 / (1.0f32 + (-g).exp());
        let d = dact[i];
        gate[i] = d * u * (sig * (g * (1.0f32 - sig) + 1.0f32));
        up[i] = d * g * sig;
    }
}

/// Between the projections' layout `[b, t, heads, d]` and the attention's `[b, heads, t, d]`,
/// rotating each head by its RoPE angle on the way in (`rotate`), or by minus the angle on the
/// way back (`back`: the transpose of a rotation, for gradients). `cos`/`sin` are `[b, t, d/2]`.
/// One unit per (row, head, pair of rotated values).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn rope_transpose(
    src: &Array<f32>,
    cos: &Array<f32>,
    sin: &Array<f32>,
    dst: &mut Array<f32>,
    b: usize,
    t: usize,
    heads: usize,
    d: usize,
    #[comptime] rotate: bool,
    #[comptime] back: bool,
) {
    let half = d / 2;
    let idx = ABSOLUTE_POS;
    if idx >= b * t * heads * half {
        terminate!();
    }
    let i = idx % half;
    let rest = idx / half;
    let h = rest % heads;
    let bt = rest / heads;
    let ti = bt % t;
    let bi = bt / t;
    let lin = (bt * heads + h) * d;
    let head = ((bi * heads + h) * t + ti) * d;
    let mut src_at = lin;
    let mut dst_at = head;
    if comptime!(back) {
        src_at = head;
        dst_at = lin;
    }
    let x1 = src[src_at + i];
    let x2 = src[src_at + i + half];
    if comptime!(rotate) {
        let c = cos[bt * half + i];
        let mut s = sin[bt * half + i];
        if comptime!(back) {
            s = -s;
        }
        dst[dst_at + i] = x1 * c - x2 * s;
        dst[dst_at + i + half] = x2 * c + x1 * s;
    } else {
        dst[dst_at + i] = x1;
        dst[dst_at + i + half] = x2;
    }
}

/// `out[slot] = sum(x[i]^2)` over `n` values, by one cube of `planes` planes (deterministic: no
/// atomics). One launch per gradient tensor fills a small buffer the host reads once, instead of
/// one reduction and one blocking read per tensor.
#[cube(launch_unchecked)]
pub fn sum_squares(
    x: &Array<f32>,
    n: usize,
    out: &mut Array<f32>,
    slot: usize,
    #[comptime] planes: usize,
) {
    let units = comptime!(planes * 32);
    let mut s = 0.0f32;
    let mut i = UNIT_POS_X as usize;
    while i < n {
        let v = x[i];
        s += v * v;
        i += units;
    }
    let total = cube_sum(s, planes);
    if UNIT_POS_X == 0 {
        out[slot] = total;
    }
}

/// One AdamW step of one parameter tensor in a single pass, with PyTorch's order of operations
/// (`torch.optim.AdamW`, `foreach=False`): `g *= clip`, `p *= 1 - lr * wd`, `m = b1 m + (1 - b1)
/// g`, `v = b2 v + (1 - b2) g^2`, `p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)`. `m` and `v`
/// go to `m_out` and `v_out`, the new parameter to `p_out`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    p: &Array<f32>,
    g: &Array<f32>,
    m: &Array<f32>,
    v: &Array<f32>,
    p_out: &mut Array<f32>,
    m_out: &mut Array<f32>,
    v_out: &mut Array<f32>,
    n: usize,
    clip: f32,
    decay: f32,
    b1: f32,
    omb1: f32,
    b2: f32,
    omb2: f32,
    eps: f32,
    bc2_sqrt: f32,
    step_size: f32,
) {
    let i = ABSOLUTE_POS;
    if i < n {
        let gi = g[i] * clip;
        let mi = m[i] * b1 + gi * omb1;
        let vi = v[i] * b2 + gi * gi * omb2;
        m_out[i] = mi;
        v_out[i] = vi;
        let denom = vi.sqrt() / bc2_sqrt + eps;
        p_out[i] = p[i] * decay - mi / denom * step_size;
    }
}

/// The max of `z[base..base + vocab] * inv_t` over one cube of `planes` planes (every unit gets
/// it).
#[cube]
fn row_max(
    z: &Array<f32>,
    base: usize,
    vocab: usize,
    inv_t: f32,
    #[comptime] planes: usize,
) -> f32 {
    let units = comptime!(planes * 32);
    let mut m = z[base] * inv_t;
    let mut k = UNIT_POS_X as usize;
    while k < vocab {
        let v = z[base + k] * inv_t;
        if v > m {
            m = v;
        }
        k += units;
    }
    cube_max(m, planes)
}

/// `sum(exp(z[base..base + vocab] * inv_t - m))` over one cube (every unit gets it).
#[cube]
fn row_sum_exp(
    z: &Array<f32>,
    base: usize,
    vocab: usize,
    inv_t: f32,
    m: f32,
    #[comptime] planes: usize,
) -> f32 {
    let units = comptime!(planes * 32);
    let mut s = 0.0f32;
    let mut k = UNIT_POS_X as usize;
    while k < vocab {
        s += (z[base + k] * inv_t - m).exp();
        k += units;
    }
    cube_sum(s, planes)
}

/// `lp[r] = log_softmax(z[r, :] * inv_t)[labels[r]]`: the token log-probs of a chunk of logits
/// in one pass per row (one cube of `planes` planes per row), where burn's ops took a scale, two
/// reductions, a subtraction, an exp, a log and a gather over the whole `[rows, vocab]` tensor.
#[cube(launch_unchecked)]
pub fn token_logp_fwd(
    z: &Array<f32>,
    labels: &Array<u32>,
    vocab: usize,
    inv_t: f32,
    lp: &mut Array<f32>,
    #[comptime] planes: usize,
) {
    let r = CUBE_POS_X as usize;
    let base = r * vocab;
    let m = row_max(z, base, vocab, inv_t, planes);
    let s = row_sum_exp(z, base, vocab, inv_t, m, planes);
    if UNIT_POS_X == 0 {
        lp[r] = z[base + labels[r] as usize] * inv_t - m - s.ln();
    }
}

/// The gradient of [`token_logp_fwd`] with respect to the logits, written over `z`:
/// `dz[r, k] = dl[r] * inv_t * ([k == labels[r]] - softmax(z[r, :] * inv_t)[k])`.
#[cube(launch_unchecked)]
pub fn token_logp_bwd(
    z: &mut Array<f32>,
    labels: &Array<u32>,
    dl: &Array<f32>,
    vocab: usize,
    inv_t: f32,
    #[comptime] planes: usize,
) {
    let r = CUBE_POS_X as usize;
    let base = r * vocab;
    let m = row_max(z, base, vocab, inv_t, planes);
    let s = row_sum_exp(z, base, vocab, inv_t, m, planes);
    let g = dl[r] * inv_t;
    let label = labels[r] as usize;
    let units = comptime!(planes * 32);
    let mut k = UNIT_POS_X as usize;
    while k < vocab {
        let p = (z[base + k] * inv_t - m).exp() / s;
        let mut d = -p;
        if k == label {
            d += 1.0;
        }
        z[base + k] = d * g;
        k += units;
    }
}
