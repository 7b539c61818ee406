//! Reward code out of process: JSON lines to a worker, a timeout per completion, one restart
//! after a crash, errors naming the reward and the completion.

use std::time::{Duration, Instant};

use rlhf_rewards::command::{serve, CommandReward, WorkerSpec};
use rlhf_rewards::{Columns, FnReward, RewardBatch, RewardFn};

fn sh(script: &str, timeout_ms: u64) -> CommandReward {
    let spec = WorkerSpec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        cwd: None,
        timeout: Duration::from_millis(timeout_ms),
        handshake: false,
    };
    CommandReward::start(Some("verifier".into()), spec).unwrap()
}

fn score(reward: &CommandReward) -> anyhow::Result<Vec<Option<f32>>> {
    let prompts = vec!["p".to_string(), "p".to_string()];
    let completions = vec!["yes it is".to_string(), "no".to_string()];
    let columns = vec![Columns::new(), Columns::new()];
    reward.score(&RewardBatch::new(&prompts, &completions, &columns).unwrap())
}

#[test]
fn scores_come_back_one_line_per_completion() {
    let r = sh(
        r#"while read l; do case "$l" in *yes*) echo '{"score": 1.5}';; *) echo '{"score": null}';; esac; done"#,
        5000,
    );
    assert_eq!(score(&r).unwrap(), vec![Some(1.5), None]);
    // The worker stays up between batches.
    assert_eq!(score(&r).unwrap(), vec![Some(1.5), None]);
}

#[test]
fn an_error_answer_names_the_reward_and_the_completion() {
    let r = sh(
        r#"while read l; do echo '{"error": "no answer column"}'; done"#,
        5000,
    );
    let e = format!("{:#}", score(&r).unwrap_err());
    assert!(
        e.contains("reward `verifier` failed on completion 0"),
        "{e}"
    );
    assert!(
        e.contains("\"yes it is\"") && e.contains("no answer column"),
        "{e}"
    );
}

#[test]
fn a_loop_is_stopped_by_the_timeout() {
    let r = sh("read l; while :; do :; done", 300);
    let started = Instant::now();
    let e = format!("{:#}", score(&r).unwrap_err());
    assert!(started.elapsed() < Duration::from_secs(10), "{e}");
    assert!(
        e.contains("no answer within 0.3 s") && e.contains("restarted"),
        "{e}"
    );
}

#[test]
fn a_worker_that_dies_once_is_restarted_and_the_call_retried() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("crashed");
    let script = format!(
        r#"if [ -e "{m}" ]; then while read l; do echo '{{"score": 2}}'; done; else touch "{m}"; read l; kill -9 $$; fi"#,
        m = marker.display()
    );
    let r = sh(&script, 5000);
    assert_eq!(score(&r).unwrap(), vec![Some(2.0), Some(2.0)]);
}

#[test]
fn a_worker_that_exits_is_a_failed_reward_not_a_success() {
    let r = sh("read l; exit 0", 5000);
    let e = format!("{:#}", score(&r).unwrap_err());
    assert!(e.contains("worker exited (exit status: 0)"), "{e}");
    assert!(e.contains("completion 0"), "{e}");
}

#[test]
fn serve_speaks_the_protocol() {
    let reward = FnReward::new("len", |b: &RewardBatch<'_>| {
        Ok(b.completions()
            .iter()
            .map(|c| (!c.is_empty()).then_some(c.len() as f32))
            .collect())
    });
    let input = b"{\"prompt\": \"p\", \"completion\": \"abc\", \"columns\": {}}\n{\"prompt\": \"p\", \"completion\": \"\"}\nnot json\n";
    let mut out = Vec::new();
    serve(&reward, &input[..], &mut out).unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["ready"], "len");
    assert_eq!(lines[1]["score"], 3.0);
    assert!(lines[2]["score"].is_null());
    assert!(lines[3]["error"].as_str().unwrap().contains("not JSON"));
}
