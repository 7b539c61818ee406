//! What `rlhf bench` reads of the GPU: `nvidia-smi`'s memory readings (the device's and this
//! process's, polled during the run) and the card's name, and from it the dense bf16 tensor-core
//! peak that model FLOPs utilization (MFU) divides by.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Polls `nvidia-smi` every ~50 ms on a thread and keeps the largest memory.used of the device
/// and of this process (MiB).
pub struct SmiPoller {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Option<(f64, Option<f64>)>>,
}

impl SmiPoller {
    pub fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak: Option<f64> = None;
            let mut own: Option<f64> = None;
            loop {
                let done = flag.load(Ordering::Relaxed);
                if let Some(v) = nvidia_smi_process_mib() {
                    own = Some(own.map_or(v, |p| p.max(v)));
                }
                match nvidia_smi_mib("memory.used") {
                    Some(v) => peak = Some(peak.map_or(v, |p| p.max(v))),
                    // Absent or failing: report null rather than a partial number.
                    None if peak.is_none() => return None,
                    None => {}
                }
                if done {
                    return peak.map(|p| (p, own));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self { stop, handle }
    }

    /// Stops polling (after one last sample) and returns the peaks in MiB (device, process).
    pub fn finish(self) -> Option<(f64, Option<f64>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().ok().flatten()
    }
}

/// One `nvidia-smi --query-gpu=<field>` value in MiB for the device burn's default CUDA device
/// is (the first of CUDA_VISIBLE_DEVICES, else GPU 0); `None` without nvidia-smi.
pub fn nvidia_smi_mib(field: &str) -> Option<f64> {
    nvidia_smi_gpu(field)?.parse().ok()
}

/// One `nvidia-smi --query-gpu=<field>` value as text, for the same device.
fn nvidia_smi_gpu(field: &str) -> Option<String> {
    let index = std::env::var("CUDA_VISIBLE_DEVICES")
        .ok()
        .and_then(|v| v.split(',').next().map(|s| s.trim().to_string()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "0".into());
    let out = std::process::Command::new("nvidia-smi")
        .args([
            format!("--query-gpu={field}"),
            "--format=csv,noheader,nounits".into(),
            "-i".into(),
            index,
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .trim()
        .to_string();
    (!line.is_empty()).then_some(line)
}

/// This process's used GPU memory in MiB as `nvidia-smi --query-compute-apps` lists it; `None`
/// where it is not listed (no nvidia-smi, or a PID namespace that hides the process).
fn nvidia_smi_process_mib() -> Option<f64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    let me = std::process::id().to_string();
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let (pid, mib) = l.split_once(',')?;
        (pid.trim() == me).then(|| mib.trim().parse().ok())?
    })
}

/// The GPU's name as `nvidia-smi` gives it (e.g. "NVIDIA H100 80GB HBM3"); `None` without it.
pub fn gpu_name() -> Option<String> {
    nvidia_smi_gpu("name")
}

/// Dense bf16 tensor-core peak (TFLOP/s, f32 accumulation, no sparsity) of the cards whose
/// datasheet value we state, by `nvidia-smi` name; `None` for others (`--peak-tflops` sets it).
pub fn bf16_peak_tflops(name: &str) -> Option<f64> {
    let n = name.to_ascii_uppercase();
    let table: [(&str, f64); 8] = [
        // Order matters: the more specific names first.
        ("H100 PCIE", 756.0),
        ("H100 NVL", 835.0),
        ("H100", 989.4),
        ("H200", 989.4),
        ("A100", 312.0),
        ("L40S", 362.1),
        ("RTX 4090", 165.2),
        ("RTX 3090", 71.0),
    ];
    table
        .iter()
        .find(|(key, _)| n.contains(key))
        .map(|&(_, tflops)| tflops)
}

/// FLOPs a DPO step spends per trained token, by the usual count for LoRA on a frozen base with
/// gradient checkpointing: 8 x the parameters its GEMMs multiply (the policy's forward, the
/// recomputed forward and the input gradients, 2 each, plus the reference forward); attention's
/// `T x T` products and the embedding lookup are not counted.
pub fn dpo_flop_per_token(gemm_params: usize) -> f64 {
    8.0 * gemm_params as f64
}

/// Model FLOPs utilization: achieved FLOP/s over the peak.
pub fn mfu(flop_per_token: f64, tokens_per_sec: f64, peak_tflops: f64) -> f64 {
    flop_per_token * tokens_per_sec / (peak_tflops * 1e12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_of_named_cards() {
        assert_eq!(bf16_peak_tflops("NVIDIA H100 80GB HBM3"), Some(989.4));
        assert_eq!(bf16_peak_tflops("NVIDIA H100 PCIe"), Some(756.0));
        assert_eq!(bf16_peak_tflops("NVIDIA H200"), Some(989.4));
        assert_eq!(bf16_peak_tflops("NVIDIA GeForce RTX 4090"), Some(165.2));
        assert_eq!(bf16_peak_tflops("Tesla T4"), None);
    }

    #[test]
    fn mfu_of_the_8b_dpo_row() {
        // 8b (make_model.py): 32 blocks of 218.1M GEMM params + a 4096 x 128256 head.
        let n = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 4096 * 128256;
        let f = dpo_flop_per_token(n);
        assert!((f / 1e9 - 60.0).abs() < 0.1, "{f}");
        // 4,000 tokens/s on a 989.4 TFLOP/s card.
        let u = mfu(f, 4000.0, 989.4);
        assert!((u - 0.2426).abs() < 1e-3, "{u}");
    }
}
