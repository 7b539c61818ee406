//! The one run loop every algorithm shares: seeded data order, micro-batches with gradient
//! accumulation, global-norm clipping, AdamW with a schedule, a NaN/inf guard, a progress bar,
//! JSONL metrics, atomic checkpoints and exact resume.

use crate::config::RunConfig;
use crate::data::batch::epoch_order;
use crate::engine::{RlhfModel, HEAD_KEY};
use crate::optim::{learning_rate, AdamW};
use crate::rundir::{fault_point, MetricsLog};
use anyhow::{bail, Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use rlhf_algorithms::trainer::{Metrics, Role, Trainer};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What a checkpoint records besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    pub algorithm: String,
    /// Optimizer steps completed.
    pub global_step: usize,
    pub total_steps: usize,
    /// Non-finite steps in a row at the time of the checkpoint.
    pub nonfinite_in_row: usize,
    /// Non-finite steps skipped so far.
    pub skipped_steps: usize,
    pub seed: u64,
    /// The base model the adapters were trained on (`model.path`).
    pub model: String,
}

/// Micro-batch `k` (global index) of the run: the examples it holds.
fn micro_batch(n: usize, batch: usize, seed: u64, k: usize) -> Vec<usize> {
    let per_epoch = n.div_ceil(batch);
    let epoch = k / per_epoch;
    let within = k % per_epoch;
    let order = epoch_order(n, seed, epoch as u64);
    order[within * batch..((within + 1) * batch).min(n)].to_vec()
}

/// Optimizer steps of the whole run.
pub fn total_steps(cfg: &RunConfig, n_examples: usize, per_batch: usize, reuse: usize) -> usize {
    let t = &cfg.train;
    if t.max_steps > 0 {
        return t.max_steps;
    }
    let micro_per_epoch = n_examples.div_ceil(per_batch.max(1));
    (micro_per_epoch / t.gradient_accumulation_steps).max(1) * t.epochs * reuse.max(1)
}

/// Latest `checkpoint-N` folder under `dir`.
pub fn latest_checkpoint(dir: &Path) -> Result<PathBuf> {
    let mut best: Option<(usize, PathBuf)> = None;
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list checkpoints", dir.display()))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<usize>().ok())
        {
            if best.as_ref().map(|b| n > b.0).unwrap_or(true) {
                best = Some((n, e.path()));
            }
        }
    }
    best.map(|b| b.1)
        .with_context(|| format!("{}: no checkpoint-N folder to resume from", dir.display()))
}

/// Writes role adapters (PEFT layout, with the head as `score`) into `dir/<role>/`.
pub fn save_roles<B: Backend>(
    model: &RlhfModel<B>,
    roles: &[Role],
    dir: &Path,
    base_name: &str,
) -> Result<()> {
    for r in roles {
        if let Some(a) = model.adapters.get(r) {
            let extra: Vec<(String, Tensor<B, 2>)> = model
                .heads
                .get(r)
                .map(|h| vec![(HEAD_KEY.to_string(), h.clone())])
                .unwrap_or_default();
            a.save_peft(&dir.join(r.name()), base_name, &extra)?;
        }
    }
    Ok(())
}

/// Reads role adapters (and heads) written by `save_roles` back into the model.
pub fn load_roles<B: Backend>(model: &mut RlhfModel<B>, roles: &[Role], dir: &Path) -> Result<()> {
    let device = model.base.device.clone();
    for r in roles {
        let (a, mut extra) = crate::model::lora::Adapter::<B>::load_peft(
            &dir.join(r.name()),
            r.name(),
            &model.base.cfg,
            &device,
        )?;
        model.adapters.insert(*r, a);
        if let Some(h) = extra.remove(HEAD_KEY) {
            model.heads.insert(*r, h);
        }
    }
    Ok(())
}

/// Each metric's mean over the micro-batches that logged it (KTO logs `rewards/chosen` only for
/// batches with desirable rows).
fn mean_metrics(all: &[Metrics]) -> Metrics {
    let mut sums: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
    for m in all {
        for (k, v) in m {
            let e = sums.entry(k.clone()).or_insert((0.0, 0));
            e.0 += v;
            e.1 += 1;
        }
    }
    sums.into_iter()
        .map(|(k, (s, n))| (k, s / n as f64))
        .collect()
}

/// Options of one `train` call.
pub struct RunOptions {
    pub resume: Option<PathBuf>,
    pub base_name: String,
    pub config_text: String,
}

