//! An allocation the device refuses ends the run with one line and exit code 4, never a panic,
//! and the last checkpoint resumes. The failure is forced with `RLHF_FAULT_OOM` (the same panic
//! message cubecl raises), so the exit path is checked on the CPU.

mod common;
use common::*;

#[test]
fn out_of_memory_is_one_line_exit_4_and_the_checkpoint_resumes() {
    let run = Run::new(41);
    let body = "batch_size = 4\nmax_steps = 4\nlearning_rate = 0.005\nsave_steps = 1\n\n[lora]\nr = 4\nalpha = 8.0\n";
    let full = run.config("full.toml", "full", body);
    rlhf(&["dpo", "--config", full.to_str().unwrap()]);

    let cut = run.config("cut.toml", "cut", body);
    // The third checkpoint fails as a device allocation would: checkpoints 1 and 2 are done.
    let out = common::rlhf_command()
        .args(["dpo", "--config", cut.to_str().unwrap()])
        .env("RLHF_FAULT_OOM", "checkpoint@3")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "stderr: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "stderr: {stderr}");
    assert!(
        errors[0]
            .starts_with("error: out of GPU memory in checkpoint: a 256 MiB allocation failed"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(run.path("cut/checkpoint-2").exists());
    assert!(!run.path("cut/checkpoint-3").exists());

    rlhf(&["dpo", "--config", cut.to_str().unwrap(), "--resume"]);
    let a = std::fs::read(run.path("full/policy/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(run.path("cut/policy/adapter_model.safetensors")).unwrap();
    assert!(a == b, "resumed adapter differs from the uninterrupted one");
}
