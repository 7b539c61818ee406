//! The crate's modules depend one way (README, "Layout"): this test reads every source file under
//! `src/`, collects the module paths each one names (`use crate::…`, `crate::…` in code,
//! `super::…`, a folder root's `use child::…`), and fails on an import cycle
//!
//! - between the top-level modules of `src/` (`cli`, `train`, `model`, `cuda`, …), and
//! - inside each folder module, between its files. The folder's root file (`plan.rs` for
//!   `plan/`) is its face: it may use its files, and they may use what it defines (shared types),
//!   but no two of its files may need each other, directly or around a loop.
//!
//! Test code (`tests.rs` files and inline `#[cfg(test)] mod tests`) and comments are left out:
//! tests may reach anywhere. A last test keeps every non-test source file under 1,000 lines.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One non-test source file: its module path (`["model", "lora"]`; a folder's root file has the
/// folder's path) and its code without comments or inline tests.
struct SourceFile {
    path: PathBuf,
    module: Vec<String>,
    code: String,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The module path of `file` (relative to `src/`); `None` for the binary and test files.
fn module_of(rel: &Path) -> Option<Vec<String>> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    match last.as_str() {
        "main.rs" if parts.is_empty() => None,
        "tests.rs" => None,
        "lib.rs" if parts.is_empty() => Some(Vec::new()),
        "mod.rs" => Some(parts),
        name => {
            parts.push(name.trim_end_matches(".rs").to_string());
            Some(parts)
        }
    }
}

/// The code without comments and without a trailing inline test module.
fn strip(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.trim_start().starts_with("//") {
            true => "",
            false => l.split(" // ").next().unwrap_or(""),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path a `use` tree names, flattened: `a::{b, c::{d, e}}` gives `a::b`, `a::c::d`, `a::c::e`.
fn expand_use(tree: &str, prefix: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head = format!("{prefix}{}", &tree[..open]);
        let close = tree.rfind('}').filter(|&c| c > open).unwrap_or(tree.len());
        let inner = &tree[open + 1..close];
        let (mut depth, mut start) = (0, 0);
        for (i, ch) in inner.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand_use(&inner[start..i], &head, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand_use(&inner[start..], &head, out);
    } else if !tree.is_empty() {
        out.push(
            format!("{prefix}{tree}")
                .split(" as ")
                .next()
                .unwrap()
                .to_string(),
        );
    }
}

/// The module-relative paths a file names: each a list of segments starting at `crate`,
/// `super`, `self` or (for `use` only) a bare first segment.
fn named_paths(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    // `use` statements, whole (they may span lines), each starting a line.
    let mut offset = 0;
    for line in code.split_inclusive('\n') {
        let at = offset;
        offset += line.len();
        let t = line.trim_start();
        let t = t
            .strip_prefix("pub ")
            .or_else(|| t.strip_prefix("pub(crate) "))
            .or_else(|| t.strip_prefix("pub(super) "))
            .unwrap_or(t);
        let Some(tree) = t.strip_prefix("use ") else {
            continue;
        };
        let start = at + (line.len() - tree.len());
        let Some(end) = code[start..].find(';') else {
            continue;
        };
        let mut flat = Vec::new();
        expand_use(&code[start..start + end], "", &mut flat);
        for p in flat {
            let segs: Vec<String> = p
                .split("::")
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            if segs.iter().all(|s| {
                s.chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '*')
            }) {
                paths.push(segs);
            }
        }
    }
    // `crate::…` and `super::…` paths anywhere in code.
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            let before = code[..at].chars().last();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let tail: String = code[at..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            paths.push(
                tail.split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
            );
        }
    }
    paths
}

