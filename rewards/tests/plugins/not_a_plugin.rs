//! Test double: a valid shared library that is not a reward plugin (no `rlhf_reward_plugin`).
//! Built by tests/plugins.rs, which expects the loader to refuse it.

/// Some unrelated exported function.
#[unsafe(no_mangle)]
pub extern "C" fn answer_to_everything() -> i32 {
    42
}
