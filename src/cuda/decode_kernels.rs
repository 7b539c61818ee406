//! The fused decode's CubeCL kernels (`generate::fused_decode`): one launch per step of a
//! decoder block's few-row forward instead of the dozens of small tensor ops burn would launch.
//! Rows are sequences (at most `decode::DECODE_MAX_ROWS`). The NF4 GEMV they run the
//! projections with is in `kernels`, beside the format it reads. `silu_mul` and the cube
//! reductions also serve the many-row training ops (`train_ops`, `train_kernels`).

use super::kernels::bf16_bits;
use cubecl::prelude::*;

/// Largest cache length the decode attention kernel holds scores for (shared memory).
pub const DECODE_MAX_KEYS: usize = 4096;
/// Largest head dim the decode attention kernel holds partial sums for (shared memory).
pub const DECODE_MAX_HEAD_DIM: usize = 256;

/// The plane-reduced sum over a whole cube of `planes` planes (through shared memory); every
/// unit gets the total.
#[cube]
pub(super) fn cube_sum(v: f32, #[comptime] planes: usize) -> f32 {
    let mut part = SharedMemory::<f32>::new(planes);
    let s = plane_sum(v);
    if (UNIT_POS_X & 31) == 0 {
        part[(UNIT_POS_X / 32) as usize] = s;
    }
    sync_cube();
    let mut total = 0.0f32;
    #[unroll]
    for p in 0..planes {
        total += part[p];
    }
    sync_cube();
    total
}

/// The maximum over a whole cube (as [`cube_sum`]).
#[cube]
pub(super) fn cube_max(v: f32, #[comptime] planes: usize) -> f32 {
    let mut part = SharedMemory::<f32>::new(planes);
    let s = plane_max(v);
    if (UNIT_POS_X & 31) == 0 {
        part[(UNIT_POS_X / 32) as usize] = s;
    }
    sync_cube();
    let mut total = part[0];
    #[unroll]
    for p in 1..planes {
        let v = part[p];
        if v > total {
            total = v;
        }
    }
    sync_cube();
    total
}

/// A LoRA up-projection's value at row `r`, output `o`: `scale * sum_j z[r, j] bt[j, o]`, from
/// the group's `z = x A^T` (`[rows, width]`) and its block-diagonal B transposed (`bt [width,
/// outs]`: lanes on consecutive outputs read consecutive values): added by SwiGLU as it reads
/// the gate/up group's output, and by [`lora_up_add`] for the other groups (f32 throughout, where
/// a separate GEMM ran in TF32).
#[cube]
fn lora_up(
    z: &Array<f32>,
    bt: &Array<f32>,
    r: usize,
    o: usize,
    #[comptime] width: usize,
    outs: usize,
    scale: f32,
) -> f32 {
    let mut acc = 0.0f32;
    // Unrolled (the width is a compile-time value): all `width` loads issue at once. A loop over a
    // run-time width waited for each in turn, ~10 us per RMSNorm launch at 16 rows (H200, 2026-12-02).
    #[unroll]
    for j in 0..width {
        acc += z[r * width + j] * bt[j * outs + o];
    }
    acc * scale
}

/// `out[r, o] += scale * sum_j z[r, j] bt[j, o]` ([`lora_up`]) for every row and output, one
/// unit each: a projection group's LoRA up-projection as a launch of its own. Nsight Compute
/// (H200, 2026-12-02) timed RoPE + cache append at 28.8 us and the RMSNorm at 11.2 us when they added
/// it as they read the group's output: one warp per (row, head), or 16 cubes in all, each unit walking `width` values
/// of `bt` for each of its outputs, is too few loads in flight; here every output has its unit.
#[cube(launch_unchecked)]
pub fn lora_up_add(
    out: &mut Array<f32>,
    z: &Array<f32>,
    bt: &Array<f32>,
    rows: usize,
    outs: usize,
    scale: f32,
    #[comptime] width: usize,
) {
    let i = ABSOLUTE_POS;
    if i >= rows * outs {
        terminate!();
    }
    let r = i / outs;
    let o = i % outs;
    out[i] += lora_up(z, bt, r, o, width, outs, scale);
}

