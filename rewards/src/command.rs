//! Reward code out of process: [`CommandReward`] runs any executable (a Python verifier, or
//! `rlhf reward-worker` serving a plugin) as a worker speaking JSON lines on stdin/stdout, with
//! a timeout per call. A worker that exits, crashes or hangs is killed and restarted and the
//! call retried once; a second failure is an error naming the reward and the completion. The
//! trainer never shares a process with reward code that can abort, loop or exit.
//!
//! Protocol, one line each way per completion:
//!
//! ```text
//! -> {"prompt": "...", "completion": "...", "columns": {"answer": "42"}}
//! <- {"score": 1.0}          or {"score": null} (does not apply), or {"error": "why"}
//! ```
//!
//! A worker started with `handshake` first prints `{"ready": "<name>"}` (or `{"error": ...}`),
//! so a reward that cannot start fails when the run is set up, not at its first step.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::reward::{RewardBatch, RewardFn};

/// How to start a worker.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Working directory (the config file's directory for `type = "command"`).
    pub cwd: Option<PathBuf>,
    /// The longest one completion may take.
    pub timeout: Duration,
    /// The worker announces itself with `{"ready": name}` before the first request.
    pub handshake: bool,
}

/// A reward function scored by a worker process.
pub struct CommandReward {
    name: String,
    spec: WorkerSpec,
    worker: Mutex<Option<Worker>>,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<std::io::Result<String>>,
}

/// Why a call got no answer.
enum Failure {
    Timeout(Duration),
    Gone(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Timeout(t) => write!(f, "gave no answer within {} s", t.as_secs_f64()),
            Failure::Gone(why) => f.write_str(why),
        }
    }
}

impl Worker {
    fn spawn(spec: &WorkerSpec) -> Result<(Worker, Option<String>)> {
        let (program, args) = spec
            .argv
            .split_first()
            .context("`command`: expected a program, e.g. [\"python3\", \"verify.py\"]")?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(dir) = &spec.cwd {
            cmd.current_dir(dir);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", spec.argv.join(" ")))?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut worker = Worker {
            child,
            stdin,
            lines,
        };
        if !spec.handshake {
            return Ok((worker, None));
        }
        let hello = worker
            .read(spec.timeout)
            .map_err(|f| anyhow::anyhow!("`{}` did not start: {f}", spec.argv.join(" ")))?;
        let v: Value = serde_json::from_str(&hello)
            .with_context(|| format!("worker's first line is not JSON: {hello:?}"))?;
        if let Some(e) = v.get("error").and_then(Value::as_str) {
            bail!("{e}");
        }
        let name = v
            .get("ready")
            .and_then(Value::as_str)
            .with_context(|| format!("worker's first line has no `ready`: {hello}"))?;
        Ok((worker, Some(name.to_string())))
    }