/// A part of one optimizer step, as [`StepObserver::phase_done`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPhase {
    /// A micro-batch's loss is computed (for GRPO this includes the rollout and reward scoring).
    Forward,
    /// A micro-batch's gradients are computed and accumulated.
    Backward,
    /// Clipping and the AdamW update are done.
    Optimizer,
}

/// Watches the run loop from outside without changing what it does: `rlhf bench` times steps
/// and samples device memory through it. Every method does nothing by default.
pub trait StepObserver {
    /// Before any work of optimizer step `step` (0-based).
    fn step_started(&mut self, _step: usize) {}
    /// After each phase; forward and backward are reported once per loss part of a micro-batch.
    fn phase_done(&mut self, _phase: StepPhase) {}
    /// After the optimizer update of `step`, before metrics and checkpoints are written (so an
    /// observer timing steps does not count that I/O).
    fn step_finished(&mut self, _step: usize) {}
}

/// The observer of a plain run: sees nothing.
impl StepObserver for () {}

/// Runs training to the end. Returns the final metrics of the last logged step.
pub fn train<B, T>(
    cfg: &RunConfig,
    model: &mut RlhfModel<B>,
    trainer: &mut T,
    examples: &[T::Example],
    opts: &RunOptions,
) -> Result<Metrics>
where
    B: AutodiffBackend,
    T: Trainer<B>,
{
    train_observed(cfg, model, trainer, examples, opts, &mut ())
}

