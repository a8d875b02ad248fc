//! The mirror against a live `qemu-storage-daemon`: the same scenarios
//! (blockdev-add with blkdebug, blockdev-mirror, the verbs) driven on both,
//! compared event by event (names and data, timestamps dropped) and by
//! their refusals; the target is compared with the source where the job
//! completed.

mod common;

use std::path::Path;

use common::oracle::{Ours, Side, canonical};
use common::qmp::{Daemon, summarize};
use serde_json::{Value, json};

const SIZE: usize = 4 << 20;

/// What a scenario saw: events (data included, timestamps dropped),
/// command errors, and notes (query snapshots).
#[derive(Debug, PartialEq)]
struct Trace(Vec<String>);

fn node(name: &str, path: &Path, inject: Option<(&str, i32, bool)>) -> Value {
    match inject {
        Some((ev, errno, once)) => {
            json!({"driver":"raw","node-name":name,"file":{"driver":"blkdebug",
            "image":{"driver":"file","filename":path},
            "inject-error":[{"event":ev,"errno":errno,"once":once}]}})
        }
        None => json!({"driver":"raw","node-name":name,"file":{"driver":"file","filename":path}}),
    }
}

struct Scenario<'a> {
    /// (source inject, target inject)
    src_inject: Option<(&'a str, i32, bool)>,
    tgt_inject: Option<(&'a str, i32, bool)>,
    mirror: Value,
    /// What to do on READY: "complete", "cancel", "force".
    on_ready: &'a str,
    /// On the nth error pause: resume (until this many), then force cancel.
    resumes: usize,
}

fn play(side: &mut dyn Side, dir: &Path, sc: &Scenario) -> (Trace, bool) {
    let src = dir.join("src.raw");
    let tgt = dir.join("tgt.raw");
    std::fs::write(&src, vec![0x5au8; SIZE]).unwrap();
    std::fs::File::create(&tgt)
        .unwrap()
        .set_len(SIZE as u64)
        .unwrap();
    let mut t = Vec::new();
    side.cmd("blockdev-add", node("src", &src, sc.src_inject))
        .unwrap();
    side.cmd("blockdev-add", node("tgt", &tgt, sc.tgt_inject))
        .unwrap();
    if let Err(e) = side.cmd("blockdev-mirror", sc.mirror.clone()) {
        t.push(format!("error {e}"));
    }
    let mut pauses = 0;
    loop {
        let Some(ev) = side.event() else {
            t.push("timeout".into());
            break;
        };
        let name = summarize(&ev);
        let mut data = ev["data"].clone();
        if let Some(o) = data.as_object_mut() {
            // Progress depends on how far the parallel copy got when an
            // error struck; compared where it is deterministic (success).
            if name != "COMPLETED" && name != "READY" {
                o.remove("offset");
            }
        }
        t.push(format!(
            "{} {}",
            ev["event"].as_str().unwrap(),
            canonical(&data)
        ));
        let id = ev["data"]["id"]
            .as_str()
            .or(ev["data"]["device"].as_str())
            .unwrap_or("job0")
            .to_string();
        match name.as_str() {
            "READY" => {
                let r = match sc.on_ready {
                    "complete" => side.cmd("block-job-complete", json!({"device": id})),
                    "cancel" => side.cmd("block-job-cancel", json!({"device": id})),
                    _ => side.cmd("block-job-cancel", json!({"device": id, "force": true})),
                };
                t.push(format!("on ready: {r:?}"));
            }
            "JSC:paused" => {
                pauses += 1;
                let q = side.cmd("query-block-jobs", json!({})).unwrap();
                t.push(format!(
                    "paused: io-status {} paused {}",
                    q[0]["io-status"], q[0]["paused"]
                ));
                if pauses <= sc.resumes {
                    t.push(format!(
                        "{:?}",
                        side.cmd("block-job-pause", json!({"device": id}))
                    ));
                    t.push(format!(
                        "{:?}",
                        side.cmd("block-job-cancel", json!({"device": id}))
                    ));
                    side.cmd("block-job-resume", json!({"device": id})).unwrap();
                } else {
                    side.cmd("block-job-cancel", json!({"device": id, "force": true}))
                        .unwrap();
                }
            }
            "PENDING" => {
                t.push(format!("{:?}", side.cmd("job-finalize", json!({"id": id}))));
            }
            "JSC:concluded" if ev["data"]["id"] == "job0" => {
                if let Ok(q) = side.cmd("query-block-jobs", json!({}))
                    && q.as_array().is_some_and(|a| !a.is_empty())
                {
                    t.push(format!("concluded: error {}", q[0]["error"]));
                    t.push(format!("{:?}", side.cmd("job-dismiss", json!({"id": id}))));
                }
            }
            _ => {}
        }
        if name == "JSC:null" {
            break;
        }
    }
    let same = std::fs::read(&src).unwrap() == std::fs::read(&tgt).unwrap();
    (Trace(t), same)
}

/// Run `f` on a fresh qemu-storage-daemon, then on a fresh context of
/// ours, each in a directory of its own: (QEMU's result, ours).
fn on_both<T>(f: impl Fn(&mut dyn Side, &Path) -> T) -> (T, T) {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let mut qemu = Daemon::start();
    let q = f(&mut qemu, d1.path());
    drop(qemu);
    let mut ours = Ours::new();
    let o = f(&mut ours, d2.path());
    (q, o)
}

fn compare(label: &str, sc: &Scenario, diffs: &mut Vec<String>) {
    let ((qt, qs), (ot, os)) = on_both(|side, dir| play(side, dir, sc));
    if std::env::var("BJ_SHOW").is_ok_and(|v| label.contains(&v)) {
        eprintln!("{label}: identical={os} {:#?}", ot.0);
    }
    if qt != ot || qs != os {
        diffs.push(format!(
            "{label}:\n  qemu ({}): {:#?}\n  ours ({}): {:#?}",
            qs, qt.0, os, ot.0
        ));
    }
}

fn mirror(extra: Value) -> Value {
    let mut m = json!({"job-id":"job0","device":"src","target":"tgt","sync":"full"});
    for (k, v) in extra.as_object().unwrap() {
        m[k] = v.clone();
    }
    m
}

#[test]
fn lifecycle_matches_qemu() {
    let mut diffs = Vec::new();
    for (label, on_ready, extra) in [
        ("complete", "complete", json!({})),
        ("soft cancel after ready", "cancel", json!({})),
        ("force cancel after ready", "force", json!({})),
        (
            "manual finalize and dismiss",
            "complete",
            json!({"auto-finalize":false,"auto-dismiss":false}),
        ),
        (
            "write-blocking",
            "complete",
            json!({"copy-mode":"write-blocking"}),
        ),
        (
            "small granularity and buffer",
            "complete",
            json!({"granularity":4096,"buf-size":4096}),
        ),
        ("sync none", "complete", json!({"sync":"none"})),
        (
            "sync top without a backing file",
            "complete",
            json!({"sync":"top"}),
        ),
        (
            "sync none, write-blocking",
            "complete",
            json!({"sync":"none","copy-mode":"write-blocking"}),
        ),
        ("replaces the source", "complete", json!({"replaces":"src"})),
        ("soft cancel, sync none", "cancel", json!({"sync":"none"})),
        (
            "named filter node",
            "complete",
            json!({"filter-node-name":"mf"}),
        ),
        (
            "named filter node, manual finalize",
            "complete",
            json!({"filter-node-name":"mf","auto-finalize":false,"auto-dismiss":false}),
        ),
    ] {
        let sc = Scenario {
            src_inject: None,
            tgt_inject: None,
            mirror: mirror(extra),
            on_ready,
            resumes: 0,
        };
        compare(label, &sc, &mut diffs);
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

#[test]
fn errors_match_qemu() {
    let mut diffs = Vec::new();
    for side in ["source", "target"] {
        for policy in ["report", "ignore", "stop", "enospc", "auto"] {
            for errno in [5, 28] {
                for once in [true, false] {
                    // A persistent error with ignore loops forever (as in
                    // QEMU); its behaviour is covered with once = true.
                    if !once && policy == "ignore" {
                        continue;
                    }
                    let (src, tgt, key) = if side == "source" {
                        (Some(("read_aio", errno, once)), None, "on-source-error")
                    } else {
                        (None, Some(("write_aio", errno, once)), "on-target-error")
                    };
                    let sc = Scenario {
                        src_inject: src,
                        tgt_inject: tgt,
                        mirror: mirror(json!({ key: policy })),
                        on_ready: "complete",
                        resumes: 1,
                    };
                    compare(
                        &format!("{side} {policy} errno {errno} once {once}"),
                        &sc,
                        &mut diffs,
                    );
                }
            }
        }
    }
    assert!(
        diffs.is_empty(),
        "{} mismatches\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

#[test]
fn bad_input_matches_qemu() {
    let mut diffs = Vec::new();
    for (label, extra) in [
        ("negative speed", json!({"speed": -1})),
        ("granularity not a power of 2", json!({"granularity": 1000})),
        ("granularity too small", json!({"granularity": 256})),
        ("granularity too large", json!({"granularity": 1u64 << 27})),
        ("buf-size negative", json!({"buf-size": -1})),
        ("unknown device", json!({"device": "nosuch"})),
        ("unknown target", json!({"target": "nosuch"})),
        ("into itself", json!({"target": "src"})),
        ("bad job id", json!({"job-id": "1abc"})),
        ("empty job id", json!({"job-id": ""})),
        (
            "no job id on a node without device",
            json!({"job-id": null}),
        ),
        ("sync bitmap", json!({"sync": "bitmap"})),
        ("sync incremental", json!({"sync": "incremental"})),
        (
            "replaces checked before the sync mode",
            json!({"sync": "bitmap", "replaces": "nosuch"}),
        ),
        (
            "replaces checked before into itself",
            json!({"target": "src", "replaces": "nosuch"}),
        ),
        (
            "replaces checked after the granularity",
            json!({"granularity": 1000, "replaces": "nosuch"}),
        ),
    ] {
        let mut m = mirror(extra);
        if m["job-id"].is_null() {
            m.as_object_mut().unwrap().remove("job-id");
        }
        let sc = Scenario {
            src_inject: None,
            tgt_inject: None,
            mirror: m,
            on_ready: "complete",
            resumes: 0,
        };
        // These end with the command's error; record only what happened
        // until then (a negative speed also emits created and null).
        let run = |side: &mut dyn Side, dir: &Path| {
            let src = dir.join("src.raw");
            let tgt = dir.join("tgt.raw");
            std::fs::write(&src, vec![0x5au8; SIZE]).unwrap();
            std::fs::write(&tgt, vec![0u8; SIZE]).unwrap();
            side.cmd("blockdev-add", node("src", &src, None)).unwrap();
            side.cmd("blockdev-add", node("tgt", &tgt, None)).unwrap();
            let r = side.cmd("blockdev-mirror", sc.mirror.clone());
            let mut t = vec![format!("{r:?}")];
            while let Some(ev) = side.event_quick() {
                t.push(summarize(&ev));
            }
            t
        };
        let (q, o) = on_both(run);
        if q != o {
            diffs.push(format!("{label}:\n  qemu: {q:?}\n  ours: {o:?}"));
        }
    }
    // A second mirror on a busy node, and a duplicate job id.
    let busy = |side: &mut dyn Side, dir: &Path| {
        let mut t = Vec::new();
        for n in ["a", "b", "c"] {
            let p = dir.join(format!("{n}.raw"));
            std::fs::write(&p, vec![1u8; SIZE]).unwrap();
            side.cmd("blockdev-add", node(n, &p, None)).unwrap();
        }
        side.cmd(
            "blockdev-mirror",
            json!({"job-id":"j0","device":"a","target":"b","sync":"full","speed":1}),
        )
        .unwrap();
        for m in [
            json!({"job-id":"j1","device":"c","target":"b","sync":"full"}),
            json!({"job-id":"j1","device":"b","target":"c","sync":"full"}),
            json!({"job-id":"j1","device":"c","target":"a","sync":"full"}),
            json!({"job-id":"j0","device":"c","target":"c","sync":"full"}),
        ] {
            t.push(format!("{:?}", side.cmd("blockdev-mirror", m)));
        }
        t.push(format!(
            "{:?}",
            side.cmd("block-job-set-speed", json!({"device":"j0","speed":-1}))
        ));
        t.push(format!(
            "{:?}",
            side.cmd("block-job-complete", json!({"device":"j0"}))
        ));
        t.push(format!(
            "{:?}",
            side.cmd("block-job-resume", json!({"device":"j0"}))
        ));
        t.push(format!(
            "{:?}",
            side.cmd("block-job-pause", json!({"device":"nosuch"}))
        ));
        side.cmd("block-job-cancel", json!({"device":"j0","force":true}))
            .unwrap();
        t
    };
    let (q, o) = on_both(busy);
    if q != o {
        diffs.push(format!("busy nodes:\n  qemu: {q:#?}\n  ours: {o:#?}"));
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

/// `replaces`: which nodes a mirror may replace (the source, or a node
/// below it through filters: blkdebug is one, raw is not), QEMU's refusals,
/// and where the target sits in the graph after `complete`.
#[test]
fn replaces_matches_qemu() {
    // dbg2 (blkdebug) -> dbg (blkdebug) -> ra (raw) -> fa (file), and
    // x (blkdebug) -> ra; fb and fs are files of the source's size and of half
    // of it.
    let build = |side: &mut dyn Side, dir: &Path| {
        let a = dir.join("a.raw");
        std::fs::write(&a, vec![0x5au8; SIZE]).unwrap();
        std::fs::write(dir.join("b.raw"), vec![0u8; SIZE]).unwrap();
        std::fs::write(dir.join("s.raw"), vec![0u8; SIZE / 2]).unwrap();
        for (name, file) in [("fa", "a.raw"), ("fb", "b.raw"), ("fs", "s.raw")] {
            side.cmd(
                "blockdev-add",
                json!({"driver":"file","node-name":name,"filename":dir.join(file)}),
            )
            .unwrap();
        }
        for n in [
            json!({"driver":"raw","node-name":"ra","file":"fa"}),
            json!({"driver":"blkdebug","node-name":"dbg","image":"ra"}),
            json!({"driver":"blkdebug","node-name":"dbg2","image":"dbg"}),
            // A second parent of ra: moves with it.
            json!({"driver":"blkdebug","node-name":"x","image":"ra"}),
        ] {
            side.cmd("blockdev-add", n).unwrap();
        }
    };
    // The graph as node -> its file name, with the directory cut out.
    let graph = |side: &mut dyn Side, dir: &Path| {
        let q = side
            .cmd("query-named-block-nodes", json!({"flat": true}))
            .unwrap();
        let d = format!("{}/", dir.display());
        let mut g: Vec<String> = q
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                format!(
                    "{}={}",
                    n["node-name"].as_str().unwrap(),
                    n["file"].as_str().unwrap().replace(&d, "")
                )
            })
            .collect();
        g.sort();
        g.join(" ")
    };
    let mut diffs = Vec::new();
    for (label, replaces, target, sync) in [
        ("unknown node", "nosuch", "fb", "full"),
        ("the source itself", "dbg2", "fb", "full"),
        ("through one filter", "dbg", "fb", "full"),
        ("through two filters", "ra", "fb", "full"),
        ("below a raw node", "fa", "fb", "full"),
        ("the target", "fb", "fb", "full"),
        ("unrelated node", "fs", "fb", "full"),
        ("sync none", "ra", "fb", "none"),
        ("smaller target", "ra", "fs", "full"),
    ] {
        let run = |side: &mut dyn Side, dir: &Path| {
            build(side, dir);
            let mut t = Vec::new();
            let r = side.cmd(
                "blockdev-mirror",
                json!({"job-id":"job0","device":"dbg2","target":target,
                       "sync":sync,"replaces":replaces}),
            );
            t.push(format!("{r:?}"));
            if r.is_ok() {
                loop {
                    let Some(ev) = side.event() else {
                        t.push("timeout".into());
                        break;
                    };
                    let name = summarize(&ev);
                    t.push(name.clone());
                    if name == "READY" {
                        t.push(format!(
                            "{:?}",
                            side.cmd("block-job-complete", json!({"device":"job0"}))
                        ));
                    }
                    if name == "COMPLETED" {
                        t.push(format!("error {}", ev["data"]["error"]));
                    }
                    if name == "JSC:null" {
                        break;
                    }
                }
            }
            t.push(graph(side, dir));
            let copied = std::fs::read(dir.join("a.raw")).unwrap()
                == std::fs::read(dir.join("b.raw")).unwrap();
            t.push(format!("target holds the source: {copied}"));
            t
        };
        let (q, o) = on_both(run);
        if std::env::var("BJ_SHOW").is_ok_and(|v| label.contains(&v)) {
            eprintln!("{label}: {o:#?}");
        }
        if q != o {
            diffs.push(format!("{label}:\n  qemu: {q:#?}\n  ours: {o:#?}"));
        }
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

/// `block-job-change`: switching a running mirror to write-blocking (also
/// while paused), QEMU 10's refusals and argument errors, `actively-synced`
/// after the switch, the verb in `concluded`, and active commit (which has
/// no change).
#[test]
fn block_job_change_matches_qemu() {
    let run = |side: &mut dyn Side, dir: &Path| {
        let mut t = Vec::new();
        let src = dir.join("src.raw");
        let tgt = dir.join("tgt.raw");
        std::fs::write(&src, vec![0x5au8; SIZE]).unwrap();
        std::fs::write(&tgt, vec![0u8; SIZE]).unwrap();
        side.cmd("blockdev-add", node("src", &src, None)).unwrap();
        side.cmd("blockdev-add", node("tgt", &tgt, None)).unwrap();
        side.cmd(
            "blockdev-mirror",
            json!({"job-id":"job0","device":"src","target":"tgt","sync":"full",
                   "speed":1,"auto-dismiss":false}),
        )
        .unwrap();
        let change = |side: &mut dyn Side, t: &mut Vec<String>, args: Value| {
            let r = side.cmd("block-job-change", args.clone());
            t.push(format!("{args} -> {r:?}"));
        };
        for args in [
            json!({"id":"job0","type":"mirror","copy-mode":"background"}),
            json!({"id":"job0","type":"commit"}),
            json!({"id":"job0","type":"mirror"}),
            json!({"id":"job0","type":"mirror","copy-mode":"sideways"}),
            json!({"id":"job0","type":"nope"}),
            json!({"id":"job0"}),
            json!({"type":"mirror","copy-mode":"write-blocking"}),
            json!({}),
            json!({"id":"job0","type":"mirror","copy-mode":"write-blocking","speed":5}),
            json!({"id":"nosuch","type":"mirror","copy-mode":"write-blocking"}),
        ] {
            change(side, &mut t, args);
        }
        side.cmd("block-job-pause", json!({"device":"job0"}))
            .unwrap();
        for args in [
            json!({"id":"job0","type":"mirror","copy-mode":"write-blocking"}),
            json!({"id":"job0","type":"mirror","copy-mode":"write-blocking"}),
            json!({"id":"job0","type":"mirror","copy-mode":"background"}),
            json!({"id":"job0","type":"commit"}),
        ] {
            change(side, &mut t, args);
        }
        side.cmd("block-job-resume", json!({"device":"job0"}))
            .unwrap();
        side.cmd("block-job-set-speed", json!({"device":"job0","speed":0}))
            .unwrap();
        let mut names = Vec::new();
        loop {
            let Some(ev) = side.event() else {
                names.push("timeout".into());
                break;
            };
            let n = summarize(&ev);
            names.push(n.clone());
            if n == "READY" {
                break;
            }
        }
        // Write-blocking and nothing dirty: actively synced (QEMU sets it
        // in the iteration after READY; poll for it).
        let mut synced = Value::Null;
        for _ in 0..40 {
            synced = side.cmd("query-block-jobs", json!({})).unwrap()[0]["actively-synced"].clone();
            if synced == json!(true) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        t.push(format!("actively-synced at READY: {synced}"));
        side.cmd("block-job-complete", json!({"device":"job0"}))
            .unwrap();
        loop {
            let Some(ev) = side.event() else {
                names.push("timeout".into());
                break;
            };
            let n = summarize(&ev);
            names.push(n.clone());
            if n == "JSC:concluded" {
                break;
            }
        }
        change(
            side,
            &mut t,
            json!({"id":"job0","type":"mirror","copy-mode":"write-blocking"}),
        );
        side.cmd("job-dismiss", json!({"id":"job0"})).unwrap();
        while let Some(ev) = side.event_quick() {
            names.push(summarize(&ev));
        }
        t.push(names.join(" "));
        t.push(format!(
            "target holds the source: {}",
            std::fs::read(&src).unwrap() == std::fs::read(&tgt).unwrap()
        ));

        // Active commit runs on the mirror's machinery but has no change.
        let (_, _, top) = common::chain::chain(dir);
        side.cmd(
            "blockdev-add",
            json!({"driver":"qcow2","node-name":"top","file":{"driver":"file","filename":top}}),
        )
        .unwrap();
        side.cmd(
            "block-commit",
            json!({"job-id":"c","device":"top","speed":1}),
        )
        .unwrap();
        change(side, &mut t, json!({"id":"c","type":"commit"}));
        change(
            side,
            &mut t,
            json!({"id":"c","type":"mirror","copy-mode":"write-blocking"}),
        );
        side.cmd("block-job-cancel", json!({"device":"c","force":true}))
            .unwrap();
        while let Some(ev) = side.event() {
            if summarize(&ev) == "JSC:null" {
                break;
            }
        }
        t
    };
    let (q, o) = on_both(run);
    if std::env::var("BJ_SHOW").is_ok() {
        eprintln!("{o:#?}");
    }
    assert_eq!(q, o, "\n  qemu: {q:#?}\n  ours: {o:#?}");
}

/// QEMU's mirror lets go of its nodes as it exits, before
/// `BLOCK_JOB_COMPLETED` (`block_job_remove_all_bdrv`): the target and the
/// source can be deleted while the job still waits to be dismissed, and
/// after a cancel too.
#[test]
fn nodes_are_free_once_completed_as_in_qemu() {
    let (q, o) = on_both(|side, dir| {
        let mut out = Vec::new();
        for (i, cancel) in [false, true].into_iter().enumerate() {
            let (s, t) = (format!("s{i}.img"), format!("t{i}.img"));
            for f in [&s, &t] {
                std::fs::File::create(dir.join(f))
                    .unwrap()
                    .set_len(4 << 20)
                    .unwrap();
            }
            side.cmd("blockdev-add", node("src", &dir.join(&s), None))
                .unwrap();
            side.cmd("blockdev-add", node("tgt", &dir.join(&t), None))
                .unwrap();
            side.cmd("blockdev-mirror", mirror(json!({"auto-dismiss": false})))
                .unwrap();
            while let Some(e) = side.event() {
                if e["event"] == "BLOCK_JOB_READY" {
                    break;
                }
            }
            let verb = if cancel {
                "block-job-cancel"
            } else {
                "block-job-complete"
            };
            side.cmd(verb, json!({"device": "job0"})).unwrap();
            while let Some(e) = side.event() {
                if e["event"] == "JOB_STATUS_CHANGE" && e["data"]["status"] == "concluded" {
                    break;
                }
            }
            for n in ["tgt", "src"] {
                out.push(format!(
                    "{verb}: blockdev-del {n}: {:?}",
                    side.cmd("blockdev-del", json!({"node-name": n}))
                ));
            }
            side.cmd("job-dismiss", json!({"id": "job0"})).unwrap();
            for n in ["tgt", "src"] {
                let _ = side.cmd("blockdev-del", json!({"node-name": n}));
            }
        }
        out
    });
    assert_eq!(o, q);
    assert!(q.iter().all(|l| l.ends_with("Ok(Object {})")), "{q:#?}");
}
