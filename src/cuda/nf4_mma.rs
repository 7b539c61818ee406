//! The decode's projections read straight from NF4 with tensor cores: one launch per group of
//! modules that share an input (q/k/v, o, gate/up, down) computes `y = x W^T (+ residual)` for
//! up to 64 rows and, on extra cubes, the group's LoRA down-projection `z = x A^T`.
//!
//! Dequantizing a group into a bf16 workspace and multiplying it with cuBLAS writes and reads 16
//! bits per weight besides reading the 4 (4.5 bytes per weight moved instead of 0.5), and the
//! LoRA down-projection was a launch of its own. Here a cube owns 16 output columns; its warps
//! split `in` into 64-value chunks (one absmax block of each column) and run `m16n8k16` bf16
//! MMAs whose operands they build in registers: each lane dequantizes its own bytes of B and
//! loads its own inputs of A (`warp_columns` has the layout), every 4-bit weight is read once,
//! and the warps' sums meet in shared memory once at the end; no two cubes write the same
//! value (no atomics, no second pass). At a few rows the step is latency-bound, so a warp
//! issues the loads of up to four chunks before it multiplies any of them, and small matrices
//! get one chunk per warp. A version that dequantized each chunk into a shared-memory
//! tile for `wmma` (16x16x16): its 2-byte stores were 3.9-way bank-conflicted, L1 81% busy,
//! 28 us for the 0.5b gate/up group at 1.4 GHz (Nsight Compute, H200, 2026-12-02). The NF4 GEMV on
//! CUDA cores (`kernels::nf4_gemv_fused`) read the same 4 bits but spent 16 multiply-adds per
//! weight for 16 rows, which the tensor cores do in one instruction per 2,048.

use super::kernels::{absmax_code, block_of, nested_of, nf4_table};
use super::qlinear::{GpuLinear, Nf4Args};
use cubecl::cuda::CudaRuntime;
use cubecl::prelude::*;
use cubecl::server::Handle;
use half::bf16;

/// Output columns one cube owns (two 8-column MMA tiles).
pub const MMA_COLS: usize = 16;
/// Input values per chunk: one absmax block of each column.
pub const MMA_CHUNK: usize = 64;
/// Rows of one MMA tile; a launch covers up to four tiles (64 rows).
pub const MMA_ROWS: usize = 16;
/// The most row tiles one launch covers.
pub const MMA_MAX_ROW_TILES: usize = 4;
/// Warps x row tiles per cube at most: each warp's partial sums (1 KiB per row tile) meet in
/// shared memory.
const WARP_TILES: usize = 32;
/// The most warps per cube.
const MAX_WARPS: usize = 16;
/// Chunks whose words and scales a warp loads before it multiplies any of them.
const BATCH: usize = 4;

/// The warps of a cube for `row_tiles` row tiles and `chunks` chunks of `in`: one chunk each
/// while they last (the loads of a small matrix all issue at once), at most [`MAX_WARPS`].
fn warps_for(row_tiles: usize, chunks: usize) -> usize {
    (WARP_TILES / row_tiles).min(MAX_WARPS).min(chunks).max(1)
}

/// `kernels::block_scale` with the 256 second-level code values in shared memory (one
/// dependent global load fewer; CubeCL cannot take either kind of array in one function).
#[cube]
fn scale_of(
    w: usize,
    codes: &Array<u32>,
    nested: &Array<f32>,
    code2: &SharedMemory<f32>,
    offset: f32,
) -> f32 {
    let block = block_of(w);
    code2[absmax_code(block, codes)] * nested[nested_of(block)] + offset
}

/// Byte `byte` of a packed word (values `2 byte` in the high nibble, `2 byte + 1` in the low
/// one) times `scale`, as the bf16 pair of one MMA register (lower k first).
#[cube]
fn nf4_pair<N: Size>(
    word: u32,
    #[comptime] byte: u32,
    scale: f32,
    table: &SharedMemory<f32>,
) -> Vector<bf16, N> {
    let hi = (word >> (byte * 8 + 4)) & 0xF;
    let lo = (word >> (byte * 8)) & 0xF;
    let mut v = Vector::<bf16, N>::empty();
    v[0] = bf16::cast_from(table[hi as usize] * scale);
    v[1] = bf16::cast_from(table[lo as usize] * scale);
    v
}

