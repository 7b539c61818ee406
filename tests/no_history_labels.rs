//! The repository speaks of the code and its users, not of how it was made: no tracked text file
//! labels anything by development history. Checked patterns (case as written):
//!
//! - numbered work periods: `session 7`, `Sessions 6-7` (`session`/`sessions`, any case, then a
//!   space and a digit);
//! - device-run labels: `call D`, `calls A-D`, `call 13` (`call`/`calls`, any case, then a space
//!   and an upper-case letter A-K or a number, as a whole word);
//! - work-in-progress branch names: `wip/`;
//! - commit ids: a whole word of 7-40 lower-case hex digits with at least one letter and one digit
//!   (not after a `.`, so `1.0e30f32` is a number), except the upstream commits listed in
//!   `UPSTREAM_COMMITS`, which cite other projects' sources.
//!
//! Every file of `git ls-files` is read except `Cargo.lock` (checksums), this file (it names the
//! patterns) and files that are not UTF-8 text.

use std::path::Path;
use std::process::Command;

/// Commits of other projects that the sources cite as the version they follow (TRL's PPO trainer;
/// cubecl's own comments in the vendored cubecl-common).
const UPSTREAM_COMMITS: &[&str] = &["f2cd577", "a784b98", "ddf43b7f"];

const SKIP: &[&str] = &["Cargo.lock", "tests/no_history_labels.rs"];

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The history labels in one line, as short descriptions.
fn labels(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    let lower = line.to_ascii_lowercase();
    let chars: Vec<char> = line.chars().collect();
    let lchars: Vec<char> = lower.chars().collect();
    let before_ok = |i: usize| i == 0 || !is_word(lchars[i - 1]);
    let starts = |i: usize, w: &str| lchars[i..].iter().take(w.len()).copied().eq(w.chars());
    for i in 0..lchars.len() {
        if !before_ok(i) {
            continue;
        }
        for word in ["sessions ", "session "] {
            if starts(i, word) {
                let j = i + word.len();
                if j < lchars.len() && lchars[j].is_ascii_digit() {
                    let end = (j..chars.len())
                        .find(|&k| !chars[k].is_ascii_digit())
                        .unwrap_or(chars.len());
                    found.push(format!("work period `{}`", take(&chars, i, end)));
                }
                break;
            }
        }
        for word in ["calls ", "call "] {
            if starts(i, word) {
                let j = i + word.len();
                let end = (j..chars.len())
                    .find(|&k| !chars[k].is_ascii_digit())
                    .unwrap_or(chars.len());
                let letter = j < chars.len()
                    && ('A'..='K').contains(&chars[j])
                    && (j + 1 == chars.len() || !is_word(chars[j + 1]));
                let number = end > j && (end == chars.len() || !is_word(chars[end]));
                if letter || number {
                    found.push(format!("run label `{}`", take(&chars, i, end.max(j + 1))));
                }
                break;
            }
        }
        if starts(i, "wip/") {
            found.push(format!("branch `{}`", take(&chars, i, i + 16)));
        }
    }
    // Commit ids: whole words of hex digits.
    let mut i = 0;
    while i < chars.len() {
        if !is_word(chars[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_word(chars[i]) {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        let hex = word.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'));
        let mixed = word.chars().any(|c| c.is_ascii_digit())
            && word.chars().any(|c| c.is_ascii_lowercase());
        let after_dot = start > 0 && chars[start - 1] == '.';
        if (7..=40).contains(&word.len())
            && hex
            && mixed
            && !after_dot
            && !UPSTREAM_COMMITS.iter().any(|u| word.starts_with(u))
        {
            found.push(format!("commit id `{word}`"));
        }
    }
    found
}

fn take(chars: &[char], from: usize, to: usize) -> String {
    chars[from..to.min(chars.len())].iter().collect()
}

#[test]
fn the_patterns_catch_history_and_spare_ordinary_text() {
    for bad in [
        "measured in session 7 on an H200",
        "BENCHMARKS.md, sessions 6-7",
        "Session 11 tried it",
        "(call D, one H200)",
        "calls A-D",
        "device call 13 of the day",
        "on branch `wip/grid-barrier`",
        "build 33555a0: contiguous weights",
        "c73bc11's source",
    ] {
        assert!(!labels(bad).is_empty(), "not caught: {bad}");
    }
    for good in [
        "let val = -1.0e30f32;",
        "m.in_use as f64 / 1048576.0",
        "rope_theta: 1000000.0",
        "each call allocates; a call to `plan`",
        "one session of training",
        "of TRL v1.9.0 (unchanged up to commit f2cd577, 1.10.0.dev0)",
        "fn recall_a(x: u32) -> u32",
        "deadbeef cafebabe",
    ] {
        assert!(
            labels(good).is_empty(),
            "false hit: {good}: {:?}",
            labels(good)
        );
    }
}

#[test]
fn no_tracked_file_labels_development_history() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(root)
        .output()
        .expect("git must be available to list the tracked files");
    assert!(out.status.success(), "git ls-files failed: {out:?}");
    let listing = String::from_utf8(out.stdout).expect("UTF-8 paths");
    let mut hits = Vec::new();
    let mut checked = 0;
    for path in listing.split('\0').filter(|p| !p.is_empty()) {
        if SKIP.contains(&path) {
            continue;
        }
        // A tracked file deleted in the work tree is not part of what a commit would hold.
        let Ok(bytes) = std::fs::read(root.join(path)) else {
            continue;
        };
        let Ok(text) = String::from_utf8(bytes) else {
            continue;
        };
        if text.contains('\0') {
            continue;
        }
        checked += 1;
        for (n, line) in text.lines().enumerate() {
            for label in labels(line) {
                hits.push(format!("{path}:{}: {label}", n + 1));
            }
        }
    }
    assert!(checked > 50, "only {checked} tracked text files found");
    assert!(
        hits.is_empty(),
        "{} history label(s) in tracked files (describe the code and its measured reasons \
         instead: device and date, not work periods, run letters, branches or commits):\n{}",
        hits.len(),
        hits.join("\n")
    );
}
