//! `blockdev-backup` against a live `qemu-storage-daemon`: the same
//! scenarios, with a guest writing to the source while the job runs, on
//! QEMU and on ours, compared by replies, events, `query-block-jobs`,
//! the source's bitmaps, the graph (`copy-before-write` filter and its
//! three anonymous bitmaps) and by the targets' contents.
//!
//! The guest and the comparison: `tests/common/guest.rs` (with the one
//! known difference it normalizes: QEMU's drain pair of events when the
//! filter goes in).

mod common;

use std::path::Path;
use std::time::Duration;

use common::guest::{
    Guest, bitmaps, compare, drop_drain_pair, events_until_null, img, jobs, same_files,
};
use common::nodes::{graph, result};
use common::oracle::canonical;
use common::qmp::summarize;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

/// src (64 MiB of 7), tgt (empty, or failing its write at `fail_sector`
/// once through blkdebug), a bitmap `b0` on src, the guest attached, and
/// 16 fragmented 64 KiB guest writes (b0 counts 1 MiB).
fn setup(side: &mut dyn Guest, dir: &Path, fail_sector: Option<u64>) {
    setup_failing(side, dir, fail_sector.map(|s| ("tgt", s, libc::EIO)));
}

/// [`setup`] with one error, once: on `tgt` (`write_aio`) or on `src`
/// (`read_aio`, src then raw over blkdebug), at `sector`, with `errno`.
fn setup_failing(side: &mut dyn Guest, dir: &Path, fail: Option<(&str, u64, i32)>) {
    img(dir, "src.img", Some(7));
    img(dir, "tgt.img", None);
    let node = |name: &str, f: &str, event: &str| {
        let file = json!({"driver": "file", "filename": dir.join(f)});
        match fail {
            Some((n, sector, errno)) if n == name => {
                json!({"driver": "raw", "node-name": name, "file": {
                    "driver": "blkdebug", "image": file, "inject-error":
                    [{"event": event, "errno": errno, "sector": sector, "once": true}]}})
            }
            _ if name == "src" => {
                json!({"driver": "file", "node-name": "src", "filename": dir.join(f)})
            }
            _ => json!({"driver": "raw", "node-name": name, "file": file}),
        }
    };
    side.cmd("blockdev-add", node("src", "src.img", "read_aio"))
        .unwrap();
    side.cmd("blockdev-add", node("tgt", "tgt.img", "write_aio"))
        .unwrap();
    side.cmd(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "b0"}),
    )
    .unwrap();
    side.attach(dir);
    for i in (0..32).step_by(2) {
        side.write(&format!("write -P 9 {i}M 64k"));
    }
}

#[test]
fn full_backup_lifecycle_matches_qemu() {
    let play = |side: &mut dyn Guest, dir: &Path| {
        let mut out = Vec::new();
        setup(side, dir, None);
        let r = side.cmd(
            "blockdev-backup",
            json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full", "speed": 1}),
        );
        out.push(format!("backup: {}", result(r)));
        std::thread::sleep(Duration::from_millis(300));
        out.push(jobs(side));
        graph(side, dir, "running", false, &mut out);
        // blockdev-del of the filter, the source and the target.
        let filter = side
            .cmd("query-named-block-nodes", json!({"flat": true}))
            .unwrap()[0]["node-name"]
            .as_str()
            .unwrap()
            .to_string();
        for n in [filter.as_str(), "src", "tgt"] {
            let r = result(side.cmd("blockdev-del", json!({"node-name": n})));
            out.push(format!("blockdev-del: {r}"));
        }
        // A guest write to a cluster not copied yet: copied first, and
        // counted.
        side.write("write -P 10 33M 64k");
        out.push(jobs(side));
        side.cmd("block-job-set-speed", json!({"device": "j", "speed": 0}))
            .unwrap();
        events_until_null(side, &mut out);
        graph(side, dir, "after", false, &mut out);
        out.push(bitmaps(side, "src"));
        out
    };
    let (d1, d2) = compare("full", &play);
    same_files(d1.path(), d2.path(), "tgt.img");
    // And the target is the source before the job: 7s and the 9s.
    let t = std::fs::read(d2.path().join("tgt.img")).unwrap();
    assert!(
        t[33 * MIB as usize..(33 * MIB + 65536) as usize]
            .iter()
            .all(|b| *b == 7)
    );
    assert!(t[..65536].iter().all(|b| *b == 9));
}