/// `z[r, j] = sum_k x[r, k] a[j, k]`: the LoRA down-projection of a decode step, one cube of
/// `planes` planes per (j, r) (`CubeCount (width, rows)`), each reading one row of `x` and one
/// of `a`, coalesced. (One cube per `j` looping over the rows left most of the GPU idle.)
#[cube(launch_unchecked)]
pub fn lora_down(
    x: &Array<f32>,
    a: &Array<f32>,
    in_features: usize,
    width: usize,
    z: &mut Array<f32>,
    #[comptime] planes: usize,
) {
    let j = CUBE_POS_X as usize;
    let r = CUBE_POS_Y as usize;
    let units = comptime!(planes * 32);
    let mut acc = 0.0f32;
    let mut k = UNIT_POS_X as usize;
    while k < in_features {
        acc += x[r * in_features + k] * a[j * in_features + k];
        k += units;
    }
    let total = cube_sum(acc, planes);
    if UNIT_POS_X == 0 {
        z[r * width + j] = total;
    }
}

/// HF's RMSNorm of each row: `y = w * x / sqrt(mean(x^2) + eps)`, also as bf16 pairs in `yb`
/// (value `2j` in the low half of word `j`: the next GEMM's input, without a cast launch). One
/// cube of `32 * planes` units per row; `width` even.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_rows(
    x: &Array<f32>,
    w: &Array<f32>,
    eps: f32,
    width: usize,
    y: &mut Array<f32>,
    yb: &mut Array<u32>,
    #[comptime] planes: usize,
) {
    let row = CUBE_POS_X as usize * width;
    let units = comptime!(planes * 32);
    let mut ss = 0.0f32;
    // Four of the unit's values per pass (unrolled): their loads are in flight together instead
    // of one value's after another's.
    let mut k0 = UNIT_POS_X as usize;
    while k0 < width {
        #[unroll]
        for u in 0..4usize {
            let k = k0 + u * units;
            if k < width {
                let v = x[row + k];
                ss += v * v;
            }
        }
        k0 += comptime!(4 * planes * 32);
    }
    let total = cube_sum(ss, planes);
    let inv = 1.0f32 / (total / (width as f32) + eps).sqrt();
    let mut p = UNIT_POS_X as usize;
    while p < width / 2 {
        let k = 2 * p;
        let v0 = x[row + k] * inv * w[k];
        let v1 = x[row + k + 1] * inv * w[k + 1];
        y[row + k] = v0;
        y[row + k + 1] = v1;
        yb[row / 2 + p] = bf16_bits(v0) | (bf16_bits(v1) << 16);
        p += units;
    }
}

/// u32 words of the decode step buffer (see [`step_slot`]).
pub const fn step_words(rows: usize) -> usize {
    3 * rows + 3
}

/// The step's inputs as the decode kernels read them: `[tokens; rows] ++ [valid; rows] ++
/// [positions; rows] ++ [slot] ++ [seed] ++ [ban]` (the last two for [`sample_rows`]), written
/// before each step (so a captured CUDA graph of the step replays unchanged: nothing that varies
/// per step is a launch argument).
#[cube]
fn step_slot(step: &Array<u32>, rows: usize) -> usize {
    step[3 * rows] as usize
}

