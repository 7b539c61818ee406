//! The one shared base with its role adapters and heads: the engine side of
//! `rlhf_algorithms::trainer::PolicyModel`.

mod separate_reward;
pub use separate_reward::SeparateReward;

use crate::model::lora::Adapter;
use crate::model::{Batch, Llama};
use anyhow::{Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rlhf_algorithms::trainer::{Completion, PolicyModel, Role, SamplingParams, TokenBatch};
use std::collections::BTreeMap;

/// Name under which a role's scalar head is stored in its PEFT adapter file: the `score` module
/// of `AutoModelForSequenceClassification`, which is what TRL's reward and value models use.
pub const HEAD_KEY: &str = "base_model.model.score.weight";

/// A reward source outside the shared base (a separate reward model): one reward per rollout
/// row, computed without a graph, as host values.
pub trait SequenceScorer {
    fn score_tokens(&self, batch: &TokenBatch) -> Result<Vec<f32>>;
}

/// Base model + adapters per role + scalar heads per role.
pub struct RlhfModel<B: Backend> {
    pub base: Llama<B>,
    pub adapters: BTreeMap<Role, Adapter<B>>,
    /// `[1, hidden]` linear heads (no bias, as HF's `score`).
    pub heads: BTreeMap<Role, Tensor<B, 2>>,
    /// Tokens per chunk of the vocabulary projection when computing log-probs (0 = all at
    /// once); logits are recomputed in backward, never kept (`model::checkpoint`).
    pub logits_chunk: usize,
    /// Block-level gradient checkpointing of the trained adapter's forward passes.
    pub checkpoint: bool,
    /// For decoding rollouts into text for reward functions.
    pub tokenizer: Option<crate::tokenizer::Tok>,
    /// Scores the reward role instead of a reward adapter + head on the base
    /// (`ppo.reward_model_path`).
    pub reward_model: Option<Box<dyn SequenceScorer>>,
    /// Whether passes of trained roles record a graph. Off for evaluation: burn frees a graph
    /// only at the next backward, so an evaluation of many batches would otherwise hold every
    /// batch's checkpoints until the end.
    graphs: bool,
}

/// A `[1, hidden]` head initialised as HF initialises `score`: normal(0, 0.02).
pub fn new_head<B: Backend>(hidden: usize, seed: u64, device: &B::Device) -> Tensor<B, 2> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..hidden)
        .map(|_| {
            // Box-Muller.
            let u1: f64 = rng.random::<f64>().max(1e-12);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * 0.02) as f32
        })
        .collect();
    Tensor::from_data(TensorData::new(v, [1, hidden]), device)
}

impl<B: Backend> RlhfModel<B> {
    pub fn new(base: Llama<B>) -> Self {
        Self {
            base,
            adapters: BTreeMap::new(),
            heads: BTreeMap::new(),
            logits_chunk: 0,
            checkpoint: true,
            tokenizer: None,
            reward_model: None,
            graphs: true,
        }
    }

