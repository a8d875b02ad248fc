//! The library's layers point one way (`../shared/DESIGN.md`): C face /
//! QMP → context → transactions → block jobs → job engine; block jobs → block layer →
//! bitmaps; everything may use events, QAPI types, errors and `sync`. This
//! test reads every `crate::…` path in the code of `src/` (comments
//! skipped) and fails on an import the list below does not allow, naming
//! the file and line. The list is the picture: change it only together
//! with the design.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Which top-level modules each module may use (besides itself).
const ALLOWED: &[(&str, &[&str])] = &[
    // The C ABI: the face of everything.
    (
        "capi",
        &[
            "qmp",
            "context",
            "export",
            "nbd",
            "transaction",
            "block_jobs",
            "engine",
            "block",
            "bitmap",
            "events",
            "qapi",
            "error",
            "error_policy",
            "locks",
            "sync",
        ],
    ),
    // The monitor: commands on the context (and object-add's TLS
    // credentials, which live with NBD).
    (
        "qmp",
        &[
            "context",
            "export",
            "nbd",
            "transaction",
            "block_jobs",
            "engine",
            "block",
            "events",
            "qapi",
            "error",
            "locks",
            "sync",
        ],
    ),
    // A host's or a test's world: graph, engine, jobs, events, objects.
    (
        "context",
        &[
            "export",
            "nbd",
            "transaction",
            "block_jobs",
            "engine",
            "block",
            "events",
            "qapi",
            "error",
            "locks",
            "sync",
        ],
    ),
    // Transactions: actions on bitmaps, backups and snapshots as one.
    (
        "transaction",
        &[
            "block_jobs",
            "engine",
            "block",
            "bitmap",
            "qapi",
            "error",
            "sync",
        ],
    ),
    // Block jobs: the engine's jobs on the block layer's nodes.
    (
        "block_jobs",
        &[
            "engine", "block", "bitmap", "events", "qapi", "error", "locks", "sync",
        ],
    ),
    // The job engine knows nothing about blocks.
    (
        "engine",
        &["events", "qapi", "error", "error_policy", "locks", "sync"],
    ),
    // The block layer quiesces abstract users, never jobs.
    (
        "block",
        &[
            "bitmap",
            "nbd",
            "events",
            "qapi",
            "error",
            "error_policy",
            "locks",
            "sync",
        ],
    ),
    // Block exports: nodes served to clients outside (the NBD server),
    // through guest-style backends.
    (
        "export",
        &["block", "nbd", "events", "qapi", "error", "locks", "sync"],
    ),
    // The NBD wire protocol and its sockets: shared by the client driver
    // (block) and the server (export); knows nothing of nodes.
    ("nbd", &["error", "locks", "sync"]),
    // The lock-free bitmap is a leaf.
    ("bitmap", &["error", "sync"]),
    // What a failed request gets: pure, on QAPI types.
    ("error_policy", &["qapi", "error"]),
    ("events", &["qapi", "error", "locks", "sync"]),
    ("qapi", &["error", "sync"]),
    ("error", &["sync"]),
    // Atomics (std or loom) and the bitmap's mutex; the crate's locks.
    ("sync", &["locks"]),
    ("locks", &[]),
];

/// What the crate root re-exports, by the module it comes from.
const ROOT_REEXPORTS: &[(&str, &str)] = &[
    ("Context", "context"),
    ("Error", "error"),
    ("ErrorClass", "error"),
    ("Result", "error"),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`None`: the crate
/// root or the binary).
fn module_of(rel: &Path) -> Option<String> {
    let mut parts = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned());
    let first = parts.next()?;
    if first == "bin" || first == "lib.rs" {
        return None;
    }
    Some(first.trim_end_matches(".rs").to_string())
}

/// The code of a line: without its `//` comment (doc comments included).
fn code(line: &str) -> &str {
    match line.find("//") {
        Some(i) => &line[..i],
        None => line,
    }
}

/// The modules `text` (one file, comments stripped line by line) names
/// through `crate::`, with the line each first appears on.
fn uses(text: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = text.lines().map(code).collect();
    let joined = lines.join("\n");
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(i) = joined[pos..].find("crate::") {
        let at = pos + i;
        pos = at + "crate::".len();
        // `$crate::` in macros is the same crate.
        let line = joined[..at].matches('\n').count() + 1;
        let rest = &joined[pos..];
        let idents: Vec<String> = if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::x, b}`: the first segment of each item.
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map_or(group.len(), |(i, _)| i);
            split_top(&group[..end])
                .iter()
                .map(|item| first_ident(item))
                .collect()
        } else {
            vec![first_ident(rest)]
        };
        for id in idents.into_iter().filter(|s| !s.is_empty()) {
            let module = ROOT_REEXPORTS
                .iter()
                .find(|(name, _)| *name == id)
                .map_or(id.clone(), |(_, m)| m.to_string());
            out.push((line, module));
        }
    }
    out
}

fn first_ident(s: &str) -> String {
    s.trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// `a::{x, y}, b` split at top-level commas.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

#[test]
fn imports_follow_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let known: BTreeSet<&str> = ALLOWED.iter().map(|(m, _)| *m).collect();
    let mut violations = Vec::new();
    let mut checked = 0;
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let Some(module) = module_of(rel) else {
            continue;
        };
        let allowed = ALLOWED
            .iter()
            .find(|(m, _)| *m == module)
            .unwrap_or_else(|| {
                panic!(
                    "{}: module `{module}` is not in the layer list",
                    rel.display()
                )
            })
            .1;
        let text = std::fs::read_to_string(f).unwrap();
        for (line, target) in uses(&text) {
            checked += 1;
            if target == module {
                continue;
            }
            assert!(
                known.contains(target.as_str()),
                "{}:{line}: `crate::{target}` is not a module in the layer list",
                rel.display()
            );
            if !allowed.contains(&target.as_str()) {
                violations.push(format!(
                    "src/{}:{line}: {module} -> {target}",
                    rel.display()
                ));
            }
        }
    }
    // The test reads real code: it must have found imports to check.
    assert!(checked > 100, "only {checked} crate:: paths found");
    assert!(
        violations.is_empty(),
        "imports against the layers:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_reader_finds_grouped_and_nested_imports() {
    let text = "use crate::block::{Node, chain};\n\
                use crate::{engine::Job, error::{Error, Result}};\n\
                // use crate::capi::x; (a comment)\n\
                let x = crate::Result::<()>::Ok(()); /// crate::qmp\n\
                fn f() -> crate::sync::Ordering { todo!() }\n";
    let got: Vec<(usize, String)> = uses(text);
    let want: Vec<(usize, String)> = [
        (1, "block"),
        (2, "engine"),
        (2, "error"),
        (4, "error"),
        (5, "sync"),
    ]
    .iter()
    .map(|(l, m)| (*l, m.to_string()))
    .collect();
    assert_eq!(got, want);
}