/// One warp's share of a cube's 16 columns `col0..col0 + 16` (member-local rows of W): chunks
/// `warp, warp + warps, ...` of `in`, with `m16n8k16` MMAs whose operands are built in
/// registers: no shared-memory tile, no bank conflicts (the `wmma` version dequantized each
/// chunk into shared memory first; Nsight Compute found its stores 3.9-way bank-conflicted and
/// L1 81% busy; H200, 2026-12-02).
///
/// A lane (g = lane / 4, t = lane % 4) of the `m16n8k16` layout holds A's rows g and g + 8 and
/// B's column g, at k positions 2t, 2t + 1, 2t + 8, 2t + 9. The sum over k does not care
/// which input value sits at which k position as long as A and B agree, so k step s of a chunk
/// gives lane t the chunk's inputs `16 t + 4 s .. 16 t + 4 s + 4`: over the four steps a lane
/// reads 16 contiguous inputs of its rows (two 16-byte loads per row) and of its column (two
/// packed words, 8 bytes), and each byte of a word is one bf16 pair of B.
#[cube]
#[allow(clippy::too_many_arguments)]
fn warp_columns<NX: Size>(
    xb: &Array<Vector<u32, NX>>,
    packed: &Array<u32>,
    codes: &Array<u32>,
    nested: &Array<f32>,
    code2: &SharedMemory<f32>,
    offset: f32,
    col0: usize,
    in_f: usize,
    table: &SharedMemory<f32>,
    part: &mut SharedMemory<f32>,
    #[comptime] row_tiles: usize,
    #[comptime] warps: usize,
) {
    let def = cmma::MmaDefinition::<bf16, bf16, f32>::new(16usize, 8usize, 16usize);
    let size!(NA) = def.vector_size(cmma::MatrixIdent::A);
    let size!(NB) = def.vector_size(cmma::MatrixIdent::B);
    let size!(NC) = def.vector_size(cmma::MatrixIdent::Accumulator);
    let warp = UNIT_POS_X as usize / 32;
    let lane = UNIT_POS_X as usize % 32;
    let g = lane / 4;
    let t = lane % 4;
    let wpr = in_f / 8;
    let chunks = in_f / MMA_CHUNK;
    // Accumulators, one pair of registers per (row tile, 8-column half).
    let mut accs = Sequence::<Array<Vector<f32, NC>>>::new();
    #[unroll]
    for _ in 0..comptime!(row_tiles * 2) {
        let mut acc = Array::<Vector<f32, NC>>::new(2usize);
        acc[0] = Vector::new(0.0f32);
        acc[1] = Vector::new(0.0f32);
        accs.push(acc);
    }
    let mut c = warp;
    while c < chunks {
        // Every load of the batch first: two words and a scale per chunk and half.
        let mut words = Array::<u32>::new(comptime!(BATCH * 4));
        let mut scales = Array::<f32>::new(comptime!(BATCH * 2));
        #[unroll]
        for b in 0..BATCH {
            let cb = c + b * warps;
            #[unroll]
            for n in 0..2usize {
                words[b * 4 + n * 2] = 0u32;
                words[b * 4 + n * 2 + 1] = 0u32;
                scales[b * 2 + n] = 0.0f32;
                if cb < chunks {
                    let w = (col0 + n * 8 + g) * wpr + cb * 8 + 2 * t;
                    words[b * 4 + n * 2] = packed[w];
                    words[b * 4 + n * 2 + 1] = packed[w + 1];
                    scales[b * 2 + n] = scale_of(w, codes, nested, code2, offset);
                }
            }
        }
        #[unroll]
        for b in 0..BATCH {
            let cb = c + b * warps;
            if cb < chunks {
                #[unroll]
                for tt in 0..row_tiles {
                    // Rows g and g + 8 of the tile, inputs 16 t .. 16 t + 16 of the chunk, as
                    // eight bf16 pairs each.
                    let v = ((tt * 16 + g) * in_f + cb * MMA_CHUNK + 16 * t) / 8;
                    let x0 = xb[v];
                    let x1 = xb[v + 1];
                    let y0 = xb[v + in_f];
                    let y1 = xb[v + in_f + 1];
                    // `lo`: row g, `hi`: row g + 8; u32 `i` holds inputs 2i, 2i + 1.
                    let mut lo = Array::<u32>::new(8usize);
                    let mut hi = Array::<u32>::new(8usize);
                    #[unroll]
                    for e in 0..4usize {
                        lo[e] = x0[e];
                        lo[4 + e] = x1[e];
                        hi[e] = y0[e];
                        hi[4 + e] = y1[e];
                    }
                    #[unroll]
                    for s in 0..4usize {
                        // A's registers in PTX order: (g, k 2t..), (g + 8, k 2t..), (g, k 2t + 8..),
                        // (g + 8, k 2t + 8..), i.e. inputs 4s, 4s + 1 then 4s + 2, 4s + 3 of the
                        // lane's 16; B's two registers the same inputs of column g.
                        let mut ra = Array::<Vector<bf16, NA>>::new(4usize);
                        ra[0] = Vector::<bf16, NA>::reinterpret(lo[2 * s]);
                        ra[1] = Vector::<bf16, NA>::reinterpret(hi[2 * s]);
                        ra[2] = Vector::<bf16, NA>::reinterpret(lo[2 * s + 1]);
                        ra[3] = Vector::<bf16, NA>::reinterpret(hi[2 * s + 1]);
                        #[unroll]
                        for n in 0..2usize {
                            let word = words[b * 4 + n * 2 + s / 2];
                            let scale = scales[b * 2 + n];
                            let mut rb = Array::<Vector<bf16, NB>>::new(2usize);
                            rb[0] =
                                nf4_pair::<NB>(word, comptime!((2 * (s % 2)) as u32), scale, table);
                            rb[1] = nf4_pair::<NB>(
                                word,
                                comptime!((2 * (s % 2) + 1) as u32),
                                scale,
                                table,
                            );
                            def.execute_inplace(&ra, &rb, accs.index_mut(tt * 2 + n));
                        }
                    }
                }
            }
        }
        c += comptime!(BATCH * warps);
    }
    // This warp's partial sums: [warp][tile][half][lane][4] (registers: row g cols 2t, 2t + 1,
    // then row g + 8).
    #[unroll]
    for tt in 0..row_tiles {
        #[unroll]
        for n in 0..2usize {
            let acc = accs.index(tt * 2 + n);
            let at = (((warp * row_tiles + tt) * 2 + n) * 32 + lane) * 4;
            let r0 = acc[0];
            let r1 = acc[1];
            part[at] = r0[0];
            part[at + 1] = r0[1];
            part[at + 2] = r1[0];
            part[at + 3] = r1[1];
        }
    }
}

