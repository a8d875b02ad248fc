//! `query-named-block-nodes` made comparable between QEMU and ours: the
//! scenario's directory cut out of file names, automatic node names
//! (`#block…`) as `#auto`, and what depends on timing (a growing file's
//! size, a bitmap's count while a job copies) dropped while a job runs.
//! Nodes compare as a sorted list (QEMU's list order of implicitly opened
//! layers is its own), plus each side's first listed node (the newest).
//! `ro` is compared for filter nodes only: implicitly opened backing
//! layers are read-only in QEMU and read-write in ours.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use super::oracle::{Side, canonical};

/// The drivers of job filter nodes.
pub const FILTERS: &[&str] = &[
    "mirror_top",
    "copy-on-read",
    "commit_top",
    "copy-before-write",
];

/// One node of `query-named-block-nodes`, normalized (see the module doc).
pub fn norm_node(n: &Value, dir: &str, running: bool) -> Value {
    let name = n["node-name"].as_str().unwrap_or("");
    let auto = name.starts_with("#block");
    let filter = FILTERS.contains(&n["drv"].as_str().unwrap_or(""));
    let mut v = json!({
        "node-name": if auto { "#auto" } else { name },
        "drv": n["drv"],
        "file": n["file"].as_str().unwrap_or("").replace(dir, ""),
        "backing_file": n["backing_file"].as_str().map(|s| s.replace(dir, "")),
        "backing_file_depth": n["backing_file_depth"],
        "image": norm_image(&n["image"], dir),
    });
    if running && n["drv"] == "file" {
        // A growing image file's size is how far the job got.
        v["image"]["virtual-size"] = Value::Null;
    }
    if filter {
        v["ro"] = n["ro"].clone();
    }
    if let Some(bitmaps) = n["dirty-bitmaps"].as_array() {
        v["dirty-bitmaps"] = bitmaps
            .iter()
            .map(|b| {
                let mut b = b.clone();
                if running {
                    b.as_object_mut().unwrap().remove("count");
                }
                b
            })
            .collect();
    }
    v
}

pub fn norm_image(i: &Value, dir: &str) -> Value {
    if i.is_null() {
        return Value::Null;
    }
    let mut v = json!({
        "filename": i["filename"].as_str().unwrap_or("").replace(dir, ""),
        "format": i["format"],
        "virtual-size": i["virtual-size"],
        "cluster-size": i["cluster-size"],
        "backing-filename": i["backing-filename"].as_str().map(|s| s.replace(dir, "")),
    });
    if !i["backing-image"].is_null() {
        v["backing-image"] = norm_image(&i["backing-image"], dir);
    }
    v
}

/// The graph as one comparable line per node (sorted), plus the first
/// listed node.
pub fn graph(side: &mut dyn Side, dir: &Path, label: &str, running: bool, out: &mut Vec<String>) {
    let d = format!("{}/", dir.display());
    for flat in [false, true] {
        let nodes = side
            .cmd("query-named-block-nodes", json!({"flat": flat}))
            .unwrap();
        let nodes = nodes.as_array().unwrap();
        let mut lines: Vec<String> = nodes
            .iter()
            .map(|n| canonical(&norm_node(n, &d, running)))
            .collect();
        let first = lines.first().cloned().unwrap_or_default();
        lines.sort();
        out.push(format!("{label} (flat {flat}): first {first}"));
        for l in lines {
            out.push(format!("{label} (flat {flat}):   {l}"));
        }
    }
}

/// Wait for `event` (other events are skipped); its name or `none`.
pub fn wait_event(side: &mut dyn Side, event: &str) -> String {
    while let Some(ev) = side.event_within(Duration::from_secs(30)) {
        if ev["event"] == event {
            return event.to_string();
        }
    }
    format!("no {event}")
}

pub fn result(r: Result<Value, String>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => auto_names(&e),
    }
}

/// `#block` + digits → `#auto` in a message.
pub fn auto_names(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("#block") {
        out.push_str(&rest[..i]);
        out.push_str("#auto");
        rest = rest[i + 6..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}
