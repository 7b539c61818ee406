//! Checks the ORPO, CPO/SimPO, KTO and RLOO losses against the numbers TRL 1.16 produced
//! (tests/fixtures/trl/, written by scripts/fixtures/trl_ref_free_losses.py): the reductions of
//! per-token log-probs, the losses, the logged metrics and the gradients, within 1e-5. Each test
//! prints the largest absolute difference it saw.

use serde_json::Value;

use super::cpo::{cpo_loss, CpoConfig};
use super::kto::{kto_loss, KtoConfig, KtoLogps};
use super::orpo::{orpo_loss, OrpoConfig};
use super::preference::{masked_row_mean, masked_row_sum, masked_token_mean};
use super::rloo::{rloo_advantages, rloo_loss};
use super::test_util::*;
use burn::tensor::Tensor;

fn cases(file: &Value) -> &Vec<Value> {
    file["cases"].as_array().expect("fixture has a cases array")
}

/// Compares within 1e-5 (relative above 1) and keeps the largest absolute difference.
struct Diff(f64);

impl Diff {
    #[track_caller]
    fn all(&mut self, what: &str, got: &[f64], want: &[f64]) {
        assert_all_close(what, got, want);
        for (g, w) in got.iter().zip(want) {
            if !w.is_nan() {
                self.0 = self.0.max((g - w).abs());
            }
        }
    }

    #[track_caller]
    fn one(&mut self, what: &str, got: f64, want: f64) {
        self.all(what, &[got], &[want]);
    }

    #[track_caller]
    fn metrics(&mut self, what: &str, named: &[(&str, f64)], want: &Value) {
        let want = want.as_object().unwrap();
        for (k, v) in want {
            let got = named
                .iter()
                .find(|(n, _)| n == k)
                .unwrap_or_else(|| panic!("{what}: metric {k} not logged"))
                .1;
            self.one(&format!("{what} {k}"), got, num(v));
        }
    }
}

fn split<B: burn::tensor::backend::Backend>(t: Tensor<B, 1>) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [n] = t.dims();
    (t.clone().slice(0..n / 2), t.slice(n / 2..n))
}

/// The reductions ORPO/CPO do before the loss, from per-token log-probs in our layout.
fn reductions(inputs: &Value, average: bool, d: &mut Diff, name: &str) {
    let tok = t2::<Cpu>(&rows(&inputs["token_logps"]));
    let comp = t2::<Cpu>(&rows(&inputs["completion_mask"]));
    let full = t2::<Cpu>(&rows(&inputs["full_mask"]));
    let [n, _] = tok.dims();
    let half = n / 2;
    let want_c = nums(&inputs["chosen_logps"]);
    let seq = if average {
        masked_row_mean(tok.clone(), comp.clone())
    } else {
        masked_row_sum(tok.clone(), comp.clone())
    };
    let (c, r) = split(seq);
    d.all(&format!("{name} chosen_logps"), &vals(c), &want_c);
    d.all(
        &format!("{name} rejected_logps"),
        &vals(r),
        &nums(&inputs["rejected_logps"]),
    );
    // ORPO's NLL covers prompt and completion; CPO's only the completion (its labels).
    let nll_full = vals(masked_token_mean(tok.clone().slice(0..half), full.slice(0..half)).neg());
    let nll_comp = vals(masked_token_mean(tok.slice(0..half), comp.slice(0..half)).neg());
    let want = num(&inputs["nll_loss"]);
    if want != 0.0 {
        let got = if name.starts_with("orpo") {
            nll_full[0]
        } else {
            nll_comp[0]
        };
        d.one(&format!("{name} nll"), got, want);
    }
}

