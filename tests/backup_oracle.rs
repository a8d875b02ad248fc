//! `blockdev-backup` against a live `qemu-storage-daemon`: the same
//! scenarios, with a guest writing to the source while the job runs, on
//! QEMU and on ours, compared by replies, events, `query-block-jobs`,
//! the source's bitmaps, the graph (`copy-before-write` filter and its
//! three anonymous bitmaps) and by the targets' contents.
//!
//! The guest: on QEMU an NBD export of the source written by `qemu-io`
//! (the export's backend moves above the filter as a guest device does);
//! on ours a backend (`Context::blk_new`) on the source.
//!
//! Known difference, normalized away: when QEMU inserts the filter it
//! drains the source with the new job already created, so QEMU's events
//! start `created, running, paused, running`; ours start `created,
//! running` (our filter goes in before the job exists). The first
//! `paused, running` right after the first `running` is dropped from
//! QEMU's list.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use blockjob::block::backend::{BackendOptions, BlockBackend};
use common::nodes::{graph, result};
use common::oracle::{Ours, Side, canonical};
use common::qmp::{Daemon, summarize};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

/// A side with a guest writing to node `src`.
trait Guest: Side {
    /// Attach the guest to `src` (before any job).
    fn attach(&mut self, dir: &Path);
    /// A `qemu-io` write command: `write -P <byte> <offset> <len>`.
    fn write(&mut self, cmd: &str);
}

struct Qemu {
    d: Daemon,
    sock: Option<PathBuf>,
}

impl Side for Qemu {
    fn cmd(&mut self, name: &str, args: Value) -> Result<Value, String> {
        self.d.cmd(name, args)
    }
    fn event_within(&mut self, d: Duration) -> Option<Value> {
        self.d.event_within(d)
    }
}

