//! Token log-probs that never keep `[tokens, vocab]` logits in burn's graph: one autodiff node
//! keeps the final hidden states, and backward recomputes the logits chunk by chunk
//! (`plan.logits_chunk` tokens at a time).
//!
//! On CUDA the log-softmax and its gradient are fused kernels (`cuda::train_ops`). On the CPU
//! backends each row's log-sum-exp, log-prob and gradient `onehot(label) - softmax` are one pass
//! over the row ([`rows_logps`], rows split over the cores), instead of burn's chain of
//! whole-tensor ops; and when the tokens fit one chunk the forward keeps that gradient, so
//! backward skips the logits' recomputation (a `[tokens, vocab]` GEMM).

use super::autodiff_op::{ad, float, from_ad, record};
use super::llama::{Llama, OutputHead};
use burn::tensor::{
    activation,
    backend::{AutodiffBackend, Backend},
    IndexingUpdateOp, Int, Tensor, TensorData,
};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use std::marker::PhantomData;

#[derive(Debug, Clone)]
struct LogpsState<IB: Backend> {
    head: OutputHead<IB>,
    hidden: Tensor<IB, 2>,
    labels: Tensor<IB, 2, Int>,
    /// The same labels on the host (the fused kernels read each chunk's).
    host_labels: Vec<u32>,
    temperature: f64,
    chunk: usize,
    /// CPU, one chunk: `onehot(label) - softmax(z / T)` from the forward.
    kept_grad: Option<Tensor<IB, 2>>,
}

#[derive(Debug)]
struct LogpsBackward<IB>(PhantomData<IB>);

impl<IB: Backend> Backward<IB, 1> for LogpsBackward<IB> {
    type State = LogpsState<IB>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dlp = float::<IB, 1>(grads.consume::<IB>(&ops.node));
        let st = ops.state;
        let [node] = ops.parents;
        let Some(node) = node else { return };
        let [n, _] = st.hidden.dims();
        let inv_t = 1.0 / st.temperature;
        // d lp / dz = (onehot(label) - softmax(z / T)) / T, scaled per row by the incoming grad.
        let dz_of = |g: Tensor<IB, 2>, s: usize, e: usize| {
            g * (dlp.clone().slice(s..e) * inv_t).unsqueeze_dim::<2>(1)
        };
        if let Some(g) = st.kept_grad {
            let dx = st.head.backward_input(dz_of(g, 0, n));
            grads.register::<IB>(node.id, dx.into_primitive().tensor());
            return;
        }
        let mut parts = Vec::new();
        for s in (0..n).step_by(st.chunk) {
            let e = (s + st.chunk).min(n);
            let z = st.head.forward(st.hidden.clone().slice(s..e));
            #[cfg(feature = "cuda")]
            let z = match crate::cuda::train_ops::try_token_logps_grad(
                z,
                &st.host_labels[s..e],
                &dlp.clone().slice(s..e),
                inv_t as f32,
            ) {
                Ok(dz) => {
                    // dz already carries the 1 / temperature.
                    parts.push(st.head.backward_input(dz));
                    crate::devmem::note::<IB>(&st.hidden.device(), "logits backward");
                    continue;
                }
                Err(z) => z,
            };
            if !super::ops::is_cuda::<IB>() {
                let g = host_rows(z, &st.host_labels[s..e], inv_t as f32, true).1;
                parts.push(st.head.backward_input(dz_of(g.expect("asked for"), s, e)));
                continue;
            }
            let labels = st.labels.clone().slice([s..e, 0..1]);
            let dl = dlp.clone().slice(s..e).unsqueeze_dim::<2>(1);
            let z = z / st.temperature;
            // d log_softmax(z)[label] / dz = onehot(label) - softmax(z).
            let dz = (activation::softmax(z, 1) * dl.clone()).neg().scatter(
                1,
                labels,
                dl,
                IndexingUpdateOp::Add,
            );
            parts.push(st.head.backward_input(dz) / st.temperature);
            crate::devmem::note::<IB>(&st.hidden.device(), "logits backward");
        }
        grads.register::<IB>(node.id, Tensor::cat(parts, 0).into_primitive().tensor());
    }
}

