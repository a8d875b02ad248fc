//! Filter nodes against a live `qemu-storage-daemon`: while a mirror, a
//! stream, an intermediate or an active commit runs, QEMU puts a filter
//! node above the node it works on (`mirror_top`, `copy-on-read`,
//! `commit_top`), named by `filter-node-name` or automatically, and takes
//! it out when the job ends. The same scenarios run on QEMU and on ours and
//! are compared by `query-named-block-nodes` (flat and nested) while the
//! job runs, at READY and after it ended, by the refusals of bad filter
//! names (and where they come in QEMU's check order), and by `blockdev-del`
//! of the filter and of the node below it while the job runs.
//!
//! Normalized: automatic node names (`#block…`, a counter and two random
//! digits) compare as `#auto`; the scenario's directory is cut out of file
//! names; the size a file occupies (`actual-size`) and a bitmap's dirty
//! count while the job copies (how far it got) are dropped. Nodes compare
//! as a sorted list (QEMU's list order of implicitly opened layers is its
//! own), and each side's first listed node (the newest: the filter while a
//! job runs) is compared as well.
//!
//! Known, accepted difference, normalized away: implicitly opened backing
//! layers are read-only in QEMU (`ro: true`, and a commit reopens its base
//! read-write while it runs); ours are opened read-write, so `ro` of nodes
//! other than a job's filter is not compared.

mod common;

use std::path::Path;
use std::time::Duration;

use common::chain::{chain, s, tool};
use common::nodes::{graph, result, wait_event};
use common::oracle::{Ours, Side};
use common::qmp::Daemon;
use serde_json::{Value, json};

/// A raw source of 64 MiB (data throughout) and an empty target: a
/// mirror limited to 1 byte/s copies its first burst and then waits.
fn raw_pair(dir: &Path) {
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    tool("qemu-img", &["create", "-q", "-f", "raw", s(&src), "64M"]);
    tool("qemu-io", &["-f", "raw", "-c", "write -P 7 0 64M", s(&src)]);
    tool("qemu-img", &["create", "-q", "-f", "raw", s(&tgt), "64M"]);
}

/// base.qcow2 <- mid.qcow2 <- top.qcow2 (tests/common/chain.rs).
fn qcow2_chain(dir: &Path) {
    chain(dir);
}

fn file_node(name: &str, dir: &Path, file: &str, driver: &str) -> Value {
    json!({"driver": driver, "node-name": name,
        "file": {"driver": "file", "filename": dir.join(file)}})
}

/// How a scenario's job is started and ended.
struct Scenario {
    label: &'static str,
    setup: fn(&Path),
    nodes: fn(&Path) -> Vec<Value>,
    cmd: &'static str,
    args: Value,
    /// Complete at READY (mirror, active commit); else the job ends alone.
    complete: bool,
}

fn play(side: &mut dyn Side, dir: &Path, sc: &Scenario) -> Vec<String> {
    (sc.setup)(dir);
    for n in (sc.nodes)(dir) {
        side.cmd("blockdev-add", n).unwrap();
    }
    let mut out = Vec::new();
    let mut args = sc.args.clone();
    // A `top` file name is the image's path, as its overlay's header
    // resolves it.
    if let Some(t) = args["top"].as_str() {
        args["top"] = json!(dir.join(t));
    }
    args["job-id"] = json!("job0");
    args["speed"] = json!(1);
    let r = result(side.cmd(sc.cmd, args));
    out.push(format!("{}: {r}", sc.cmd));
    if r != "ok" {
        graph(side, dir, "after refusal", false, &mut out);
        return out;
    }
    // The job copies its first burst, then waits for its rate limit.
    std::thread::sleep(Duration::from_millis(300));
    graph(side, dir, "running", true, &mut out);
    let names: Vec<String> = side
        .cmd("query-named-block-nodes", json!({"flat": true}))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap().to_string())
        .collect();
    // blockdev-del of the filter (the newest node) and of the node below.
    for n in names.iter().take(2) {
        let r = result(side.cmd("blockdev-del", json!({"node-name": n})));
        let shown = if n.starts_with("#block") { "#auto" } else { n };
        out.push(format!("blockdev-del {shown}: {r}"));
    }
    side.cmd("block-job-set-speed", json!({"device": "job0", "speed": 0}))
        .unwrap();
    if sc.complete {
        out.push(wait_event(side, "BLOCK_JOB_READY"));
        graph(side, dir, "ready", false, &mut out);
        out.push(result(
            side.cmd("block-job-complete", json!({"device": "job0"})),
        ));
    }
    out.push(wait_event(side, "BLOCK_JOB_COMPLETED"));
    // The job is gone (auto-dismiss) once `null` is out.
    while let Some(ev) = side.event_within(Duration::from_secs(10)) {
        if ev["event"] == "JOB_STATUS_CHANGE" && ev["data"]["status"] == "null" {
            break;
        }
    }
    graph(side, dir, "after", false, &mut out);
    out
}