#[test]
fn bitmap_modes_match_qemu() {
    for fail in [false, true] {
        for mode in ["on-success", "never", "always"] {
            let play = |side: &mut dyn Guest, dir: &Path| {
                let mut out = Vec::new();
                // Cluster 20 MiB: the sixth of the bitmap's clusters.
                setup(side, dir, fail.then_some(20 * MIB / 512));
                let r = side.cmd(
                    "blockdev-backup",
                    json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "bitmap",
                        "bitmap": "b0", "bitmap-mode": mode, "speed": 1}),
                );
                out.push(format!("backup: {}", result(r)));
                std::thread::sleep(Duration::from_millis(300));
                out.push(jobs(side));
                out.push(bitmaps(side, "src"));
                let busy = side.cmd(
                    "block-dirty-bitmap-clear",
                    json!({"node": "src", "name": "b0"}),
                );
                out.push(format!("clear: {}", result(busy)));
                side.write("write -P 10 33M 64k");
                out.push(bitmaps(side, "src"));
                side.cmd("block-job-set-speed", json!({"device": "j", "speed": 0}))
                    .unwrap();
                events_until_null(side, &mut out);
                out.push(bitmaps(side, "src"));
                // Not only as many bits: the same ones.
                let h = side.cmd(
                    "x-debug-block-dirty-bitmap-sha256",
                    json!({"node": "src", "name": "b0"}),
                );
                out.push(format!(
                    "sha256: {}",
                    h.map(|v| v["sha256"].clone()).unwrap_or_default()
                ));
                out
            };
            let label = format!("bitmap {mode} {}", if fail { "failing" } else { "ok" });
            let (d1, d2) = compare(&label, &play);
            if !fail {
                same_files(d1.path(), d2.path(), "tgt.img");
            }
        }
    }
}

#[test]
fn sync_none_and_top_match_qemu() {
    for sync in ["none", "top"] {
        let play = |side: &mut dyn Guest, dir: &Path| {
            let mut out = Vec::new();
            setup(side, dir, None);
            let mut args = json!({"job-id": "j", "device": "src", "target": "tgt",
                "sync": sync, "filter-node-name": "cbw"});
            if sync == "top" {
                args["speed"] = json!(1);
            }
            out.push(format!(
                "backup: {}",
                result(side.cmd("blockdev-backup", args))
            ));
            std::thread::sleep(Duration::from_millis(300));
            out.push(jobs(side));
            out.push(bitmaps(side, "cbw"));
            side.write("write -P 10 33M 64k");
            out.push(jobs(side));
            out.push(bitmaps(side, "cbw"));
            if sync == "none" {
                side.cmd("block-job-cancel", json!({"device": "j"}))
                    .unwrap();
            } else {
                side.cmd("block-job-set-speed", json!({"device": "j", "speed": 0}))
                    .unwrap();
            }
            events_until_null(side, &mut out);
            out
        };
        let (d1, d2) = compare(&format!("sync {sync}"), &play);
        same_files(d1.path(), d2.path(), "tgt.img");
    }
}

#[test]
fn errors_follow_the_policies_as_in_qemu() {
    // Each policy × a source read or a target write × EIO or ENOSPC.
    let mut cases = Vec::new();
    for node in ["tgt", "src"] {
        for errno in [libc::EIO, libc::ENOSPC] {
            for policy in ["report", "stop", "ignore", "enospc"] {
                cases.push((node, errno, policy));
            }
        }
    }
    for (node, errno, policy) in cases {
        let play = |side: &mut dyn Guest, dir: &Path| {
            let mut out = Vec::new();
            setup_failing(side, dir, Some((node, 20 * MIB / 512, errno)));
            let key = if node == "src" {
                "on-source-error"
            } else {
                "on-target-error"
            };
            let r = side.cmd(
                "blockdev-backup",
                json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "bitmap",
                    "bitmap": "b0", "bitmap-mode": "always", key: policy,
                    "x-perf": {"max-workers": 1}}),
            );
            out.push(format!("backup: {}", result(r)));
            // Events up to the end, or to the stop (then resume).
            let mut evs = Vec::new();
            while let Some(ev) = side.event_within(Duration::from_secs(30)) {
                let mut s = summarize(&ev);
                if ev["event"] == "BLOCK_JOB_COMPLETED" {
                    s = format!("{s} {}/{}", ev["data"]["offset"], ev["data"]["len"]);
                }
                let null = s == "JSC:null";
                let paused = s == "JSC:paused" && evs.iter().any(|e: &String| e.starts_with("ERR"));
                evs.push(s);
                if paused {
                    out.push(jobs(side));
                    side.cmd("block-job-resume", json!({"device": "j"}))
                        .unwrap();
                }
                if null {
                    break;
                }
            }
            drop_drain_pair(&mut evs);
            out.push(format!("events: {}", evs.join(", ")));
            out.push(bitmaps(side, "src"));
            out
        };
        compare(&format!("{node} errno {errno} {policy}"), &play);
    }
}

