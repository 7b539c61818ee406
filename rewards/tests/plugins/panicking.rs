//! Test double: a plugin that panics on any completion containing "boom".
//! Built by tests/plugins.rs; shows that a panic in a plugin becomes an error, not a crash.

use rlhf_rewards::plugin::RewardPlugin;
use serde_json::{Map, Value};

struct Panicky;

impl RewardPlugin for Panicky {
    const NAME: &'static str = "panicky";

    fn new(_config: &Value) -> Result<Self, String> {
        Ok(Panicky)
    }

    fn score(
        &self,
        _prompt: &str,
        completion: &str,
        _columns: &Map<String, Value>,
    ) -> Result<Option<f32>, String> {
        if completion.contains("boom") {
            panic!("boom: refusing to score {completion:?}");
        }
        Ok(Some(completion.len() as f32))
    }
}

rlhf_rewards::export_plugin!(Panicky);
