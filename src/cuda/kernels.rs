//! CubeCL kernels over bitsandbytes' NF4 layout, as uploaded by `qlinear::DeviceNf4`:
//! - `packed`: the 4-bit codes as little-endian u32 words, 8 values per word, the first value of
//!   each byte in its high nibble (bitsandbytes' packing);
//! - `codes`: the 8-bit absmax codes of the 64-value blocks, 4 per u32 word;
//! - `nested`: one f32 per 256 blocks, `code2`: the 256-entry dynamic map, `offset`: the mean
//!   absmax. A block's scale is `code2[code] * nested[block / 256] + offset`.
//!
//! Index arithmetic assumes a whole number of 8-value words per row (`in_features % 8 == 0`,
//! true of every transformer width); `qlinear` falls back to the reference path otherwise.

use cubecl::prelude::*;

/// Values per packed u32 word.
pub const WORD: usize = 8;
/// Values per absmax block (bitsandbytes' blocksize 64) = 8 words.
const WORDS_PER_BLOCK: usize = 8;
/// Blocks per nested (second-level) absmax.
const BLOCKS_PER_NESTED: usize = 256;

/// The absmax block that packed word `w` belongs to.
#[cube]
pub(super) fn block_of(w: usize) -> usize {
    w / WORDS_PER_BLOCK
}

/// The 8-bit code of `block`'s absmax (four codes per u32, lowest byte first).
#[cube]
pub(super) fn absmax_code(block: usize, codes: &Array<u32>) -> usize {
    ((codes[block / 4] >> (((block % 4) * 8) as u32)) & 0xFF) as usize
}

/// Where `block`'s second-level (nested) absmax is in `nested`.
#[cube]
pub(super) fn nested_of(block: usize) -> usize {
    block / BLOCKS_PER_NESTED
}

/// The scale of the 64-value block that packed word `w` belongs to.
#[cube]
pub(super) fn block_scale(
    w: usize,
    codes: &Array<u32>,
    nested: &Array<f32>,
    code2: &Array<f32>,
    offset: f32,
) -> f32 {
    let block = block_of(w);
    code2[absmax_code(block, codes)] * nested[nested_of(block)] + offset
}

/// The 16 NF4 levels in shared memory: a table lookup per value must not touch global memory.
#[cube]
pub(super) fn nf4_table(nf4: &Array<f32>) -> SharedMemory<f32> {
    let mut table = SharedMemory::<f32>::new(16usize);
    let tid = (UNIT_POS_Y * CUBE_DIM_X + UNIT_POS_X) as usize;
    if tid < 16 {
        table[tid] = nf4[tid];
    }
    sync_cube();
    table
}

/// f32 -> bf16 bits, round to nearest even (what a cast does).
#[cube]
pub(super) fn bf16_bits(v: f32) -> u32 {
    let bits = u32::reinterpret(v);
    (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
}

/// Dequantizes into a bf16 buffer seen as u32 pairs, from u32 `at` on (`out` holds `at +
/// words * 4` u32 = `words * 8` bf16 after `at`, value `2j` of a word in the low half of u32
/// `at + 4w + j`). One unit per output u32, so
/// consecutive units store consecutive words (coalesced); the four units of a packed word read
/// it and its block scale once each (cached). Launch with 1-D cubes of at least 16 units.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn nf4_dequant_bf16(
    packed: &Array<u32>,
    codes: &Array<u32>,
    nested: &Array<f32>,
    code2: &Array<f32>,
    nf4: &Array<f32>,
    offset: f32,
    words: usize,
    out: &mut Array<u32>,
    at: usize,
) {
    let table = nf4_table(nf4);
    let idx = ABSOLUTE_POS;
    if idx >= words * 4 {
        terminate!();
    }
    out[at + idx] = dequant_pair(idx, packed, codes, nested, code2, offset, &table);
}

/// One output u32 (two bf16 values) of [`nf4_dequant_bf16`]: u32 `idx` of one tensor.
#[cube]
fn dequant_pair(
    idx: usize,
    packed: &Array<u32>,
    codes: &Array<u32>,
    nested: &Array<f32>,
    code2: &Array<f32>,
    offset: f32,
    table: &SharedMemory<f32>,
) -> u32 {
    let w = idx / 4;
    // Byte j of the word holds values 2j (high nibble) and 2j + 1 (low nibble).
    let j = (idx % 4) as u32;
    let word = packed[w];
    let scale = block_scale(w, codes, nested, code2, offset);
    let first = (word >> (j * 8 + 4)) & 0xF;
    let second = (word >> (j * 8)) & 0xF;
    let lo = bf16_bits(table[first as usize] * scale);
    let hi = bf16_bits(table[second as usize] * scale);
    lo | (hi << 16)
}