impl Guest for Qemu {
    fn attach(&mut self, dir: &Path) {
        let sock = dir.join("nbd.sock");
        self.cmd(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": sock}}}),
        )
        .unwrap();
        self.cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "src", "writable": true}),
        )
        .unwrap();
        self.sock = Some(sock);
    }
    fn write(&mut self, cmd: &str) {
        let url = format!(
            "nbd+unix:///src?socket={}",
            self.sock.as_ref().unwrap().display()
        );
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", cmd, &url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "qemu-io {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

struct OursGuest {
    o: Ours,
    blk: Option<BlockBackend>,
}

impl Side for OursGuest {
    fn cmd(&mut self, name: &str, args: Value) -> Result<Value, String> {
        self.o.cmd(name, args)
    }
    fn event_within(&mut self, d: Duration) -> Option<Value> {
        self.o.event_within(d)
    }
}

/// `12M`, `64k`, `4096` as bytes.
fn size(s: &str) -> u64 {
    let (n, m) = match s.as_bytes().last() {
        Some(b'M') => (&s[..s.len() - 1], MIB),
        Some(b'k') => (&s[..s.len() - 1], 1024),
        _ => (s, 1),
    };
    n.parse::<u64>().unwrap() * m
}

impl Guest for OursGuest {
    fn attach(&mut self, _dir: &Path) {
        self.blk = Some(
            self.o
                .ctx
                .blk_new("src", BackendOptions::default())
                .unwrap(),
        );
    }
    fn write(&mut self, cmd: &str) {
        let w: Vec<&str> = cmd.split_whitespace().collect();
        let ["write", "-P", p, off, len] = w[..] else {
            panic!("unsupported guest command {cmd}");
        };
        let buf = vec![p.parse::<u8>().unwrap(); size(len) as usize];
        self.blk
            .as_ref()
            .unwrap()
            .pwrite(size(off), &buf)
            .unwrap_or_else(|e| panic!("guest {cmd}: {e:?}"));
    }
}

fn img(dir: &Path, name: &str, fill: Option<u8>) {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(64 * MIB).unwrap();
    if let Some(b) = fill {
        std::fs::write(&p, vec![b; 64 * MIB as usize]).unwrap();
    }
}

/// src (64 MiB of 7), tgt (empty, or failing its write at `fail_sector`
/// once through blkdebug), a bitmap `b0` on src, the guest attached, and
/// 16 fragmented 64 KiB guest writes (b0 counts 1 MiB).
fn setup(side: &mut dyn Guest, dir: &Path, fail_sector: Option<u64>) {
    img(dir, "src.img", Some(7));
    img(dir, "tgt.img", None);
    side.cmd(
        "blockdev-add",
        json!({"driver": "file", "node-name": "src", "filename": dir.join("src.img")}),
    )
    .unwrap();
    let file = json!({"driver": "file", "filename": dir.join("tgt.img")});
    let tgt = match fail_sector {
        None => json!({"driver": "raw", "node-name": "tgt", "file": file}),
        Some(sector) => json!({"driver": "raw", "node-name": "tgt", "file": {
            "driver": "blkdebug", "image": file,
            "inject-error": [{"event": "write_aio", "errno": 5, "sector": sector, "once": true}]}}),
    };
    side.cmd("blockdev-add", tgt).unwrap();
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

/// The source's bitmaps: name (or `anon`), count, busy, recording.
fn bitmaps(side: &mut dyn Guest, node: &str) -> String {
    let nodes = side
        .cmd("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    let n = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .cloned()
        .unwrap_or_default();
    n["dirty-bitmaps"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|b| {
                    format!(
                        "{}:{}:{}:{}",
                        b["name"].as_str().unwrap_or("anon"),
                        b["count"],
                        b["busy"],
                        b["recording"]
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// `query-block-jobs`: type, offset, len, status, io-status, ready.
fn jobs(side: &mut dyn Guest) -> String {
    let v = side.cmd("query-block-jobs", json!({})).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|j| {
            format!(
                "{} {} {}/{} {} {} ready={}",
                j["device"].as_str().unwrap_or(""),
                j["type"].as_str().unwrap_or(""),
                j["offset"],
                j["len"],
                j["status"].as_str().unwrap_or(""),
                j["io-status"].as_str().unwrap_or(""),
                j["ready"]
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Events until `null` of job `j` (or 30 s), summarized; QEMU's drain
/// pair after the first `running` dropped (see the module doc).
fn events_until_null(side: &mut dyn Guest, out: &mut Vec<String>) {
    let mut evs = Vec::new();
    while let Some(ev) = side.event_within(Duration::from_secs(30)) {
        let null = ev["event"] == "JOB_STATUS_CHANGE" && ev["data"]["status"] == "null";
        let mut s = summarize(&ev);
        if ev["event"] == "BLOCK_JOB_COMPLETED" || ev["event"] == "BLOCK_JOB_CANCELLED" {
            s = format!("{s} {}/{}", ev["data"]["offset"], ev["data"]["len"]);
        }
        evs.push(s);
        if null {
            break;
        }
    }
    drop_drain_pair(&mut evs);
    out.push(format!("events: {}", evs.join(", ")));
}

fn drop_drain_pair(evs: &mut Vec<String>) {
    if let Some(i) = evs.iter().position(|e| e == "JSC:running")
        && evs.get(i + 1).map(String::as_str) == Some("JSC:paused")
        && evs.get(i + 2).map(String::as_str) == Some("JSC:running")
    {
        evs.drain(i + 1..i + 3);
    }
}

/// Run `play` on QEMU and on ours in fresh directories; the differences
/// (none expected) and both directories, for content checks.
fn compare(
    label: &str,
    play: &dyn Fn(&mut dyn Guest, &Path) -> Vec<String>,
) -> (tempfile::TempDir, tempfile::TempDir) {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let mut qemu = Qemu {
        d: Daemon::start(),
        sock: None,
    };
    let q = play(&mut qemu, d1.path());
    drop(qemu);
    let mut ours = OursGuest {
        o: Ours::new(),
        blk: None,
    };
    let o = play(&mut ours, d2.path());
    drop(ours);
    if std::env::var("BJ_SHOW").is_ok_and(|v| label.contains(&v)) {
        eprintln!(
            "{label}:\n  qemu: {}\n  ours: {}",
            q.join("\n  qemu: "),
            o.join("\n  ours: ")
        );
    }
    let mut d = String::new();
    for i in 0..q.len().max(o.len()) {
        let (a, b) = (q.get(i), o.get(i));
        if a != b {
            d.push_str(&format!("  qemu: {a:?}\n  ours: {b:?}\n"));
        }
    }
    assert!(d.is_empty(), "{label}: differences:\n{d}");
    (d1, d2)
}

/// The targets of both sides hold the same bytes.
fn same_targets(d1: &Path, d2: &Path) {
    let (a, b) = (
        std::fs::read(d1.join("tgt.img")).unwrap(),
        std::fs::read(d2.join("tgt.img")).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("targets differ at {i}: qemu {:#x}, ours {:#x}", a[i], b[i]);
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
    same_targets(d1.path(), d2.path());
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
                out
            };
            let label = format!("bitmap {mode} {}", if fail { "failing" } else { "ok" });
            let (d1, d2) = compare(&label, &play);
            if !fail {
                same_targets(d1.path(), d2.path());
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
        same_targets(d1.path(), d2.path());
    }
}

#[test]
fn target_errors_follow_the_policy_as_in_qemu() {
    for policy in ["report", "stop", "ignore", "enospc"] {
        let play = |side: &mut dyn Guest, dir: &Path| {
            let mut out = Vec::new();
            setup(side, dir, Some(20 * MIB / 512));
            let r = side.cmd(
                "blockdev-backup",
                json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "bitmap",
                    "bitmap": "b0", "bitmap-mode": "always", "on-target-error": policy,
                    "x-perf": {"max-workers": 1}}),
            );
            out.push(format!("backup: {}", result(r)));
            // Events up to the end, or to the stop (then resume).
            let mut evs = Vec::new();
            while let Some(ev) = side.event_within(Duration::from_secs(30)) {
                let s = summarize(&ev);
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
        compare(&format!("target error {policy}"), &play);
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