/// `log softmax(hidden W^T / temperature)[label]` per row of `hidden [n, h]`, computed `chunk`
/// rows at a time (0 = all at once); the autodiff node keeps `hidden`, not the logits.
pub fn token_logps<B: AutodiffBackend>(
    model: &Llama<B>,
    hidden: Tensor<B, 2>,
    labels: Vec<i64>,
    temperature: f64,
    chunk: usize,
) -> Tensor<B, 1> {
    let [n, _] = hidden.dims();
    let chunk = if chunk == 0 { n.max(1) } else { chunk };
    let device = hidden.device();
    let host_labels: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    let labels =
        Tensor::<B::InnerBackend, 2, Int>::from_data(TensorData::new(labels, [n, 1]), &device);
    let Some(node) = ad::<B, 2>(&hidden) else {
        // Not burn's autodiff type: the plain path, logits kept by the graph.
        let z = model.output_head().forward(hidden) / temperature;
        let labels = Tensor::<B, 2, Int>::from_inner(labels);
        return activation::log_softmax(z, 1).gather(1, labels).reshape([n]);
    };
    let head = model.output_head().inner();
    let ih = hidden.inner();
    let cpu = !super::ops::is_cuda::<B>();
    let mut kept_grad = None;
    let mut parts = Vec::new();
    for s in (0..n).step_by(chunk) {
        let e = (s + chunk).min(n);
        let z = head.forward(ih.clone().slice(s..e));
        #[cfg(feature = "cuda")]
        if let Some(lp) = crate::cuda::train_ops::try_token_logps(
            &z,
            &host_labels[s..e],
            (1.0 / temperature) as f32,
        ) {
            crate::devmem::note::<B::InnerBackend>(&device, "logits forward");
            parts.push(lp);
            continue;
        }
        if cpu {
            // One chunk: keep the gradient rather than recompute the logits in backward.
            let keep = n <= chunk;
            let (lp, g) = host_rows(z, &host_labels[s..e], (1.0 / temperature) as f32, keep);
            kept_grad = g;
            parts.push(lp);
            continue;
        }
        let lp = activation::log_softmax(z / temperature, 1);
        crate::devmem::note::<B::InnerBackend>(&device, "logits forward");
        let lp = lp.gather(1, labels.clone().slice([s..e, 0..1]));
        parts.push(lp.reshape([e - s]));
    }
    let out = Tensor::cat(parts, 0).into_primitive().tensor();
    let state = LogpsState {
        head,
        hidden: ih,
        labels,
        host_labels,
        temperature,
        chunk,
        kept_grad,
    };
    let out = record::<_, _, 1>(LogpsBackward(PhantomData), &[node], state, out);
    from_ad::<B, 1>(out).expect("same backend as the input")
}

/// [`rows_logps`] over the logits `z [rows, vocab]` of a CPU backend, through host memory:
/// `(log-probs [rows], the gradient [rows, vocab] when asked)`.
fn host_rows<B: Backend>(
    z: Tensor<B, 2>,
    labels: &[u32],
    inv_t: f32,
    grad: bool,
) -> (Tensor<B, 1>, Option<Tensor<B, 2>>) {
    let [rows, vocab] = z.dims();
    let device = z.device();
    let mut data: Vec<f32> = z
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 logits");
    let lp = rows_logps(&mut data, vocab, labels, inv_t, grad);
    let lp = Tensor::from_data(TensorData::new(lp, [rows]), &device);
    let g = grad.then(|| Tensor::from_data(TensorData::new(data, [rows, vocab]), &device));
    (lp, g)
}

/// For each row of `z` (`vocab` logits, row-major) and its label: `log softmax(z * inv_t)[label]`,
/// the sum in f64. With `grad`, the row is overwritten by `onehot(label) - softmax(z * inv_t)`.
/// Rows are split over the available cores; each row is one thread's, so the result does not
/// depend on the split.
pub fn rows_logps(z: &mut [f32], vocab: usize, labels: &[u32], inv_t: f32, grad: bool) -> Vec<f32> {
    let rows = labels.len();
    assert_eq!(z.len(), rows * vocab, "logits are [rows, vocab]");
    let mut out = vec![0f32; rows];
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(rows.max(1));
    let per = rows.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for ((zs, ls), os) in z
            .chunks_mut(per * vocab)
            .zip(labels.chunks(per))
            .zip(out.chunks_mut(per))
        {
            scope.spawn(move || {
                for ((row, &label), o) in zs.chunks_mut(vocab).zip(ls).zip(os.iter_mut()) {
                    *o = row_logp(row, label as usize, inv_t, grad);
                }
            });
        }
    });
    out
}

fn row_logp(row: &mut [f32], label: usize, inv_t: f32, grad: bool) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * inv_t));
    let at_label = row[label] * inv_t;
    let sum: f64 = if grad {
        // Keep each exponential in place for the gradient below.
        row.iter_mut()
            .map(|x| {
                *x = (*x * inv_t - max).exp();
                *x as f64
            })
            .sum()
    } else {
        row.iter().map(|&x| (x * inv_t - max).exp() as f64).sum()
    };
    if grad {
        let inv_sum = (1.0 / sum) as f32;
        row.iter_mut().for_each(|x| *x *= -inv_sum);
        row[label] += 1.0;
    }
    at_label - max - (sum as f32).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused rows against the plain formula, in f64.
    #[test]
    fn rows_match_log_softmax_and_its_gradient() {
        let (rows, vocab, inv_t) = (5, 37, 1.0 / 0.7);
        let z: Vec<f32> = (0..rows * vocab)
            .map(|i| ((i * 7919) % 113) as f32 * 0.13 - 6.0)
            .collect();
        let labels: Vec<u32> = (0..rows as u32).map(|r| (r * 11) % vocab as u32).collect();
        let mut g = z.clone();
        let lp = rows_logps(&mut g, vocab, &labels, inv_t, true);
        let lp_only = rows_logps(&mut z.clone(), vocab, &labels, inv_t, false);
        assert_eq!(lp, lp_only);
        for r in 0..rows {
            let row: Vec<f64> = z[r * vocab..(r + 1) * vocab]
                .iter()
                .map(|&x| x as f64 * inv_t as f64)
                .collect();
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            let want = row[labels[r] as usize] - lse;
            assert!(
                (lp[r] as f64 - want).abs() < 1e-5,
                "row {r}: {} vs {want}",
                lp[r]
            );
            for (j, x) in row.iter().enumerate() {
                let p = (x - lse).exp();
                let want = if j == labels[r] as usize { 1.0 - p } else { -p };
                assert!((g[r * vocab + j] as f64 - want).abs() < 1e-6);
            }
        }
    }
}
