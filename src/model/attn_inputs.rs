//! What the queries of one forward call may see, made once per call and shared by every block:
//! the RoPE tables and the key mask (as host data, the fused CUDA attention's per-key bias, and
//! the dense mask the reference ops build on first use).

use burn::tensor::{backend::Backend, Bool, Tensor, TensorData};
use std::sync::OnceLock;

/// Which keys the queries of one forward call may see, as host data: padding (`key_valid`,
/// `[b][total]`), causality (the queries sit at positions `past..total`) and Mistral's sliding
/// window. The fused CUDA attention reads it as one bias per key; only the reference ops need
/// the dense `[b, 1, t, total]` mask, which long rows cannot afford (16K tokens: 2^28 a row).
#[derive(Debug, Clone)]
pub struct KeyMask {
    pub key_valid: Vec<Vec<bool>>,
    pub past: usize,
    pub window: Option<usize>,
}

impl KeyMask {
    /// `[b, 1, t, past+t]` boolean mask, true where attention is forbidden: future tokens,
    /// padding keys, and keys outside the sliding window.
    pub fn dense<B: Backend>(&self, device: &B::Device) -> Tensor<B, 4, Bool> {
        let b = self.key_valid.len();
        let total = self.key_valid.first().map_or(0, Vec::len);
        let (past, t) = (self.past, total - self.past);
        let mut m = Vec::with_capacity(b * t * total);
        for kv in &self.key_valid {
            for qi in 0..t {
                let q_abs = past + qi;
                for (k_abs, &valid) in kv.iter().enumerate() {
                    let future = k_abs > q_abs;
                    let outside = self
                        .window
                        .map(|w| q_abs - k_abs.min(q_abs) >= w)
                        .unwrap_or(false);
                    m.push(if future || !valid || outside {
                        1.0f32
                    } else {
                        0.0
                    });
                }
            }
        }
        // Built from floats and compared: every CPU backend runs comparisons, while boolean
        // tensors from host data are missing on some (burn-candle).
        Tensor::<B, 4>::from_data(TensorData::new(m, [b, 1, t, total]), device).greater_elem(0.5)
    }
}

/// Per-call inputs every block shares: RoPE tables `[b, 1, t, d/2]` and which keys each query
/// may see.
#[derive(Debug, Clone)]
pub struct AttnInputs<B: Backend> {
    pub cos: Tensor<B, 4>,
    pub sin: Tensor<B, 4>,
    pub keys: KeyMask,
    /// The fused CUDA attention's additive bias per key `[b, total]` (0 or -1e30 for padding),
    /// made once per call; `None` on other backends.
    pub bias: Option<Tensor<B, 2>>,
    /// The dense mask, made on first use by a reference op.
    mask: OnceLock<Tensor<B, 4, Bool>>,
}

impl<B: Backend> AttnInputs<B> {
    pub fn new(cos: Tensor<B, 4>, sin: Tensor<B, 4>, keys: KeyMask) -> Self {
        #[cfg(feature = "cuda")]
        let bias = crate::cuda::attention::try_key_bias::<B>(&keys.key_valid, &cos.device());
        #[cfg(not(feature = "cuda"))]
        let bias = None;
        Self {
            cos,
            sin,
            keys,
            bias,
            mask: OnceLock::new(),
        }
    }

    /// The dense mask `[b, 1, t, total]`, true = forbidden (see [`KeyMask::dense`]).
    pub fn mask(&self) -> Tensor<B, 4, Bool> {
        self.mask
            .get_or_init(|| self.keys.dense(&self.cos.device()))
            .clone()
    }

    /// The positions and window as the fused CUDA attention takes them.
    #[cfg(feature = "cuda")]
    pub(crate) fn rule(&self) -> crate::cuda::attention::KeyRule {
        crate::cuda::attention::KeyRule {
            past: self.keys.past,
            window: self.keys.window.unwrap_or(0),
        }
    }
}
