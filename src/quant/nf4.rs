//! NF4 weights with double quantization, stored exactly as bitsandbytes 0.50.2 stores them
//! (`quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)`).
//!
//! Layout (what a bitsandbytes checkpoint holds for one weight):
//! - `packed`: the tensor flattened row-major, one 4-bit index into [`NF4_CODE`] per value, two
//!   per byte with the FIRST value in the HIGH nibble; an odd count is padded with the index of
//!   a zero value.
//! - `absmax_codes`: per block of [`BLOCK_SIZE`] values, its absmax (max |x|) minus `offset`,
//!   quantized to one byte of the signed dynamic map ([`dynamic_map_signed`]).
//! - `nested_absmax`: one f32 scale per [`NESTED_BLOCK_SIZE`] absmax codes.
//! - `offset`: the f32 mean of all block absmax values.
//!
//! Dequantization is `NF4_CODE[idx] * (dyn[code] * nested_absmax + offset)`, with the f32
//! operations in the order bitsandbytes' CUDA kernels use, flush-to-zero included (the library
//! is built with `--use_fast_math`), so the result is bit-identical to `dequantize_4bit`.
//!
//! Quantization follows the same kernels (absmax, reciprocal scale, the NF4 threshold tree with
//! its strict `>`, the dynamic map's binary search with its midpoint rounding) and computes
//! `offset` with PyTorch's CUDA summation order, so the whole state matches bitsandbytes byte
//! for byte (also checked by hand on two 4096 x 4096 weights, f32 and bf16). One GPU rounding
//! is not reproducible on a CPU: the kernels take `1/absmax` with the GPU's approximate
//! reciprocal (one unit in the last place off the exact one for about 13% of inputs on an
//! H100), so a value lying within one f32 step of a decision threshold could land on the
//! neighbouring code; none did in those 33.5M values.

use anyhow::{bail, ensure, Context, Result};
use std::sync::OnceLock;

/// Values per NF4 block (one absmax each).
pub const BLOCK_SIZE: usize = 64;
/// Absmax codes per nested block (one f32 scale each).
pub const NESTED_BLOCK_SIZE: usize = 256;

/// The 16 NF4 values (bitsandbytes `get_4bit_type("nf4")`, quantiles of N(0, 1) scaled to
/// [-1, 1]); index `i` is what a 4-bit code `i` stands for. Digits as in bitsandbytes' source.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// Decision thresholds of bitsandbytes' `dQuantizeNF4` (the midpoints of neighbouring NF4
/// values, as the kernel's f32 literals). A normalized value `x` gets the index
/// `#{t : x > t}`: that is exactly what the kernel's comparison tree returns, ties going down
/// and NaN (an all-zero block, `0 * 1/0`) giving index 0.
#[allow(clippy::excessive_precision)]
const NF4_THRESHOLDS: [f32; 15] = [
    -0.848_096_400_499_343_9,
    -0.610_632_926_225_662_2,
    -0.459_995_269_775_390_6,
    -0.339_679_434_895_515_44,
    -0.234_607_405_960_559_84,
    -0.137_911_733_239_889_14,
    -0.045_525_018_125_772_476,
    0.039_790_149_778_127_67,
    0.120_255_250_483_751_3,
    0.203_521_251_678_466_8,
    0.292_013_771_831_989_3,
    0.389_312_535_524_368_3,
    0.501_663_416_624_069_2,
    0.642_786_920_070_648_2,
    0.861_478_418_111_801_1,
];

/// `(NF4_CODE[hi], NF4_CODE[lo])` for every byte: dequantization reads one entry per byte.
const PAIR_TABLE: [[f32; 2]; 256] = {
    let mut t = [[0.0f32; 2]; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = [NF4_CODE[b >> 4], NF4_CODE[b & 15]];
        b += 1;
    }
    t
};

