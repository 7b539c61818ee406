use super::*;

/// Deterministic standard-normal samples (SplitMix64 + Box-Muller); no extra crates.
fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (next(), next());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect()
}

#[test]
fn thresholds_are_midpoints_of_the_codebook() {
    for (k, t) in NF4_THRESHOLDS.iter().enumerate() {
        let mid = (NF4_CODE[k] + NF4_CODE[k + 1]) / 2.0;
        assert!(
            (t - mid).abs() < 1e-6,
            "threshold {k}: {t} vs midpoint {mid}"
        );
    }
    // Each codebook value maps to itself, ties go to the lower index.
    for (k, c) in NF4_CODE.iter().enumerate() {
        assert_eq!(usize::from(nf4_index(*c)), k);
    }
    for (k, t) in NF4_THRESHOLDS.iter().enumerate() {
        assert_eq!(usize::from(nf4_index(*t)), k, "tie at threshold {k}");
        assert_eq!(usize::from(nf4_index(t.next_up())), k + 1);
    }
    assert_eq!(nf4_index(f32::NAN), 0);
}

#[test]
fn dynamic_map_shape() {
    let m = dynamic_map_signed();
    assert!(m.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
    assert_eq!(m[127], 0.0);
    assert_eq!(m[255], 1.0);
    assert!((m[0] + 0.992_968_75).abs() < 1e-6, "most negative {}", m[0]);
    assert_eq!(m.iter().filter(|v| **v < 0.0).count(), 127);
    // Each value is its own code, whatever the search path.
    for (k, v) in m.iter().enumerate() {
        assert_eq!(usize::from(dynamic_code(&m, *v)), k);
    }
}

#[test]
fn packing_order_high_nibble_first() {
    let mut v = vec![0.0f32; 64];
    v[0] = 2.0; // absmax -> index 15
    v[1] = -2.0; // -> index 0
    v[2] = 0.0; // -> index 7
    v[3] = 1.0; // 0.5 -> index 12
    let q = Nf4Tensor::quantize(&v, &[64]).unwrap();
    assert_eq!(q.packed.len(), 32);
    assert_eq!(q.packed[0], 0xF0);
    assert_eq!(q.packed[1], 0x7C);
    assert!(q.packed[2..].iter().all(|&b| b == 0x77));
}

#[test]
fn odd_lengths_pad_the_low_nibble() {
    for n in [1usize, 63, 65, 129, 333] {
        let v: Vec<f32> = randn(n, n as u64).iter().map(|x| x + 0.01).collect();
        let q = Nf4Tensor::quantize(&v, &[n]).unwrap();
        assert_eq!(q.packed.len(), n.div_ceil(2));
        assert_eq!(q.absmax_codes.len(), n.div_ceil(64));
        if n % 2 == 1 {
            // the kernel pads with 0.0, whose index is 7
            assert_eq!(q.packed.last().unwrap() & 15, 7, "n = {n}");
        }
        let d = q.dequantize();
        assert_eq!(d.len(), n);
        let mut rows = vec![0.0f32; n];
        q.dequantize_rows_into(0, 1, &mut rows).unwrap();
        assert_eq!(rows, d);
    }
}

#[test]
fn round_trip_error_is_bounded() {
    let (rows, cols) = (96, 200);
    let mut v = randn(rows * cols, 7);
    v[1234] = 40.0; // an outlier block
    let q = Nf4Tensor::quantize(&v, &[rows, cols]).unwrap();
    let d = q.dequantize();
    for (b, (x, y)) in v.chunks(64).zip(d.chunks(64)).enumerate() {
        let amax = x.iter().fold(0.0f32, |m, a| m.max(a.abs()));
        let scale = q.block_scale(b);
        // 8-bit absmax: at most half a step of the dynamic map's top decade (0.9 / 64 / 2)
        let nested = q.nested_absmax[b / NESTED_BLOCK_SIZE];
        let scale_err = (scale - amax).abs();
        assert!(
            scale_err <= nested * 0.00704,
            "block {b}: scale {scale} vs {amax}"
        );
        for (a, r) in x.iter().zip(y) {
            // half the widest NF4 gap (-1.0 .. -0.6962) at the true absmax, plus the scale error
            let bound = 0.15191 * amax + scale_err + 1e-6;
            assert!(
                (a - r).abs() <= bound,
                "block {b}: {a} -> {r}, bound {bound}"
            );
        }
    }
}

#[test]
fn error_statistics_match_bitsandbytes_tests() {
    // bitsandbytes' test_4bit_compressed_stats: 1024 x 1024 N(0, 1), nested statistics,
    // mean |error| < 0.11 and mean relative error < 0.28; its single-quantization
    // reference for NF4/64 is 0.0728.
    let v = randn(1024 * 1024, 13);
    let q = Nf4Tensor::quantize(&v, &[1024, 1024]).unwrap();
    let d = q.dequantize();
    let n = v.len() as f64;
    let err: f64 = v
        .iter()
        .zip(&d)
        .map(|(a, b)| f64::from((a - b).abs()))
        .sum::<f64>()
        / n;
    let rel: f64 = v
        .iter()
        .zip(&d)
        .map(|(a, b)| f64::from((a - b).abs()) / (f64::from(a.abs()) + 1e-15))
        .sum::<f64>()
        / n;
    assert!(err > 0.07 && err < 0.0745, "mean |error| {err}");
    assert!(rel < 0.28, "mean relative error {rel}");
}

#[test]
fn bits_per_param_4096_square() {
    let n = 4096 * 4096;
    let v = randn(n, 11);
    let q = Nf4Tensor::quantize(&v, &[4096, 4096]).unwrap();
    assert_eq!(q.packed.len(), n / 2);
    assert_eq!(q.absmax_codes.len(), n / 64);
    assert_eq!(q.nested_absmax.len(), n / 64 / 256);
    let bits = q.storage_bytes() as f64 * 8.0 / q.numel() as f64;
    assert!((bits - 4.127).abs() < 0.001, "{bits} bits/param");
    // the threaded dequantization agrees with the per-row path
    let d = q.dequantize();
    let mut rows = vec![0.0f32; 3 * 4096];
    q.dequantize_rows_into(2000, 3, &mut rows).unwrap();
    assert_eq!(&d[2000 * 4096..2003 * 4096], &rows[..]);
}

#[test]
fn zero_blocks_follow_the_kernel() {
    // An all-zero block has absmax 0; the kernel quantizes 0 * (1/0) = NaN to index 0.
    let mut v = randn(192, 3);
    v[64..128].iter_mut().for_each(|x| *x = 0.0);
    let q = Nf4Tensor::quantize(&v, &[3, 64]).unwrap();
    assert!(q.packed[32..64].iter().all(|&b| b == 0x00));
    let d = q.dequantize();
    // restored absmax is only approximately 0, so the block comes back near zero
    let s = q.block_scale(1);
    assert!(s.abs() < 0.02, "scale {s}");
    assert!(d[64..128].iter().all(|x| *x == -s));
    // An all-zero tensor comes back as (negative) zeros.
    let z = Nf4Tensor::quantize(&[0.0; 100], &[100]).unwrap();
    assert!(z.dequantize().iter().all(|x| *x == 0.0));
}

#[test]
fn transposed_dequantize_is_the_transpose() {
    // Odd sizes: bands and tiles that do not divide the shape, blocks straddling rows.
    for (rows, cols) in [(37usize, 70usize), (3, 5), (130, 33)] {
        let v = randn(rows * cols, 7);
        let q = Nf4Tensor::quantize(&v, &[rows, cols]).unwrap();
        let d = q.dequantize();
        let t = q.dequantize_transposed();
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(t[c * rows + r].to_bits(), d[r * cols + c].to_bits());
            }
        }
    }
}

