//! Datasets for DPO, reward modelling, GRPO and PPO, in TRL's column conventions.
//!
//! * Reading: `.jsonl` (one object per line) and `.json` (an array of objects; a `.json` file whose
//!   first character is `{` is read as JSON Lines, as HF `datasets` does). Every error is one line
//!   that names the file and the line (JSON Lines) or the row index from 0 (JSON array).
//! * Preference rows ([`PreferenceExample`]): TRL's standard `prompt`/`chosen`/`rejected` strings,
//!   TRL's conversational layout (lists of `{role, content}` messages, with an explicit `prompt` or
//!   an implicit one shared by `chosen` and `rejected`, split as TRL's `extract_prompt` does) and
//!   the sharegpt layout of LLaMA-Factory's `dpo_en_demo.json`.
//! * Prompt rows ([`PromptExample`]) for GRPO/PPO: `prompt` plus every other column, kept for the
//!   reward functions.
//! * Tokenization as TRL 1.16's `DPOTrainer._prepare_dataset` (see [`tokenize_pair`]) and
//!   `GRPOTrainer._tokenize_prompts` (see [`tokenize_prompt`]), with the tokenizer and the chat
//!   template behind the [`TextCodec`] trait so this module needs no model code.
//! * Batching ([`pad_right`], [`pad_left`], [`collate_pairs`]) and seeded epoch shuffling
//!   ([`epoch_order`]).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

// ---------------------------------------------------------------------------------------------
// Tokenizer interface
// ---------------------------------------------------------------------------------------------

/// What data preparation needs from a tokenizer + chat template (implemented by the engine).
pub trait TextCodec {
    /// Token ids of `text`; `add_special_tokens` adds what the tokenizer's post-processor adds
    /// (usually a BOS), as `tokenizer(text)` does in transformers.
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>>;
    fn eos_id(&self) -> Option<u32>;
    fn bos_id(&self) -> Option<u32>;
    /// Renders messages with the model's chat template (None if the model has none).
    fn render_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Option<Result<String>>;
}

/// One chat turn, as in TRL's conversational datasets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Where a row came from (for error messages)
// ---------------------------------------------------------------------------------------------

/// Position of a row inside its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// JSON Lines: line number, counted from 1 as editors do.
    Line(usize),
    /// JSON array: index of the element, counted from 0 as `dataset[i]` does.
    Row(usize),
}

/// File + position of a row; its `Display` ("data.jsonl line 7", "data.json row 3") starts
/// every error about the row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: Arc<str>,
    pub place: Place,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.place {
            Place::Line(n) => write!(f, "{} line {n}", self.file),
            Place::Row(i) => write!(f, "{} row {i}", self.file),
        }
    }
}

/// One JSON object read from a dataset file.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub origin: Origin,
    pub columns: Map<String, Value>,
}

// ---------------------------------------------------------------------------------------------
// Readers
// ---------------------------------------------------------------------------------------------

/// Reads every row of a `.jsonl` or `.json` file (by extension). Errors name the file and the
/// line or row: empty file, bytes that are not UTF-8, invalid JSON, a row that is not an object.
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let file: Arc<str> = path.display().to_string().into();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    let is_jsonl = match ext.as_deref() {
        Some("jsonl") => true,
        Some("json") => false,
        _ => bail!("{file}: unsupported dataset file extension (expected .jsonl or .json)"),
    };
    let bytes = std::fs::read(path).map_err(|e| anyhow!("{file}: cannot read the file: {e}"))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes); // UTF-8 byte-order mark
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    let rows = match first {
        None => bail!("{file}: the file is empty"),
        Some(b'{') => parse_jsonl(&file, bytes)?,
        Some(_) if is_jsonl => parse_jsonl(&file, bytes)?,
        Some(_) => parse_json_array(&file, bytes)?,
    };
    if rows.is_empty() {
        bail!("{file}: the file has no rows");
    }
    Ok(rows)
}

fn parse_jsonl(file: &Arc<str>, bytes: &[u8]) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let origin = Origin {
            file: file.clone(),
            place: Place::Line(i + 1),
        };
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let line = std::str::from_utf8(raw).map_err(|e| {
            anyhow!(
                "{origin}: not valid UTF-8 (bad byte at byte {} of the line)",
                e.valid_up_to() + 1
            )
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| {
            anyhow!(
                "{origin}: invalid JSON at column {}: {}",
                e.column(),
                json_error_text(&e)
            )
        })?;
        match value {
            Value::Object(columns) => rows.push(Row { origin, columns }),
            other => bail!("{origin}: expected a JSON object, found {}", kind(&other)),
        }
    }
    Ok(rows)
}

fn parse_json_array(file: &Arc<str>, bytes: &[u8]) -> Result<Vec<Row>> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        anyhow!("{file} line {line}: not valid UTF-8")
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        anyhow!(
            "{file}: invalid JSON at line {} column {}: {}",
            e.line(),
            e.column(),
            json_error_text(&e)
        )
    })?;
    let items = match value {
        Value::Array(items) => items,
        other => bail!(
            "{file}: expected a JSON array of objects (or one object per line), found {}",
            kind(&other)
        ),
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let origin = Origin {
                file: file.clone(),
                place: Place::Row(i),
            };
            match item {
                Value::Object(columns) => Ok(Row { origin, columns }),
                other => bail!("{origin}: expected a JSON object, found {}", kind(&other)),
            }
        })
        .collect()
}

/// serde_json's message without its " at line L column C" suffix (we print our own position).
fn json_error_text(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

/// "a string", "a number", ... for type errors.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

// ---------------------------------------------------------------------------------------------
// Rows in TRL's formats
// ---------------------------------------------------------------------------------------------

/// A prompt or a completion: plain text (TRL's "standard" format) or chat messages ("conversational").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    Text(String),
    Messages(Vec<Message>),
}

/// The prompt side of a row.
pub type Prompt = Content;
/// A completion (chosen or rejected answer).
pub type Completion = Content;

impl Content {
    pub fn is_conversational(&self) -> bool {
        matches!(self, Content::Messages(_))
    }
}

/// One preference pair, normalised from any supported layout. When the prompt is messages the
/// completions are messages too (the assistant turns that follow it), and likewise for text.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferenceExample {
    pub prompt: Prompt,
    pub chosen: Completion,
    pub rejected: Completion,
    /// TRL's optional `margin` column (used by the reward-model loss).
    pub margin: Option<f32>,
    pub origin: Origin,
}

/// One prompt for GRPO/PPO; every other column of the row is kept for the reward functions.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptExample {
    pub prompt: Prompt,
    pub extra: Map<String, Value>,
    pub origin: Origin,
}

/// Reads a preference dataset (see [`parse_preference`] for the layouts).
pub fn load_preferences(path: &Path) -> Result<Vec<PreferenceExample>> {
    read_rows(path)?.iter().map(parse_preference).collect()
}

/// Reads a prompt dataset for GRPO/PPO (see [`parse_prompt`]).
pub fn load_prompts(path: &Path) -> Result<Vec<PromptExample>> {
    read_rows(path)?.into_iter().map(parse_prompt).collect()
}

/// Normalises one preference row. Layouts, tried in this order:
/// 1. sharegpt (LLaMA-Factory): `conversations` = [{from, value}] with `from` in system/human/gpt
///    (ending with a human turn), `chosen`/`rejected` = {from: "gpt", value}.
/// 2. explicit prompt (TRL): `prompt`, `chosen`, `rejected`, all strings or all message lists.
/// 3. implicit prompt (TRL): only `chosen`/`rejected`; the prompt is their common prefix, split
///    as TRL's `extract_prompt` does (messages: shared leading turns; strings: shared leading
///    characters, a space just before the split goes with the completions).
pub fn parse_preference(row: &Row) -> Result<PreferenceExample> {
    let origin = &row.origin;
    let cols = &row.columns;
    let margin = match cols.get("margin") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_f64().map(|m| m as f32),
        Some(other) => bail!(
            "{origin}: column \"margin\" must be a number, found {}",
            kind(other)
        ),
    };
    for name in ["chosen", "rejected"] {
        column(row, name)?;
    }
    let (prompt, chosen, rejected) = if cols.contains_key("conversations")
        && !cols.contains_key("prompt")
    {
        sharegpt_pair(row)?
    } else if cols.contains_key("prompt") {
        let prompt = content_column(row, "prompt")?;
        let chosen = content_column(row, "chosen")?;
        let rejected = content_column(row, "rejected")?;
        for (name, c) in [("chosen", &chosen), ("rejected", &rejected)] {
            if c.is_conversational() != prompt.is_conversational() {
                bail!(
                    "{origin}: column \"prompt\" is {} but column \"{name}\" is {}; use one format per row",
                    describe(&prompt),
                    describe(c)
                );
            }
        }
        (prompt, chosen, rejected)
    } else {
        implicit_prompt(row)?
    };
    Ok(PreferenceExample {
        prompt,
        chosen,
        rejected,
        margin,
        origin: origin.clone(),
    })
}

