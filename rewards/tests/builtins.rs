//! Built-in reward functions on GSM8K-style strings, and their configs.

use std::path::Path;

use rlhf_rewards::{extract_answer, Columns, RewardBatch, RewardConfig, RewardFn};
use serde_json::{json, Value};

/// Builds the reward of a TOML config entry.
fn build(toml_entry: &str) -> Box<dyn RewardFn> {
    let config: RewardConfig = toml::from_str(toml_entry).expect("config parses");
    config.build(Path::new(".")).expect("reward builds")
}

/// Scores `completions` (prompt "p") with one answer column value per row.
fn score(func: &dyn RewardFn, completions: &[&str], answers: &[Value]) -> Vec<Option<f32>> {
    let prompts = vec!["p".to_string(); completions.len()];
    let completions: Vec<String> = completions.iter().map(|s| s.to_string()).collect();
    let columns: Vec<Columns> = answers
        .iter()
        .map(|a| {
            let mut c = Columns::new();
            if !a.is_null() {
                c.insert("answer".into(), a.clone());
            }
            c
        })
        .collect();
    let batch = RewardBatch::new(&prompts, &completions, &columns).unwrap();
    func.score(&batch).unwrap()
}

const GSM8K_ANSWER: &str = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n\
Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72";

#[test]
fn extracts_final_answers() {
    assert_eq!(extract_answer(GSM8K_ANSWER), Some(72.0));
    assert_eq!(
        extract_answer("so she has \\boxed{1,234} left, not 5"),
        Some(1234.0)
    );
    assert_eq!(extract_answer("\\boxed{\\$18.00} is 3 more"), Some(18.0));
    assert_eq!(extract_answer("\\boxed{x = -3}"), Some(-3.0));
    assert_eq!(
        extract_answer("nested \\boxed{\\text{ans: }{42}} 7"),
        Some(42.0)
    );
    assert_eq!(extract_answer("#### $1,000.0\nthen 5"), Some(1000.0));
    assert_eq!(
        extract_answer("The total is 1{,}500 dollars."),
        Some(1500.0)
    );
    assert_eq!(extract_answer("It costs $3 then $4.50."), Some(4.5));
    assert_eq!(extract_answer("from 10 to 5-3"), Some(3.0));
    assert_eq!(extract_answer("no digits here"), None);
    // A box without a number is the model's answer: there is no numeric answer.
    assert_eq!(extract_answer("5 apples, \\boxed{many}"), None);
    // An unfinished box is ignored.
    assert_eq!(extract_answer("\\boxed{12 and then 13"), Some(13.0));
}

#[test]
fn exact_answer_on_gsm8k_rows() {
    let func = build("type = \"exact_answer\"");
    assert_eq!(func.name(), "exact_answer");
    let gold = Value::String(GSM8K_ANSWER.into());
    let scores = score(
        func.as_ref(),
        &[
            "48/2 = 24, 48 + 24 = 72. The answer is \\boxed{72}.",
            "She sold 72 clips.\n#### 72.0",
            "She sold 71 clips in total.",
            "I am not sure.",
            "The answer is $72.",
            "\\boxed{72} is what I get",
            "72",
        ],
        &[
            gold.clone(),
            gold.clone(),
            gold.clone(),
            gold.clone(),
            json!(72),
            Value::Null, // no answer column: not applicable
            json!("no number in this answer"),
        ],
    );
    assert_eq!(
        scores,
        vec![
            Some(1.0),
            Some(1.0),
            Some(0.0),
            Some(0.0),
            Some(1.0),
            None,
            None
        ]
    );
}

#[test]
fn exact_answer_compares_numerically() {
    let func = build("type = \"exact_answer\"\ncolumn = \"answer\"\nname = \"acc\"");
    assert_eq!(func.name(), "acc");
    let scores = score(
        func.as_ref(),
        &[
            "#### 1,000",
            "\\boxed{0.5}",
            "\\boxed{-12}",
            "\\boxed{0.50001}",
        ],
        &[
            json!("#### 1000"),
            json!(".5"),
            json!("#### -12"),
            json!(0.5),
        ],
    );
    assert_eq!(scores, vec![Some(1.0), Some(1.0), Some(1.0), Some(0.0)]);
}

#[test]
fn exact_answer_without_the_column_is_an_error() {
    let func = build("type = \"exact_answer\"\ncolumn = \"solution\"");
    let prompts = vec!["p".to_string()];
    let completions = vec!["42".to_string()];
    let mut columns = Columns::new();
    columns.insert("answer".into(), json!("#### 42"));
    let columns = vec![columns];
    let batch = RewardBatch::new(&prompts, &completions, &columns).unwrap();
    let err = func.score(&batch).unwrap_err().to_string();
    assert!(
        err.contains("`solution`") && err.contains("answer"),
        "{err}"
    );
}