/// The 256 second-level absmax code values of a member into shared memory.
#[cube]
fn load_code2(code2: &Array<f32>, shared: &mut SharedMemory<f32>) {
    let mut i = UNIT_POS_X as usize;
    while i < 256 {
        shared[i] = code2[i];
        i += CUBE_DIM_X as usize;
    }
}

/// LoRA column `j`: `z[r, j] = sum_k xf[r, k] a[j, k]` for every row. Each unit walks its share
/// of `in` once, reading `a[j, k]` once and the rows' `x[r, k]` together (one accumulator per row
/// of the launch's row tiles: the loads issue together); lanes, then warps, add their sums. (A
/// plane per row walking `in` alone waited for each load in turn: ~75 us for the down
/// projection's 4,864 inputs, which set the launch's time; H200, 2026-12-02.)
#[cube]
#[allow(clippy::too_many_arguments)]
fn lora_column(
    xf: &Array<f32>,
    a: &Array<f32>,
    z: &mut Array<f32>,
    j: usize,
    width: usize,
    rows: usize,
    in_f: usize,
    #[comptime] row_tiles: usize,
    #[comptime] warps: usize,
) {
    let plane = UNIT_POS_X as usize / 32;
    let lane = UNIT_POS_X as usize % 32;
    let max_rows = comptime!(row_tiles * MMA_ROWS);
    let mut acc = Array::<f32>::new(max_rows);
    #[unroll]
    for r in 0..max_rows {
        acc[r] = 0.0f32;
    }
    // Four of the unit's inputs per pass, so that four loads of `a` (from DRAM: the factors are
    // not in L2 between steps) are in flight at once rather than one per pass.
    let stride = comptime!(warps * 32);
    let mut k = UNIT_POS_X as usize;
    while k < in_f {
        let mut av = Array::<f32>::new(4usize);
        #[unroll]
        for u in 0..4usize {
            let ku = k + u * stride;
            av[u] = 0.0f32;
            if ku < in_f {
                av[u] = a[j * in_f + ku];
            }
        }
        #[unroll]
        for u in 0..4usize {
            let ku = k + u * stride;
            #[unroll]
            for r in 0..max_rows {
                if r < rows && ku < in_f {
                    acc[r] += xf[r * in_f + ku] * av[u];
                }
            }
        }
        k += comptime!(4 * warps * 32);
    }
    let mut part = SharedMemory::<f32>::new(comptime!(warps * row_tiles * MMA_ROWS));
    #[unroll]
    for r in 0..max_rows {
        let s = plane_sum(acc[r]);
        if lane == 0 {
            part[plane * max_rows + r] = s;
        }
    }
    sync_cube();
    let mut r = UNIT_POS_X as usize;
    while r < rows {
        let mut total = 0.0f32;
        #[unroll]
        for p in 0..warps {
            total += part[p * max_rows + r];
        }
        z[r * width + j] = total;
        r += comptime!(warps * 32);
    }
}

