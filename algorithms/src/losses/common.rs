//! Small helpers shared by the loss modules: shape checks with readable errors, host <-> tensor
//! conversion, and one-sync reads of metric scalars.

use anyhow::{ensure, Result};
use burn::tensor::{backend::Backend, Tensor, TensorData};

/// Checks that a 1-D tensor has `len` elements; `what` names the input in the error.
pub(crate) fn ensure_len<B: Backend>(t: &Tensor<B, 1>, len: usize, what: &str) -> Result<()> {
    let [n] = t.dims();
    ensure!(n == len, "{what}: expected {len} elements, got {n}");
    Ok(())
}

/// Checks that a 2-D tensor has shape `[rows, cols]`; `what` names the input in the error.
pub(crate) fn ensure_dims2<B: Backend>(
    t: &Tensor<B, 2>,
    rows: usize,
    cols: usize,
    what: &str,
) -> Result<()> {
    let dims = t.dims();
    ensure!(
        dims == [rows, cols],
        "{what}: expected shape [{rows}, {cols}], got {dims:?}"
    );
    Ok(())
}

/// Builds a 1-D float tensor from host values.
pub(crate) fn tensor1<B: Backend>(values: &[f32], device: &B::Device) -> Tensor<B, 1> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
}

/// Builds a 2-D float tensor of shape `[rows, cols]` from row-major host values.
pub(crate) fn tensor2<B: Backend>(
    values: Vec<f32>,
    rows: usize,
    cols: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(values, [rows, cols]), device)
}

/// Reads a tensor back to the host as `f64`, whatever the backend's float type.
pub(crate) fn to_f64<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().iter::<f64>().collect()
}

/// Reads several 1-D metric tensors with a single device -> host transfer and splits them back.
pub(crate) fn read_parts<B: Backend>(parts: Vec<Tensor<B, 1>>) -> Vec<Vec<f64>> {
    if parts.is_empty() {
        return Vec::new();
    }
    let lens: Vec<usize> = parts.iter().map(|p| p.dims()[0]).collect();
    let flat = to_f64(Tensor::cat(parts, 0));
    let mut out = Vec::with_capacity(lens.len());
    let mut start = 0;
    for len in lens {
        out.push(flat[start..start + len].to_vec());
        start += len;
    }
    out
}

/// Reads several scalar (`[1]`-shaped) metric tensors with a single transfer.
pub(crate) fn read_scalars<B: Backend>(parts: Vec<Tensor<B, 1>>) -> Vec<f64> {
    read_parts(parts).into_iter().map(|v| v[0]).collect()
}
