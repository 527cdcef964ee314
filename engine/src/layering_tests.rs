//! Holds the layering that ARCHITECTURE.md states ("Layering"): every `crate::<module>` path in
//! `engine/src` must go down the table below, never up or sideways, so that the bookkeeping
//! layers (kv, scheduler, sampling), the backends and the tokenizer can be read, tested and
//! one day split into crates without the engine above them.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The bottom: plain data and readers that import nothing else from the crate. Every module
/// may import these, and the crate root's functions (`compiled_devices`, `version_string`).
const BOTTOM: &[&str] = &["types", "hash", "gguf_file"];
const ROOT_ITEMS: &[&str] = &["compiled_devices", "version_string"];

/// Each module above the bottom and the modules it builds on directly; a module may import
/// those and, transitively, whatever they may import. Bottom first, as in ARCHITECTURE.md.
const LAYERS: &[(&str, &[&str])] = &[
    ("tokenizer", &[]),
    ("kv", &[]),
    ("sampling", &[]),
    ("backend", &[]),
    ("scheduler", &["kv", "sampling"]),
    ("models", &["backend", "tokenizer"]),
    ("runner", &["models", "scheduler"]),
    ("engine", &["runner"]),
    ("server", &["engine"]),
    ("cli", &["engine"]),
    ("bench", &["cli"]),
];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// The layer of a file (its path relative to `src`, with `/`); None for the crate roots and
/// this test.
fn layer_of(rel: &str) -> Option<&str> {
    match rel.split_once('/') {
        Some((dir, _)) => Some(dir),
        None => match rel.trim_end_matches(".rs") {
            "lib" | "main" | "layering_tests" => None,
            stem => Some(stem),
        },
    }
}

/// What `module` may import: the bottom, its own module and its dependencies, transitively.
/// None when the module is missing from the table.
fn allowed(module: &str) -> Option<BTreeSet<&'static str>> {
    if let Some(&m) = BOTTOM.iter().find(|&&m| m == module) {
        return Some(BTreeSet::from([m]));
    }
    let mut out: BTreeSet<&str> = BOTTOM.iter().copied().collect();
    let mut todo = vec![LAYERS.iter().find(|(m, _)| *m == module)?.0];
    while let Some(m) = todo.pop() {
        if out.insert(m) {
            let deps = LAYERS
                .iter()
                .find(|(l, _)| *l == m)
                .map_or(&[][..], |l| l.1);
            todo.extend(deps.iter().copied());
        }
    }
    Some(out)
}

/// The source without `//` comments (doc comments name paths in prose).
fn strip_comments(src: &str) -> String {
    src.lines()
        .map(|l| l.split_once("//").map_or(l, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// Every `crate::<name>` in the code, as (1-based line, name); `crate::{a, b::c}` gives each
/// name.
fn crate_refs(src: &str) -> Vec<(usize, String)> {
    let code = strip_comments(src);
    let line_at = |at: usize| code[..at].matches('\n').count() + 1;
    let mut refs = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Names at depth one of the braces: the first ident after `{` or each `,`.
            let mut depth = 1;
            let mut expect_name = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 1 => break,
                    '}' => depth -= 1,
                    ',' if depth == 1 => expect_name = true,
                    c if expect_name && depth == 1 && !c.is_whitespace() => {
                        expect_name = false;
                        let name = ident_at(&group[i..]);
                        let pos = at + "crate::{".len() + i;
                        refs.push((line_at(pos), name.to_string()));
                    }
                    _ => {}
                }
            }
        } else {
            refs.push((line_at(at), ident_at(rest).to_string()));
        }
    }
    refs
}

#[test]
fn crate_paths_go_down_the_layers_of_architecture_md() {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(
        files.len() > 50,
        "found only {} files under {}",
        files.len(),
        src.display()
    );

    let mut errors = Vec::new();
    for path in &files {
        let rel = path
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let Some(layer) = layer_of(&rel) else {
            continue;
        };
        let Some(ok) = allowed(layer) else {
            errors.push(format!(
                "engine/src/{rel}: module `{layer}` is not in the layering table; add it to \
                 LAYERS (layering_tests.rs) and to ARCHITECTURE.md"
            ));
            continue;
        };
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{rel}: {e}"));
        for (line, target) in crate_refs(&text) {
            if ok.contains(target.as_str()) || ROOT_ITEMS.contains(&target.as_str()) {
                continue;
            }
            let why = if allowed(&target).is_some() {
                format!("which is not below `{layer}`")
            } else {
                "which is not in the layering table".to_string()
            };
            errors.push(format!(
                "engine/src/{rel}:{line}: `{layer}` imports `crate::{target}`, {why} \
                 (may import: {ok:?})"
            ));
        }
    }
    assert!(
        errors.is_empty(),
        "layering violations (ARCHITECTURE.md, \"Layering\"):\n{}",
        errors.join("\n")
    );
}

#[test]
fn crate_refs_reads_paths_groups_and_skips_comments() {
    let src =
        "use crate::kv::Pool;\n// crate::server in a comment\nuse crate::{\n    types::A,\n    \
               scheduler::{B, C},\n};\nlet x = mycrate::engine::f();\n";
    assert_eq!(
        crate_refs(src),
        vec![
            (1, "kv".to_string()),
            (4, "types".to_string()),
            (5, "scheduler".to_string())
        ]
    );
}

#[test]
fn the_table_is_transitive_and_has_no_upward_edge() {
    let engine = allowed("engine").unwrap();
    assert!(engine.contains("kv") && engine.contains("tokenizer") && !engine.contains("server"));
    assert!(!allowed("kv").unwrap().contains("scheduler"));
    assert_eq!(allowed("types").unwrap(), BTreeSet::from(["types"]));
    // Each module's dependencies come before it in LAYERS, so the graph has no cycle.
    for (i, (m, deps)) in LAYERS.iter().enumerate() {
        for d in *deps {
            assert!(
                LAYERS[..i].iter().any(|(l, _)| l == d),
                "`{m}` depends on `{d}`, which must come earlier in LAYERS"
            );
        }
    }
}