/// `y[r, o] = sum_k x[r, k] W[o, k] (+ res[r, o])` for `rows` rows and a group of up to three
/// NF4 weights side by side in `o` (member `m` has `outs_m` outputs, a multiple of 16; a member
/// with none is never read), all with `in_f` inputs (a multiple of 64). `xb` is the input in
/// bf16, `[row_tiles * 16, in_f]`, read as vectors of 8 values (rows past `rows` are read and
/// their results dropped). Cubes past the `sum outs / 16` tile cubes each take one LoRA column
/// `j < width`: `z[r, j] = sum_k xf[r, k] a[j, k]` in f32 from the f32 input `xf`. Launch with
/// `CubeDim 32 * warps`, `sum outs / 16 + width` cubes.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn nf4_mma_group<NX: Size>(
    xb: &Array<Vector<u32, NX>>,
    xf: &Array<f32>,
    packed0: &Array<u32>,
    codes0: &Array<u32>,
    nested0: &Array<f32>,
    code20: &Array<f32>,
    offset0: f32,
    outs0: usize,
    packed1: &Array<u32>,
    codes1: &Array<u32>,
    nested1: &Array<f32>,
    code21: &Array<f32>,
    offset1: f32,
    outs1: usize,
    packed2: &Array<u32>,
    codes2: &Array<u32>,
    nested2: &Array<f32>,
    code22: &Array<f32>,
    offset2: f32,
    outs2: usize,
    nf4: &Array<f32>,
    res: &Array<f32>,
    out: &mut Array<f32>,
    a: &Array<f32>,
    z: &mut Array<f32>,
    width: usize,
    rows: usize,
    in_f: usize,
    #[comptime] row_tiles: usize,
    #[comptime] warps: usize,
    #[comptime] residual: bool,
) {
    let outs = outs0 + outs1 + outs2;
    let tiles = outs / MMA_COLS;
    let cube = CUBE_POS_X as usize;
    if cube >= tiles {
        lora_column(xf, a, z, cube - tiles, width, rows, in_f, row_tiles, warps);
        terminate!();
    }
    let n0 = cube * MMA_COLS;
    let mut code2 = SharedMemory::<f32>::new(256usize);
    let mut part = SharedMemory::<f32>::new(comptime!(warps * row_tiles * 256));
    // A cube's 16 columns belong to one member (each has a multiple of 16 outputs).
    if n0 < outs0 {
        load_code2(code20, &mut code2);
    } else if n0 < outs0 + outs1 {
        load_code2(code21, &mut code2);
    } else {
        load_code2(code22, &mut code2);
    }
    let table = nf4_table(nf4);
    if n0 < outs0 {
        warp_columns::<NX>(
            xb, packed0, codes0, nested0, &code2, offset0, n0, in_f, &table, &mut part, row_tiles,
            warps,
        );
    } else if n0 < outs0 + outs1 {
        warp_columns::<NX>(
            xb,
            packed1,
            codes1,
            nested1,
            &code2,
            offset1,
            n0 - outs0,
            in_f,
            &table,
            &mut part,
            row_tiles,
            warps,
        );
    } else {
        warp_columns::<NX>(
            xb,
            packed2,
            codes2,
            nested2,
            &code2,
            offset2,
            n0 - outs0 - outs1,
            in_f,
            &table,
            &mut part,
            row_tiles,
            warps,
        );
    }
    sync_cube();
    // The cube adds the warps' parts: output (r, n0 + cc) of row tile tt sits with lane
    // 4 (r % 8) + (cc % 8) / 2 of half cc / 8, register 2 ((r % 16) / 8) + cc % 2.
    let mut i = UNIT_POS_X as usize;
    while i < comptime!(row_tiles * 256) {
        let tt = i / 256;
        let e = i % 256;
        let r = tt * 16 + e / 16;
        let cc = e % 16;
        if r < rows {
            let lane = (e / 16 % 8) * 4 + (cc % 8) / 2;
            let reg = (e / 16 / 8) * 2 + cc % 2;
            let mut v = 0.0f32;
            #[unroll]
            for w in 0..warps {
                v += part[(((w * row_tiles + tt) * 2 + cc / 8) * 32 + lane) * 4 + reg];
            }
            let o = r * outs + n0 + cc;
            if residual {
                v += res[o];
            }
            out[o] = v;
        }
        i += comptime!(warps * 32);
    }
}

