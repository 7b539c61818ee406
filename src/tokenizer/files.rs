//! A model folder's JSON files as the tokenizer and the chat template read them.

use anyhow::{bail, Context, Result};
use serde_json::Value as Json;
use std::path::Path;

pub(super) fn read_json(path: &Path) -> Result<Json> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// A special token in `tokenizer_config.json`: a string, `{"content": ...}` (an AddedToken),
/// or null/absent.
pub(super) fn special_token_text(
    config: &Json,
    field: &str,
    path: &Path,
) -> Result<Option<String>> {
    match config.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(o)) => match o.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => bail!(
                "{}: `{field}` is an object without a string `content`",
                path.display()
            ),
        },
        Some(other) => bail!(
            "{}: `{field}` should be a string or {{\"content\": ...}}, found {other}",
            path.display()
        ),
    }
}
