//! A frozen linear layer of the base model over its stored weight ([`BaseWeight`]: NF4 or
//! dense), with the reference forward and input gradient; [`super::ops`] picks the CUDA fast
//! path when there is one.

use super::ops;
use crate::quant::nf4::Nf4Tensor;
use crate::quant::BaseWeight;
use burn::tensor::{
    backend::{AutodiffBackend, Backend},
    FloatDType, Tensor, TensorData, TensorPrimitive,
};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use std::any::{Any, TypeId};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The most bytes of dequantized NF4 weights kept off CUDA, over all layers of the process.
const CPU_CACHE_LIMIT: usize = 8 << 30;
/// Bytes kept so far.
static CPU_CACHED: AtomicUsize = AtomicUsize::new(0);

/// An NF4 layer's dense forms, kept off CUDA after first use: a CPU forward otherwise
/// dequantizes every weight on every call, which was most of a SmolLM2 decode step. One entry
/// per backend type and layout (`W^T` for the forward, `W` for the input gradient), since the
/// autodiff and plain backends each hold their own tensor; the bytes count against
/// [`CPU_CACHE_LIMIT`] and are never given back (the weights are frozen for the process).
#[derive(Clone, Default)]
pub struct DenseCache(
    Arc<Mutex<Vec<DenseForm>>>,
    Arc<Mutex<Option<Arc<Vec<f32>>>>>,
);

/// One kept form: the backend's type, whether it is `W^T`, and the `Tensor<B, 2>`.
type DenseForm = (TypeId, bool, Box<dyn Any + Send + Sync>);

impl std::fmt::Debug for DenseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map(|v| v.len()).unwrap_or(0);
        write!(f, "DenseCache({n} forms)")
    }
}

/// Reserves `bytes` of the process's cache budget; false when it would overflow.
fn reserve(bytes: usize) -> bool {
    !crate::switches::switches().no_cpu_weight_cache
        && CPU_CACHED
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n + bytes <= CPU_CACHE_LIMIT).then_some(n + bytes)
            })
            .is_ok()
}

impl DenseCache {
    /// The row-major `[out, in]` values (`len` of them) on the host, kept, for the few-row
    /// product ([`gemv_rows`]); `None`, before any dequantizing, when the cache budget is spent.
    fn host(&self, len: usize, make: impl FnOnce() -> Vec<f32>) -> Option<Arc<Vec<f32>>> {
        let mut kept = self.1.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = kept.as_ref() {
            return Some(w.clone());
        }
        if !reserve(len * 4) {
            return None;
        }
        let w = Arc::new(make());
        *kept = Some(w.clone());
        Some(w)
    }

    /// The kept form of `B` and layout `transposed`, made by `make()` on first use; `None` on
    /// CUDA and, before anything is made, when the cache budget is spent.
    pub fn kept<B: Backend>(
        &self,
        transposed: bool,
        make: impl FnOnce() -> Tensor<B, 2>,
    ) -> Option<Tensor<B, 2>> {
        if ops::is_cuda::<B>() {
            return None;
        }
        let key = TypeId::of::<B>();
        let mut forms = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, t)) = forms
            .iter()
            .find(|(k, tr, _)| *k == key && *tr == transposed)
        {
            return t.downcast_ref::<Tensor<B, 2>>().cloned();
        }
        let t = make();
        if !reserve(t.shape().num_elements() * 4) {
            return None;
        }
        forms.push((key, transposed, Box::new(t.clone())));
        Some(t)
    }

    /// The kept form of `B` and layout `transposed`, else `make()`'s, kept when allowed.
    fn get<B: Backend>(
        &self,
        transposed: bool,
        make: impl FnOnce() -> Tensor<B, 2>,
    ) -> Tensor<B, 2> {
        let key = TypeId::of::<B>();
        let mut forms = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, t)) = forms
            .iter()
            .find(|(k, tr, _)| *k == key && *tr == transposed)
        {
            if let Some(t) = t.downcast_ref::<Tensor<B, 2>>() {
                return t.clone();
            }
        }
        let t = make();
        let bytes = t.shape().num_elements() * 4;
        if !ops::is_cuda::<B>() && reserve(bytes) {
            forms.push((key, transposed, Box::new(t.clone())));
        }
        t
    }
}

