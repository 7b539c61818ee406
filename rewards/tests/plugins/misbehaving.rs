//! Test double: a plugin that takes its process down or never answers when it scores, as
//! `config.mode` says: `abort`, `exit` (status 0), `overflow` (unbounded recursion) or `loop`.
//! Built by the GRPO end-to-end tests: the trainer must survive it (plugins run in workers).

use rlhf_rewards::plugin::RewardPlugin;
use serde_json::{Map, Value};

struct Misbehaving(String);

#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 64]);
    recurse(frame[0] + 1) + frame[63]
}

impl RewardPlugin for Misbehaving {
    const NAME: &'static str = "misbehaving";

    fn new(config: &Value) -> Result<Self, String> {
        let mode = config["mode"].as_str().ok_or("config.mode missing")?;
        Ok(Misbehaving(mode.to_string()))
    }

    fn score(
        &self,
        _prompt: &str,
        _completion: &str,
        _columns: &Map<String, Value>,
    ) -> Result<Option<f32>, String> {
        match self.0.as_str() {
            "abort" => std::process::abort(),
            "exit" => std::process::exit(0),
            "overflow" => Ok(Some(recurse(0) as f32)),
            "loop" => loop {
                std::hint::spin_loop();
            },
            other => Err(format!("unknown mode {other}")),
        }
    }
}

rlhf_rewards::export_plugin!(Misbehaving);
