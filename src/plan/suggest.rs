//! Suggestions: re-plan variants of the config and keep the ones that fit.

use super::evaluate::plan_with;
use super::{Algo, Phase, Plan, RewardSource, Suggestion, GIB, T_DENSE, T_LINEARS, T_LOGITS};
use crate::config::RunConfig;
use crate::model::config::LlamaConfig;

/// Largest `x` in `[lo, hi]` with `ok(x)`, for `ok` true up to some point and false after.
fn largest(lo: u64, hi: u64, mut ok: impl FnMut(u64) -> bool) -> Option<u64> {
    if lo > hi || !ok(lo) {
        return None;
    }
    let (mut good, mut bad) = (lo, hi + 1);
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        if ok(mid) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    Some(good)
}

/// The length a suggestion may shorten, per algorithm: (key, current value).
fn length_key(run: &RunConfig, algo: Algo) -> (&'static str, usize) {
    match algo {
        Algo::Sft | Algo::Dpo | Algo::Rm => ("data.max_length", run.data.max_length),
        Algo::Grpo => ("grpo.max_completion_length", run.grpo.max_completion_length),
        Algo::Ppo => ("ppo.response_length", run.ppo.response_length),
        Algo::Generate => ("generation.max_new_tokens", run.generation.max_new_tokens),
    }
}

fn set_length(run: &mut RunConfig, algo: Algo, v: usize) -> Vec<String> {
    let mut changes = vec![format!("{} = {v}", length_key(run, algo).0)];
    match algo {
        Algo::Sft | Algo::Dpo | Algo::Rm => {
            run.data.max_length = v;
            if run.data.max_prompt_length > v {
                run.data.max_prompt_length = v;
                changes.push(format!("data.max_prompt_length = {v}"));
            }
        }
        Algo::Grpo => run.grpo.max_completion_length = v,
        Algo::Ppo => run.ppo.response_length = v,
        Algo::Generate => run.generation.max_new_tokens = v,
    }
    changes
}

/// The config with the largest length below the current one that fits, and its changes.
/// Lengths under `floor` are not worth offering (`None`).
fn longest(
    base: &RunConfig,
    algo: Algo,
    floor: u64,
    fits: &dyn Fn(&RunConfig) -> bool,
) -> Option<(RunConfig, Vec<String>)> {
    let with_len = |v: u64| {
        let mut c = base.clone();
        let ch = set_length(&mut c, algo, v as usize);
        (c, ch)
    };
    let now = length_key(base, algo).1 as u64;
    let v = largest(floor.max(1), now.saturating_sub(1), |v| {
        fits(&with_len(v).0)
    })?;
    Some(with_len(round_len(v)))
}

/// Rounds a length down to a multiple of 32 once it is long enough for that to read better.
fn round_len(v: u64) -> u64 {
    if v >= 64 {
        v / 32 * 32
    } else {
        v
    }
}

