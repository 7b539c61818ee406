//! The output folder of a training run: one run at a time (a lock file naming its pid), no silent
//! replacement of an earlier run, and a metrics log that agrees with the checkpoints after any
//! crash. Also the fault points through which tests kill or fail a run at a chosen moment.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The lock file in `train.output_dir`: holds the pid of the run using the folder.
pub const LOCK_FILE: &str = ".rlhf.lock";
/// One JSON object per logged step, `step` first.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Files a run writes at the top of `train.output_dir`, removed by `--overwrite`.
const RUN_FILES: [&str; 3] = [METRICS_FILE, "eval_metrics.json", "completions.jsonl"];
/// Role adapter folders a run writes, removed by `--overwrite` when they hold an adapter.
const ROLE_DIRS: [&str; 3] = ["policy", "reward", "value"];

/// A locked output folder and the checkpoint the run starts from.
pub struct RunDir {
    dir: PathBuf,
    lock: PathBuf,
    /// The checkpoint to resume from (`None`: start at step 0).
    pub resume: Option<PathBuf>,
}

/// `checkpoint-N` folders under `dir`, by step.
pub fn checkpoints(dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n = name.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            e.path().is_dir().then(|| (n, e.path()))
        })
        .collect();
    out.sort();
    out
}

impl RunDir {
    /// Creates and locks `dir`. `resume`: `None` for a fresh run, `Some(None)` for the latest
    /// checkpoint in `dir` (a fresh start when there is none yet, so a crash-and-restart loop
    /// can always pass `--resume`), `Some(Some(path))` for that checkpoint. A fresh run into a
    /// folder holding checkpoints is refused unless `overwrite`, which first removes what an
    /// earlier run wrote. Temporary checkpoint folders a killed run left are removed.
    pub fn open(dir: &Path, resume: Option<&Option<PathBuf>>, overwrite: bool) -> Result<Self> {
        if overwrite && resume.is_some() {
            bail!("--resume and --overwrite contradict each other: pass one of them");
        }
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "key `train.output_dir`: {}: cannot create the folder",
                dir.display()
            )
        })?;
        let lock = dir.join(LOCK_FILE);
        acquire_lock(&lock, dir)?;
        let mut run = RunDir {
            dir: dir.to_path_buf(),
            lock,
            resume: None,
        };
        run.remove_temporary_checkpoints();
        let existing = checkpoints(dir);
        let resume = match resume {
            Some(Some(path)) => Some(path.clone()),
            Some(None) => match existing.last() {
                Some((_, path)) => Some(path.clone()),
                None => {
                    eprintln!(
                        "note: --resume: {} holds no checkpoint yet; starting from step 0",
                        dir.display()
                    );
                    None
                }
            },
            None => {
                if let Some((n, _)) = existing.last() {
                    if !overwrite {
                        bail!(
                            "{}: holds checkpoints of an earlier run (the latest is checkpoint-{n}): continue it with --resume, or pass --overwrite to replace it",
                            dir.display()
                        );
                    }
                }
                if overwrite {
                    run.remove_earlier_run(&existing)?;
                }
                None
            }
        };
        run.resume = resume;
        Ok(run)
    }

    /// The locked folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn remove_temporary_checkpoints(&self) {
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(".checkpoint-") && name.ends_with(".tmp") {
                std::fs::remove_dir_all(e.path()).ok();
            }
        }
    }

    fn remove_earlier_run(&self, existing: &[(usize, PathBuf)]) -> Result<()> {
        let remove_dir = |p: &Path| {
            std::fs::remove_dir_all(p).with_context(|| format!("{}: cannot remove", p.display()))
        };
        for (_, p) in existing {
            remove_dir(p)?;
        }
        for role in ROLE_DIRS {
            let p = self.dir.join(role);
            if p.join("adapter_config.json").exists() {
                remove_dir(&p)?;
            }
        }
        for f in RUN_FILES {
            let p = self.dir.join(f);
            if p.exists() {
                std::fs::remove_file(&p)
                    .with_context(|| format!("{}: cannot remove", p.display()))?;
            }
        }
        eprintln!(
            "note: --overwrite: removed the earlier run's checkpoints, adapters and logs in {}",
            self.dir.display()
        );
        Ok(())
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        // Only our own lock: a folder whose stale lock was taken over is not ours to clear.
        if read_pid(&self.lock) == Some(std::process::id()) {
            std::fs::remove_file(&self.lock).ok();
        }
    }
}

