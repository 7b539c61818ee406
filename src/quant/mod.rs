//! Storage of the frozen base's linear weights: NF4 with double quantization (the bitsandbytes
//! format) or plain dense tensors for debugging and parity tests.

pub mod nf4;

use burn::tensor::{backend::Backend, Tensor};
use nf4::Nf4Tensor;
use std::sync::Arc;

/// How a frozen base weight `[out, in]` is stored.
#[derive(Debug, Clone)]
pub enum BaseWeight<B: Backend> {
    /// Kept at compute precision on the device (`model.quantize = "none"`), stored column-major
    /// (`[out, in]` seen through a transposed `[in, out]` buffer) so `x W^T` reads it in place.
    Dense(Tensor<B, 2>),
    /// 4-bit NF4 + double-quantized absmax. Dequantized into a short-lived workspace tensor per
    /// forward, so the dense weight never stays resident.
    Nf4(Arc<Nf4Tensor>),
}