/// RoPE for one decode token per row, and the cache append: reads the step's projections from
/// `qkv` (`[rows, (nh + 2 nkv) * d]`: q, then k, then v), writes the rotated queries to `q`
/// (`[rows, nh * d]`), and the rotated keys and the values at the step's slot of the caches
/// (`[rows, nkv, cap, d]`), marking the slot valid or not. The angle is `pos[r] * inv_freq[i]`
/// in f32, as transformers computes it. One cube per (row, query or key head), lanes over the
/// head's rotation pairs.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn rope_append(
    qkv: &Array<f32>,
    q: &mut Array<f32>,
    step: &Array<u32>,
    inv_freq: &Array<f32>,
    k_cache: &mut Array<f32>,
    v_cache: &mut Array<f32>,
    valid: &mut Array<u32>,
    rows: usize,
    nh: usize,
    nkv: usize,
    d: usize,
    cap: usize,
) {
    let r = CUBE_POS_X as usize / (nh + nkv);
    let head = CUBE_POS_X as usize % (nh + nkv);
    let slot = step_slot(step, rows);
    let pos = step[2 * rows + r] as f32;
    let half = d / 2;
    let row = r * (nh + 2 * nkv) * d;
    let units = CUBE_DIM_X as usize;
    let mut i = UNIT_POS_X as usize;
    while i < half {
        let angle = pos * inv_freq[i];
        let c = angle.cos();
        let s = angle.sin();
        // Query heads, then key heads, in qkv's order.
        let col = head * d + i;
        let x1 = qkv[row + col];
        let x2 = qkv[row + col + half];
        if head < nh {
            let dst = r * nh * d + head * d;
            q[dst + i] = x1 * c - x2 * s;
            q[dst + i + half] = x2 * c + x1 * s;
        } else {
            let kh = head - nh;
            let dst = ((r * nkv + kh) * cap + slot) * d;
            k_cache[dst + i] = x1 * c - x2 * s;
            k_cache[dst + i + half] = x2 * c + x1 * s;
            let vcol = row + (nh + nkv) * d + kh * d + i;
            v_cache[dst + i] = qkv[vcol];
            v_cache[dst + i + half] = qkv[vcol + half];
        }
        i += units;
    }
    if head == 0 && UNIT_POS_X == 0 {
        valid[r * cap + slot] = step[rows + r];
    }
}

/// Attention of one new token per row over its cache (slots up to the step's), grouped-query heads read
/// in place: one cube per (row, query head); each plane scores keys (lanes over the head dim),
/// then the cube takes the softmax and the weighted sum of values. Masked slots (padding,
/// outside a sliding `window` when non-zero) get -1e30 before the softmax, as the reference does.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    q: &Array<f32>,
    k_cache: &Array<f32>,
    v_cache: &Array<f32>,
    valid: &Array<u32>,
    step: &Array<u32>,
    out: &mut Array<f32>,
    outb: &mut Array<u32>,
    rows: usize,
    nh: usize,
    nkv: usize,
    d: usize,
    cap: usize,
    window: usize,
    scale: f32,
    #[comptime] planes: usize,
) {
    let len = step_slot(step, rows) + 1;
    let r = CUBE_POS_X as usize / nh;
    let head = CUBE_POS_X as usize % nh;
    let kh = head / (nh / nkv);
    let lane = (UNIT_POS_X % 32) as usize;
    let plane = (UNIT_POS_X / 32) as usize;
    let mut scores = SharedMemory::<f32>::new(DECODE_MAX_KEYS);
    let q_base = (r * nh + head) * d;
    let kv_base = (r * nkv + kh) * cap * d;
    // Plane p scores keys p, p + planes, ..., four at a time: their loads issue together
    // instead of each waiting for the previous key's (at ~128 keys the step was a chain of
    // dependent loads; H200, 2026-12-02).
    let mut j0 = plane;
    while j0 < len {
        let mut part = Array::<f32>::new(4usize);
        #[unroll]
        for u in 0..4usize {
            part[u] = 0.0f32;
        }
        let mut e = lane;
        while e < d {
            let qe = q[q_base + e];
            #[unroll]
            for u in 0..4usize {
                let j = j0 + u * planes;
                if j < len {
                    part[u] += qe * k_cache[kv_base + j * d + e];
                }
            }
            e += 32;
        }
        #[unroll]
        for u in 0..4usize {
            let j = j0 + u * planes;
            let s = plane_sum(part[u]) * scale;
            if lane == 0 && j < len {
                let mut val = s;
                if valid[r * cap + j] == 0 {
                    val = -1.0e30f32;
                }
                if window > 0 && len - 1 - j >= window {
                    val = -1.0e30f32;
                }
                scores[j] = val;
            }
        }
        j0 += comptime!(4 * planes);
    }
    sync_cube();
    let units = comptime!(planes * 32);
    let mut m = scores[0];
    let mut j = UNIT_POS_X as usize;
    while j < len {
        let sj = scores[j];
        if sj > m {
            m = sj;
        }
        j += units;
    }
    let m = cube_max(m, planes);
    let mut sum = 0.0f32;
    let mut j = UNIT_POS_X as usize;
    while j < len {
        let p = (scores[j] - m).exp();
        scores[j] = p;
        sum += p;
        j += units;
    }
    let sum = cube_sum(sum, planes);
    // The weighted sum of values: plane p takes keys p, p + planes, ... and its lanes the head
    // dims (coalesced reads of each value row); the planes' partial sums meet in shared memory.
    // (One unit per dim looping over every key was a chain of `len` dependent loads.)
    let mut part = SharedMemory::<f32>::new(comptime!(planes * DECODE_MAX_HEAD_DIM));
    let mut e = lane;
    while e < d {
        let mut acc = Array::<f32>::new(4usize);
        #[unroll]
        for u in 0..4usize {
            acc[u] = 0.0f32;
        }
        let mut j0 = plane;
        while j0 < len {
            #[unroll]
            for u in 0..4usize {
                let j = j0 + u * planes;
                if j < len {
                    acc[u] += scores[j] * v_cache[kv_base + j * d + e];
                }
            }
            j0 += comptime!(4 * planes);
        }
        part[plane * DECODE_MAX_HEAD_DIM + e] = acc[0] + acc[1] + acc[2] + acc[3];
        e += 32;
    }
    sync_cube();
    let mut e = UNIT_POS_X as usize;
    while e < d {
        let mut acc = 0.0f32;
        #[unroll]
        for p in 0..planes {
            acc += part[p * DECODE_MAX_HEAD_DIM + e];
        }
        out[q_base + e] = acc / sum;
        e += units;
    }
    // The bf16 copy for the output projection's GEMM (the cube's own writes are visible after
    // the barrier).
    sync_cube();
    let mut p = UNIT_POS_X as usize;
    while p < d / 2 {
        let e = q_base + 2 * p;
        outb[e / 2] = bf16_bits(out[e]) | (bf16_bits(out[e + 1]) << 16);
        p += units;
    }
}