    fn read(&mut self, timeout: Duration) -> Result<String, Failure> {
        match self.lines.recv_timeout(timeout) {
            Ok(Ok(line)) => Ok(line),
            Ok(Err(e)) => Err(Failure::Gone(format!("output unreadable: {e}"))),
            Err(RecvTimeoutError::Timeout) => Err(Failure::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(Failure::Gone(self.exit_status())),
        }
    }

    fn exit_status(&mut self) -> String {
        // The pipe closed: the process is ending; give it a moment to be reaped.
        for _ in 0..50 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return format!("worker exited ({status})");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        "worker closed its output".to_string()
    }

    fn call(&mut self, request: &[u8], timeout: Duration) -> Result<String, Failure> {
        if let Err(e) = self
            .stdin
            .write_all(request)
            .and_then(|_| self.stdin.flush())
        {
            let status = self.exit_status();
            return Err(Failure::Gone(format!("{status}; writing the request: {e}")));
        }
        self.read(timeout)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl CommandReward {
    /// Starts the worker now when `spec.handshake` (whose `ready` line names the reward unless
    /// `name` is given), else at the first call.
    pub fn start(name: Option<String>, spec: WorkerSpec) -> Result<Self> {
        let (worker, announced) = if spec.handshake {
            let (w, n) = Worker::spawn(&spec)?;
            (Some(w), n)
        } else {
            (None, None)
        };
        let name = name.or(announced).unwrap_or_else(|| {
            let program = spec.argv.last().map(String::as_str).unwrap_or("command");
            std::path::Path::new(program)
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| "command".into())
        });
        Ok(Self {
            name,
            spec,
            worker: Mutex::new(worker),
        })
    }

    /// One completion's score, restarting a failed worker and retrying once.
    fn score_row(&self, slot: &mut Option<Worker>, request: &[u8]) -> Result<Option<f32>> {
        let mut failures = Vec::new();
        while failures.len() < 2 {
            if slot.is_none() {
                *slot = Some(Worker::spawn(&self.spec)?.0);
            }
            let worker = slot.as_mut().expect("started above");
            match worker.call(request, self.spec.timeout) {
                Ok(line) => return parse_answer(&line),
                Err(f) => {
                    failures.push(f.to_string());
                    *slot = None; // killed and reaped; the next try starts a fresh one
                }
            }
        }
        bail!(
            "{} (restarted, then {})",
            failures[0],
            failures[1].trim_start_matches("worker ")
        )
    }
}

fn parse_answer(line: &str) -> Result<Option<f32>> {
    let v: Value = serde_json::from_str(line)
        .with_context(|| format!("answer is not a JSON line: {line:?}"))?;
    if let Some(e) = v.get("error") {
        bail!("{}", e.as_str().map(String::from).unwrap_or(e.to_string()));
    }
    match v.get("score") {
        Some(Value::Null) => Ok(None),
        Some(s) => match s.as_f64() {
            Some(x) => Ok(Some(x as f32)),
            None => bail!("`score` is not a number or null: {line}"),
        },
        None => bail!("answer has neither `score` nor `error`: {line}"),
    }
}

/// The completion, shortened for an error message.
fn excerpt(text: &str) -> String {
    let mut s: String = text.chars().take(80).collect();
    if s.len() < text.len() {
        s.push_str("...");
    }
    format!("{s:?}")
}

impl RewardFn for CommandReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, batch: &RewardBatch<'_>) -> Result<Vec<Option<f32>>> {
        let mut slot = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(batch.len());
        for row in 0..batch.len() {
            let completion = &batch.completions()[row];
            let mut request = serde_json::to_vec(&json!({
                "prompt": batch.prompts()[row],
                "completion": completion,
                "columns": batch.columns()[row],
            }))?;
            request.push(b'\n');
            let score = self.score_row(&mut slot, &request).with_context(|| {
                format!(
                    "reward `{}` failed on completion {row} {}",
                    self.name,
                    excerpt(completion)
                )
            })?;
            out.push(score);
        }
        Ok(out)
    }
}

/// The worker side for any [`RewardFn`] (what `rlhf reward-worker` runs): announces `name`,
/// then answers one request line per completion until `input` ends.
pub fn serve(reward: &dyn RewardFn, input: impl BufRead, mut output: impl Write) -> Result<()> {
    writeln!(output, "{}", json!({ "ready": reward.name() }))?;
    output.flush()?;
    for line in input.lines() {
        let line = line?;
        let answer = match answer(reward, &line) {
            Ok(score) => json!({ "score": score }),
            Err(e) => json!({ "error": format!("{e:#}") }),
        };
        writeln!(output, "{answer}")?;
        output.flush()?;
    }
    Ok(())
}

fn answer(reward: &dyn RewardFn, line: &str) -> Result<Option<f32>> {
    let v: Value = serde_json::from_str(line).context("request is not JSON")?;
    let text = |k: &str| -> Result<String> {
        Ok(v.get(k)
            .and_then(Value::as_str)
            .with_context(|| format!("request has no string `{k}`"))?
            .to_string())
    };
    let prompts = [text("prompt")?];
    let completions = [text("completion")?];
    let columns = [v
        .get("columns")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()];
    let batch = RewardBatch::new(&prompts, &completions, &columns)?;
    let mut scores = reward.score(&batch)?;
    anyhow::ensure!(scores.len() == 1, "expected one score");
    Ok(scores.pop().flatten().filter(|s| !s.is_nan()))
}
