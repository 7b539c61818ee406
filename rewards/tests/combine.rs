//! Combining weighted reward functions, checked against TRL 1.16.0's GRPOTrainer.
//!
//! The reference numbers come from scripts/fixtures/trl_reward_combination.py, which runs TRL's
//! own `_calculate_rewards` and its reward combination on fixed per-function scores.

use anyhow::Result;
use rlhf_rewards::{
    nanmean, nanstd, Columns, FnReward, RewardBatch, RewardFn, RewardScores, RewardSet,
};
use serde_json::{json, Value};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/trl_combination/cases.json"
);

/// A fixture number: a JSON number, or "nan" / "inf" / "-inf"; null (None) reads as NaN.
fn number(v: &Value) -> f32 {
    match v {
        Value::Null => f32::NAN,
        Value::Number(n) => n.as_f64().unwrap() as f32,
        Value::String(s) => match s.as_str() {
            "nan" => f32::NAN,
            "inf" => f32::INFINITY,
            "-inf" => f32::NEG_INFINITY,
            other => panic!("bad fixture number {other:?}"),
        },
        other => panic!("bad fixture number {other}"),
    }
}

/// A fixture score: null is the reward function's `None`.
fn score(v: &Value) -> Option<f32> {
    if v.is_null() {
        None
    } else {
        Some(number(v))
    }
}

fn close(actual: f32, expected: f32) -> bool {
    if expected.is_nan() || expected.is_infinite() {
        return actual.is_nan() == expected.is_nan() && (expected.is_nan() || actual == expected);
    }
    (actual - expected).abs() <= 1e-6 * expected.abs().max(1.0)
}

/// A reward function that returns fixed scores.
fn fixed(name: &str, scores: Vec<Option<f32>>) -> Box<dyn RewardFn> {
    Box::new(FnReward::new(
        name,
        move |batch: &RewardBatch<'_>| -> Result<_> {
            assert_eq!(batch.len(), scores.len());
            Ok(scores.clone())
        },
    ))
}

/// Rows shaped like the fixture's: "prompt i", "completion i", answer "#### i".
fn rows(n: usize) -> (Vec<String>, Vec<String>, Vec<Columns>) {
    let prompts = (0..n).map(|i| format!("prompt {i}")).collect();
    let completions = (0..n).map(|i| format!("completion {i}")).collect();
    let columns = (0..n)
        .map(|i| {
            let mut c = Columns::new();
            c.insert("answer".into(), json!(format!("#### {i}")));
            c
        })
        .collect();
    (prompts, completions, columns)
}