#[test]
fn rows_into_handles_unaligned_rows() {
    let (rows, cols) = (9, 37);
    let v = randn(rows * cols, 5);
    let q = Nf4Tensor::quantize(&v, &[rows, cols]).unwrap();
    let d = q.dequantize();
    for start in 0..rows {
        for n in 1..=(rows - start).min(3) {
            let mut out = vec![f32::NAN; n * cols];
            q.dequantize_rows_into(start, n, &mut out).unwrap();
            assert_eq!(out, d[start * cols..(start + n) * cols]);
        }
    }
    assert!(q
        .dequantize_rows_into(8, 2, &mut vec![0.0; 2 * cols])
        .is_err());
    assert!(q.dequantize_rows_into(0, 1, &mut [0.0; 5]).is_err());
}

#[test]
fn bad_input_is_an_error() {
    let e = Nf4Tensor::quantize(&[1.0, f32::NAN], &[2]).unwrap_err();
    assert!(e.to_string().contains("value 1"), "{e}");
    assert!(Nf4Tensor::quantize(&[1.0; 6], &[2, 4]).is_err());
    assert!(Nf4Tensor::quantize(&[], &[0]).is_err());
    assert!(Nf4Tensor::quantize(&[1.0], &[]).is_err());
    assert!(Nf4Tensor::from_parts(vec![3, 64], vec![0; 96], vec![0; 3], vec![1.0], 0.0).is_ok());
    assert!(Nf4Tensor::from_parts(vec![3, 64], vec![0; 95], vec![0; 3], vec![1.0], 0.0).is_err());
    assert!(Nf4Tensor::from_parts(vec![3, 64], vec![0; 96], vec![0; 2], vec![1.0], 0.0).is_err());
    assert!(Nf4Tensor::from_parts(vec![3, 64], vec![0; 96], vec![0; 3], vec![], 0.0).is_err());
}