/// [`train`] with `observer` told where each optimizer step is.
pub fn train_observed<B, T>(
    cfg: &RunConfig,
    model: &mut RlhfModel<B>,
    trainer: &mut T,
    examples: &[T::Example],
    opts: &RunOptions,
    observer: &mut dyn StepObserver,
) -> Result<Metrics>
where
    B: AutodiffBackend,
    T: Trainer<B>,
{
    anyhow::ensure!(!examples.is_empty(), "the training set is empty");
    let t = &cfg.train;
    let out_dir = &t.output_dir;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("{}: cannot create output_dir", out_dir.display()))?;
    let roles = trainer.trainable_roles();
    let device = model.base.device.clone();
    let shapes: Vec<[usize; 2]> = model.params(&roles).iter().map(|p| p.dims()).collect();
    let mut opt = AdamW::<B::InnerBackend>::new(&cfg.optimizer, &shapes, &device);
    let reuse = trainer.rollout_reuse().max(1);
    let total = total_steps(
        cfg,
        examples.len(),
        trainer.examples_per_batch(t.batch_size),
        reuse,
    );
    let warmup = if t.warmup_steps > 0 {
        t.warmup_steps
    } else {
        (t.warmup_ratio * total as f64).ceil() as usize
    };
    let mut state = TrainerState {
        algorithm: trainer.name().to_string(),
        global_step: 0,
        total_steps: total,
        nonfinite_in_row: 0,
        skipped_steps: 0,
        seed: t.seed,
        model: opts.base_name.clone(),
    };
    if let Some(dir) = &opts.resume {
        let text = std::fs::read_to_string(dir.join("trainer_state.json")).with_context(|| {
            format!(
                "{}: not a checkpoint (trainer_state.json missing)",
                dir.display()
            )
        })?;
        state = serde_json::from_str(&text)
            .with_context(|| format!("{}: trainer_state.json", dir.display()))?;
        if state.model != opts.base_name {
            bail!(
                "{}: checkpoint was trained on model `{}`, not `{}`",
                dir.display(),
                state.model,
                opts.base_name
            );
        }
        if state.algorithm != trainer.name() {
            bail!(
                "{}: checkpoint is from `{}`, not `{}`",
                dir.display(),
                state.algorithm,
                trainer.name()
            );
        }
        load_roles(model, &roles, dir)?;
        opt.load(&dir.join("optimizer.safetensors"), &device)?;
        let tpath = dir.join("trainer.json");
        let text = std::fs::read_to_string(&tpath)
            .with_context(|| format!("{}: cannot read", tpath.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", tpath.display()))?;
        trainer
            .load_state(&v)
            .with_context(|| format!("{}", tpath.display()))?;
        eprintln!(
            "resuming from {} at step {}",
            dir.display(),
            state.global_step
        );
    }

    let mut log = MetricsLog::open(out_dir, state.global_step)?;
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(trainer.name().to_string());
    bar.set_position(state.global_step as u64);

    let accum = t.gradient_accumulation_steps;
    let mut last = Metrics::new();
    model.set_training(true);
    while state.global_step < total {
        let step = state.global_step;
        fault_point("step", step + 1)?;
        observer.step_started(step);
        let started = std::time::Instant::now();
        B::seed(&device, t.seed.wrapping_add(step as u64));
        let params: Vec<Tensor<B, 2>> = model
            .params(&roles)
            .into_iter()
            .map(|p| p.detach().require_grad())
            .collect();
        model.set_params(&roles, params.clone());
        let mut grads: Vec<Option<Tensor<B::InnerBackend, 2>>> = vec![None; params.len()];
        let mut metrics = Vec::with_capacity(accum);
        let mut tokens = 0;
        let mut finite = true;
        for k in 0..accum {
            let per_batch = trainer.examples_per_batch(t.batch_size);
            // Steps that reuse a rollout (GRPO's num_iterations) see the same examples.
            let idx = micro_batch(
                examples.len(),
                per_batch,
                t.seed,
                (step / reuse) * accum + k,
            );
            let batch: Vec<T::Example> = idx.iter().map(|&i| examples[i].clone()).collect();
            let mut out = trainer.loss(&*model, &batch, true)?;
            let mut batch_metrics = Metrics::new();
            // A loss may come in parts (`StepOutput::then`): each is back-propagated, its graph
            // freed, before the next part's forward runs.
            loop {
                observer.phase_done(StepPhase::Forward);
                tokens += out.tokens;
                batch_metrics.append(&mut out.metrics);
                let loss = out.loss / accum as f64;
                let value = loss.clone().into_scalar().elem_f64();
                finite &= value.is_finite();
                crate::oom::enter("train step");
                let g = loss.backward();
                for (acc, p) in grads.iter_mut().zip(&params) {
                    if let Some(gp) = p.grad(&g) {
                        *acc = Some(match acc.take() {
                            Some(a) => a + gp,
                            None => gp,
                        });
                    }
                }
                drop(g);
                observer.phase_done(StepPhase::Backward);
                match out.then {
                    Some(next) => out = next(&*model)?,
                    None => break,
                }
            }
            metrics.push(batch_metrics);
        }
        let grads: Vec<Tensor<B::InnerBackend, 2>> = grads
            .into_iter()
            .zip(&params)
            .map(|(g, p)| g.unwrap_or_else(|| Tensor::zeros(p.dims(), &device)))
            .collect();
        let grad_norm = crate::optim::grad_norm(&grads)?;
        finite &= grad_norm.is_finite();
        let mut m = mean_metrics(&metrics);
        let lr = learning_rate(t.lr_scheduler, t.learning_rate, step, warmup, total);
        let inner: Vec<Tensor<B::InnerBackend, 2>> =
            params.iter().map(|p| p.clone().inner()).collect();
        if finite {
            state.nonfinite_in_row = 0;
            let scale = if t.max_grad_norm > 0.0 && grad_norm > t.max_grad_norm {
                t.max_grad_norm / (grad_norm + 1e-6)
            } else {
                1.0
            };
            let updated = opt.update(inner, grads, lr, scale);
            model.set_params(
                &roles,
                updated.into_iter().map(Tensor::from_inner).collect(),
            );
        } else {
            state.nonfinite_in_row += 1;
            state.skipped_steps += 1;
            model.set_params(&roles, inner.into_iter().map(Tensor::from_inner).collect());
            if state.nonfinite_in_row >= t.max_nonfinite_steps {
                return Err(crate::finite::diverged(format!(
                    "{} non-finite losses or gradients in a row at step {} (lower train.learning_rate, check the data); the last checkpoint in {} is intact",
                    state.nonfinite_in_row,
                    step + 1,
                    out_dir.display()
                )));
            }
        }
        observer.phase_done(StepPhase::Optimizer);
        observer.step_finished(step);
        state.global_step += 1;
        let secs = started.elapsed().as_secs_f64();
        m.insert("grad_norm".into(), grad_norm);
        m.insert("learning_rate".into(), lr);
        m.insert("tokens_per_sec".into(), tokens as f64 / secs.max(1e-9));
        m.insert("skipped_steps".into(), state.skipped_steps as f64);
        bar.set_message(format!(
            "loss {:.4} {} {:.0} tok/s",
            m.get("loss").copied().unwrap_or(f64::NAN),
            m.get("rewards/margins")
                .or(m.get("margin"))
                .map(|v| format!("margin {v:.3}"))
                .unwrap_or_default(),
            tokens as f64 / secs.max(1e-9)
        ));
        bar.inc(1);
        if state.global_step.is_multiple_of(t.logging_steps.max(1)) || state.global_step == total {
            let mut line = serde_json::Map::new();
            line.insert("step".into(), state.global_step.into());
            line.insert(
                "epoch".into(),
                serde_json::json!(
                    (state.global_step * accum * trainer.examples_per_batch(t.batch_size)) as f64
                        / reuse as f64
                        / examples.len() as f64
                ),
            );
            for (k, v) in &m {
                line.insert(k.clone(), serde_json::json!(v));
            }
            log.append(&serde_json::Value::Object(line))?;
            fault_point("metrics", state.global_step)?;
        }
        last = m;
        if state.global_step.is_multiple_of(t.save_steps.max(1)) || state.global_step == total {
            if state.global_step == total {
                crate::finite::ensure_some_finite_step(state.skipped_steps, state.global_step)?;
            }
            log.sync()?;
            let extra = serde_json::to_string(&trainer.state()?)?;
            crate::oom::enter("checkpoint");
            save_checkpoint(model, &roles, &opt, &state, &extra, out_dir, opts)?;
        }
    }
    bar.finish();
    model.set_training(false);
    crate::finite::ensure_some_finite_step(state.skipped_steps, state.global_step)?;
    fault_point("final", state.global_step)?;
    save_roles(model, &roles, out_dir, &opts.base_name)?;
    Ok(last)
}

/// Writes `checkpoint-N` atomically: everything goes into a temporary folder that is renamed
/// into place only when complete, and that is removed when any part of it fails (a full disk).
fn save_checkpoint<B: AutodiffBackend>(
    model: &RlhfModel<B>,
    roles: &[Role],
    opt: &AdamW<B::InnerBackend>,
    state: &TrainerState,
    trainer_json: &str,
    out_dir: &Path,
    opts: &RunOptions,
) -> Result<()> {
    let tmp = out_dir.join(format!(".checkpoint-{}.tmp", state.global_step));
    let written = write_checkpoint(model, roles, opt, state, trainer_json, &tmp, opts);
    if written.is_err() {
        std::fs::remove_dir_all(&tmp).ok();
    }
    written?;
    fault_point("checkpoint-rename", state.global_step)?;
    let final_dir = out_dir.join(format!("checkpoint-{}", state.global_step));
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).ok();
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("{}: cannot move checkpoint into place", final_dir.display()))?;
    fault_point("checkpoint", state.global_step)
}