    /// Switches graph recording of the trained roles' passes (see [`RlhfModel::graphs`]).
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = on;
    }

    /// The adapter a pass of `role` runs with: the reference has none (the base alone) unless a
    /// frozen starting adapter stands in for it (`model.reference = "initial"`).
    fn adapter(&self, role: Role) -> Result<Option<&Adapter<B>>> {
        match role {
            Role::Reference => Ok(self.adapters.get(&Role::Reference)),
            r => self
                .adapters
                .get(&r)
                .map(Some)
                .with_context(|| format!("no {} adapter is loaded", r.name())),
        }
    }

    /// A model for a training run: keeps the tokenizer for decoding rollouts, and takes
    /// `plan.logits_chunk` and `train.gradient_checkpointing` from the run.
    pub fn for_run(
        base: Llama<B>,
        tok: &crate::tokenizer::Tok,
        cfg: &crate::config::RunConfig,
    ) -> Self {
        let mut model = Self::new(base);
        model.tokenizer = Some(tok.clone());
        model.logits_chunk = cfg.plan.logits_chunk;
        model.checkpoint = cfg.train.gradient_checkpointing;
        model
    }

    /// Adds a freshly initialised adapter for `role` (PEFT's init, named after the role).
    pub fn add_new_adapter(
        &mut self,
        role: Role,
        cfg: &crate::config::LoraConfig,
        seed: u64,
    ) -> Result<()> {
        let adapter = Adapter::new(role.name(), cfg, &self.base.cfg, seed, &self.base.device)?;
        self.adapters.insert(role, adapter);
        Ok(())
    }

    /// Reads the adapter of `role` from the PEFT folder `dir` (its shape from the folder's
    /// `adapter_config.json`, every tensor checked against the base), training with `dropout`.
    /// A reward or value role also takes the folder's score head when it has one (a folder
    /// written by `rlhf rm`), so training continues from the whole reward model.
    pub fn add_adapter_from(
        &mut self,
        role: Role,
        dir: &std::path::Path,
        dropout: f32,
    ) -> Result<()> {
        let (mut adapter, mut heads) =
            Adapter::load_peft(dir, role.name(), &self.base.cfg, &self.base.device)?;
        adapter.cfg.dropout = dropout;
        self.adapters.insert(role, adapter);
        if let (Role::Reward | Role::Value, Some(head)) = (role, heads.remove(HEAD_KEY)) {
            let hidden = self.base.cfg.hidden_size;
            anyhow::ensure!(
                head.dims() == [1, hidden],
                "{}: score head has shape {:?}, expected [1, {hidden}]",
                dir.display(),
                head.dims()
            );
            self.heads.insert(role, head);
        }
        Ok(())
    }

    /// Makes a frozen copy of `role`'s adapter as it is now the reference role. It is never among
    /// the optimizer's parameters (no trainer lists the reference as trainable) and its passes
    /// run without a graph; dropout is off, so the reference is deterministic.
    pub fn freeze_reference_from(&mut self, role: Role) -> Result<()> {
        let mut frozen = self
            .adapters
            .get(&role)
            .with_context(|| format!("no {} adapter to freeze", role.name()))?
            .clone();
        frozen.name = Role::Reference.name().to_string();
        frozen.cfg.dropout = 0.0;
        frozen.training = false;
        self.adapters.insert(Role::Reference, frozen);
        Ok(())
    }

    /// The trainable tensors of `roles`, in a fixed order: each role's adapter, then its head.
    pub fn params(&self, roles: &[Role]) -> Vec<Tensor<B, 2>> {
        let mut out = Vec::new();
        for r in roles {
            if let Some(a) = self.adapters.get(r) {
                out.extend(a.tensors());
            }
            if let Some(h) = self.heads.get(r) {
                out.push(h.clone());
            }
        }
        out
    }

    /// Puts tensors back in the order `params` returned them.
    pub fn set_params(&mut self, roles: &[Role], params: Vec<Tensor<B, 2>>) {
        let mut it = params.into_iter();
        for r in roles {
            if let Some(a) = self.adapters.get_mut(r) {
                let n = a.tensors().len();
                let chunk: Vec<_> = it.by_ref().take(n).collect();
                a.set_tensors(chunk.into_iter());
            }
            if self.heads.contains_key(r) {
                let h = it.next().expect("one tensor per head");
                self.heads.insert(*r, h);
            }
        }
    }

    /// Switches dropout on or off in every adapter.
    pub fn set_training(&mut self, training: bool) {
        for (role, a) in self.adapters.iter_mut() {
            // The frozen reference scores; it never trains.
            a.training = training && *role != Role::Reference;
        }
    }
}

/// The run phase a pass belongs to, for the out-of-memory message: a pass that records a graph
/// is the train step's; the reference's and every rollout scoring pass are scoring.
fn phase_of(graph: bool) -> &'static str {
    if graph {
        "train step"
    } else {
        "scoring"
    }
}

/// Ends a scoring pass begun at `started` on `phase_clock`'s account: when it is timing, waits
/// for the pass's queued device work first.
fn scoring_done<B: Backend>(device: &B::Device, started: std::time::Instant) -> Result<()> {
    if crate::phase_clock::enabled() {
        B::sync(device).map_err(|e| anyhow::anyhow!("device synchronization failed: {e}"))?;
        crate::phase_clock::add(crate::phase_clock::Part::Scoring, started);
    }
    Ok(())
}

impl<B: AutodiffBackend> RlhfModel<B> {
    /// Log-probs of `role`; `graph`: through the training forward (differentiable), else through
    /// the frozen forward, which records nothing (the reference, and every scoring pass).
    fn logps(
        &self,
        role: Role,
        batch: &TokenBatch,
        temperature: f64,
        graph: bool,
    ) -> Result<Tensor<B, 2>> {
        anyhow::ensure!(!batch.is_empty(), "empty batch");
        anyhow::ensure!(
            batch.ids[0].len() >= 2,
            "sequences need at least two tokens"
        );
        crate::oom::enter(phase_of(graph));
        let started = std::time::Instant::now();
        let adapter = self.adapter(role)?;
        let device = self.base.device.clone();
        let (b, t, h) = (batch.len(), batch.ids[0].len(), self.base.cfg.hidden_size);
        let input = Batch::new(&batch.ids, batch.valid.clone(), &device);
        let hidden = if !graph {
            self.base.forward_hidden_frozen(&input, adapter)
        } else {
            self.base
                .forward_hidden_train(&input, adapter, self.checkpoint)
        };
        // Logits at position t-1 predict token t: drop the last position before the vocab projection.
        let hidden = hidden
            .slice([0..b, 0..t - 1, 0..h])
            .reshape([b * (t - 1), h]);
        let labels: Vec<i64> = batch
            .ids
            .iter()
            .flat_map(|r| r[1..].iter().map(|&x| x as i64))
            .collect();
        let lp = crate::model::logps::token_logps(
            &self.base,
            hidden,
            labels,
            temperature,
            self.logits_chunk,
        )
        .reshape([b, t - 1]);
        let lp = Tensor::cat(vec![Tensor::zeros([b, 1], &device), lp], 1);
        let mask: Vec<f32> = batch
            .loss_mask
            .iter()
            .flat_map(|r| r.iter().map(|&m| if m { 1.0 } else { 0.0 }))
            .collect();
        let out = lp * Tensor::<B, 2>::from_data(TensorData::new(mask, [b, t]), &device);
        if graph {
            return Ok(out);
        }
        scoring_done::<B>(&device, started)?;
        Ok(out.detach())
    }