/// Normalises one GRPO/PPO prompt row: `prompt` (string or messages) + the other columns.
pub fn parse_prompt(row: Row) -> Result<PromptExample> {
    let prompt = content_column(&row, "prompt")?;
    let Row {
        origin,
        mut columns,
    } = row;
    columns.remove("prompt");
    Ok(PromptExample {
        prompt,
        extra: columns,
        origin,
    })
}

fn describe(c: &Content) -> &'static str {
    match c {
        Content::Text(_) => "a string",
        Content::Messages(_) => "a list of messages",
    }
}

/// The column's value, or an error naming the column and the columns the row has.
fn column<'a>(row: &'a Row, name: &str) -> Result<&'a Value> {
    row.columns.get(name).ok_or_else(|| {
        let found: Vec<&str> = row.columns.keys().map(String::as_str).collect();
        anyhow!(
            "{}: missing column \"{name}\" (found: {})",
            row.origin,
            if found.is_empty() {
                "no columns".to_string()
            } else {
                found.join(", ")
            }
        )
    })
}

/// A prompt/chosen/rejected column: a non-empty string or a non-empty list of messages.
fn content_column(row: &Row, name: &str) -> Result<Content> {
    let origin = &row.origin;
    match column(row, name)? {
        Value::String(s) => {
            if s.trim().is_empty() {
                bail!("{origin}: column \"{name}\" is empty");
            }
            Ok(Content::Text(s.clone()))
        }
        Value::Array(items) => {
            let messages = items
                .iter()
                .enumerate()
                .map(|(i, m)| message(origin, name, i, m))
                .collect::<Result<Vec<_>>>()?;
            check_messages(origin, name, &messages)?;
            Ok(Content::Messages(messages))
        }
        other => bail!(
            "{origin}: column \"{name}\" must be a string or a list of {{role, content}} messages, found {}",
            kind(other)
        ),
    }
}

/// A list of messages must not be empty nor hold only empty contents.
fn check_messages(origin: &Origin, name: &str, messages: &[Message]) -> Result<()> {
    if messages.is_empty() {
        bail!("{origin}: column \"{name}\" is an empty list of messages");
    }
    if messages.iter().all(|m| m.content.trim().is_empty()) {
        bail!("{origin}: column \"{name}\" is empty (every message has empty content)");
    }
    Ok(())
}

/// One `{role, content}` message (other keys are ignored).
fn message(origin: &Origin, name: &str, index: usize, v: &Value) -> Result<Message> {
    let Value::Object(m) = v else {
        bail!(
            "{origin}: column \"{name}\" message {index} must be an object with \"role\" and \"content\", found {}",
            kind(v)
        );
    };
    let field = |key: &str| -> Result<String> {
        match m.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => bail!(
                "{origin}: column \"{name}\" message {index}: \"{key}\" must be a string, found {}",
                kind(other)
            ),
            None => bail!("{origin}: column \"{name}\" message {index}: missing \"{key}\""),
        }
    };
    Ok(Message {
        role: field("role")?,
        content: field("content")?,
    })
}

/// LLaMA-Factory's sharegpt ranking layout (`dpo_en_demo.json`).
fn sharegpt_pair(row: &Row) -> Result<(Prompt, Completion, Completion)> {
    let origin = &row.origin;
    let Value::Array(turns) = column(row, "conversations")? else {
        bail!(
            "{origin}: column \"conversations\" must be a list of {{from, value}} turns, found {}",
            kind(&row.columns["conversations"])
        );
    };
    let mut prompt = Vec::with_capacity(turns.len());
    for (i, turn) in turns.iter().enumerate() {
        let (from, value) = sharegpt_turn(origin, "conversations", Some(i), turn)?;
        let role = match from.as_str() {
            "system" if i == 0 => "system",
            "system" => bail!("{origin}: column \"conversations\" turn {i}: a system turn may only come first"),
            "human" | "user" => "user",
            "gpt" | "assistant" => "assistant",
            other => bail!(
                "{origin}: column \"conversations\" turn {i}: unsupported \"from\" value \"{other}\" \
                 (expected system, human or gpt)"
            ),
        };
        prompt.push(Message::new(role, value));
    }
    check_messages(origin, "conversations", &prompt)?;
    if prompt.last().map(|m| m.role.as_str()) != Some("user") {
        bail!("{origin}: column \"conversations\" must end with a human turn (the prompt of the pair)");
    }
    let answer = |name: &str| -> Result<Completion> {
        let (from, value) = sharegpt_turn(origin, name, None, column(row, name)?)?;
        if from != "gpt" && from != "assistant" {
            bail!("{origin}: column \"{name}\": \"from\" must be \"gpt\", found \"{from}\"");
        }
        if value.trim().is_empty() {
            bail!("{origin}: column \"{name}\" is empty");
        }
        Ok(Content::Messages(vec![Message::new("assistant", value)]))
    };
    let chosen = answer("chosen")?;
    let rejected = answer("rejected")?;
    Ok((Content::Messages(prompt), chosen, rejected))
}

/// `{from, value}` of a sharegpt turn; `index` is the position inside `conversations`.
fn sharegpt_turn(
    origin: &Origin,
    name: &str,
    index: Option<usize>,
    v: &Value,
) -> Result<(String, String)> {
    let at = match index {
        Some(i) => format!("column \"{name}\" turn {i}"),
        None => format!("column \"{name}\""),
    };
    let Value::Object(m) = v else {
        bail!(
            "{origin}: {at} must be an object with \"from\" and \"value\", found {}",
            kind(v)
        );
    };
    let field = |key: &str| -> Result<String> {
        match m.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => bail!(
                "{origin}: {at}: \"{key}\" must be a string, found {}",
                kind(other)
            ),
            None => bail!("{origin}: {at}: missing \"{key}\""),
        }
    };
    Ok((field("from")?, field("value")?))
}

/// TRL's `extract_prompt`: the prompt is the longest common prefix of `chosen` and `rejected`
/// (whole turns for messages, characters for strings). As in TRL, when one is a prefix of the
/// other the split falls one element before the end of the shorter one.
fn implicit_prompt(row: &Row) -> Result<(Prompt, Completion, Completion)> {
    let origin = &row.origin;
    let chosen = content_column(row, "chosen")?;
    let rejected = content_column(row, "rejected")?;
    let no_prompt = || {
        let found: Vec<&str> = row.columns.keys().map(String::as_str).collect();
        anyhow!(
            "{origin}: no \"prompt\" column and \"chosen\"/\"rejected\" share no leading part to use \
             as the prompt (found: {})",
            found.join(", ")
        )
    };
    let empty_part = |name: &str| {
        anyhow!("{origin}: column \"{name}\" has nothing left after removing the prompt it shares with the other answer")
    };
    match (chosen, rejected) {
        (Content::Messages(c), Content::Messages(r)) => {
            let split = extract_split(&c, &r, |_| false);
            if split == 0 || c[..split].iter().all(|m| m.content.trim().is_empty()) {
                return Err(no_prompt());
            }
            let (prompt, chosen, rejected) = (c[..split].to_vec(), c[split..].to_vec(), r[split..].to_vec());
            if chosen.is_empty() {
                return Err(empty_part("chosen"));
            }
            if rejected.is_empty() {
                return Err(empty_part("rejected"));
            }
            Ok((Content::Messages(prompt), Content::Messages(chosen), Content::Messages(rejected)))
        }
        (Content::Text(c), Content::Text(r)) => {
            let cc: Vec<char> = c.chars().collect();
            let rc: Vec<char> = r.chars().collect();
            let split = extract_split(&cc, &rc, |ch| *ch == ' ');
            let prompt: String = cc[..split].iter().collect();
            let chosen: String = cc[split..].iter().collect();
            let rejected: String = rc[split..].iter().collect();
            if prompt.trim().is_empty() {
                return Err(no_prompt());
            }
            if chosen.is_empty() {
                return Err(empty_part("chosen"));
            }
            if rejected.is_empty() {
                return Err(empty_part("rejected"));
            }
            Ok((Content::Text(prompt), Content::Text(chosen), Content::Text(rejected)))
        }
        (c, _) => bail!(
            "{origin}: column \"chosen\" is {} but column \"rejected\" is not; use one format per row",
            describe(&c)
        ),
    }
}

