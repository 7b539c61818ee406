//! Times a forward pass of SmolLM2-135M (unquantized, batch 4 x 64 tokens) on the CPU backend the
//! binary was built with, to choose the default CPU backend:
//!
//!     cargo run --release --example forward_bench                                  # ndarray
//!     cargo run --release --example forward_bench --no-default-features --features candle

use rlhf::model::Batch;

fn main() -> anyhow::Result<()> {
    let path = std::path::Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let device = Default::default();
    let loaded =
        rlhf::cli::setup::load_model::<rlhf::cli::setup::CpuBackend>(path, false, &device)?;
    let rows: Vec<Vec<u32>> = (0..4)
        .map(|r| {
            (0..64)
                .map(|i| ((i * 37 + r * 101) % 49000) as u32)
                .collect()
        })
        .collect();
    let batch = Batch::dense(&rows, &device);
    let mut times = Vec::new();
    for i in 0..6 {
        let t = std::time::Instant::now();
        let logits = loaded.model.forward(&batch, None);
        let _ = logits.into_data(); // synchronise
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "backend {} forward 4x64: median {:.3} s over {} runs",
        std::any::type_name::<rlhf::cli::setup::CpuBackend>(),
        times[times.len() / 2],
        times.len()
    );
    Ok(())
}
