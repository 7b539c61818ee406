//! The block MLP's row chunks: long rows run their `[rows, intermediate]` products a chunk of
//! rows at a time, forward and backward, so the step's memory stays linear in the row length.

use burn::tensor::{backend::Backend, Tensor};

/// The block forward's MLP runs at most this many bytes of each f32 `[rows, intermediate]`
/// product at once: long rows (8b, 16K-token pairs: 1.75 GiB each) go in row chunks. The
/// bound sits above every measured run's products (the largest: 544 MiB, 20b DPO with 2 pairs
/// of 2,176-token rows), which keep their single pass.
pub const MLP_FORWARD_BOUND: usize = 1 << 30;

/// Rows of the block forward's MLP computed at once ([`MLP_FORWARD_BOUND`]); all rows under
/// LoRA dropout, whose masks are drawn for the whole pass.
pub fn mlp_forward_rows(rows: usize, inter: usize, dropout: bool) -> usize {
    rows_within(rows, inter, MLP_FORWARD_BYTES.with(|b| b.get()), dropout)
}

/// Rows per chunk such that a `[rows, inter]` f32 tensor stays within `bound` bytes, in
/// near-equal chunks; all rows under LoRA dropout (its masks are drawn for whole projections).
pub(crate) fn rows_within(rows: usize, inter: usize, bound: usize, dropout: bool) -> usize {
    if dropout {
        return rows;
    }
    let chunks = (rows * inter * 4).div_ceil(bound.max(1)).max(1);
    rows.div_ceil(chunks)
}

/// `f` over chunks of `chunk` rows (of the `b x t`) of `[b, t, *]` tensors taken together, its
/// outputs concatenated back to `[b, t, *]`; one call on the whole tensors when they fit.
pub(crate) fn in_row_chunks<B: Backend, const N: usize>(
    xs: [Tensor<B, 3>; N],
    chunk: usize,
    mut f: impl FnMut([Tensor<B, 3>; N]) -> Tensor<B, 3>,
) -> Tensor<B, 3> {
    let [b, t, _] = xs[0].dims();
    let rows = b * t;
    if chunk >= rows {
        return f(xs);
    }
    let flat = xs.map(|x| {
        let w = x.dims()[2];
        x.reshape([1, rows, w])
    });
    let parts: Vec<Tensor<B, 3>> = (0..rows)
        .step_by(chunk)
        .map(|s| {
            let r = s..(s + chunk).min(rows);
            f(std::array::from_fn(|i| {
                let w = flat[i].dims()[2];
                flat[i].clone().slice([0..1, r.clone(), 0..w])
            }))
        })
        .collect();
    let out = Tensor::cat(parts, 1);
    let w = out.dims()[2];
    out.reshape([b, t, w])
}

thread_local! {
    /// The bound in force on this thread; a test lowers it to chunk a tiny model's MLP.
    static MLP_FORWARD_BYTES: std::cell::Cell<usize> = const { std::cell::Cell::new(MLP_FORWARD_BOUND) };
}

/// Sets this thread's [`MLP_FORWARD_BOUND`] (tests chunk tiny models with it).
pub fn set_mlp_forward_bound(bytes: usize) {
    MLP_FORWARD_BYTES.with(|b| b.set(bytes));
}
