//! Checks every loss against the numbers TRL produced (tests/fixtures/trl/, written by
//! scripts/fixtures/trl_losses.py and scripts/fixtures/ppo_numpy.py): values, logged metrics and
//! the gradients TRL sends into the policy outputs, within 1e-5.

use serde_json::Value;

use super::dpo::{dpo_loss, DpoConfig, DpoLogps, DpoLossType};
use super::grpo::{
    grpo_advantages, grpo_loss, is_truncated, mask_truncated_completions, GrpoBatch, GrpoLossConfig,
};
use super::ppo::{
    ppo_loss, ppo_rollout, sequence_length, truncate_response, KlController, PpoConfig,
    PpoMinibatch, PpoRolloutBatch,
};
use super::rm::{reward_loss, RewardLossConfig};
use super::test_util::*;

fn cases(file: &Value) -> &Vec<Value> {
    file["cases"].as_array().expect("fixture has a cases array")
}

fn opt_f64(v: &Value) -> Option<f64> {
    if v.is_null() {
        None
    } else {
        Some(num(v))
    }
}

#[test]
fn dpo_matches_trl() {
    let file = fixture("dpo.json");
    for case in cases(&file) {
        let name = case["name"].as_str().unwrap();
        let c = &case["config"];
        let cfg = DpoConfig {
            beta: num(&c["beta"]),
            label_smoothing: num(&c["label_smoothing"]),
            loss_types: c["loss_type"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().parse::<DpoLossType>().unwrap())
                .collect(),
            loss_weights: if c["loss_weights"].is_null() {
                None
            } else {
                Some(nums(&c["loss_weights"]))
            },
            discopop_tau: num(&c["discopop_tau"]),
            ..DpoConfig::default()
        };
        let i = &case["inputs"];
        let chosen = t1::<Ad>(&f32s(&i["policy_chosen_logps"])).require_grad();
        let rejected = t1::<Ad>(&f32s(&i["policy_rejected_logps"])).require_grad();
        let out = dpo_loss(
            DpoLogps {
                policy_chosen: chosen.clone(),
                policy_rejected: rejected.clone(),
                ref_chosen: t1(&f32s(&i["ref_chosen_logps"])),
                ref_rejected: t1(&f32s(&i["ref_rejected_logps"])),
                chosen_lengths: Some(t1(&f32s(&i["chosen_lengths"]))),
                rejected_lengths: Some(t1(&f32s(&i["rejected_lengths"]))),
            },
            &cfg,
        )
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let o = &case["outputs"];
        assert_close(
            &format!("{name} loss"),
            vals(out.loss.clone())[0],
            num(&o["loss"]),
        );
        assert_all_close(
            &format!("{name} chosen_rewards"),
            &vals(out.chosen_rewards.clone()),
            &nums(&o["chosen_rewards"]),
        );
        assert_all_close(
            &format!("{name} rejected_rewards"),
            &vals(out.rejected_rewards.clone()),
            &nums(&o["rejected_rewards"]),
        );
        for (key, value) in out.metrics.named() {
            assert_close(&format!("{name} {key}"), value, num(&o["metrics"][key]));
        }
        let grads = out.loss.backward();
        assert_all_close(
            &format!("{name} grad chosen"),
            &vals(chosen.grad(&grads).unwrap()),
            &nums(&o["grad_policy_chosen_logps"]),
        );
        assert_all_close(
            &format!("{name} grad rejected"),
            &vals(rejected.grad(&grads).unwrap()),
            &nums(&o["grad_policy_rejected_logps"]),
        );
    }
}

