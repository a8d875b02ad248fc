//! The error matrix against real QEMU: for every on-error policy, source
//! read / target write, EIO / ENOSPC (blkdebug, once), record what
//! `qemu-storage-daemon` does with `blockdev-mirror` and compare it with
//! what `c-tests/test_error_matrix.c` saw from our engine: the events
//! (names, operations, actions, error texts, in order), the job's status,
//! pause flag and I/O status when it paused, the errors of `block-job-pause`
//! and a soft `block-job-cancel` while error-paused, the pause flag and I/O
//! status right after `block-job-resume`, and whether the target ended up
//! identical. Offsets are not compared: QEMU copies 16 chunks in parallel,
//! our C copy job one at a time.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::qmp::{Daemon, summarize};
use serde_json::{Value, json};

const SIZE: usize = 4 << 20;

fn qemu_case(side: &str, policy: &str, errno: i32) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let tgt = dir.path().join("tgt.raw");
    std::fs::write(&src, vec![0x5au8; SIZE]).unwrap();
    std::fs::File::create(&tgt)
        .unwrap()
        .set_len(SIZE as u64)
        .unwrap();
    let node = |name: &str, path: &std::path::Path, event: Option<&str>| match event {
        Some(ev) => json!({"driver":"raw","node-name":name,"file":{"driver":"blkdebug",
            "image":{"driver":"file","filename":path},
            "inject-error":[{"event":ev,"errno":errno,"once":true}]}}),
        None => json!({"driver":"raw","node-name":name,"file":{"driver":"file","filename":path}}),
    };
    let mut d = Daemon::start();
    let q = &mut d.qmp;
    let source = side == "source";
    q.execute(
        "blockdev-add",
        node("src", &src, source.then_some("read_aio")),
    )
    .unwrap();
    q.execute(
        "blockdev-add",
        node("tgt", &tgt, (!source).then_some("write_aio")),
    )
    .unwrap();
    let key = if source {
        "on-source-error"
    } else {
        "on-target-error"
    };
    let mut args = json!({"job-id":"job0","device":"src","target":"tgt","sync":"full"});
    args[key] = json!(policy);
    q.execute("blockdev-mirror", args).unwrap();
    let mut events = Vec::new();
    let mut out = json!({"paused": null, "resumed": null, "pause_err": "", "cancel_err": ""});
    loop {
        let ev = q
            .next_event(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("QEMU {side} {policy} {errno}: no event; {events:?}"));
        let s = summarize(&ev);
        events.push(s.clone());
        match s.as_str() {
            "JSC:paused" => {
                let info = &q.execute("query-block-jobs", json!({})).unwrap()[0];
                out["paused"] = json!({"status": info["status"], "paused": info["paused"],
                    "io-status": info["io-status"]});
                out["pause_err"] = json!(
                    q.execute("block-job-pause", json!({"device":"job0"}))
                        .unwrap_err()
                        .desc
                );
                out["cancel_err"] = json!(
                    q.execute("block-job-cancel", json!({"device":"job0","force":false}))
                        .unwrap_err()
                        .desc
                );
                q.execute("block-job-resume", json!({"device":"job0"}))
                    .unwrap();
                let info = &q.execute("query-block-jobs", json!({})).unwrap()[0];
                out["resumed"] = json!({"paused": info["paused"], "io-status": info["io-status"]});
            }
            "READY" => {
                q.execute("block-job-complete", json!({"device":"job0"}))
                    .unwrap();
            }
            "JSC:null" => break,
            _ => {}
        }
    }
    drop(d);
    out["events"] = json!(events);
    out["identical"] = json!(std::fs::read(&src).unwrap() == std::fs::read(&tgt).unwrap());
    out
}

#[test]
fn error_matrix_matches_qemu() {
    // Ours: the C program prints one JSON line per case.
    let stdout = common::cprog::run("test_error_matrix");
    let mut ours: BTreeMap<(String, String, i64), Value> = BTreeMap::new();
    for line in stdout.lines().filter(|l| l.starts_with('{')) {
        let v: Value = serde_json::from_str(line).unwrap();
        if v["once"] != json!(true) {
            continue;
        }
        let k = (
            v["side"].as_str().unwrap().to_string(),
            v["policy"].as_str().unwrap().to_string(),
            v["errno"].as_i64().unwrap(),
        );
        ours.insert(k, v);
    }
    assert_eq!(
        ours.len(),
        20,
        "the C matrix printed {} once-cases",
        ours.len()
    );
    let mut mismatches = Vec::new();
    for ((side, policy, errno), v) in &ours {
        let qemu = qemu_case(side, policy, *errno as i32);
        for field in [
            "events",
            "paused",
            "resumed",
            "pause_err",
            "cancel_err",
            "identical",
        ] {
            if qemu[field] != v[field] {
                mismatches.push(format!(
                    "{side} {policy} errno {errno} {field}:\n  qemu: {}\n  ours: {}",
                    qemu[field], v[field]
                ));
            }
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}
