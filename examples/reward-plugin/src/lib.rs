//! An rlhf reward plugin: the reward of a completion is the number of times a marker string
//! occurs in it (non-overlapping, case-sensitive).
//!
//! The marker comes from the plugin's `config` in the run config:
//!
//! ```toml
//! [[rewards]]
//! type = "plugin"
//! path = "target/release/libmarker_reward.so"
//! config = { marker = "<ok>" }
//! ```
//!
//! See README.md for building and loading it.

use rlhf_rewards::plugin::RewardPlugin;
use serde_json::{Map, Value};

/// Counts `marker` in each completion.
#[derive(Debug)]
pub struct MarkerCount {
    marker: String,
}

impl MarkerCount {
    /// The number of non-overlapping occurrences of the marker.
    pub fn count(&self, completion: &str) -> usize {
        completion.matches(self.marker.as_str()).count()
    }
}

impl RewardPlugin for MarkerCount {
    const NAME: &'static str = "marker_count";

    fn new(config: &Value) -> Result<Self, String> {
        const EXPECTED: &str = "expected a config like { marker = \"<ok>\" }";
        let empty = Map::new();
        let table = match config {
            Value::Null => &empty,
            Value::Object(table) => table,
            other => return Err(format!("config must be a table, got {other}: {EXPECTED}")),
        };
        if let Some(key) = table.keys().find(|k| k.as_str() != "marker") {
            return Err(format!("unknown config key `{key}`: {EXPECTED}"));
        }
        match table.get("marker") {
            Some(Value::String(marker)) if !marker.is_empty() => Ok(MarkerCount {
                marker: marker.clone(),
            }),
            Some(other) => Err(format!("`marker` must be a non-empty string, got {other}")),
            None => Err(format!("missing `marker`: {EXPECTED}")),
        }
    }

    fn score(
        &self,
        _prompt: &str,
        completion: &str,
        _columns: &Map<String, Value>,
    ) -> Result<Option<f32>, String> {
        Ok(Some(self.count(completion) as f32))
    }
}

rlhf_rewards::export_plugin!(MarkerCount);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_non_overlapping_occurrences() {
        let plugin = MarkerCount::new(&json!({ "marker": "aa" })).unwrap();
        assert_eq!(plugin.count("aaa aa b"), 2);
        assert_eq!(plugin.count(""), 0);
        let plugin = MarkerCount::new(&json!({ "marker": "<ok>" })).unwrap();
        let score = plugin.score("p", "<ok> x <ok><OK>", &Map::new()).unwrap();
        assert_eq!(score, Some(2.0));
    }

    #[test]
    fn refuses_bad_configs() {
        for bad in [
            json!("<ok>"),
            Value::Null,
            json!({}),
            json!({ "marker": "" }),
            json!({ "marker": 3 }),
            json!({ "marker": "x", "extra": 1 }),
        ] {
            let err = MarkerCount::new(&bad).unwrap_err();
            assert!(
                ["marker", "extra", "table"].iter().any(|w| err.contains(w)),
                "{bad}: {err}"
            );
        }
    }
}