/// Resolves `segs` as seen from module `from` into an absolute module path (without `crate`);
/// `None` for paths outside the crate.
fn absolute(
    from: &[String],
    is_root: bool,
    segs: &[String],
    modules: &BTreeSet<Vec<String>>,
) -> Option<Vec<String>> {
    let first = segs.first()?;
    let mut base: Vec<String> = match first.as_str() {
        "crate" => Vec::new(),
        "self" => from.to_vec(),
        "super" => {
            let mut b = from.to_vec();
            let mut n = 0;
            for s in segs {
                if s == "super" {
                    b.pop();
                    n += 1;
                } else {
                    break;
                }
            }
            let mut out = b;
            out.extend(segs[n..].iter().cloned());
            return Some(out);
        }
        // A bare first segment in a `use`: a child module of a folder's root file.
        name => {
            let mut child = from.to_vec();
            child.push(name.to_string());
            if is_root && modules.contains(&child) {
                from.to_vec()
            } else {
                return None;
            }
        }
    };
    let skip = usize::from(first == "crate" || first == "self");
    base.extend(segs[skip..].iter().cloned());
    Some(base)
}

/// The longest known module that is a prefix of `path`.
fn owning_module(path: &[String], modules: &BTreeSet<Vec<String>>) -> Vec<String> {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| modules.contains(p))
        .unwrap_or_default()
}

/// Names a folder's root file re-exports from a child (`pub use child::{A, B}`): `A` -> child.
fn reexports(files: &[SourceFile]) -> BTreeMap<(Vec<String>, String), Vec<String>> {
    let mut map = BTreeMap::new();
    for f in files {
        for line in f.code.split(';') {
            let line = line.trim();
            let Some(tree) = line.strip_prefix("pub use ") else {
                continue;
            };
            let mut flat = Vec::new();
            expand_use(tree, "", &mut flat);
            for p in flat {
                let segs: Vec<&str> = p.split("::").map(str::trim).collect();
                if segs.len() == 2 && !segs[0].is_empty() && segs[0] != "crate" {
                    let mut child = f.module.clone();
                    child.push(segs[0].to_string());
                    map.insert((f.module.clone(), segs[1].to_string()), child);
                }
            }
        }
    }
    map
}

/// A cycle in `edges`, as a list of nodes, if there is one.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == m).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(m, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(n, edges, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

/// One module naming another, in `file`.
struct Dep {
    from: Vec<String>,
    to: Vec<String>,
    file: PathBuf,
}

/// The crate's files with the module-level dependencies between them.
fn dependencies() -> (Vec<SourceFile>, Vec<Dep>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    let files: Vec<SourceFile> = paths
        .into_iter()
        .filter_map(|p| {
            let module = module_of(p.strip_prefix(&src).unwrap())?;
            let code = strip(&std::fs::read_to_string(&p).unwrap());
            let path = p.strip_prefix(src.parent().unwrap()).unwrap().to_path_buf();
            Some(SourceFile { path, module, code })
        })
        .collect();
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| f.module.clone()).collect();
    let roots: BTreeSet<Vec<String>> = modules
        .iter()
        .filter(|m| !m.is_empty())
        .map(|m| m[..m.len() - 1].to_vec())
        .collect();
    let reexported = reexports(&files);
    let mut deps = Vec::new();
    for f in &files {
        let is_root = roots.contains(&f.module);
        for segs in named_paths(&f.code) {
            let Some(abs) = absolute(&f.module, is_root, &segs, &modules) else {
                continue;
            };
            let mut to = owning_module(&abs, &modules);
            // `crate::model::Llama` names the file that defines `Llama`, not the folder's root.
            if let Some(name) = abs.get(to.len()) {
                if let Some(child) = reexported.get(&(to.clone(), name.clone())) {
                    to = child.clone();
                }
            }
            if to != f.module && !to.is_empty() {
                deps.push(Dep {
                    from: f.module.clone(),
                    to,
                    file: f.path.clone(),
                });
            }
        }
    }
    (files, deps)
}

