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

/// The scale of the 64-value block that packed word `w` belongs to.
#[cube]
fn block_scale(
    w: usize,
    codes: &Array<u32>,
    nested: &Array<f32>,
    code2: &Array<f32>,
    offset: f32,
) -> f32 {
    let block = w / WORDS_PER_BLOCK;
    let code = (codes[block / 4] >> (((block % 4) * 8) as u32)) & 0xFF;
    code2[code as usize] * nested[block / BLOCKS_PER_NESTED] + offset
}

/// Value `e` (0..8) of a packed word: byte `e / 2`, high nibble first.
#[cube]
fn nibble(word: u32, #[comptime] e: usize) -> u32 {
    let shift = comptime!(((e / 2) * 8 + if e.is_multiple_of(2) { 4 } else { 0 }) as u32);
    (word >> shift) & 0xF
}

/// The 16 NF4 levels in shared memory: a table lookup per value must not touch global memory.
#[cube]
fn nf4_table(nf4: &Array<f32>) -> SharedMemory<f32> {
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
fn bf16_bits(v: f32) -> u32 {
    let bits = u32::reinterpret(v);
    (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
}

/// Dequantizes one packed word (8 values) per unit into a bf16 buffer seen as u32 pairs
/// (`out` holds `words * 4` u32 = `words * 8` bf16, value `2j` in the low half of word `j`), so
/// each unit writes 16 contiguous bytes. Launch with 1-D cubes of at least 16 units.
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
) {
    let table = nf4_table(nf4);
    let w = ABSOLUTE_POS;
    if w >= words {
        terminate!();
    }
    let word = packed[w];
    let scale = block_scale(w, codes, nested, code2, offset);
    #[unroll]
    for j in 0..4usize {
        let lo = bf16_bits(table[nibble(word, 2 * j) as usize] * scale);
        let hi = bf16_bits(table[nibble(word, 2 * j + 1) as usize] * scale);
        out[w * 4 + j] = lo | (hi << 16);
    }
}

/// `y[r, o] = sum_k x[r, k] * W[o, k]` for `rows` (compile-time, at most 16) rows: each plane of
/// 32 lanes owns one output feature and walks its weight row 32 values at a time, lane `l` taking
/// value `l` of each chunk, so every read of `x` is one coalesced 128-byte line per row. Each
/// 4-bit weight is read and dequantized once and applied to every row; a plane reduction ends it.
/// No dense weight is written. Launch with `CubeDim (32, P)` and `ceil(out / P)` cubes.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn nf4_gemv(
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
) {
    let table = nf4_table(nf4);
    let o = (CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y) as usize;
    if o >= out_features {
        terminate!();
    }
    let lane = UNIT_POS_X as usize;
    let mut acc = Array::<f32>::new(rows);
    #[unroll]
    for r in 0..rows {
        acc[r] = 0.0;
    }
    let row_base = o * in_features;
    let mut k = lane;
    while k < in_features {
        let g = row_base + k;
        let w = g / WORD;
        let e = (g % WORD) as u32;
        // Value e of a word: byte e / 2, high nibble first.
        let shift = ((e >> 1) << 3) + ((1 - (e & 1)) << 2);
        let code = (packed[w] >> shift) & 0xF;
        let wv = table[code as usize] * block_scale(w, codes, nested, code2, offset);
        #[unroll]
        for r in 0..rows {
            acc[r] += wv * x[r * in_features + k];
        }
        k += 32;
    }
    #[unroll]
    for r in 0..rows {
        let total = plane_sum(acc[r]);
        if lane == 0 {
            y[r * out_features + o] = total;
        }
    }
}

/// `y[r, o] = sum_k x[r, k] * w[o, k]` with a dense f32 `w`, for `rows` (compile-time, at most
/// 16) rows: the LoRA factors at decode, where a general matmul kernel spends more time being
/// launched and tiled than computing. Same plane-per-output layout as [`nf4_gemv`].
#[cube(launch_unchecked)]
pub fn f32_gemv(
    x: &Array<f32>,
    w: &Array<f32>,
    in_features: usize,
    out_features: usize,
    y: &mut Array<f32>,
    #[comptime] rows: usize,
) {
    let o = (CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y) as usize;
    if o >= out_features {
        terminate!();
    }
    let lane = UNIT_POS_X as usize;
    let mut acc = Array::<f32>::new(rows);
    #[unroll]
    for r in 0..rows {
        acc[r] = 0.0;
    }
    let mut k = lane;
    while k < in_features {
        let wv = w[o * in_features + k];
        #[unroll]
        for r in 0..rows {
            acc[r] += wv * x[r * in_features + k];
        }
        k += 32;
    }
    #[unroll]
    for r in 0..rows {
        let total = plane_sum(acc[r]);
        if lane == 0 {
            y[r * out_features + o] = total;
        }
    }
}
