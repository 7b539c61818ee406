use super::batch::*;
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

mod sft;