#[test]
fn matches_trl_grpo_reward_combination() {
    let text = std::fs::read_to_string(FIXTURE).unwrap_or_else(|e| {
        panic!("{FIXTURE}: {e} (run scripts/fixtures/trl_reward_combination.py)")
    });
    let fixture: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(fixture["trl_version"], "1.16.0");
    let cases = fixture["cases"].as_object().unwrap();
    assert!(cases.len() >= 5);
    for (case, data) in cases {
        let names: Vec<&str> = data["names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let weights: Vec<f32> = data["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(number)
            .collect();
        let scores: Vec<Vec<Option<f32>>> = data["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|col| col.as_array().unwrap().iter().map(score).collect())
            .collect();
        let n = scores[0].len();
        let set = RewardSet::new(
            names
                .iter()
                .zip(&scores)
                .zip(&weights)
                .map(|((name, s), &w)| (fixed(name, s.clone()), w))
                .collect(),
        )
        .unwrap();
        let (prompts, completions, columns) = rows(n);
        let batch = RewardBatch::new(&prompts, &completions, &columns).unwrap();
        let got = set.score(&batch).unwrap();

        // rewards_per_func is [row][func] in TRL, [func][row] here.
        for (row, expected_row) in data["rewards_per_func"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            for (f, expected) in expected_row.as_array().unwrap().iter().enumerate() {
                let (a, e) = (got.per_func[f][row], number(expected));
                assert!(close(a, e), "{case}: per_func[{f}][{row}] = {a}, TRL {e}");
            }
        }
        for (row, expected) in data["total"].as_array().unwrap().iter().enumerate() {
            let (a, e) = (got.total[row], number(expected));
            assert!(close(a, e), "{case}: total[{row}] = {a}, TRL {e}");
        }
        let metrics = got.metrics();
        let expected_metrics = data["metrics"].as_object().unwrap();
        assert_eq!(
            metrics.len(),
            expected_metrics.len(),
            "{case}: metric names"
        );
        for (key, value) in &metrics {
            let e = number(&expected_metrics[key]);
            assert!(close(*value, e), "{case}: {key} = {value}, TRL {e}");
        }
        match data["warning_row"].as_u64() {
            Some(row) => {
                let warning = got.warning.as_deref().expect("TRL warned");
                assert!(
                    warning.starts_with("All reward functions returned None")
                        && warning.contains(&format!("\"prompt\":\"prompt {row}\"")),
                    "{case}: {warning}"
                );
                assert!(got.unscorable_rows().contains(&(row as usize)));
            }
            None => assert_eq!(got.warning, None, "{case}"),
        }
    }
}

#[test]
fn none_drops_out_of_the_weighted_sum() {
    // Hand-checked: row 0 = 2*1 + 0.5*3, row 1 = 0.5*4 (first function N/A),
    // row 2 = nobody scored it: NaN, not 0.
    let set = RewardSet::new(vec![
        (fixed("a", vec![Some(1.0), None, None]), 2.0),
        (fixed("b", vec![Some(3.0), Some(4.0), None]), 0.5),
    ])
    .unwrap();
    let (prompts, completions, columns) = rows(3);
    let batch = RewardBatch::new(&prompts, &completions, &columns).unwrap();
    let got: RewardScores = set.score(&batch).unwrap();
    assert_eq!(got.total[..2], [3.5, 2.0]);
    assert!(got.total[2].is_nan());
    assert_eq!(got.unscorable_rows(), vec![2]);
    let metrics = got.metrics();
    let get = |k: &str| metrics.iter().find(|(n, _)| n == k).unwrap().1;
    assert_eq!(get("rewards/a/mean"), 1.0);
    assert!(get("rewards/a/std").is_nan()); // one value: no sample std
    assert_eq!(get("rewards/b/mean"), 3.5);
    assert_eq!(get("reward"), 2.75);
}

#[test]
fn nan_statistics() {
    assert!(nanmean(&[]).is_nan());
    assert!(nanmean(&[f32::NAN]).is_nan());
    assert_eq!(nanmean(&[1.0, f32::NAN, 2.0]), 1.5);
    assert!(nanstd(&[1.0, f32::NAN]).is_nan());
    // Sample std of 1, 2, 3, 4 is sqrt(5/3).
    let s = nanstd(&[1.0, 2.0, f32::NAN, 3.0, 4.0]);
    assert!((s - (5.0f32 / 3.0).sqrt()).abs() < 1e-6, "{s}");
}

#[test]
fn refuses_bad_sets_and_wrong_lengths() {
    let err = RewardSet::new(vec![]).unwrap_err().to_string();
    assert!(err.contains("no reward functions"), "{err}");
    let err = RewardSet::new(vec![(fixed("a", vec![]), 1.0), (fixed("a", vec![]), 1.0)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("`a`") && err.contains("name"), "{err}");
    let err = RewardSet::new(vec![(fixed("a", vec![]), f32::NAN)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("weight"), "{err}");

    let short = FnReward::new("short", |_: &RewardBatch<'_>| -> Result<_> {
        Ok(vec![Some(1.0)])
    });
    let set = RewardSet::new(vec![(Box::new(short) as Box<dyn RewardFn>, 1.0)]).unwrap();
    let (prompts, completions, columns) = rows(2);
    let batch = RewardBatch::new(&prompts, &completions, &columns).unwrap();
    let err = set.score(&batch).unwrap_err().to_string();
    assert!(
        err.contains("`short` returned 1 rewards, but 2 were expected"),
        "{err}"
    );

    let err = RewardBatch::new(&prompts, &completions[..1], &columns)
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 prompts, 1 completions"), "{err}");
}