#[test]
fn regex_full_match_and_search() {
    let think = "<think>\nreasoning\n</think>\nanswer";
    let full = build("type = \"regex\"\npattern = '(?s)<think>.*?</think>.*'");
    let search =
        build("type = \"regex\"\npattern = '</think>'\nmode = \"search\"\nname = \"closes\"");
    let strict =
        build("type = \"regex\"\npattern = '<think>.*</think>'\nmode = \"full\"\nname = \"s\"");
    let rows = [think, "preamble <think>x</think>", "no tags"];
    let none = [Value::Null, Value::Null, Value::Null];
    assert_eq!(
        score(full.as_ref(), &rows, &none),
        vec![Some(1.0), Some(0.0), Some(0.0)]
    );
    assert_eq!(
        score(search.as_ref(), &rows, &none),
        vec![Some(1.0), Some(1.0), Some(0.0)]
    );
    // Without (?s) the dot stops at newlines, and a full match must cover the whole text.
    assert_eq!(
        score(
            strict.as_ref(),
            &["<think>x</think>", think, "<think>x</think> y"],
            &none
        ),
        vec![Some(1.0), Some(0.0), Some(0.0)]
    );
}

#[test]
fn invalid_regex_is_a_clear_error() {
    let config: RewardConfig = toml::from_str("type = \"regex\"\npattern = 'a(b'").unwrap();
    let err = format!("{:#}", config.build(Path::new(".")).unwrap_err());
    assert!(err.contains("invalid regex pattern \"a(b\""), "{err}");
}

#[test]
fn length_penalty_in_chars_and_words() {
    let chars = build("type = \"length_penalty\"\ntarget = 5\nscale = 0.5");
    let words = build(
        "type = \"length_penalty\"\ntarget = 2\nscale = 1\nunit = \"words\"\ntwo_sided = true\nname = \"w\"",
    );
    let none = [Value::Null, Value::Null, Value::Null];
    // "héllo wörld" is 11 chars (not 13 bytes): 6 over target.
    assert_eq!(
        score(chars.as_ref(), &["abc", "héllo wörld", "12345"], &none),
        vec![Some(0.0), Some(-3.0), Some(0.0)]
    );
    assert_eq!(
        score(words.as_ref(), &["one", "  one\ttwo\n", "a b c d e"], &none),
        vec![Some(-1.0), Some(0.0), Some(-3.0)]
    );
    let bad: RewardConfig =
        toml::from_str("type = \"length_penalty\"\ntarget = 5\nscale = -1.0").unwrap();
    let err = bad.build(Path::new(".")).unwrap_err().to_string();
    assert!(err.contains("scale"), "{err}");
}

#[test]
fn contains_and_excludes() {
    let contains = build("type = \"contains\"\ntext = \"####\"");
    let excludes = build("type = \"excludes\"\ntext = \"sorry\"\ncase_sensitive = false");
    let none = [Value::Null, Value::Null];
    assert_eq!(
        score(contains.as_ref(), &["x #### 4", "x ## 4"], &none),
        vec![Some(1.0), Some(0.0)]
    );
    assert_eq!(
        score(excludes.as_ref(), &["SORRY, I can't", "Sure: 4"], &none),
        vec![Some(0.0), Some(1.0)]
    );
    assert_eq!(excludes.name(), "excludes");
    let empty: RewardConfig = toml::from_str("type = \"contains\"\ntext = \"\"").unwrap();
    assert!(empty.build(Path::new(".")).is_err());
}

#[test]
fn config_errors_name_the_problem() {
    let unknown_key =
        toml::from_str::<RewardConfig>("type = \"contains\"\ntext = \"a\"\nwieght = 2")
            .unwrap_err()
            .to_string();
    assert!(unknown_key.contains("wieght"), "{unknown_key}");
    let unknown_type = toml::from_str::<RewardConfig>("type = \"bleu\"")
        .unwrap_err()
        .to_string();
    assert!(unknown_type.contains("bleu"), "{unknown_type}");
    let missing = toml::from_str::<RewardConfig>("type = \"regex\"")
        .unwrap_err()
        .to_string();
    assert!(missing.contains("pattern"), "{missing}");
}

#[test]
fn weights_default_to_one_and_parse_from_integers() {
    let config: RewardConfig = toml::from_str("type = \"contains\"\ntext = \"a\"").unwrap();
    assert_eq!(config.weight(), 1.0);
    let config: RewardConfig =
        toml::from_str("type = \"contains\"\ntext = \"a\"\nweight = 2").unwrap();
    assert_eq!(config.weight(), 2.0);
    let config: RewardConfig = serde_json::from_value(json!({
        "type": "plugin", "path": "x.so", "weight": -0.5, "config": {"marker": "m"}
    }))
    .unwrap();
    assert_eq!(config.weight(), -0.5);
}
