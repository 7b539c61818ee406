//! Out of device memory, and the other device failures we can name, as an error, not a panic.
//!
//! burn's tensor ops cannot return errors, so an allocation the device refuses (or a CUDA driver,
//! cuBLASLt or kernel failure) surfaces as a panic deep inside cubecl or our fast paths, possibly
//! with the device's lock held. Unwinding from there would
//! drop tensors through that same state, so we do not unwind: a panic hook recognises the
//! allocation failure, prints one line naming the phase the run was in, what the allocator
//! held and what the plan said, and exits with the code `main` gives it. Checkpoints are written
//! into a temporary folder and renamed when complete, so the last one stays intact and
//! `--resume` continues from it.
//!
//! The run marks its phases with [`enter`]. `RLHF_FAULT_OOM=PHASE@N` makes the N-th entry into
//! PHASE fail as a device allocation would, `RLHF_FAULT_DEVICE=PHASE@N` as a failed kernel launch
//! would (how the exit paths are tested without a GPU).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// What the run was doing, for the message.
static PHASE: Mutex<&str> = Mutex::new("start-up");
/// Entries into each phase so far, for `RLHF_FAULT_OOM`.
static ENTRIES: Mutex<Vec<(&str, u64)>> = Mutex::new(Vec::new());
/// The plan's allocator bytes and card bytes and the budget, in bytes (0: no plan yet).
static PLANNED_TENSORS: AtomicU64 = AtomicU64::new(0);
static PLANNED_CARD: AtomicU64 = AtomicU64::new(0);
static BUDGET: AtomicU64 = AtomicU64::new(0);

const GIB: f64 = (1u64 << 30) as f64;

/// Marks the start of a phase of the run ("load", "rollout", "scoring", "train step",
/// "checkpoint", "eval").
pub fn enter(phase: &'static str) {
    *PHASE.lock().unwrap_or_else(|e| e.into_inner()) = phase;
    let n = {
        let mut entries = ENTRIES.lock().unwrap_or_else(|e| e.into_inner());
        match entries.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                entries.push((phase, 1));
                1
            }
        }
    };
    let armed = |var: &str| {
        std::env::var(var).is_ok_and(|fault| {
            let (p, at) = fault.split_once('@').unwrap_or((fault.as_str(), "1"));
            p == phase && at.parse::<u64>().ok() == Some(n)
        })
    };
    if armed("RLHF_FAULT_OOM") {
        panic!("can't allocate buffer of size: 268435456 (forced by RLHF_FAULT_OOM)");
    }
    if armed("RLHF_FAULT_DEVICE") {
        panic!("DriverError(CUDA_ERROR_LAUNCH_FAILED, \"unspecified launch failure\") (forced by RLHF_FAULT_DEVICE)");
    }
}

/// Records what the plan promised, for the message.
pub fn set_planned(tensor_bytes: u64, card_bytes: u64, budget_bytes: u64) {
    PLANNED_TENSORS.store(tensor_bytes, Ordering::Relaxed);
    PLANNED_CARD.store(card_bytes, Ordering::Relaxed);
    BUDGET.store(budget_bytes, Ordering::Relaxed);
}

/// Whether a panic message is a device allocation failure (cubecl's `BufferTooBig`, a driver
/// out-of-memory from cuBLASLt or a kernel launch).
pub fn is_out_of_memory(msg: &str) -> bool {
    msg.contains("can't allocate buffer")
        || msg.contains("BufferTooBig")
        || msg.contains("OUT_OF_MEMORY")
        || msg.contains("out of memory")
}

/// What a panic message of another device failure contains: the CUDA driver's and cuBLAS's
/// status names, and the messages of our own fast paths when a launch or a GEMM fails.
const DEVICE_FAILURES: [&str; 6] = [
    "CUDA_ERROR_",
    "CUBLAS_STATUS_",
    "CUDA GEMM failed",
    "CUDA linear layer failed",
    "CUDA linear backward failed",
    "failed on the GPU",
];

/// Whether a panic message is a device failure other than out of memory (see
/// [`DEVICE_FAILURES`]).
pub fn is_device_error(msg: &str) -> bool {
    !is_out_of_memory(msg) && DEVICE_FAILURES.iter().any(|p| msg.contains(p))
}