/// A 32-bit integer mixer (the "lowbias32" hash): turns (seed, row, token) into the uniform
/// draws of [`sample_rows`].
#[cube]
fn mix32(v: u32) -> u32 {
    let mut x = v ^ (v >> 16);
    x *= 0x7feb_352du32;
    x ^= x >> 15;
    x *= 0x846c_a68bu32;
    x ^ (x >> 16)
}

/// Draws each row's next token from `softmax(logits / T)` by the Gumbel-max trick: the argmax
/// of `logits_i / T + G_i`, `G_i = -ln(-ln u_i)` with independent uniforms `u_i`, is a draw from
/// exactly that distribution, and an argmax needs no sort, no normalization and no copy of the
/// vocabulary back to the host. The uniforms hash the step's seed (`step[3 rows + 1]`) with the
/// row and the token index, at 24-bit resolution (the noise is capped near 17.3 nats: a token
/// that far below the top is never drawn). `greedy` takes the plain argmax. Tokens in `banned`
/// are skipped when `step[3 rows + 2]` is set (before `min_new_tokens`). Ties go to the lowest
/// index. One cube of `planes` planes (1-D) per row.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn sample_rows(
    logits: &Array<f32>,
    step: &Array<u32>,
    banned: &Array<u32>,
    picks: &mut Array<u32>,
    rows: usize,
    vocab: usize,
    n_banned: usize,
    inv_temp: f32,
    #[comptime] greedy: bool,
    #[comptime] planes: usize,
) {
    let r = CUBE_POS_X as usize;
    let key = mix32(step[3 * rows + 1] ^ mix32(r as u32 + 0x9e37_79b9u32));
    let ban = step[3 * rows + 2] != 0;
    let mut best = f32::new(-3.4e38);
    let mut best_i = vocab as u32;
    let mut i = UNIT_POS_X as usize;
    while i < vocab {
        let mut s = logits[r * vocab + i];
        if !comptime!(greedy) {
            let h = mix32(key ^ mix32(i as u32));
            // 2^-24: the top 24 bits of the hash as a uniform in (0, 1).
            let u = ((h >> 8) as f32 + 0.5f32) * 5.960_464_5e-8f32;
            let g = -(-u.ln()).ln();
            s = s * inv_temp + g;
        }
        let mut allowed = true;
        if ban {
            for j in 0..n_banned {
                if banned[j] as usize == i {
                    allowed = false;
                }
            }
        }
        if allowed && s > best {
            best = s;
            best_i = i as u32;
        }
        i += comptime!(planes * 32);
    }
    let top = cube_max(best, planes);
    let mut cand = vocab as u32;
    if best == top {
        cand = best_i;
    }
    let mut part = SharedMemory::<u32>::new(planes);
    let m = plane_min(cand);
    if (UNIT_POS_X & 31) == 0 {
        part[(UNIT_POS_X / 32) as usize] = m;
    }
    sync_cube();
    if UNIT_POS_X == 0 {
        let mut pick = part[0];
        #[unroll]
        for p in 1..planes {
            let v = part[p];
            if v < pick {
                pick = v;
            }
        }
        // Nothing allowed (every logit -inf or banned): token 0 rather than out of range.
        if pick >= vocab as u32 {
            pick = 0;
        }
        picks[r] = pick;
    }
}

