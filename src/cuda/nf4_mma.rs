//! The decode's projections read straight from NF4 with tensor cores: one launch per group of
//! modules that share an input (q/k/v, o, gate/up, down) computes `y = x W^T (+ residual)` for
//! up to 64 rows and, on extra cubes, the group's LoRA down-projection `z = x A^T`.
//!
//! Dequantizing a group into a bf16 workspace and multiplying it with cuBLAS writes and reads 16
//! bits per weight besides reading the 4 (4.5 bytes per weight moved instead of 0.5), and the
//! LoRA down-projection was a launch of its own. Here a cube owns 16 output columns; its planes
//! split `in` into 64-value chunks (one absmax block of each column), dequantize a chunk into
//! shared memory and feed it to 16x16x16 bf16 MMAs against the bf16 input rows (which stay in
//! L2), then sum their accumulators: every 4-bit weight is read once, and no two cubes write the
//! same value (no atomics, no second pass). At a few rows the step is latency-bound, so each
//! plane loads its next chunk's words and scales before working on the current one, and a cube
//! has up to 12 planes (a first version with 4 planes walking up to 19 chunks each in turn took
//! ~35 us per launch, BENCHMARKS.md session 9). It is still latency-bound: Nsight Compute
//! timed the gate/up group (4.6 MB) at 29 us, 159 GB/s, with ~3 cubes of 384 units resident per
//! SM; deeper prefetch (the absmax code, then its scale, then the input tile are dependent loads
//! after the word) and more resident cubes are the next steps. The NF4 GEMV on CUDA cores
//! (`kernels::nf4_gemv_fused`) read the same 4 bits but spent 16 multiply-adds per weight for 16
//! rows, which the tensor cores do in one instruction per 4,096.

use super::kernels::{block_scale, nf4_table};
use super::qlinear::{GpuLinear, Nf4Args};
use cubecl::cuda::CudaRuntime;
use cubecl::prelude::*;
use cubecl::server::Handle;
use half::bf16;

/// Output columns one cube owns (one MMA tile wide).
pub const MMA_COLS: usize = 16;
/// Input values per dequantized chunk: one absmax block of each of the 16 columns.
pub const MMA_CHUNK: usize = 64;
/// Rows of one MMA tile; a launch covers up to four tiles (64 rows).
pub const MMA_ROWS: usize = 16;
/// The most row tiles one launch covers.
pub const MMA_MAX_ROW_TILES: usize = 4;
/// Planes x row tiles per cube at most: the planes' chunk tiles and accumulators share the
/// 48 KiB of static shared memory.
const PLANE_TILES: usize = 12;
/// Row pitch (bf16 values) of a plane's dequantized `[16 columns, 64]` chunk in shared memory;
/// 8 values of padding put the 16 columns of an MMA load in different banks.
const PITCH: usize = MMA_CHUNK + 8;

/// The planes of a cube for `row_tiles` row tiles and `chunks` chunks of `in`.
fn planes_for(row_tiles: usize, chunks: usize) -> usize {
    (PLANE_TILES / row_tiles).min(chunks).max(1)
}

/// Word `wk` of columns `col, col + 4, col + 8, col + 12` (member-local rows of W, `wpr` words
/// each) and their blocks' scales, into `words` and `scales`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn fetch_into(
    words: &mut Array<u32>,
    scales: &mut Array<f32>,
    col: usize,
    wk: usize,
    wpr: usize,
    packed: &Array<u32>,
    codes: &Array<u32>,
    nested: &Array<f32>,
    code2: &Array<f32>,
    offset: f32,
) {
    #[unroll]
    for i in 0..4usize {
        let w = (col + 4 * i) * wpr + wk;
        words[i] = packed[w];
        scales[i] = block_scale(w, codes, nested, code2, offset);
    }
}

/// The 8 values of a packed word times its scale, as bf16 into `tile[at..at + 8]`.
#[cube]
fn unpack_into(
    word: u32,
    scale: f32,
    table: &SharedMemory<f32>,
    tile: &mut SharedMemory<bf16>,
    at: usize,
) {
    // Byte j of the word holds values 2j (high nibble) and 2j + 1 (low nibble).
    #[unroll]
    for j in 0..4u32 {
        let hi = (word >> (j * 8 + 4)) & 0xF;
        let lo = (word >> (j * 8)) & 0xF;
        tile[at + (2 * j) as usize] = bf16::cast_from(table[hi as usize] * scale);
        tile[at + (2 * j + 1) as usize] = bf16::cast_from(table[lo as usize] * scale);
    }
}