fn read_pid(lock: &Path) -> Option<u32> {
    std::fs::read_to_string(lock).ok()?.trim().parse().ok()
}

/// Whether process `pid` exists.
fn alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        std::process::Command::new("kill")
            .args(["-0", &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(true)
    }
}

/// Creates `lock` holding our pid, atomically (a hard link of a complete temporary file, so no
/// reader sees an empty lock). A lock whose process is gone is stale and taken over.
fn acquire_lock(lock: &Path, dir: &Path) -> Result<()> {
    let me = std::process::id();
    let tmp = dir.join(format!("{LOCK_FILE}.{me}"));
    std::fs::write(&tmp, format!("{me}\n"))
        .with_context(|| format!("{}: cannot write the lock file", tmp.display()))?;
    let result = (|| {
        for _ in 0..3 {
            match std::fs::hard_link(&tmp, lock) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    match read_pid(lock) {
                        Some(pid) if pid != me && alive(pid) => bail!(
                            "{}: another run (pid {pid}) is using this train.output_dir; wait for it to end or choose another folder",
                            dir.display()
                        ),
                        Some(pid) if pid == me => bail!(
                            "{}: this process already runs in this train.output_dir",
                            dir.display()
                        ),
                        stale => {
                            eprintln!(
                                "note: {}: removing the stale lock of {}",
                                lock.display(),
                                stale.map_or("an unknown process".into(), |p| format!(
                                    "pid {p}, which is no longer running"
                                ))
                            );
                            std::fs::remove_file(lock).ok();
                        }
                    }
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("{}: cannot create the lock file", lock.display()))
                }
            }
        }
        bail!("{}: cannot take the lock file", lock.display())
    })();
    std::fs::remove_file(&tmp).ok();
    result
}

/// `metrics.jsonl`, append-only: one `write` per line, synced before the checkpoint that covers
/// it is written, so after a crash the log holds at least every step of the last checkpoint.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens the log of `dir` for a run that starts after optimizer step `start`: lines of later
    /// steps (from a run that was stopped before their checkpoint) and a torn last line are
    /// dropped first.
    pub fn open(dir: &Path, start: usize) -> Result<Self> {
        let path = dir.join(METRICS_FILE);
        if let Ok(text) = std::fs::read(&path) {
            let kept = lines_up_to(&text, start);
            if kept.len() != text.len() {
                crate::util::write_atomic(&path, &kept)?;
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        Ok(Self { path, file })
    }

    /// Appends `line` (a JSON object with `step`) with a single write.
    pub fn append(&mut self, line: &serde_json::Value) -> Result<()> {
        let mut bytes = serde_json::to_vec(line)?;
        bytes.push(b'\n');
        let step = line.get("step").and_then(|s| s.as_u64()).unwrap_or(0) as usize;
        if fault_armed("metrics-torn", step) {
            self.file.write_all(&bytes[..bytes.len() / 2]).ok();
            fault_kill();
        }
        self.file
            .write_all(&bytes)
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }

    /// Makes every appended line durable (before a checkpoint that covers them).
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .with_context(|| format!("{}: cannot sync", self.path.display()))
    }
}

/// The complete lines of `text` whose `step` is at most `start`, in order.
fn lines_up_to(text: &[u8], start: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for line in text.split_inclusive(|&b| b == b'\n') {
        if line.last() != Some(&b'\n') {
            continue; // torn: the writer died mid-line
        }
        let step = serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
        if step.is_some_and(|s| s as usize <= start) {
            out.extend_from_slice(line);
        }
    }
    out
}

/// The environment variable that arms a fault point, for tests: `POINT@STEP` kills the process
/// with SIGKILL when the run reaches `POINT` at optimizer step `STEP` (1-based, as in
/// metrics.jsonl); `POINT@STEP=error` makes it fail with an error there instead.
pub const FAULT_ENV: &str = "RLHF_FAULT";

