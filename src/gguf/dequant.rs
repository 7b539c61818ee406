//! Dequantization of ggml tensor types to f32 (block layouts as in ggml-common.h).

use super::types::GgmlType;
use anyhow::{bail, Result};

/// Dequantizes `n_elements` values of type `ty` from `bytes` (which must be exactly their
/// size). Large tensors are split across threads.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    if !ty.can_dequantize() {
        bail!("dequantizing {ty} is not supported (supported: F32, F16, BF16, F64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)");
    }
    let (block_elems, block_bytes) = ty.block();
    if !n_elements.is_multiple_of(block_elems) {
        bail!("{n_elements} elements is not a whole number of {ty} blocks of {block_elems}");
    }
    let n_blocks = n_elements / block_elems;
    if n_blocks.checked_mul(block_bytes) != Some(bytes.len()) {
        bail!(
            "{n_elements} {ty} values take {} bytes, got {}",
            n_blocks.saturating_mul(block_bytes),
            bytes.len()
        );
    }
    let mut out = vec![0f32; n_elements];
    let threads = if n_elements < (1 << 20) {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(16))
    };
    let blocks_per_chunk = n_blocks.div_ceil(threads).max(1);
    if threads == 1 {
        decode_blocks(ty, bytes, &mut out);
    } else {
        std::thread::scope(|s| {
            for (dst, src) in out
                .chunks_mut(blocks_per_chunk * block_elems)
                .zip(bytes.chunks(blocks_per_chunk * block_bytes))
            {
                s.spawn(move || decode_blocks(ty, src, dst));
            }
        });
    }
    Ok(out)
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Decodes whole blocks; `src` and `dst` hold the same number of blocks.
fn decode_blocks(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let (be, bb) = ty.block();
    let blocks = src.chunks_exact(bb).zip(dst.chunks_exact_mut(be));
    match ty {
        GgmlType::F32 => {
            blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = f16_at(b, 0)),
        GgmlType::BF16 => {
            blocks.for_each(|(b, y)| y[0] = half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
        }
        GgmlType::F64 => blocks.for_each(|(b, y)| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            y[0] = f64::from_le_bytes(a) as f32;
        }),
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| dequant_q4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| dequant_q4_1(b, y)),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| dequant_q5_0(b, y)),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| dequant_q5_1(b, y)),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| dequant_q8_0(b, y)),
        GgmlType::Q2_K => blocks.for_each(|(b, y)| dequant_q2_k(b, y)),
        GgmlType::Q3_K => blocks.for_each(|(b, y)| dequant_q3_k(b, y)),
        GgmlType::Q4_K => blocks.for_each(|(b, y)| dequant_q4_k(b, y)),
        GgmlType::Q5_K => blocks.for_each(|(b, y)| dequant_q5_k(b, y)),
        GgmlType::Q6_K => blocks.for_each(|(b, y)| dequant_q6_k(b, y)),
        // `dequantize` rejects every other type before getting here.
        _ => unreachable!("decode_blocks called for {ty}"),
    }
}

// Block layouts (ggml-common.h). 32-element blocks store element j in the low nibble of
// byte j and element j+16 in the high nibble.

/// Q4_0: f16 d, 16 bytes of nibbles; x = (q - 8) * d.
fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: f16 d, f16 m, 16 bytes of nibbles; x = q * d + m.
fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// Q5_0: f16 d, 32 high bits (u32), 16 bytes of low nibbles; x = (q - 16) * d.
fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = (((qs[j] & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

/// Q5_1: f16 d, f16 m, 32 high bits, 16 bytes of low nibbles; x = q * d + m.
fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = ((qs[j] & 0x0F) as u32 | h0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
    }
}

/// Q8_0: f16 d, 32 signed bytes; x = q * d.
fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (yj, &q) in y.iter_mut().zip(&b[2..34]) {
        *yj = q as i8 as f32 * d;
    }
}

/// Q2_K (256 values): 16 bytes of 4-bit scale/min pairs, 64 bytes of 2-bit quants, f16 d,
/// f16 dmin. Sub-block i (16 values) is x = d * (sc & 15) * q - dmin * (sc >> 4).
fn dequant_q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    for (e, ye) in y.iter_mut().enumerate() {
        // Each 128-value half uses 32 bytes; the 2-bit field moves up every 32 values.
        let half = e / 128;
        let shift = 2 * ((e % 128) / 32);
        let q = (qs[half * 32 + e % 32] >> shift) & 3;
        let sc = scales[e / 16];
        *ye = d * (sc & 0x0F) as f32 * q as f32 - dmin * (sc >> 4) as f32;
    }
}