/// One plane's share of a cube's 16 columns `col0..col0 + 16` (member-local rows of W): the
/// chunks `plane, plane + planes, ...` of `in`, accumulated into `accs` (one per row tile).
/// Lane l handles word l % 8 of the chunk in columns l / 8, + 4, + 8, + 12 (the eight lanes of
/// a column read its 32 contiguous bytes); the next chunk's words and scales are loaded before
/// the current one is unpacked and multiplied.
#[cube]
#[allow(clippy::too_many_arguments)]
fn plane_columns(
    xb: &Array<bf16>,
    packed: &Array<u32>,
    codes: &Array<u32>,
    nested: &Array<f32>,
    code2: &Array<f32>,
    offset: f32,
    col0: usize,
    in_f: usize,
    table: &SharedMemory<f32>,
    tile: &mut SharedMemory<bf16>,
    accs: &Sequence<cmma::Matrix<f32>>,
    #[comptime] row_tiles: usize,
    #[comptime] planes: usize,
) {
    let plane = UNIT_POS_X as usize / 32;
    let lane = UNIT_POS_X as usize % 32;
    let base = plane * comptime!(MMA_COLS * PITCH);
    let wpr = in_f / 8;
    let chunks = in_f / MMA_CHUNK;
    let j = lane % 8;
    let c4 = lane / 8;
    let lhs = unsafe {
        cmma::Matrix::<bf16>::uninitialized(
            cmma::MatrixIdent::A,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::RowMajor,
        )
    };
    let rhs = unsafe {
        cmma::Matrix::<bf16>::uninitialized(
            cmma::MatrixIdent::B,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::ColMajor,
        )
    };
    // This chunk's four words and scales (one per column this lane serves) and the next one's.
    let mut words = Array::<u32>::new(4usize);
    let mut scales = Array::<f32>::new(4usize);
    let mut c = plane;
    if c < chunks {
        fetch_into(
            &mut words,
            &mut scales,
            col0 + c4,
            c * 8 + j,
            wpr,
            packed,
            codes,
            nested,
            code2,
            offset,
        );
    }
    while c < chunks {
        let mut cur_w = Array::<u32>::new(4usize);
        let mut cur_s = Array::<f32>::new(4usize);
        #[unroll]
        for i in 0..4usize {
            cur_w[i] = words[i];
            cur_s[i] = scales[i];
        }
        let next = c + planes;
        if next < chunks {
            fetch_into(
                &mut words,
                &mut scales,
                col0 + c4,
                next * 8 + j,
                wpr,
                packed,
                codes,
                nested,
                code2,
                offset,
            );
        }
        let at = base + c4 * PITCH + j * 8;
        #[unroll]
        for i in 0..4usize {
            unpack_into(cur_w[i], cur_s[i], table, tile, at + i * 4 * PITCH);
        }
        sync_plane();
        let k0 = c * MMA_CHUNK;
        #[unroll]
        for s in 0..4usize {
            let b_at = base + s * 16;
            cmma::load(
                &rhs,
                &tile.slice(b_at, b_at + comptime!(MMA_COLS * PITCH)),
                PITCH as u32,
            );
            #[unroll]
            for t in 0..row_tiles {
                let a_at = t * 16 * in_f + k0 + s * 16;
                cmma::load(&lhs, &xb.slice(a_at, a_at + 15 * in_f + 16), in_f as u32);
                let acc = accs.index(t);
                cmma::execute::<bf16, bf16, f32, f32>(&lhs, &rhs, acc, acc);
            }
        }
        // The next chunk overwrites this plane's tile.
        sync_plane();
        c = next;
    }
}

