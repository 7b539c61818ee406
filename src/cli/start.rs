//! A run that starts from an existing PEFT adapter (`model.adapter`): the adapter's LoRA shape
//! replaces `[lora]`'s before anything is planned or loaded.

use crate::config::RunConfig;
use crate::model::lora::read_peft_config;
use anyhow::{bail, Context, Result};

/// With `model.adapter` set, takes `lora.r`, `lora.alpha` and `lora.target_modules` from the
/// adapter's `adapter_config.json`, as `PeftModel.from_pretrained` does; `lora.dropout` stays
/// the run's (a training setting, not part of the weights). Returns a one-line note when
/// `text` (the config file) set one of those keys to something else: the adapter wins, since
/// its weights have its shape. `None` when there is nothing to say.
pub fn apply_start_adapter(cfg: &mut RunConfig, text: &str) -> Result<Option<String>> {
    let Some(dir) = cfg.model.adapter.clone() else {
        return Ok(None);
    };
    if !dir.is_dir() {
        bail!(
            "key `model.adapter`: {}: folder not found (expected a PEFT adapter folder with adapter_config.json and adapter_model.safetensors)",
            dir.display()
        );
    }
    let found = read_peft_config(&dir).context("key `model.adapter`")?;
    let set: toml::Table = toml::from_str(text).unwrap_or_default();
    let lora = set.get("lora").and_then(|v| v.as_table());
    let mut differ = Vec::new();
    if let Some(lora) = lora {
        if lora.contains_key("r") && cfg.lora.r != found.r {
            differ.push(format!("r = {} (adapter: {})", cfg.lora.r, found.r));
        }
        if lora.contains_key("alpha") && cfg.lora.alpha != found.alpha {
            differ.push(format!(
                "alpha = {} (adapter: {})",
                cfg.lora.alpha, found.alpha
            ));
        }
        let mut mine = cfg.lora.target_modules.clone();
        let mut theirs = found.target_modules.clone();
        mine.sort();
        theirs.sort();
        if lora.contains_key("target_modules") && mine != theirs {
            differ.push(format!(
                "target_modules = {:?} (adapter: {:?})",
                cfg.lora.target_modules, found.target_modules
            ));
        }
    }
    cfg.lora.r = found.r;
    cfg.lora.alpha = found.alpha;
    cfg.lora.target_modules = found.target_modules;
    Ok((!differ.is_empty()).then(|| {
        format!(
            "note: [lora] {} ignored: the run starts from model.adapter {}, whose adapter_config.json sets the LoRA shape",
            differ.join(", "),
            dir.display()
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::apply_start_adapter;
    use crate::config::{ReferenceModel, RunConfig};
    use std::path::Path;

    fn parse(s: &str) -> anyhow::Result<RunConfig> {
        RunConfig::parse(s, Path::new("run.toml"))
    }

    #[test]
    fn reference_defaults_follow_the_start_adapter() {
        let c = parse("[model]\npath = \"m\"\n").unwrap();
        assert_eq!(c.model.reference(), ReferenceModel::Base);
        let c = parse("[model]\nadapter = \"sft/policy\"\n").unwrap();
        assert_eq!(c.model.reference(), ReferenceModel::Initial);
        let c = parse("[model]\nadapter = \"a\"\nreference = \"base\"\n").unwrap();
        assert_eq!(c.model.reference(), ReferenceModel::Base);
        let e = parse("[model]\nreference = \"sft\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.reference"), "{e}");
    }

    #[test]
    fn initial_reference_without_an_adapter_names_both_keys() {
        let e = parse("[model]\nreference = \"initial\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("run.toml") && e.contains("model.reference") && e.contains("model.adapter"),
            "{e}"
        );
    }

    #[test]
    fn the_adapter_sets_the_lora_shape_and_a_different_lora_section_is_noted() {
        let dir = tempfile::tempdir().unwrap();
        let json = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
            "target_modules": ["v_proj", "q_proj"]}"#;
        std::fs::write(dir.path().join("adapter_config.json"), json).unwrap();
        let head = format!("[model]\nadapter = {:?}\n", dir.path());
        let text = format!("{head}[lora]\nr = 8\ndropout = 0.05\n");
        let mut c = parse(&text).unwrap();
        let note = apply_start_adapter(&mut c, &text).unwrap().expect("a note");
        assert!(note.contains("r = 8 (adapter: 4)"), "{note}");
        assert!(!note.contains("target_modules"), "{note}");
        assert_eq!((c.lora.r, c.lora.alpha, c.lora.dropout), (4, 8.0, 0.05));
        assert_eq!(c.lora.target_modules, ["v_proj", "q_proj"]);
        // Nothing set explicitly: nothing to say.
        let mut c = parse(&head).unwrap();
        assert_eq!(apply_start_adapter(&mut c, &head).unwrap(), None);
        assert_eq!(c.lora.r, 4);
    }

    #[test]
    fn a_missing_adapter_folder_names_the_key_and_the_folder() {
        let text = "[model]\nadapter = \"no/such/adapter\"\n";
        let mut c = parse(text).unwrap();
        let e = format!("{:#}", apply_start_adapter(&mut c, text).unwrap_err());
        assert!(
            e.contains("model.adapter") && e.contains("no/such/adapter"),
            "{e}"
        );
    }
}
