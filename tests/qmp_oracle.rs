//! QMP commands through our dispatcher (`blockjob::qmp::execute`) and
//! through a live qemu-storage-daemon: the same replies — error class and
//! text for refused commands (argument checks of QEMU's QAPI visitor,
//! lookups, wrong-state verbs), the shape of successful ones.

mod common;

use blockjob::Context;
use common::qmp::Daemon;
use serde_json::{Value, json};

/// `(command, arguments)`, run in order on both sides.
fn script(dir: &std::path::Path) -> Vec<(&'static str, Value)> {
    let img = dir.join("a.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    vec![
        ("query-jobs", json!({})),
        ("query-block-jobs", json!({})),
        ("query-jobs", json!({"x": 1})),
        ("nonexistent-command", json!({})),
        (
            "blockdev-add",
            json!({"driver":"null-co","node-name":"n0","size":1048576}),
        ),
        ("blockdev-add", json!({"driver":"null-co","node-name":"n0"})),
        (
            "blockdev-add",
            json!({"driver":"file","node-name":"f0","filename":img}),
        ),
        ("blockdev-add", json!({"node-name":"x"})),
        ("blockdev-add", json!({"driver":"file","node-name":"f1"})),
        ("blockdev-del", json!({})),
        ("blockdev-del", json!({"node-name": 5})),
        ("blockdev-del", json!({"node-name": "nosuch"})),
        ("block-job-pause", json!({"device": "nosuch"})),
        ("block-job-pause", json!({})),
        ("block-job-resume", json!({"device": "nosuch"})),
        (
            "block-job-cancel",
            json!({"device": "nosuch", "force": "yes"}),
        ),
        (
            "block-job-set-speed",
            json!({"device": "nosuch", "speed": 1}),
        ),
        ("block-job-set-speed", json!({"device": "nosuch"})),
        ("block-job-complete", json!({"device": "nosuch"})),
        ("block-job-finalize", json!({"id": "nosuch"})),
        ("block-job-dismiss", json!({"id": "nosuch"})),
        ("job-pause", json!({"id": "nosuch"})),
        ("job-cancel", json!({"id": "nosuch"})),
        ("job-complete", json!({})),
        ("blockdev-mirror", json!({"device":"n0","target":"f0"})),
        (
            "blockdev-mirror",
            json!({"device":"n0","target":"f0","sync":"bogus"}),
        ),
        (
            "blockdev-mirror",
            json!({"device":"n0","target":"f0","sync":"full","job-id":"1bad"}),
        ),
        (
            "blockdev-mirror",
            json!({"device":"n0","target":"n0","sync":"full","job-id":"j"}),
        ),
        (
            "blockdev-mirror",
            json!({"device":"n0","target":"f0","sync":"full","job-id":"j","speed":-1}),
        ),
        (
            "blockdev-mirror",
            json!({"device":"n0","target":"f0","sync":"full","job-id":"j","granularity":1000}),
        ),
        (
            "blockdev-mirror",
            json!({"device":"n0","target":"f0","sync":"full","job-id":"j","on-source-error":"x"}),
        ),
        (
            "blockdev-mirror",
            json!({"device":"n0","target":"f0","sync":"full","job-id":"j","bogus":1}),
        ),
        ("block-stream", json!({"device":"nosuch","job-id":"s"})),
        ("block-stream", json!({"job-id":"s"})),
        ("block-commit", json!({"device":"nosuch","job-id":"c"})),
        (
            "block-commit",
            json!({"device":"n0","job-id":"c","on-error":"nope"}),
        ),
        ("block-dirty-bitmap-add", json!({"node":"n0","name":"b0"})),
        ("block-dirty-bitmap-add", json!({"node":"n0","name":"b0"})),
        (
            "block-dirty-bitmap-add",
            json!({"node":"n0","name":"b1","granularity":1000}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node":"nosuch","name":"b1"}),
        ),
        ("block-dirty-bitmap-add", json!({"node":"n0"})),
        (
            "block-dirty-bitmap-disable",
            json!({"node":"n0","name":"b0"}),
        ),
        (
            "block-dirty-bitmap-enable",
            json!({"node":"n0","name":"nosuch"}),
        ),
        ("block-dirty-bitmap-clear", json!({"node":"n0","name":"b0"})),
        (
            "block-dirty-bitmap-merge",
            json!({"node":"n0","target":"b0","bitmaps":["nosuch"]}),
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node":"n0","target":"b0","bitmaps":[5]}),
        ),
        (
            "block-dirty-bitmap-remove",
            json!({"node":"n0","name":"b0"}),
        ),
        (
            "block-dirty-bitmap-remove",
            json!({"node":"n0","name":"b0"}),
        ),
        ("blockdev-del", json!({"node-name": "f0"})),
        ("blockdev-del", json!({"node-name": "n0"})),
        ("query-jobs", json!({})),
    ]
}

/// `ok` for success (QEMU's return values differ in details we do not
/// compare here), else `Class: desc`.
fn outcome(reply: &Value) -> String {
    match reply.get("error") {
        Some(e) => format!(
            "{}: {}",
            e["class"].as_str().unwrap_or("?"),
            e["desc"].as_str().unwrap_or("?")
        ),
        None => format!(
            "ok {}",
            match &reply["return"] {
                Value::Array(a) => format!("[{}]", a.len()),
                Value::Object(o) => format!("{{{}}}", o.len()),
                v => v.to_string(),
            }
        ),
    }
}

#[test]
fn replies_match_qemu() {
    let qdir = tempfile::tempdir().unwrap();
    let odir = tempfile::tempdir().unwrap();
    let mut qemu = Daemon::start();
    let ctx = Context::new();
    let mut diffs = Vec::new();
    for ((cmd, args), (_, oargs)) in script(qdir.path()).into_iter().zip(script(odir.path())) {
        let theirs = match qemu.qmp.execute(cmd, args.clone()) {
            Ok(v) => outcome(&json!({ "return": v })),
            Err(e) => format!("{}: {}", e.class, e.desc),
        };
        let ours = outcome(&blockjob::qmp::execute(
            &ctx,
            &json!({"execute": cmd, "arguments": oargs}),
        ));
        if theirs != ours {
            diffs.push(format!("{cmd} {args}\n  qemu: {theirs}\n  ours: {ours}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

/// `query-named-block-nodes`: the members QEMU gives for a file node and a
/// qcow2 over it, with the same values where they do not depend on the
/// implementation (`format-specific` is QEMU's own detail: not given).
#[test]
fn named_block_nodes_have_qemus_members() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    common::chain::tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"],
    );
    let add = json!({"driver":"qcow2","node-name":"q",
        "file":{"driver":"file","node-name":"f","filename":img}});
    let mut qemu = Daemon::start();
    qemu.qmp.execute("blockdev-add", add.clone()).unwrap();
    let theirs = qemu
        .qmp
        .execute("query-named-block-nodes", json!({}))
        .unwrap();
    // Closed there before we open it read-write: the image is locked.
    qemu.qmp
        .execute("blockdev-del", json!({"node-name": "q"}))
        .unwrap();
    let ctx = Context::new();
    ctx.blockdev_add(&add).unwrap();
    let ours = blockjob::qmp::execute(&ctx, &json!({"execute":"query-named-block-nodes"}));
    let ours = &ours["return"];
    let by_name = |v: &Value, n: &str| -> Value {
        v.as_array()
            .unwrap()
            .iter()
            .find(|e| e["node-name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("no node {n} in {v}"))
    };
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| k.as_str() != "format-specific")
            .cloned()
            .collect();
        k.sort();
        k
    };
    for n in ["q", "f"] {
        let (t, o) = (by_name(&theirs, n), by_name(ours, n));
        assert_eq!(keys(&o), keys(&t), "{n}: members");
        assert_eq!(keys(&o["image"]), keys(&t["image"]), "{n}: image members");
        for k in [
            "drv",
            "ro",
            "file",
            "backing_file_depth",
            "encrypted",
            "active",
        ] {
            assert_eq!(o[k], t[k], "{n}: {k}");
        }
        for k in ["filename", "format", "dirty-flag"] {
            assert_eq!(o["image"][k], t["image"][k], "{n}: image {k}");
        }
        // Known difference (README): QEMU gives a file node's size in
        // whole 512-byte sectors, rounded up; we give the file's size.
        let (ov, tv) = (
            o["image"]["virtual-size"].as_u64().unwrap(),
            t["image"]["virtual-size"].as_u64().unwrap(),
        );
        assert_eq!(ov.div_ceil(512) * 512, tv, "{n}: image virtual-size");
    }
}