#[test]
fn reward_loss_matches_trl() {
    let file = fixture("reward.json");
    for case in cases(&file) {
        let name = case["name"].as_str().unwrap();
        let cfg = RewardLossConfig {
            center_rewards_coefficient: opt_f64(&case["config"]["center_rewards_coefficient"]),
        };
        let i = &case["inputs"];
        let chosen = t1::<Ad>(&f32s(&i["rewards_chosen"])).require_grad();
        let rejected = t1::<Ad>(&f32s(&i["rewards_rejected"])).require_grad();
        let margin = (!i["margin"].is_null()).then(|| t1::<Ad>(&f32s(&i["margin"])));
        let out = reward_loss(chosen.clone(), rejected.clone(), margin, &cfg).unwrap();
        let o = &case["outputs"];
        assert_close(
            &format!("{name} loss"),
            vals(out.loss.clone())[0],
            num(&o["loss"]),
        );
        for (key, value) in out.metrics.named() {
            assert_close(&format!("{name} {key}"), value, num(&o["metrics"][key]));
        }
        let grads = out.loss.backward();
        assert_all_close(
            &format!("{name} grad chosen"),
            &vals(chosen.grad(&grads).unwrap()),
            &nums(&o["grad_rewards_chosen"]),
        );
        assert_all_close(
            &format!("{name} grad rejected"),
            &vals(rejected.grad(&grads).unwrap()),
            &nums(&o["grad_rewards_rejected"]),
        );
    }
}