// ---- bitsandbytes fixtures (scripts/fixtures/nf4_bnb.py, run on CUDA) ----

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/nf4/nf4_bnb.safetensors"
);

/// The cases the script writes; `bf16_96x80` holds bf16 input and output.
const CASES: [&str; 10] = [
    "randn_64x64",
    "randn_128x320",
    "randn_3x100",
    "randn_5x13",
    "single_1x40",
    "outliers_16x64",
    "zeros_2x64",
    "tiny_4x64",
    "ties_2x64",
    "bf16_96x80",
];

struct Fixture(Vec<u8>);

impl Fixture {
    fn load() -> Result<Self> {
        let bytes = std::fs::read(FIXTURE).with_context(|| {
            format!(
                "fixture missing: run scripts/fixtures/nf4_bnb.py --out tests/fixtures/nf4 \
                     on a CUDA machine ({FIXTURE})"
            )
        })?;
        Ok(Self(bytes))
    }

    fn view(&self, name: &str) -> Result<(safetensors::Dtype, Vec<usize>, Vec<u8>)> {
        let st = safetensors::SafeTensors::deserialize(&self.0)
            .with_context(|| format!("parsing {FIXTURE}"))?;
        let t = st
            .tensor(name)
            .with_context(|| format!("{FIXTURE}: no tensor {name}"))?;
        Ok((t.dtype(), t.shape().to_vec(), t.data().to_vec()))
    }

    fn u8s(&self, name: &str) -> Result<Vec<u8>> {
        let (dt, _, data) = self.view(name)?;
        ensure!(dt == safetensors::Dtype::U8, "{name}: {dt:?}, expected U8");
        Ok(data)
    }

    fn i64s(&self, name: &str) -> Result<Vec<i64>> {
        let (dt, _, data) = self.view(name)?;
        ensure!(
            dt == safetensors::Dtype::I64,
            "{name}: {dt:?}, expected I64"
        );
        Ok(data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect())
    }

    /// f32 values (bf16 tensors are widened exactly) and the shape.
    fn f32s(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let (dt, shape, data) = self.view(name)?;
        let v = match dt {
            safetensors::Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            safetensors::Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => bail!("{name}: {other:?}, expected F32 or BF16"),
        };
        Ok((v, shape))
    }

    fn is_bf16(&self, name: &str) -> Result<bool> {
        Ok(self.view(name)?.0 == safetensors::Dtype::BF16)
    }