pub(super) fn suggest(
    run: &RunConfig,
    model: &LlamaConfig,
    reward: &RewardSource,
    algo: Algo,
    current: &Plan,
) -> Vec<Suggestion> {
    let budget = current.budget_bytes;
    let peak = |cfg: &RunConfig| {
        plan_with(cfg, model, reward, algo)
            .ok()
            .map(|p| p.peak_bytes)
    };
    let fits = |cfg: &RunConfig| peak(cfg).is_some_and(|b| b <= budget);
    let mut out: Vec<Suggestion> = Vec::new();
    let mut push = |cfg: &RunConfig, changes: Vec<String>, why: String| -> bool {
        match peak(cfg) {
            Some(b) if b <= budget => {
                out.push(Suggestion {
                    changes,
                    peak_bytes: b,
                    why,
                });
                true
            }
            _ => false,
        }
    };

    // The memory switches that are off, each as (change, config with it on).
    let has_logits = current.terms.iter().any(|t| t.name == T_LOGITS);
    let mut switches: Vec<(String, RunConfig)> = Vec::new();
    if algo.trains() && !run.train.gradient_checkpointing {
        let mut c = run.clone();
        c.train.gradient_checkpointing = true;
        switches.push(("train.gradient_checkpointing = true".into(), c));
    }
    if algo.trains() && !run.optimizer.paged {
        let mut c = run.clone();
        c.optimizer.paged = true;
        switches.push(("optimizer.paged = true".into(), c));
    }
    if has_logits && run.plan.logits_chunk == 0 {
        // The largest chunk that fits on its own, else a small one for the combinations below.
        let chunk = [4096, 2048, 1024, 512, 256]
            .into_iter()
            .find(|&k| {
                let mut c = run.clone();
                c.plan.logits_chunk = k;
                fits(&c)
            })
            .unwrap_or(256);
        let mut c = run.clone();
        c.plan.logits_chunk = chunk;
        switches.push((format!("plan.logits_chunk = {chunk}"), c));
    }
    let mut any = false;
    for (change, cfg) in &switches {
        any |= push(cfg, vec![change.clone()], "memory switch".into());
    }

    // Largest micro-batch, largest length, under `base` with `base_changes` already applied.
    let step = if algo == Algo::Grpo {
        run.grpo.num_generations as u64
    } else {
        1
    };
    let batch_and_length =
        |base: &RunConfig,
         base_changes: &[String],
         push: &mut dyn FnMut(&RunConfig, Vec<String>, String) -> bool| {
            let mut found = false;
            let k_now = base.train.batch_size as u64 / step;
            let with_batch = |k: u64| {
                let mut c = base.clone();
                c.train.batch_size = (k * step) as usize;
                c
            };
            if let Some(k) = largest(1, k_now.saturating_sub(1), |k| fits(&with_batch(k))) {
                let mut ch = base_changes.to_vec();
                ch.push(format!("train.batch_size = {}", k * step));
                let why = if algo == Algo::Grpo {
                    format!("largest micro-batch: {k} prompt(s) x {step} generations")
                } else {
                    "largest micro-batch".into()
                };
                found |= push(&with_batch(k), ch, why);
            }
            let batch_found = found;
            // A length cut below a quarter is a different run; the smallest batch may do better.
            let quarter = length_key(base, algo).1 as u64 / 4;
            if let Some((c, ch)) = longest(base, algo, quarter, &fits) {
                let mut all = base_changes.to_vec();
                all.extend(ch);
                found |= push(&c, all, "largest length".into());
            }
            if !batch_found && k_now > 1 {
                // Not even a smaller batch fits at this length: the longest at the smallest batch.
                if let Some((c, ch)) = longest(&with_batch(1), algo, 1, &fits) {
                    let mut all = base_changes.to_vec();
                    all.push(format!("train.batch_size = {step}"));
                    all.extend(ch);
                    found |= push(&c, all, "smallest micro-batch, largest length".into());
                }
            }
            found
        };
    any |= batch_and_length(run, &[], &mut push);

    // GRPO: fewer generations per group when even one prompt's group is too big.
    if algo == Algo::Grpo {
        let g = run.grpo.num_generations as u64;
        let with_g = |g2: u64| {
            let mut c = run.clone();
            c.grpo.num_generations = g2 as usize;
            c.train.batch_size = g2 as usize;
            c
        };
        if !fits(&with_g(g)) {
            if let Some(g2) = largest(2, g - 1, |x| fits(&with_g(x))) {
                any |= push(
                    &with_g(g2),
                    vec![
                        format!("grpo.num_generations = {g2}"),
                        format!("train.batch_size = {g2}"),
                    ],
                    "fewer generations per micro-batch".into(),
                );
            }
        }
    }

    if !any && !switches.is_empty() {
        // No single change fits: all switches together, then with batch and length.
        let mut all = run.clone();
        let mut changes = Vec::new();
        for (change, _) in &switches {
            changes.push(change.clone());
        }
        all.train.gradient_checkpointing |= algo.trains();
        all.optimizer.paged |= algo.trains();
        if let Some((_, c)) = switches
            .iter()
            .find(|(ch, _)| ch.starts_with("plan.logits_chunk"))
        {
            all.plan.logits_chunk = c.plan.logits_chunk;
        }
        any |= push(&all, changes.clone(), "all memory switches".into());
        if !any {
            any |= batch_and_length(&all, &changes, &mut push);
        }
    }

    if !any {
        // Nothing in reach of this run's settings: say what card it needs with every switch on.
        let mut all = run.clone();
        let mut changes = Vec::new();
        if algo.trains() {
            all.train.gradient_checkpointing = true;
            all.optimizer.paged = true;
            if !run.train.gradient_checkpointing {
                changes.push("train.gradient_checkpointing = true".to_string());
            }
            if !run.optimizer.paged {
                changes.push("optimizer.paged = true".to_string());
            }
        }
        if has_logits && run.plan.logits_chunk == 0 {
            all.plan.logits_chunk = 1024;
            changes.push("plan.logits_chunk = 1024".to_string());
        }
        let card = |cfg: &RunConfig, mut changes: Vec<String>, what: &str| {
            let p = plan_with(cfg, model, reward, algo).ok()?;
            let need = (p.peak_bytes as f64 / GIB * 2.0).ceil() / 2.0;
            let weights = p.bytes_of(T_LINEARS, Phase::Load) + p.bytes_of(T_DENSE, Phase::Load);
            changes.push(format!("plan.budget_gib = {need:.1}"));
            Some(Suggestion {
                changes,
                peak_bytes: p.peak_bytes,
                why: format!(
                    "nothing fits {:.2} GiB: the base weights alone take {:.2} GiB; {what}",
                    budget as f64 / GIB,
                    weights as f64 / GIB
                ),
            })
        };
        out.extend(card(&all, changes.clone(), "the card this run needs"));
        // And the smallest card for this model: one prompt's micro-batch, every switch on.
        let min_batch = if algo == Algo::Grpo {
            run.grpo.num_generations
        } else {
            1
        };
        if run.train.batch_size > min_batch {
            let mut small = all.clone();
            small.train.batch_size = min_batch;
            let mut ch = changes;
            ch.push(format!("train.batch_size = {min_batch}"));
            out.extend(card(&small, ch, "the smallest card at these lengths"));
        }
    }
    out
}