/// The one-line message for another device failure during the current phase: the failure's
/// first line (at most 300 characters) and what to do.
pub fn device_message(panic_msg: &str) -> String {
    let phase = *PHASE.lock().unwrap_or_else(|e| e.into_inner());
    let first = panic_msg.lines().next().unwrap_or("").trim();
    let first: String = first.chars().take(300).collect();
    format!(
        "GPU failure in {phase}: {first}; the device state is lost, so the run stopped; the last checkpoint in output_dir is intact (--resume continues from it)"
    )
}

/// The one-line message for an allocation failure during the current phase.
pub fn message(panic_msg: &str) -> String {
    let phase = *PHASE.lock().unwrap_or_else(|e| e.into_inner());
    let size = panic_msg
        .split("size: ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse::<u64>().ok());
    let mut m = format!("out of GPU memory in {phase}");
    if let Some(size) = size {
        m += &format!(": a {:.0} MiB allocation failed", size as f64 / 1048576.0);
    }
    if let Some(held) = crate::devmem::held_bytes() {
        m += &format!(" with {:.2} GiB held by the allocator", held as f64 / GIB);
    }
    let (tensors, card, budget) = (
        PLANNED_TENSORS.load(Ordering::Relaxed),
        PLANNED_CARD.load(Ordering::Relaxed),
        BUDGET.load(Ordering::Relaxed),
    );
    if card > 0 {
        m += &format!(
            " (planned: {:.2} GiB of tensors, {:.2} GiB on the card, budget {:.2} GiB)",
            tensors as f64 / GIB,
            card as f64 / GIB,
            budget as f64 / GIB
        );
    }
    m += "; lower train.batch_size or the lengths, set plan.logits_chunk, or lower plan.budget_gib to what the card really has and re-run `rlhf plan`; the last checkpoint in output_dir is intact (--resume continues from it)";
    m
}

/// Installs the hook: allocation failures print one line and exit with `exit_code`, other device
/// failures one line and `device_code`; every other panic goes to the default hook.
pub fn install_hook(exit_code: i32, device_code: i32) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned());
        match msg {
            Some(msg) if is_out_of_memory(&msg) => {
                eprintln!("error: {}", message(&msg));
                std::process::exit(exit_code);
            }
            Some(msg) if is_device_error(&msg) => {
                eprintln!("error: {}", device_message(&msg));
                std::process::exit(device_code);
            }
            _ => default(info),
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_allocation_failures_only() {
        assert!(is_out_of_memory(
            "can't allocate buffer of size: 268435456\n"
        ));
        assert!(is_out_of_memory(
            "called `Result::unwrap()` on an `Err` value: BufferTooBig { size: 1 }"
        ));
        assert!(is_out_of_memory(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"
        ));
        assert!(!is_out_of_memory("index out of bounds: the len is 3"));
    }

    #[test]
    fn recognises_other_device_failures_only() {
        for msg in [
            "DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access was encountered\")",
            "CUDA GEMM failed: cuBLASLt matmul: CUBLAS_STATUS_EXECUTION_FAILED",
            "CUDA linear layer failed: launch",
            "CUDA linear backward failed: launch",
            "qlinear backward failed on the GPU: launch",
        ] {
            assert!(is_device_error(msg), "{msg}");
        }
        assert!(!is_device_error(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"
        ));
        assert!(!is_device_error("index out of bounds: the len is 3"));
    }

    #[test]
    fn device_message_is_one_line_naming_the_phase() {
        enter("rollout");
        let m = device_message("DriverError(CUDA_ERROR_LAUNCH_FAILED, \"x\")\nstack backtrace:");
        assert!(m.starts_with("GPU failure in rollout: DriverError(CUDA_ERROR_LAUNCH_FAILED"));
        assert!(m.contains("--resume"));
        assert!(!m.contains('\n'));
    }

    #[test]
    fn message_names_phase_size_and_plan() {
        enter("train step");
        set_planned(3 << 30, 4 << 30, 24 << 30);
        let m = message("can't allocate buffer of size: 268435456\nbacktrace");
        assert!(m.starts_with("out of GPU memory in train step: a 256 MiB allocation failed"));
        assert!(m.contains("planned: 3.00 GiB of tensors, 4.00 GiB on the card, budget 24.00 GiB"));
        assert!(!m.contains('\n'));
    }
}