    /// bitsandbytes' quantization state of a case.
    fn state(&self, case: &str) -> Result<Nf4Tensor> {
        let (_, shape) = self.f32s(&format!("{case}.input"))?;
        let (nested, _) = self.f32s(&format!("{case}.nested_absmax"))?;
        let (offset, _) = self.f32s(&format!("{case}.offset"))?;
        Nf4Tensor::from_parts(
            shape,
            self.u8s(&format!("{case}.packed"))?,
            self.u8s(&format!("{case}.absmax_codes"))?,
            nested,
            offset[0],
        )
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Asserts equal slices, naming the first differing element (not printing both whole).
#[track_caller]
fn assert_same<T: PartialEq + Copy + std::fmt::Debug>(what: &str, ours: &[T], want: &[T]) {
    assert_eq!(ours.len(), want.len(), "{what}: length");
    if let Some(i) = ours.iter().zip(want).position(|(x, y)| x != y) {
        let n = ours.iter().zip(want).filter(|(x, y)| x != y).count();
        panic!(
            "{what}: {n} of {} differ, first at {i}: ours {:?}, bitsandbytes {:?}",
            ours.len(),
            ours[i],
            want[i]
        );
    }
}

#[test]
fn fixture_codebooks_match_bitsandbytes() -> Result<()> {
    let fx = Fixture::load()?;
    let (nf4, _) = fx.f32s("nf4_code")?;
    assert_same("NF4 codebook", &bits(&NF4_CODE), &bits(&nf4));
    let (map, _) = fx.f32s("dynamic_map")?;
    assert_same("dynamic map", &bits(&dynamic_map_signed()), &bits(&map));
    Ok(())
}

#[test]
fn fixture_blockwise_8bit_matches_bitsandbytes() -> Result<()> {
    let fx = Fixture::load()?;
    let (input, _) = fx.f32s("bw8.input")?;
    let (codes, absmax) = quantize_blockwise_dynamic(&input, NESTED_BLOCK_SIZE);
    assert_same("8-bit codes", &codes, &fx.u8s("bw8.codes")?);
    let (want_absmax, _) = fx.f32s("bw8.absmax")?;
    assert_same("8-bit absmax", &bits(&absmax), &bits(&want_absmax));
    Ok(())
}

#[test]
fn fixture_quantize_matches_bitsandbytes() -> Result<()> {
    let fx = Fixture::load()?;
    for case in CASES {
        let (input, shape) = fx.f32s(&format!("{case}.input"))?;
        let want = fx.state(case)?;
        let ours = Nf4Tensor::quantize(&input, &shape)?;
        assert_same(&format!("{case}: packed"), &ours.packed, &want.packed);
        assert_same(
            &format!("{case}: absmax codes"),
            &ours.absmax_codes,
            &want.absmax_codes,
        );
        assert_same(
            &format!("{case}: nested absmax"),
            &bits(&ours.nested_absmax),
            &bits(&want.nested_absmax),
        );
        assert_same(
            &format!("{case}: offset"),
            &[ours.offset.to_bits()],
            &[want.offset.to_bits()],
        );
    }
    Ok(())
}

/// The script's `hash_uniform`: values in [0.01, 0.21) from SplitMix64 of `i + seed`,
/// computed with the same exact f32 steps as the numpy version.
fn hash_uniform(n: usize, seed: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut z = (i + seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 40) as f32 * (1.0 / (1u32 << 24) as f32);
            u * 0.2 + 0.01
        })
        .collect()
}

#[test]
fn fixture_offset_mean_matches_pytorch_cuda() -> Result<()> {
    // torch.mean on CUDA of absmax-like vectors, up to 2M values (multi-block reductions).
    let fx = Fixture::load()?;
    let sizes = fx.i64s("mean.n")?;
    let seeds = fx.i64s("mean.seed")?;
    let (want, _) = fx.f32s("mean.value")?;
    let ours: Vec<u32> = sizes
        .iter()
        .zip(&seeds)
        .map(|(&n, &seed)| torch_cuda_mean(&hash_uniform(n as usize, seed as u64)).to_bits())
        .collect();
    assert_same("torch.mean", &ours, &bits(&want));
    Ok(())
}

#[test]
fn fixture_dequantize_matches_bitsandbytes() -> Result<()> {
    let fx = Fixture::load()?;
    for case in CASES {
        let state = fx.state(case)?;
        let ours = state.dequantize();
        let (want, shape) = fx.f32s(&format!("{case}.dequant"))?;
        assert_eq!(shape, state.shape, "{case}: shape");
        let rounded: Vec<f32> = if fx.is_bf16(&format!("{case}.dequant"))? {
            // the kernel rounds its f32 product to bf16 (round to nearest even)
            ours.iter()
                .map(|x| half::bf16::from_f32(*x).to_f32())
                .collect()
        } else {
            ours.clone()
        };
        assert_same(
            &format!("{case}: dequantized"),
            &bits(&rounded),
            &bits(&want),
        );
        // row access reads the same values
        let cols = *shape.last().unwrap();
        let rows = state.numel() / cols;
        let mut out = vec![0.0f32; cols];
        state.dequantize_rows_into(rows - 1, 1, &mut out)?;
        assert_same(
            &format!("{case}: last row"),
            &bits(&out),
            &bits(&ours[(rows - 1) * cols..]),
        );
    }
    Ok(())
}