fn show(edges: &[Dep], cycle: &[String], key: impl Fn(&[String]) -> String) -> String {
    let mut lines = Vec::new();
    for pair in cycle.windows(2) {
        let files: BTreeSet<String> = edges
            .iter()
            .filter(|d| key(&d.from) == pair[0] && key(&d.to) == pair[1])
            .map(|d| d.file.display().to_string())
            .collect();
        lines.push(format!(
            "  {} -> {} (in {})",
            pair[0],
            pair[1],
            files.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    lines.join("\n")
}

#[test]
fn top_level_modules_import_one_way() {
    let (_, deps) = dependencies();
    let key = |m: &[String]| m.first().cloned().unwrap_or_default();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for d in &deps {
        if key(&d.from) != key(&d.to) && !d.from.is_empty() {
            edges.entry(key(&d.from)).or_default().insert(key(&d.to));
        }
    }
    assert!(
        edges.contains_key("cli"),
        "no dependency of src/cli was found: is the reader broken?"
    );
    if let Some(cycle) = find_cycle(&edges) {
        panic!(
            "import cycle between src/ modules:\n{}",
            show(&deps, &cycle, key)
        );
    }
}

#[test]
fn files_inside_each_folder_import_one_way() {
    let (files, deps) = dependencies();
    let folders: BTreeSet<Vec<String>> = files
        .iter()
        .filter(|f| f.module.len() > 1)
        .map(|f| f.module[..f.module.len() - 1].to_vec())
        .collect();
    assert!(
        folders.len() > 3,
        "only {} folder modules found",
        folders.len()
    );
    let mut cycles = Vec::new();
    for folder in folders {
        // Within `folder`, a file is named by the child module it belongs to, or `folder` itself
        // for the folder's root file.
        let key = |m: &[String]| -> String {
            if m.len() > folder.len() && m[..folder.len()] == folder[..] {
                m[..=folder.len()].join("::")
            } else {
                m.join("::")
            }
        };
        let inside = |m: &[String]| m.len() >= folder.len() && m[..folder.len()] == folder[..];
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for d in &deps {
            // A file may use what its folder's root file defines.
            let to_root = d.to == folder;
            if inside(&d.from) && inside(&d.to) && !to_root && key(&d.from) != key(&d.to) {
                edges.entry(key(&d.from)).or_default().insert(key(&d.to));
            }
        }
        if let Some(cycle) = find_cycle(&edges) {
            cycles.push(format!(
                "import cycle inside src/{}:\n{}",
                folder.join("/"),
                show(&deps, &cycle, key)
            ));
        }
    }
    assert!(cycles.is_empty(), "{}", cycles.join("\n"));
}

#[test]
fn no_source_file_is_over_1000_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    let long: Vec<String> = paths
        .iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "tests.rs"))
        .filter_map(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            let code = match text.find("#[cfg(test)]\nmod tests {") {
                Some(i) => &text[..i],
                None => &text,
            };
            let n = code.lines().count();
            (n > 1000).then(|| format!("{} ({n} lines)", p.display()))
        })
        .collect();
    assert!(long.is_empty(), "split along their sections: {long:?}");
}

#[test]
fn the_reader_finds_a_planted_cycle() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    edges.entry("a".into()).or_default().insert("b".into());
    edges.entry("b".into()).or_default().insert("c".into());
    assert_eq!(find_cycle(&edges), None);
    edges.entry("c".into()).or_default().insert("a".into());
    assert_eq!(find_cycle(&edges).map(|c| c.len()), Some(4));
    let mut flat = Vec::new();
    expand_use("crate::cli::{setup::{Loaded, Codec}, grpo}", "", &mut flat);
    assert_eq!(
        flat,
        [
            "crate::cli::setup::Loaded",
            "crate::cli::setup::Codec",
            "crate::cli::grpo"
        ]
    );
    let paths = named_paths("fn f() { crate::model::lora::matmul(x); super::kernels::f(); }");
    assert!(paths.contains(&vec![
        "crate".into(),
        "model".into(),
        "lora".into(),
        "matmul".into()
    ]));
}
