//! Test double: a plugin that claims an ABI version the host does not speak.
//! Built by tests/plugins.rs, which expects the loader to refuse it.

use rlhf_rewards::plugin::{PluginVTable, RewardPlugin};
use serde_json::{Map, Value};

struct FromTheFuture;

impl RewardPlugin for FromTheFuture {
    const NAME: &'static str = "from_the_future";

    fn new(_config: &Value) -> Result<Self, String> {
        Ok(FromTheFuture)
    }

    fn score(&self, _p: &str, _c: &str, _cols: &Map<String, Value>) -> Result<Option<f32>, String> {
        Ok(Some(1.0))
    }
}

static VTABLE: PluginVTable = {
    let mut vtable = PluginVTable::for_plugin::<FromTheFuture>();
    vtable.abi_version = 999;
    vtable
};

/// The entry point, with a vtable of the wrong version.
#[unsafe(no_mangle)]
pub extern "C" fn rlhf_reward_plugin() -> *const PluginVTable {
    &VTABLE
}