/// LoRA column `j`: `z[r, j] = sum_k xf[r, k] a[j, k]` for every row. Each unit walks its share
/// of `in` once, reading `a[j, k]` once and the rows' `x[r, k]` together (one accumulator per row
/// of the launch's row tiles: the loads issue together); lanes, then planes, add their sums. (A
/// plane per row walking `in` alone waited for each load in turn: ~75 us for the down
/// projection's 4,864 inputs, which set the launch's time, session 9.)
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
    #[comptime] planes: usize,
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
    let stride = comptime!(planes * 32);
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
        k += comptime!(4 * planes * 32);
    }
    let mut part = SharedMemory::<f32>::new(comptime!(planes * row_tiles * MMA_ROWS));
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
        for p in 0..planes {
            total += part[p * max_rows + r];
        }
        z[r * width + j] = total;
        r += comptime!(planes * 32);
    }
}

/// `y[r, o] = sum_k x[r, k] W[o, k] (+ res[r, o])` for `rows` rows and a group of up to three
/// NF4 weights side by side in `o` (member `m` has `outs_m` outputs, a multiple of 16; a member
/// with none is never read), all with `in_f` inputs (a multiple of 64). `xb` is the input in
/// bf16, `[row_tiles * 16, in_f]` (rows past `rows` are read and their results dropped). Cubes
/// past the `sum outs / 16` tile cubes each take one LoRA column `j < width`: `z[r, j] = sum_k
/// xf[r, k] a[j, k]` in f32 from the f32 input `xf`. Launch with `CubeDim 32 * planes`,
/// `sum outs / 16 + width` cubes.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn nf4_mma_group(
    xb: &Array<bf16>,
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
    #[comptime] planes: usize,
    #[comptime] residual: bool,
) {
    let outs = outs0 + outs1 + outs2;
    let tiles = outs / MMA_COLS;
    let cube = CUBE_POS_X as usize;
    if cube >= tiles {
        lora_column(xf, a, z, cube - tiles, width, rows, in_f, row_tiles, planes);
        terminate!();
    }
    let table = nf4_table(nf4);
    let n0 = cube * MMA_COLS;
    let mut tile = SharedMemory::<bf16>::new(comptime!(planes * MMA_COLS * PITCH));
    let mut accs = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..row_tiles {
        accs.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::Undefined,
            0.0,
        ));
    }
    // A cube's 16 columns belong to one member (each has a multiple of 16 outputs).
    if n0 < outs0 {
        plane_columns(
            xb, packed0, codes0, nested0, code20, offset0, n0, in_f, &table, &mut tile, &accs,
            row_tiles, planes,
        );
    } else if n0 < outs0 + outs1 {
        plane_columns(
            xb,
            packed1,
            codes1,
            nested1,
            code21,
            offset1,
            n0 - outs0,
            in_f,
            &table,
            &mut tile,
            &accs,
            row_tiles,
            planes,
        );
    } else {
        plane_columns(
            xb,
            packed2,
            codes2,
            nested2,
            code22,
            offset2,
            n0 - outs0 - outs1,
            in_f,
            &table,
            &mut tile,
            &accs,
            row_tiles,
            planes,
        );
    }

    // Each plane's partial sums to shared memory, then the cube adds the planes' parts.
    let unit = UNIT_POS_X as usize;
    let plane = unit / 32;
    let mut part = SharedMemory::<f32>::new(comptime!(planes * row_tiles * 256));
    #[unroll]
    for t in 0..row_tiles {
        let at = (plane * row_tiles + t) * 256;
        cmma::store(
            &mut part.slice_mut(at, at + 256),
            accs.index(t),
            16,
            cmma::MatrixLayout::RowMajor,
        );
    }
    sync_cube();
    let mut i = unit;
    while i < comptime!(row_tiles * 256) {
        let t = i / 256;
        let e = i % 256;
        let r = t * 16 + e / 16;
        if r < rows {
            let mut v = 0.0f32;
            #[unroll]
            for p in 0..planes {
                v += part[(p * row_tiles + t) * 256 + e];
            }
            let o = r * outs + n0 + e % 16;
            if residual {
                v += res[o];
            }
            out[o] = v;
        }
        i += comptime!(planes * 32);
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
    let planes = planes_for(tiles, in_f / MMA_CHUNK);
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
            CubeDim::new_1d((planes * 32) as u32),
            arg(xb, tiles * MMA_ROWS * in_f),
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
            planes,
            res.is_some(),
        )
    };
}