/// Split index of TRL's `extract_prompt` loop: the first position where the sequences differ,
/// moved back by one when the element before it is a space (`is_space`); without a difference,
/// the last index of the shorter sequence (where Python's loop variable stops).
fn extract_split<T: PartialEq>(a: &[T], b: &[T], is_space: impl Fn(&T) -> bool) -> usize {
    let n = a.len().min(b.len());
    match (0..n).find(|&i| a[i] != b[i]) {
        Some(i) if i > 0 && is_space(&a[i - 1]) => i - 1,
        Some(i) => i,
        None => n.saturating_sub(1),
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenization
// ---------------------------------------------------------------------------------------------

/// Length limits, in tokens. `Default` means no truncation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenizeOptions {
    /// Longest prompt + completion. The prompt is never cut by it: a prompt that leaves no room
    /// for a completion is an error naming the row (TRL 1.16 silently drops such rows).
    pub max_length: Option<usize>,
    /// Longest prompt, applied first (TRL 0.x's `max_prompt_length`; TRL 1.16 has none).
    pub max_prompt_length: Option<usize>,
    /// How `max_prompt_length` shortens a prompt: true keeps its last tokens (the question, next
    /// to the answer), false keeps its first tokens. Completions always keep their start.
    pub keep_end: bool,
}

impl TokenizeOptions {
    fn check(&self) -> Result<()> {
        if self.max_length == Some(0) {
            bail!("max_length must be at least 1");
        }
        if self.max_prompt_length == Some(0) {
            bail!("max_prompt_length must be at least 1");
        }
        Ok(())
    }
}

/// Token ids of one pair. `prompt ++ chosen` and `prompt ++ rejected` are the sequences the
/// model sees (TRL's `prompt_ids`, `chosen_ids`, `rejected_ids`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizedPair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

impl TokenizedPair {
    /// Length of the longer of the two full sequences (the reward trainer of TRL skips pairs
    /// longer than `max_length` instead of truncating them: tokenize with `max_length: None`
    /// and filter on this).
    pub fn longest(&self) -> usize {
        self.prompt.len() + self.chosen.len().max(self.rejected.len())
    }
}

/// Tokenizes a pair as TRL 1.16's `DPOTrainer._prepare_dataset`:
/// * text rows: `chosen`/`rejected` get the EOS token unless they already end with it; then
///   `prompt`, `prompt + chosen` and `prompt + rejected` are encoded as whole strings with special
///   tokens (a BOS if the tokenizer adds one);
/// * message rows: the prompt is rendered with the generation prompt, `prompt + chosen` and
///   `prompt + rejected` as whole conversations, each encoded without special tokens (as
///   `apply_chat_template(tokenize=True)`); no EOS is added (the template closes the turn);
/// * the prompt is the common prefix of the encoded prompt with both full sequences (they can
///   differ at the boundary when tokens merge across it or a template renders a prompt alone
///   differently) and the completions are the rest of each full sequence.
///
/// Then [`TokenizeOptions`] truncation.
pub fn tokenize_pair(
    codec: &dyn TextCodec,
    ex: &PreferenceExample,
    opts: &TokenizeOptions,
) -> Result<TokenizedPair> {
    opts.check()?;
    let origin = &ex.origin;
    let (prompt_ids, full_chosen, full_rejected) = match (&ex.prompt, &ex.chosen, &ex.rejected) {
        (Content::Text(p), Content::Text(c), Content::Text(r)) => {
            let with_eos = |completion: &str| -> Result<Vec<u32>> {
                let mut ids = encode(codec, origin, &format!("{p}{completion}"), true)?;
                if let Some(eos) = codec.eos_id() {
                    if ids.last() != Some(&eos) {
                        ids.push(eos);
                    }
                }
                Ok(ids)
            };
            (encode(codec, origin, p, true)?, with_eos(c)?, with_eos(r)?)
        }
        (Content::Messages(p), Content::Messages(c), Content::Messages(r)) => {
            let prompt_text = render(codec, origin, p, true)?;
            let full = |completion: &[Message]| -> Result<Vec<u32>> {
                let conversation: Vec<Message> = p.iter().chain(completion).cloned().collect();
                encode(
                    codec,
                    origin,
                    &render(codec, origin, &conversation, false)?,
                    false,
                )
            };
            (
                encode(codec, origin, &prompt_text, false)?,
                full(c)?,
                full(r)?,
            )
        }
        _ => bail!("{origin}: prompt, chosen and rejected must all be strings or all be messages"),
    };
    let split =
        common_prefix(&prompt_ids, &full_chosen).min(common_prefix(&prompt_ids, &full_rejected));
    let mut pair = TokenizedPair {
        prompt: prompt_ids[..split].to_vec(),
        chosen: full_chosen[split..].to_vec(),
        rejected: full_rejected[split..].to_vec(),
    };
    for (name, ids) in [("chosen", &pair.chosen), ("rejected", &pair.rejected)] {
        if ids.is_empty() {
            bail!("{origin}: the {name} completion has no tokens after tokenization");
        }
    }
    truncate_prompt(origin, &mut pair.prompt, opts)?;
    if let Some(max) = opts.max_length {
        let room = max - pair.prompt.len(); // > 0: checked by truncate_prompt
        pair.chosen.truncate(room);
        pair.rejected.truncate(room);
    }
    Ok(pair)
}

/// [`tokenize_pair`] over a dataset; the first failing row stops it.
pub fn tokenize_preferences(
    codec: &dyn TextCodec,
    examples: &[PreferenceExample],
    opts: &TokenizeOptions,
) -> Result<Vec<TokenizedPair>> {
    examples
        .iter()
        .map(|ex| tokenize_pair(codec, ex, opts))
        .collect()
}

/// Tokenizes a GRPO/PPO prompt as TRL 1.16's `GRPOTrainer._tokenize_prompts`: text is encoded
/// with special tokens; messages are rendered with the generation prompt and encoded without.
/// Then `max_prompt_length` truncation, and an error if the prompt leaves no room within
/// `max_length` (pass `max_length: None` when only the completion length is bounded).
pub fn tokenize_prompt(
    codec: &dyn TextCodec,
    ex: &PromptExample,
    opts: &TokenizeOptions,
) -> Result<Vec<u32>> {
    opts.check()?;
    let origin = &ex.origin;
    let mut ids = match &ex.prompt {
        Content::Text(p) => encode(codec, origin, p, true)?,
        Content::Messages(m) => encode(codec, origin, &render(codec, origin, m, true)?, false)?,
    };
    truncate_prompt(origin, &mut ids, opts)?;
    Ok(ids)
}

/// `max_prompt_length` (keep_end / keep_start), then the room check against `max_length`.
fn truncate_prompt(origin: &Origin, prompt: &mut Vec<u32>, opts: &TokenizeOptions) -> Result<()> {
    if let Some(max) = opts.max_prompt_length {
        if prompt.len() > max {
            if opts.keep_end {
                prompt.drain(..prompt.len() - max);
            } else {
                prompt.truncate(max);
            }
        }
    }
    if let Some(max) = opts.max_length {
        if prompt.len() >= max {
            bail!(
                "{origin}: the prompt has {} tokens{}, which leaves no room for a completion within \
                 max_length = {max}; raise max_length or set max_prompt_length below it",
                prompt.len(),
                if opts.max_prompt_length.is_some() { " after max_prompt_length" } else { "" }
            );
        }
    }
    Ok(())
}

fn encode(codec: &dyn TextCodec, origin: &Origin, text: &str, special: bool) -> Result<Vec<u32>> {
    codec
        .encode(text, special)
        .map_err(|e| anyhow!("{origin}: tokenization failed: {e:#}"))
}

fn render(
    codec: &dyn TextCodec,
    origin: &Origin,
    messages: &[Message],
    generation_prompt: bool,
) -> Result<String> {
    match codec.render_chat(messages, generation_prompt) {
        Some(Ok(text)) => Ok(text),
        Some(Err(e)) => Err(anyhow!("{origin}: chat template failed: {e:#}")),
        None => Err(anyhow!(
            "{origin}: the row holds chat messages but the model has no chat template"
        )),
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

// ---------------------------------------------------------------------------------------------
// Batching
// ---------------------------------------------------------------------------------------------

/// A padded batch, row-major: element (r, t) is at `r * width + t`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Padded {
    pub ids: Vec<u32>,
    /// true on real tokens, false on padding (the attention mask).
    pub valid: Vec<bool>,
    pub rows: usize,
    /// Length of the longest row.
    pub width: usize,
}

/// Pads every row at its end to the longest row (training batches).
pub fn pad_right<R: AsRef<[u32]>>(rows: &[R], pad_id: u32) -> Padded {
    pad(rows, pad_id, false)
}

/// Pads every row at its start to the longest row (prompts for generation, so that every row's
/// next token lands in the same column).
pub fn pad_left<R: AsRef<[u32]>>(rows: &[R], pad_id: u32) -> Padded {
    pad(rows, pad_id, true)
}

fn pad<R: AsRef<[u32]>>(rows: &[R], pad_id: u32, left: bool) -> Padded {
    let width = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * width);
    let mut valid = Vec::with_capacity(rows.len() * width);
    for row in rows {
        let row = row.as_ref();
        let fill = width - row.len();
        if left {
            ids.extend(std::iter::repeat_n(pad_id, fill));
            valid.extend(std::iter::repeat_n(false, fill));
        }
        ids.extend_from_slice(row);
        valid.extend(std::iter::repeat_n(true, row.len()));
        if !left {
            ids.extend(std::iter::repeat_n(pad_id, fill));
            valid.extend(std::iter::repeat_n(false, fill));
        }
    }
    Padded {
        ids,
        valid,
        rows: rows.len(),
        width,
    }
}

/// A DPO / reward-model batch, as TRL's `DataCollatorForPreference` builds it: rows
/// `0..pairs` are `prompt ++ chosen` of each pair, rows `pairs..2*pairs` are `prompt ++ rejected`,
/// right-padded. Every mask is row-major `[2 * pairs, width]`, like `ids`.
///
/// Log-prob convention: the logits at position t predict the token at t + 1, so
/// `logp[r][t] = log_softmax(logits[r][t])[targets[r][t]]` and a sequence's log-prob is
/// `sum_t logp[r][t] * loss_mask[r][t]`; no shifting is needed by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairBatch {
    pub ids: Vec<u32>,
    /// Attention mask: true on real tokens.
    pub valid: Vec<bool>,
    /// TRL's `completion_mask`: true where `ids` holds a completion token.
    pub completion_mask: Vec<bool>,
    /// `ids` moved one position left (`targets[r][t] = ids[r][t + 1]`), the last column `pad_id`.
    pub targets: Vec<u32>,
    /// `loss_mask[r][t] = completion_mask[r][t + 1]` (false in the last column): true where the
    /// logits at t predict a completion token (TRL's `completion_mask[..., 1:]`).
    pub loss_mask: Vec<bool>,
    /// Real tokens per row (the reward model reads its score at index `lengths[r] - 1`).
    pub lengths: Vec<usize>,
    pub pairs: usize,
    pub width: usize,
}

