//! The other CPU backend, burn-candle, on the real model: SmolLM2-135M-Instruct (Q4_1 GGUF from
//! scripts/fetch_assets.sh, re-quantized to NF4) answers the question that tests/smollm2.rs asks
//! through the CLI on the default backend. burn's `candle` feature is a dev-dependency, so every
//! test build has both CPU backends and this runs without a second build of the crate
//! (`--no-default-features --features candle` makes burn-candle the CLI's backend instead).

use rlhf::cli::generate::{answer, GenerateArgs};
use rlhf::cli::DeviceArg;
use std::path::Path;

#[allow(deprecated)] // burn-candle is deprecated upstream; the crate still offers it.
type Candle = burn::backend::Candle<f32, i64>;

#[test]
fn smollm2_answers_paris_on_candle() {
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        model.exists(),
        "{} missing: run scripts/fetch_assets.sh",
        model.display()
    );
    let args = GenerateArgs {
        model,
        adapter: None,
        prompt: "What is the capital of France?".into(),
        chat: true,
        max_new_tokens: 20,
        min_new_tokens: 0,
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
        device: DeviceArg::Cpu,
        no_quantize: false,
    };
    let text = answer::<Candle>(&args, &Default::default()).unwrap();
    assert!(text.contains("Paris"), "burn-candle's answer: {text}");
}