#[test]
fn orpo_matches_trl() {
    let file = fixture("orpo.json");
    let mut d = Diff(0.0);
    for case in cases(&file) {
        let name = format!("orpo {}", case["name"].as_str().unwrap());
        let (i, o) = (&case["inputs"], &case["outputs"]);
        reductions(i, true, &mut d, &name);
        let c = t1::<Ad>(&f32s(&i["chosen_logps"])).require_grad();
        let r = t1::<Ad>(&f32s(&i["rejected_logps"])).require_grad();
        let nll = t1::<Ad>(&[num(&i["nll_loss"]) as f32]).require_grad();
        let cfg = OrpoConfig {
            beta: num(&case["config"]["beta"]),
        };
        let out = orpo_loss(c.clone(), r.clone(), nll.clone(), &cfg).unwrap();
        d.one(
            &format!("{name} loss"),
            vals(out.loss.clone())[0],
            num(&o["loss"]),
        );
        d.metrics(&name, &out.named(), &o["metrics"]);
        let g = out.loss.backward();
        d.all(
            &format!("{name} grad chosen"),
            &vals(c.grad(&g).unwrap()),
            &nums(&o["grad_chosen_logps"]),
        );
        d.all(
            &format!("{name} grad rejected"),
            &vals(r.grad(&g).unwrap()),
            &nums(&o["grad_rejected_logps"]),
        );
        d.all(
            &format!("{name} grad nll"),
            &vals(nll.grad(&g).unwrap()),
            &[num(&o["grad_nll_loss"])],
        );
    }
    eprintln!("orpo: max abs difference to TRL {:.3e}", d.0);
}

#[test]
fn cpo_and_simpo_match_trl() {
    let file = fixture("cpo.json");
    let mut d = Diff(0.0);
    for case in cases(&file) {
        let name = format!("cpo {}", case["name"].as_str().unwrap());
        let (i, o, c) = (&case["inputs"], &case["outputs"], &case["config"]);
        let cfg = CpoConfig {
            beta: num(&c["beta"]),
            label_smoothing: num(&c["label_smoothing"]),
            loss_type: c["loss_type"].as_str().unwrap().parse().unwrap(),
            cpo_alpha: num(&c["cpo_alpha"]),
            simpo_gamma: num(&c["simpo_gamma"]),
            alpha: num(&c["alpha"]),
        };
        reductions(i, cfg.average_log_prob(), &mut d, &name);
        let ch = t1::<Ad>(&f32s(&i["chosen_logps"])).require_grad();
        let rj = t1::<Ad>(&f32s(&i["rejected_logps"])).require_grad();
        let nll = t1::<Ad>(&[num(&i["nll_loss"]) as f32]).require_grad();
        let out = cpo_loss(ch.clone(), rj.clone(), nll.clone(), &cfg).unwrap();
        d.one(
            &format!("{name} loss"),
            vals(out.loss.clone())[0],
            num(&o["loss"]),
        );
        d.metrics(&name, &out.named(), &o["metrics"]);
        let g = out.loss.backward();
        d.all(
            &format!("{name} grad chosen"),
            &vals(ch.grad(&g).unwrap()),
            &nums(&o["grad_chosen_logps"]),
        );
        d.all(
            &format!("{name} grad rejected"),
            &vals(rj.grad(&g).unwrap()),
            &nums(&o["grad_rejected_logps"]),
        );
        if !o["grad_nll_loss"].is_null() {
            d.all(
                &format!("{name} grad nll"),
                &vals(nll.grad(&g).unwrap()),
                &[num(&o["grad_nll_loss"])],
            );
        }
    }
    eprintln!("cpo/simpo: max abs difference to TRL {:.3e}", d.0);
}