#[test]
fn grpo_advantages_match_trl() {
    let file = fixture("grpo_advantages.json");
    for case in cases(&file) {
        let name = case["name"].as_str().unwrap();
        let c = &case["config"];
        let rewards = rows(&case["inputs"]["rewards_per_func"]);
        let out = grpo_advantages(
            &rewards,
            &f32s(&c["reward_weights"]),
            c["num_generations"].as_u64().unwrap() as usize,
            c["scale_rewards"].as_str().unwrap().parse().unwrap(),
            c["multi_objective_aggregation"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap(),
        )
        .unwrap();
        let o = &case["outputs"];
        let adv: Vec<f64> = out.advantages.iter().map(|&a| f64::from(a)).collect();
        assert_all_close(&format!("{name} advantages"), &adv, &nums(&o["advantages"]));
        let m = &o["metrics"];
        assert_close(
            &format!("{name} reward"),
            out.metrics.reward,
            num(&m["reward"]),
        );
        assert_close(
            &format!("{name} reward_std"),
            out.metrics.reward_std,
            num(&m["reward_std"]),
        );
        assert_close(
            &format!("{name} frac_reward_zero_std"),
            out.metrics.frac_reward_zero_std,
            num(&m["frac_reward_zero_std"]),
        );
        for (j, (mean, std)) in out
            .metrics
            .per_func_mean
            .iter()
            .zip(&out.metrics.per_func_std)
            .enumerate()
        {
            assert_close(
                &format!("{name} rewards/{j}/mean"),
                *mean,
                num(&m[format!("rewards/{j}/mean")]),
            );
            assert_close(
                &format!("{name} rewards/{j}/std"),
                *std,
                num(&m[format!("rewards/{j}/std")]),
            );
        }
    }
}

#[test]
fn grpo_loss_matches_trl() {
    let file = fixture("grpo_loss.json");
    for case in cases(&file) {
        let name = case["name"].as_str().unwrap();
        let c = &case["config"];
        let usize_of = |k: &str| c[k].as_u64().unwrap() as usize;
        let cfg = GrpoLossConfig {
            loss_type: c["loss_type"].as_str().unwrap().parse().unwrap(),
            beta: num(&c["beta"]),
            epsilon_low: num(&c["epsilon"]),
            epsilon_high: num(&c["epsilon_high"]),
            delta: opt_f64(&c["delta"]),
            importance_sampling_level: c["importance_sampling_level"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap(),
            use_bias_correction_kl: c["use_bias_correction_kl"].as_bool().unwrap(),
            max_completion_length: usize_of("max_completion_length"),
            sapo_temperature_pos: num(&c["sapo_temperature_pos"]),
            sapo_temperature_neg: num(&c["sapo_temperature_neg"]),
            gradient_accumulation_steps: usize_of("gradient_accumulation_steps"),
            steps_per_generation: usize_of("steps_per_generation"),
        };
        let i = &case["inputs"];
        let logps = t2::<Ad>(&rows(&i["per_token_logps"])).require_grad();
        let opt2 = |k: &str| (!i[k].is_null()).then(|| t2::<Ad>(&rows(&i[k])));
        let out = grpo_loss(
            GrpoBatch {
                per_token_logps: logps.clone(),
                old_per_token_logps: opt2("old_per_token_logps"),
                ref_per_token_logps: opt2("ref_per_token_logps"),
                advantages: t1(&f32s(&i["advantages"])),
                completion_mask: t2(&rows(&i["completion_mask"])),
                num_items_in_batch: opt_f64(&i["num_items_in_batch"]),
            },
            &cfg,
        )
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let o = &case["outputs"];
        assert_close(
            &format!("{name} loss"),
            vals(out.loss.clone())[0],
            num(&o["loss"]),
        );
        let expected = o["metrics"].as_object().unwrap();
        let ours = out.metrics.named();
        let mut our_keys: Vec<_> = ours.iter().map(|(k, _)| k.to_string()).collect();
        let mut trl_keys: Vec<_> = expected.keys().cloned().collect();
        our_keys.sort();
        trl_keys.sort();
        assert_eq!(our_keys, trl_keys, "{name}: logged metric names differ");
        for (key, value) in ours {
            assert_close(&format!("{name} {key}"), value, num(&expected[key]));
        }
        let grads = out.loss.backward();
        assert_all_close(
            &format!("{name} grad"),
            &vals(logps.grad(&grads).unwrap()),
            &flat(&o["grad_per_token_logps"]),
        );
    }
}

#[test]
fn grpo_truncation_matches_trl() {
    let f = fixture("grpo_truncation.json");
    let eos: Vec<u32> = f["eos_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let pad = f["pad_token_id"].as_u64().unwrap() as u32;
    let truncated: Vec<bool> = f["completion_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ids| {
            let ids: Vec<u32> = ids
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            is_truncated(&ids, &eos, pad)
        })
        .collect();
    let expected: Vec<bool> = f["is_truncated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_bool().unwrap())
        .collect();
    assert_eq!(truncated, expected);
    let masked =
        mask_truncated_completions(t2::<Cpu>(&rows(&f["completion_mask"])), &truncated).unwrap();
    assert_all_close(
        "masked mask",
        &vals(masked),
        &flat(&f["masked_completion_mask"]),
    );
}

fn ppo_config(c: &Value) -> PpoConfig {
    PpoConfig {
        kl_coef: num(&c["kl_coef"]),
        kl_estimator: c["kl_estimator"].as_str().unwrap().parse().unwrap(),
        whiten_rewards: c["whiten_rewards"].as_bool().unwrap(),
        gamma: num(&c["gamma"]),
        lam: num(&c["lam"]),
        cliprange: num(&c["cliprange"]),
        cliprange_value: num(&c["cliprange_value"]),
        vf_coef: num(&c["vf_coef"]),
        missing_eos_penalty: opt_f64(&c["missing_eos_penalty"]),
        ..PpoConfig::default()
    }
}

fn ids(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

#[test]
fn ppo_matches_trl_transcription() {
    let file = fixture("ppo.json");
    for case in cases(&file) {
        let name = case["name"].as_str().unwrap();
        let cfg = ppo_config(&case["config"]);
        let i = &case["inputs"];
        let r = &case["rollout"];
        let stop = i["stop_token_id"].as_u64().unwrap() as u32;
        let pad = i["pad_token_id"].as_u64().unwrap() as u32;
        let eos = i["eos_token_id"].as_u64().unwrap() as u32;

        let post: Vec<Vec<u32>> = ids(&i["responses"])
            .iter()
            .map(|resp| truncate_response(resp, stop, pad))
            .collect();
        assert_eq!(
            post,
            ids(&r["postprocessed_responses"]),
            "{name}: truncate_response"
        );
        let lengths: Vec<i64> = post.iter().map(|p| sequence_length(p, pad)).collect();
        let expected_lengths: Vec<i64> = r["sequence_lengths"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(lengths, expected_lengths, "{name}: sequence lengths");
        let contain_eos: Vec<bool> = post.iter().map(|p| p.contains(&eos)).collect();

        let rollout = ppo_rollout(
            PpoRolloutBatch::<Ad> {
                logprobs: t2(&rows(&i["logprobs"])),
                ref_logprobs: t2(&rows(&i["ref_logprobs"])),
                values: t2(&rows(&i["values"])),
                scores: t1(&f32s(&i["scores"])),
                sequence_lengths: lengths,
                contain_eos,
            },
            &cfg,
        )
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let check2 = |what: &str, t: &burn::tensor::Tensor<Ad, 2>| {
            assert_all_close(&format!("{name} {what}"), &vals(t.clone()), &flat(&r[what]));
        };
        check2("padding_mask", &rollout.padding_mask);
        check2("padding_mask_p1", &rollout.padding_mask_p1);
        check2("logprobs", &rollout.logprobs);
        check2("values", &rollout.values);
        check2("kl", &rollout.kl);
        check2("non_score_reward", &rollout.non_score_reward);
        check2("rewards", &rollout.rewards);
        check2("advantages", &rollout.advantages);
        check2("returns", &rollout.returns);
        assert_all_close(
            &format!("{name} scores"),
            &vals(rollout.scores.clone()),
            &nums(&r["scores"]),
        );
        let m = &r["metrics"];
        let rm = rollout.metrics;
        for (key, value) in [
            ("objective/kl", rm.kl),
            ("objective/entropy", rm.entropy),
            ("objective/non_score_reward", rm.non_score_reward),
            ("objective/rlhf_reward", rm.rlhf_reward),
            ("objective/scores", rm.scores),
        ] {
            assert_close(&format!("{name} {key}"), value, num(&m[key]));
        }

        let new_logprobs = t2::<Ad>(&rows(&i["new_logprobs"])).require_grad();
        let vpred = t2::<Ad>(&rows(&i["vpred"])).require_grad();
        let out = ppo_loss(
            PpoMinibatch {
                new_logprobs: new_logprobs.clone(),
                vpred: vpred.clone(),
                old_logprobs: rollout.logprobs,
                old_values: rollout.values,
                advantages: rollout.advantages,
                returns: rollout.returns,
                padding_mask: rollout.padding_mask,
                padding_mask_p1: rollout.padding_mask_p1,
            },
            &cfg,
        )
        .unwrap();
        let l = &case["loss"];
        assert_close(
            &format!("{name} loss"),
            vals(out.loss.clone())[0],
            num(&l["loss"]),
        );
        let lm = &l["metrics"];
        let om = out.metrics;
        for (key, value) in [
            ("pg_loss", om.pg_loss),
            ("vf_loss", om.vf_loss),
            ("pg_clipfrac", om.pg_clipfrac),
            ("vf_clipfrac", om.vf_clipfrac),
            ("approxkl", om.approxkl),
            ("ratio_mean", om.ratio_mean),
        ] {
            assert_close(&format!("{name} {key}"), value, num(&lm[key]));
        }
        let grads = out.loss.backward();
        assert_all_close(
            &format!("{name} grad new_logprobs"),
            &vals(new_logprobs.grad(&grads).unwrap()),
            &flat(&l["grad_new_logprobs"]),
        );
        assert_all_close(
            &format!("{name} grad vpred"),
            &vals(vpred.grad(&grads).unwrap()),
            &flat(&l["grad_vpred"]),
        );
    }
}

#[test]
fn adaptive_kl_controller_matches_trl() {
    let file = fixture("ppo.json");
    let f = &file["adaptive_kl_controller"];
    let mut ctl = KlController::adaptive(
        num(&f["init_kl_coef"]),
        num(&f["target"]),
        num(&f["horizon"]),
    )
    .unwrap();
    for (u, expected) in f["updates"]
        .as_array()
        .unwrap()
        .iter()
        .zip(nums(&f["values"]))
    {
        ctl.update(num(&u["current"]), u["n_steps"].as_u64().unwrap() as usize);
        assert!(
            (ctl.value() - expected).abs() < 1e-12,
            "adaptive KL: got {}, expected {expected}",
            ctl.value()
        );
    }
}