/// Below this magnitude a block's scale may produce subnormal products, which the GPU flushes
/// to zero; such blocks take the slow, exact path.
const TINY_SCALE: f32 = f32::MIN_POSITIVE * 16.0;

/// Elements per thread below which (de)quantization stays on the calling thread.
const MIN_PARALLEL_ELEMS: usize = 1 << 18;

/// Flush a subnormal to (signed) zero, as the GPU does for every operand and result of the
/// kernels' f32 arithmetic under `--use_fast_math`.
#[inline(always)]
fn ftz(x: f32) -> f32 {
    if x != 0.0 && x.abs() < f32::MIN_POSITIVE {
        0.0f32.copysign(x)
    } else {
        x
    }
}

/// `1/x` as the quantize kernels take it (`rcp.approx.ftz`): infinite for a zero (or flushed)
/// absmax, and the exactly rounded reciprocal otherwise (see the module docs for how the GPU's
/// approximation differs).
#[inline]
fn reciprocal(x: f32) -> f32 {
    ftz(1.0 / ftz(x))
}

/// The 4-bit index bitsandbytes' `dQuantizeNF4` gives a normalized value.
#[inline]
pub fn nf4_index(x: f32) -> u8 {
    let mut idx = 0u8;
    for t in NF4_THRESHOLDS {
        idx += u8::from(x > t);
    }
    idx
}

/// `torch.linspace(start, end, steps, dtype=float32)` as PyTorch's CPU kernel computes it: f32
/// step, the first half counted up from `start`, the second half down from `end`. PyTorch's
/// x86 build (AVX2/AVX-512 kernels, compiled with FMA) fuses `start + step * i` into one
/// rounding; the plain product-then-sum differs in 42 of the dynamic map's 256 values.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// bitsandbytes' `create_dynamic_map(signed=True)` (8 bits, 7 exponent bits): the 256 sorted
/// values the absmax codes index, in [-0.993, 1]. Computed here the way PyTorch evaluates the
/// Python (f32 linspace, f32 midpoints, f32 product with the decade), then sorted.
pub fn dynamic_map_signed() -> [f32; 256] {
    // 10 ** (i - 6) as Python floats, cast to f32 when multiplied with an f32 tensor.
    const DECADES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for (i, decade) in DECADES.iter().enumerate() {
        let bounds = linspace_f32(0.1, 1.0, (1 << i) + 1);
        let means: Vec<f32> = bounds.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        let d = *decade as f32;
        data.extend(means.iter().map(|m| d * m));
        data.extend(means.iter().map(|m| -d * m));
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut map = [0.0f32; 256];
    map.copy_from_slice(&data);
    map
}

/// The dynamic map, computed once.
fn dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(dynamic_map_signed)
}

/// The 8-bit code bitsandbytes' `dQuantize<0>` picks for a normalized value: a 7-step binary
/// search over the sorted map, then the nearer of the two neighbours with the kernel's f32
/// midpoint (ties keep the searched pivot).
fn dynamic_code(map: &[f32; 256], x: f32) -> u8 {
    let mut pivot = 127usize;
    let mut upper_pivot = 255usize;
    let mut lower_pivot = 0usize;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = map[pivot];
    let mut step = 64usize;
    while step > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = map[pivot];
        step >>= 1;
    }
    if upper_pivot == 255 {
        upper = map[255];
    }
    if lower_pivot == 0 {
        lower = map[0];
    }
    let code = if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    code as u8
}

/// bitsandbytes' `quantize_blockwise` with the dynamic map (no nesting): per block its absmax
/// (f32) and per value the 8-bit code of `x * (1/absmax)`.
fn quantize_blockwise_dynamic(values: &[f32], block: usize) -> (Vec<u8>, Vec<f32>) {
    let map = dynamic_map();
    let mut codes = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(block));
    for chunk in values.chunks(block) {
        let amax = chunk.iter().fold(0.0f32, |m, &v| m.max(ftz(v).abs()));
        let scale = reciprocal(amax);
        absmax.push(amax);
        codes.extend(
            chunk
                .iter()
                .map(|&v| dynamic_code(map, ftz(ftz(v) * scale))),
        );
    }
    (codes, absmax)
}

