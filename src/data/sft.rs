//! Supervised fine-tuning rows, in TRL 1.16 `SFTTrainer`'s dataset formats, and which of their
//! tokens are trained.
//!
//! * `{"prompt", "completion"}`: both strings or both lists of messages, tokenized as a
//!   preference pair's prompt and chosen completion ([`tokenize_pair`]: EOS appended to text,
//!   the completion starts where the encoded prompt and prompt + completion diverge). With
//!   `completion_only_loss` (TRL's default for such rows) only the completion is trained.
//! * `{"messages": [...]}`: the whole conversation rendered with the chat template; every token
//!   is trained unless `assistant_only_loss`.
//! * `{"text": "..."}`: language modelling; encoded with special tokens, EOS appended; every token
//!   is trained.
//! * Preference rows (`chosen`, optionally `rejected`, in any layout [`parse_preference`] reads)
//!   train on the prompt and the chosen answer, as a prompt/completion row.
//!
//! `assistant_only_loss` keeps the assistant turns of conversational rows: the tokens between the
//! conversation rendered up to an assistant message (with the generation prompt) and rendered
//! through it, each matched against the full sequence's tokens. Sequences keep their first
//! `max_length` tokens (TRL's `truncation_mode = "keep_start"`); a row left without a trained
//! token is dropped, as TRL does.

use super::{
    column, common_prefix, content_column, describe, encode, kind, parse_preference, read_rows,
    render, tokenize_pair, Content, Message, Origin, PreferenceExample, Row, TextCodec,
    TokenizeOptions,
};
use anyhow::{bail, Result};
use serde_json::Value;
use std::path::Path;

/// What one SFT row holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SftContent {
    PromptCompletion {
        prompt: Content,
        completion: Content,
    },
    Messages(Vec<Message>),
    Text(String),
}

/// One SFT row and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct SftRow {
    pub content: SftContent,
    pub origin: Origin,
}

/// Which tokens are trained, and the length limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SftOptions {
    /// Tokens kept per sequence (its start).
    pub max_length: Option<usize>,
    /// Prompt/completion rows train on the completion only.
    pub completion_only_loss: bool,
    /// Conversational rows train on the assistant turns only (text rows are an error).
    pub assistant_only_loss: bool,
}

/// A tokenized row: `trained[t]` is true where the log-prob of `ids[t]` is trained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SftTokens {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
}

impl SftTokens {
    /// Trained tokens that have a prediction (every position but the first).
    pub fn trained_tokens(&self) -> usize {
        self.trained.iter().skip(1).filter(|&&t| t).count()
    }
}

/// Normalises one SFT row (see the module documentation for the layouts).
pub fn parse_sft(row: &Row) -> Result<SftRow> {
    let origin = &row.origin;
    let cols = &row.columns;
    let content = if cols.contains_key("messages") {
        match content_column(row, "messages")? {
            Content::Messages(m) => SftContent::Messages(m),
            Content::Text(_) => bail!(
                "{origin}: column \"messages\" must be a list of {{role, content}} messages, found a string"
            ),
        }
    } else if cols.contains_key("text") {
        match column(row, "text")? {
            Value::String(s) if !s.trim().is_empty() => SftContent::Text(s.clone()),
            Value::String(_) => bail!("{origin}: column \"text\" is empty"),
            other => bail!(
                "{origin}: column \"text\" must be a string, found {}",
                kind(other)
            ),
        }
    } else if cols.contains_key("completion") {
        let prompt = content_column(row, "prompt")?;
        let completion = content_column(row, "completion")?;
        if prompt.is_conversational() != completion.is_conversational() {
            bail!(
                "{origin}: column \"prompt\" is {} but column \"completion\" is {}; use one format per row",
                describe(&prompt),
                describe(&completion)
            );
        }
        SftContent::PromptCompletion { prompt, completion }
    } else if cols.contains_key("chosen") {
        let mut row = row.clone();
        if !row.columns.contains_key("rejected") {
            row.columns
                .insert("rejected".into(), cols["chosen"].clone());
        }
        let pair = parse_preference(&row)?;
        SftContent::PromptCompletion {
            prompt: pair.prompt,
            completion: pair.chosen,
        }
    } else {
        let found: Vec<&str> = cols.keys().map(String::as_str).collect();
        bail!(
            "{origin}: an SFT row needs \"prompt\" and \"completion\", \"messages\" or \"text\" (found: {})",
            if found.is_empty() {
                "no columns".to_string()
            } else {
                found.join(", ")
            }
        );
    };
    Ok(SftRow {
        content,
        origin: origin.clone(),
    })
}