/// Whether [`group_into`] covers a group: at most three NF4 members with the same `in` (a
/// multiple of 64: whole absmax blocks per row), each with a multiple of 16 outputs, and at most
/// 64 rows.
pub fn covers(lins: &[&GpuLinear], rows: usize) -> bool {
    let in_f = lins.first().map(|l| l.in_features()).unwrap_or(0);
    !lins.is_empty()
        && lins.len() <= 3
        && rows > 0
        && rows <= MMA_ROWS * MMA_MAX_ROW_TILES
        && in_f.is_multiple_of(MMA_CHUNK)
        && lins.iter().all(|l| {
            l.nf4_args().is_some()
                && l.in_features() == in_f
                && l.out_features().is_multiple_of(MMA_COLS)
        })
}

/// The LoRA down-projection a launch of [`group_into`] also computes: `z [rows, width] = xf
/// A^T` with A `[width, in]`.
pub struct LoraDown<'a> {
    pub a: &'a Handle,
    pub z: &'a Handle,
    pub width: usize,
}

/// `out [rows, sum outs] = xb W^T (+ res)` and, with `lora`, its `z`, in one launch of
/// [`nf4_mma_group`]. `xb` holds the input as bf16 for `rows` rounded up to 16 rows (`[tiles *
/// 16, in]`, the padding rows any finite values), `xf` the same input in f32 (`[rows, in]`, read
/// by the LoRA cubes only). The caller checked [`covers`].
#[allow(clippy::too_many_arguments)]
pub fn group_into(
    lins: &[&GpuLinear],
    rows: usize,
    xb: &Handle,
    xf: &Handle,
    res: Option<&Handle>,
    out: &Handle,
    lora: Option<LoraDown>,
) {
    let in_f = lins[0].in_features();
    let outs: usize = lins.iter().map(|l| l.out_features()).sum();
    let tiles = rows.div_ceil(MMA_ROWS);
    let warps = warps_for(tiles, in_f / MMA_CHUNK);
    // Each member's arrays and outputs (0 for an absent member: never read).
    let member = |i: usize| -> (&Nf4Args, usize) {
        let (args, present) = GpuLinear::group_member(lins, i);
        (args, if present { lins[i].out_features() } else { 0 })
    };
    let (m0, o0) = member(0);
    let (m1, o1) = member(1);
    let (m2, o2) = member(2);
    let width = lora.as_ref().map(|l| l.width).unwrap_or(0);
    // SAFETY: each member's arrays have the lengths recorded at upload; xb holds tiles * 16 * in
    // bf16, xf rows * in f32, res and out rows * outs f32, a width * in, z rows * width (the
    // caller's buffers); placeholders (res without a residual, a and z without LoRA) are never
    // read or written.
    unsafe {
        let arg = |h: &Handle, len: usize| ArrayArg::from_raw_parts(h.clone(), len);
        let (a, z) = match &lora {
            Some(l) => (arg(l.a, width * in_f), arg(l.z, rows * width)),
            None => (arg(out, 1), arg(out, 1)),
        };
        nf4_mma_group::launch_unchecked::<CudaRuntime>(
            &lins[0].client(),
            CubeCount::Static((outs / MMA_COLS + width) as u32, 1, 1),
            CubeDim::new_1d((warps * 32) as u32),
            4,
            arg(xb, tiles * MMA_ROWS * in_f / 8),
            arg(xf, rows * in_f),
            arg(&m0.packed, m0.words.max(1)),
            arg(&m0.codes, m0.code_words),
            arg(&m0.nested, m0.nested_len),
            arg(&m0.code2, 256),
            m0.offset,
            o0,
            arg(&m1.packed, m1.words.max(1)),
            arg(&m1.codes, m1.code_words),
            arg(&m1.nested, m1.nested_len),
            arg(&m1.code2, 256),
            m1.offset,
            o1,
            arg(&m2.packed, m2.words.max(1)),
            arg(&m2.codes, m2.code_words),
            arg(&m2.nested, m2.nested_len),
            arg(&m2.code2, 256),
            m2.offset,
            o2,
            arg(&m0.nf4, 16),
            arg(res.unwrap_or(out), rows * outs),
            arg(out, rows * outs),
            a,
            z,
            width,
            rows,
            in_f,
            tiles,
            warps,
            res.is_some(),
        )
    };
}