    /// The scalar head of `role` at every position; `graph` as in [`Self::logps`] (without it,
    /// the head's product runs on the plain backend too).
    fn heads_of(&self, role: Role, batch: &TokenBatch, graph: bool) -> Result<Tensor<B, 2>> {
        let head = self
            .heads
            .get(&role)
            .with_context(|| format!("no {} head is loaded", role.name()))?;
        crate::oom::enter(phase_of(graph));
        let adapter = self.adapter(role)?;
        let device = self.base.device.clone();
        let input = Batch::new(&batch.ids, batch.valid.clone(), &device);
        fn product<X: Backend>(hidden: Tensor<X, 3>, head: Tensor<X, 2>) -> Tensor<X, 2> {
            let [b, t, h] = hidden.dims();
            hidden
                .reshape([b * t, h])
                .matmul(head.transpose())
                .reshape([b, t])
        }
        if !graph {
            let started = std::time::Instant::now();
            let hidden = self.base.forward_hidden_frozen(&input, adapter);
            let scores = product(hidden.inner(), head.clone().inner());
            scoring_done::<B>(&device, started)?;
            return Ok(Tensor::from_inner(scores));
        }
        let hidden = self
            .base
            .forward_hidden_train(&input, adapter, self.checkpoint);
        Ok(product(hidden, head.clone()))
    }
}

impl<B: AutodiffBackend> PolicyModel<B> for RlhfModel<B> {
    fn token_logps(
        &self,
        role: Role,
        batch: &TokenBatch,
        temperature: f64,
    ) -> Result<Tensor<B, 2>> {
        // The reference never trains: its passes record nothing.
        self.logps(
            role,
            batch,
            temperature,
            self.graphs && role != Role::Reference,
        )
    }

    fn score_logps(
        &self,
        role: Role,
        batch: &TokenBatch,
        temperature: f64,
    ) -> Result<Tensor<B, 2>> {
        self.logps(role, batch, temperature, false)
    }

    fn head_scores(&self, role: Role, batch: &TokenBatch) -> Result<Tensor<B, 2>> {
        self.heads_of(role, batch, self.graphs)
    }

    fn score_heads(&self, role: Role, batch: &TokenBatch) -> Result<Tensor<B, 2>> {
        self.heads_of(role, batch, false)
    }

    fn sequence_scores(&self, role: Role, batch: &TokenBatch) -> Result<Tensor<B, 1>> {
        match (role, &self.reward_model) {
            (Role::Reward, Some(rm)) => {
                let scores = rm.score_tokens(batch)?;
                let n = scores.len();
                Ok(Tensor::from_data(
                    TensorData::new(scores, [n]),
                    &self.base.device,
                ))
            }
            _ => Ok(rlhf_algorithms::rm::at_last_token(
                self.score_heads(role, batch)?,
                batch,
            )),
        }
    }

    fn generate(
        &self,
        role: Role,
        prompts: &[Vec<u32>],
        params: &SamplingParams,
        seed: u64,
    ) -> Result<Vec<Completion>> {
        crate::oom::enter("rollout");
        // Sampling needs no gradients: run on the backend without autodiff, so no graph is
        // recorded (tensors are shared, not copied).
        let adapter = self.adapter(role)?.map(|a| a.inner());
        let base = self.base.inner();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        crate::generate::generate(&base, adapter.as_ref(), prompts, params, &mut rng)
    }

    fn decode(&self, tokens: &[u32]) -> Result<String> {
        let tok = self
            .tokenizer
            .as_ref()
            .context("no tokenizer attached to the model")?;
        tok.decode(tokens, true)
    }

    fn device(&self) -> B::Device {
        self.base.device.clone()
    }
}