/// 6-bit scale of Q3_K sub-block `i`: low 4 bits from bytes 0..8, high 2 from bytes 8..12.
fn q3_k_scale(scales: &[u8], i: usize) -> i32 {
    let low = if i < 8 {
        scales[i] & 0x0F
    } else {
        scales[i - 8] >> 4
    };
    let high = (scales[8 + i % 4] >> (2 * (i / 4))) & 3;
    (low | (high << 4)) as i32 - 32
}

/// Q3_K (256 values): 32 bytes of high-bit mask, 64 bytes of 2-bit quants, 12 bytes of 6-bit
/// signed scales, f16 d. x = d * scale * (q - (high bit set ? 0 : 4)).
fn dequant_q3_k(b: &[u8], y: &mut [f32]) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let scales = &b[96..108];
    let d = f16_at(b, 108);
    for (e, ye) in y.iter_mut().enumerate() {
        let half = e / 128;
        let shift = 2 * ((e % 128) / 32);
        let low = ((qs[half * 32 + e % 32] >> shift) & 3) as i32;
        let high_set = (hmask[e % 32] >> (e / 32)) & 1 == 1;
        let q = low - if high_set { 0 } else { 4 };
        *ye = d * q3_k_scale(scales, e / 16) as f32 * q as f32;
    }
}

/// Scale and min (6 bits each) of Q4_K/Q5_K sub-block `j` (0..8), packed in 12 bytes:
/// j < 4 in the low 6 bits of bytes j and j+4; j >= 4 in the nibbles of byte j+4 plus the
/// top 2 bits of bytes j-4 (scale) and j (min).
fn k4_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// Q4_K (256 values): f16 d, f16 dmin, 12 bytes of scales/mins, 128 bytes of nibbles.
/// Sub-block j (32 values): x = d * sc_j * q - dmin * m_j. Each 64-value chunk uses 32
/// bytes: the first 32 values in the low nibbles, the next 32 in the high nibbles.
fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (e, ye) in y.iter_mut().enumerate() {
        let j = e / 32;
        let (sc, m) = k4_scale_min(scales, j);
        let byte = qs[(e / 64) * 32 + e % 32];
        let q = if j % 2 == 0 { byte & 0x0F } else { byte >> 4 };
        *ye = d * sc as f32 * q as f32 - dmin * m as f32;
    }
}

/// Q5_K (256 values): like Q4_K plus 32 bytes of fifth bits (bit j of byte l belongs to
/// value 32 * j + l).
fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (e, ye) in y.iter_mut().enumerate() {
        let j = e / 32;
        let (sc, m) = k4_scale_min(scales, j);
        let byte = qs[(e / 64) * 32 + e % 32];
        let low = if j % 2 == 0 { byte & 0x0F } else { byte >> 4 };
        let high = (qh[e % 32] >> j) & 1;
        let q = low | (high << 4);
        *ye = d * sc as f32 * q as f32 - dmin * m as f32;
    }
}

/// Q6_K (256 values): 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 signed
/// 8-bit scales, f16 d. x = d * scale[e / 16] * (q - 32). Per 128-value half, low nibbles
/// come from 64 bytes (values 0..64 low nibbles, 64..128 high nibbles) and the high bits
/// from 32 bytes (2 bits per 32-value group).
fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = f16_at(b, 208);
    for (e, ye) in y.iter_mut().enumerate() {
        let half = e / 128;
        let r = e % 128;
        let lbyte = ql[half * 64 + r % 64];
        let low = if r < 64 { lbyte & 0x0F } else { lbyte >> 4 };
        let high = (qh[half * 32 + r % 32] >> (2 * (r / 32))) & 3;
        let q = (low | (high << 4)) as i32 - 32;
        *ye = d * (scales[e / 16] as i8) as f32 * q as f32;
    }
}