#[test]
fn kto_matches_trl() {
    let file = fixture("kto.json");
    let mut d = Diff(0.0);
    for case in cases(&file) {
        let name = format!("kto {}", case["name"].as_str().unwrap());
        let (i, o, c) = (&case["inputs"], &case["outputs"], &case["config"]);
        let cfg = KtoConfig {
            beta: num(&c["beta"]),
            loss_type: c["loss_type"].as_str().unwrap().parse().unwrap(),
            desirable_weight: num(&c["desirable_weight"]),
            undesirable_weight: num(&c["undesirable_weight"]),
        };
        let policy = t1::<Ad>(&f32s(&i["policy_logps"])).require_grad();
        let opt = |v: &Value| (!v.is_null()).then(|| t1::<Ad>(&f32s(v)));
        let logps = KtoLogps {
            policy: policy.clone(),
            reference: t1(&f32s(&i["ref_logps"])),
            policy_kl: opt(&i["policy_kl_logps"]),
            reference_kl: opt(&i["ref_kl_logps"]),
            labels: i["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_bool().unwrap())
                .collect(),
        };
        let out = kto_loss(logps, &cfg).unwrap();
        d.one(
            &format!("{name} loss"),
            vals(out.loss.clone())[0],
            num(&o["loss"]),
        );
        d.metrics(&name, &out.metrics.named(), &o["metrics"]);
        let g = out.loss.backward();
        d.all(
            &format!("{name} grad"),
            &vals(policy.grad(&g).unwrap()),
            &nums(&o["grad_policy_logps"]),
        );
    }
    eprintln!("kto: max abs difference to TRL {:.3e}", d.0);
}

#[test]
fn rloo_matches_trl() {
    let file = fixture("rloo.json");
    let mut d = Diff(0.0);
    for case in cases(&file) {
        let name = format!("rloo {}", case["name"].as_str().unwrap());
        let (i, o, c) = (&case["inputs"], &case["outputs"], &case["config"]);
        let mask = t2::<Cpu>(&rows(&i["completion_mask"]));
        let old = t2::<Cpu>(&rows(&i["old_per_token_logps"]));
        let reference = t2::<Cpu>(&rows(&i["ref_per_token_logps"]));
        let kl = vals(masked_row_sum(old.clone() - reference, mask.clone()));
        let beta = num(&c["beta"]);
        let per_func: Vec<Vec<f32>> = rows(&i["rewards_per_func"]);
        let adv = rloo_advantages(
            &per_func,
            &f32s(&c["reward_weights"]),
            c["num_generations"].as_u64().unwrap() as usize,
            Some(&kl),
            beta,
            c["normalize_advantages"].as_bool().unwrap(),
        )
        .unwrap();
        let got: Vec<f64> = adv.advantages.iter().map(|&a| f64::from(a)).collect();
        d.all(&format!("{name} advantages"), &got, &nums(&o["advantages"]));
        let eps = num(&c["epsilon"]);
        let eps_high = if c["epsilon_high"].is_null() {
            eps
        } else {
            num(&c["epsilon_high"])
        };
        let tok = t2::<Ad>(&rows(&i["per_token_logps"])).require_grad();
        let mask_ad = t2::<Ad>(&rows(&i["completion_mask"]));
        let logps = masked_row_sum(tok.clone(), mask_ad.clone());
        let old_sums = masked_row_sum(t2::<Ad>(&rows(&i["old_per_token_logps"])), mask_ad);
        let [n] = logps.dims();
        let out = rloo_loss(
            logps,
            old_sums,
            Tensor::from_data(
                burn::tensor::TensorData::new(adv.advantages.clone(), [n]),
                &Default::default(),
            ),
            eps,
            eps_high,
        )
        .unwrap();
        d.one(
            &format!("{name} loss"),
            vals(out.loss.clone())[0],
            num(&o["loss"]),
        );
        let mut named = out.named();
        named.push(("reward", adv.reward));
        named.push(("reward_std", adv.reward_std));
        named.push(("frac_reward_zero_std", adv.frac_reward_zero_std));
        let mut want = o["metrics"].clone();
        let m = want.as_object_mut().unwrap();
        m.remove("clip_ratio/low_min");
        m.remove("clip_ratio/high_max");
        d.metrics(&name, &named, &want);
        let g = out.loss.backward();
        d.all(
            &format!("{name} grad"),
            &vals(tok.grad(&g).unwrap()),
            &flat(&o["grad_per_token_logps"]),
        );
    }
    eprintln!("rloo: max abs difference to TRL {:.3e}", d.0);
}