/// burn's autodiff of `x W^T` on the CPU backend: its backward multiplies by `(W^T)^T`, a
/// transposed view that burn-ndarray copies element by element into row-major for every
/// product. The frozen layer is one node instead, computed on the plain backend, whose
/// backward is [`BaseLinear::backward_input`] with the kept row-major `W` (and the autodiff
/// backend keeps no second copy of the dense weights).
type CpuTrain = burn_autodiff::Autodiff<ops::CpuBackend>;

fn cpu_train_forward<B: Backend>(lin: &BaseLinear<B>, x: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    let lin = (lin as &dyn Any).downcast_ref::<BaseLinear<CpuTrain>>()?;
    let x = (x as &dyn Any).downcast_ref::<Tensor<CpuTrain, 2>>()?;
    let node = super::autodiff_op::ad::<CpuTrain, 2>(x)?;
    let plain = lin.inner();
    let xi = x.clone().inner();
    let y = xi.clone().matmul(plain.weight_t(&xi.device()));
    let out = super::autodiff_op::record::<_, _, 1>(
        LinearBackward,
        &[node],
        plain,
        y.into_primitive().tensor(),
    );
    super::autodiff_op::cast(super::autodiff_op::from_ad::<CpuTrain, 2>(out)?)
}

#[derive(Debug)]
struct LinearBackward;

impl Backward<ops::CpuBackend, 1> for LinearBackward {
    type State = BaseLinear<ops::CpuBackend>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<ops::CpuBackend>(&ops.node);
        let [Some(node)] = ops.parents else { return };
        let dy = Tensor::<ops::CpuBackend, 2>::from_primitive(TensorPrimitive::Float(dy));
        let dx = ops.state.backward_input(dy);
        grads.register::<ops::CpuBackend>(node.id, dx.into_primitive().tensor());
    }
}

/// Row-major `[out, in]` values as a tensor of that shape stored column-major: an `[in, out]`
/// buffer seen transposed, so products with `W^T` (every forward) read it without a copy.
fn column_major<B: Backend>(
    values: &[f32],
    out_features: usize,
    in_features: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    let mut t = vec![0.0f32; values.len()];
    for (o, row) in values.chunks_exact(in_features).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            t[i * out_features + o] = v;
        }
    }
    Tensor::<B, 2>::from_data(TensorData::new(t, [in_features, out_features]), device).transpose()
}

/// The most rows [`BaseLinear::few_rows`] takes; more go to the GEMM.
const GEMV_ROWS: usize = 8;

/// `x [rows, inp] W^T` for a row-major `w [out, inp]`, each weight row read once for all rows,
/// the output features split over the machine's threads.
fn gemv_rows(w: &[f32], x: &[f32], rows: usize, out: usize, inp: usize) -> Vec<f32> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let per = out.div_ceil(threads).max(1);
    // Feature-major [out, rows], so each thread owns one contiguous piece.
    let mut yt = vec![0.0f32; out * rows];
    std::thread::scope(|s| {
        for (t, piece) in yt.chunks_mut(per * rows).enumerate() {
            s.spawn(move || {
                for (j, ys) in piece.chunks_mut(rows).enumerate() {
                    let o = t * per + j;
                    let wr = &w[o * inp..(o + 1) * inp];
                    for (r, y) in ys.iter_mut().enumerate() {
                        *y = dot(wr, &x[r * inp..(r + 1) * inp]);
                    }
                }
            });
        }
    });
    let mut y = vec![0.0f32; rows * out];
    for (o, ys) in yt.chunks(rows).enumerate() {
        for (r, v) in ys.iter().enumerate() {
            y[r * out + o] = *v;
        }
    }
    y
}

/// A dot product in eight lanes (vectorizes without target features).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// A frozen linear layer of the base model: `y = x W^T (+ b)`.
#[derive(Debug, Clone)]
pub struct BaseLinear<B: Backend> {
    pub weight: BaseWeight<B>,
    pub bias: Option<Tensor<B, 1>>,
    pub out_features: usize,
    pub in_features: usize,
    /// The layer's form on the CUDA fast path, built on first use there.
    pub gpu: ops::FastSlot,
    /// Off CUDA, the NF4 weight's dense forms, built on first use.
    pub dense: DenseCache,
}