/// `y = silu(g) * u` (the SwiGLU activation) for `y [rows, width]` (`2 * pairs` values, width
/// even), `g` and `u` read as rows of `stride` values, `u` from `u_off` on in its row (so one
/// `[rows, 2 * width]` buffer can hold both); with `bf16` also as bf16 pairs in `yb` (as
/// [`rms_norm_rows`]). With `lora` (`g` and `u` one group's `[gate | up]` output, `u_off` =
/// `width`), each value is first completed with its LoRA up-projection ([`lora_up`]).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn silu_mul(
    g: &Array<f32>,
    u: &Array<f32>,
    y: &mut Array<f32>,
    yb: &mut Array<u32>,
    pairs: usize,
    width: usize,
    stride: usize,
    u_off: usize,
    z: &Array<f32>,
    lb: &Array<f32>,
    #[comptime] lora_width: usize,
    lora_outs: usize,
    lora_scale: f32,
    #[comptime] bf16: bool,
    #[comptime] lora: bool,
) {
    let p = ABSOLUTE_POS;
    if p < pairs {
        let i = 2 * p;
        let (r, c) = (i / width, i % width);
        let src = r * stride + c;
        let mut a = g[src];
        let mut b = g[src + 1];
        let mut ua = u[src + u_off];
        let mut ub = u[src + u_off + 1];
        if comptime!(lora) {
            // The gate's columns, then the up projection's (`u_off` further) of the group.
            a += lora_up(z, lb, r, c, lora_width, lora_outs, lora_scale);
            b += lora_up(z, lb, r, c + 1, lora_width, lora_outs, lora_scale);
            ua += lora_up(z, lb, r, c + u_off, lora_width, lora_outs, lora_scale);
            ub += lora_up(z, lb, r, c + u_off + 1, lora_width, lora_outs, lora_scale);
        }
        let v0 = a / (1.0f32 + (-a).exp()) * ua;
        let v1 = b / (1.0f32 + (-b).exp()) * ub;
        y[i] = v0;
        y[i + 1] = v1;
        if comptime!(bf16) {
            yb[p] = bf16_bits(v0) | (bf16_bits(v1) << 16);
        }
    }
}

/// `h[r, :] = embed[tokens[r], :]` for the step's tokens (`step[0..rows]`). The table's bits
/// are read as u32: f32 values, or with `bf16` pairs of bf16 values (value `2j` in the low half
/// of word `j`).
#[cube(launch_unchecked)]
pub fn embed_rows(
    step: &Array<u32>,
    embed: &Array<u32>,
    h: &mut Array<f32>,
    width: usize,
    #[comptime] bf16: bool,
) {
    let r = CUBE_POS_X as usize;
    let tok = step[r] as usize;
    let mut k = UNIT_POS_X as usize;
    while k < width {
        let i = tok * width + k;
        if comptime!(bf16) {
            let word = embed[i / 2];
            let half = (word >> (((i % 2) * 16) as u32)) & 0xFFFF;
            h[r * width + k] = f32::reinterpret(half << 16);
        } else {
            h[r * width + k] = f32::reinterpret(embed[i]);
        }
        k += CUBE_DIM_X as usize;
    }
}
