//! Which tokens each kind of SFT row trains, with the byte-level codec and ChatML template of
//! the parent tests.

use super::super::sft::*;
use super::*;
use serde_json::json;

fn row(columns: Value) -> Row {
    let Value::Object(columns) = columns else {
        panic!("not an object")
    };
    Row {
        origin: Origin {
            file: "sft.jsonl".into(),
            place: Place::Line(5),
        },
        columns,
    }
}

fn opts(completion_only: bool, assistant_only: bool) -> SftOptions {
    SftOptions {
        max_length: None,
        completion_only_loss: completion_only,
        assistant_only_loss: assistant_only,
    }
}

fn tokens(columns: Value, o: SftOptions) -> Result<SftTokens> {
    let t = tokenize_sft(&CODEC, &parse_sft(&row(columns))?, &o)?;
    Ok(t.expect("the row was dropped"))
}

/// Expected ids and flags, built segment by segment (no BPE merge crosses a boundary here).
#[derive(Default)]
struct Expect(Vec<u32>, Vec<bool>);

impl Expect {
    fn ids(mut self, ids: &[u32], trained: bool) -> Self {
        self.0.extend_from_slice(ids);
        self.1.extend(std::iter::repeat_n(trained, ids.len()));
        self
    }
    fn text(self, text: &str, trained: bool) -> Self {
        let ids = CODEC.encode(text, false).unwrap();
        self.ids(&ids, trained)
    }
    fn check(self, got: &SftTokens) {
        assert_eq!(got.ids, self.0, "ids");
        assert_eq!(got.trained, self.1, "trained flags");
    }
}

fn conversation() -> Value {
    json!([
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "ok"}
    ])
}

#[test]
fn prompt_completion_text_trains_the_completion_and_its_eos() {
    let r = json!({"prompt": "ab c", "completion": " d"});
    let t = tokens(r.clone(), opts(true, false)).unwrap();
    Expect::default()
        .ids(&[BOS], false)
        .text("ab c", false)
        .text(" d", true)
        .ids(&[EOS], true)
        .check(&t);
    assert_eq!(t.trained_tokens(), 3);
    // completion_only_loss = false: every token (the first has no prediction and is not counted).
    let all = tokens(r, opts(false, false)).unwrap();
    assert_eq!(all.ids, t.ids);
    assert!(all.trained.iter().all(|&x| x));
    assert_eq!(all.trained_tokens(), t.ids.len() - 1);
}

#[test]
fn prompt_completion_messages_train_the_assistant_answer() {
    let r = json!({
        "prompt": [{"role": "user", "content": "hi"}],
        "completion": [{"role": "assistant", "content": "ok"}]
    });
    let t = tokens(r.clone(), opts(true, false)).unwrap();
    Expect::default()
        .text(
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
            false,
        )
        .text("ok<|im_end|>\n", true)
        .check(&t);
    // Both masks: the completion's assistant turn is both.
    assert_eq!(tokens(r.clone(), opts(true, true)).unwrap(), t);
    let all = tokens(r.clone(), opts(false, false)).unwrap();
    assert!(all.trained.iter().all(|&x| x));
    // assistant_only_loss alone gives the assistant turn again (here the whole completion).
    assert_eq!(tokens(r, opts(false, true)).unwrap().trained, t.trained);
}

#[test]
fn messages_train_every_token_unless_assistant_only_loss() {
    let r = json!({"messages": conversation()});
    let full = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n\
                <|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n";
    let all = tokens(r.clone(), opts(true, false)).unwrap();
    Expect::default().text(full, true).check(&all);
    let assistant = tokens(r, opts(true, true)).unwrap();
    Expect::default()
        .text(
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
            false,
        )
        .text("yo<|im_end|>\n", true)
        .text(
            "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n",
            false,
        )
        .text("ok<|im_end|>\n", true)
        .check(&assistant);
    assert_eq!(assistant.trained_tokens(), 2 * (2 + 1 + 1));
}

#[test]
fn text_rows_train_every_token_with_eos() {
    let t = tokens(json!({"text": "ab c"}), opts(true, false)).unwrap();
    Expect::default()
        .ids(&[BOS], true)
        .text("ab c", true)
        .ids(&[EOS], true)
        .check(&t);
    assert_eq!(t.trained_tokens(), 4);
    let e = tokens(json!({"text": "ab c"}), opts(true, true))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sft.jsonl line 5") && e.contains("assistant_only_loss"),
        "{e}"
    );
}

