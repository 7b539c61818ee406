//! Plugin loading end to end. The test builds the plugin libraries itself (the example plugin
//! in examples/reward-plugin and the test doubles in tests/plugins/) with cargo, into
//! target/tmp/reward-plugins, then loads them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use rlhf_rewards::{Columns, PluginReward, RewardBatch, RewardConfig, RewardFn, RewardSet};
use serde_json::{json, Value};

/// Built shared libraries by target name, or why the build failed.
fn built() -> &'static Result<HashMap<String, PathBuf>, String> {
    static BUILT: OnceLock<Result<HashMap<String, PathBuf>, String>> = OnceLock::new();
    BUILT.get_or_init(build_plugins)
}

fn build_plugins() -> Result<HashMap<String, PathBuf>, String> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("rewards/ has a parent");
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("reward-plugins");
    // Plugins need only the ABI part of rlhf-rewards, hence --no-default-features.
    let output = Command::new(env!("CARGO"))
        .current_dir(workspace)
        .args(["build", "--message-format=json-render-diagnostics"])
        .arg("--target-dir")
        .arg(&target_dir)
        .args(["--no-default-features", "-p", "rlhf-example-reward-plugin"])
        .args(["-p", "rlhf-rewards", "--lib", "--examples"])
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "building the plugins failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let mut libraries = HashMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let name = message["target"]["name"].as_str().unwrap_or_default();
        for file in message["filenames"].as_array().into_iter().flatten() {
            let file = file.as_str().unwrap_or_default();
            if file.ends_with(std::env::consts::DLL_SUFFIX) {
                libraries.insert(name.to_string(), PathBuf::from(file));
            }
        }
    }
    Ok(libraries)
}

/// The path of a built plugin library.
fn library(name: &str) -> PathBuf {
    match built() {
        Ok(libraries) => libraries
            .get(name)
            .unwrap_or_else(|| panic!("cargo built no library `{name}`: {libraries:?}"))
            .clone(),
        Err(e) => panic!("{e}"),
    }
}

fn batch_of<'a>(
    prompts: &'a mut Vec<String>,
    completions: &'a mut Vec<String>,
    columns: &'a mut Vec<Columns>,
    texts: &[&str],
) -> RewardBatch<'a> {
    *completions = texts.iter().map(|s| s.to_string()).collect();
    *prompts = (0..texts.len()).map(|i| format!("prompt {i}")).collect();
    *columns = (0..texts.len())
        .map(|i| {
            let mut c = Columns::new();
            c.insert("answer".into(), json!(format!("#### {i}")));
            c
        })
        .collect();
    RewardBatch::new(prompts, completions, columns).unwrap()
}

/// Scores `texts` with `func`.
fn score(func: &dyn RewardFn, texts: &[&str]) -> anyhow::Result<Vec<Option<f32>>> {
    let (mut p, mut c, mut k) = (vec![], vec![], vec![]);
    let batch = batch_of(&mut p, &mut c, &mut k, texts);
    func.score(&batch)
}

fn load_error(path: &Path, config: Value) -> String {
    format!("{:#}", PluginReward::load(path, &config).unwrap_err())
}

#[test]
fn marker_plugin_counts_markers() {
    let path = library("marker_reward");
    // Through the run config, with the path relative to the config's directory.
    let config: RewardConfig = serde_json::from_value(json!({
        "type": "plugin",
        "path": path.file_name().unwrap().to_str().unwrap(),
        "config": { "marker": "<m>" },
    }))
    .unwrap();
    let plugin = config.build(path.parent().unwrap()).unwrap();
    assert_eq!(plugin.name(), "marker_count");
    let texts = ["<m>", "a <m><m> b <m", "", "<m<m>>", "héllo <m> wörld <m>"];
    assert_eq!(
        score(plugin.as_ref(), &texts).unwrap(),
        vec![Some(1.0), Some(2.0), Some(0.0), Some(1.0), Some(2.0)]
    );

    // An instance may be used from several threads at once.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..20 {
                    let got = score(plugin.as_ref(), &texts).unwrap();
                    assert_eq!(got[1], Some(2.0));
                }
            });
        }
    });
}

