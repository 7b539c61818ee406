//! AdamW over adapter and head parameters, with PyTorch's update order, and the learning-rate
//! schedules of transformers' `get_scheduler`. In paged mode the moments live in host memory and
//! visit the device only for their parameter's update, so optimizer state costs no GPU memory at
//! rest; both modes run the same arithmetic.

use crate::config::{LrScheduler, OptimizerConfig};
use anyhow::{ensure, Context, Result};
use burn::tensor::{backend::Backend, ElementConversion, Tensor, TensorData};
use std::path::Path;

enum Moments<B: Backend> {
    Resident {
        m: Tensor<B, 2>,
        v: Tensor<B, 2>,
    },
    Paged {
        m: Vec<f32>,
        v: Vec<f32>,
        shape: [usize; 2],
    },
}

pub struct AdamW<B: Backend> {
    pub cfg: OptimizerConfig,
    /// Updates done so far (Adam's `t`).
    pub step: u64,
    state: Vec<Moments<B>>,
}

fn host<B: Backend>(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap_or_default()
}

impl<B: Backend> AdamW<B> {
    pub fn new(cfg: &OptimizerConfig, shapes: &[[usize; 2]], device: &B::Device) -> Self {
        let state = shapes
            .iter()
            .map(|&s| {
                if cfg.paged {
                    Moments::Paged {
                        m: vec![0.0; s[0] * s[1]],
                        v: vec![0.0; s[0] * s[1]],
                        shape: s,
                    }
                } else {
                    Moments::Resident {
                        m: Tensor::zeros(s, device),
                        v: Tensor::zeros(s, device),
                    }
                }
            })
            .collect();
        Self {
            cfg: cfg.clone(),
            step: 0,
            state,
        }
    }

    /// One AdamW step on gradients scaled by `clip` (gradient clipping's factor, 1 for none);
    /// returns the new parameters. On CUDA each resident tensor's step is one fused launch
    /// (`cuda::train_ops::try_adamw`), the same arithmetic as the tensor ops below.
    pub fn update(
        &mut self,
        params: Vec<Tensor<B, 2>>,
        grads: Vec<Tensor<B, 2>>,
        lr: f64,
        clip: f64,
    ) -> Vec<Tensor<B, 2>> {
        self.step += 1;
        let (b1, b2, eps, wd) = (
            self.cfg.beta1,
            self.cfg.beta2,
            self.cfg.eps,
            self.cfg.weight_decay,
        );
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2_sqrt = (1.0 - b2.powi(self.step as i32)).sqrt();
        let step_size = lr / bc1;
        params
            .into_iter()
            .zip(grads)
            .zip(self.state.iter_mut())
            .map(|((p, g), st)| {
                #[cfg(feature = "cuda")]
                if let Moments::Resident { m, v } = st {
                    let s = crate::cuda::train_ops::AdamwScalars {
                        clip: clip as f32,
                        decay: (1.0 - lr * wd) as f32,
                        b1: b1 as f32,
                        one_minus_b1: (1.0 - b1) as f32,
                        b2: b2 as f32,
                        one_minus_b2: (1.0 - b2) as f32,
                        eps: eps as f32,
                        bc2_sqrt: bc2_sqrt as f32,
                        step_size: step_size as f32,
                    };
                    if let Some((p, nm, nv)) = crate::cuda::train_ops::try_adamw(&p, &g, m, v, &s) {
                        *m = nm;
                        *v = nv;
                        return p;
                    }
                }
                let g = if clip < 1.0 { g * clip } else { g };
                let device = p.device();
                let (m, v) = match st {
                    Moments::Resident { m, v } => (m.clone(), v.clone()),
                    Moments::Paged { m, v, shape } => (
                        Tensor::from_data(TensorData::new(std::mem::take(m), *shape), &device),
                        Tensor::from_data(TensorData::new(std::mem::take(v), *shape), &device),
                    ),
                };
                let p = if wd != 0.0 { p * (1.0 - lr * wd) } else { p };
                let m = m * b1 + g.clone() * (1.0 - b1);
                let v = v * b2 + g.clone() * g * (1.0 - b2);
                let denom = v.clone().sqrt() / bc2_sqrt + eps;
                let p = p - m.clone() / denom * step_size;
                match st {
                    Moments::Resident { m: sm, v: sv } => {
                        *sm = m;
                        *sv = v;
                    }
                    Moments::Paged { m: sm, v: sv, .. } => {
                        *sm = host(m);
                        *sv = host(v);
                    }
                }
                p
            })
            .collect()
    }