/// `torch.mean` of a contiguous f32 CUDA tensor, as PyTorch 2.x computes the `offset`: its
/// reduction kernel's f32 additions in its order (ATen `Reduce.cuh`, one output), then
/// `sum * (1/n)`. Above 130560 values the kernel splits the input over several thread blocks;
/// how many depends on the GPU (`GPU_SMS`) only past about 32768 values per SM (4.3M here),
/// more blocks than a 270M-parameter matrix has.
fn torch_cuda_mean(values: &[f32]) -> f32 {
    /// Most threads per block; elements per vector load (also the running sums per thread).
    const MAX_THREADS: usize = 512;
    const VEC: usize = 4;
    /// An H100/H200: streaming multiprocessors and resident threads per multiprocessor.
    const GPU_SMS: usize = 132;
    const THREADS_PER_SM: usize = 2048;

    let n = values.len();
    // Long inputs are read as 4-wide vectors; the kernel sizes its block from the vector count.
    let vectorized = n >= 128;
    let dim0 = if vectorized { n / VEC } else { n };
    let width = if dim0 < MAX_THREADS {
        1 << dim0.ilog2()
    } else {
        MAX_THREADS
    };
    let per_thread = n.div_ceil(width);
    let blocks = if per_thread >= 256 {
        let by_occupancy = GPU_SMS * (THREADS_PER_SM / width);
        by_occupancy
            .min(per_thread.div_ceil(16))
            .max(per_thread.div_ceil(256))
    } else {
        1
    };
    let stride = width * blocks;

    // What thread `t` of block `b` adds up: four running sums, combined left to right.
    let thread_sum = |b: usize, t: usize| -> f32 {
        let mut acc = [0.0f32; VEC];
        let mut idx = t + b * width;
        if vectorized {
            while idx * VEC + VEC - 1 < n {
                for (a, v) in acc.iter_mut().zip(&values[idx * VEC..idx * VEC + VEC]) {
                    *a += v;
                }
                idx += stride;
            }
            // the last n % 4 values go to the first threads of block 0
            let tail = n - n % VEC + t;
            if b == 0 && tail < n {
                acc[0] += values[tail];
            }
        } else {
            while idx + (VEC - 1) * stride < n {
                for (k, a) in acc.iter_mut().enumerate() {
                    *a += values[idx + k * stride];
                }
                idx += VEC * stride;
            }
            for a in acc.iter_mut() {
                if idx >= n {
                    break;
                }
                *a += values[idx];
                idx += stride;
            }
        }
        ((acc[0] + acc[1]) + acc[2]) + acc[3]
    };
    // Tree over a block's threads (shared memory, then warp shuffles): halves fold onto halves.
    let tree = |mut v: Vec<f32>| -> f32 {
        let mut half = v.len() / 2;
        while half > 0 {
            for t in 0..half {
                v[t] += v[t + half];
            }
            half /= 2;
        }
        v[0]
    };
    let partials: Vec<f32> = (0..blocks)
        .map(|b| tree((0..width).map(|t| thread_sum(b, t)).collect()))
        .collect();
    let sum = if blocks > 1 {
        // the last block to finish: thread t adds partials t, t + width, ..., then the tree
        let mut v = vec![0.0f32; width];
        for (i, p) in partials.iter().enumerate() {
            v[i % width] += p;
        }
        tree(v)
    } else {
        partials[0]
    };
    sum * (1.0 / n as f32)
}