/// Tokenizes one row as TRL 1.16's `SFTTrainer._prepare_dataset` and marks its trained tokens.
/// `None` when truncation to `max_length` leaves no trained token (TRL drops the row); a row
/// without a trained token before truncation is an error naming it.
pub fn tokenize_sft(
    codec: &dyn TextCodec,
    row: &SftRow,
    opts: &SftOptions,
) -> Result<Option<SftTokens>> {
    let origin = &row.origin;
    if opts.max_length == Some(0) {
        bail!("max_length must be at least 1");
    }
    let (ids, mut trained) = match &row.content {
        SftContent::PromptCompletion { prompt, completion } => {
            let pair = PreferenceExample {
                prompt: prompt.clone(),
                chosen: completion.clone(),
                rejected: completion.clone(),
                margin: None,
                origin: origin.clone(),
            };
            let t = tokenize_pair(codec, &pair, &TokenizeOptions::default())?;
            let split = t.prompt.len();
            let ids = [t.prompt, t.chosen].concat();
            let trained = (0..ids.len())
                .map(|i| !opts.completion_only_loss || i >= split)
                .collect();
            (ids, trained)
        }
        SftContent::Messages(m) => {
            let ids = encode(codec, origin, &render(codec, origin, m, false)?, false)?;
            let n = ids.len();
            (ids, vec![true; n])
        }
        SftContent::Text(text) => {
            let mut ids = encode(codec, origin, text, true)?;
            if let Some(eos) = codec.eos_id() {
                if ids.last() != Some(&eos) {
                    ids.push(eos);
                }
            }
            let n = ids.len();
            (ids, vec![true; n])
        }
    };
    if opts.assistant_only_loss {
        let conversation: Vec<Message> = match &row.content {
            SftContent::Messages(m) => m.clone(),
            SftContent::PromptCompletion {
                prompt: Content::Messages(p),
                completion: Content::Messages(c),
            } => p.iter().chain(c).cloned().collect(),
            _ => bail!(
                "{origin}: sft.assistant_only_loss needs conversational rows (lists of messages), \
                 this row is text"
            ),
        };
        let assistant = assistant_mask(codec, origin, &conversation, &ids)?;
        for (t, a) in trained.iter_mut().zip(assistant) {
            *t &= a;
        }
        if !trained.iter().skip(1).any(|&t| t) {
            bail!("{origin}: sft.assistant_only_loss is set but the row has no assistant tokens");
        }
    }
    let tokens = SftTokens { ids, trained };
    if tokens.trained_tokens() == 0 {
        bail!("{origin}: the row has no trained token");
    }
    Ok(truncate(tokens, opts.max_length))
}

/// The first `max_length` tokens; `None` when none of them is trained (TRL drops such rows).
fn truncate(mut tokens: SftTokens, max_length: Option<usize>) -> Option<SftTokens> {
    if let Some(max) = max_length {
        tokens.ids.truncate(max);
        tokens.trained.truncate(max);
    }
    (tokens.trained_tokens() > 0).then_some(tokens)
}

/// True on the tokens of `ids` (the whole conversation, tokenized) that belong to an assistant
/// turn: for each assistant message, from the end of the conversation before it rendered with
/// the generation prompt to the end of the conversation rendered through it. Each boundary is
/// where that rendering stops matching `ids`, so a template that renders a prefix differently
/// only shortens the turn.
fn assistant_mask(
    codec: &dyn TextCodec,
    origin: &Origin,
    messages: &[Message],
    ids: &[u32],
) -> Result<Vec<bool>> {
    let mut mask = vec![false; ids.len()];
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = encode(
            codec,
            origin,
            &render(codec, origin, &messages[..i], true)?,
            false,
        )?;
        let through = encode(
            codec,
            origin,
            &render(codec, origin, &messages[..=i], false)?,
            false,
        )?;
        let start = common_prefix(&before, ids);
        let end = common_prefix(&through, ids);
        if end > start {
            mask[start..end].fill(true);
        }
    }
    Ok(mask)
}

/// A tokenized SFT file.
#[derive(Clone, Debug, PartialEq)]
pub struct SftSet {
    pub rows: Vec<SftTokens>,
    /// Rows left without a trained token by truncation, skipped.
    pub dropped: Vec<Origin>,
}

/// Reads an SFT file and tokenizes every row; the first failing row stops it, and a file whose
/// every row is dropped by truncation is an error.
pub fn load_sft(path: &Path, codec: &dyn TextCodec, opts: &SftOptions) -> Result<SftSet> {
    let mut set = SftSet {
        rows: Vec::new(),
        dropped: Vec::new(),
    };
    for row in read_rows(path)? {
        match tokenize_sft(codec, &parse_sft(&row)?, opts)? {
            Some(t) => set.rows.push(t),
            None => set.dropped.push(row.origin),
        }
    }
    if set.rows.is_empty() {
        bail!(
            "{}: no row has a trained token within max_length = {}; raise it",
            path.display(),
            opts.max_length.unwrap_or(0)
        );
    }
    Ok(set)
}