    /// Saves moments (and the step) as safetensors.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (i, st) in self.state.iter().enumerate() {
            let (m, v, shape) = match st {
                Moments::Resident { m, v } => (host(m.clone()), host(v.clone()), m.dims()),
                Moments::Paged { m, v, shape } => (m.clone(), v.clone(), *shape),
            };
            for (k, vals) in [("m", m), ("v", v)] {
                named.push((
                    format!("{k}.{i}"),
                    shape.to_vec(),
                    vals.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ));
            }
        }
        let views = named
            .iter()
            .map(|(n, s, b)| {
                Ok((
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?,
                ))
            })
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("step".to_string(), self.step.to_string());
        crate::util::write_atomic(path, &safetensors::serialize(views, &Some(meta))?)
    }

    /// Restores what `save` wrote; shapes must match the current parameters.
    pub fn load(&mut self, path: &Path, device: &B::Device) -> Result<()> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("{}: cannot read optimizer state", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{}: not a valid safetensors file", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        self.step = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("{}: `step` missing", path.display()))?;
        for (i, state) in self.state.iter_mut().enumerate() {
            let read = |k: &str| -> Result<(Vec<f32>, [usize; 2])> {
                let view = st
                    .tensor(&format!("{k}.{i}"))
                    .with_context(|| format!("{}: `{k}.{i}` missing", path.display()))?;
                ensure!(
                    view.shape().len() == 2,
                    "{}: `{k}.{i}` is not 2-D",
                    path.display()
                );
                Ok((
                    crate::model::weights::view_to_f32(&view)?,
                    [view.shape()[0], view.shape()[1]],
                ))
            };
            let (m, shape) = read("m")?;
            let (v, _) = read("v")?;
            let expected = match state {
                Moments::Resident { m, .. } => m.dims(),
                Moments::Paged { shape, .. } => *shape,
            };
            ensure!(
                shape == expected,
                "{}: moment {i} has shape {shape:?}, expected {expected:?}",
                path.display()
            );
            *state = match state {
                Moments::Resident { .. } => Moments::Resident {
                    m: Tensor::from_data(TensorData::new(m, shape), device),
                    v: Tensor::from_data(TensorData::new(v, shape), device),
                },
                Moments::Paged { .. } => Moments::Paged { m, v, shape },
            };
        }
        Ok(())
    }
}

/// The global L2 norm of `grads` (as `torch.nn.utils.clip_grad_norm_` computes it: the square
/// root of the summed squares of every tensor), with one device read on CUDA instead of one
/// per tensor. Non-finite when any gradient is.
pub fn grad_norm<B: Backend>(grads: &[Tensor<B, 2>]) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if let Some(sums) = crate::cuda::train_ops::try_sum_squares(grads) {
        return Ok(sums?.iter().map(|&s| s as f64).sum::<f64>().sqrt());
    }
    Ok(grads
        .iter()
        .map(|g| g.clone().powi_scalar(2).sum().into_scalar().elem::<f64>())
        .sum::<f64>()
        .sqrt())
}