impl<B: Backend> BaseLinear<B> {
    /// Builds a layer from row-major `[out, in]` f32 values, quantizing when asked.
    pub fn new(
        values: Vec<f32>,
        out_features: usize,
        in_features: usize,
        bias: Option<Vec<f32>>,
        quantize: bool,
        device: &B::Device,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            values.len() == out_features * in_features,
            "weight has {} values, expected {out_features} x {in_features}",
            values.len()
        );
        let weight = if quantize {
            BaseWeight::Nf4(Arc::new(Nf4Tensor::quantize(
                &values,
                &[out_features, in_features],
            )?))
        } else {
            BaseWeight::Dense(ops::dense_at_rest(column_major(
                &values,
                out_features,
                in_features,
                device,
            )))
        };
        let bias = bias.map(|b| {
            let n = b.len();
            Tensor::from_data(TensorData::new(b, [n]), device)
        });
        Ok(Self {
            weight,
            bias,
            out_features,
            in_features,
            gpu: Default::default(),
            dense: Default::default(),
        })
    }

    /// The weight as a dense `[out, in]` tensor on `device` (a workspace for NF4).
    pub fn dense_weight(&self, device: &B::Device) -> Tensor<B, 2> {
        match &self.weight {
            BaseWeight::Dense(w) => w.clone().cast(FloatDType::F32),
            BaseWeight::Nf4(q) => self.dense.get(false, || {
                Tensor::from_data(
                    TensorData::new(q.dequantize(), [self.out_features, self.in_features]),
                    device,
                )
            }),
        }
    }

    /// `W^T` as a `[in, out]` tensor laid out row-major, the operand of `x W^T`: the stored
    /// dense weight seen transposed (no copy), or NF4 dequantized straight into that layout.
    /// CPU matmuls copy a transposed operand into row-major first; this never needs one.
    pub fn weight_t(&self, device: &B::Device) -> Tensor<B, 2> {
        match &self.weight {
            BaseWeight::Dense(w) => w.clone().cast(FloatDType::F32).transpose(),
            BaseWeight::Nf4(q) => self.dense.get(true, || {
                Tensor::from_data(
                    TensorData::new(
                        q.dequantize_transposed(),
                        [self.in_features, self.out_features],
                    ),
                    device,
                )
            }),
        }
    }

    /// `x [.., in] -> [.., out]`. The weight carries no gradient: the base is frozen.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let device = x.device();
        let dims = x.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let x2: Tensor<B, 2> = x.reshape([rows, self.in_features]);
        let mut y = match ops::linear_fast(&self.gpu, &self.weight, &x2) {
            Some(y) => y,
            None => match self.few_rows(&x2, rows) {
                Some(y) => y,
                None => match cpu_train_forward(self, &x2) {
                    Some(y) => y,
                    None => x2.matmul(self.weight_t(&device)),
                },
            },
        };
        if let Some(b) = &self.bias {
            y = y + b.clone().unsqueeze_dim(0);
        }
        let mut out = dims;
        out[D - 1] = self.out_features;
        y.reshape(out)
    }

    /// `x W^T` for a few rows of `x` off CUDA and outside autodiff (sampling's decode step), read
    /// straight from the kept row-major weight: burn-ndarray's GEMM packs the whole weight for
    /// every product, which was most of a one-row step.
    fn few_rows(&self, x: &Tensor<B, 2>, rows: usize) -> Option<Tensor<B, 2>> {
        let device = x.device();
        let BaseWeight::Nf4(q) = &self.weight else {
            return None;
        };
        if rows > GEMV_ROWS || ops::is_cuda::<B>() || B::ad_enabled(&device) {
            return None;
        }
        let w = self
            .dense
            .host(self.out_features * self.in_features, || q.dequantize())?;
        let xv = x
            .clone()
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .ok()?;
        let y = gemv_rows(&w, &xv, rows, self.out_features, self.in_features);
        Some(Tensor::from_data(
            TensorData::new(y, [rows, self.out_features]),
            &device,
        ))
    }

    /// `dy [.., out] -> dy @ W [.., in]`: the input gradient of [`Self::forward`] (the weight is
    /// frozen), for the hand-written block backward of `model::checkpoint`.
    pub fn backward_input<const D: usize>(&self, dy: Tensor<B, D>) -> Tensor<B, D> {
        let device = dy.device();
        let dims = dy.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let dy2: Tensor<B, 2> = dy.reshape([rows, self.out_features]);
        let dx = match ops::linear_backward_fast(&self.gpu, &self.weight, &dy2) {
            Some(dx) => dx,
            None => dy2.matmul(self.dense_weight(&device)),
        };
        let mut out = dims;
        out[D - 1] = self.in_features;
        dx.reshape(out)
    }

    /// Bytes this weight occupies at rest (NF4: packed codes + quantization constants).
    pub fn storage_bytes(&self) -> usize {
        let bias = self
            .bias
            .as_ref()
            .map(|_| self.out_features * 4)
            .unwrap_or(0);
        bias + match &self.weight {
            BaseWeight::Dense(w) => self.out_features * self.in_features * w.dtype().size(),
            BaseWeight::Nf4(q) => q.storage_bytes(),
        }
    }
}