/// [`nf4_dequant_bf16`] of up to three tensors in one launch, side by side from u32 `at` on
/// (tensor 1 after tensor 0's `4 * words0` u32, tensor 2 after tensor 1's): the decode's q/k/v
/// and gate/up groups. A tensor with 0 words is not read (pass any other tensor's arrays).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn nf4_dequant_bf16_3(
    packed0: &Array<u32>,
    codes0: &Array<u32>,
    nested0: &Array<f32>,
    code20: &Array<f32>,
    offset0: f32,
    words0: usize,
    packed1: &Array<u32>,
    codes1: &Array<u32>,
    nested1: &Array<f32>,
    code21: &Array<f32>,
    offset1: f32,
    words1: usize,
    packed2: &Array<u32>,
    codes2: &Array<u32>,
    nested2: &Array<f32>,
    code22: &Array<f32>,
    offset2: f32,
    words2: usize,
    nf4: &Array<f32>,
    out: &mut Array<u32>,
    at: usize,
) {
    let table = nf4_table(nf4);
    let idx = ABSOLUTE_POS;
    let (e0, e1) = (words0 * 4, (words0 + words1) * 4);
    if idx >= e1 + words2 * 4 {
        terminate!();
    }
    if idx < e0 {
        out[at + idx] = dequant_pair(idx, packed0, codes0, nested0, code20, offset0, &table);
    } else if idx < e1 {
        out[at + idx] = dequant_pair(idx - e0, packed1, codes1, nested1, code21, offset1, &table);
    } else {
        out[at + idx] = dequant_pair(idx - e1, packed2, codes2, nested2, code22, offset2, &table);
    }
}

/// Sums each `acc[i]` (`i < n`) over the lanes of every plane, then over the cube's `planes`
/// planes; returns the `n` totals in shared memory, readable by every unit after the call.
#[cube]
fn cube_reduce(
    acc: &Array<f32>,
    #[comptime] n: usize,
    #[comptime] planes: usize,
) -> SharedMemory<f32> {
    let mut part = SharedMemory::<f32>::new(comptime!(n * planes));
    let mut total = SharedMemory::<f32>::new(n);
    let p = UNIT_POS_Y as usize;
    #[unroll]
    for i in 0..n {
        let s = plane_sum(acc[i]);
        if UNIT_POS_X == 0 {
            part[p * n + i] = s;
        }
    }
    sync_cube();
    let mut i = (UNIT_POS_Y * CUBE_DIM_X + UNIT_POS_X) as usize;
    while i < n {
        let mut t = 0.0f32;
        #[unroll]
        for q in 0..planes {
            t += part[q * n + i];
        }
        total[i] = t;
        i += comptime!(planes * 32);
    }
    sync_cube();
    total
}

/// `y[r, o] = sum_k x[r, k] * w[o, k]` with a dense f32 `w`, for `rows` (compile-time: one
/// accumulator per row; at most `qlinear::GEMV_MAX_ROWS`) rows: the LoRA factors of the ordinary
/// few-row forward (`qlinear::small_matmul_t`), where a general matmul kernel spends more time
/// being launched and tiled than computing. One cube per output feature; its `planes` planes
/// split `k` (few outputs, long rows: the LoRA `x A^T`). Launch with `CubeDim (32, planes)`,
/// `out` cubes.
#[cube(launch_unchecked)]
pub fn f32_gemv(
    x: &Array<f32>,
    w: &Array<f32>,
    in_features: usize,
    out_features: usize,
    y: &mut Array<f32>,
    #[comptime] rows: usize,
    #[comptime] planes: usize,
) {
    let o = CUBE_POS_X as usize;
    if o >= out_features {
        terminate!();
    }
    let mut acc = Array::<f32>::new(rows);
    #[unroll]
    for r in 0..rows {
        acc[r] = 0.0;
    }
    let mut k = (UNIT_POS_Y * 32 + UNIT_POS_X) as usize;
    while k < in_features {
        let wv = w[o * in_features + k];
        #[unroll]
        for r in 0..rows {
            acc[r] += wv * x[r * in_features + k];
        }
        k += comptime!(planes * 32);
    }
    let total = cube_reduce(&acc, rows, planes);
    let tid = (UNIT_POS_Y * 32 + UNIT_POS_X) as usize;
    if tid < rows {
        y[tid * out_features + o] = total[tid];
    }
}

/// Packed words of a weight row per shared-memory chunk of the NF4 GEMV: one per lane.
const GEMV_CHUNK_WORDS: usize = 32;
/// Shared-memory slots per row of a GEMV chunk: each word's 8 values and one pad slot, so the
/// 32 lanes reading value `e` of "their" word hit 32 different banks (`9 * lane + e` mod 32).
const GEMV_CHUNK_SLOTS: usize = GEMV_CHUNK_WORDS * 9;