/// Learning rate at optimizer step `step` (0-based) of `total`, as transformers' schedulers
/// (warmup linear from 0, then constant, linear decay to 0, or half-cosine to 0).
pub fn learning_rate(
    kind: LrScheduler,
    base: f64,
    step: usize,
    warmup: usize,
    total: usize,
) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let rest = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / rest;
    match kind {
        LrScheduler::Constant => base,
        LrScheduler::Linear => base * (1.0 - progress).max(0.0),
        LrScheduler::Cosine => {
            base * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    type B = NdArray<f32>;

    fn t(v: Vec<f32>) -> Tensor<B, 2> {
        let n = v.len();
        Tensor::from_data(TensorData::new(v, [1, n]), &Default::default())
    }

    #[test]
    fn adamw_matches_hand_computed_pytorch_step() {
        // torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01), one step
        // from p=1, g=0.5: p <- p*(1-0.1*0.01) = 0.999; m = 0.05, v = 0.00025;
        // m_hat = 0.5, sqrt(v_hat) = 0.5 -> p = 0.999 - 0.1 * 0.5/(0.5+1e-8) = 0.899.
        let cfg = OptimizerConfig {
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut opt = AdamW::<B>::new(&cfg, &[[1, 1]], &Default::default());
        let p = opt.update(vec![t(vec![1.0])], vec![t(vec![0.5])], 0.1, 1.0);
        let v = host(p[0].clone())[0];
        assert!((v - 0.899).abs() < 1e-6, "{v}");
    }

    #[test]
    fn clipping_scales_the_gradient_and_the_norm_is_global() {
        // update(g, clip) is update(clip * g): torch's clip_grad_norm_ scales the gradients in
        // place before the optimizer step.
        let cfg = OptimizerConfig {
            weight_decay: 0.01,
            ..Default::default()
        };
        let (mut a, mut b) = (
            AdamW::<B>::new(&cfg, &[[1, 3]], &Default::default()),
            AdamW::<B>::new(&cfg, &[[1, 3]], &Default::default()),
        );
        let p = t(vec![1.0, -2.0, 0.5]);
        let x = a.update(vec![p.clone()], vec![t(vec![0.6, -0.2, 1.4])], 0.1, 0.5);
        let y = b.update(vec![p], vec![t(vec![0.3, -0.1, 0.7])], 0.1, 1.0);
        assert_eq!(host(x[0].clone()), host(y[0].clone()));
        // sqrt(3^2 + 4^2 + 12^2) over two tensors.
        let n = grad_norm(&[t(vec![3.0, 4.0]), t(vec![12.0])]).unwrap();
        assert!((n - 13.0).abs() < 1e-9, "{n}");
    }

    #[test]
    fn paged_and_resident_agree_and_state_round_trips() {
        let shapes = [[1, 3]];
        let mut a = AdamW::<B>::new(&OptimizerConfig::default(), &shapes, &Default::default());
        let paged = OptimizerConfig {
            paged: true,
            ..Default::default()
        };
        let mut b = AdamW::<B>::new(&paged, &shapes, &Default::default());
        let (mut pa, mut pb) = (t(vec![1.0, -2.0, 0.5]), t(vec![1.0, -2.0, 0.5]));
        for k in 0..5 {
            let g = t(vec![0.3 * k as f32, -0.1, 0.7]);
            pa = a.update(vec![pa], vec![g.clone()], 0.01, 1.0).remove(0);
            pb = b.update(vec![pb], vec![g], 0.01, 1.0).remove(0);
        }
        assert_eq!(host(pa.clone()), host(pb));
        let dir = tempfile::tempdir().unwrap();
        a.save(&dir.path().join("o.safetensors")).unwrap();
        let mut c = AdamW::<B>::new(&OptimizerConfig::default(), &shapes, &Default::default());
        c.load(&dir.path().join("o.safetensors"), &Default::default())
            .unwrap();
        assert_eq!(c.step, 5);
        let g = t(vec![0.1, 0.2, 0.3]);
        let x = a.update(vec![pa.clone()], vec![g.clone()], 0.01, 1.0);
        let y = c.update(vec![pa], vec![g], 0.01, 1.0);
        assert_eq!(host(x[0].clone()), host(y[0].clone()));
    }

    #[test]
    fn schedules() {
        assert_eq!(learning_rate(LrScheduler::Linear, 1.0, 0, 2, 10), 0.0);
        assert_eq!(learning_rate(LrScheduler::Linear, 1.0, 1, 2, 10), 0.5);
        assert_eq!(learning_rate(LrScheduler::Linear, 1.0, 2, 2, 10), 1.0);
        assert!((learning_rate(LrScheduler::Linear, 1.0, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert!((learning_rate(LrScheduler::Cosine, 1.0, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(learning_rate(LrScheduler::Constant, 1.0, 9, 2, 10), 1.0);
    }
}