fn compare(scenarios: &[Scenario]) {
    let mut diffs = Vec::new();
    for sc in scenarios {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let mut qemu = Daemon::start();
        let q = play(&mut qemu, d1.path(), sc);
        drop(qemu);
        let mut ours = Ours::new();
        let o = play(&mut ours, d2.path(), sc);
        if std::env::var("BJ_SHOW").is_ok_and(|v| sc.label.contains(&v)) {
            eprintln!("{}:\n{}", sc.label, o.join("\n"));
        }
        if q != o {
            let mut d = format!("{}:\n", sc.label);
            for i in 0..q.len().max(o.len()) {
                let (a, b) = (q.get(i), o.get(i));
                if a != b {
                    d.push_str(&format!("  qemu: {a:?}\n  ours: {b:?}\n"));
                }
            }
            diffs.push(d);
        }
    }
    assert!(diffs.is_empty(), "differences:\n{}", diffs.join("\n"));
}

fn mirror_nodes(dir: &Path) -> Vec<Value> {
    vec![
        file_node("src", dir, "src.img", "raw"),
        file_node("tgt", dir, "tgt.img", "raw"),
    ]
}

fn chain_nodes(dir: &Path) -> Vec<Value> {
    vec![json!({"driver": "qcow2", "node-name": "top",
        "file": {"driver": "file", "node-name": "topf", "filename": dir.join("top.qcow2")}})]
}

fn mirror(label: &'static str, extra: Value) -> Scenario {
    let mut args = json!({"device": "src", "target": "tgt", "sync": "full"});
    for (k, v) in extra.as_object().unwrap() {
        args[k] = v.clone();
    }
    Scenario {
        label,
        setup: raw_pair,
        nodes: mirror_nodes,
        cmd: "blockdev-mirror",
        args,
        complete: true,
    }
}

fn on_chain(label: &'static str, cmd: &'static str, args: Value, complete: bool) -> Scenario {
    let mut a = json!({"device": "top"});
    for (k, v) in args.as_object().unwrap() {
        a[k] = v.clone();
    }
    Scenario {
        label,
        setup: qcow2_chain,
        nodes: chain_nodes,
        cmd,
        args: a,
        complete,
    }
}

#[test]
fn mirror_filter_matches_qemu() {
    compare(&[
        mirror("mirror, automatic filter name", json!({})),
        mirror(
            "mirror, filter-node-name",
            json!({"filter-node-name": "mf"}),
        ),
        mirror(
            "mirror, write-blocking",
            json!({"copy-mode": "write-blocking"}),
        ),
    ]);
}

#[test]
fn stream_filter_matches_qemu() {
    compare(&[
        on_chain(
            "stream, automatic filter name",
            "block-stream",
            json!({}),
            false,
        ),
        on_chain(
            "stream, filter-node-name",
            "block-stream",
            json!({"filter-node-name": "cor"}),
            false,
        ),
    ]);
}

#[test]
fn commit_filters_match_qemu() {
    compare(&[
        on_chain(
            "intermediate commit, automatic filter name",
            "block-commit",
            json!({"top": "mid.qcow2"}),
            false,
        ),
        on_chain(
            "intermediate commit, filter-node-name",
            "block-commit",
            json!({"top": "mid.qcow2", "filter-node-name": "ct"}),
            false,
        ),
        on_chain(
            "active commit, automatic filter name",
            "block-commit",
            json!({}),
            true,
        ),
        on_chain(
            "active commit, filter-node-name",
            "block-commit",
            json!({"filter-node-name": "ac"}),
            true,
        ),
    ]);
}

#[test]
fn bad_filter_names_match_qemu() {
    let mut all = Vec::new();
    for name in ["src", "tgt", "bad name", "", "x".repeat(32).leak()] {
        all.push(mirror(
            "mirror, bad filter name",
            json!({"filter-node-name": name}),
        ));
    }
    // The filter's name is checked before the job id.
    all.push(mirror(
        "mirror, bad filter name and bad job id",
        json!({"filter-node-name": "src", "job-id": "1bad"}),
    ));
    for (cmd, extra) in [
        ("block-stream", json!({})),
        ("block-commit", json!({})),
        ("block-commit", json!({"top": "mid.qcow2"})),
    ] {
        for name in ["topf", "top", "bad name"] {
            let mut a = extra.clone();
            a["filter-node-name"] = json!(name);
            all.push(on_chain("chain job, bad filter name", cmd, a, false));
        }
    }
    compare(&all);
}