/// Quantizes whole 64-blocks of `values` into `packed` (their bytes) and `absmax` (one each).
fn quantize_nf4_blocks(values: &[f32], packed: &mut [u8], absmax: &mut [f32]) {
    for ((chunk, bytes), amax_out) in values
        .chunks(BLOCK_SIZE)
        .zip(packed.chunks_mut(BLOCK_SIZE / 2))
        .zip(absmax.iter_mut())
    {
        let amax = chunk.iter().fold(0.0f32, |m, &v| m.max(ftz(v).abs()));
        *amax_out = amax;
        let scale = reciprocal(amax);
        let index = |v: f32| nf4_index(ftz(ftz(v) * scale));
        for (pair, byte) in chunk.chunks(2).zip(bytes.iter_mut()) {
            // An odd tail is padded with a zero value, as the kernel loads it.
            let lo = pair.get(1).copied().unwrap_or(0.0);
            *byte = (index(pair[0]) << 4) | index(lo);
        }
    }
}

/// An NF4 tensor with double-quantized absmax, in bitsandbytes' layout (see the module docs).
#[derive(Clone, PartialEq)]
pub struct Nf4Tensor {
    /// Logical shape; values are stored flattened row-major.
    pub shape: Vec<usize>,
    /// `ceil(numel / 2)` bytes, first value of each pair in the high nibble.
    pub packed: Vec<u8>,
    /// One 8-bit dynamic-map code per [`BLOCK_SIZE`] values (bitsandbytes `state.absmax`).
    pub absmax_codes: Vec<u8>,
    /// One f32 scale per [`NESTED_BLOCK_SIZE`] codes (bitsandbytes `state.state2.absmax`).
    pub nested_absmax: Vec<f32>,
    /// Mean of the block absmax values (bitsandbytes `state.offset`).
    pub offset: f32,
}

impl std::fmt::Debug for Nf4Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nf4Tensor")
            .field("shape", &self.shape)
            .field("blocks", &self.absmax_codes.len())
            .field("offset", &self.offset)
            .field("storage_bytes", &self.storage_bytes())
            .finish()
    }
}

impl Nf4Tensor {
    /// Quantizes row-major `values` of `shape` as bitsandbytes does on CUDA (see the module
    /// docs). Non-finite values are refused.
    pub fn quantize(values: &[f32], shape: &[usize]) -> Result<Self> {
        let numel = checked_numel(shape)?;
        ensure!(
            values.len() == numel,
            "NF4 quantize: {} values for shape {shape:?} ({numel} expected)",
            values.len()
        );
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            bail!(
                "NF4 quantize: value {i} of shape {shape:?} is {}, expected a finite number",
                values[i]
            );
        }
        let blocks = numel.div_ceil(BLOCK_SIZE);
        let mut packed = vec![0u8; numel.div_ceil(2)];
        let mut absmax = vec![0.0f32; blocks];

        // Blocks are independent: split them over threads.
        let threads = worker_count(numel);
        let blocks_per = blocks.div_ceil(threads);
        std::thread::scope(|s| {
            let parts = values
                .chunks(blocks_per * BLOCK_SIZE)
                .zip(packed.chunks_mut(blocks_per * BLOCK_SIZE / 2))
                .zip(absmax.chunks_mut(blocks_per));
            for ((v, p), a) in parts {
                s.spawn(move || quantize_nf4_blocks(v, p, a));
            }
        });