impl<B: AutodiffBackend> BaseLinear<B> {
    /// The same layer on the backend without autodiff (no copy: tensors are shared). Sampling
    /// runs there, so it records no graph.
    pub fn inner(&self) -> BaseLinear<B::InnerBackend> {
        BaseLinear {
            weight: match &self.weight {
                BaseWeight::Dense(w) => BaseWeight::Dense(w.clone().inner()),
                BaseWeight::Nf4(q) => BaseWeight::Nf4(q.clone()),
            },
            bias: self.bias.clone().map(|b| b.inner()),
            out_features: self.out_features,
            in_features: self.in_features,
            gpu: self.gpu.clone(),
            dense: self.dense.clone(),
        }
    }
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use super::*;

    /// The CPU training node's input gradient (and output) against burn's own autodiff of
    /// `x W^T`, for a dense and an NF4 weight.
    #[test]
    fn cpu_node_matches_burn_autodiff() {
        let dev = Default::default();
        let (rows, inp, out) = (5, 64, 24);
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 37) % 23) as f32 * 0.05 - 0.5)
            .collect();
        let xv: Vec<f32> = (0..rows * inp)
            .map(|i| ((i * 13) % 17) as f32 * 0.1 - 0.8)
            .collect();
        let cv: Vec<f32> = (0..rows * out)
            .map(|i| ((i * 7) % 5) as f32 - 2.0)
            .collect();
        for quantize in [false, true] {
            let lin =
                BaseLinear::<CpuTrain>::new(w.clone(), out, inp, None, quantize, &dev).unwrap();
            let dense = lin.inner().dense_weight(&dev);
            let run = |node: bool| {
                let x = Tensor::<CpuTrain, 2>::from_data(
                    TensorData::new(xv.clone(), [rows, inp]),
                    &dev,
                )
                .require_grad();
                let y = if node {
                    lin.forward(x.clone())
                } else {
                    x.clone()
                        .matmul(Tensor::from_inner(dense.clone()).transpose())
                };
                let c = Tensor::<CpuTrain, 2>::from_data(
                    TensorData::new(cv.clone(), [rows, out]),
                    &dev,
                );
                let grads = (y.clone() * c).sum().backward();
                let g = x.grad(&grads).expect("x has a gradient");
                (
                    y.into_data().to_vec::<f32>().unwrap(),
                    g.into_data().to_vec::<f32>().unwrap(),
                )
            };
            let ((y1, g1), (y2, g2)) = (run(true), run(false));
            let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| (p - q).abs() < 1e-4);
            assert!(close(&y1, &y2), "forward differs (quantize {quantize})");
            assert!(
                close(&g1, &g2),
                "input gradient differs (quantize {quantize})"
            );
        }
    }
}