#[test]
fn bad_arguments_match_qemu() {
    let cases: Vec<Value> = vec![
        json!({"device": "src", "target": "tgt"}),
        json!({"device": "src", "sync": "full"}),
        json!({"device": "src", "target": "tgt", "sync": "full", "job-id": "1bad"}),
        json!({"device": "src", "target": "src", "sync": "full"}),
        json!({"device": "src", "target": "small", "sync": "full"}),
        json!({"device": "src", "target": "tgt", "sync": "bitmap"}),
        json!({"device": "src", "target": "tgt", "sync": "incremental"}),
        json!({"device": "src", "target": "tgt", "sync": "bitmap", "bitmap": "nosuch"}),
        json!({"device": "src", "target": "tgt", "sync": "bitmap", "bitmap": "b0"}),
        json!({"device": "src", "target": "tgt", "sync": "incremental", "bitmap": "b0",
            "bitmap-mode": "always"}),
        json!({"device": "src", "target": "tgt", "sync": "full", "bitmap": "b0"}),
        json!({"device": "src", "target": "tgt", "sync": "top", "bitmap": "b0",
            "bitmap-mode": "never"}),
        json!({"device": "src", "target": "tgt", "sync": "none", "bitmap": "b0",
            "bitmap-mode": "always"}),
        json!({"device": "src", "target": "tgt", "sync": "full", "bitmap-mode": "always"}),
        json!({"device": "src", "target": "tgt", "sync": "full", "bitmap-mode": "sometimes"}),
        json!({"device": "src", "target": "tgt", "sync": "everything"}),
        json!({"device": "src", "target": "tgt", "sync": "full", "compress": true}),
        json!({"device": "src", "target": "tgt", "sync": "full", "x-perf": {"max-workers": 0}}),
        json!({"device": "src", "target": "tgt", "sync": "full", "x-perf": {"max-chunk": 1000}}),
        json!({"device": "src", "target": "tgt", "sync": "full", "x-perf": {"max-chunk": -1}}),
        json!({"device": "src", "target": "tgt", "sync": "full",
            "x-perf": {"min-cluster-size": 1000}}),
        json!({"device": "src", "target": "tgt", "sync": "full",
            "x-perf": {"max-workers": "many"}}),
        json!({"device": "src", "target": "tgt", "sync": "full", "x-perf": {"nosuch": 1}}),
        json!({"device": "src", "target": "tgt", "sync": "full", "x-perf": 5}),
        json!({"device": "src", "target": "tgt", "sync": "full", "filter-node-name": "tgt"}),
        json!({"device": "src", "target": "tgt", "sync": "full",
            "filter-node-name": "bad name"}),
        json!({"device": "src", "target": "tgt", "sync": "full", "speed": -1}),
        json!({"device": "nosuch", "target": "tgt", "sync": "full"}),
        json!({"device": "src", "target": "nosuch", "sync": "full"}),
        json!({"device": "src", "target": "tgt", "sync": "full", "on-source-error": "sometimes"}),
        json!({"device": "src", "target": "tgt", "sync": "full", "extra": 1}),
    ];
    let play = |side: &mut dyn Guest, dir: &Path| {
        let mut out = Vec::new();
        setup(side, dir, None);
        let small = dir.join("small.img");
        std::fs::File::create(&small).unwrap().set_len(MIB).unwrap();
        side.cmd(
            "blockdev-add",
            json!({"driver": "file", "node-name": "small", "filename": small}),
        )
        .unwrap();
        for c in &cases {
            let mut args = c.clone();
            if args.get("job-id").is_none() {
                args["job-id"] = json!("j");
            }
            out.push(format!(
                "{}: {}",
                canonical(c),
                result(side.cmd("blockdev-backup", args))
            ));
            // Nothing is left behind: no job, no filter, b0 not frozen.
            out.push(jobs(side));
            out.push(bitmaps(side, "src"));
        }
        graph(side, dir, "after", false, &mut out);
        out
    };
    compare("bad arguments", &play);
}