impl PairBatch {
    pub fn rows(&self) -> usize {
        2 * self.pairs
    }
}

/// Builds the [`PairBatch`] of `pairs` (already truncated by [`tokenize_pair`]).
pub fn collate_pairs(pairs: &[TokenizedPair], pad_id: u32) -> PairBatch {
    let sequences: Vec<(&[u32], &[u32])> = pairs
        .iter()
        .map(|p| (p.prompt.as_slice(), p.chosen.as_slice()))
        .chain(
            pairs
                .iter()
                .map(|p| (p.prompt.as_slice(), p.rejected.as_slice())),
        )
        .collect();
    let full: Vec<Vec<u32>> = sequences.iter().map(|(p, c)| [*p, *c].concat()).collect();
    let padded = pad_right(&full, pad_id);
    let width = padded.width;
    let mut completion_mask = vec![false; padded.ids.len()];
    for (r, (prompt, completion)) in sequences.iter().enumerate() {
        let start = r * width + prompt.len();
        completion_mask[start..start + completion.len()].fill(true);
    }
    let mut targets = vec![pad_id; padded.ids.len()];
    let mut loss_mask = vec![false; padded.ids.len()];
    for r in 0..full.len() {
        let row = r * width;
        for t in 0..width.saturating_sub(1) {
            targets[row + t] = padded.ids[row + t + 1];
            loss_mask[row + t] = completion_mask[row + t + 1];
        }
    }
    PairBatch {
        lengths: full.iter().map(Vec::len).collect(),
        ids: padded.ids,
        valid: padded.valid,
        completion_mask,
        targets,
        loss_mask,
        pairs: pairs.len(),
        width,
    }
}

// ---------------------------------------------------------------------------------------------
// Shuffling
// ---------------------------------------------------------------------------------------------

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny PRNG of our own, so an epoch's order never
/// changes with a crate version (checkpoints resume on the same data position).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` by multiply-shift (bias below n / 2^64, irrelevant for dataset sizes).
    fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// The order in which epoch `epoch` visits `n` rows: a permutation of `0..n` that depends only on
