//! Stored weights as the loaders read them: a safetensors view (f32, f16 or bf16) to f32 values.

use anyhow::{bail, ensure, Result};

/// Converts a safetensors view (f32, f16 or bf16) to f32 values.
pub fn view_to_f32(view: &safetensors::tensor::TensorView) -> Result<Vec<f32>> {
    let data = view.data();
    let n: usize = view.shape().iter().product();
    let width = match view.dtype() {
        safetensors::Dtype::F32 => 4,
        safetensors::Dtype::F16 | safetensors::Dtype::BF16 => 2,
        other => bail!("dtype {other:?} is not supported: expected F32, F16 or BF16"),
    };
    ensure!(
        data.len() == n * width,
        "data has {} bytes, expected {}",
        data.len(),
        n * width
    );
    Ok(match view.dtype() {
        safetensors::Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    })
}