/// Everything of checkpoint `state.global_step` into the temporary folder `tmp`.
fn write_checkpoint<B: AutodiffBackend>(
    model: &RlhfModel<B>,
    roles: &[Role],
    opt: &AdamW<B::InnerBackend>,
    state: &TrainerState,
    trainer_json: &str,
    tmp: &Path,
    opts: &RunOptions,
) -> Result<()> {
    if tmp.exists() {
        std::fs::remove_dir_all(tmp).ok();
    }
    std::fs::create_dir_all(tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    save_roles(model, roles, tmp, &opts.base_name)?;
    fault_point("checkpoint-write", state.global_step)?;
    opt.save(&tmp.join("optimizer.safetensors"))?;
    crate::util::write_atomic(
        &tmp.join("trainer_state.json"),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    crate::util::write_atomic(&tmp.join("run.toml"), opts.config_text.as_bytes())?;
    crate::util::write_atomic(&tmp.join("trainer.json"), trainer_json.as_bytes())
}

/// Evaluation: the trainer's metrics averaged over `examples`, in batches, without gradients.
pub fn evaluate<B, T>(
    cfg: &RunConfig,
    model: &mut RlhfModel<B>,
    trainer: &mut T,
    examples: &[T::Example],
) -> Result<Metrics>
where
    B: AutodiffBackend,
    T: Trainer<B>,
{
    model.set_training(false);
    crate::oom::enter("eval");
    // No graphs: nothing back-propagates here, and a recorded graph would live until the next
    // backward (TRL evaluates under `torch.no_grad()` too).
    model.set_graphs(false);
    let mut all = Vec::new();
    let mut run = || -> Result<()> {
        for chunk in examples.chunks(trainer.examples_per_batch(cfg.train.batch_size).max(1)) {
            let out = trainer.loss(&*model, chunk, false)?.complete(&*model)?;
            all.push(out.metrics);
        }
        Ok(())
    };
    let result = run();
    model.set_graphs(true);
    result?;
    Ok(mean_metrics(&all))
}

trait ElemF64 {
    fn elem_f64(self) -> f64;
}

impl<E: burn::tensor::ElementConversion> ElemF64 for E {
    fn elem_f64(self) -> f64 {
        self.elem::<f64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_cover_each_epoch_once() {
        let mut seen: Vec<usize> = (0..4).flat_map(|k| micro_batch(10, 3, 7, k)).collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }
}