/// `(n, seed, epoch)` (Fisher-Yates driven by SplitMix64).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let epoch_salt = SplitMix64(epoch).next_u64();
    let mut rng = SplitMix64(seed ^ epoch_salt);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i + 1);
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    // --- a byte-level tokenizer with a ChatML template -----------------------------------------
    // The same tokenizer as scripts/fixtures/dpo_data.py builds for TRL: token id = byte value,
    // one BPE merge "ab" -> 256, special tokens matched in the text before anything else.

    const AB: u32 = 256;
    const BOS: u32 = 257;
    const EOS: u32 = 258;
    const IM_START: u32 = 259;
    const IM_END: u32 = 260;
    const PAD: u32 = 261;
    const SPECIALS: [(&str, u32); 5] = [
        ("<s>", BOS),
        ("</s>", EOS),
        ("<|im_start|>", IM_START),
        ("<|im_end|>", IM_END),
        ("<pad>", PAD),
    ];

    struct FakeCodec {
        bos: bool,
        eos: bool,
        template: bool,
    }

    const CODEC: FakeCodec = FakeCodec {
        bos: true,
        eos: true,
        template: true,
    };

    impl TextCodec for FakeCodec {
        fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
            let mut ids = Vec::new();
            if add_special_tokens && self.bos {
                ids.push(BOS);
            }
            let bytes = text.as_bytes();
            let mut i = 0;
            'scan: while i < bytes.len() {
                for (special, id) in SPECIALS {
                    if bytes[i..].starts_with(special.as_bytes()) {
                        ids.push(id);
                        i += special.len();
                        continue 'scan;
                    }
                }
                if bytes[i] == b'a' && bytes.get(i + 1) == Some(&b'b') {
                    ids.push(AB);
                    i += 2;
                } else {
                    ids.push(bytes[i] as u32);
                    i += 1;
                }
            }
            Ok(ids)
        }
        fn eos_id(&self) -> Option<u32> {
            self.eos.then_some(EOS)
        }
        fn bos_id(&self) -> Option<u32> {
            self.bos.then_some(BOS)
        }
        fn render_chat(
            &self,
            messages: &[Message],
            add_generation_prompt: bool,
        ) -> Option<Result<String>> {
            if !self.template {
                return None;
            }
            let mut text: String = messages
                .iter()
                .map(|m| format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content))
                .collect();
            if add_generation_prompt {
                text.push_str("<|im_start|>assistant\n");
            }
            Some(Ok(text))
        }
    }

    fn bytes(s: &str) -> Vec<u32> {
        s.bytes().map(u32::from).collect()
    }

    fn cat(parts: &[&[u32]]) -> Vec<u32> {
        parts.concat()
    }

    /// A fresh file in a private temp directory.
    fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rlhf-data-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn load_err(name: &str, contents: &[u8]) -> (String, String) {
        let path = temp_file(name, contents);
        let err = load_preferences(&path).expect_err("expected an error");
        (format!("{err:#}"), path.display().to_string())
    }

    fn text_pair(prompt: &str, chosen: &str, rejected: &str) -> PreferenceExample {
        PreferenceExample {
            prompt: Content::Text(prompt.into()),
            chosen: Content::Text(chosen.into()),
            rejected: Content::Text(rejected.into()),
            margin: None,
            origin: Origin {
                file: "mem.jsonl".into(),
                place: Place::Line(3),
            },
        }
    }

    // --- readers and formats --------------------------------------------------------------------

    #[test]
    fn reads_standard_jsonl_with_blank_lines_crlf_and_margin() {
        let path = temp_file(
            "pairs.jsonl",
            b"{\"prompt\": \"The sky is\", \"chosen\": \" blue.\", \"rejected\": \" green.\"}\r\n\n\
              {\"prompt\": \"2+2=\", \"chosen\": \"4\", \"rejected\": \"5\", \"margin\": 1.5}\n",
        );
        let rows = load_preferences(&path).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].prompt, Content::Text("The sky is".into()));
        assert_eq!(rows[0].chosen, Content::Text(" blue.".into()));
        assert_eq!(rows[0].rejected, Content::Text(" green.".into()));
        assert_eq!(rows[0].margin, None);
        assert_eq!(rows[1].margin, Some(1.5));
        assert_eq!(rows[1].origin.place, Place::Line(3));
        assert_eq!(
            rows[1].origin.to_string(),
            format!("{} line 3", path.display())
        );
    }

    #[test]
    fn reads_conversational_json_array() {
        let path = temp_file(
            "pairs.json",
            br#"[{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                 "chosen": [{"role": "assistant", "content": "Hello"}],
                 "rejected": [{"role": "assistant", "content": "Go away", "name": "bot"}]}]"#,
        );
        let rows = load_preferences(&path).unwrap();
        assert_eq!(
            rows[0].prompt,
            Content::Messages(vec![
                Message::new("system", "Be brief."),
                Message::new("user", "Hi")
            ])
        );
        assert_eq!(
            rows[0].chosen,
            Content::Messages(vec![Message::new("assistant", "Hello")])
        );
        assert_eq!(
            rows[0].rejected,
            Content::Messages(vec![Message::new("assistant", "Go away")])
        );
        assert_eq!(rows[0].origin.place, Place::Row(0));
    }

    #[test]
    fn json_file_holding_json_lines_is_read_as_lines() {
        let path = temp_file(
            "pairs.json",
            b"{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"d\", \"chosen\": \"e\", \"rejected\": \"f\"}\n",
        );
        let rows = load_preferences(&path).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].origin.place, Place::Line(2));
    }

    #[test]
    fn implicit_prompt_from_shared_turns() {
        let path = temp_file(
            "implicit.jsonl",
            br#"{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}"#,
        );
        let ex = &load_preferences(&path).unwrap()[0];
        assert_eq!(
            ex.prompt,
            Content::Messages(vec![
                Message::new("user", "Hi"),
                Message::new("assistant", "Hello"),
                Message::new("user", "2+2?")
            ])
        );
        assert_eq!(
            ex.chosen,
            Content::Messages(vec![Message::new("assistant", "4")])
        );
        assert_eq!(
            ex.rejected,
            Content::Messages(vec![Message::new("assistant", "5")])
        );
    }

    #[test]
    fn implicit_prompt_from_shared_text_follows_trl() {
        // The examples of TRL's extract_prompt: the space before the split goes to the answers.
        let path = temp_file(
            "implicit.jsonl",
            "{\"chosen\": \"The sky is blue.\", \"rejected\": \"The sky is green.\"}\n\
             {\"chosen\": \"Hello there\", \"rejected\": \"Hello there friend\"}\n\
             {\"chosen\": \"Caf\u{e9} ok\", \"rejected\": \"Caf\u{e9} no\"}\n"
                .as_bytes(),
        );
        let rows = load_preferences(&path).unwrap();
        assert_eq!(rows[0].prompt, Content::Text("The sky is".into()));
        assert_eq!(rows[0].chosen, Content::Text(" blue.".into()));
        assert_eq!(rows[0].rejected, Content::Text(" green.".into()));
        // No difference inside the shorter string: Python's loop variable stops at its last index.
        assert_eq!(rows[1].prompt, Content::Text("Hello ther".into()));
        assert_eq!(rows[1].chosen, Content::Text("e".into()));
        assert_eq!(rows[1].rejected, Content::Text("e friend".into()));
        // Characters, not bytes.
        assert_eq!(rows[2].prompt, Content::Text("Caf\u{e9}".into()));
        assert_eq!(rows[2].chosen, Content::Text(" ok".into()));
    }

    const SHAREGPT: &str = r#"[
      {"conversations": [{"from": "system", "value": "You are kind."}, {"from": "human", "value": "Hi"},
                         {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"}],
       "chosen": {"from": "gpt", "value": "Goodbye!"},
       "rejected": {"from": "gpt", "value": "Whatever."}},
      {"conversations": [{"from": "human", "value": "2+2?"}],
       "chosen": {"from": "gpt", "value": "4"},
       "rejected": {"from": "gpt", "value": "5"}}
    ]"#;

    #[test]
    fn reads_sharegpt_layout() {
        let path = temp_file("dpo_tiny.json", SHAREGPT.as_bytes());
        let rows = load_preferences(&path).unwrap();
        assert_eq!(
            rows[0].prompt,
            Content::Messages(vec![
                Message::new("system", "You are kind."),
                Message::new("user", "Hi"),
                Message::new("assistant", "Hello"),
                Message::new("user", "Bye"),
            ])
        );
        assert_eq!(
            rows[0].chosen,
            Content::Messages(vec![Message::new("assistant", "Goodbye!")])
        );
        assert_eq!(
            rows[0].rejected,
            Content::Messages(vec![Message::new("assistant", "Whatever.")])
        );
        assert_eq!(
            rows[1].prompt,
            Content::Messages(vec![Message::new("user", "2+2?")])
        );
        // Tokenized through the chat template.
        let pair = tokenize_pair(&CODEC, &rows[1], &TokenizeOptions::default()).unwrap();
        let prompt = cat(&[
            &[IM_START],
            &bytes("user\n2+2?"),
            &[IM_END, 10, IM_START],
            &bytes("assistant\n"),
        ]);
        assert_eq!(pair.prompt, prompt);
        assert_eq!(pair.chosen, cat(&[&bytes("4"), &[IM_END, 10]]));
        assert_eq!(pair.rejected, cat(&[&bytes("5"), &[IM_END, 10]]));
    }

    #[test]
    fn reads_llamafactory_dpo_en_demo() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/data/dpo_en_demo.json"
        ));
        assert!(
            path.exists(),
            "{} missing: run scripts/fetch_assets.sh",
            path.display()
        );
        let rows = load_preferences(path).unwrap();
        assert_eq!(rows.len(), 300);
        // The raw JSON, read independently, must match what the parser made of it.
        let raw: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        for (ex, raw) in rows.iter().zip(raw.as_array().unwrap()) {
            let Content::Messages(prompt) = &ex.prompt else {
                panic!("sharegpt prompt must be messages")
            };
            let turns = raw["conversations"].as_array().unwrap();
            assert_eq!(prompt.len(), turns.len());
            for (m, t) in prompt.iter().zip(turns) {
                let role = match t["from"].as_str().unwrap() {
                    "system" => "system",
                    "human" => "user",
                    _ => "assistant",
                };
                assert_eq!(
                    (m.role.as_str(), m.content.as_str()),
                    (role, t["value"].as_str().unwrap())
                );
            }
            assert_eq!(
                ex.chosen,
                Content::Messages(vec![Message::new(
                    "assistant",
                    raw["chosen"]["value"].as_str().unwrap()
                )])
            );
            assert_eq!(
                ex.rejected,
                Content::Messages(vec![Message::new(
                    "assistant",
                    raw["rejected"]["value"].as_str().unwrap()
                )])
            );
        }
        let with_system = rows
            .iter()
            .filter(|ex| matches!(&ex.prompt, Content::Messages(m) if m[0].role == "system"))
            .count();
        assert_eq!(with_system, 80);
        let opts = TokenizeOptions {
            max_length: Some(1024),
            max_prompt_length: Some(512),
            keep_end: true,
        };
        let generation_prompt = cat(&[&[IM_START], &bytes("assistant\n")]);
        for pair in tokenize_preferences(&CODEC, &rows, &opts).unwrap() {
            assert!(pair.prompt.len() <= 512 && pair.prompt.ends_with(&generation_prompt));
            assert!(pair.longest() <= 1024);
        }
    }

    // --- errors ---------------------------------------------------------------------------------

    #[test]
    fn empty_files_are_errors() {
        for (name, contents) in [
            ("e.jsonl", &b""[..]),
            ("e.jsonl", b"\n  \n"),
            ("e.json", b"  "),
        ] {
            let (err, file) = load_err(name, contents);
            assert_eq!(err, format!("{file}: the file is empty"));
        }
        let (err, file) = load_err("e.json", b"[]");
        assert_eq!(err, format!("{file}: the file has no rows"));
    }

    #[test]
    fn invalid_json_names_the_line() {
        let (err, file) = load_err(
            "bad.jsonl",
            b"{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"a\", \"chosen\": }\n",
        );
        assert!(
            err.starts_with(&format!(
                "{file} line 2: invalid JSON at column 27: expected value"
            )),
            "{err}"
        );
        assert!(!err.contains('\n'));
        let (err, file) = load_err("bad.json", b"[\n {\"prompt\": \"a\",\n  \"chosen\" 1}\n]");
        assert!(
            err.starts_with(&format!("{file}: invalid JSON at line 3 column")),
            "{err}"
        );
    }

    #[test]
    fn non_utf8_names_the_line() {
        let (err, file) = load_err(
            "bin.jsonl",
            b"{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"\xff\"}\n",
        );
        assert_eq!(
            err,
            format!("{file} line 2: not valid UTF-8 (bad byte at byte 13 of the line)")
        );
        let (err, file) = load_err(
            "bin.json",
            b"[{\"prompt\": \"a\",\n \"chosen\": \"\xc3\x28\"}]",
        );
        assert_eq!(err, format!("{file} line 2: not valid UTF-8"));
    }

    #[test]
    fn rows_must_be_objects() {
        let (err, file) = load_err("x.jsonl", b"[1, 2]\n");
        assert_eq!(
            err,
            format!("{file} line 1: expected a JSON object, found a list")
        );
        let (err, file) = load_err(
            "x.json",
            b"[{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}, 7]",
        );
        assert_eq!(
            err,
            format!("{file} row 1: expected a JSON object, found a number")
        );
        let (err, file) = load_err("x.json", b"\"text\"");
        assert_eq!(
            err,
            format!(
                "{file}: expected a JSON array of objects (or one object per line), found a string"
            )
        );
        let (err, file) = load_err("x.csv", b"prompt,chosen\n");
        assert_eq!(
            err,
            format!("{file}: unsupported dataset file extension (expected .jsonl or .json)")
        );
        let missing = std::env::temp_dir().join("rlhf-data-test-no-such-file.jsonl");
        let err = format!("{:#}", read_rows(&missing).unwrap_err());
        assert!(
            err.starts_with(&format!("{}: cannot read the file: ", missing.display())),
            "{err}"
        );
    }

    #[test]
    fn missing_column_names_column_and_columns_found() {
        let (err, file) = load_err(
            "m.jsonl",
            b"{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"a\", \"answer\": \"b\", \"rejected\": \"c\"}\n",
        );
        assert_eq!(
            err,
            format!("{file} line 2: missing column \"chosen\" (found: answer, prompt, rejected)")
        );
        let (err, file) = load_err("m.json", b"[{\"question\": \"q\", \"chosen\": \"b\"}]");
        assert_eq!(
            err,
            format!("{file} row 0: missing column \"rejected\" (found: chosen, question)")
        );
        let path = temp_file("p.jsonl", b"{\"question\": \"2+2?\", \"answer\": \"4\"}\n");
        let err = format!("{:#}", load_prompts(&path).unwrap_err());
        assert_eq!(
            err,
            format!(
                "{} line 1: missing column \"prompt\" (found: answer, question)",
                path.display()
            )
        );
    }

    #[test]
    fn empty_values_are_errors() {
        for (row, column) in [
            (
                r#"{"prompt": "", "chosen": "b", "rejected": "c"}"#,
                "prompt",
            ),
            (
                r#"{"prompt": "a", "chosen": "  ", "rejected": "c"}"#,
                "chosen",
            ),
            (
                r#"{"prompt": "a", "chosen": "b", "rejected": ""}"#,
                "rejected",
            ),
        ] {
            let (err, file) = load_err("e.jsonl", format!("{row}\n").as_bytes());
            assert_eq!(err, format!("{file} line 1: column \"{column}\" is empty"));
        }
        let (err, file) = load_err(
            "e.jsonl",
            br#"{"prompt": [], "chosen": "b", "rejected": "c"}"#,
        );
        assert_eq!(
            err,
            format!("{file} line 1: column \"prompt\" is an empty list of messages")
        );
        let (err, file) = load_err(
            "e.jsonl",
            br#"{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": ""}], "rejected": [{"role": "assistant", "content": "x"}]}"#,
        );
        assert_eq!(
            err,
            format!("{file} line 1: column \"chosen\" is empty (every message has empty content)")
        );
        let (err, file) = load_err(
            "e.json",
            br#"[{"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": ""}, "rejected": {"from": "gpt", "value": "x"}}]"#,
        );
        assert_eq!(err, format!("{file} row 0: column \"chosen\" is empty"));
        let (err, file) = load_err("e.jsonl", br#"{"chosen": "abc", "rejected": "xyz"}"#);
        assert_eq!(
            err,
            format!(
                "{file} line 1: no \"prompt\" column and \"chosen\"/\"rejected\" share no leading part to use as the prompt (found: chosen, rejected)"
            )
        );
    }

    #[test]
    fn wrong_types_are_errors() {
        let cases: [(&str, &str); 7] = [
            (
                r#"{"prompt": 5, "chosen": "b", "rejected": "c"}"#,
                "column \"prompt\" must be a string or a list of {role, content} messages, found a number",
            ),
            (
                r#"{"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "b"}], "rejected": [{"role": "assistant", "content": "c"}]}"#,
                "column \"prompt\" message 0: missing \"content\"",
            ),
            (
                r#"{"prompt": [{"role": "user", "content": "a"}, "hi"], "chosen": [{"role": "assistant", "content": "b"}], "rejected": [{"role": "assistant", "content": "c"}]}"#,
                "column \"prompt\" message 1 must be an object with \"role\" and \"content\", found a string",
            ),
            (
                r#"{"prompt": [{"role": "user", "content": [{"type": "text"}]}], "chosen": [{"role": "assistant", "content": "b"}], "rejected": [{"role": "assistant", "content": "c"}]}"#,
                "column \"prompt\" message 0: \"content\" must be a string, found a list",
            ),
            (
                r#"{"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"}"#,
                "column \"prompt\" is a string but column \"chosen\" is a list of messages; use one format per row",
            ),
            (
                r#"{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}"#,
                "column \"margin\" must be a number, found a string",
            ),
            (
                r#"{"chosen": "ab", "rejected": [{"role": "assistant", "content": "c"}]}"#,
                "column \"chosen\" is a string but column \"rejected\" is not; use one format per row",
            ),
        ];
        for (row, message) in cases {
            let (err, file) = load_err("t.jsonl", format!("\n{row}\n").as_bytes());
            assert_eq!(err, format!("{file} line 2: {message}"));
        }
    }

    #[test]
    fn sharegpt_errors_name_the_turn() {
        let cases: [(&str, &str); 5] = [
            (
                r#"{"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "x"}], "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}"#,
                "column \"conversations\" turn 1: unsupported \"from\" value \"observation\" (expected system, human or gpt)",
            ),
            (
                r#"{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}], "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}"#,
                "column \"conversations\" must end with a human turn (the prompt of the pair)",
            ),
            (
                r#"{"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "human", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}"#,
                "column \"chosen\": \"from\" must be \"gpt\", found \"human\"",
            ),
            (
                r#"{"conversations": [{"from": "human"}], "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}"#,
                "column \"conversations\" turn 0: missing \"value\"",
            ),
            (
                r#"{"conversations": [{"from": "human", "value": "q"}], "chosen": "a", "rejected": {"from": "gpt", "value": "b"}}"#,
                "column \"chosen\" must be an object with \"from\" and \"value\", found a string",
            ),
        ];
        for (row, message) in cases {
            let (err, file) = load_err("s.json", format!("[{row}]").as_bytes());
            assert_eq!(err, format!("{file} row 0: {message}"));
        }
    }

    // --- tokenization ---------------------------------------------------------------------------

    #[test]
    fn text_pair_gets_bos_on_prompt_and_eos_on_completions() {
        let pair = tokenize_pair(
            &CODEC,
            &text_pair("The sky is", " blue.", " green."),
            &TokenizeOptions::default(),
        )
        .unwrap();
        assert_eq!(pair.prompt, cat(&[&[BOS], &bytes("The sky is")]));
        assert_eq!(pair.chosen, cat(&[&bytes(" blue."), &[EOS]]));
        assert_eq!(pair.rejected, cat(&[&bytes(" green."), &[EOS]]));
        // A completion already ending with the EOS text gets no second one.
        let pair = tokenize_pair(
            &CODEC,
            &text_pair("Q", " done</s>", " no"),
            &TokenizeOptions::default(),
        )
        .unwrap();
        assert_eq!(pair.chosen, cat(&[&bytes(" done"), &[EOS]]));
        // A tokenizer without BOS/EOS adds neither.
        let bare = FakeCodec {
            bos: false,
            eos: false,
            template: false,
        };
        let pair = tokenize_pair(
            &bare,
            &text_pair("Q", " yes", " no"),
            &TokenizeOptions::default(),
        )
        .unwrap();
        assert_eq!((pair.prompt, pair.chosen), (bytes("Q"), bytes(" yes")));
    }

    #[test]
    fn completion_starts_where_tokens_diverge() {
        // "a" + "b" merge across the boundary of `chosen`: as TRL, the prompt is cut to the prefix
        // common with both full sequences and the merged token belongs to the completions.
        let pair = tokenize_pair(
            &CODEC,
            &text_pair("Say a", "bc", "xyz"),
            &TokenizeOptions::default(),
        )
        .unwrap();
        assert_eq!(pair.prompt, cat(&[&[BOS], &bytes("Say ")]));
        assert_eq!(pair.chosen, cat(&[&[AB], &bytes("c"), &[EOS]]));
        assert_eq!(pair.rejected, cat(&[&bytes("axyz"), &[EOS]]));
    }

    #[test]
    fn conversational_pair_renders_prompt_and_takes_the_rest() {
        let ex = PreferenceExample {
            prompt: Content::Messages(vec![Message::new("user", "Hi")]),
            chosen: Content::Messages(vec![Message::new("assistant", "Yo")]),
            rejected: Content::Messages(vec![Message::new("assistant", "No")]),
            ..text_pair("x", "y", "z")
        };
        let pair = tokenize_pair(&CODEC, &ex, &TokenizeOptions::default()).unwrap();
        // Encoded without special tokens (no BOS), as apply_chat_template(tokenize=True).
        let prompt = cat(&[
            &[IM_START],
            &bytes("user\nHi"),
            &[IM_END, 10, IM_START],
            &bytes("assistant\n"),
        ]);
        assert_eq!(pair.prompt, prompt);
        assert_eq!(pair.chosen, cat(&[&bytes("Yo"), &[IM_END, 10]]));
        assert_eq!(pair.rejected, cat(&[&bytes("No"), &[IM_END, 10]]));

        let no_template = FakeCodec {
            bos: true,
            eos: true,
            template: false,
        };
        let err = format!(
            "{:#}",
            tokenize_pair(&no_template, &ex, &TokenizeOptions::default()).unwrap_err()
        );
        assert_eq!(
            err,
            "mem.jsonl line 3: the row holds chat messages but the model has no chat template"
        );
    }

    #[test]
    fn truncation_modes() {
        let ex = text_pair("0123456789", " abc", " xy");
        // BOS + 10 prompt tokens.
        let keep_end = TokenizeOptions {
            max_length: None,
            max_prompt_length: Some(4),
            keep_end: true,
        };
        assert_eq!(
            tokenize_pair(&CODEC, &ex, &keep_end).unwrap().prompt,
            bytes("6789")
        );
        let keep_start = TokenizeOptions {
            keep_end: false,
            ..keep_end
        };
        assert_eq!(
            tokenize_pair(&CODEC, &ex, &keep_start).unwrap().prompt,
            cat(&[&[BOS], &bytes("012")])
        );
        // max_length cuts the completions' ends so that prompt + completion fits.
        let both = TokenizeOptions {
            max_length: Some(7),
            ..keep_end
        };
        let pair = tokenize_pair(&CODEC, &ex, &both).unwrap();
        assert_eq!(pair.prompt, bytes("6789"));
        assert_eq!(pair.chosen, cat(&[&bytes(" "), &[AB], &bytes("c")]));
        assert_eq!(pair.rejected, bytes(" xy"));
        let pair = tokenize_pair(
            &CODEC,
            &ex,
            &TokenizeOptions {
                max_length: Some(12),
                ..TokenizeOptions::default()
            },
        )
        .unwrap();
        assert_eq!((pair.chosen, pair.rejected), (bytes(" "), bytes(" ")));
        // A prompt that leaves no room for a completion is an error naming the row.
        for (max_length, max_prompt_length, detail) in [
            (Some(11), None, ""),
            (Some(4), Some(4), " after max_prompt_length"),
        ] {
            let opts = TokenizeOptions {
                max_length,
                max_prompt_length,
                keep_end: true,
            };
            let err = format!("{:#}", tokenize_pair(&CODEC, &ex, &opts).unwrap_err());
            let n = max_prompt_length.unwrap_or(11);
            assert_eq!(
                err,
                format!(
                    "mem.jsonl line 3: the prompt has {n} tokens{detail}, which leaves no room for a completion \
                     within max_length = {}; raise max_length or set max_prompt_length below it",
                    max_length.unwrap()
                )
            );
        }
        let zero = TokenizeOptions {
            max_length: Some(0),
            ..TokenizeOptions::default()
        };
        assert_eq!(
            format!("{:#}", tokenize_pair(&CODEC, &ex, &zero).unwrap_err()),
            "max_length must be at least 1"
        );
    }

    #[test]
    fn prompt_rows_keep_other_columns_and_tokenize() {
        let path = temp_file(
            "prompts.jsonl",
            br#"{"prompt": "What is 2+2?", "answer": "4", "level": 1}
{"prompt": [{"role": "user", "content": "3*3?"}], "answer": "9"}
"#,
        );
        let rows = load_prompts(&path).unwrap();
        assert_eq!(rows[0].prompt, Content::Text("What is 2+2?".into()));
        assert_eq!(rows[0].extra.get("answer"), Some(&Value::from("4")));
        assert_eq!(rows[0].extra.get("level"), Some(&Value::from(1)));
        assert!(!rows[0].extra.contains_key("prompt"));
        let opts = TokenizeOptions::default();
        assert_eq!(
            tokenize_prompt(&CODEC, &rows[0], &opts).unwrap(),
            cat(&[&[BOS], &bytes("What is 2+2?")])
        );
        let chat = cat(&[
            &[IM_START],
            &bytes("user\n3*3?"),
            &[IM_END, 10, IM_START],
            &bytes("assistant\n"),
        ]);
        assert_eq!(tokenize_prompt(&CODEC, &rows[1], &opts).unwrap(), chat);
        let keep_end = TokenizeOptions {
            max_length: Some(20),
            max_prompt_length: Some(5),
            keep_end: true,
        };
        assert_eq!(
            tokenize_prompt(&CODEC, &rows[0], &keep_end).unwrap(),
            bytes(" 2+2?")
        );
        let err = TokenizeOptions {
            max_length: Some(5),
            ..TokenizeOptions::default()
        };
        let msg = format!("{:#}", tokenize_prompt(&CODEC, &rows[1], &err).unwrap_err());
        assert!(
            msg.starts_with(&format!(
                "{} line 2: the prompt has {} tokens,",
                path.display(),
                chat.len()
            )),
            "{msg}"
        );
    }

    // --- batching -------------------------------------------------------------------------------

    #[test]
    fn padding_left_and_right() {
        let rows = vec![vec![1, 2, 3], vec![4], vec![]];
        let right = pad_right(&rows, 0);
        assert_eq!((right.rows, right.width), (3, 3));
        assert_eq!(right.ids, vec![1, 2, 3, 4, 0, 0, 0, 0, 0]);
        assert_eq!(
            right.valid,
            vec![true, true, true, true, false, false, false, false, false]
        );
        let left = pad_left(&rows, 9);
        assert_eq!(left.ids, vec![1, 2, 3, 9, 9, 4, 9, 9, 9]);
        assert_eq!(
            left.valid,
            vec![true, true, true, false, false, true, false, false, false]
        );
        let empty = pad_right::<Vec<u32>>(&[], 0);
        assert_eq!((empty.rows, empty.width, empty.ids.len()), (0, 0, 0));
    }

    #[test]
    fn collate_pairs_matches_trl_collator_docstring() {
        // The example in the docstring of TRL 1.16's DataCollatorForPreference.
        let pairs = vec![
            TokenizedPair {
                prompt: vec![1, 2, 3],
                chosen: vec![4, 5],
                rejected: vec![6],
            },
            TokenizedPair {
                prompt: vec![7, 8],
                chosen: vec![9],
                rejected: vec![10, 11],
            },
        ];
        let b = collate_pairs(&pairs, 0);
        assert_eq!((b.pairs, b.rows(), b.width), (2, 4, 5));
        let ids: Vec<Vec<u32>> = b.ids.chunks(5).map(<[u32]>::to_vec).collect();
        assert_eq!(
            ids,
            vec![
                vec![1, 2, 3, 4, 5],
                vec![7, 8, 9, 0, 0],
                vec![1, 2, 3, 6, 0],
                vec![7, 8, 10, 11, 0]
            ]
        );
        let as01 = |m: &[bool]| -> Vec<Vec<u8>> {
            m.chunks(5)
                .map(|r| r.iter().map(|&x| x as u8).collect())
                .collect()
        };
        assert_eq!(
            as01(&b.valid),
            vec![
                vec![1, 1, 1, 1, 1],
                vec![1, 1, 1, 0, 0],
                vec![1, 1, 1, 1, 0],
                vec![1, 1, 1, 1, 0]
            ]
        );
        assert_eq!(
            as01(&b.completion_mask),
            vec![
                vec![0, 0, 0, 1, 1],
                vec![0, 0, 1, 0, 0],
                vec![0, 0, 0, 1, 0],
                vec![0, 0, 1, 1, 0]
            ]
        );
        // Shifted view: logits at t predict ids[t + 1].
        assert_eq!(
            as01(&b.loss_mask),
            vec![
                vec![0, 0, 1, 1, 0],
                vec![0, 1, 0, 0, 0],
                vec![0, 0, 1, 0, 0],
                vec![0, 1, 1, 0, 0]
            ]
        );
        let targets: Vec<Vec<u32>> = b.targets.chunks(5).map(<[u32]>::to_vec).collect();
        assert_eq!(
            targets,
            vec![
                vec![2, 3, 4, 5, 0],
                vec![8, 9, 0, 0, 0],
                vec![2, 3, 6, 0, 0],
                vec![8, 10, 11, 0, 0]
            ]
        );
        assert_eq!(b.lengths, vec![5, 3, 4, 4]);
    }

    // --- shuffling ------------------------------------------------------------------------------

    #[test]
    fn splitmix64_reference_values() {
        // Published outputs of SplitMix64 seeded with 0 (Vigna's splitmix64.c).
        let mut rng = SplitMix64(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(rng.next_u64(), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn epoch_order_is_a_deterministic_permutation() {
        let a = epoch_order(1000, 42, 0);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(1000, 42, 0));
        assert_ne!(a, epoch_order(1000, 42, 1));
        assert_ne!(a, epoch_order(1000, 43, 0));
        assert_ne!(a, (0..1000).collect::<Vec<_>>());
        assert!(epoch_order(0, 1, 2).is_empty());
        assert_eq!(epoch_order(1, 1, 2), vec![0]);
        // Each position is roughly uniform: position 0 over many epochs hits every row.
        let mut seen = [0usize; 8];
        for epoch in 0..8000 {
            seen[epoch_order(8, 7, epoch)[0]] += 1;
        }
        assert!(seen.iter().all(|&c| (800..1200).contains(&c)), "{seen:?}");
    }

    // --- against TRL 1.16 (fixture from scripts/fixtures/dpo_data.py) ---------------------------

    const FIXTURE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/dpo_data");

    fn ids(v: &Value) -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    }

    fn matrix(v: &Value) -> Vec<u32> {
        v.as_array().unwrap().iter().flat_map(ids).collect()
    }

    #[test]
    fn tokenization_matches_trl_fixture() {
        let dir = Path::new(FIXTURE_DIR);
        let expected: Value =
            serde_json::from_slice(&std::fs::read(dir.join("expected.json")).expect(
                "tests/fixtures/dpo_data/expected.json missing: run scripts/fixtures/dpo_data.py",
            ))
            .unwrap();
        let special = &expected["special_ids"];
        for (name, id) in SPECIALS {
            assert_eq!(
                special[name].as_u64(),
                Some(id as u64),
                "special token {name}"
            );
        }
        let pad_id = expected["pad_id"].as_u64().unwrap() as u32;
        let mut checked = 0;
        for (name, case) in expected["preference"].as_object().unwrap() {
            let examples = load_preferences(&dir.join(case["file"].as_str().unwrap())).unwrap();
            let want = case["tokenized"].as_array().unwrap();
            assert_eq!(examples.len(), want.len(), "{name}");
            let got = tokenize_preferences(&CODEC, &examples, &TokenizeOptions::default()).unwrap();
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert_eq!(g.prompt, ids(&w["prompt_ids"]), "{name} row {i}: prompt");
                assert_eq!(g.chosen, ids(&w["chosen_ids"]), "{name} row {i}: chosen");
                assert_eq!(
                    g.rejected,
                    ids(&w["rejected_ids"]),
                    "{name} row {i}: rejected"
                );
            }
            // With max_length: TRL drops the rows whose prompt fills it (we refuse them) and the
            // collator cuts the rest.
            let opts = TokenizeOptions {
                max_length: Some(case["max_length"].as_u64().unwrap() as usize),
                ..TokenizeOptions::default()
            };
            let results: Vec<Result<TokenizedPair>> = examples
                .iter()
                .map(|ex| tokenize_pair(&CODEC, ex, &opts))
                .collect();
            let kept: Vec<usize> = (0..results.len()).filter(|&i| results[i].is_ok()).collect();
            let want_kept: Vec<usize> = case["kept_rows"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(kept, want_kept, "{name}: rows kept at max_length");
            let pairs: Vec<TokenizedPair> = results.into_iter().filter_map(Result::ok).collect();
            let batch = collate_pairs(&pairs, pad_id);
            let collated = &case["collated"];
            assert_eq!(
                batch.ids,
                matrix(&collated["input_ids"]),
                "{name}: input_ids"
            );
            let as_u32 = |m: &[bool]| m.iter().map(|&x| x as u32).collect::<Vec<_>>();
            assert_eq!(
                as_u32(&batch.valid),
                matrix(&collated["attention_mask"]),
                "{name}: attention_mask"
            );
            assert_eq!(
                as_u32(&batch.completion_mask),
                matrix(&collated["completion_mask"]),
                "{name}: completion_mask"
            );
            checked += 1;
        }
        assert_eq!(checked, 4);
        for (name, case) in expected["prompts"].as_object().unwrap() {
            let rows = load_prompts(&dir.join(case["file"].as_str().unwrap())).unwrap();
            let want = case["prompt_ids"].as_array().unwrap();
            assert_eq!(rows.len(), want.len(), "{name}");
            for (i, (row, w)) in rows.iter().zip(want).enumerate() {
                let got = tokenize_prompt(&CODEC, row, &TokenizeOptions::default()).unwrap();
                assert_eq!(got, ids(w), "{name} row {i}");
                assert!(
                    row.extra.contains_key("answer"),
                    "{name} row {i}: extra columns kept"
                );
            }
        }
    }
}