/// `y[r, o] = sum_k x[r, k] W[o, k]`: the NF4 GEMV for `rows` (compile-time, at most 16) rows.
/// Each plane owns `outs` consecutive output features and its lanes split
/// their rows one packed word (8 values) at a time, so each 4-bit weight is read once and
/// decoded once, and every `x` value a lane reads from shared memory feeds `outs` outputs (x is
/// staged per chunk of 256 input features by the whole cube, coalesced). Launch with
/// `CubeDim (32, planes)` and `ceil(out / (planes * outs))` cubes.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn nf4_gemv_fused(
    x: &Array<f32>,
    packed: &Array<u32>,
    codes: &Array<u32>,
    nested: &Array<f32>,
    code2: &Array<f32>,
    nf4: &Array<f32>,
    offset: f32,
    in_features: usize,
    out_features: usize,
    y: &mut Array<f32>,
    #[comptime] rows: usize,
    #[comptime] outs: usize,
    #[comptime] planes: usize,
) {
    let table = nf4_table(nf4);
    let lane = UNIT_POS_X as usize;
    let tid = (UNIT_POS_Y * 32 + UNIT_POS_X) as usize;
    let units = comptime!(planes * 32);
    let o0 = (CUBE_POS_X as usize * planes + UNIT_POS_Y as usize) * outs;
    // Output j of this plane; past the end it repeats the last one (its result is not stored).
    // No unit may leave early: the whole cube stages x.
    let mut row_of = Array::<usize>::new(outs);
    #[unroll]
    for j in 0..outs {
        let mut o = o0 + j;
        if o >= out_features {
            o = out_features - 1;
        }
        row_of[j] = o;
    }
    let mut acc = Array::<f32>::new(comptime!(rows * outs));
    #[unroll]
    for i in 0..comptime!(rows * outs) {
        acc[i] = 0.0;
    }
    let mut wv = Array::<f32>::new(comptime!(outs * WORD));
    let mut xs = SharedMemory::<f32>::new(comptime!(rows * GEMV_CHUNK_SLOTS));
    let words_per_row = in_features / WORD;
    let chunk = comptime!(GEMV_CHUNK_WORDS * WORD);
    let mut c0 = 0usize;
    while c0 < words_per_row {
        // Stage x[:, 8 c0 .. 8 c0 + 256] (zeros past the row's end).
        let mut i = tid;
        while i < comptime!(rows * GEMV_CHUNK_WORDS * WORD) {
            let r = i / chunk;
            let kk = i % chunk;
            let k = c0 * WORD + kk;
            let mut v = 0.0f32;
            if k < in_features {
                v = x[r * in_features + k];
            }
            xs[r * GEMV_CHUNK_SLOTS + (kk / WORD) * 9 + kk % WORD] = v;
            i += units;
        }
        sync_cube();
        let w = c0 + lane;
        if w < words_per_row {
            #[unroll]
            for j in 0..outs {
                let g = row_of[j] * words_per_row + w;
                let word = packed[g];
                let s = block_scale(g, codes, nested, code2, offset);
                #[unroll]
                for e in 0..WORD {
                    // Value e of a word: byte e / 2, high nibble first.
                    let eu = e as u32;
                    let shift = ((eu >> 1) << 3) + ((1 - (eu & 1)) << 2);
                    wv[j * WORD + e] = table[((word >> shift) & 0xF) as usize] * s;
                }
            }
            #[unroll]
            for e in 0..WORD {
                #[unroll]
                for r in 0..rows {
                    let xv = xs[r * GEMV_CHUNK_SLOTS + lane * 9 + e];
                    #[unroll]
                    for j in 0..outs {
                        acc[j * rows + r] += wv[j * WORD + e] * xv;
                    }
                }
            }
        }
        sync_cube();
        c0 += GEMV_CHUNK_WORDS;
    }
    #[unroll]
    for j in 0..outs {
        #[unroll]
        for r in 0..rows {
            let total = plane_sum(acc[j * rows + r]);
            let o = o0 + j;
            if lane == 0 && o < out_features {
                y[r * out_features + o] = total;
            }
        }
    }
}

/// `out[i] = bf16(x[2i]) | bf16(x[2i + 1]) << 16`: `2 * pairs` f32 values as bf16.
#[cube(launch_unchecked)]
pub fn f32_to_bf16(x: &Array<f32>, out: &mut Array<u32>, pairs: usize) {
    let i = ABSOLUTE_POS;
    if i < pairs {
        out[i] = bf16_bits(x[2 * i]) | (bf16_bits(x[2 * i + 1]) << 16);
    }
}
