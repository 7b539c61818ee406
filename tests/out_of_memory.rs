//! An allocation the device refuses ends the run with one line and exit code 4 (another device
//! failure: exit code 6), never a panic, and the last checkpoint resumes. The failure is forced
//! with `RLHF_FAULT_OOM` / `RLHF_FAULT_DEVICE` (the panic messages cubecl and the CUDA driver
//! raise), so the exit paths are checked on the CPU.

mod common;
use common::*;

/// Runs a 4-step DPO with `fault` armed in `var`: it must exit with `code` and one `error:` line
/// starting with `line`, no panic, keeping checkpoint 2 and not writing checkpoint 3; resumed, it
/// must end with the uninterrupted run's adapter.
fn fails_in_step_3_and_resumes(seed: u64, var: &str, fault: &str, code: i32, line: &str) {
    let run = Run::new(seed);
    let body = "batch_size = 4\nmax_steps = 4\nlearning_rate = 0.005\nsave_steps = 1\n\n[lora]\nr = 4\nalpha = 8.0\n";
    let full = run.config("full.toml", "full", body);
    rlhf(&["dpo", "--config", full.to_str().unwrap()]);

    let cut = run.config("cut.toml", "cut", body);
    let out = common::rlhf_command()
        .args(["dpo", "--config", cut.to_str().unwrap()])
        .env(var, fault)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "stderr: {stderr}");
    assert!(errors[0].starts_with(line), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(run.path("cut/checkpoint-2").exists());
    assert!(!run.path("cut/checkpoint-3").exists());

    rlhf(&["dpo", "--config", cut.to_str().unwrap(), "--resume"]);
    let a = std::fs::read(run.path("full/policy/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(run.path("cut/policy/adapter_model.safetensors")).unwrap();
    assert!(a == b, "resumed adapter differs from the uninterrupted one");
}

#[test]
fn out_of_memory_is_one_line_exit_4_and_the_checkpoint_resumes() {
    // The third checkpoint fails as a device allocation would: checkpoints 1 and 2 are done.
    fails_in_step_3_and_resumes(
        41,
        "RLHF_FAULT_OOM",
        "checkpoint@3",
        4,
        "error: out of GPU memory in checkpoint: a 256 MiB allocation failed",
    );
}

/// Another device failure (a kernel launch failing as the driver reports it) also ends the run
/// with one line naming the phase, its own exit code 6, and the last checkpoint resumes.
#[test]
fn device_failure_is_one_line_exit_6_and_the_checkpoint_resumes() {
    // The third step fails: its policy pass is the fifth entry into the train step (each step
    // enters it for the forward and again for the backward).
    fails_in_step_3_and_resumes(
        43,
        "RLHF_FAULT_DEVICE",
        "train step@5",
        6,
        "error: GPU failure in train step: DriverError(CUDA_ERROR_LAUNCH_FAILED",
    );
}