fn fault_spec() -> Option<&'static (String, usize, bool)> {
    static SPEC: std::sync::OnceLock<Option<(String, usize, bool)>> = std::sync::OnceLock::new();
    SPEC.get_or_init(|| {
        let v = std::env::var(FAULT_ENV).ok()?;
        let (point, rest) = v.split_once('@')?;
        let (step, error) = match rest.split_once('=') {
            Some((s, "error")) => (s, true),
            Some(_) => return None,
            None => (rest, false),
        };
        Some((point.to_string(), step.parse().ok()?, error))
    })
    .as_ref()
}

fn fault_armed(point: &str, step: usize) -> bool {
    fault_spec().is_some_and(|(p, s, error)| p == point && *s == step && !error)
}

/// Dies as `kill -9` would: no destructor, no flush, no lock removal.
fn fault_kill() -> ! {
    #[cfg(unix)]
    {
        std::process::Command::new("kill")
            .args(["-KILL", &std::process::id().to_string()])
            .status()
            .ok();
        std::thread::sleep(std::time::Duration::from_secs(5));
    }
    std::process::abort()
}

/// A fault point of the run loop: does nothing unless [`FAULT_ENV`] arms `point` at `step`.
pub fn fault_point(point: &str, step: usize) -> Result<()> {
    match fault_spec() {
        Some((p, s, error)) if p == point && *s == step => {
            if *error {
                bail!("injected fault at {point} of step {step}")
            }
            fault_kill()
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_past_the_checkpoint_and_a_torn_tail_are_dropped() {
        let text = b"{\"step\":1,\"loss\":0.5}\n{\"step\":2,\"loss\":0.4}\n{\"step\":3,\"loss\":0.3}\n{\"step\":4,\"lo";
        let kept = lines_up_to(text, 2);
        assert_eq!(
            kept,
            b"{\"step\":1,\"loss\":0.5}\n{\"step\":2,\"loss\":0.4}\n"
        );
        assert_eq!(lines_up_to(text, 0), b"");
        assert_eq!(
            lines_up_to(text, 9).len(),
            text.len() - b"{\"step\":4,\"lo".len()
        );
    }

    #[test]
    fn a_live_lock_refuses_a_stale_one_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let first = RunDir::open(&out, None, false).unwrap();
        let e = RunDir::open(&out, None, false).err().unwrap().to_string();
        assert!(e.contains("already runs"), "{e}");
        drop(first);
        assert!(!out.join(LOCK_FILE).exists());
        // A live process that is not us (our parent) holds the lock.
        let parent = std::os::unix::process::parent_id();
        std::fs::write(out.join(LOCK_FILE), format!("{parent}\n")).unwrap();
        let e = RunDir::open(&out, None, false).err().unwrap().to_string();
        assert!(e.contains(&format!("pid {parent}")), "{e}");
        // A pid no process has.
        std::fs::write(out.join(LOCK_FILE), "4194999\n").unwrap();
        let run = RunDir::open(&out, None, false).unwrap();
        assert_eq!(read_pid(&out.join(LOCK_FILE)), Some(std::process::id()));
        drop(run);
    }

    #[test]
    fn a_fresh_run_into_checkpoints_needs_resume_or_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        std::fs::create_dir_all(out.join("checkpoint-2")).unwrap();
        std::fs::create_dir_all(out.join("checkpoint-10")).unwrap();
        std::fs::create_dir_all(out.join(".checkpoint-11.tmp")).unwrap();
        std::fs::write(out.join(METRICS_FILE), "{\"step\":1}\n").unwrap();
        let e = RunDir::open(out, None, false).err().unwrap().to_string();
        assert!(
            e.contains("--resume") && e.contains("--overwrite") && e.contains("checkpoint-10"),
            "{e}"
        );
        assert!(!out.join(".checkpoint-11.tmp").exists());
        let run = RunDir::open(out, Some(&None), false).unwrap();
        assert_eq!(
            run.resume.as_deref(),
            Some(out.join("checkpoint-10").as_path())
        );
        drop(run);
        let run = RunDir::open(out, None, true).unwrap();
        assert!(run.resume.is_none());
        assert!(checkpoints(out).is_empty() && !out.join(METRICS_FILE).exists());
    }
}
