//! Custom autodiff ops: a forward computed on the backend without autodiff, registered as one
//! node of burn's graph with a hand-written backward (block checkpointing, chunked log-probs).

use burn::tensor::{
    backend::{AutodiffBackend, Backend},
    Tensor, TensorPrimitive,
};
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::ops::{Backward, OpsKind};
use burn_autodiff::Autodiff;
use std::any::Any;

/// burn_autodiff's tensor type (not exported by name).
pub(crate) type AutodiffTensor<IB> = burn::tensor::ops::FloatTensor<Autodiff<IB>>;

pub(crate) fn cast<T: 'static, U: 'static>(t: T) -> Option<U> {
    (Box::new(t) as Box<dyn Any>)
        .downcast::<U>()
        .ok()
        .map(|b| *b)
}

/// The autodiff form of a tensor (`B` is `Autodiff<B::InnerBackend>`, burn's only autodiff
/// backend; `None` if some other one ever shows up, and the caller keeps the plain path).
pub(crate) fn ad<B: AutodiffBackend, const D: usize>(
    t: &Tensor<B, D>,
) -> Option<AutodiffTensor<B::InnerBackend>> {
    cast::<Tensor<B, D>, Tensor<Autodiff<B::InnerBackend>, D>>(t.clone())
        .map(|t| t.into_primitive().tensor())
}

pub(crate) fn from_ad<B: AutodiffBackend, const D: usize>(
    t: AutodiffTensor<B::InnerBackend>,
) -> Option<Tensor<B, D>> {
    cast(Tensor::<Autodiff<B::InnerBackend>, D>::from_primitive(
        TensorPrimitive::Float(t),
    ))
}

pub(crate) fn float<B: Backend, const D: usize>(p: B::FloatTensorPrimitive) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// Registers `out` as the result of `op` over `parents` (N of them, known at run time).
pub(crate) fn record<IB: Backend, O, const N: usize>(
    op: O,
    parents: &[AutodiffTensor<IB>],
    state: O::State,
    out: IB::FloatTensorPrimitive,
) -> AutodiffTensor<IB>
where
    O: Backward<IB, N>,
{
    let nodes = std::array::from_fn(|i| parents[i].node.clone());
    match op
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}