#[test]
fn plugins_combine_with_builtins_from_the_run_config() {
    let path = library("marker_reward");
    let configs: Vec<RewardConfig> = serde_json::from_value(json!([
        { "type": "plugin", "path": path, "config": { "marker": "!" }, "weight": 0.5, "name": "bangs" },
        { "type": "exact_answer" },
    ]))
    .unwrap();
    let set = RewardSet::from_configs(&configs, Path::new("/nonexistent")).unwrap();
    assert_eq!(set.names(), vec!["bangs", "exact_answer"]);
    let (mut p, mut c, mut k) = (vec![], vec![], vec![]);
    // Answers are "#### 0" and "#### 1".
    let batch = batch_of(&mut p, &mut c, &mut k, &["0!!", "#### 7!"]);
    let scores = set.score(&batch).unwrap();
    assert_eq!(scores.per_func[0], vec![2.0, 1.0]);
    assert_eq!(scores.per_func[1], vec![1.0, 0.0]);
    assert_eq!(scores.total, vec![2.0, 0.5]);
}

#[test]
fn plugin_config_errors_name_the_plugin() {
    let path = library("marker_reward");
    let err = load_error(&path, Value::Null);
    assert!(
        err.contains("`marker_count`")
            && err.contains(&path.display().to_string())
            && err.contains("refused its config")
            && err.contains("missing `marker`"),
        "{err}"
    );
    let err = load_error(&path, json!({ "marker": 3 }));
    assert!(err.contains("non-empty string"), "{err}");
}

#[test]
fn panicking_plugin_is_an_error_naming_plugin_and_completion() {
    let path = library("panicking_plugin");
    let plugin = PluginReward::load(&path, &Value::Null).unwrap();
    let err = format!(
        "{:#}",
        score(&plugin, &["fine", "also fine", "kaboom", "boom again"]).unwrap_err()
    );
    assert!(
        err.contains("reward plugin `panicky`")
            && err.contains(&path.display().to_string())
            && err.contains("panicked on completion 2")
            && err.contains("boom: refusing to score \"kaboom\""),
        "{err}"
    );
    // The process and the plugin are still fine.
    assert_eq!(
        score(&plugin, &["abc", "de"]).unwrap(),
        vec![Some(3.0), Some(2.0)]
    );
}

#[test]
fn wrong_abi_version_is_refused() {
    let path = library("wrong_abi_plugin");
    let err = load_error(&path, Value::Null);
    assert!(
        err.contains(&path.display().to_string())
            && err.contains("ABI version 999")
            && err.contains("speaks version 1"),
        "{err}"
    );
}

#[test]
fn library_without_entry_point_is_refused() {
    let path = library("not_a_plugin");
    let err = load_error(&path, Value::Null);
    assert!(
        err.contains(&path.display().to_string())
            && err.contains("not an rlhf reward plugin")
            && err.contains("`rlhf_reward_plugin`"),
        "{err}"
    );
}

#[test]
fn non_library_files_are_refused() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rlhf-rewards-not-a-library");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("x.so");
    std::fs::write(&path, "this is a text file, not a shared library\n").unwrap();
    let err = load_error(&path, Value::Null);
    assert!(
        err.contains(&path.display().to_string()) && err.contains("not a loadable shared library"),
        "{err}"
    );

    let missing = dir.join("missing.so");
    let err = load_error(&missing, Value::Null);
    assert!(
        err.contains(&missing.display().to_string()) && err.contains("cannot open"),
        "{err}"
    );

    // Through the run config, the error also says which entry failed.
    let configs: Vec<RewardConfig> =
        serde_json::from_value(json!([{ "type": "plugin", "path": "x.so" }])).unwrap();
    let err = format!("{:#}", RewardSet::from_configs(&configs, &dir).unwrap_err());
    assert!(
        err.contains("reward function #1 (plugin)") && err.contains("x.so"),
        "{err}"
    );
}