        let offset = torch_cuda_mean(&absmax);
        // PyTorch subtracts the offset with ordinary (non flush-to-zero) f32 arithmetic.
        let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let (absmax_codes, nested_absmax) =
            quantize_blockwise_dynamic(&centered, NESTED_BLOCK_SIZE);
        Ok(Self {
            shape: shape.to_vec(),
            packed,
            absmax_codes,
            nested_absmax,
            offset,
        })
    }

    /// Wraps an existing bitsandbytes state (e.g. the tensors of a pre-quantized checkpoint:
    /// `weight`, `absmax`, `nested_absmax`, `nested_offset`), checking the sizes agree.
    pub fn from_parts(
        shape: Vec<usize>,
        packed: Vec<u8>,
        absmax_codes: Vec<u8>,
        nested_absmax: Vec<f32>,
        offset: f32,
    ) -> Result<Self> {
        let numel = checked_numel(&shape)?;
        let blocks = numel.div_ceil(BLOCK_SIZE);
        ensure!(
            packed.len() == numel.div_ceil(2),
            "NF4 state for shape {shape:?}: {} packed bytes, expected {}",
            packed.len(),
            numel.div_ceil(2)
        );
        ensure!(
            absmax_codes.len() == blocks,
            "NF4 state for shape {shape:?}: {} absmax codes, expected {blocks} (blocksize {BLOCK_SIZE})",
            absmax_codes.len()
        );
        ensure!(
            nested_absmax.len() == blocks.div_ceil(NESTED_BLOCK_SIZE),
            "NF4 state for shape {shape:?}: {} nested absmax values, expected {} (nested blocksize {NESTED_BLOCK_SIZE})",
            nested_absmax.len(),
            blocks.div_ceil(NESTED_BLOCK_SIZE)
        );
        Ok(Self {
            shape,
            packed,
            absmax_codes,
            nested_absmax,
            offset,
        })
    }

    /// Number of values.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes at rest: packed indices, absmax codes, nested f32 scales and the f32 offset.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + self.absmax_codes.len() + self.nested_absmax.len() * 4 + 4
    }

    /// The scale of 64-block `block`, as bitsandbytes restores it: the 8-bit code times the
    /// nested absmax (GPU, flush-to-zero), then plus the offset (PyTorch, IEEE).
    #[inline]
    fn block_scale(&self, block: usize) -> f32 {
        let code = dynamic_map()[usize::from(self.absmax_codes[block])];
        let nested = ftz(self.nested_absmax[block / NESTED_BLOCK_SIZE]);
        ftz(code * nested) + self.offset
    }

    /// All values, row-major, bit-identical to bitsandbytes' `dequantize_4bit` (f32 output).
    pub fn dequantize(&self) -> Vec<f32> {
        let numel = self.numel();
        let mut out = vec![0.0f32; numel];
        let threads = worker_count(numel);
        // Whole 64-blocks per thread, so every part starts on a byte.
        let per = numel.div_ceil(BLOCK_SIZE).div_ceil(threads) * BLOCK_SIZE;
        std::thread::scope(|s| {
            for (i, part) in out.chunks_mut(per).enumerate() {
                s.spawn(move || self.dequantize_span(i * per, part));
            }
        });
        out
    }

    /// The weight seen as 2-D `[rows, cols]` (a linear layer's `[out, in]`), dequantized into
    /// its transpose `[cols, rows]`, row-major: the right-hand operand of `x W^T` as CPU
    /// matmuls want it, so no transposed copy is made per product. Same values as
    /// [`Self::dequantize`].
    pub fn dequantize_transposed(&self) -> Vec<f32> {
        let cols = *self.shape.last().expect("checked at construction");
        let rows = self.numel() / cols;
        let mut out = vec![0.0f32; rows * cols];
        // Each thread owns a band of output rows (input columns), walking the input rows in
        // tiles small enough to stay in cache.
        let band = cols.div_ceil(worker_count(self.numel()));
        const TILE: usize = 32;
        std::thread::scope(|s| {
            for (i, part) in out.chunks_mut(band * rows).enumerate() {
                let c0 = i * band;
                let w = part.len() / rows;
                s.spawn(move || {
                    let mut tile = vec![0.0f32; TILE * w];
                    for r0 in (0..rows).step_by(TILE) {
                        let n = TILE.min(rows - r0);
                        for r in 0..n {
                            let dst = &mut tile[r * w..(r + 1) * w];
                            self.dequantize_span((r0 + r) * cols + c0, dst);
                        }
                        for c in 0..w {
                            let dst = &mut part[c * rows + r0..c * rows + r0 + n];
                            for (r, d) in dst.iter_mut().enumerate() {
                                *d = tile[r * w + c];
                            }
                        }
                    }
                });
            }
        });
        out
    }

    /// Rows `row_start .. row_start + rows` of the weight seen as 2-D `[rows, last dim]` (for a
    /// linear layer's `[out, in]`), written into `out` (`rows * in` values).
    pub fn dequantize_rows_into(
        &self,
        row_start: usize,
        rows: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let cols = *self
            .shape
            .last()
            .context("NF4 dequantize_rows_into: tensor has no dimensions")?;
        let total_rows = self.numel() / cols.max(1);
        ensure!(
            row_start.checked_add(rows).is_some_and(|end| end <= total_rows),
            "NF4 dequantize_rows_into: rows {row_start}..{} out of range for shape {:?} ({total_rows} rows)",
            row_start.saturating_add(rows),
            self.shape
        );
        ensure!(
            out.len() == rows * cols,
            "NF4 dequantize_rows_into: output holds {} values, expected {rows} x {cols}",
            out.len()
        );
        self.dequantize_span(row_start * cols, out);
        Ok(())
    }

    /// Dequantizes values `start .. start + out.len()` into `out` (any alignment).
    fn dequantize_span(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        let mut pos = start;
        let mut o = 0;
        while pos < end {
            let block = pos / BLOCK_SIZE;
            let block_end = ((block + 1) * BLOCK_SIZE).min(end);
            let scale = self.block_scale(block);
            let dst = &mut out[o..o + (block_end - pos)];
            if scale.abs() < TINY_SCALE {
                self.dequantize_tiny(pos, ftz(scale), dst);
            } else {
                self.dequantize_fast(pos, scale, dst);
            }
            o += block_end - pos;
            pos = block_end;
        }
    }

    /// One block's values from `pos`: a table lookup per byte and two multiplies.
    #[inline]
    fn dequantize_fast(&self, mut pos: usize, scale: f32, dst: &mut [f32]) {
        let mut dst = dst;
        if pos % 2 == 1 {
            dst[0] = NF4_CODE[usize::from(self.packed[pos / 2] & 15)] * scale;
            dst = &mut dst[1..];
            pos += 1;
        }
        let pairs = dst.len() / 2;
        let bytes = &self.packed[pos / 2..pos / 2 + pairs];
        let (body, tail) = dst.split_at_mut(pairs * 2);
        for (&b, d) in bytes.iter().zip(body.chunks_exact_mut(2)) {
            let [hi, lo] = PAIR_TABLE[usize::from(b)];
            d[0] = hi * scale;
            d[1] = lo * scale;
        }
        if let Some(last) = tail.first_mut() {
            *last = NF4_CODE[usize::from(self.packed[pos / 2 + pairs] >> 4)] * scale;
        }
    }

    /// The same for a block whose products may be subnormal: flushed to zero like the GPU.
    fn dequantize_tiny(&self, pos: usize, scale: f32, dst: &mut [f32]) {
        for (k, d) in dst.iter_mut().enumerate() {
            let i = pos + k;
            let byte = self.packed[i / 2];
            let idx = if i.is_multiple_of(2) {
                byte >> 4
            } else {
                byte & 15
            };
            *d = ftz(NF4_CODE[usize::from(idx)] * scale);
        }
    }
}

/// Product of `shape`, refusing empty tensors and overflow.
fn checked_numel(shape: &[usize]) -> Result<usize> {
    ensure!(
        !shape.is_empty(),
        "NF4: shape is empty, expected at least one dimension"
    );
    let numel = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .with_context(|| format!("NF4: shape {shape:?} overflows usize"))?;
    ensure!(numel > 0, "NF4: shape {shape:?} has no elements");
    Ok(numel)
}

/// Threads to use for `numel` values: one per core, none below [`MIN_PARALLEL_ELEMS`] each.
fn worker_count(numel: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.min(numel / MIN_PARALLEL_ELEMS).max(1)
}

#[cfg(test)]
mod tests;