#[test]
fn preference_rows_train_on_the_chosen_answer() {
    let t = tokens(
        json!({"prompt": "ab c", "chosen": " d", "rejected": " e"}),
        opts(true, false),
    )
    .unwrap();
    assert_eq!(
        t,
        tokens(
            json!({"prompt": "ab c", "completion": " d"}),
            opts(true, false)
        )
        .unwrap()
    );
    // LLaMA-Factory's sharegpt layout (dpo_en_demo.json).
    let share = json!({
        "conversations": [{"from": "human", "value": "hi"}],
        "chosen": {"from": "gpt", "value": "ok"},
        "rejected": {"from": "gpt", "value": "no"}
    });
    let msgs = json!({
        "prompt": [{"role": "user", "content": "hi"}],
        "completion": [{"role": "assistant", "content": "ok"}]
    });
    assert_eq!(
        tokens(share, opts(true, true)).unwrap(),
        tokens(msgs, opts(true, true)).unwrap()
    );
}

#[test]
fn truncation_keeps_the_start_and_drops_rows_left_without_trained_tokens() {
    let r = json!({"prompt": "ab c", "completion": " d"});
    let mut o = opts(true, false);
    o.max_length = Some(5);
    let t = tokens(r.clone(), o).unwrap();
    Expect::default()
        .ids(&[BOS], false)
        .text("ab c", false)
        .text(" ", true)
        .check(&t);
    o.max_length = Some(4);
    let parsed = parse_sft(&row(r.clone())).unwrap();
    assert_eq!(tokenize_sft(&CODEC, &parsed, &o).unwrap(), None);
    // Every token trained: the same length keeps the row.
    o.completion_only_loss = false;
    assert_eq!(
        tokenize_sft(&CODEC, &parsed, &o)
            .unwrap()
            .unwrap()
            .ids
            .len(),
        4
    );

    let long = json!({"prompt": "abc abc abc", "completion": " d"});
    let text = format!("{long}\n{r}\n");
    let path = temp_file("trunc.jsonl", text.as_bytes());
    o = opts(true, false);
    o.max_length = Some(5);
    let set = load_sft(&path, &CODEC, &o).unwrap();
    assert_eq!(set.rows, vec![t]);
    assert_eq!(set.dropped.len(), 1);
    assert_eq!(set.dropped[0].place, Place::Line(1));
    o.max_length = Some(4);
    let e = load_sft(&path, &CODEC, &o).unwrap_err().to_string();
    assert!(
        e.contains("trunc.jsonl") && e.contains("no row has a trained token"),
        "{e}"
    );
}

#[test]
fn malformed_rows_are_errors_naming_the_row() {
    for (columns, want) in [
        (json!({"input": "x"}), "found: input"),
        (
            json!({"prompt": "x", "completion": [{"role": "assistant", "content": "y"}]}),
            "one format per row",
        ),
        (json!({"completion": "y"}), "missing column \"prompt\""),
        (json!({"messages": "hi"}), "must be a list"),
        (json!({"text": 3}), "must be a string"),
        (json!({"text": " "}), "is empty"),
    ] {
        let e = parse_sft(&row(columns)).unwrap_err().to_string();
        assert!(e.contains("sft.jsonl line 5") && e.contains(want), "{e}");
    }
    let user_only = json!({"messages": [{"role": "user", "content": "hi"}]});
    let e = tokens(user_only, opts(true, true)).unwrap_err().to_string();
    assert!(e.contains("no assistant tokens"), "{e}");
}

#[test]
fn load_sft_reads_every_row_kind_of_a_file() {
    let lines = [
        json!({"prompt": "ab", "completion": " c"}),
        json!({"messages": conversation()}),
        json!({"text": "d"}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let path = temp_file("sft.jsonl", text.as_bytes());
    let set = load_sft(&path, &CODEC, &opts(true, false)).unwrap();
    assert!(set.dropped.is_empty());
    let rows = set.rows;
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].trained_tokens(), 3); // " c" and EOS
    assert!(rows[1].trained.iter().all(|&x| x));
    assert_eq!(rows[2].ids, vec![BOS, u32::from(b'd'), EOS]);
}
